"""keras_rnp.datasets on a tiny ImageFolder (and on CIFAR-10 when here)."""

import os

import numpy as np
import pytest
from PIL import Image

from keras_rnp import datasets

CIFAR_DIR = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10"
)


def make_image_folder(root, classes=3, train=10, test=4, size=32, seed=0):
    """`root/{train,test}/<class>/<n>.png` with random pixels; every image
    of class c has a constant red channel c * 50 (a recognizable label)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for n in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[..., 0] = c * 50
                Image.fromarray(pixels).save(folder / f"{n}.png")
    return str(root)


def labels_of(ds):
    return sorted(int(y) for _, y in ds)


def test_validation_is_carved_from_train_disjointly(tmp_path):
    root = make_image_folder(tmp_path, train=10)
    train, classes = datasets.load(split="train", data_dir=root)
    val, _ = datasets.load(split="validation", data_dir=root)
    full, _ = datasets.load(split="full_train", data_dir=root)
    assert classes == 3
    assert int(train.cardinality()) == 27 and int(val.cardinality()) == 3
    assert len(list(train)) == 27 and len(list(val)) == 3
    assert sorted(labels_of(train) + labels_of(val)) == labels_of(full)
    # No image is in both (each image is unique by its random pixels).
    seen = {x.numpy().tobytes() for x, _ in train}
    assert not any(x.numpy().tobytes() in seen for x, _ in val)


def test_pipeline_batches_augments_and_keeps_labels(tmp_path):
    root = make_image_folder(tmp_path)
    test, _ = datasets.load(split="test", data_dir=root)
    batches = list(datasets.pipeline(test, batch_size=5))
    assert [len(y) for _, y in batches] == [5, 5, 2]
    images = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(images[..., 0].mean((1, 2)), labels * 50.0)
    assert 0.0 <= images.min() and images.max() <= 255.0

    trained = datasets.pipeline(test, batch_size=12, training=True, seed=1)
    x, y = next(iter(trained))
    # Crops pad with zeros and flips: same shape, red channel intact
    # inside the image, some pixels changed.
    assert x.shape == (12, 32, 32, 3)
    assert sorted(y.numpy().tolist()) == sorted(labels.tolist())
    limited = datasets.pipeline(test, batch_size=4, limit=6)
    assert sum(len(y) for _, y in limited) == 6


def test_other_sizes_are_resized_and_centre_cropped(tmp_path):
    root = make_image_folder(tmp_path, classes=2, train=2, test=2, size=48)
    test, _ = datasets.load(split="test", data_dir=root)
    x, _ = next(iter(datasets.pipeline(test, batch_size=4, image_size=32)))
    assert x.shape == (4, 32, 32, 3)


def test_bad_arguments_name_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="split"):
        datasets.load(split="dev", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.load(data_dir=str(tmp_path / "missing"))


@pytest.mark.skipif(
    not os.path.isdir(CIFAR_DIR), reason="the shared CIFAR-10 copy is absent"
)
def test_reads_the_shared_cifar10_image_folder():
    test, classes = datasets.load(split="test", data_dir=CIFAR_DIR)
    x, y = next(iter(datasets.pipeline(test, batch_size=64, limit=64)))
    assert classes == 10
    assert x.shape == (64, 32, 32, 3)
    assert set(y.numpy().tolist()) <= set(range(10))
    assert len(set(y.numpy().tolist())) > 3
