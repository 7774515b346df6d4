"""Bad input: clear errors, or documented results, never a crash."""

import helpers
import numpy as np
import pytest
import tensorflow as tf
from helpers import small_cnn
from helpers import spread_decisions

import keras_rnp

ZERO = np.zeros([1], np.float32)  # The ONNX model's budget input.


@pytest.fixture(scope="module")
def rnp():
    return spread_decisions(keras_rnp.wrap(small_cnn(), groups=4, seed=0))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).normal(size=(6, 10, 10, 3)).astype("f4")


@pytest.fixture(scope="module")
def serving(rnp, tmp_path_factory):
    path = keras_rnp.export_saved_model(
        rnp, tmp_path_factory.mktemp("serving") / "rnp"
    )
    return tf.saved_model.load(path).signatures


@pytest.fixture(scope="module")
def onnx_session(rnp, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "rnp.onnx"
    keras_rnp.export_onnx(rnp, path)
    return helpers.onnx_session(path)


def poisoned(images):
    """Image 1 has one NaN pixel, image 3 is all +Inf, image 4 has -Inf."""
    x = images.copy()
    x[1, 2, 3, 0] = np.nan
    x[3] = np.inf
    x[4, 0, 0, :] = -np.inf
    return x


BAD_SHAPES = [
    (np.zeros((2, 10, 10), "f4"), "images.shape=\\(2, 10, 10\\)"),
    (np.zeros((2, 12, 10, 3), "f4"), "images.shape=\\(2, 12, 10, 3\\)"),
    (np.zeros((2, 10, 10, 1), "f4"), "images.shape=\\(2, 10, 10, 1\\)"),
]


@pytest.mark.parametrize("x, received", BAD_SHAPES)
def test_call_and_predict_refuse_wrong_shapes(rnp, x, received):
    expected = "Expected images of shape \\(None, 10, 10, 3\\)"
    with pytest.raises(ValueError, match=f"{expected}. Received: {received}"):
        rnp(x)
    with pytest.raises(ValueError, match=f"{expected}. Received: {received}"):
        rnp.predict(x, verbose=0)


def test_call_and_predict_refuse_non_float_images(rnp):
    with pytest.raises(ValueError, match="Expected float images.*int32"):
        rnp.predict(np.zeros((2, 10, 10, 3), "int32"), verbose=0)
    with pytest.raises(ValueError, match="Expected float images.*uint8"):
        rnp(np.zeros((2, 10, 10, 3), "uint8"))


def test_empty_batch_gives_empty_outputs_everywhere(rnp, serving, onnx_session):
    empty = np.zeros((0, 10, 10, 3), "f4")
    assert rnp(empty).shape == (0, 5)
    assert rnp.predict(empty, verbose=0).shape == (0, 5)
    out = rnp.run(empty)
    assert out["actions"].shape == (0, 2) and out["flops"].shape == (0,)
    served = serving["serving_default"](images=tf.constant(empty))
    assert served["logits"].shape == (0, 5)
    assert served["actions"].shape == (0, 2)
    out = helpers.onnx_outputs(onnx_session, {"images": empty, "budget": ZERO})
    assert out["logits"].shape == (0, 5) and out["actions"].shape == (0, 2)


def test_batch_512_matches_small_batches(rnp):
    x = np.random.default_rng(2).normal(size=(512, 10, 10, 3)).astype("f4")
    # Per-image budgets spread the actions over the batch.
    budget = np.linspace(0.0, 3.0, 512)
    whole = rnp.run(x, budget=budget)
    parts = [
        rnp.run(x[i : i + 64], budget=budget[i : i + 64])
        for i in range(0, 512, 64)
    ]
    np.testing.assert_array_equal(
        whole["actions"].numpy(),
        np.concatenate([p["actions"].numpy() for p in parts]),
    )
    np.testing.assert_allclose(
        whole["logits"].numpy(),
        np.concatenate([p["logits"].numpy() for p in parts]),
        rtol=1e-4,
        atol=1e-5,
    )
    assert len(np.unique(whole["actions"].numpy(), axis=0)) > 1
    predicted = rnp.predict(x, batch_size=512, verbose=0)
    np.testing.assert_allclose(
        predicted, rnp.run(x)["logits"].numpy(), rtol=1e-4, atol=1e-5
    )


def test_exports_run_batches_of_1_and_512(rnp, serving, onnx_session):
    x = np.random.default_rng(3).normal(size=(512, 10, 10, 3)).astype("f4")
    want = rnp.run(x)
    for batch in (x[:1], x):
        n = len(batch)
        served = serving["serving_default"](images=tf.constant(batch))
        onnx = helpers.onnx_outputs(
            onnx_session, {"images": batch, "budget": ZERO}
        )
        for got in (served["actions"].numpy(), onnx["actions"]):
            np.testing.assert_array_equal(got, want["actions"].numpy()[:n])
        for got in (served["logits"].numpy(), onnx["logits"]):
            np.testing.assert_allclose(
                got, want["logits"].numpy()[:n], rtol=1e-4, atol=1e-5
            )


def check_non_finite_images(clean_actions, actions, logits, clean_logits):
    """Poisoned images take the full network; the others are unaffected."""
    assert actions.dtype == np.int32
    assert (actions >= 1).all() and (actions <= 4).all()
    np.testing.assert_array_equal(actions[[1, 3, 4]], 4)
    np.testing.assert_array_equal(actions[[0, 2, 5]], clean_actions[[0, 2, 5]])
    np.testing.assert_allclose(
        logits[[0, 2, 5]], clean_logits[[0, 2, 5]], rtol=1e-4, atol=1e-5
    )


def test_nan_and_inf_pixels_take_the_full_network(
    rnp, images, serving, onnx_session
):
    clean = rnp.run(images)
    clean_actions = clean["actions"].numpy()
    clean_logits = clean["logits"].numpy()
    # Some clean images take fewer groups: the rule is visible.
    assert (clean_actions[[1, 3, 4]] < 4).any()
    x = poisoned(images)
    out = rnp.run(x)
    check_non_finite_images(
        clean_actions,
        out["actions"].numpy(),
        out["logits"].numpy(),
        clean_logits,
    )
    served = serving["serving_default"](images=tf.constant(x))
    check_non_finite_images(
        clean_actions,
        served["actions"].numpy(),
        served["logits"].numpy(),
        clean_logits,
    )
    out = helpers.onnx_outputs(onnx_session, {"images": x, "budget": ZERO})
    check_non_finite_images(
        clean_actions, out["actions"], out["logits"], clean_logits
    )


def test_saved_model_refuses_bad_shapes_budgets_and_actions(
    rnp, images, serving
):
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match="Expected images of shape \\(None, 10, 10, 3\\)",
    ):
        serving["serving_default"](images=tf.zeros((2, 12, 10, 3)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="float.*int32"):
        serving["serving_default"](images=tf.zeros((2, 10, 10, 3), tf.int32))
    budget = serving["serving_budget"]
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(
            tf.errors.InvalidArgumentError, match="budget must be finite"
        ):
            budget(images=tf.constant(images), budget=tf.constant([bad]))
    forced = serving["serving_actions"]
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="forced_actions must be in 1..4"
    ):
        forced(
            images=tf.constant(images[:2]),
            forced_actions=tf.constant([[1, 5], [2, 2]]),
        )


def test_onnx_names_wrong_shapes_and_neutralizes_bad_budgets(
    rnp, images, onnx_session
):
    with pytest.raises(Exception, match="(?s)images.*Got: 12 Expected: 10"):
        onnx_session.run(
            None, {"images": np.zeros((2, 12, 10, 3), "f4"), "budget": ZERO}
        )
    with pytest.raises(Exception, match="(?i)type.*tensor\\(float\\)"):
        onnx_session.run(
            None, {"images": np.zeros((2, 10, 10, 3), "f8"), "budget": ZERO}
        )
    zero = helpers.onnx_outputs(
        onnx_session, {"images": images, "budget": ZERO}
    )["actions"]
    large = helpers.onnx_outputs(
        onnx_session, {"images": images, "budget": np.array([9.0], "f4")}
    )["actions"]
    assert (large < zero).any()
    for bad in (-1.0, np.nan, -np.inf):
        feeds = {"images": images, "budget": np.array([bad], "f4")}
        np.testing.assert_array_equal(
            helpers.onnx_outputs(onnx_session, feeds)["actions"], zero
        )
