"""The planner: which layers `wrap()` supports, and how a CNN is cut
into gated units.

`plan_chain()` is the registry of supported layers: it reads a plain Keras
model, refuses what it cannot handle (naming the layer), and cuts the
layer chain into

- `pre`: the layers before the first gated convolution (input scaling and,
  by default, the first convolution with its batch norm and activation),
- `units`: one `keras_rnp.layers.GatedConv2D` per gated Conv2D, holding
  that convolution and the channel-wise layers that follow it (batch norm,
  activation, pooling, dropout) up to the next gated convolution or the
  head,
- `head`: a `keras_rnp.layers.GatedHead`, global pooling or flatten, then
  dense layers.

How a unit executes lives in `keras_rnp.layers`; how the units are run in
order, in `keras_rnp.execution`.
"""

import dataclasses

import keras

from keras_rnp import flops as flops_lib
from keras_rnp.layers.gated_conv2d import GatedConv2D
from keras_rnp.layers.gated_conv2d import activation_name
from keras_rnp.layers.gated_head import REDUCER_LAYERS
from keras_rnp.layers.gated_head import GatedHead

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
    "Supported: a chain of Conv2D and channel-wise layers (batch norm, "
    "activations, pooling, dropout), then Flatten or global pooling and "
    'Dense layers; see "What wrap() accepts" in the README.'
)
# Activations that mix channels: not allowed on a feature map.
_CHANNEL_MIXING_ACTIVATIONS = ("softmax", "log_softmax")


def refuse(layer, why, next_step=SUPPORTED):
    """Raises the one-line refusal: the layer, why, and what to do."""
    raise ValueError(
        f"keras_rnp.wrap() cannot handle layer '{layer.name}' "
        f"({type(layer).__name__}): {why}. {next_step}"
    )


def is_channelwise(layer):
    if not isinstance(layer, CHANNELWISE_LAYERS):
        return False
    if isinstance(layer, _L.BatchNormalization) and layer.axis not in (-1, 3):
        return False
    if isinstance(layer, _L.Activation):
        return activation_name(layer) not in _CHANNEL_MIXING_ACTIVATIONS
    data_format = getattr(layer, "data_format", "channels_last")
    return data_format == "channels_last"


