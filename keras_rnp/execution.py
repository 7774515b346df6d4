"""The forward pass of a gated network, in one of five modes.

- `MASKED` (training): every gated unit computes all its channels and
  zeroes the skipped groups, so gradients reach every weight.
- `SLICED` (inference in TensorFlow: Keras, `run()`, the SavedModel): at
  each gated unit, a batch whose images all took one action (always so at
  batch 1) runs one convolution on a slice of the unit's kernel chosen at
  run time; a mixed batch loops over the (previous action, action) groups
  present, each running one smaller convolution on exactly its channels
  (its slice also chosen at run time), and the results are merged back in
  order. The graph holds one convolution per unit and branch.
- `SLICED_BLOCKS` (inference for graphs without control flow whose
  weights must be constants: LiteRT). Each gated kernel is cut into
  `k x k` blocks (input group by output group); a block runs on exactly
  the images whose actions include it, gathered and added back in place
  (`GatedConv2D.call_blocks`, `GatedHead.call_blocks`). Every weight is
  stored once.
- `SLICED_PREFIXES` (LiteRT's default: no control flow, weights
  constant, but each image computed once): at each gated unit, every
  (input width, action) pair runs one convolution on its kernel prefix
  over the images that took it (none, mostly: at batch 1 one pair has the
  image), and the results are merged back in order; a residual block
  runs each action's chain of prefixes so. The prefixes are constants of
  their own (a chain's convolution weights stored up to `((k + 1) / 2)^2`
  times); from 1.2x to 7x faster than the blocks in LiteRT
  (`BENCHMARKS.md`).
- `SLICED_ONNX` (inference for tf2onnx and onnxruntime, whose fast
  convolutions need constant weights: a kernel sliced at run time ran 8.3x
  slower at batch 1, `benchmarks/onnx_weights.py`): a batch whose images
  all took one action after one input width (always so at batch 1) runs
  one convolution on the kernel prefix it needs, chosen by a tree of
  branches, and hands its output on as it is; a mixed batch, the blocks
  of `SLICED_BLOCKS` in a chain (their output cut to the batch's largest
  action), and in a residual block each action's images as a uniform
  batch.
  `keras_rnp.export_onnx` keeps the weights out of tf2onnx's
  constant folding: each kernel is stored once, and its blocks and
  prefixes are slices that onnxruntime folds into constant weights when it
  loads the model.

A residual network (`keras_rnp.residual_planner.ResidualPlan`) runs its
stream layers at full width and each gated block in the same five modes,
one action per block and image (`keras_rnp.layers.GatedBlock`; in
`SLICED_ONNX` the branches are per block, not per convolution).

The work the sliced modes execute is what the plan's `path_flops` counts.
"""

import tensorflow as tf

from keras_rnp.layers.gated_conv2d import is_uniform
from keras_rnp.residual_planner import ResidualPlan

MASKED = "masked"
SLICED = "sliced"
SLICED_BLOCKS = "sliced_blocks"
SLICED_ONNX = "sliced_onnx"
SLICED_PREFIXES = "sliced_prefixes"
MODES = (MASKED, SLICED, SLICED_BLOCKS, SLICED_ONNX, SLICED_PREFIXES)
BLOCK_MODES = (SLICED_BLOCKS, SLICED_ONNX, SLICED_PREFIXES)


def forward(
    plan,
    decision,
    images,
    choose,
    mode=MASKED,
    training=False,
    target_decision=None,
):
    """Runs a gated network, deciding layer by layer.

    Args:
        plan: the `keras_rnp.planner.Plan`.
        decision: the `keras_rnp.layers.DecisionNetwork`.
        images: `[B, H, W, C]` float tensor.
        choose: `choose(t, q_values) -> [B] int32 actions` for gated layer
            `t`, given its `[B, k]` Q-values (see `keras_rnp.policy`).
        mode: `MASKED`, `SLICED`, `SLICED_BLOCKS`, `SLICED_ONNX` or
            `SLICED_PREFIXES`.
        training: passed to the backbone's layers (masked mode only).
        target_decision: a second decision network (DQN's target network)
            to step on the same states, or None.

    Returns:
        `(outputs, actions [B, L] int32, q_values [B, L, k])`, and the
        target network's `[B, L, k]` Q-values last when it is given.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Received: {mode!r}.")
    decide = _Decider(decision, target_decision, choose, tf.shape(images)[0])
    if isinstance(plan, ResidualPlan):
        x = _forward_residual(plan, decide, images, mode, training)
    else:
        x = _forward_chain(plan, decide, images, mode, training)
    x = tf.cast(x, _output_dtype(x.dtype))
    outputs = (
        x,
        tf.stack(decide.taken, axis=1),
        tf.stack(decide.q_values, axis=1),
    )
    if target_decision is not None:
        outputs += (tf.stack(decide.target_q_values, axis=1),)
    return outputs


class _Decider:
    """Steps the decision network (and the target network) on each gated
    layer's input and records the Q-values and actions."""

    def __init__(self, decision, target_decision, choose, batch):
        self.decision, self.target_decision = decision, target_decision
        self.choose = choose
        self.state = decision.initial_state(batch)
        if target_decision is not None:
            self.target_state = target_decision.initial_state(batch)
        self.taken, self.q_values, self.target_q_values = [], [], []

    def __call__(self, x):
        """The `[B]` actions for the gated layer whose input is `x`."""
        t, x = len(self.taken), tf.stop_gradient(x)
        q, self.state = self.decision.step(t, x, self.state)
        self.q_values.append(q)
        if self.target_decision is not None:
            target_q, self.target_state = self.target_decision.step(
                t, x, self.target_state
            )
            self.target_q_values.append(tf.stop_gradient(target_q))
        action = self.choose(t, q)
        self.taken.append(action)
        return action


