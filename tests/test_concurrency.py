"""Exported models shared by threads answer as they do one call at a time
(the small version of benchmarks/concurrency.py)."""

import concurrent.futures

import helpers
import numpy as np
import pytest
import tensorflow as tf
from helpers import small_cnn
from helpers import spread_decisions

import keras_rnp

THREADS, PER_THREAD = 4, 15


@pytest.fixture(scope="module")
def rnp():
    return spread_decisions(keras_rnp.wrap(small_cnn(), groups=4, seed=0))


@pytest.fixture(scope="module")
def requests(rnp):
    """Mixed batch sizes, budgets per image, forced actions."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(20):
        batch = int(rng.integers(1, 10))
        request = {"images": rng.normal(size=(batch, 10, 10, 3))}
        request["images"] = request["images"].astype("float32")
        if i % 2:
            request["budget"] = rng.choice([0.0, 0.3, 2.0], batch)
            request["budget"] = request["budget"].astype("float32")
        else:
            actions = rng.integers(1, 5, (batch, rnp.num_gated_layers))
            request["forced_actions"] = actions.astype("int32")
        out.append(request)
    return out


def check_under_threads(call, requests):
    reference = [call(request) for request in requests]
    # The decisions differ across the requests: parity means something.
    assert len({tuple(r["actions"][0]) for r in reference}) > 2

    def worker(t):
        # Thread t takes requests t, t + THREADS, ... (wrapping around).
        indices = [(t + j * THREADS) % len(requests) for j in range(PER_THREAD)]
        return [(index, call(requests[index])) for index in indices]

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        answers = [
            pair for part in pool.map(worker, range(THREADS)) for pair in part
        ]
    assert len(answers) == THREADS * PER_THREAD
    for index, answer in answers:
        want = reference[index]
        np.testing.assert_array_equal(answer["actions"], want["actions"])
        np.testing.assert_allclose(
            answer["logits"], want["logits"], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(answer["flops"], want["flops"], rtol=1e-6)


def test_saved_model_shared_by_threads(rnp, requests, tmp_path):
    loaded = tf.saved_model.load(
        keras_rnp.export_saved_model(rnp, tmp_path / "serving")
    )

    def call(request):
        name = "serving_budget" if "budget" in request else "serving_actions"
        out = loaded.signatures[name](
            **{k: tf.constant(v) for k, v in request.items()}
        )
        return {k: v.numpy() for k, v in out.items()}

    check_under_threads(call, requests)


# Slow (the default run keeps to 15 minutes): the SavedModel's case stays.
@pytest.mark.slow
def test_onnx_session_shared_by_threads(rnp, requests, tmp_path):
    sessions = {}
    for key, forced in (("budget", False), ("forced_actions", True)):
        path = tmp_path / f"{key}.onnx"
        keras_rnp.export_onnx(rnp, path, forced_actions=forced)
        sessions[key] = helpers.onnx_session(path)

    def call(request):
        key = "budget" if "budget" in request else "forced_actions"
        return helpers.onnx_outputs(sessions[key], request)

    check_under_threads(call, requests)
