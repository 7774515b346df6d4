"""The planner of residual networks: which convolutions a residual or
inverted-residual network gates, and the order its layers run in.

The residual stream stays whole: the stem, every tensor an `Add` joins,
the shortcut projections and everything after the last block run at full
width. Gating goes to a block's inner width. A Conv2D is *inner* when its
output passes through a non-linear activation (and other channel-wise
layers: batch norm, padding, pooling, dropout, a depthwise convolution) to
exactly one other Conv2D and nothing else reads it. A gated block is a run
of inner convolutions and the convolution after the last of them, which
writes back into the stream (its output is linear, as in a ResNet's last
convolution before the `Add` or an inverted residual's projection). So

- ResNet (v1 and v2), bottleneck: the 1x1 and 3x3 convolutions are inner,
  the last 1x1 writes the stream; basic block: the first 3x3 is inner;
- MobileNetV2: the 1x1 expansion is inner, the depthwise convolution runs
  on its active channels (it is part of the expansion's unit), the
  projection writes the stream;
- the network's first convolution is never gated (unless `gate_first`).

One decision step per gated block: the decision network sees the feature
map entering the block's first convolution and chooses one action for
every inner width of the block (`keras_rnp.layers.GatedBlock`). Blocks do
not depend on each other's actions, since each reads the whole stream.
"""

import collections
import dataclasses

import keras

from keras_rnp import flops as flops_lib
from keras_rnp import planner
from keras_rnp.layers.gated_block import GatedBlock
from keras_rnp.layers.gated_conv2d import GatedConv2D
from keras_rnp.layers.gated_conv2d import activation_name

_L = keras.layers

SUPPORTED = (
    "Supported in residual networks: Conv2D, DepthwiseConv2D, batch norm, "
    "activations, padding, pooling, dropout, Add, global pooling or "
    'Flatten and Dense; see "Residual networks" in the README.'
)
# Layers that may run at full width anywhere in the stream.
_STREAM_LAYERS = (
    (
        _L.Conv2D,
        _L.DepthwiseConv2D,
        _L.Add,
        _L.ZeroPadding2D,
        _L.Dense,
        _L.Flatten,
        _L.GlobalAveragePooling2D,
        _L.GlobalMaxPooling2D,
        _L.Softmax,
    )
    + planner.CHANNELWISE_LAYERS
    + planner.INPUT_LAYERS
)
_NOT_SUPPORTED = (
    (
        _L.Concatenate,
        "concatenation (DenseNet, Inception) is not supported: a "
        "concatenated tensor mixes the stream with other widths",
    ),
    (
        _L.Multiply,
        "multiplying feature maps (squeeze-and-excitation, gating) is not "
        "supported: the layers that compute the scale (Dense or 1x1 "
        "Conv2D on the pooled map) read every channel of the tensor they "
        "scale, which a gated block would have to slice per action, and "
        "the planner has no rule for Multiply",
    ),
    (
        (_L.Attention, _L.AdditiveAttention, _L.MultiHeadAttention),
        "attention is not supported: keras_rnp plans convolutional "
        "networks, whose layers read [H, W, C] feature maps",
    ),
    (
        (_L.Conv2DTranspose, _L.Conv1DTranspose, _L.Conv3DTranspose),
        "transposed convolutions are not supported: the planner plans, "
        "slices and counts Conv2D and DepthwiseConv2D kernels only",
    ),
    (
        (_L.SeparableConv2D, _L.Conv1D, _L.Conv3D),
        "only Conv2D and DepthwiseConv2D convolutions are supported, the "
        "kernels the planner plans, slices and counts (a separable "
        "convolution can be built as a DepthwiseConv2D and a 1x1 Conv2D)",
    ),
    (
        (_L.Subtract, _L.Average, _L.Maximum, _L.Minimum, _L.Dot),
        "Add is the only merge supported: the planner recognises the "
        "residual stream only through Add",
    ),
)
_NONLINEAR = (_L.ReLU, _L.LeakyReLU, _L.ELU, _L.Activation)


@dataclasses.dataclass
class Step:
    """One step of a residual plan: a layer of the stream, or a gated
    block; `inputs` and `output` are slots of the forward pass (slot 0 is
    the image)."""

    inputs: list
    output: int
    layer: keras.layers.Layer | None = None
    block: GatedBlock | None = None