def _forward_residual(plan, decide, images, mode, training):
    """Stream layers at full width, gated blocks at their actions."""
    values = [images]
    for step in plan.steps:
        inputs = [values[slot] for slot in step.inputs]
        if step.block is None:
            layer_input = inputs[0] if len(inputs) == 1 else inputs
            values.append(step.layer(layer_input, training=training))
            continue
        x, block = inputs[0], step.block
        action = decide(x)
        if mode == MASKED:
            y = block.call_masked(x, action, training=training)
        elif mode in BLOCK_MODES:
            y = block.call_blocks(
                x,
                action,
                uniform_branch=mode == SLICED_ONNX,
                by_prefix=mode == SLICED_PREFIXES,
            )
        else:
            y = _by_group(
                x,
                tf.cast(action, tf.int32) - 1,
                lambda part, group, block=block: block.call_sliced(
                    part, group + 1
                ),
                block.unit_output_shape,
                x.dtype,
            )
        values.append(y)
    return values[plan.output_slot]


def _forward_chain(plan, decide, images, mode, training):
    """The chain: `pre`, the gated units in order, the head."""
    x = images
    for layer in plan.pre:
        x = layer(x, training=training)
    previous = None
    last = len(plan.units) - 1
    for t, unit in enumerate(plan.units):
        action = decide(x)
        if mode == MASKED:
            x = unit.call_masked(
                x, action, previous_action=previous, training=training
            )
        elif mode == SLICED_PREFIXES:
            x = unit.call_blocks(
                x, action, previous_action=previous, by_prefix=True
            )
            if t == last:
                groups = tf.split(x, unit.groups, axis=-1)
                x = plan.head.call_blocks(groups, action)
        elif mode == SLICED_BLOCKS:
            groups = unit.call_blocks(x, action, previous_action=previous)
            if t == last:
                x = plan.head.call_blocks(groups, action)
            else:
                x = tf.concat(groups, axis=-1)
        elif mode == SLICED_ONNX:
            # Between layers, a batch's output holds the groups up to its
            # largest action: a uniform batch's convolution output as it
            # is (no zero groups written, no concatenation, and the next
            # layer's prefix reads it without a slice).
            x = unit.call_blocks(
                x,
                action,
                previous_action=previous,
                uniform_branch=True,
                narrow_input=t > 0,
                narrow_output=t != last,
            )
            if t == last:
                x = plan.head.call_blocks(x, action)
        else:
            head = plan if t == last else None
            x = _run_sliced(unit, x, previous, action, head)
        previous = action
    if mode == MASKED:
        x = plan.head.call(x, training=training)
    return x


