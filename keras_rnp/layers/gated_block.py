"""GatedBlock: the inner convolutions of a residual block, run at a width
chosen per image.

A residual network's stream (the tensors an `Add` joins) stays whole; what
runs narrower is a block's inner width. One action per image gates every
inner width of the block at once: action `a` keeps the first `a` of `k`
groups of each inner convolution's output, the next convolution reads only
those, and the block's last convolution reads them and writes every channel
of the stream.
"""

import keras
import tensorflow as tf

from keras_rnp.layers.gated_conv2d import GatedConv2D
from keras_rnp.layers.gated_conv2d import branch_tree
from keras_rnp.layers.gated_conv2d import is_uniform
from keras_rnp.layers.gated_conv2d import merge_in_order


@keras.saving.register_keras_serializable(package="keras_rnp")
class GatedBlock(keras.layers.Layer):
    """A chain of `GatedConv2D` units that one action per image gates.

    The first unit reads the whole input and gates its output; each later
    unit reads the previous one's active channels; every unit but the last
    gates its output, and the last computes all its output channels (it
    writes back into the stream). In a bottleneck block (1x1, 3x3, 1x1)
    action `a` costs `a/k` of the first and last convolutions and
    `(a/k)^2` of the middle one; in an inverted residual (expansion,
    depthwise, projection) `a/k` of each.

    `keras_rnp.wrap()` builds one per gated block of a residual network,
    around that network's own layers.

    Args:
        units: the `GatedConv2D` units in order: the first with
            `in_gated=False`, the others with `in_gated=True`, the last
            with `out_gated=False`, all with the same `groups`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `[B, H, W, C]` feature map (every channel active).
        action: `[B]` int tensor in `1..groups`.
        training: passed to batch norm and dropout.
    """

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        units = [
            keras.saving.deserialize_keras_object(unit)
            if isinstance(unit, dict)
            else unit
            for unit in units
        ]
        _check_units(units)
        self.units = units
        self.groups = units[0].groups
        self.in_channels = units[0].in_channels
        self.out_channels = units[-1].out_channels
        self.unit_output_shape = units[-1].unit_output_shape
        # Per-width batch-norm statistics of every unit, by unit/position.
        self.width_norms = {
            f"{j}/{position}": norm
            for j, unit in enumerate(units)
            for position, norm in unit.width_norms.items()
        }
        # FLOPs of action a, with f = a / k: constant + linear * f +
        # quadratic * f^2 (a convolution between two gated widths shrinks
        # on both sides).
        self.flops_terms = [0.0, 0.0, 0.0]
        for unit in units:
            degree = int(unit.in_gated) + int(unit.out_gated)
            self.flops_terms[degree] += unit.full_flops
            self.flops_terms[int(unit.out_gated)] += unit.tail_flops
        self.full_flops = sum(self.flops_terms)
        self.built = True

    @property
    def convs(self):
        """The block's convolutions, in order."""
        return [unit.conv for unit in self.units]

    @property
    def label(self):
        """A short name for reports: the first and last convolutions."""
        return f"{self.units[0].conv.name}..{self.units[-1].conv.name}"

    def path_flops(self, action):
        """FLOPs per image of the block at `[B]` float actions."""
        fraction = action / self.groups
        constant, linear, quadratic = self.flops_terms
        return constant + linear * fraction + quadratic * fraction * fraction

    def compute_output_shape(self, input_shape):
        shape = input_shape
        for unit in self.units:
            shape = unit.compute_output_shape(shape)
        return shape

    def call(self, inputs, action, training=False):
        return self.call_masked(inputs, action, training=training)

    def call_masked(self, x, action, training=False):
        """Every channel computed, the skipped inner groups zeroed
        (training); the output is every channel of the stream."""
        for unit in self.units:
            previous = action if unit.in_gated else None
            x = unit.call_masked(
                x, action, previous_action=previous, training=training
            )
        return x

    def call_sliced(self, x, active):
        """Inference at `active` groups (a Python int or a scalar int32
        tensor) for every image of `x`: each convolution on its active
        channels only."""
        for unit in self.units:
            k = self.groups
            in_active = unit.in_channels
            if unit.in_gated:
                in_active = active * (unit.in_channels // k)
            out_active = unit.out_channels
            if unit.out_gated:
                out_active = active * (unit.out_channels // k)
            x = unit.call_sliced(x, in_active, out_active)
        return x

    def call_blocks(self, x, action, uniform_branch=False, by_prefix=False):
        """Inference for ONNX and LiteRT: each convolution as kernel
        blocks run on the images that need them (see
        `GatedConv2D.call_blocks`; LiteRT). With `uniform_branch` (ONNX),
        the whole block runs at one action at a time, each convolution on
        a kernel prefix, its inner tensors holding just their active
        channels: a batch whose images share one action in one branch of
        a tree over the `groups` actions (`1 + ceil(log2(groups))`
        branches per block and call), a mixed batch action by action on
        the images that took it, each in a branch skipped when none
        did. With `by_prefix` (LiteRT), every batch action by action,
        without branches: each action's prefixes run on the images that
        took it, none mostly."""
        k = self.groups
        action = tf.cast(action, tf.int32)
        full = tf.fill([tf.shape(x)[0]], k)
        # Every weight is cut here, outside the branches.
        runners = [
            unit.blocks_runner(
                x.dtype,
                action if unit.in_gated else full,
                uniform_branch,
                by_prefix=by_prefix,
            )
            for unit in self.units
        ]

        def gathered():
            y = x  # (Not with by_prefix: `run` is then the chain's pairs.)
            for unit, (run, _) in zip(self.units, runners, strict=True):
                out = run(y, action)
                y = tf.concat(out, axis=-1) if unit.out_gated else out[0]
            return y

        if not (uniform_branch or by_prefix):
            return gathered()

        def at(a, y):
            for unit, (_, prefix) in zip(self.units, runners, strict=True):
                a_in = a if unit.in_gated else k
                y = prefix(y, a_in, a if unit.out_gated else k)
            return y

        def by_action():
            """Each action's images gathered and run as a uniform batch,
            the outputs put back in order (as `keras_rnp.execution`'s
            grouping does in TensorFlow)."""
            parts, rows = [], []
            for a in range(1, k + 1):
                chosen = tf.cast(tf.where(tf.equal(action, a))[:, 0], tf.int32)
                rows.append(chosen)
                if by_prefix:  # No branch: every action runs.
                    parts.append(at(a, tf.gather(x, chosen)))
                    continue
                empty = tf.zeros([0, *self.unit_output_shape], x.dtype)
                parts.append(
                    tf.cond(
                        tf.size(chosen) > 0,
                        lambda a=a, chosen=chosen: at(a, tf.gather(x, chosen)),
                        lambda empty=empty: empty,
                    )
                )
            return merge_in_order(parts, rows)

        if by_prefix:
            return by_action()
        cases = [lambda a=a: at(a, x) for a in range(1, k + 1)]
        return tf.cond(
            is_uniform(action),
            lambda: branch_tree(action[0] - 1, cases),
            by_action,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "units": [
                keras.saving.serialize_keras_object(unit) for unit in self.units
            ],
        }


def _check_units(units):
    if len(units) < 2 or not all(isinstance(u, GatedConv2D) for u in units):
        raise ValueError(
            "GatedBlock expects two or more GatedConv2D units. Received: "
            f"{units!r}."
        )
    expected = [(j > 0, j < len(units) - 1) for j in range(len(units))]
    received = [(u.in_gated, u.out_gated) for u in units]
    groups = {u.groups for u in units}
    if received != expected or len(groups) != 1:
        raise ValueError(
            "GatedBlock expects units with one groups, the first reading "
            "an ungated input, the last writing an ungated output and the "
            "others gated on both sides; (in_gated, out_gated) expected "
            f"{expected}. Received: {received}, groups={sorted(groups)}."
        )
