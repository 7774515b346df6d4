"""Static channel pruning (L1-norm filter pruning), the baseline RNP beats.

Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017): each
pruned convolution keeps the filters with the largest L1 norms, for every
input alike. The layers that follow lose the matching input channels.
"""

import keras
import numpy as np

from keras_rnp import chain
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
    layers = chain.chain_layers(model)
    convs = [layer for layer in layers if isinstance(layer, _L.Conv2D)]
    if not convs:
        raise ValueError(
            f"Expected a model with Conv2D layers. Received: {model.name}."
        )
    pruned = set(id(c) for c in (convs if prune_first else convs[1:]))
    new_layers, new_weights = [], []
    kept = None  # Indices of the surviving channels; None keeps them all.
    flatten_shape = None
    for layer in layers:
        config = layer.get_config()
        weights = layer.get_weights()
        if isinstance(layer, _L.Conv2D):
            kernel = weights[0]
            if kept is not None:
                kernel = kernel[:, :, kept, :]
            out = np.arange(kernel.shape[-1])
            if id(layer) in pruned:
                count = max(1, int(round(keep * len(out))))
                norms = np.abs(layer.get_weights()[0]).sum(axis=(0, 1, 2))
                out = np.sort(np.argsort(-norms, kind="stable")[:count])
            weights = [kernel[..., out]] + [w[out] for w in weights[1:]]
            config["filters"] = len(out)
            kept = out if len(out) < layer.filters else None
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
    pruned_model = keras.Sequential(
        [keras.Input(model.input_shape[1:])] + new_layers,
        name=f"{model.name}_l1_{keep:.3f}",
    )
    for layer, weights in zip(new_layers, new_weights, strict=True):
        layer.set_weights(weights)
    return pruned_model


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
