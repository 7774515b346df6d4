"""FLOPs, checked against hand-computed values."""

import keras
import numpy as np
import pytest
from helpers import small_cnn

import keras_rnp

L = keras.layers

# small_cnn(): input 10x10x3, convs 8 -> 16 -> 12 channels, dense to 5.
CONV0 = 2 * 10 * 10 * 3 * 3 * 3 * 8  # ungated first conv: 43,200
CONV1 = 2 * 10 * 10 * 3 * 3 * 8 * 16  # gated: 230,400
CONV2 = 2 * 3 * 3 * 3 * 3 * 16 * 12  # gated, stride 2 after pooling: 31,104
DENSE = 2 * 12 * 5  # reads the channels the last unit kept: 120
# Decision network, code_dim = hidden = 32, 4 actions, inputs of 8 and 16
# channels: encoders 2*8*32 + 2*16*32, two LSTM steps 2*(32+32)*(4*32)
# each, two decoders 2*32*4 each.
DECISION = 2 * 8 * 32 + 2 * 16 * 32 + 2 * (2 * 64 * 128 + 2 * 32 * 4)


def test_count_flops_of_plain_model():
    assert keras_rnp.count_flops(small_cnn()) == CONV0 + CONV1 + CONV2 + DENSE


def test_count_flops_counts_dense_on_feature_maps_and_separable_convs():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            L.SeparableConv2D(4, 3, padding="same", depth_multiplier=2),
            L.DepthwiseConv2D(3),
            L.Dense(5),
        ]
    )
    # depthwise: 2 inputs x multiplier 2 = 4 maps; pointwise 4 -> 4.
    separable = 2 * 36 * 9 * (2 * 2) + 2 * 36 * 4 * 4
    depthwise = 2 * 16 * 9 * 4 * 1
    dense = 2 * 16 * 4 * 5
    assert keras_rnp.count_flops(model) == separable + depthwise + dense


def test_count_flops_refuses_non_models():
    with pytest.raises(ValueError, match="expects a built keras.Model"):
        keras_rnp.count_flops(L.Dense(3))


def test_full_flops_and_decision_flops():
    rnp = keras_rnp.wrap(small_cnn(), groups=4)
    assert rnp.full_flops == CONV0 + CONV1 + CONV2 + DENSE
    assert rnp.decision_flops == DECISION


@pytest.mark.parametrize("a1, a2", [(1, 1), (1, 4), (2, 3), (4, 1), (4, 4)])
def test_run_flops_match_hand_count_per_image(a1, a2):
    rnp = keras_rnp.wrap(small_cnn(), groups=4)
    x = np.random.default_rng(0).normal(size=(2, 10, 10, 3))
    actions = np.array([[a1, a2], [4, 4]])
    flops = rnp.run(x.astype("float32"), actions=actions)["flops"].numpy()
    expected = (
        CONV0
        + CONV1 * a1 / 4
        + CONV2 * (a1 / 4) * (a2 / 4)
        + DENSE * a2 / 4
        + DECISION
    )
    np.testing.assert_allclose(flops[0], expected, rtol=1e-6)
    np.testing.assert_allclose(flops[1] - DECISION, rnp.full_flops, rtol=1e-6)


def test_full_actions_cost_full_flops_plus_decision():
    rnp = keras_rnp.wrap(small_cnn(), groups=4)
    x = np.zeros((3, 10, 10, 3), "float32")
    flops = rnp.run(x, actions=4)["flops"].numpy()
    np.testing.assert_allclose(
        flops - rnp.decision_flops, rnp.full_flops, rtol=1e-6
    )


def test_flatten_head_counts_only_kept_channels():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            L.Conv2D(4, 3, padding="same", activation="relu"),
            L.Conv2D(8, 3, padding="same", activation="relu"),
            L.Flatten(),
            L.Dropout(0.5),
            L.Dense(3),
            L.Dense(2),
        ]
    )
    rnp = keras_rnp.wrap(model, groups=2)
    x = np.zeros((1, 6, 6, 3), "float32")
    flops = rnp.run(x, actions=1)["flops"].numpy()[0] - rnp.decision_flops
    conv0 = 2 * 36 * 9 * 3 * 4
    conv1_half = 2 * 36 * 9 * 4 * 8 / 2
    dense_half = 2 * 36 * 8 * 3 / 2
    assert flops == pytest.approx(conv0 + conv1_half + dense_half + 2 * 3 * 2)
    assert rnp.full_flops == keras_rnp.count_flops(model)


def test_count_flops_of_branching_model_matches_hand_count():
    # A residual block with a projection shortcut, a concatenation, zero
    # padding, a transposed convolution and batch norm.
    inputs = keras.Input((8, 8, 4))
    x = L.ZeroPadding2D(1)(inputs)  # 10x10x4
    x = L.Conv2D(8, 3, name="stem")(x)  # 8x8x8
    x = L.BatchNormalization()(x)
    y = L.Conv2D(8, 3, padding="same", name="inner")(x)
    y = L.DepthwiseConv2D(3, padding="same", name="depthwise")(y)
    shortcut = L.Conv2D(8, 1, name="shortcut")(x)
    x = L.ReLU()(L.Add()([y, shortcut]))
    x = L.Concatenate()([x, x])  # 8x8x16
    x = L.Conv2DTranspose(2, 3, strides=2, padding="same", name="up")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(3)(x))
    stem = 2 * 64 * 9 * 4 * 8
    inner = 2 * 64 * 9 * 8 * 8
    depthwise = 2 * 64 * 9 * 8
    shortcut = 2 * 64 * 8 * 8
    up = 2 * 64 * 9 * 16 * 2  # every input position, the whole kernel
    dense = 2 * 2 * 3
    assert keras_rnp.count_flops(model) == (
        stem + inner + depthwise + shortcut + up + dense
    )


def test_count_flops_of_resnet50_is_the_sum_of_its_convs_and_dense():
    model = keras.applications.ResNet50(
        weights=None, input_shape=(64, 64, 3), classes=10
    )
    expected = 0
    for layer in model.layers:
        if isinstance(layer, L.Conv2D):
            h, w, c_out = layer.output.shape[1:]
            kh, kw = layer.kernel_size
            expected += 2 * h * w * kh * kw * layer.input.shape[-1] * c_out
        elif isinstance(layer, L.Dense):
            expected += 2 * layer.input.shape[-1] * layer.units
    assert keras_rnp.count_flops(model) == expected
    assert expected > 3e8  # 53 convolutions at 64x64: not a trivial sum.


def test_count_flops_counts_nested_models():
    inner = keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(4, 3)])
    outer = keras.Sequential(
        [keras.Input((6, 6, 2)), inner, L.Flatten(), L.Dense(2)]
    )
    assert keras_rnp.count_flops(outer) == 2 * 16 * 9 * 2 * 4 + 2 * 64 * 2


def test_count_flops_refuses_what_it_cannot_count_naming_the_layer():
    recurrent = keras.Sequential(
        [keras.Input((5, 3)), L.LSTM(4, name="lstm"), L.Dense(2)]
    )
    with pytest.raises(ValueError, match="layer 'lstm' \\(LSTM\\)"):
        keras_rnp.count_flops(recurrent)
    open_size = keras.Sequential(
        [keras.Input((None, None, 3)), L.Conv2D(4, 3, name="conv")]
    )
    with pytest.raises(ValueError, match="fixed image size.*'conv'"):
        keras_rnp.count_flops(open_size)
