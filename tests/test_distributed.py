"""rnp.fit under MirroredStrategy (two logical CPUs) matches one device."""

from helpers import assert_same_training
from helpers import run_json_script


def test_mirrored_strategy_matches_one_device():
    runs = run_json_script("distributed_run.py")
    one, two = runs["one"], runs["two"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    # 3 epochs of 4 steps, rounds of 2 decision + 2 backbone steps: the
    # alternation and the counters are those of one device.
    assert one["step_counter"] == 12
    assert one["decision_step_counter"] == 6
    # Per-replica losses are scaled so that summed gradients, the loss
    # running mean (alpha) and the reported metrics are the whole batch's.
    assert_same_training(two, one)
    # One mirrored replica: the phases' updates and assignments of
    # mirrored variables cannot sit inside a tf.cond there either.
    mirrored = runs["mirrored_one"]
    assert mirrored["replicas"] == 1
    assert_same_training(mirrored, one)
    # Training moved the weights: the comparison is not of two no-ops.
    assert one["history"]["q_loss"][0] != one["history"]["q_loss"][-1]
