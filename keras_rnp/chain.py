"""How a chain CNN is cut into gated units, and how a gated unit executes.

`plan_chain()` is the registry of supported layers: it reads a plain Keras
model, refuses what it cannot handle, and cuts the layer chain into

- `pre`: the layers before the first gated convolution (input scaling and,
  by default, the first convolution with its batch norm and activation),
- `units`: one `GatedUnit` per gated Conv2D, holding that convolution and
  the channel-wise layers that follow it (batch norm, activation, pooling,
  dropout) up to the next gated convolution or the head,
- `head`: global pooling or flatten, then dense layers.

`GatedUnit` is the one place that knows how a unit executes for a number of
active input and output channel groups, and what that costs. Training,
inference and the FLOPs count all go through it.
"""

import dataclasses

import keras
import tensorflow as tf

from keras_rnp import flops as flops_lib

_L = keras.layers

# Layers that act on each channel separately, so a skipped (zero) channel
# never influences an active one. They may follow a convolution in a unit.
CHANNELWISE_LAYERS = (
    _L.BatchNormalization,
    _L.Activation,
    _L.ReLU,
    _L.LeakyReLU,
    _L.ELU,
    _L.MaxPooling2D,
    _L.AveragePooling2D,
    _L.Dropout,  # SpatialDropout2D is a subclass.
)
# Layers allowed before the first convolution only.
INPUT_LAYERS = (_L.Rescaling, _L.Normalization)
# Layers that turn a feature map into a vector; they start the head.
REDUCER_LAYERS = (_L.GlobalAveragePooling2D, _L.GlobalMaxPooling2D, _L.Flatten)
# Layers allowed in the head, after the reducer.
HEAD_LAYERS = (
    _L.Dense,
    _L.Dropout,
    _L.BatchNormalization,
    _L.Activation,
    _L.ReLU,
    _L.LeakyReLU,
    _L.ELU,
    _L.Softmax,
)

_KNOWN_LAYERS = (
    (_L.Conv2D,)
    + CHANNELWISE_LAYERS
    + INPUT_LAYERS
    + REDUCER_LAYERS
    + HEAD_LAYERS
)
SUPPORTED = (
    "Conv2D (channels_last, groups=1), BatchNormalization, Activation, ReLU, "
    "LeakyReLU, ELU, MaxPooling2D, AveragePooling2D, Dropout, "
    "SpatialDropout2D, Rescaling and Normalization at the input, then "
    "GlobalAveragePooling2D, GlobalMaxPooling2D or Flatten, then Dense "
    "layers"
)
# Activations that mix channels: not allowed on a feature map.
_CHANNEL_MIXING_ACTIVATIONS = ("softmax", "log_softmax")


def _refuse(layer, why):
    raise ValueError(
        f"keras_rnp.wrap() cannot handle layer '{layer.name}' "
        f"({type(layer).__name__}): {why}. Supported: {SUPPORTED}."
    )


def _activation_name(layer):
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", str(activation))


def _is_channelwise(layer):
    if not isinstance(layer, CHANNELWISE_LAYERS):
        return False
    if isinstance(layer, _L.BatchNormalization) and layer.axis not in (-1, 3):
        return False
    if isinstance(layer, _L.Activation):
        return _activation_name(layer) not in _CHANNEL_MIXING_ACTIVATIONS
    data_format = getattr(layer, "data_format", "channels_last")
    return data_format == "channels_last"


