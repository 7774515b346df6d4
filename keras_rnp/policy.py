"""The decision policy's exploration settings.

A minimal stand-in holding only `epsilon_decay_steps_for`; the library's
policy module replaces it.
"""


def epsilon_decay_steps_for(total_steps, decision_steps, backbone_steps):
    """Decision steps over which exploration decays: the first third.

    Counts the decision network's share of `total_steps` as
    `total_steps * N1 // (N1 + N2)` and returns a third of it, at least 1:
    epsilon falls from its start value over the first third of the
    decision updates (see `keras_rnp.linearly_decaying_epsilon`).

    Args:
        total_steps: training steps in all (both phases), an int >= 0.
        decision_steps: N1, decision steps per round, an int >= 0.
        backbone_steps: N2, backbone steps per round, an int >= 0.

    Returns:
        An int >= 1, for `keras_rnp.wrap(..., epsilon_decay_steps=...)`.
    """
    if decision_steps + backbone_steps <= 0:
        raise ValueError(
            "Expected decision_steps + backbone_steps > 0. Received: "
            f"decision_steps={decision_steps}, backbone_steps={backbone_steps}"
        )
    share = total_steps * decision_steps // (decision_steps + backbone_steps)
    return max(1, share // 3)
