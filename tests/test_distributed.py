"""rnp.fit under MirroredStrategy (two logical CPUs) matches one device."""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def test_mirrored_strategy_matches_one_device():
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "distributed_run.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout)
    one, two = runs["one"], runs["two"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    # 3 epochs of 4 steps, rounds of 2 decision + 2 backbone steps: the
    # alternation and the counters are those of one device.
    assert one["step_counter"] == two["step_counter"] == 12
    assert one["decision_step_counter"] == two["decision_step_counter"] == 6
    # Per-replica losses are scaled so that summed gradients, the loss
    # running mean (alpha) and the reported metrics are the whole batch's.
    np.testing.assert_allclose(two["loss_ema"], one["loss_ema"], rtol=1e-5)
    for a, b in zip(one["weights"], two["weights"], strict=True):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5)
    assert set(one["history"]) == set(two["history"])
    for key, values in one["history"].items():
        np.testing.assert_allclose(
            two["history"][key], values, rtol=1e-4, err_msg=key
        )
    # Training moved the weights: the comparison is not of two no-ops.
    assert one["history"]["q_loss"][0] != one["history"]["q_loss"][-1]
