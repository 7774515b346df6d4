"""Exploration schedule for the decision network."""

import tensorflow as tf


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
