"""keras_rnp.layers: GatedConv2D and GatedHead as Keras layers of their
own, against NumPy references."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import np_batch_norm
from helpers import np_conv2d
from helpers import randomize_batch_norm
from helpers import small_cnn

import keras_rnp
from keras_rnp.layers import GatedConv2D
from keras_rnp.layers import GatedHead

L = keras.layers


def gated_unit(groups=4, in_gated=True, seed=0):
    keras.utils.set_random_seed(seed)
    unit = GatedConv2D(
        L.Conv2D(8, 3, padding="same", name="conv"),
        tail=[L.BatchNormalization(name="bn"), L.ReLU()],
        groups=groups,
        in_gated=in_gated,
    )
    unit.build((None, 6, 6, 4))
    randomize_batch_norm(keras.Sequential(unit.tail), seed)
    return unit


def np_unit(unit, x, action):
    kernel, bias = unit.conv.get_weights()
    y = np.maximum(
        np_batch_norm(np_conv2d(x, kernel, bias, 1, "same"), unit.tail[0]), 0
    )
    keep = np.arange(8)[None, :] < (action * 8 // unit.groups)[:, None]
    return y * keep[:, None, None, :]


def test_masked_call_matches_numpy_and_zeroes_skipped_groups():
    unit = gated_unit()
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 4)).astype("float32")
    action = np.array([1, 2, 3, 4])
    y = unit(x, action=tf.constant(action)).numpy()
    np.testing.assert_allclose(y, np_unit(unit, x, action), atol=1e-4)
    assert y.shape == (4, 6, 6, 8)
    assert not y[0, ..., 2:].any() and y[0, ..., :2].any()


@pytest.mark.parametrize("in_active, out_active", [(1, 2), (2, 6), (4, 8)])
def test_sliced_call_reads_and_computes_only_the_active_channels(
    in_active, out_active
):
    unit = gated_unit()
    x = np.random.default_rng(1).normal(size=(3, 6, 6, 4)).astype("float32")
    x[..., in_active:] = 0  # What a previous gated layer leaves.
    action = np.full(3, out_active // 2)
    y = unit.call_sliced(tf.constant(x), in_active, out_active).numpy()
    assert y.shape == (3, 6, 6, out_active)
    np.testing.assert_allclose(
        y, np_unit(unit, x, action)[..., :out_active], atol=1e-4
    )
    # Channels past in_active are never read.
    x[..., in_active:] = 1e3
    np.testing.assert_allclose(
        unit.call_sliced(tf.constant(x), in_active, out_active), y, atol=1e-4
    )


def test_flops_and_shapes():
    unit = gated_unit()
    assert unit.in_channels == 4 and unit.out_channels == 8
    assert unit.full_flops == 2 * 6 * 6 * 9 * 4 * 8
    assert unit.unit_output_shape == (6, 6, 8)
    assert unit.active_fraction_in(2) == 0.5
    assert gated_unit(in_gated=False).active_fraction_in(2) == 1.0


def test_gated_conv2d_serializes_and_round_trips_with_its_weights():
    unit = gated_unit()
    clone = GatedConv2D.from_config(unit.get_config())
    clone.build((None, 6, 6, 4))
    clone.set_weights(unit.get_weights())
    assert (clone.groups, clone.in_gated) == (4, True)
    x = np.random.default_rng(2).normal(size=(2, 6, 6, 4)).astype("float32")
    action = tf.constant([1, 3])
    np.testing.assert_allclose(clone(x, action=action), unit(x, action=action))
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(unit)
    )
    assert isinstance(restored, GatedConv2D)


def test_gated_conv2d_refuses_filters_not_divisible_by_groups():
    with pytest.raises(ValueError, match="divisible by groups.*filters=6"):
        GatedConv2D(L.Conv2D(6, 3), groups=4)
    with pytest.raises(ValueError, match="expects a keras.layers.Conv2D"):
        GatedConv2D(L.Dense(4))


@pytest.mark.parametrize("reducer", ["flatten", "gap"])
def test_gated_head_sliced_equals_zero_padded_full_head(reducer):
    keras.utils.set_random_seed(0)
    first = L.Flatten() if reducer == "flatten" else L.GlobalAveragePooling2D()
    layers = [first, L.Dropout(0.5), L.Dense(3)]
    model = keras.Sequential([keras.Input((2, 2, 8)), *layers])
    head = GatedHead(model.layers, in_channels=8)
    assert head.gated_dense_index == 2
    y = np.random.default_rng(3).normal(size=(5, 2, 2, 8)).astype("float32")
    padded = y.copy()
    padded[..., 4:] = 0
    np.testing.assert_allclose(
        head.call_sliced(tf.constant(y[..., :4]), 4),
        model(padded),
        rtol=1e-5,
        atol=1e-5,
    )


def test_gated_head_rows_by_group_are_a_contiguous_prefix():
    keras.utils.set_random_seed(0)
    layers = [L.Flatten(), L.Dense(3)]
    model = keras.Sequential([keras.Input((2, 3, 8)), *layers])
    head = GatedHead(model.layers, in_channels=8)
    kernel = model.layers[1].kernel.numpy()  # rows: (h, w, c) flattened
    y = np.random.default_rng(3).normal(size=(5, 2, 3, 8)).astype("float32")
    with head.rows_by_group(groups=4) as copy:
        for active in (2, 4, 6, 8):
            # The first `active` channels' rows, group by group.
            rows = [
                h * 3 * 8 + w * 8 + g * 2 + c
                for g in range(active // 2)
                for h in range(2)
                for w in range(3)
                for c in range(2)
            ]
            np.testing.assert_array_equal(
                copy.numpy()[: len(rows)], kernel[rows]
            )
            padded = y.copy()
            padded[..., active:] = 0
            sliced = head.call_sliced(tf.constant(y[..., :active]), active)
            np.testing.assert_allclose(
                sliced, model(padded), rtol=1e-5, atol=1e-5
            )
    # Outside the block, the strided rows of the layer's own kernel (the
    # copy, changed, would show).
    copy.assign(tf.zeros_like(copy))
    np.testing.assert_allclose(
        head.call_sliced(tf.constant(y[..., :4]), 4),
        model(np.concatenate([y[..., :4], 0 * y[..., 4:]], axis=-1)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_wrap_builds_gated_conv2d_units_around_the_backbones_layers():
    rnp = keras_rnp.wrap(small_cnn(), groups=4)
    units = rnp.plan.units
    assert all(isinstance(unit, GatedConv2D) for unit in units)
    # The backbone's own second and third Conv2D (the first is not gated).
    conv1, conv2 = rnp.backbone.layers[3], rnp.backbone.layers[7]
    assert units[0].conv is conv1 and units[1].conv is conv2
    assert units[0].tail == rnp.backbone.layers[4:7]
    assert [unit.in_gated for unit in units] == [False, True]
