"""RNPModel inference: exactness, masking, decisions, budget, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import np_small_cnn
from helpers import small_cnn
from helpers import spread_decisions

import keras_rnp
from keras_rnp import execution


@pytest.fixture(scope="module")
def backbone():
    return small_cnn()


@pytest.fixture(scope="module")
def rnp(backbone):
    return keras_rnp.wrap(backbone, groups=4, seed=3)


@pytest.fixture(scope="module")
def images():
    return (
        np.random.default_rng(0).normal(size=(6, 10, 10, 3)).astype("float32")
    )


def test_full_actions_equal_backbone(rnp, backbone, images):
    out = rnp.run(images, actions=4)
    np.testing.assert_allclose(
        out["logits"], backbone(images), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(out["actions"], 4)


@pytest.mark.parametrize(
    "mode",
    [
        execution.SLICED,
        execution.MASKED,
        execution.SLICED_BLOCKS,
        execution.SLICED_PREFIXES,
    ],
)
def test_forced_per_image_actions_match_numpy_reference(rnp, images, mode):
    # sliced: the inference path (smaller convolutions on the active
    # channels); masked: the training path (full convolutions, zeroed);
    # blocks and prefixes: LiteRT's graphs, run here in TensorFlow.
    # (SLICED_ONNX is for tf2onnx: test_export checks it in onnxruntime.)
    actions = np.array([[1, 1], [1, 4], [2, 3], [3, 2], [4, 1], [4, 4]])
    logits, taken, _ = rnp.forward(
        tf.constant(images), actions=tf.constant(actions), mode=mode
    )
    expected = np_small_cnn(
        rnp.backbone, images.astype("float64"), actions, groups=4
    )
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(taken, actions)


@pytest.mark.parametrize("batch", [1, 2, 33])
def test_sliced_inference_equals_masked_with_empty_groups(rnp, batch):
    # Most (previous action, action) groups are empty at these sizes.
    rng = np.random.default_rng(batch)
    x = rng.normal(size=(batch, 10, 10, 3)).astype("float32")
    actions = rng.integers(1, 5, size=(batch, 2))
    out = rnp.run(x, actions=actions)
    masked, _, _ = rnp.forward(tf.constant(x), actions=tf.constant(actions))
    np.testing.assert_allclose(out["logits"], masked, rtol=1e-5, atol=1e-5)
    assert out["logits"].shape == (batch, 5)


def test_uniform_layers_pass_on_active_channels_mixed_ones_pad():
    # In the sliced inference a layer whose images all took one action
    # hands the next layer only its active channels; a mixed one pads its
    # groups back to full width. Every transition between the two, forced,
    # against the masked forward pass.
    rnp = keras_rnp.wrap(small_cnn(), groups=4, gate_first=True, seed=1)
    rnp = spread_decisions(rnp, seed=2)
    assert rnp.num_gated_layers == 3
    x = np.random.default_rng(5).normal(size=(3, 10, 10, 3)).astype("float32")
    patterns = [
        [[2, 2, 2]] * 3,  # uniform throughout
        [[2, 1, 3], [2, 4, 3], [2, 1, 3]],  # uniform, mixed, mixed
        [[1, 2, 2], [3, 2, 2], [4, 2, 2]],  # mixed, mixed, uniform
        [[3, 3, 1], [3, 3, 4], [3, 3, 2]],  # uniform, uniform, mixed
    ]
    for actions in np.array(patterns):
        out = rnp.run(x, actions=actions)
        masked, _, _ = rnp.forward(tf.constant(x), actions=actions)
        np.testing.assert_allclose(out["logits"], masked, rtol=1e-5, atol=1e-5)
    # Deciding at batch 1, where every layer is uniform: the decision
    # network reads a narrow feature map as the full one, its skipped
    # channels zero.
    for image in x:
        out = rnp.run(image[None])
        masked, taken, q_values = rnp.forward(tf.constant(image[None]))
        np.testing.assert_array_equal(out["actions"], taken)
        np.testing.assert_allclose(out["q_values"], q_values, atol=1e-5)
        np.testing.assert_allclose(out["logits"], masked, atol=1e-5)


def test_empty_batch_gives_empty_outputs(rnp):
    out = rnp.run(np.zeros((0, 10, 10, 3), "float32"))
    assert out["logits"].shape == (0, 5)
    assert out["actions"].shape == (0, 2)
    assert out["flops"].shape == (0,)


def test_skipped_channels_are_exactly_zero_after_bn_and_activation(rnp, images):
    # Unit 0 is conv -> batch norm (beta > 0) -> relu -> max pool; without
    # the mask, batch norm's beta would make skipped channels positive.
    unit = rnp.plan.units[0]
    x = rnp.plan.pre[2](rnp.plan.pre[1](rnp.plan.pre[0](images)))
    actions = tf.constant([1, 2, 3, 4, 1, 2])
    y = unit.call_masked(x, actions).numpy()
    assert y.shape == (6, 5, 5, 16)
    for image, a in enumerate(actions.numpy()):
        assert np.all(y[image, ..., 4 * a :] == 0.0)
        assert np.any(y[image, ..., : 4 * a] != 0.0)


def test_call_and_predict_follow_greedy_decisions(rnp, images):
    out = rnp.run(images)
    np.testing.assert_allclose(rnp(images), out["logits"], rtol=1e-6)
    np.testing.assert_allclose(
        rnp.predict(images, verbose=0), out["logits"], rtol=1e-5, atol=1e-6
    )
    q = out["q_values"].numpy()
    np.testing.assert_array_equal(out["actions"], q.argmax(-1) + 1)
    assert out["actions"].dtype == tf.int32
    assert out["flops"].shape == (6,)


def test_budget_moves_the_trade_off_monotonically(rnp, images):
    # cost_t(a) = a - 1 grows with a, so a larger budget can only choose
    # fewer groups.
    previous = None
    for budget in [0.0, 0.05, 0.2, 1.0, 10.0, 1e6]:
        actions = rnp.run(images, budget=budget)["actions"].numpy()
        if previous is not None:
            assert np.all(actions <= previous)
        previous = actions
    np.testing.assert_array_equal(previous, 1)


def test_budget_per_image(rnp, images):
    budgets = np.array([0, 0, 0, 1e6, 1e6, 1e6], "float32")
    out = rnp.run(images, budget=budgets)
    greedy = rnp.run(images)["actions"].numpy()
    np.testing.assert_array_equal(out["actions"][:3], greedy[:3])
    np.testing.assert_array_equal(out["actions"][3:], 1)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (
            {"images": np.zeros((2, 10, 10), "float32")},
            "Expected images of shape \\(None, 10, 10, 3\\). Received: "
            "images.shape=\\(2, 10, 10\\)",
        ),
        (
            {"images": np.zeros((2, 10, 12, 3), "float32")},
            "Received: images.shape=\\(2, 10, 12, 3\\)",
        ),
        (
            {"images": np.zeros((2, 10, 10, 3), "int32")},
            "Expected float images. Received: images.dtype=int32",
        ),
        (
            {"actions": 5},
            "Expected actions in 1..4. Received: actions from 5 to 5",
        ),
        (
            {"actions": np.ones((2, 3), "int32")},
            "shape \\(2, 2\\). Received: actions with shape \\(2, 3\\)",
        ),
        ({"actions": np.ones((2, 2), "float32")}, "int array.*dtype float32"),
        ({"budget": -1.0}, "budget must be finite and >= 0"),
        ({"budget": float("nan")}, "budget must be finite and >= 0"),
        (
            {"budget": [0.0, 1.0, 2.0]},
            "one number per image \\(2\\). "
            "Received: budget with shape \\(3,\\)",
        ),
    ],
)
def test_run_refuses_bad_input(rnp, kwargs, pattern):
    kwargs = {"images": np.zeros((2, 10, 10, 3), "float32"), **kwargs}
    with pytest.raises(ValueError, match=pattern):
        rnp.run(**kwargs)


def test_flops_are_the_cost_of_the_actions_taken(rnp, images):
    out = rnp.run(images)
    np.testing.assert_allclose(
        out["flops"], rnp.flops_from_actions(out["actions"]), rtol=1e-6
    )
    assert np.all(out["flops"] <= rnp.full_flops + rnp.decision_flops)


def test_epsilon_schedule():
    values = [
        float(keras_rnp.linearly_decaying_epsilon(step, 10, 1.0, 0.1))
        for step in [0, 5, 10, 20]
    ]
    np.testing.assert_allclose(values, [1.0, 0.55, 0.1, 0.1], rtol=1e-6)
    assert float(keras_rnp.linearly_decaying_epsilon(7, 0, 1.0, 0.2)) == (
        pytest.approx(0.2)
    )


def test_wrapped_model_runs_in_a_keras_functional_graph(rnp):
    inputs = keras.Input((10, 10, 3))
    outer = keras.Model(inputs, rnp(inputs))
    x = np.ones((2, 10, 10, 3), "float32")
    np.testing.assert_allclose(outer(x), rnp(x), rtol=1e-6)