def _run_sliced(unit, x, previous, action, head_plan):
    """Runs a gated unit on its active channels, image group by group.

    Images are grouped by (previous action, action), so each group runs
    one smaller dense convolution on exactly the channels its images use.
    For the last unit (`head_plan` given), outputs go through the head's
    sliced dense layer.

    A batch whose images all took one action (always so at batch 1) runs
    one convolution on a slice of the unit's kernel chosen at run time,
    without splitting, and hands the next layer its active channels only
    (which the next layer reads whole). A mixed batch loops over the
    groups present, each running on a run-time slice too, and pads each
    group's output back to full width with zeros, so that the groups
    merge.
    """
    k = unit.groups
    group_in = unit.in_channels // k
    group_out = unit.out_channels // k
    out_dtype = x.dtype
    if head_plan is not None:
        out_dtype = _output_dtype(x.dtype)
        output_shape = tuple(head_plan.output_shape)
    else:
        output_shape = tuple(unit.unit_output_shape)
    action = tf.cast(action, tf.int32)
    if unit.in_gated:
        previous = tf.cast(previous, tf.int32)
        key = (previous - 1) * k + (action - 1)
    else:
        key = action - 1

    def run_group(part, group):
        # `group` is a scalar int32 tensor: the slice is chosen at run
        # time (a Python int would fix it in the graph).
        active_in = unit.in_channels
        if unit.in_gated:
            active_in = (group // k + 1) * group_in
        active_out = (group % k + 1) * group_out
        y = unit.call_sliced(part, active_in, active_out)
        if head_plan is not None:
            # One dtype for every branch, whatever the head's last layer.
            return tf.cast(head_plan.head.call_sliced(y, active_out), out_dtype)
        return y

    widen = None
    if head_plan is None:
        # Uniform batches pass on their active channels (a padding and the
        # next layer's slice of it were two copies of the feature map per
        # layer); the groups of a mixed batch are padded to merge.
        def widen(y):
            padding = unit.out_channels - tf.shape(y)[-1]
            return tf.pad(y, [[0, 0], [0, 0], [0, 0], [0, padding]])

    return _by_group(x, key, run_group, output_shape, out_dtype, widen)


def _by_group(x, key, run_group, output_shape, out_dtype, widen=None):
    """`run_group(part, group)` on the images of `x` of each `key` (a `[B]`
    int32 tensor), the results back in the images' order.

    A batch whose images share one key (always so at batch 1) runs once on
    the whole batch; a mixed batch loops over the keys present (a
    `while_loop`: the graph holds one copy of `run_group`, however many
    keys there are), and the results are merged back with one gather.
    `group` is a scalar int32 tensor, so slices it chooses are chosen at
    run time. Each result has shape `[part's batch, *output_shape]`, or,
    with `widen`, a uniform batch's any number of channels and each group
    of a mixed batch `widen(result)`'s `output_shape`.
    """

    def run(part, group):
        y = run_group(part, group)
        if widen is None:
            return tf.ensure_shape(y, (None, *output_shape))
        return tf.ensure_shape(y, (None, *output_shape[:-1], None))

    def run_wide(part, group):
        y = run(part, group)
        if widen is not None:
            y = widen(y)
        return tf.ensure_shape(y, (None, *output_shape))

    def grouped():
        present = tf.unique(key).y
        outputs = tf.TensorArray(
            out_dtype,
            size=tf.size(present),
            infer_shape=False,
            element_shape=tf.TensorShape([None, *output_shape]),
        )
        rows = tf.TensorArray(
            tf.int32,
            size=tf.size(present),
            infer_shape=False,
            element_shape=tf.TensorShape([None]),
        )

        def body(i, outputs, rows):
            group = present[i]
            index = tf.cast(tf.where(tf.equal(key, group))[:, 0], tf.int32)
            part = run_wide(tf.gather(x, index), group)
            return i + 1, outputs.write(i, part), rows.write(i, index)

        _, outputs, rows = tf.while_loop(
            lambda i, *_: i < tf.size(present),
            body,
            (tf.constant(0), outputs, rows),
        )
        # Row j of the concatenated outputs belongs to image order[j].
        order = rows.concat()
        batch = tf.shape(order)[0]
        inverse = tf.scatter_nd(order[:, None], tf.range(batch), [batch])
        return tf.gather(outputs.concat(), inverse)

    return tf.cond(is_uniform(key), lambda: run(x, key[0]), grouped)


def _output_dtype(dtype):
    """Outputs are float32 under a mixed precision policy."""
    return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def empty_outputs(plan):
    """What `run()` returns for an empty batch: empty tensors of the right
    shapes and dtypes."""
    steps, groups = len(plan.units), plan.units[0].groups
    return {
        "logits": tf.zeros((0, *plan.output_shape), tf.float32),
        "actions": tf.zeros((0, steps), tf.int32),
        "flops": tf.zeros((0,), tf.float32),
        "q_values": tf.zeros((0, steps, groups), tf.float32),
    }


def unless_empty(images, run, empty):
    """`run()` for a non-empty batch, `empty()` for an empty one.

    With oneDNN (TensorFlow 2.21, CPU) a convolution on an empty batch
    returns a tensor of the wrong shape, so an empty batch must not reach
    the network. A known batch size is decided in Python; an unknown one
    (a traced function) with `tf.cond`.
    """
    if images.shape[0] is not None:
        return run() if images.shape[0] else empty()
    return tf.cond(tf.shape(images)[0] > 0, run, empty)
