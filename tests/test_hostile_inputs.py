"""Hostile inputs (hypothesis) to run(), the SavedModel and ONNX: every
input gets a clean error or the documented behaviour, and the process
never crashes."""

import helpers
import hypothesis.strategies as st
import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf
from helpers import small_cnn
from helpers import spread_decisions
from hypothesis import HealthCheck
from hypothesis import event
from hypothesis import given
from hypothesis import settings

import keras_rnp

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    max_examples=40,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
SHAPE, STEPS, GROUPS = (10, 10, 3), 2, 4


@pytest.fixture(scope="module")
def rnp():
    return spread_decisions(keras_rnp.wrap(small_cnn(), groups=GROUPS, seed=0))


@pytest.fixture(scope="module")
def serving(rnp, tmp_path_factory):
    path = keras_rnp.export_saved_model(
        rnp, tmp_path_factory.mktemp("serving") / "rnp"
    )
    return tf.saved_model.load(path).signatures


@pytest.fixture(scope="module")
def onnx_sessions(rnp, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    keras_rnp.export_onnx(rnp, folder / "budget.onnx")
    keras_rnp.export_onnx(rnp, folder / "forced.onnx", forced_actions=True)
    return {
        "budget": helpers.onnx_session(folder / "budget.onnx"),
        "forced_actions": helpers.onnx_session(folder / "forced.onnx"),
    }


@st.composite
def requests(draw):
    """A request with one thing wrong, or none: images of another dtype or
    shape, pixels that are NaN, Inf or huge, budgets of any sign and size,
    forced actions out of range or of the wrong shape."""
    wrong = draw(
        st.sampled_from(["nothing", "shape", "dtype", "argument", "pixels"])
    )
    batch = draw(st.integers(0, 3))
    shape = (batch, *SHAPE)
    if wrong == "shape":
        shape = draw(
            st.sampled_from(
                [
                    (batch, 12, 10, 3),
                    (batch, 10, 10, 1),
                    (batch, 10, 10),
                    (batch, 1, *SHAPE),
                ]
            )
        )
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    images = rng.normal(size=shape)
    if wrong == "pixels" and images.size:
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
        images.flat[rng.integers(0, images.size)] = value
    dtype = "float32"
    if wrong == "dtype":
        dtype = draw(st.sampled_from(["float64", "int32", "float16"]))
    images = images.astype(dtype)
    bad = wrong == "argument"
    if draw(st.booleans()):
        size = draw(st.sampled_from([1, batch, batch + 1] if bad else [1]))
        good = [0.0, 0.5, 1e9]
        values = st.sampled_from(good + ([-1.0, np.nan, np.inf] if bad else []))
        budget = np.array([draw(values) for _ in range(size)], "float32")
        return {"images": images, "budget": budget}
    columns = draw(st.sampled_from([STEPS, STEPS + 1])) if bad else STEPS
    low, high = (-2, GROUPS + 3) if bad else (1, GROUPS + 1)
    actions = rng.integers(low, high, size=(batch, columns))
    return {"images": images, "forced_actions": actions.astype("int32")}


def valid(request, exported=True):
    """Whether the request is one the documentation answers (not refuses).
    The exports take float32 images and a budget for the batch (`[1]`) or
    per image; `run()` takes any float images and a number or one budget
    per image."""
    images = request["images"]
    if exported:
        float_images = images.dtype == np.float32
    else:
        float_images = np.issubdtype(images.dtype, np.floating)
    if not float_images or images.shape[1:] != SHAPE:
        return False
    batch = len(images)
    if "budget" in request:
        budget = request["budget"]
        sizes = (1, batch) if exported else (batch,)
        return len(budget) in sizes and bool(
            np.all(np.isfinite(budget) & (budget >= 0))
        )
    actions = request["forced_actions"]
    return actions.shape == (batch, STEPS) and bool(
        np.all((actions >= 1) & (actions <= GROUPS))
    )


def check_outputs(out, request):
    """The documented outputs: one row per image, actions in 1..groups,
    positive finite FLOPs; images with non-finite pixels take the full
    network unless the actions are forced."""
    batch = len(request["images"])
    actions, flops = np.asarray(out["actions"]), np.asarray(out["flops"])
    assert actions.shape == (batch, STEPS)
    assert np.all((actions >= 1) & (actions <= GROUPS))
    assert flops.shape == (batch,) and np.all(np.isfinite(flops) & (flops > 0))
    assert np.asarray(out["logits"]).shape == (batch, 5)
    if "budget" in request:
        finite = np.all(np.isfinite(request["images"]), axis=(1, 2, 3))
        assert np.all(actions[~finite] == GROUPS)
    else:
        want = np.clip(request["forced_actions"], 1, GROUPS)
        np.testing.assert_array_equal(actions, want)


@settings(**SETTINGS)
@given(request=requests())
def test_run_answers_or_refuses_in_one_clear_error(rnp, request):
    if "budget" in request:
        kwargs = {"budget": request["budget"]}
    else:
        kwargs = {"actions": request["forced_actions"]}
    try:
        out = rnp.run(request["images"], **kwargs)
    except ValueError as error:
        event("run: refused")
        message = str(error)
        assert "Expected" in message or "must" in message, message
        assert not valid(request, exported=False), message
        return
    event("run: answered")
    assert valid(request, exported=False)
    check_outputs(out, request)


@settings(**SETTINGS)
@given(request=requests())
def test_saved_model_answers_or_refuses_cleanly(serving, request):
    name = "serving_budget" if "budget" in request else "serving_actions"
    try:
        out = serving[name](**{k: tf.constant(v) for k, v in request.items()})
    except (tf.errors.InvalidArgumentError, TypeError, ValueError) as error:
        event("SavedModel: refused")
        assert not valid(request), str(error)[:500]
        return
    event("SavedModel: answered")
    assert valid(request) or len(request["images"]) == 0
    check_outputs(out, request)


@settings(**SETTINGS)
@given(request=requests())
def test_onnx_answers_or_refuses_cleanly(onnx_sessions, request):
    key = "budget" if "budget" in request else "forced_actions"
    try:
        out = helpers.onnx_outputs(onnx_sessions[key], request)
    except (
        ort.capi.onnxruntime_pybind11_state.InvalidArgument,
        ort.capi.onnxruntime_pybind11_state.Fail,
        ort.capi.onnxruntime_pybind11_state.RuntimeException,
    ) as error:
        event("ONNX: refused")
        images = request["images"]
        assert (
            images.dtype != np.float32
            or images.shape[1:] != SHAPE
            or request.get("forced_actions", np.zeros((0, STEPS))).shape[1]
            != STEPS
            or len(request.get("budget", [0])) not in (1, len(images))
        ), str(error)[:500]
        return
    # ONNX cannot raise: bad budgets count as 0 and actions are clipped.
    event("ONNX: answered")
    check_outputs(out, request)
