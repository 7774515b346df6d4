"""Image classification data through tensorflow-datasets.

`load()` reads a split either with `tfds.load` (a registered dataset such as
`cifar10`, `cifar100` or `imagenet2012`) or, when `data_dir` holds an
ImageFolder layout (`data_dir/{train,test}/<class>/<image>`), with
`tfds.ImageFolder`, which needs no network. `pipeline()` turns a split into
batches: decoded images cached in memory, shuffled, augmented (random crop
with padding and horizontal flip) and prefetched.
"""

import os

import tensorflow as tf

# A validation split is carved from train: every `VALIDATION_EVERY`-th image
# (in the split's fixed order), i.e. 10% of it.
VALIDATION_EVERY = 10
SPLITS = ("train", "validation", "test", "full_train")


def is_image_folder(data_dir):
    """Whether `data_dir` holds an ImageFolder layout (a `train` folder of
    class folders)."""
    train = os.path.join(data_dir or "", "train")
    return bool(data_dir) and os.path.isdir(train)


def load(dataset="cifar10", split="train", data_dir=None):
    """One split as a `tf.data.Dataset` of `(uint8 image, int64 label)`.

    Args:
        dataset: a tfds dataset name, used when `data_dir` is not an
            ImageFolder layout.
        split: `"train"` (90% of the training images), `"validation"` (the
            other 10%), `"full_train"` (all of them) or `"test"`.
        data_dir: an ImageFolder directory, or tfds' data directory (for
            `imagenet2012`, tfds' manual directory must hold the archives).

    Returns:
        `(dataset, num_classes)`.
    """
    if split not in SPLITS:
        raise ValueError(
            f"Expected split to be one of {SPLITS}. Received: split={split!r}"
        )
    import tensorflow_datasets as tfds

    source = "test" if split == "test" else "train"
    if is_image_folder(data_dir):
        builder = tfds.ImageFolder(data_dir)
    elif data_dir and not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"Expected data_dir to be a directory (an ImageFolder layout "
            f"data_dir/train/<class>/<image>, or tfds' data directory). "
            f"Received: data_dir={data_dir!r}, which does not exist."
        )
    elif data_dir and not os.path.isdir(os.path.join(data_dir, dataset)):
        raise ValueError(
            f"Expected data_dir to hold an ImageFolder layout "
            f"(data_dir/train/<class>/<image>, data_dir/test/...) or tfds' "
            f"prepared {dataset!r}. Received: data_dir={data_dir!r}, "
            f"holding {sorted(os.listdir(data_dir))[:5]}."
        )
    else:
        builder = tfds.builder(dataset, data_dir=data_dir)
        builder.download_and_prepare()
    if source not in builder.info.splits:
        raise ValueError(
            f"Expected the data to have a {source!r} split. Received: "
            f"splits {sorted(builder.info.splits)} in {data_dir or dataset}."
        )
    ds = builder.as_dataset(
        split=source, as_supervised=True, shuffle_files=False
    )
    if split in ("train", "validation"):
        total = builder.info.splits[source].num_examples
        held_out = -(-total // VALIDATION_EVERY)
        if split == "train":
            keep, size = (lambda i: i % VALIDATION_EVERY != 0), total - held_out
        else:
            keep, size = (lambda i: i % VALIDATION_EVERY == 0), held_out
        ds = ds.enumerate().filter(lambda i, item: keep(i))
        ds = ds.map(lambda i, item: item)
        ds = ds.apply(tf.data.experimental.assert_cardinality(size))
    num_classes = builder.info.features["label"].num_classes
    return ds, num_classes


def _fit_size(image, size):
    """Resizes the shorter side to `size` and crops the centre square (a
    no-op for images that already have that size)."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]

    def resize():
        scale = size / tf.cast(tf.minimum(height, width), tf.float32)
        new = tf.cast(
            tf.math.ceil(
                tf.cast(tf.stack([height, width]), tf.float32) * scale
            ),
            tf.int32,
        )
        resized = tf.image.resize(image, new, antialias=True)
        resized = tf.image.resize_with_crop_or_pad(resized, size, size)
        return tf.cast(tf.round(resized), tf.uint8)

    same = tf.logical_and(tf.equal(height, size), tf.equal(width, size))
    image = tf.cond(same, lambda: image, resize)
    return tf.ensure_shape(image, (size, size, 3))


def _augment(image, padding, seed):
    """A random crop after zero padding and a random horizontal flip,
    drawn from the image's own `seed` (shape [2]): the same image gets the
    same draws whatever thread of a parallel map handles it."""
    size = image.shape[0]
    image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    crop, flip = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    image = tf.image.stateless_random_crop(image, (size, size, 3), seed=crop)
    return tf.image.stateless_random_flip_left_right(image, seed=flip)


def pipeline(
    ds,
    batch_size,
    image_size=32,
    training=False,
    padding=4,
    cache=True,
    shuffle_buffer=50_000,
    limit=None,
    seed=None,
    drop_remainder=False,
    parallel=True,
    prefetch=True,
):
    """Batches of `(float32 image in [0, 255], int32 label)`.

    Args:
        ds: a dataset from `load()`.
        batch_size: images per batch.
        image_size: side of the square images (others are resized and
            centre-cropped to it).
        training: shuffle and augment (random crop after zero padding by
            `padding` pixels, random horizontal flip).
        cache: keep the decoded images in memory after the first pass.
        shuffle_buffer: size of the shuffle buffer.
        limit: use only the first `limit` images (tests, quick runs).
        seed: seed of the shuffling and augmentation.
        drop_remainder: drop the last, smaller batch.
        parallel: decode and augment on parallel threads (tf.data AUTOTUNE).
        prefetch: prepare the next batches while the model trains.
    """
    calls = tf.data.AUTOTUNE if parallel else None
    if limit:
        ds = ds.take(limit)
    ds = ds.map(
        lambda x, y: (_fit_size(x, image_size), tf.cast(y, tf.int32)),
        num_parallel_calls=calls,
    )
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(
            shuffle_buffer, seed=seed, reshuffle_each_iteration=True
        )
        # One seed per image and epoch, drawn in order: the augmentation
        # is the same on every run (and on every worker) for one `seed`.
        seeds = tf.data.Dataset.random(
            seed=seed, rerandomize_each_iteration=True
        ).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda xy, s: (_augment(xy[0], padding, s), xy[1]),
            num_parallel_calls=calls,
        )
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    # Under a multi-worker strategy each worker keeps its share of the
    # batches (an ImageFolder is a single file shard, so shard by data).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    ds = ds.with_options(options)
    ds = ds.map(
        lambda x, y: (tf.cast(x, tf.float32), y),
        num_parallel_calls=calls,
    )
    return ds.prefetch(tf.data.AUTOTUNE) if prefetch else ds
