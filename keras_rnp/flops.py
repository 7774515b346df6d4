"""FLOPs counting shared by plain Keras models and RNP models.

Convention (used everywhere in keras_rnp): one multiply-add is 2 FLOPs, and
only convolutions and dense layers are counted. Bias additions, batch
normalization, activations, pooling and other element-wise work are left
out, as is usual in the pruning literature.
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


def layer_flops(layer, input_shape, output_shape):
    """FLOPs per image of one layer, given its input and output shapes.

    Conv1D/2D/3D, DepthwiseConv2D, SeparableConv2D and Dense are counted;
    every other layer counts 0.

    Raises:
        ValueError: for a nested model or a convolution that is not
            channels-last, which this function cannot count.
    """
    if isinstance(layer, keras.Model):
        raise ValueError(
            "count_flops() expects a flat model; nested models are not "
            f"supported. Received: layer={layer.name} "
            f"({type(layer).__name__})."
        )
    if isinstance(layer, keras.layers.Dense):
        return dense_flops(
            input_shape[-1], layer.units, math.prod(output_shape[1:-1])
        )
    if isinstance(
        layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    ):
        _check_channels_last(layer)
        in_ch = input_shape[-1]
        out_hw = output_shape[1:-1]
        depth = conv_flops(
            out_hw,
            layer.kernel_size,
            in_ch,
            in_ch * layer.depth_multiplier,
            groups=in_ch,
        )
        if isinstance(layer, keras.layers.SeparableConv2D):
            return depth + conv_flops(
                out_hw, (1, 1), in_ch * layer.depth_multiplier, layer.filters
            )
        return depth
    if isinstance(
        layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    ):
        _check_channels_last(layer)
        return conv_flops(
            output_shape[1:-1],
            layer.kernel_size,
            input_shape[-1],
            layer.filters,
            groups=layer.groups,
        )
    return 0.0


def count_flops(model):
    """FLOPs per image of a plain (unwrapped) Keras model.

    Counts 2 FLOPs per multiply-add of every convolution and dense layer;
    other layers count nothing (see the module docstring). For a
    `keras_rnp.RNPModel`, use `model.full_flops` or `model.run(x)["flops"]`.

    Args:
        model: a built `keras.Sequential` or functional model.

    Returns:
        The FLOPs for one image, as a Python float.

    Raises:
        ValueError: if the model is not built or holds a layer that cannot
            be counted.

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
    from keras_rnp.rnp_model import RNPModel

    if isinstance(model, RNPModel):
        return model.full_flops
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(
            "count_flops() expects a built keras.Model. Received: "
            f"model={model!r}."
        )
    try:
        layers_io = [
            (layer, layer.input.shape, layer.output.shape)
            for layer in model.layers
            if not isinstance(layer, keras.layers.InputLayer)
        ]
    except (AttributeError, ValueError) as error:
        raise ValueError(
            "count_flops() expects a Sequential or functional model with a "
            f"known input shape. Received: model={model.name} "
            f"({type(model).__name__})."
        ) from error
    return float(sum(layer_flops(*io) for io in layers_io))


def _check_channels_last(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(
            "keras_rnp supports channels_last data only. Received: "
            f"layer={layer.name} ({type(layer).__name__}) with "
            f"data_format={layer.data_format}."
        )
