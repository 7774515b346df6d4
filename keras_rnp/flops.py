"""FLOPs accounting: layers, plain models, the decision network and paths.

Convention (used everywhere in keras_rnp): one multiply-add is 2 FLOPs, and
only convolutions and dense layers are counted. Bias additions, batch
normalization, activations, pooling and other element-wise work are left
out, as is usual in the pruning literature.

This module imports nothing else from keras_rnp: the planner, the model,
the report and the benchmarks all count through it.
"""

import math

import keras


def conv_flops(output_hw, kernel_hw, in_channels, out_channels, groups=1):
    """FLOPs of one image through a 2D convolution.

    Args:
        output_hw: `(height, width)` of the output feature map.
        kernel_hw: `(height, width)` of the kernel.
        in_channels: input channels that take part in the computation.
        out_channels: output channels that are computed.
        groups: the convolution's feature groups.

    Returns:
        `2 * H_out * W_out * K_h * K_w * (in_channels / groups) *
        out_channels`, a float.
    """
    macs = (
        math.prod(output_hw)
        * math.prod(kernel_hw)
        * (in_channels / groups)
        * out_channels
    )
    return 2.0 * macs


def dense_flops(in_features, units, positions=1):
    """FLOPs of one image through a dense layer: `2 * in * units * positions`.

    `positions` is the number of positions the layer is applied at (1 for a
    flat input, `H * W` for a dense layer on a feature map).
    """
    return 2.0 * in_features * units * positions


_L = keras.layers
_CONVS = (_L.Conv1D, _L.Conv2D, _L.Conv3D)
_TRANSPOSED_CONVS = (
    _L.Conv1DTranspose,
    _L.Conv2DTranspose,
    _L.Conv3DTranspose,
)
_DEPTHWISE_CONVS = (_L.DepthwiseConv1D, _L.DepthwiseConv2D)
_SEPARABLE_CONVS = (_L.SeparableConv1D, _L.SeparableConv2D)
# Layers with weights but no multiply-adds by this module's convention
# (normalization, scaling, lookups), counted 0 like every weight-free
# layer (pooling, padding, Add, Concatenate, activations, reshapes).
_FREE_WITH_WEIGHTS = (
    _L.BatchNormalization,
    _L.LayerNormalization,
    _L.GroupNormalization,
    _L.Normalization,
    _L.Embedding,
    _L.PReLU,
)
# Weight-free layers that multiply feature maps together.
_UNCOUNTED = (_L.Attention, _L.AdditiveAttention, _L.MultiHeadAttention)


def layer_flops(layer, input_shape, output_shape):
    """FLOPs per image of one layer, given its input and output shapes.

    Convolutions (Conv1D/2D/3D, their transposes, depthwise and separable
    ones) and Dense are counted; normalization, pooling, padding, merges
    (Add, Concatenate, ...), activations and reshapes count 0.

    Raises:
        ValueError: for a layer whose cost is not defined by this
            convention (recurrent layers, attention, other layers with
            weights), a convolution that is not channels-last, or an
            unknown spatial size where the cost depends on it.
    """
    if isinstance(layer, keras.Model):
        raise ValueError(
            "layer_flops() expects a layer; count a nested model with "
            f"count_flops(). Received: layer={layer.name} "
            f"({type(layer).__name__})."
        )
    if isinstance(layer, _L.Dense):
        _check_known(layer, output_shape[1:])
        return dense_flops(
            input_shape[-1], layer.units, math.prod(output_shape[1:-1])
        )
    if isinstance(layer, _DEPTHWISE_CONVS + _SEPARABLE_CONVS):
        _check_channels_last(layer)
        _check_known(layer, output_shape[1:])
        in_ch = input_shape[-1]
        out_hw = output_shape[1:-1]
        depth = conv_flops(
            out_hw,
            layer.kernel_size,
            in_ch,
            in_ch * layer.depth_multiplier,
            groups=in_ch,
        )
        if isinstance(layer, _SEPARABLE_CONVS):
            return depth + conv_flops(
                out_hw,
                (1,) * len(out_hw),
                in_ch * layer.depth_multiplier,
                layer.filters,
            )
        return depth
    if isinstance(layer, _TRANSPOSED_CONVS):
        _check_channels_last(layer)
        _check_known(layer, input_shape[1:])
        # Every input position multiplies the whole kernel into the output.
        return conv_flops(
            input_shape[1:-1],
            layer.kernel_size,
            input_shape[-1],
            layer.filters,
        )
    if isinstance(layer, _CONVS):
        _check_channels_last(layer)
        _check_known(layer, output_shape[1:])
        return conv_flops(
            output_shape[1:-1],
            layer.kernel_size,
            input_shape[-1],
            layer.filters,
            groups=layer.groups,
        )
    if isinstance(layer, _UNCOUNTED) or (
        layer.weights and not isinstance(layer, _FREE_WITH_WEIGHTS)
    ):
        raise ValueError(
            "count_flops() counts convolutions and dense layers (2 FLOPs "
            "per multiply-add; normalization, pooling, merges and "
            "activations count 0) and has no defined cost for layer "
            f"'{layer.name}' ({type(layer).__name__}). Count that layer "
            "yourself, or leave it out of the model you count."
        )
    return 0.0


