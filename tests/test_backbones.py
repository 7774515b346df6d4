"""keras_rnp.backbones: the layers, shapes and weights of each network."""

import keras
import numpy as np
import pytest

import keras_rnp
from keras_rnp import backbones


def kinds(model):
    return [type(layer).__name__ for layer in model.layers]


def convolutions(model):
    return [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
    ]


BLOCK = ["Conv2D", "BatchNormalization", "ReLU"]
POOLED = BLOCK + ["MaxPooling2D"]
HEAD = ["GlobalAveragePooling2D", "Dense"]


def test_cifar_cnn_normalizes_then_pools_after_every_block():
    model = backbones.cifar_cnn()
    assert model.name == "cnn4"
    assert kinds(model) == ["Normalization"] + POOLED * 4 + HEAD
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 10)
    convs = convolutions(model)
    assert [c.filters for c in convs] == [64, 128, 256, 512]
    assert not any(c.use_bias for c in convs)
    # Images in [0, 255] come out standardized per channel.
    mean = np.array(backbones.CIFAR_MEAN, "float32")
    std = np.array(backbones.CIFAR_STD, "float32")
    x = np.stack([mean, mean + std])[:, None, None, :]
    np.testing.assert_allclose(
        model.layers[0](x).numpy().reshape(2, 3),
        [[0, 0, 0], [1, 1, 1]],
        atol=1e-5,
    )


def test_cifar_cnn_of_the_speed_benchmark():
    model = backbones.cifar_cnn(
        classes=3, pool_first=False, normalize=False, name="cifar4"
    )
    assert model.name == "cifar4"
    assert kinds(model) == BLOCK + POOLED * 3 + HEAD
    assert model.output_shape == (None, 3)
    # Without pooling after the first block the second convolution runs at
    # 32x32 instead of 16x16.
    pooled = keras_rnp.count_flops(backbones.cifar_cnn(classes=3))
    assert keras_rnp.count_flops(model) > 3 * pooled


def test_the_same_seed_gives_the_same_weights_whatever_the_variant():
    def weights(**kwargs):
        keras.utils.set_random_seed(7)
        model = backbones.cifar_cnn(widths=(4, 8, 8, 16), **kwargs)
        return [w for w in model.get_weights() if w.ndim == 4 or w.ndim == 2]

    plain = weights()
    for other in (weights(), weights(pool_first=False, normalize=False)):
        assert len(other) == len(plain) == 5
        for u, v in zip(plain, other, strict=True):
            np.testing.assert_array_equal(u, v)


def test_digits_cnn_pools_after_the_second_block():
    model = backbones.digits_cnn()
    assert model.name == "backbone"
    assert kinds(model) == BLOCK + POOLED + BLOCK + HEAD
    assert model.input_shape == (None, 8, 8, 1)
    assert model.output_shape == (None, 10)
    small = backbones.digits_cnn((6, 6, 2), classes=4, widths=(8, 8))
    assert kinds(small) == BLOCK + POOLED + HEAD
    assert small.input_shape == (None, 6, 6, 2)
    assert small.output_shape == (None, 4)


def test_vgg16_layout():
    model = backbones.vgg16(classes=10)
    assert model.name == "vgg16"
    convs = convolutions(model)
    expected = [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert [c.filters for c in convs] == expected
    assert all(c.use_bias and c.activation.__name__ == "relu" for c in convs)
    assert kinds(model).count("MaxPooling2D") == 5
    assert kinds(model)[-4:] == ["Flatten", "Dense", "Dense", "Dense"]
    assert model.output_shape == (None, 10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(classes=0), "Received: classes=0"),
        (dict(classes=2.0), "Received: classes=2.0"),
        (dict(widths=()), r"Received: widths=\(\)"),
        (dict(widths=(8, 0)), r"Received: widths=\(8, 0\)"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        backbones.cifar_cnn(**kwargs)
    with pytest.raises(ValueError, match=message):
        backbones.digits_cnn(**kwargs)