def is_residual(model):
    """Checks that `model` is a network `wrap()` can read; True if it is a
    functional model with merges (planned as a residual network), False
    for a chain.

    Raises:
        ValueError: if the model is not a built Sequential or functional
            model with one input and one output, or nests models.
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
            refuse(layer, "nested models are not supported; flatten it")
    if isinstance(model, keras.Sequential):
        return False  # A Sequential model is a chain by construction.
    return any(isinstance(layer.input, (list, tuple)) for layer in layers)


def chain_layers(model):
    """The model's layers as a list, checking that they form a single chain.

    Raises:
        ValueError: if the model is not a built Sequential or functional
            model, or if its layers branch or merge.
    """
    layers = [
        layer for layer in model.layers if not isinstance(layer, _L.InputLayer)
    ]
    if is_residual(model):
        merge = next(
            layer for layer in layers if isinstance(layer.input, (list, tuple))
        )
        refuse(merge, "a chain was expected; it merges branches")
    if isinstance(model, keras.Sequential):
        return layers
    previous = model.inputs[0]
    for layer in layers:
        layer_input = layer.input
        if (
            isinstance(layer_input, (list, tuple))
            or layer_input is not previous
        ):
            refuse(
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
class Plan:
    """A CNN cut into `pre`, gated `units` and `head`.

    Attributes:
        image_shape: `(H, W, C)` of one input image.
        pre: the layers before the first gated unit, run at full width.
        units: one `keras_rnp.layers.GatedConv2D` per gated convolution.
        head: the `keras_rnp.layers.GatedHead`.
        output_shape: shape of one image's output (e.g. `(classes,)`).
        pre_flops: FLOPs per image of `pre`.
        head_flops: FLOPs per image of the head, but for the dense layer
            that reads the gated channels.
        head_gated_flops: FLOPs of the head's first dense layer, which
            sees only the channels the last gated unit kept; 0 when no
            dense layer reads them.
    """

    image_shape: tuple
    pre: list
    units: list
    head: GatedHead
    output_shape: tuple
    pre_flops: float
    head_flops: float
    head_gated_flops: float

    @property
    def gated_flops(self):
        """Full FLOPs of each gated convolution."""
        return [unit.full_flops for unit in self.units]

    @property
    def gated_convs(self):
        """The gated convolutions, in order."""
        return [unit.conv for unit in self.units]

    @property
    def ends_in_softmax(self):
        """Whether the model outputs probabilities rather than logits."""
        return self.head.ends_in_softmax

    def step_flops(self, actions):
        """FLOPs per image of each gated convolution, a list of `[B]`, for
        `[B, L]` float actions (see `keras_rnp.flops.gated_layer_flops`)."""
        return flops_lib.gated_layer_flops(
            actions, self.gated_flops, self.in_gated, self.units[0].groups
        )

    @property
    def in_gated(self):
        """For each gated unit, whether its input comes from a gated one."""
        return [unit.in_gated for unit in self.units]

    @property
    def full_flops(self):
        """FLOPs per image with every group active (the plain model's)."""
        return (
            self.pre_flops
            + sum(self.gated_flops)
            + self.head_flops
            + self.head_gated_flops
        )

    def path_flops(self, actions, extra_flops=0.0):
        """FLOPs per image of `[B, L]` float actions (see
        `keras_rnp.flops.path_flops`), plus `extra_flops`."""
        return flops_lib.path_flops(
            actions,
            self.gated_flops,
            self.in_gated,
            self.units[0].groups,
            fixed_flops=self.pre_flops + self.head_flops + extra_flops,
            head_gated_flops=self.head_gated_flops,
        )


def plan_chain(
    model, groups, gate_first=False, width_aware=False, width_affine=False
):
    """Reads a chain CNN and cuts it into gated units.

    Args:
        model: a built Sequential or functional chain of supported layers.
        groups: channel groups per gated convolution.
        gate_first: also gate the first convolution.
        width_aware: give the batch norms of units with a gated input one
            set of statistics per input width (see `GatedConv2D`).

    Returns:
        A `Plan` whose layers are the model's own layer objects.

    Raises:
        ValueError: naming the first layer that cannot be handled.
    """
    layers = chain_layers(model)
    convs = [layer for layer in layers if isinstance(layer, _L.Conv2D)]
    gated = convs if gate_first else convs[1:]
    for layer in layers:
        if not isinstance(layer, _KNOWN_LAYERS):
            refuse(layer, _why_not(layer, section=None))
        if isinstance(layer, _L.Conv2D):
            check_conv(layer, groups, gated_conv=layer in gated)
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
    for layer in layers:
        in_shape, out_shape = layer.input.shape, layer.output.shape
        cost = flops_lib.layer_flops(layer, in_shape, out_shape)
        if isinstance(layer, _L.Conv2D):
            if section == "head":
                refuse(
                    layer,
                    "a convolution after the head's flatten or "
                    "global pooling is not supported",
                )
            if layer in gated:
                units.append((layer, []))
                section = "unit"
            else:
                pre.append(layer)
                pre_flops += cost
                section = "pre"
        elif section in ("input", "pre") and isinstance(layer, INPUT_LAYERS):
            if section != "input":
                refuse(
                    layer,
                    "input scaling is supported only before the "
                    "first convolution",
                )
            pre.append(layer)
        elif section in ("input", "pre", "unit") and is_channelwise(layer):
            if section == "unit":
                units[-1][1].append(layer)
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
            refuse(layer, _why_not(layer, section))
    if section != "head":
        raise ValueError(
            "keras_rnp.wrap() expects a classifier head after the last "
            "convolution: GlobalAveragePooling2D, GlobalMaxPooling2D or "
            f"Flatten, then Dense. Received: model={model.name}, whose last "
            f"layer is '{layers[-1].name}' ({type(layers[-1]).__name__})."
        )
    gated_units = []
    for t, (conv, tail) in enumerate(units):
        # Only the first gated convolution can read an ungated input.
        unit = GatedConv2D(
            conv,
            tail,
            groups=groups,
            in_gated=t > 0,
            width_aware=width_aware,
            width_affine=width_affine,
        )
        unit.build(conv.input.shape)
        gated_units.append(unit)
    return Plan(
        image_shape=input_shape[1:],
        pre=pre,
        units=gated_units,
        head=GatedHead(head, in_channels=gated_units[-1].out_channels),
        output_shape=tuple(model.outputs[0].shape[1:]),
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


def check_conv(layer, groups, gated_conv):
    if layer.data_format != "channels_last":
        refuse(
            layer,
            f"data_format={layer.data_format}; only channels_last is supported",
        )
    if layer.groups != 1:
        refuse(
            layer,
            f"groups={layer.groups}; grouped convolutions are not supported",
        )
    if activation_name(layer) in _CHANNEL_MIXING_ACTIVATIONS:
        refuse(layer, "a softmax activation on a feature map mixes channels")
    if gated_conv and layer.filters % groups:
        divisors = [g for g in range(2, 9) if layer.filters % g == 0]
        refuse(
            layer,
            f"its {layer.filters} filters are not divisible by groups={groups}",
            "Pass a groups that divides every gated convolution's filters"
            + (f" (this one: {divisors})." if divisors else "."),
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
