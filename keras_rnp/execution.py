"""The forward pass of a gated network, in one of three modes.

- `MASKED` (training): every gated unit computes all its channels and
  zeroes the skipped groups, so gradients reach every weight.
- `SLICED` (inference in TensorFlow: Keras, `run()`, the SavedModel): at
  each gated unit, one convolution on a slice of the unit's one stored
  kernel, the slice chosen at run time from the actions. A batch whose
  images all took one action (always so at batch 1) runs as one group; a
  mixed batch loops over the (previous action, action) groups present,
  each on exactly its channels, and scatters the results back in order.
- `SLICED_ONNX` (inference for tf2onnx): the same graph; the mode exists
  for the exporters, whose checks differ (ONNX cannot raise errors).

The graph holds one convolution per unit in each of the two branches
(uniform and grouped), whatever the number of groups, so an export stores
each weight once.
The work the sliced modes execute is what `Plan.path_flops` counts.
"""

import tensorflow as tf

MASKED = "masked"
SLICED = "sliced"
SLICED_ONNX = "sliced_onnx"
MODES = (MASKED, SLICED, SLICED_ONNX)


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
        mode: `MASKED`, `SLICED` or `SLICED_ONNX`.
        training: passed to the backbone's layers (masked mode only).
        target_decision: a second decision network (DQN's target network)
            to step on the same states, or None.

    Returns:
        `(outputs, actions [B, L] int32, q_values [B, L, k])`, and the
        target network's `[B, L, k]` Q-values last when it is given.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Received: {mode!r}.")
    x = images
    for layer in plan.pre:
        x = layer(x, training=training)
    state = decision.initial_state(tf.shape(images)[0])
    if target_decision is not None:
        target_state = target_decision.initial_state(tf.shape(images)[0])
    taken, q_values, target_q_values = [], [], []
    previous = None
    last = len(plan.units) - 1
    for t, unit in enumerate(plan.units):
        q, state = decision.step(t, tf.stop_gradient(x), state)
        q_values.append(q)
        if target_decision is not None:
            target_q, target_state = target_decision.step(
                t, tf.stop_gradient(x), target_state
            )
            target_q_values.append(tf.stop_gradient(target_q))
        action = choose(t, q)
        taken.append(action)
        if mode == MASKED:
            x = unit.call_masked(
                x, action, previous_action=previous, training=training
            )
        else:
            head = plan if t == last else None
            x = _run_sliced(unit, x, previous, action, head, mode)
        previous = action
    if mode == MASKED:
        x = plan.head.call(x, training=training)
    x = tf.cast(x, _output_dtype(x.dtype))
    outputs = (x, tf.stack(taken, axis=1), tf.stack(q_values, axis=1))
    if target_decision is not None:
        outputs += (tf.stack(target_q_values, axis=1),)
    return outputs


def _run_sliced(unit, x, previous, action, head_plan, mode):
    """Runs a gated unit on its active channels, image group by group.

    Images are grouped by (previous action, action). Each group runs one
    convolution on a slice of the unit's one stored kernel, the slice
    chosen at run time from the group's actions, so the graph holds one
    convolution per unit whatever the number of groups, and an export
    stores each weight once. A batch whose images all took one action
    (always so at batch 1) runs as one group without splitting; a mixed
    batch loops over the groups present, scattering each group's rows
    into the output. Outputs are padded back to full width with zeros for
    the next layer, or, for the last unit (`head_plan` given), go through
    the head's sliced dense layer.
    """
    del mode  # One implementation for TensorFlow and tf2onnx.
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
        # `group` is a scalar int32 tensor: the slice is chosen at run time.
        active_in = unit.in_channels
        if unit.in_gated:
            active_in = (group // k + 1) * group_in
        active_out = (group % k + 1) * group_out
        y = unit.call_sliced(part, active_in, active_out)
        if head_plan is not None:
            y = tf.cast(head_plan.head.call_sliced(y, active_out), out_dtype)
        else:
            padding = unit.out_channels - active_out
            y = tf.pad(y, [[0, 0], [0, 0], [0, 0], [0, padding]])
        return tf.ensure_shape(y, (None, *output_shape))

    def uniform():
        # Every image in one group (always so at batch 1): one convolution
        # on the whole batch, without splitting and merging.
        return run_group(x, key[0])

    def grouped():
        groups = tf.unique(key).y
        batch = tf.shape(x)[0]
        merged = tf.zeros(tf.concat([[batch], output_shape], 0), out_dtype)

        def body(i, merged):
            group = groups[i]
            rows = tf.where(tf.equal(key, group))
            part = run_group(tf.gather_nd(x, rows), group)
            return i + 1, tf.tensor_scatter_nd_update(merged, rows, part)

        _, merged = tf.while_loop(
            lambda i, _: i < tf.size(groups),
            body,
            (tf.constant(0), merged),
            parallel_iterations=1,
        )
        return merged

    is_uniform = tf.reduce_min(key) == tf.reduce_max(key)
    return tf.cond(is_uniform, uniform, grouped)


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
