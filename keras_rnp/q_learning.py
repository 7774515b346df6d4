"""Algorithm 1's learning math as pure functions.

The rewards, the Q-learning targets and loss, the running loss mean that
sets `alpha`, the distillation loss and the phase arithmetic. They take
tensors (or NumPy arrays) and return tensors; none reads or writes model
state, so each is tested against a NumPy version without building a model.
The trainer (`keras_rnp.trainer`) calls them.
"""

import tensorflow as tf


def rewards(actions, action_cost, penalty, cls_loss, alpha):
    """Per-step rewards of a batch of episodes.

    `r_t = -p * cost_t(a_t)` at every step, and the last step also gets
    `-alpha * L_cls`.

    Args:
        actions: `[B, L]` int actions in `1..k`.
        action_cost: `[L, k]` costs (see `keras_rnp.policy.action_costs`).
        penalty: `p`.
        cls_loss: `[B]` classification loss of each image.
        alpha: weight of the classification loss (a scalar).

    Returns:
        `[B, L]` float32 rewards.
    """
    cost = tf.constant(action_cost, tf.float32)
    index = tf.cast(actions, tf.int32) - 1
    one_hot = tf.one_hot(index, tf.shape(cost)[1], dtype=tf.float32)
    charged = -penalty * tf.reduce_sum(one_hot * cost[None], axis=-1)
    steps = cost.shape[0]
    final = (
        tf.one_hot(steps - 1, steps)[None, :]
        * (-alpha * tf.cast(cls_loss, tf.float32))[:, None]
    )
    return charged + final


def targets(rewards, q_values, gamma, target_q_values=None, double=False):
    """Q-learning targets, held constant.

    `y_t = r_t + gamma * V(s_{t+1})` for `t < L`, and `y_L = r_L` (the
    episode ends after the last gated layer), where

    - `V(s) = max_a Q(s, a)`: the paper's target;
    - `V(s) = max_a Q'(s, a)` with a target network `Q'` (DQN);
    - `V(s) = Q'(s, argmax_a Q(s, a))` with `double=True` (Double DQN:
      the online network chooses the action, the target network values
      it; `Q' = Q` without a target network).

    Args:
        rewards: `[B, L]` rewards.
        q_values: `[B, L, k]` the online network's Q-values of the
            episode's states.
        gamma: the discount.
        target_q_values: `[B, L, k]` the target network's Q-values of the
            same states, or None.
        double: Double DQN targets.

    Returns:
        `[B, L]` targets, with no gradient.
    """
    evaluator = q_values if target_q_values is None else target_q_values
    if double:
        best = tf.argmax(q_values[:, 1:], axis=-1, output_type=tf.int32)
        next_values = tf.gather(evaluator[:, 1:], best, batch_dims=2)
    else:
        next_values = tf.reduce_max(evaluator[:, 1:], axis=-1)
    terminal = tf.zeros_like(q_values[:, :1, 0])
    bootstrap = tf.concat([gamma * next_values, terminal], axis=1)
    return tf.stop_gradient(rewards + bootstrap)


def q_loss(q_values, actions, targets):
    """`mean((y_t - Q(s_t, a_t))^2)` over the batch and the steps.

    Args:
        q_values: `[B, L, k]` Q-values.
        actions: `[B, L]` int actions taken, in `1..k`.
        targets: `[B, L]` targets (see `targets`).
    """
    index = tf.cast(actions, tf.int32) - 1
    taken = tf.gather(q_values, index, batch_dims=2)
    return tf.reduce_mean(tf.square(targets - taken))


def episode_return(rewards):
    """Mean over the batch of each episode's summed rewards."""
    return tf.reduce_mean(tf.reduce_sum(rewards, axis=1))


def updated_loss_mean(loss_mean, cls_loss, momentum):
    """The running mean of the classification loss after one batch.

    `m <- momentum * m + (1 - momentum) * mean(cls_loss)`, except that the
    first batch (`m == 0`) sets it outright.
    """
    mean = tf.reduce_mean(tf.cast(cls_loss, tf.float32))
    momentum = tf.where(loss_mean > 0, momentum, 0.0)
    return momentum * loss_mean + (1 - momentum) * mean


def alpha(loss_mean):
    """Weight of the classification loss in the final reward:
    `1 / running mean`, so that `alpha * L_cls` is about 1."""
    return 1.0 / tf.maximum(loss_mean, 1e-6)


def soft_cross_entropy(teacher, student, from_logits):
    """`H(teacher, student)` per image, the teacher held constant.

    Args:
        teacher: `[B, classes]` the teacher's outputs.
        student: `[B, classes]` the student's outputs.
        from_logits: whether the outputs are logits (else probabilities).

    Returns:
        `[B]` float32: `-sum_c p_teacher(c) log p_student(c)`.
    """
    if from_logits:
        teacher = tf.nn.softmax(teacher)
        log_student = tf.nn.log_softmax(student)
    else:
        log_student = tf.math.log(tf.maximum(student, 1e-7))
    teacher = tf.stop_gradient(tf.cast(teacher, tf.float32))
    return -tf.reduce_sum(teacher * tf.cast(log_student, tf.float32), axis=-1)


def distillation_per_image(
    hard, full_hard, student, teacher, weight, from_logits
):
    """In-place distillation's per-image loss beyond the path's own.

    The fine-tuning objective is `L(y, full) + (1 - d) L(y, path) +
    d H(full, path)`; given `L(y, path)` separately, this returns the rest:
    `L(y, full) + d (H(full, path) - L(y, path))`, where `H` is the
    cross-entropy of the path's prediction against the full network's,
    which is held constant (`soft_cross_entropy`).

    Args:
        hard: `[B]` the path's loss on the labels, `L(y, path)`.
        full_hard: `[B]` the full network's loss on the labels.
        student: `[B, classes]` the path's outputs.
        teacher: `[B, classes]` the full network's outputs.
        weight: `d` in [0, 1].
        from_logits: whether the outputs are logits (else probabilities).

    Returns:
        `[B]` float32.
    """
    soft = soft_cross_entropy(teacher, student, from_logits)
    hard = tf.cast(hard, tf.float32)
    return tf.cast(full_hard, tf.float32) + weight * (soft - hard)


def in_decision_phase(step, decision_steps, backbone_steps):
    """Whether training step `step` (from 0) updates the decision network:
    each round is `N1` decision steps, then `N2` backbone steps."""
    period = decision_steps + backbone_steps
    return tf.math.floormod(step, period) < decision_steps


def phase_counts(total_steps, decision_steps, backbone_steps):
    """How many of `total_steps` training steps fall in each phase.

    Args:
        total_steps: training steps from step 0.
        decision_steps: `N1`.
        backbone_steps: `N2`.

    Returns:
        `(decision_updates, backbone_updates)`, Python ints that sum to
        `total_steps`.
    """
    rounds, rest = divmod(total_steps, decision_steps + backbone_steps)
    backbone = rounds * backbone_steps + max(0, rest - decision_steps)
    return total_steps - backbone, backbone
