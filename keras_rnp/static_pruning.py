"""Static channel pruning (L1-norm filter pruning), RNP's baseline.

Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017): each
pruned convolution keeps the filters with the largest L1 norms, for every
input alike. The layers that follow lose the matching input channels.
`sort_filters` uses the same ranking to order filters for RNP.
"""

import keras
import numpy as np

from keras_rnp import planner
from keras_rnp.flops import count_flops

_L = keras.layers


def l1_prune(model, keep, prune_first=False):
    """A copy of a chain CNN whose convolutions keep fewer filters.

    Args:
        model: a built chain CNN (what `keras_rnp.wrap` accepts).
        keep: fraction of each pruned convolution's filters to keep, in
            (0, 1]; at least one filter is kept.
        prune_first: also prune the first convolution (RNP leaves it whole
            unless `gate_first=True`; so does this, by default).

    Returns:
        A new `keras.Sequential` with the surviving weights copied in.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"Expected 0 < keep <= 1. Received: keep={keep}")

    def strongest(index, norms):
        if index == 0 and not prune_first:
            return np.arange(len(norms))
        count = max(1, int(round(keep * len(norms))))
        return np.sort(np.argsort(-norms, kind="stable")[:count])

    return _select_filters(model, strongest, f"{model.name}_l1_{keep:.3f}")


def sort_filters(model):
    """A copy of a chain CNN with each convolution's filters in decreasing
    order of L1 norm: the same function, channels permuted.

    RNP's action `a` computes a convolution's first `a` groups of filters.
    After sorting, those are the filters L1-norm pruning would keep, so a
    narrow path starts out as the static pruned network instead of an
    arbitrary slice. Call it before `keras_rnp.wrap`.

    Returns:
        A new `keras.Sequential` with the permuted weights copied in.
    """

    def by_norm(index, norms):
        return np.argsort(-norms, kind="stable")

    return _select_filters(model, by_norm, f"{model.name}_sorted")


def _select_filters(model, choose, name):
    """Copies a chain CNN keeping, in each Conv2D, the filters
    `choose(conv_index, l1_norms)` returns, in that order; the channel-wise
    layers and the next Conv2D or Dense follow the same channels."""
    layers = planner.chain_layers(model)
    if not any(isinstance(layer, _L.Conv2D) for layer in layers):
        raise ValueError(
            f"Expected a model with Conv2D layers. Received: {model.name}."
        )
    conv_index = 0
    new_layers, new_weights = [], []
    kept = None  # Indices of the surviving channels; None keeps them all.
    flatten_shape = None
    for layer in layers:
        config = layer.get_config()
        weights = layer.get_weights()
        if isinstance(layer, _L.Conv2D):
            kernel = weights[0]
            # Norms of the whole filters, before earlier layers remove any
            # of their input channels (as Li et al. rank them).
            norms = np.abs(kernel).sum(axis=(0, 1, 2))
            if kept is not None:
                kernel = kernel[:, :, kept, :]
            out = np.asarray(choose(conv_index, norms))
            conv_index += 1
            weights = [kernel[..., out]] + [w[out] for w in weights[1:]]
            config["filters"] = len(out)
            identity = np.array_equal(out, np.arange(layer.filters))
            kept = None if identity else out
        elif isinstance(layer, _L.Flatten):
            flatten_shape = layer.input.shape[1:]
        elif isinstance(layer, _L.Dense) and kept is not None:
            kernel = weights[0]
            if flatten_shape is not None:
                kernel = kernel.reshape(
                    (-1, flatten_shape[-1], kernel.shape[-1])
                )
                kernel = kernel[:, kept, :].reshape((-1, kernel.shape[-1]))
            else:
                kernel = kernel[kept]
            weights = [kernel] + weights[1:]
            kept = None
        elif kept is not None and weights:
            # A channel-wise layer with per-channel weights (batch norm).
            weights = [w[kept] for w in weights]
        new_layers.append(layer.__class__.from_config(config))
        new_weights.append(weights)
    copy = keras.Sequential(
        [keras.Input(model.input_shape[1:])] + new_layers, name=name
    )
    for layer, weights in zip(new_layers, new_weights, strict=True):
        layer.set_weights(weights)
    return copy


def l1_prune_to_flops(model, speedup, prune_first=False):
    """`l1_prune` with the largest `keep` whose model has at most
    `count_flops(model) / speedup` FLOPs per image.

    Returns:
        `(pruned_model, keep)`.
    """
    if not speedup >= 1.0:
        raise ValueError(f"Expected speedup >= 1. Received: {speedup}")
    target = count_flops(model) / speedup

    def flops_at(keep):
        return count_flops(l1_prune(model, keep, prune_first))

    low, high = 0.0, 1.0
    if flops_at(1e-6) > target:
        raise ValueError(
            f"Cannot reach {speedup}x fewer FLOPs by pruning filters: even "
            "one filter per pruned convolution costs more."
        )
    for _ in range(30):
        middle = (low + high) / 2
        if flops_at(middle) <= target:
            low = middle
        else:
            high = middle
    keep = max(low, 1e-6)
    return l1_prune(model, keep, prune_first), keep
