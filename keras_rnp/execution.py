"""The forward pass of a gated network, in one of three modes.

- `MASKED` (training): every gated unit computes all its channels and
  zeroes the skipped groups, so gradients reach every weight.
- `SLICED` (inference in TensorFlow: Keras, `run()`, the SavedModel): at
  each gated unit, a batch whose images all took one action (always so at
  batch 1) runs one convolution on a slice of the unit's kernel chosen at
  run time; a mixed batch loops over the (previous action, action) groups
  present, each running one smaller convolution on exactly its channels
  (its slice also chosen at run time), and the results are merged back in
  order. The graph holds one convolution per unit and branch.
- `SLICED_ONNX` (inference for tf2onnx): no control flow, and every
  weight a constant stored once (onnxruntime's fast convolutions need
  constant weights: a kernel sliced at run time ran 8.3x slower at batch
  1, `benchmarks/onnx_weights.py`). Each gated kernel is cut into `k x k`
  blocks (input group by output group); a block runs on exactly the
  images whose actions include it, gathered and added back in place
  (`GatedConv2D.call_blocks`, `GatedHead.call_blocks`).

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
        elif mode == SLICED_ONNX:
            groups = unit.call_blocks(x, action, previous_action=previous)
            if t == last:
                x = plan.head.call_blocks(groups, action)
            else:
                x = tf.concat(groups, axis=-1)
        else:
            head = plan if t == last else None
            x = _run_sliced(unit, x, previous, action, head)
        previous = action
    if mode == MASKED:
        x = plan.head.call(x, training=training)
    x = tf.cast(x, _output_dtype(x.dtype))
    outputs = (x, tf.stack(taken, axis=1), tf.stack(q_values, axis=1))
    if target_decision is not None:
        outputs += (tf.stack(target_q_values, axis=1),)
    return outputs


def _run_sliced(unit, x, previous, action, head_plan):
    """Runs a gated unit on its active channels, image group by group.

    Images are grouped by (previous action, action), so each group runs
    one smaller dense convolution on exactly the channels its images use.
    Outputs are padded back to full width with zeros for the next layer,
    or, for the last unit (`head_plan` given), go through the head's
    sliced dense layer.

    A batch whose images all took one action (always so at batch 1) runs
    one convolution on a slice of the unit's kernel chosen at run time,
    without splitting; a mixed batch loops over the groups present, each
    running on a run-time slice too.
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
            y = tf.cast(head_plan.head.call_sliced(y, active_out), out_dtype)
        else:
            padding = unit.out_channels - active_out
            y = tf.pad(y, [[0, 0], [0, 0], [0, 0], [0, padding]])
        return tf.ensure_shape(y, (None, *output_shape))

    def grouped():
        # One loop over the groups present, each group's kernel slice
        # chosen at run time: the graph holds one convolution per unit
        # whatever the number of groups (a branch per group made the first
        # call's tracing grow as L x k^2).
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
            part = run_group(tf.gather(x, index), group)
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

    def uniform():
        # Every image in one group (always so at batch 1): one convolution
        # on the whole batch, its kernel slice chosen at run time.
        return run_group(x, key[0])

    is_uniform = tf.logical_and(
        tf.size(key) > 0, tf.reduce_min(key) == tf.reduce_max(key)
    )
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