@dataclasses.dataclass
class ResidualPlan:
    """A residual CNN as steps in order: stream layers at full width and
    gated blocks, one decision per block.

    Attributes:
        image_shape: `(H, W, C)` of one input image.
        steps: the `Step`s, in an order where each reads only earlier
            slots.
        units: the `GatedBlock`s, in the order they decide.
        output_slot: the slot of the model's output.
        output_shape: shape of one image's output (e.g. `(classes,)`).
        fixed_flops: FLOPs per image of every stream layer.
        ends_in_softmax: whether the model outputs probabilities.
    """

    image_shape: tuple
    steps: list
    units: list
    output_slot: int
    output_shape: tuple
    fixed_flops: float
    ends_in_softmax: bool

    @property
    def gated_flops(self):
        """Full FLOPs of each block's gated part."""
        return [block.full_flops for block in self.units]

    @property
    def gated_convs(self):
        """The convolutions whose output is gated, in order."""
        return [
            unit.conv
            for block in self.units
            for unit in block.units
            if unit.out_gated
        ]

    @property
    def full_flops(self):
        """FLOPs per image with every group active (the plain model's)."""
        return self.fixed_flops + sum(self.gated_flops)

    def step_flops(self, actions):
        """FLOPs per image of each block, a list of `[B]`, for `[B, L]`
        float actions."""
        return [
            block.path_flops(actions[:, t])
            for t, block in enumerate(self.units)
        ]

    def path_flops(self, actions, extra_flops=0.0):
        """FLOPs per image of `[B, L]` float actions, plus `extra_flops`."""
        total = self.fixed_flops + extra_flops
        for cost in self.step_flops(actions):
            total = total + cost
        return total


def plan_residual(
    model, groups, gate_first=False, width_aware=False, width_affine=False
):
    """Reads a residual CNN and cuts it into stream layers and gated blocks.

    Args:
        model: a built functional model of supported layers, with merges.
        groups: channel groups per inner convolution.
        gate_first: also gate the first convolution if it is inner.
        width_aware: per-width batch-norm statistics for the units with a
            gated input (see `GatedConv2D`).
        width_affine: with `width_aware`, per-width gamma and beta too.

    Returns:
        A `ResidualPlan` whose layers are the model's own layer objects.

    Raises:
        ValueError: naming the first layer that cannot be handled.
    """
    graph = _Graph(model)
    for layer in graph.layers:
        _check_layer(layer)
    for layer in graph.layers:
        if isinstance(layer, _L.Add):
            graph.check_residual(layer)
    convs = [layer for layer in graph.layers if isinstance(layer, _L.Conv2D)]
    first = convs[0] if convs else None

    def inner(conv):
        """The conv's tail and the next conv if `conv` is inner, else None."""
        if conv is first and not gate_first:
            return None
        tail, after = graph.follow(conv)
        nonlinear = activation_name(conv) != "linear" or any(
            _is_nonlinear(layer) for layer in tail
        )
        if isinstance(after, _L.Conv2D) and nonlinear:
            planner.check_conv(conv, groups, gated_conv=True)
            # It reads the gated channels: no feature groups, channels-last.
            planner.check_conv(after, groups, gated_conv=False)
            return tail, after
        return None

    blocks, members = [], {}
    for conv in convs:
        if id(conv) in members or inner(conv) is None:
            continue
        chain, layer = [], conv
        while True:
            found = inner(layer)
            tail = found[0] if found else graph.follow(layer)[0]
            chain.append((layer, tail))
            if found is None:
                break
            layer = found[1]
        units = []
        for j, (layer, tail) in enumerate(chain):
            unit = GatedConv2D(
                layer,
                tail,
                groups=groups,
                in_gated=j > 0,
                out_gated=j < len(chain) - 1,
                width_aware=width_aware,
                width_affine=width_affine,
            )
            unit.build(layer.input.shape)
            units.append(unit)
        block = GatedBlock(units, name=f"{conv.name}_gated_block")
        last = chain[-1][1][-1] if chain[-1][1] else chain[-1][0]
        blocks.append((block, conv.input, last.output))
        for layer, tail in chain:
            for member in [layer, *tail]:
                members[id(member)] = len(blocks) - 1
    if not blocks:
        raise ValueError(
            "keras_rnp.wrap() found no block to gate in model="
            f"{model.name}: a gated block needs a Conv2D whose output goes "
            "through an activation to exactly one other Conv2D (and, "
            "unless gate_first=True, not the first Conv2D). " + SUPPORTED
        )

    slots = {id(model.inputs[0]): 0}
    steps, emitted, fixed_flops = [], set(), 0.0
    for layer in graph.layers:
        index = members.get(id(layer))
        if index is None:
            inputs = graph.inputs(layer)
            steps.append(
                Step(
                    inputs=[slots[id(t)] for t in inputs],
                    output=len(slots),
                    layer=layer,
                )
            )
            slots[id(layer.output)] = len(slots)
            shapes = [tuple(t.shape) for t in inputs]
            fixed_flops += flops_lib.layer_flops(
                layer,
                shapes[0] if len(shapes) == 1 else shapes,
                tuple(layer.output.shape),
            )
        elif index not in emitted:
            emitted.add(index)
            block, block_input, block_output = blocks[index]
            steps.append(
                Step(
                    inputs=[slots[id(block_input)]],
                    output=len(slots),
                    block=block,
                )
            )
            slots[id(block_output)] = len(slots)
    output = model.outputs[0]
    last_layer = graph.producer[id(output)]
    return ResidualPlan(
        image_shape=tuple(model.inputs[0].shape[1:]),
        steps=steps,
        units=[block for block, _, _ in blocks],
        output_slot=slots[id(output)],
        output_shape=tuple(output.shape[1:]),
        fixed_flops=fixed_flops,
        ends_in_softmax=isinstance(last_layer, _L.Softmax)
        or activation_name(last_layer) == "softmax",
    )


