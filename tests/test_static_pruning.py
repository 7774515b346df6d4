"""L1-norm filter pruning: the right filters, the same function, the FLOPs."""

import keras
import numpy as np
import pytest
from helpers import randomize_batch_norm
from helpers import small_cnn

import keras_rnp
from keras_rnp.static_pruning import l1_prune
from keras_rnp.static_pruning import l1_prune_to_flops
from keras_rnp.static_pruning import sort_filters

L = keras.layers


def zeroed_reference(model, kept):
    """The original model with the inputs of every removed channel zeroed
    in the layer that reads it: the same function as the pruned model."""
    reference = keras.models.clone_model(model)
    reference.set_weights(model.get_weights())
    layers = [layer for layer in reference.layers]
    for conv_index, keep in kept.items():
        reader = next(
            layer
            for layer in layers[conv_index + 1 :]
            if isinstance(layer, (L.Conv2D, L.Dense))
        )
        weights = reader.get_weights()
        removed = np.setdiff1d(
            np.arange(model.layers[conv_index].filters), keep
        )
        if isinstance(reader, L.Conv2D):
            weights[0][:, :, removed, :] = 0.0
        elif any(isinstance(x, L.Flatten) for x in layers[conv_index:]):
            c = model.layers[conv_index].filters
            kernel = weights[0].reshape(-1, c, weights[0].shape[-1])
            kernel[:, removed, :] = 0.0
            weights[0] = kernel.reshape(weights[0].shape)
        else:
            weights[0][removed, :] = 0.0
        reader.set_weights(weights)
    return reference


def top_l1(conv, count):
    norms = np.abs(conv.get_weights()[0]).sum(axis=(0, 1, 2))
    return np.sort(np.argsort(-norms)[:count])


def test_keeps_the_largest_l1_filters_and_computes_the_same_function():
    model = small_cnn()
    pruned = l1_prune(model, keep=0.5)
    convs = [layer for layer in pruned.layers if isinstance(layer, L.Conv2D)]
    # The first convolution stays whole, as RNP leaves it ungated.
    assert [c.filters for c in convs] == [8, 8, 6]
    kept = {3: top_l1(model.layers[3], 8), 7: top_l1(model.layers[7], 6)}
    np.testing.assert_array_equal(
        convs[1].get_weights()[0],
        model.layers[3].get_weights()[0][..., kept[3]],
    )
    np.testing.assert_array_equal(
        convs[2].get_weights()[0],
        model.layers[7].get_weights()[0][:, :, kept[3], :][..., kept[7]],
    )
    x = np.random.default_rng(0).normal(size=(4, 10, 10, 3)).astype("float32")
    reference = zeroed_reference(model, kept)
    np.testing.assert_allclose(
        pruned(x).numpy(), reference(x).numpy(), rtol=1e-4, atol=1e-5
    )
    # Hand count: conv 3->8 at 10x10, 8->8 at 10x10, 8->6 at 3x3, dense 6->5.
    expected = (
        2 * 100 * 9 * 3 * 8
        + 2 * 100 * 9 * 8 * 8
        + 2 * 9 * 9 * 8 * 6
        + 2 * 6 * 5
    )
    assert keras_rnp.count_flops(pruned) == expected


def test_keep_one_is_the_original_network():
    model = small_cnn()
    x = np.random.default_rng(1).normal(size=(3, 10, 10, 3)).astype("float32")
    np.testing.assert_allclose(
        l1_prune(model, 1.0)(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6
    )


def test_flatten_head_loses_the_rows_of_removed_channels():
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            L.Conv2D(4, 3, padding="same", activation="relu"),
            L.Conv2D(8, 3, strides=2, padding="same"),
            L.BatchNormalization(),
            L.ReLU(),
            L.Flatten(),
            L.Dense(3),
        ]
    )
    pruned = l1_prune(model, keep=0.25, prune_first=True)
    assert [layer.filters for layer in pruned.layers[:2]] == [1, 2]
    kept = {0: top_l1(model.layers[0], 1), 1: top_l1(model.layers[1], 2)}
    # Removing conv 0's filters also removes conv 1's input channels.
    x = np.random.default_rng(3).normal(size=(5, 6, 6, 2)).astype("float32")
    np.testing.assert_allclose(
        pruned(x).numpy(),
        zeroed_reference(model, kept)(x).numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


def l1_norms(conv):
    return np.abs(conv.get_weights()[0]).sum(axis=(0, 1, 2))


@pytest.mark.parametrize("head", ["pooling", "flatten"])
def test_sorting_filters_keeps_the_function(head):
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(6, 3, padding="same"),
            L.BatchNormalization(),
            L.ReLU(),
            L.Conv2D(8, 3, strides=2, padding="same", use_bias=False),
            L.BatchNormalization(),
            L.ReLU(),
            L.GlobalAveragePooling2D() if head == "pooling" else L.Flatten(),
            L.Dense(3),
        ]
    )
    randomize_batch_norm(model, 4)
    ordered = sort_filters(model)
    for conv in [c for c in ordered.layers if isinstance(c, L.Conv2D)]:
        norms = l1_norms(conv)
        assert np.all(np.diff(norms) <= 0), norms
    # A permutation: the same filters, the same norms.
    for before, after in zip(model.layers, ordered.layers, strict=True):
        if isinstance(before, L.Conv2D):
            np.testing.assert_allclose(
                np.sort(l1_norms(before)), np.sort(l1_norms(after)), rtol=1e-6
            )
    x = np.random.default_rng(5).normal(size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(
        ordered(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("action", [1, 2, 3, 4])
def test_sorted_rnp_paths_are_the_l1_pruned_networks(action):
    """After sorting, forcing action `a` everywhere runs exactly the network
    L1 pruning keeps at `a / groups` of the filters."""
    model = small_cnn()
    rnp = keras_rnp.wrap(sort_filters(model), groups=4)
    x = np.random.default_rng(6).normal(size=(5, 10, 10, 3)).astype("float32")
    logits = rnp.run(x, actions=action)["logits"]
    np.testing.assert_allclose(
        np.asarray(logits),
        l1_prune(model, keep=action / 4)(x).numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("speedup", [2.0, 3.0, 4.0])
def test_prune_to_flops_meets_the_target_with_the_largest_keep(speedup):
    model = small_cnn(widths=(8, 32, 32))
    pruned, keep = l1_prune_to_flops(model, speedup)
    full = keras_rnp.count_flops(model)
    assert keras_rnp.count_flops(pruned) <= full / speedup
    # One more filter per pruned layer would exceed the target.
    widths = [c.filters for c in pruned.layers if isinstance(c, L.Conv2D)]
    bigger = small_cnn(widths=(8, widths[1] + 1, widths[2] + 1))
    assert keras_rnp.count_flops(bigger) > full / speedup
    assert 0.0 < keep < 1.0


def test_bad_arguments_are_refused():
    model = small_cnn()
    with pytest.raises(ValueError, match="0 < keep <= 1"):
        l1_prune(model, 0.0)
    with pytest.raises(ValueError, match="speedup >= 1"):
        l1_prune_to_flops(model, 0.5)
    with pytest.raises(ValueError, match="Cannot reach"):
        l1_prune_to_flops(model, 1000.0)
