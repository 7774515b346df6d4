"""Q-learning math as pure functions, against NumPy (no model built)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_rnp import policy
from keras_rnp import q_learning


def np_cross_entropy(logits, y):
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return -log_p[np.arange(len(y)), y]


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_rewards_targets_and_loss_match_numpy(gamma):
    rng = np.random.default_rng(0)
    batch, steps, k = 3, 2, 4
    q = rng.normal(size=(batch, steps, k)).astype("float32")
    actions = np.array([[1, 4], [2, 2], [4, 3]])
    cls = np_cross_entropy(rng.normal(size=(batch, 5)), np.array([0, 3, 4]))
    cost = policy.action_costs([10.0, 30.0], k, "flops")
    alpha = 1.0 / cls.mean()

    rewards = q_learning.rewards(actions, cost, 0.2, cls, alpha)
    targets = q_learning.targets(rewards, tf.constant(q), gamma)
    loss = q_learning.q_loss(tf.constant(q), actions, targets)

    # Reference: w = (0.5, 1.5) for layers of 10 and 30 FLOPs.
    expected = -0.2 * np.array([0.5, 1.5]) * (actions - 1.0)
    expected[:, -1] += -alpha * cls
    np.testing.assert_allclose(rewards, expected, rtol=1e-5)
    expected_targets = expected.copy()
    expected_targets[:, 0] += gamma * q[:, 1].max(-1)
    np.testing.assert_allclose(targets, expected_targets, rtol=1e-5)
    taken = np.take_along_axis(q, actions[..., None] - 1, axis=2)[..., 0]
    np.testing.assert_allclose(
        float(loss), np.mean((expected_targets - taken) ** 2), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(q_learning.episode_return(rewards)),
        expected.sum(1).mean(),
        rtol=1e-5,
    )


def test_targets_hold_no_gradient():
    q = tf.Variable(np.ones((2, 3, 4), "float32"))
    with tf.GradientTape() as tape:
        targets = q_learning.targets(tf.zeros((2, 3)), q, 1.0)
        total = tf.reduce_sum(targets)
    assert tape.gradient(total, q) is None


def test_one_step_episode_has_finite_loss_and_target_equal_to_reward():
    # L = 1: no next state, y_1 = r_1 (the bootstrap must not be empty).
    q = np.array([[[0.5, -1.0]], [[2.0, 0.0]]], "float32")
    actions = np.array([[2], [1]])
    cost = policy.action_costs([8.0], 2)
    cls = np.array([1.0, 3.0], "float32")
    rewards = q_learning.rewards(actions, cost, 0.1, cls, 0.5)
    np.testing.assert_allclose(rewards, [[-0.1 - 0.5], [-1.5]], rtol=1e-6)
    targets = q_learning.targets(rewards, q, 1.0)
    np.testing.assert_allclose(targets, rewards)
    loss = q_learning.q_loss(q, actions, targets)
    expected = np.mean(([-0.6 - -1.0, -1.5 - 2.0]) ** np.array(2))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_loss_mean_starts_at_the_first_batch_then_moves_with_momentum():
    mean = q_learning.updated_loss_mean(tf.constant(0.0), [2.0, 2.0], 0.5)
    assert float(mean) == pytest.approx(2.0)
    assert float(q_learning.alpha(mean)) == pytest.approx(0.5)
    mean = q_learning.updated_loss_mean(mean, [4.0], 0.5)
    assert float(mean) == pytest.approx(3.0)
    assert float(q_learning.alpha(mean)) == pytest.approx(1 / 3.0)


@pytest.mark.parametrize("from_logits", [True, False])
def test_distillation_matches_numpy(from_logits):
    rng = np.random.default_rng(1)
    student = rng.normal(size=(4, 3)).astype("float32")
    teacher = rng.normal(size=(4, 3)).astype("float32")
    if not from_logits:
        student = np.exp(student) / np.exp(student).sum(1, keepdims=True)
        teacher = np.exp(teacher) / np.exp(teacher).sum(1, keepdims=True)
    hard = rng.uniform(0, 2, 4).astype("float32")
    full_hard = rng.uniform(0, 2, 4).astype("float32")
    got = q_learning.distillation_per_image(
        hard, full_hard, student, teacher, 0.3, from_logits
    )
    if from_logits:
        p_teacher = np.exp(teacher) / np.exp(teacher).sum(1, keepdims=True)
        log_student = student - np.log(np.exp(student).sum(1, keepdims=True))
    else:
        p_teacher, log_student = teacher, np.log(student)
    soft = -(p_teacher * log_student).sum(1)
    np.testing.assert_allclose(
        got, full_hard + 0.3 * (soft - hard), rtol=1e-5, atol=1e-6
    )


def test_phases_alternate_n1_then_n2():
    phases = [
        bool(q_learning.in_decision_phase(step, 3, 2)) for step in range(11)
    ]
    assert phases == [True] * 3 + [False] * 2 + [True] * 3 + [False] * 2 + [
        True
    ]


@pytest.mark.parametrize("total", [0, 1, 3, 4, 5, 11, 100])
def test_phase_counts_agree_with_the_phase_of_every_step(total):
    decision = sum(
        bool(q_learning.in_decision_phase(step, 3, 2)) for step in range(total)
    )
    assert q_learning.phase_counts(total, 3, 2) == (decision, total - decision)


@pytest.mark.parametrize("double", [False, True])
def test_target_network_and_double_dqn_targets_match_numpy(double):
    rng = np.random.default_rng(2)
    q = rng.normal(size=(4, 3, 5)).astype("float32")
    target_q = rng.normal(size=(4, 3, 5)).astype("float32")
    rewards = rng.normal(size=(4, 3)).astype("float32")
    got = q_learning.targets(rewards, q, 0.9, target_q, double=double)
    if double:  # The online network picks, the target network values.
        best = q[:, 1:].argmax(-1)
        next_values = np.take_along_axis(target_q[:, 1:], best[..., None], 2)
        next_values = next_values[..., 0]
    else:
        next_values = target_q[:, 1:].max(-1)
    expected = rewards.copy()
    expected[:, :-1] += 0.9 * next_values
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Without a target network, Double DQN is the plain max.
    np.testing.assert_allclose(
        q_learning.targets(rewards, q, 0.9, double=True),
        q_learning.targets(rewards, q, 0.9),
    )
