"""The policy: action costs, greedy choice under a budget, exploration."""

import numpy as np
import pytest
import tensorflow as tf

from keras_rnp import policy


def test_flat_and_flops_costs():
    np.testing.assert_array_equal(
        policy.action_costs([1.0, 3.0], 3, "flat"), [[0, 1, 2], [0, 1, 2]]
    )
    # Weights are each layer's share of the FLOPs, times L: 0.5 and 1.5.
    np.testing.assert_allclose(
        policy.action_costs([1.0, 3.0], 3, "flops"),
        [[0, 0.5, 1.0], [0, 1.5, 3.0]],
    )
    with pytest.raises(ValueError, match="penalty_mode must be one of"):
        policy.action_costs([1.0], 2, "linear")


def test_greedy_actions_follow_the_budget_and_fall_back_to_full_width():
    q = tf.constant(
        [[0.0, 1.0, 1.5], [0.0, 1.0, 1.5], [np.nan, 0, 0], [0.0, 1.0, 2.0]]
    )
    cost = tf.constant([0.0, 1.0, 2.0])
    budget = tf.constant([0.0, 0.6, 0.0, 0.0])
    finite_images = tf.constant([True, True, True, False])
    actions = policy.greedy_actions(q, budget, cost, finite_images)
    # argmax of q - b * cost: 3; [0, 0.4, 0.3] -> 2; NaN score -> 3 (full);
    # non-finite image -> 3 (full).
    np.testing.assert_array_equal(actions, [3, 2, 3, 3])


def test_exploration_is_keyed_by_seed_step_and_layer():
    greedy = tf.fill([2000], 2)
    a = policy.explore(greedy, 0.5, 4, seed=1, step=3, layer=0)
    again = policy.explore(greedy, 0.5, 4, seed=1, step=3, layer=0)
    other = policy.explore(greedy, 0.5, 4, seed=1, step=4, layer=0)
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, other)
    a = a.numpy()
    assert a.min() >= 1 and a.max() <= 4
    # Half random (uniform over 4, so 3/8 of all differ from greedy).
    assert abs(np.mean(a != 2) - 0.375) < 0.05
    np.testing.assert_array_equal(
        policy.explore(greedy, 0.0, 4, seed=1, step=3, layer=0), greedy
    )


def test_linearly_decaying_epsilon():
    values = [
        float(policy.linearly_decaying_epsilon(s, 4, 1.0, 0.2))
        for s in (0, 2, 4, 10)
    ]
    np.testing.assert_allclose(values, [1.0, 0.6, 0.2, 0.2], rtol=1e-6)
    assert float(policy.linearly_decaying_epsilon(5, 0, 1.0, 0.3)) == (
        pytest.approx(0.3)
    )


def test_epsilon_decay_steps_for_a_third_of_the_decision_steps():
    # 300 steps, N1 = 20 of every 30: 200 decision steps, a third of them.
    assert policy.epsilon_decay_steps_for(300, 20, 10) == 66
    assert policy.epsilon_decay_steps_for(2, 1, 1) == 1
