"""Algorithm 1's schedule of decision and backbone updates.

A minimal stand-in holding only `phase_counts`; the library's Q-learning
module replaces it.
"""


def phase_counts(total_steps, decision_steps, backbone_steps):
    """How many of `total_steps` training steps train each part.

    Algorithm 1 alternates rounds of `decision_steps` (N1) updates of the
    decision network and `backbone_steps` (N2) updates of the backbone,
    decision steps first. A last, partial round spends its steps on the
    decision network before the backbone.

    Args:
        total_steps: training steps in all, an int >= 0.
        decision_steps: N1, decision steps per round, an int >= 0.
        backbone_steps: N2, backbone steps per round, an int >= 0.

    Returns:
        `(decision_updates, backbone_updates)`, which add up to
        `total_steps`.
    """
    if min(total_steps, decision_steps, backbone_steps) < 0 or not (
        decision_steps + backbone_steps
    ):
        raise ValueError(
            "Expected step counts >= 0, decision_steps + backbone_steps > 0. "
            f"Received: total_steps={total_steps}, decision_steps="
            f"{decision_steps}, backbone_steps={backbone_steps}"
        )
    rounds, rest = divmod(total_steps, decision_steps + backbone_steps)
    backbone = rounds * backbone_steps + max(0, rest - decision_steps)
    return total_steps - backbone, backbone
