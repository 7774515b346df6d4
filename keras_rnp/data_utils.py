"""Small datasets held whole in memory, as NumPy arrays.

`load_digits` gives the 8x8 handwritten digits that ship inside
scikit-learn (the quickstart's data); `load_split` reads one split of a
`keras_rnp.datasets` dataset into arrays, for measuring models on it.
"""

import numpy as np

from keras_rnp import datasets


def load_digits(seed=0, test_fraction=0.25):
    """The scikit-learn digits as 8x8x1 float32 images in [0, 1].

    Needs scikit-learn (`pip install keras-rnp[examples]`).

    Args:
        seed: seed of the split.
        test_fraction: the share of each class put in the test split, in
            (0, 1).

    Returns:
        `((x_train, y_train), (x_test, y_test))`, labels as int32: each
        class shuffled with `seed` and its first `test_fraction` (rounded)
        put in the test split.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(
            "Expected test_fraction in (0, 1). Received: "
            f"test_fraction={test_fraction}"
        )
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for label in np.unique(y):
        index = rng.permutation(np.flatnonzero(y == label))
        test[index[: int(round(len(index) * test_fraction))]] = True
    return (x[~test], y[~test]), (x[test], y[test])


def load_split(dataset, split, data_dir, batch_size=500):
    """One split as NumPy arrays, in its fixed order, not augmented.

    Args:
        dataset: a tfds dataset name (see `keras_rnp.datasets.load`).
        split: `"train"`, `"validation"`, `"full_train"` or `"test"`.
        data_dir: an ImageFolder directory, tfds' data directory, or None.
        batch_size: images read at a time (does not change the result).

    Returns:
        `(images, labels)`: float32 `[N, 32, 32, 3]` images in [0, 255]
        and `[N]` int32 labels.
    """
    ds, _ = datasets.load(dataset, split, data_dir)
    images, labels = [], []
    for batch_images, batch_labels in datasets.pipeline(
        ds, batch_size, training=False
    ):
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
    if not images:
        raise ValueError(
            f"Expected images in the {split} split of {dataset}. Received: "
            f"an empty split (data_dir={data_dir!r})"
        )
    return np.concatenate(images), np.concatenate(labels)
