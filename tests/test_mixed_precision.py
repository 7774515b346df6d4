"""Mixed precision: compute in float16 or bfloat16, variables, Q-values
and FLOPs in float32, in Keras, training and both exports."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import onnx_outputs
from helpers import onnx_session
from helpers import small_cnn
from helpers import spread_decisions

import keras_rnp

# bfloat16 runs in the slow suite (make test-slow), to keep the default
# run short; float16 covers the same code paths.
POLICIES = [
    "mixed_float16",
    pytest.param("mixed_bfloat16", marks=pytest.mark.slow),
]
# Half precision keeps about 3 (float16) or 2 (bfloat16) decimal digits.
TOLERANCE = {"mixed_float16": 2e-2, "mixed_bfloat16": 1e-1}


@pytest.fixture(params=POLICIES)
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def models(policy):
    """The same weights twice: wrapped under `policy`, and in float32."""
    keras.mixed_precision.set_global_policy("float32")
    reference = keras_rnp.wrap(small_cnn(), groups=4, seed=0)
    spread_decisions(reference)
    keras.mixed_precision.set_global_policy(policy)
    rnp = keras_rnp.wrap(small_cnn(), groups=4, seed=0)
    rnp.set_weights(reference.get_weights())
    return rnp, reference


def images(batch=9, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, 10, 10, 3)).astype("float32")


def test_inference_computes_in_half_precision_with_float32_outputs(policy):
    rnp, reference = models(policy)
    assert rnp.compute_dtype == policy.split("_")[1]
    assert all(v.dtype == "float32" for v in rnp.trainable_variables)
    x = images()
    actions = np.random.default_rng(1).integers(1, 5, size=(9, 2))
    out = rnp.run(x, actions=actions)
    want = reference.run(x, actions=actions)
    assert out["logits"].dtype == tf.float32
    assert out["q_values"].dtype == out["flops"].dtype == tf.float32
    tolerance = TOLERANCE[policy]
    np.testing.assert_allclose(
        out["logits"], want["logits"], rtol=tolerance, atol=tolerance
    )
    np.testing.assert_array_equal(out["flops"], want["flops"])
    masked, _, _ = rnp.forward(tf.constant(x), actions=tf.constant(actions))
    np.testing.assert_allclose(
        out["logits"], masked, rtol=tolerance, atol=tolerance
    )
    np.testing.assert_allclose(
        rnp.predict(x, verbose=0), rnp.run(x)["logits"], atol=tolerance
    )


def test_training_updates_both_networks_with_finite_losses(policy):
    rnp, _ = models(policy)
    rnp.compile(
        optimizer=keras.optimizers.SGD(0.05),
        decision_optimizer=keras.optimizers.SGD(0.05),
    )
    assert isinstance(
        rnp.decision_optimizer, keras.optimizers.LossScaleOptimizer
    ) == (policy == "mixed_float16")
    backbone = [v.numpy().copy() for v in rnp.backbone.trainable_variables]
    decision = [v.numpy().copy() for v in rnp.decision.trainable_variables]
    rnp.decision_steps = rnp.backbone_steps = 1
    x, y = images(16), np.arange(16) % 5
    logs = rnp.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite([logs["loss"][0], logs["q_loss"][0]]).all()
    for before, variables in (
        (backbone, rnp.backbone.trainable_variables),
        (decision, rnp.decision.trainable_variables),
    ):
        assert any(
            not np.array_equal(b, v.numpy())
            for b, v in zip(before, variables, strict=True)
        )
    assert rnp.evaluate(x, y, verbose=0, return_dict=True)["loss"] > 0


def test_exports_match_keras(policy, tmp_path):
    rnp, _ = models(policy)
    x = images()
    want = rnp.run(x)
    path = keras_rnp.export_saved_model(rnp, tmp_path / "served")
    served = tf.saved_model.load(path).signatures["serving_default"](
        images=tf.constant(x)
    )
    np.testing.assert_array_equal(served["actions"], want["actions"])
    np.testing.assert_allclose(served["logits"], want["logits"], atol=1e-3)
    if policy == "mixed_bfloat16":
        with pytest.raises(ValueError, match="no bfloat16 convolution"):
            keras_rnp.export_onnx(rnp, tmp_path / "m.onnx")
        assert not (tmp_path / "m.onnx").exists()
        return
    onnx_path = keras_rnp.export_onnx(rnp, tmp_path / "m.onnx")
    got = onnx_outputs(
        onnx_session(onnx_path), {"images": x, "budget": np.zeros([1], "f4")}
    )
    np.testing.assert_array_equal(got["actions"], want["actions"])
    tolerance = TOLERANCE[policy]
    np.testing.assert_allclose(
        got["logits"], want["logits"], rtol=tolerance, atol=tolerance
    )
    # One image: ONNX's one-convolution branch, in the policy's dtype.
    got = onnx_outputs(
        onnx_session(onnx_path),
        {"images": x[:1], "budget": np.zeros([1], "f4")},
    )
    np.testing.assert_allclose(
        got["logits"],
        rnp.run(x[:1])["logits"],
        rtol=tolerance,
        atol=tolerance,
    )


def test_head_ending_in_a_float32_layer(policy):
    # The usual mixed-precision recipe: the last activation in float32.
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(4),
            layers.Activation("softmax", dtype="float32"),
        ]
    )
    rnp = keras_rnp.wrap(model, groups=2, seed=0)
    x = images(5)[:, :8, :8]
    actions = np.array([[1], [2], [1], [2], [2]])
    out = rnp.run(x, actions=actions)["logits"]
    assert out.dtype == tf.float32
    np.testing.assert_allclose(np.sum(out, axis=-1), 1.0, atol=1e-2)
    np.testing.assert_allclose(
        rnp.run(x, actions=2)["logits"], model(x), atol=TOLERANCE[policy]
    )