def chain_layers(model):
    """The model's layers as a list, checking that they form a single chain.

    Raises:
        ValueError: if the model is not a built Sequential or functional
            model, or if its layers branch or merge.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "keras_rnp.wrap() expects a keras.Model. Received: "
            f"model={model!r} of type {type(model).__name__}."
        )
    is_graph = isinstance(model, keras.Sequential) or isinstance(
        model, keras.src.models.Functional
    )
    if not is_graph:
        raise ValueError(
            "keras_rnp.wrap() expects a keras.Sequential or functional model; "
            "subclassed models cannot be read layer by layer. Received: "
            f"model={model.name} ({type(model).__name__})."
        )
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            "keras_rnp.wrap() expects a built model with a known input shape "
            "(start it with keras.Input(shape) or call model.build()). "
            f"Received: model={model.name}, which is not built."
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            "keras_rnp.wrap() expects a model with one input and one output. "
            f"Received: model={model.name} with {len(model.inputs)} inputs "
            f"and {len(model.outputs)} outputs."
        )
    layers = [
        layer for layer in model.layers if not isinstance(layer, _L.InputLayer)
    ]
    for layer in layers:
        if isinstance(layer, keras.Model):
            _refuse(layer, "nested models are not supported; flatten it")
    if isinstance(model, keras.Sequential):
        return layers  # A Sequential model is a chain by construction.
    previous = model.inputs[0]
    for layer in layers:
        layer_input = layer.input
        if (
            isinstance(layer_input, (list, tuple))
            or layer_input is not previous
        ):
            _refuse(
                layer,
                "the model branches or merges here; only a chain "
                "of layers, each feeding the next, is supported",
            )
        previous = layer.output
    if model.outputs[0] is not previous:
        raise ValueError(
            "keras_rnp.wrap() expects the model's output to be its last "
            f"layer's output. Received: model={model.name}."
        )
    return layers


@dataclasses.dataclass
class GatedUnit:
    """A gated convolution and the channel-wise layers after it.

    Attributes:
        conv: the Conv2D layer.
        tail: the channel-wise layers after it, up to the next gated unit.
        groups: number of channel groups `k`.
        in_channels: channels entering the convolution.
        out_channels: channels it computes (`conv.filters`).
        in_gated: whether the input comes from a gated unit (so only the
            first `a_{t-1}` of `k` input groups are active).
        full_flops: FLOPs of the convolution with every group active.
        output_shape: shape of one image at the unit's output `(H, W, C)`.
    """

    conv: keras.layers.Conv2D
    tail: list
    groups: int
    in_channels: int
    out_channels: int
    in_gated: bool
    full_flops: float
    output_shape: tuple

    def active_fraction_in(self, previous_action):
        """Fraction of input channels active, given the previous action."""
        if not self.in_gated:
            return 1.0
        return previous_action / self.groups

    def flops(self, previous_action, action):
        """FLOPs of the unit for the given actions (ints or float tensors).

        `2 * H * W * K * K * (a_{t-1}/k * C_{t-1}) * (a_t/k * C_t)`.
        """
        return (
            self.full_flops
            * self.active_fraction_in(previous_action)
            * (action / self.groups)
        )

    def channel_mask(self, action):
        """A `[B, 1, 1, C]` float mask keeping the first `action` groups."""
        group_size = self.out_channels // self.groups
        mask = tf.sequence_mask(
            tf.cast(action, tf.int32) * group_size,
            self.out_channels,
            dtype=tf.float32,
        )
        return mask[:, None, None, :]

    def call_masked(self, x, action, training=False):
        """Runs the full unit, then zeroes the skipped channel groups.

        Args:
            x: `[B, H, W, C_in]` input; its skipped channels are already 0.
            action: `[B]` int tensor, the number of groups to keep per image.
            training: passed to batch norm and dropout.

        Returns:
            `[B, H', W', C_out]`, with channels past `action * C_out / k`
            exactly 0 in every image.
        """
        y = self.conv(x)
        for layer in self.tail:
            y = layer(y, training=training)
        return y * tf.cast(self.channel_mask(action), y.dtype)

    def call_sliced(self, x, in_active, out_active):
        """Inference on the active channels only: a smaller convolution.

        Computes `kernel[:, :, :in_active, :out_active]` on the first
        `in_active` input channels, with batch norm folded into it where it
        directly follows a linear convolution, then the tail on the
        `out_active` computed channels. Dropout is skipped (inference).

        Args:
            x: `[B, H, W, C]` with `C >= in_active`; channels past
                `in_active` are ignored.
            in_active: input channels to read (a Python int).
            out_active: output channels to compute (a Python int).

        Returns:
            `[B, H', W', out_active]`, equal (up to rounding) to the first
            `out_active` channels of `call_masked` in inference mode.

        Do not call it on an empty batch: with oneDNN (TensorFlow 2.21, CPU)
        a convolution on an empty batch returns a tensor of the wrong shape,
        which no later reshape in the graph repairs.
        """
        conv = self.conv
        if x.shape[-1] != in_active:
            x = x[..., :in_active]
        kernel, bias = conv.kernel, conv.bias if conv.use_bias else None
        # Slice only what is cut: a slice of a variable is a copy.
        if (in_active, out_active) != tuple(kernel.shape[2:]):
            kernel = kernel[:, :, :in_active, :out_active]
            bias = None if bias is None else bias[:out_active]
        tail = list(self.tail)
        linear = _activation_name(conv) == "linear"
        if linear and tail and isinstance(tail[0], _L.BatchNormalization):
            scale, offset = _batch_norm_affine(tail.pop(0), out_active)
            kernel = kernel * scale
            bias = offset if bias is None else bias * scale + offset
        y = tf.nn.conv2d(
            x,
            kernel,
            strides=conv.strides,
            padding=conv.padding.upper(),
            dilations=conv.dilation_rate,
        )
        if bias is not None:
            y = tf.nn.bias_add(y, bias)
        y = conv.activation(y)
        for layer in tail:
            if isinstance(layer, _L.BatchNormalization):
                scale, offset = _batch_norm_affine(layer, out_active)
                y = y * scale + offset
            elif not isinstance(layer, _L.Dropout):
                y = layer(y, training=False)
        return y


def _batch_norm_affine(layer, channels):
    """Inference batch norm on the first `channels` as `y * scale + offset`."""
    scale = tf.math.rsqrt(layer.moving_variance[:channels] + layer.epsilon)
    if layer.scale:
        scale = scale * layer.gamma[:channels]
    offset = -layer.moving_mean[:channels] * scale
    if layer.center:
        offset = offset + layer.beta[:channels]
    return scale, offset


@dataclasses.dataclass
class ChainPlan:
    """A chain CNN cut into `pre`, gated `units` and `head`."""

    input_shape: tuple
    pre: list
    units: list
    head: list
    pre_flops: float
    head_flops: float
    # FLOPs of the first dense layer of the head, which sees only the
    # channels the last gated unit kept; 0 when no dense layer reads them.
    head_gated_flops: float

    @property
    def full_flops(self):
        return (
            self.pre_flops
            + sum(unit.full_flops for unit in self.units)
            + self.head_flops
            + self.head_gated_flops
        )

    def call_head(self, x, training=False):
        for layer in self.head:
            x = layer(x, training=training)
        return x

    def call_head_sliced(self, y, active):
        """The head on the last unit's `active` computed channels.

        The first dense layer reads only the rows of its kernel that belong
        to those channels. Where no dense layer reads the gated channels
        directly, the channels are padded back with zeros instead.
        """
        if not self.head_gated_flops:
            full = self.units[-1].out_channels
            y = tf.pad(y, [[0, 0], [0, 0], [0, 0], [0, full - active]])
            return self.call_head(y)
        reducer, rest = self.head[0], self.head[1:]
        index = next(
            i for i, layer in enumerate(rest) if isinstance(layer, _L.Dense)
        )
        dense, rest = rest[index], rest[index + 1 :]
        kernel = dense.kernel
        full = self.units[-1].out_channels
        if isinstance(reducer, _L.Flatten):
            height, width = y.shape[1:3]
            y = tf.reshape(y, [-1, height * width * active])
            if active < full:  # A slice of a variable is a copy.
                kernel = tf.reshape(kernel, [height, width, full, -1])
                kernel = tf.reshape(kernel[:, :, :active], [-1, dense.units])
        else:
            y = reducer(y)
            if active < full:
                kernel = kernel[:active]
        y = tf.matmul(y, kernel)
        if dense.use_bias:
            y = tf.nn.bias_add(y, dense.bias)
        y = dense.activation(y)
        for layer in rest:
            y = layer(y, training=False)
        return y


def plan_chain(model, groups, gate_first=False):
    """Reads a chain CNN and cuts it into gated units.

    Args:
        model: a built Sequential or functional chain of supported layers.
        groups: channel groups per gated convolution.
        gate_first: also gate the first convolution.

    Returns:
        A `ChainPlan` whose layers are the model's own layer objects.

    Raises:
        ValueError: naming the first layer that cannot be handled.
    """
    layers = chain_layers(model)
    convs = [layer for layer in layers if isinstance(layer, _L.Conv2D)]
    gated = convs if gate_first else convs[1:]
    for layer in layers:
        if not isinstance(layer, _KNOWN_LAYERS):
            _refuse(layer, _why_not(layer, section=None))
        if isinstance(layer, _L.Conv2D):
            _check_conv(layer, groups, gated_conv=layer in gated)
    input_shape = tuple(model.inputs[0].shape)
    if len(input_shape) != 4:
        raise ValueError(
            "keras_rnp.wrap() expects a model on images, with a 4D input "
            f"(batch, height, width, channels). Received: input shape "
            f"{input_shape} for model={model.name}."
        )
    if any(dim is None for dim in input_shape[1:]):
        raise ValueError(
            "keras_rnp.wrap() expects a fixed image size. Received: input "
            f"shape {input_shape} for model={model.name}."
        )
    if not gated:
        raise ValueError(
            "keras_rnp.wrap() needs at least one Conv2D to gate (every Conv2D "
            "but the first is gated unless gate_first=True). Received: "
            f"model={model.name} with {len(convs)} Conv2D layer(s), "
            f"gate_first={gate_first}."
        )

    pre, units, head = [], [], []
    pre_flops = head_flops = head_gated_flops = 0.0
    section = "input"  # -> "pre" -> "unit" -> "head"
    previous_gated = False
    for layer in layers:
        in_shape, out_shape = layer.input.shape, layer.output.shape
        cost = flops_lib.layer_flops(layer, in_shape, out_shape)
        if isinstance(layer, _L.Conv2D):
            if section == "head":
                _refuse(
                    layer,
                    "a convolution after the head's flatten or "
                    "global pooling is not supported",
                )
            if layer in gated:
                units.append(
                    GatedUnit(
                        conv=layer,
                        tail=[],
                        groups=groups,
                        in_channels=in_shape[-1],
                        out_channels=layer.filters,
                        in_gated=previous_gated,
                        full_flops=cost,
                        output_shape=tuple(out_shape[1:]),
                    )
                )
                section, previous_gated = "unit", True
            else:
                pre.append(layer)
                pre_flops += cost
                section = "pre"
        elif section in ("input", "pre") and isinstance(layer, INPUT_LAYERS):
            if section != "input":
                _refuse(
                    layer,
                    "input scaling is supported only before the "
                    "first convolution",
                )
            pre.append(layer)
        elif section in ("input", "pre", "unit") and _is_channelwise(layer):
            if section == "unit":
                units[-1].tail.append(layer)
                units[-1].output_shape = tuple(out_shape[1:])
            else:
                pre.append(layer)
        elif section == "unit" and isinstance(layer, REDUCER_LAYERS):
            head.append(layer)
            section = "head"
        elif section == "head" and isinstance(layer, HEAD_LAYERS):
            if isinstance(layer, _L.Dense) and _reads_gated_channels(head):
                head_gated_flops, cost = cost, 0.0
            head.append(layer)
            head_flops += cost
        else:
            _refuse(layer, _why_not(layer, section))
    if section != "head":
        raise ValueError(
            "keras_rnp.wrap() expects a classifier head after the last "
            "convolution: GlobalAveragePooling2D, GlobalMaxPooling2D or "
            f"Flatten, then Dense. Received: model={model.name}, whose last "
            f"layer is '{layers[-1].name}' ({type(layers[-1]).__name__})."
        )
    return ChainPlan(
        input_shape=input_shape[1:],
        pre=pre,
        units=units,
        head=head,
        pre_flops=pre_flops,
        head_flops=head_flops,
        head_gated_flops=head_gated_flops,
    )


def _reads_gated_channels(head):
    """True if the dense layer about to join `head` reads the gated channels.

    That is the case when nothing but the reducer and dropout stands
    between it and the last gated unit (zero channels stay zero).
    """
    return all(
        isinstance(layer, REDUCER_LAYERS + (_L.Dropout,)) for layer in head
    )


def _check_conv(layer, groups, gated_conv):
    if layer.data_format != "channels_last":
        _refuse(
            layer,
            f"data_format={layer.data_format}; only channels_last is supported",
        )
    if layer.groups != 1:
        _refuse(
            layer,
            f"groups={layer.groups}; grouped convolutions are not supported",
        )
    if _activation_name(layer) in _CHANNEL_MIXING_ACTIVATIONS:
        _refuse(layer, "a softmax activation on a feature map mixes channels")
    if gated_conv and layer.filters % groups:
        _refuse(
            layer,
            f"its {layer.filters} filters are not divisible by groups={groups}",
        )


def _why_not(layer, section):
    if isinstance(
        layer,
        (
            _L.DepthwiseConv2D,
            _L.SeparableConv2D,
            _L.Conv1D,
            _L.Conv3D,
            _L.Conv2DTranspose,
        ),
    ):
        return "only Conv2D convolutions are supported"
    if isinstance(layer, (_L.RNN, _L.LSTM, _L.GRU, _L.SimpleRNN)):
        return "recurrent layers are not supported"
    if isinstance(layer, _L.Dense) and section != "head":
        return (
            "a Dense layer is supported only in the head, after "
            "Flatten or global pooling"
        )
    if isinstance(layer, REDUCER_LAYERS):
        return "flatten or global pooling is expected once, after a conv"
    if isinstance(layer, CHANNELWISE_LAYERS):
        return (
            "this layer mixes channels or is not channels_last, or it "
            "stands where it is not supported"
        )
    return "this layer type is not supported here"


def count_decision_flops(in_channels, code_dim, hidden_units, groups):
    """FLOPs per image of the decision network over all gated layers.

    Per gated layer: the encoder (dense `C_in -> code_dim`), one LSTM step
    (`(code_dim + hidden) -> 4 * hidden`) and the decoder
    (`hidden -> groups`). Global average pooling is not counted (it adds,
    it does not multiply).
    """
    lstm = flops_lib.dense_flops(code_dim + hidden_units, 4 * hidden_units)
    decoder = flops_lib.dense_flops(hidden_units, groups)
    return float(
        sum(
            flops_lib.dense_flops(c, code_dim) + lstm + decoder
            for c in in_channels
        )
    )
