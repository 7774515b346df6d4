"""keras_rnp.data_utils: the digits split and whole splits as arrays."""

import numpy as np
import pytest
from test_datasets import make_image_folder

from keras_rnp import data_utils


def test_digits_split_is_stratified_and_scaled():
    (x_train, y_train), (x_test, y_test) = data_utils.load_digits(seed=0)
    assert x_train.shape[1:] == (8, 8, 1) and x_test.shape[1:] == (8, 8, 1)
    assert len(x_train) + len(x_test) == 1797
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    np.testing.assert_allclose(
        np.bincount(y_test) / len(y_test),
        np.bincount(y_train) / len(y_train),
        atol=0.01,
    )


def test_digits_split_depends_on_the_seed_only():
    (x_a, y_a), (_, test_a) = data_utils.load_digits(0)
    (x_b, y_b), (_, test_b) = data_utils.load_digits(0)
    np.testing.assert_array_equal(x_a, x_b)
    np.testing.assert_array_equal(test_a, test_b)
    (x_c, _), _ = data_utils.load_digits(1)
    assert not np.array_equal(x_a, x_c)
    with pytest.raises(ValueError, match="Received: test_fraction=1"):
        data_utils.load_digits(test_fraction=1)


def test_load_split_reads_a_whole_split_in_order(tmp_path):
    root = make_image_folder(tmp_path, classes=3, train=10, test=4)
    images, labels = data_utils.load_split("cifar10", "test", root, 5)
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == (12,)
    # Each class has a constant red channel of 50 * class.
    np.testing.assert_array_equal(images[..., 0].mean((1, 2)), labels * 50.0)
    again, again_labels = data_utils.load_split("cifar10", "test", root)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    validation, _ = data_utils.load_split("cifar10", "validation", root)
    assert len(validation) == 3
