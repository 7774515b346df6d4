"""Static channel pruning (L1-norm filter pruning), RNP's baseline.

Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017): each
pruned convolution keeps the filters with the largest L1 norms, for every
input alike. The layers that follow lose the matching input channels.
`sort_filters` uses the same ranking to order filters for RNP.

Chains prune every convolution (the first one only with `prune_first`);
residual networks prune the convolutions RNP gates, the inner widths of
their blocks (see `keras_rnp.residual_planner`), and leave the stream
whole.
"""

import keras
import numpy as np

from keras_rnp import planner
from keras_rnp.flops import count_flops

_L = keras.layers


def l1_prune(model, keep, prune_first=False):
    """A copy of a CNN whose convolutions keep fewer filters.

    Args:
        model: a built chain or residual CNN (what `keras_rnp.wrap`
            accepts); a residual network's inner convolutions are pruned.
        keep: fraction of each pruned convolution's filters to keep, in
            (0, 1]; at least one filter is kept.
        prune_first: also prune the first convolution of a chain (RNP
            leaves it whole unless `gate_first=True`; so does this, by
            default).

    Returns:
        A new model of the same kind, with the surviving weights copied in.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"Expected 0 < keep <= 1. Received: keep={keep}")

    def strongest(first, norms):
        if first and not prune_first:
            return np.arange(len(norms))
        count = max(1, int(round(keep * len(norms))))
        return np.sort(np.argsort(-norms, kind="stable")[:count])

    return _select_filters(model, strongest, f"{model.name}_l1_{keep:.3f}")


def sort_filters(model):
    """A copy of a CNN with each gated convolution's filters in decreasing
    order of L1 norm: the same function, channels permuted.

    RNP's action `a` computes a convolution's first `a` groups of filters.
    After sorting, those are the filters L1-norm pruning would keep, so a
    narrow path starts out as the static pruned network instead of an
    arbitrary slice. Call it before `keras_rnp.wrap`.

    Returns:
        A new model of the same kind, with the permuted weights copied in.
    """

    def by_norm(first, norms):
        return np.argsort(-norms, kind="stable")

    return _select_filters(model, by_norm, f"{model.name}_sorted")


def _select_filters(model, choose, name):
    """Copies a chain CNN keeping, in each Conv2D, the filters
    `choose(is_first_conv, l1_norms)` returns, in that order; the channel-wise
    layers and the next Conv2D or Dense follow the same channels."""
    if planner.is_residual(model):
        return _select_inner_filters(model, choose, name)
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
            out = np.asarray(choose(conv_index == 0, norms))
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


def _select_inner_filters(model, choose, name):
    """`_select_filters` for a residual network: each inner convolution
    keeps the filters `choose(False, l1_norms)` returns; its batch norms
    and depthwise convolution, and the block's next convolution, follow."""
    from keras_rnp import residual_planner  # It imports this module's peers.

    plan = residual_planner.plan_residual(model, groups=1)
    # Per layer name: the input channels and the output channels to keep.
    inputs, outputs = {}, {}
    for block in plan.units:
        for unit, after in zip(block.units[:-1], block.units[1:], strict=True):
            norms = np.abs(unit.conv.get_weights()[0]).sum(axis=(0, 1, 2))
            kept = np.asarray(choose(False, norms))
            outputs[unit.conv.name] = kept
            for layer in unit.tail:
                outputs[layer.name] = kept
            inputs[after.conv.name] = kept

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, _L.Conv2D) and layer.name in outputs:
            config["filters"] = len(outputs[layer.name])
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if layer.name in inputs:  # A convolution reading pruned channels.
            weights[0] = weights[0][:, :, inputs[layer.name], :]
        if layer.name in outputs:
            kept = outputs[layer.name]
            if isinstance(layer, (_L.Conv2D, _L.DepthwiseConv2D)):
                axis = 3 if isinstance(layer, _L.Conv2D) else 2
                weights[0] = np.take(weights[0], kept, axis=axis)
                weights[1:] = [w[kept] for w in weights[1:]]
            else:  # Batch norm.
                weights = [w[kept] for w in weights]
        copy.get_layer(layer.name).set_weights(weights)
    return keras.Model(copy.inputs[0], copy.outputs[0], name=name)


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