class _Graph:
    """A functional model's layers, who reads each tensor and who makes it."""

    def __init__(self, model):
        self.model = model
        self.layers = [
            layer
            for layer in model.layers
            if not isinstance(layer, _L.InputLayer)
        ]
        self.producer = {id(model.inputs[0]): None}
        self.readers = collections.defaultdict(list)
        for layer in self.layers:
            if isinstance(layer, keras.Model):
                planner.refuse(
                    layer, "nested models are not supported; flatten it"
                )
            for tensor in self.inputs(layer):
                if id(tensor) not in self.producer:
                    why = "its input does not come from this model's layers"
                    if len(layer._inbound_nodes) > 1:
                        why = "it is called more than once (a shared layer)"
                    planner.refuse(layer, why, SUPPORTED)
                self.readers[id(tensor)].append(layer)
            self.producer[id(layer.output)] = layer
        # The model's output is read once more, by the caller.
        self.readers[id(model.outputs[0])].append(None)

    @staticmethod
    def inputs(layer):
        tensors = layer.input
        return (
            list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
        )

    def follow(self, layer):
        """The channel-wise layers after `layer`, each the only reader of
        the one before, and the layer after them (None if the last one's
        output is read by several layers, or is the model's output)."""
        tail, current = [], layer
        while True:
            readers = self.readers[id(current.output)]
            if len(readers) != 1 or readers[0] is None:
                return tail, None
            if not _in_unit(readers[0]):
                return tail, readers[0]
            current = readers[0]
            tail.append(current)

    def fork(self, tensor):
        """Walks back from `tensor` through layers of one input, each
        tensor read only by the next, to where the branch splits off."""
        while len(self.readers[id(tensor)]) == 1:
            layer = self.producer[id(tensor)]
            if layer is None or len(self.inputs(layer)) != 1:
                break
            tensor = self.inputs(layer)[0]
        return tensor

    def check_residual(self, add):
        """Refuses an Add whose inputs do not split from one tensor (a
        tensor inside a block read by a second layer, or no residual
        connection at all)."""
        forks = [self.fork(tensor) for tensor in self.inputs(add)]
        if any(fork is not forks[0] for fork in forks):
            names = []
            for fork in forks:
                layer = self.producer[id(fork)]
                readers = [r.name for r in self.readers[id(fork)] if r]
                source = "the input" if layer is None else f"'{layer.name}'"
                names.append(f"{source} (read by {', '.join(readers)})")
            planner.refuse(
                add,
                "its inputs do not split from one tensor, so it is not a "
                "residual connection around one block; they come from "
                + " and ".join(names)
                + ": a tensor inside a block may be read only by the "
                "block's next layer",
                SUPPORTED,
            )


def _in_unit(layer):
    """Whether `layer` can run inside a gated unit, on its active channels."""
    if isinstance(layer, _L.ZeroPadding2D):
        return layer.data_format == "channels_last"
    if isinstance(layer, _L.DepthwiseConv2D):
        return (
            layer.depth_multiplier == 1 and layer.data_format == "channels_last"
        )
    return planner.is_channelwise(layer)


def _is_nonlinear(layer):
    if isinstance(layer, _L.Activation):
        return activation_name(layer) != "linear"
    if isinstance(layer, _NONLINEAR):
        return True
    return activation_name(layer) not in ("linear", "None")


def _check_layer(layer):
    for types, why in _NOT_SUPPORTED:
        if isinstance(layer, types):
            planner.refuse(layer, why, SUPPORTED)
    if not isinstance(layer, _STREAM_LAYERS):
        planner.refuse(layer, "this layer type is not supported", SUPPORTED)
    if isinstance(layer, (_L.Conv2D, _L.DepthwiseConv2D)):
        if layer.data_format != "channels_last":
            planner.refuse(
                layer,
                f"data_format={layer.data_format}; only channels_last is "
                "supported",
                SUPPORTED,
            )
