"""The decision policy: action costs, greedy choice under a budget, and
exploration with its epsilon schedule.

Everything here is a small function of tensors (or NumPy arrays) and
integers: the model holds the state (the step counters, the seed) and
passes it in, so a resumed run decides and explores exactly as an
uninterrupted one.
"""

import numpy as np
import tensorflow as tf

PENALTY_MODES = ("flat", "flops")


def action_costs(gated_flops, groups, penalty_mode="flat"):
    """What the penalty charges for each action of each gated layer.

    `cost_t(a) = w_t * (a - 1)`: `w_t = 1` for the paper's flat penalty, or
    the layer's share of the gated FLOPs scaled so the weights average 1
    (`penalty_mode="flops"`).

    Args:
        gated_flops: full FLOPs of each of the `L` gated convolutions.
        groups: actions per layer `k`.
        penalty_mode: `"flat"` or `"flops"`.

    Returns:
        A float32 NumPy array `[L, k]` (a NumPy array, so that traced
        functions embed it as a constant rather than capture a tensor).
    """
    if penalty_mode not in PENALTY_MODES:
        raise ValueError(
            f"penalty_mode must be one of {PENALTY_MODES}. Received: "
            f"penalty_mode={penalty_mode!r}."
        )
    gated = np.asarray(gated_flops, np.float64)
    if penalty_mode == "flops":
        weights = gated / gated.sum() * len(gated)
    else:
        weights = np.ones(len(gated))
    return (weights[:, None] * np.arange(groups)[None, :]).astype("float32")


# The largest margin: float32 holds it, and with it (at budget 0) every
# image with finite Q-values keeps the path.
FIXED_PATH_MARGIN = 1e30


def path_bonus(path, margin, groups):
    """What a default path adds to the Q-values: `margin` on each layer's
    path action, 0 elsewhere.

    With it, an image leaves the path at a layer only where its Q-values
    prefer another action by more than `margin` (see `RNPModel`'s
    `default_path`).

    Args:
        path: the default action of each of the `L` gated layers, ints in
            `1..groups`, or None (no default path).
        margin: a number >= 0.
        groups: actions per layer `k`.

    Returns:
        A float32 NumPy array `[L, k]`, or None without a path.
    """
    if path is None:
        return None
    bonus = np.zeros((len(path), groups), np.float32)
    bonus[np.arange(len(path)), np.asarray(path) - 1] = margin
    return bonus


def greedy_actions(q_values, budget, cost, finite_images, bonus=None):
    """`a = argmax_a [Q(s, a) - budget * cost(a) + bonus(a)] + 1`, per
    image.

    Images whose pixels or scores are not finite (argmax means nothing
    there) take the full network, action `k`.

    Args:
        q_values: `[B, k]` Q-values of one gated layer.
        budget: `[B]` budget weights (>= 0).
        cost: `[k]` the layer's action costs (see `action_costs`).
        finite_images: `[B]` bool, whether each image's pixels are finite.
        bonus: None, or `[k]` added to every image's scores (the layer's
            row of `path_bonus`).

    Returns:
        `[B]` int32 actions in `1..k`.
    """
    groups = q_values.shape[-1]
    scores = q_values - budget[:, None] * cost[None, :]
    # Checked before the bonus: a huge margin is not a non-finite score.
    finite = finite_images & tf.reduce_all(tf.math.is_finite(scores), axis=-1)
    if bonus is not None:
        scores = scores + bonus[None, :]
    action = tf.argmax(scores, axis=-1, output_type=tf.int32) + 1
    return tf.where(finite, action, groups)


def explore(greedy, epsilon, groups, seed, step, layer):
    """Replaces each greedy action by a uniformly random one with
    probability `epsilon`.

    The random numbers are stateless, keyed by (seed, training step, layer,
    replica): a run resumed from a checkpoint (which holds the step
    counter) explores exactly as the uninterrupted run would, and replicas
    under a distribution strategy draw different numbers.

    Args:
        greedy: `[B]` int32 actions.
        epsilon: the exploration rate, a float or scalar tensor.
        groups: actions per layer `k`.
        seed: the model's exploration seed (an int).
        step: the training step (an int or int64 scalar tensor).
        layer: the gated layer's index.

    Returns:
        `[B]` int32 actions in `1..k`.
    """
    shape = tf.shape(greedy)
    key = tf.stack(
        [tf.constant(seed, tf.int64), tf.cast(step, tf.int64)],
    )
    key = tf.random.experimental.stateless_fold_in(key, layer)
    replica = tf.distribute.get_replica_context()
    if replica is not None:
        key = tf.random.experimental.stateless_fold_in(
            key, replica.replica_id_in_sync_group
        )
    draw = tf.random.stateless_uniform(shape, seed=key)
    random = tf.random.stateless_uniform(
        shape,
        seed=tf.random.experimental.stateless_fold_in(key, 1),
        minval=1,
        maxval=groups + 1,
        dtype=tf.int32,
    )
    return tf.where(draw < epsilon, random, greedy)


def random_actions(batch, layers, groups, seed, step, stream):
    """`[batch, layers]` actions drawn uniformly from `1..groups`.

    Stateless, keyed by (seed, step, stream, layer, replica) like
    `explore`: `stream` tells apart several draws in one step.
    """
    return tf.stack(
        [
            explore(
                tf.fill([batch], groups),
                1.0,
                groups,
                seed,
                step,
                layer=(stream + 1) * 1000 + t,
            )
            for t in range(layers)
        ],
        axis=1,
    )


def linearly_decaying_epsilon(step, decay_steps, start=1.0, end=0.1):
    """Epsilon for epsilon-greedy exploration at a decision-training step.

    epsilon = start + (end - start) * min(step / decay_steps, 1)

    so it falls linearly from `start` at step 0 to `end` at `decay_steps`,
    then stays at `end`. With `decay_steps == 0` it is `end` throughout.

    Args:
        step: number of decision-network updates done so far (int or tensor).
        decay_steps: length of the linear decay, in decision steps.
        start: epsilon at step 0.
        end: epsilon from `decay_steps` on.

    Returns:
        A float32 scalar tensor.
    """
    step = tf.cast(step, tf.float32)
    if decay_steps <= 0:
        return tf.constant(end, tf.float32)
    progress = tf.minimum(step / float(decay_steps), 1.0)
    return start + (end - start) * progress


def epsilon_decay_steps_for(total_steps, decision_steps, backbone_steps):
    """An `epsilon_decay_steps` that explores widely over the first third
    of a run's decision steps.

    `max(1, total_steps * N1 // (N1 + N2) // 3)`: the decision steps are
    about `N1 / (N1 + N2)` of the `total_steps` training steps.

    Args:
        total_steps: training steps of the whole run (epochs times steps
            per epoch).
        decision_steps: `N1`.
        backbone_steps: `N2`.
    """
    decision = total_steps * decision_steps // (decision_steps + backbone_steps)
    return max(1, decision // 3)