def count_flops(model):
    """FLOPs per image of a plain (unwrapped) Keras model.

    Counts 2 FLOPs per multiply-add of every convolution (plain,
    transposed, depthwise, separable) and dense layer; normalization,
    pooling, padding, merges and activations count nothing (see the module
    docstring). Nested models are counted layer by layer. For a
    `keras_rnp.RNPModel`, this is `model.full_flops`; use
    `model.run(x)["flops"]` for what a path costs.

    Args:
        model: a built `keras.Sequential` or functional model (branches,
            merges and nested models are fine).

    Returns:
        The FLOPs for one image, as a Python float.

    Raises:
        ValueError: if the model is not built, holds a layer whose cost is
            not defined (named in the message), or its image size is
            unknown where the cost depends on it.

    A layer shared by several calls in one model is counted once, on its
    first call.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(4, 3, padding="same"),
    ...     keras.layers.Flatten(),
    ...     keras.layers.Dense(10),
    ... ])
    >>> keras_rnp.count_flops(model)  # 2*8*8*9*1*4 + 2*256*10
    9728.0
    """
    if _is_rnp_model(model):
        return model.full_flops
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(
            "count_flops() expects a built keras.Model. Received: "
            f"model={model!r}."
        )
    total = 0.0
    for layer in model.layers:
        if isinstance(layer, _L.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            total += count_flops(layer)
            continue
        try:
            shapes = [
                keras.tree.map_structure(lambda t: tuple(t.shape), tensors)
                for tensors in (layer.input, layer.output)
            ]
        except (AttributeError, ValueError) as error:
            raise ValueError(
                "count_flops() expects a Sequential or functional model "
                "whose layers run on a known input. Received: layer "
                f"'{layer.name}' ({type(layer).__name__}) of "
                f"model={model.name} ({type(model).__name__}): {error}"
            ) from error
        total += layer_flops(layer, *shapes)
    return float(total)


def _check_known(layer, shape):
    if any(dim is None for dim in shape):
        raise ValueError(
            "count_flops() needs a fixed image size (build the model with "
            "keras.Input((height, width, channels))). Received: layer "
            f"'{layer.name}' ({type(layer).__name__}) with shape "
            f"{(None, *shape)}."
        )


def decision_flops(in_channels, code_dim, hidden_units, groups):
    """FLOPs per image of the decision network over all gated layers.

    Per gated layer: the encoder (dense `C_in -> code_dim`), one LSTM step
    (`(code_dim + hidden) -> 4 * hidden`) and the decoder
    (`hidden -> groups`). Global average pooling is not counted (it adds,
    it does not multiply).

    Args:
        in_channels: channels entering each gated layer, one per layer.
        code_dim: width of each encoder's output.
        hidden_units: width of the LSTM cell.
        groups: actions per layer (the decoder's outputs).
    """
    lstm = dense_flops(code_dim + hidden_units, 4 * hidden_units)
    decoder = dense_flops(hidden_units, groups)
    return float(
        sum(dense_flops(c, code_dim) + lstm + decoder for c in in_channels)
    )


def gated_layer_flops(actions, gated_flops, in_gated, groups):
    """FLOPs per image of each gated convolution on a path.

    Layer `t` costs `full_t * (a_{t-1} / k) * (a_t / k)`, the first factor
    only where its input comes from a gated layer (`in_gated[t]`): both its
    input and its output shrink,
    `2 * H * W * K * K * (a_{t-1}/k * C_{t-1}) * (a_t/k * C_t)`.

    Args:
        actions: `[B, L]` actions in `1..groups`, as floats (a NumPy array
            or a tensor: only indexing and arithmetic are used).
        gated_flops: the full FLOPs of each of the `L` gated convolutions.
        in_gated: for each, whether its input comes from a gated layer.
        groups: channel groups `k`.

    Returns:
        A list of `L` per-image FLOPs, one `[B]` array per layer.
    """
    costs, previous = [], None
    for t, (full, gated_input) in enumerate(
        zip(gated_flops, in_gated, strict=True)
    ):
        fraction_in = previous / groups if gated_input else 1.0
        costs.append(full * fraction_in * (actions[:, t] / groups))
        previous = actions[:, t]
    return costs


def path_flops(
    actions,
    gated_flops,
    in_gated,
    groups,
    fixed_flops=0.0,
    head_gated_flops=0.0,
):
    """FLOPs per image of a path through a gated network.

    The gated convolutions as `gated_layer_flops` counts them, plus
    `fixed_flops` (layers that always run at full width, and the decision
    network where it runs), plus the first dense layer of the head on the
    channels the last gated layer kept, `head_gated_flops * a_L / k`.

    Args:
        actions: `[B, L]` float actions (NumPy array or tensor).
        gated_flops, in_gated, groups: as in `gated_layer_flops`.
        fixed_flops: FLOPs per image that do not depend on the actions.
        head_gated_flops: full FLOPs of the dense layer that reads the last
            gated layer's channels (0 if none does).

    Returns:
        `[B]` FLOPs per image.

    Example:

    >>> actions = np.array([[1.0, 2.0], [2.0, 2.0]])
    >>> path_flops(actions, [100.0, 200.0], [False, True], groups=2)
    array([150., 300.])
    """
    total = fixed_flops
    for cost in gated_layer_flops(actions, gated_flops, in_gated, groups):
        total = total + cost
    last = actions[:, len(gated_flops) - 1]
    return total + head_gated_flops * last / groups


def _is_rnp_model(model):
    # An RNPModel without importing it: this module stays at the bottom of
    # the package's imports.
    return isinstance(model, keras.Model) and hasattr(type(model), "full_flops")


def _check_channels_last(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(
            "keras_rnp supports channels_last data only. Received: "
            f"layer={layer.name} ({type(layer).__name__}) with "
            f"data_format={layer.data_format}."
        )
