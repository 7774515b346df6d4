"""Seeded, op-deterministic training is reproducible across processes."""

import numpy as np
import pytest
from helpers import run_json_script


def run_once():
    return run_json_script("determinism_run.py", timeout=300)


# Slow (the default run keeps to 15 minutes): about 25 s.
@pytest.mark.slow
def test_two_seeded_runs_give_identical_weights_and_actions():
    first, second = run_once(), run_once()
    assert first["step_counter"] == second["step_counter"] == 18
    assert first["weights"] == second["weights"]
    assert first["actions"] == second["actions"]
    np.testing.assert_array_equal(first["logits"], second["logits"])
    # The actions are not all one path, so their equality says something.
    assert len({tuple(a) for a in first["actions"]}) > 1
