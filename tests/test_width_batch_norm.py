"""Width-aware batch norm: statistics per input width, against NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import small_cnn
from helpers import spread_decisions

import keras_rnp
from keras_rnp.layers import WidthBatchNorm

L = keras.layers


def batch_norm(channels=6, momentum=0.9):
    layer = L.BatchNormalization(momentum=momentum, epsilon=1e-3)
    layer.build((None, 4, 4, channels))
    rng = np.random.default_rng(0)
    layer.set_weights(
        [
            rng.uniform(0.5, 1.5, channels),
            rng.uniform(-0.5, 0.5, channels),
            rng.normal(0, 0.1, channels),
            rng.uniform(0.5, 1.5, channels),
        ]
    )
    return layer


def test_training_normalizes_each_width_group_with_its_own_batch_statistics():
    bn = batch_norm()
    norm = WidthBatchNorm(groups=3, channels=6)
    rng = np.random.default_rng(1)
    y = rng.normal(size=(7, 4, 4, 6)).astype("float32")
    y[:3] += 2.0  # Width 1 images sit elsewhere than the others.
    width = np.array([1, 1, 1, 3, 3, 3, 3])
    gamma, beta, full_mean, full_var = (w.copy() for w in bn.get_weights())
    out = norm.normalize(tf.constant(y), bn, tf.constant(width), True)
    expected = np.empty_like(y)
    for w in (1, 3):
        group = y[width == w]
        mean, var = group.mean(axis=(0, 1, 2)), group.var(axis=(0, 1, 2))
        expected[width == w] = (group - mean) / np.sqrt(var + 1e-3)
        expected[width == w] = expected[width == w] * gamma + beta
        if w == 3:  # The full width's statistics are the batch norm's own.
            np.testing.assert_allclose(
                bn.moving_mean, 0.9 * full_mean + 0.1 * mean, rtol=1e-5
            )
            np.testing.assert_allclose(
                bn.moving_variance, 0.9 * full_var + 0.1 * var, rtol=1e-5
            )
        else:
            np.testing.assert_allclose(
                norm.moving_mean[0], 0.1 * mean, rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(
                norm.moving_variance[0], 0.9 + 0.1 * var, rtol=1e-5
            )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # Width 2 took no image: its statistics did not move.
    np.testing.assert_array_equal(norm.moving_mean[1], 0.0)
    np.testing.assert_array_equal(norm.moving_variance[1], 1.0)


def test_inference_uses_each_images_width_statistics():
    bn = batch_norm()
    norm = WidthBatchNorm(groups=2, channels=6)
    rng = np.random.default_rng(2)
    norm.moving_mean.assign(rng.normal(size=(1, 6)))
    norm.moving_variance.assign(rng.uniform(0.5, 2, (1, 6)))
    y = rng.normal(size=(2, 4, 4, 6)).astype("float32")
    out = norm.normalize(tf.constant(y), bn, tf.constant([1, 2]), False)
    gamma, beta, mean, var = bn.get_weights()
    narrow_mean, narrow_var = norm.moving_mean[0], norm.moving_variance[0]
    expected = [
        (y[0] - narrow_mean) / np.sqrt(narrow_var + 1e-3) * gamma + beta,
        (y[1] - mean) / np.sqrt(var + 1e-3) * gamma + beta,
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    scale, offset = norm.affine(bn, 1, 4)
    np.testing.assert_allclose(
        y[0, ..., :4] * scale + offset, expected[0][..., :4], atol=1e-5
    )


def width_aware_rnp(seed=0):
    rnp = keras_rnp.wrap(
        small_cnn(), groups=4, gate_first=True, width_aware_bn=True, seed=0
    )
    spread_decisions(rnp, seed)
    rng = np.random.default_rng(seed)
    for norm in rnp.width_norms:
        norm.moving_mean.assign(rng.normal(0, 0.3, norm.moving_mean.shape))
        norm.moving_variance.assign(
            rng.uniform(0.3, 2.0, norm.moving_variance.shape)
        )
    return rnp


def test_wrap_gives_every_gated_input_unit_per_width_statistics():
    rnp = width_aware_rnp()
    # gate_first: unit 0 reads the image (one width), units 1 and 2 read
    # gated units, each with one batch norm.
    assert [len(unit.width_norms) for unit in rnp.plan.units] == [0, 1, 1]
    assert len(rnp.width_norms) == 2
    assert rnp.width_norms[0].moving_mean.shape == (3, 16)


@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), 9])
def test_masked_equals_sliced_with_mixed_previous_actions(batch):
    rnp = width_aware_rnp()
    rng = np.random.default_rng(batch)
    x = rng.normal(size=(batch, 10, 10, 3)).astype("float32")
    actions = rng.integers(1, 5, size=(batch, 3))
    actions[0, 0] = 2  # At least one image reads a narrow input.
    masked, _, _ = rnp.forward(tf.constant(x), actions=tf.constant(actions))
    sliced = rnp.run(x, actions=actions)["logits"]
    np.testing.assert_allclose(sliced, masked, rtol=1e-4, atol=1e-4)
    # And the statistics matter: shared statistics give other logits.
    shared = keras_rnp.wrap(keras_rnp.strip(rnp), groups=4, gate_first=True)
    narrow = (actions[:, :2] < 4).any(axis=1)
    other = shared.run(x, actions=actions)["logits"].numpy()
    assert narrow.any()
    assert not np.allclose(other[narrow], sliced.numpy()[narrow], atol=1e-3)


def test_exports_fold_each_width_s_statistics(tmp_path):
    from helpers import onnx_outputs
    from helpers import onnx_session

    rnp = width_aware_rnp()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 10, 10, 3)).astype("float32")
    actions = rng.integers(1, 5, size=(9, 3)).astype("int32")
    want = rnp.run(x, actions=actions)
    path = keras_rnp.export_saved_model(rnp, tmp_path / "served")
    served = tf.saved_model.load(path).signatures["serving_actions"](
        images=tf.constant(x), forced_actions=tf.constant(actions)
    )
    np.testing.assert_allclose(
        served["logits"], want["logits"], rtol=1e-4, atol=1e-4
    )
    onnx_path = keras_rnp.export_onnx(
        rnp, tmp_path / "m.onnx", forced_actions=True
    )
    session = onnx_session(onnx_path)
    got = onnx_outputs(session, {"images": x, "forced_actions": actions})
    np.testing.assert_allclose(
        got["logits"], want["logits"], rtol=1e-4, atol=1e-4
    )
    # Uniform batches take ONNX's one-convolution branch, per-width
    # statistics applied there too.
    for a in (1, 2, 3):
        uniform = np.full((9, 3), a, np.int32)
        got = onnx_outputs(session, {"images": x, "forced_actions": uniform})
        np.testing.assert_allclose(
            got["logits"],
            rnp.run(x, actions=uniform)["logits"],
            rtol=1e-4,
            atol=1e-4,
        )


def test_litert_applies_each_width_s_statistics(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    rnp = width_aware_rnp()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 10, 10, 3)).astype("float32")
    actions = rng.integers(1, 5, size=(9, 3)).astype("int32")
    # Each image's statistics, applied after the prefixes' merge, in the
    # batch's order.
    litert = keras_rnp.export_litert(
        rnp, tmp_path / "m.tflite", forced_actions=True
    )
    for images, taken in [(x, actions), (x[:1], [[2, 1, 3]])]:
        taken = np.asarray(taken, np.int32)
        runner = Interpreter(model_path=litert).get_signature_runner(
            "serving_actions"
        )
        got = runner(images=images, forced_actions=taken)
        np.testing.assert_allclose(
            got["logits"],
            rnp.run(images, actions=taken)["logits"],
            rtol=1e-4,
            atol=1e-4,
        )


def test_save_load_keeps_the_width_statistics(tmp_path):
    rnp = width_aware_rnp()
    rnp.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.width_aware_bn
    for a, b in zip(rnp.width_norms, loaded.width_norms, strict=True):
        np.testing.assert_array_equal(a.moving_mean, b.moving_mean)
        np.testing.assert_array_equal(a.moving_variance, b.moving_variance)
    x = np.random.default_rng(6).normal(size=(4, 10, 10, 3)).astype("float32")
    actions = np.array([[1, 2, 3], [4, 1, 2], [2, 2, 2], [3, 4, 1]])
    np.testing.assert_allclose(
        loaded.run(x, actions=actions)["logits"],
        rnp.run(x, actions=actions)["logits"],
        atol=1e-6,
    )


def test_strip_returns_the_full_width_statistics():
    rnp = width_aware_rnp()
    plain = keras_rnp.strip(rnp)
    x = np.random.default_rng(7).normal(size=(3, 10, 10, 3)).astype("float32")
    np.testing.assert_allclose(
        plain(x), rnp.run(x, actions=4)["logits"], rtol=1e-4, atol=1e-4
    )


def test_training_updates_the_statistics_of_the_widths_taken():
    rnp = width_aware_rnp()
    before = [n.moving_mean.numpy().copy() for n in rnp.width_norms]
    x = np.random.default_rng(8).normal(size=(6, 10, 10, 3)).astype("float32")
    actions = tf.constant([[1, 1, 1]] * 3 + [[2, 2, 2]] * 3)
    rnp.forward(tf.constant(x), actions=actions, training=True)
    for norm, old in zip(rnp.width_norms, before, strict=True):
        now = norm.moving_mean.numpy()
        assert not np.allclose(now[:2], old[:2])  # widths 1 and 2 moved
        np.testing.assert_array_equal(now[2], old[2])  # width 3 did not


def test_rewrap_keeps_weights_and_statistics_and_resets_progress():
    rnp = width_aware_rnp()
    rnp.step_counter.assign(7)
    new = keras_rnp.rewrap(rnp, penalty=0.3, decision_steps=5)
    assert (new.penalty, new.decision_steps) == (0.3, 5)
    assert new.width_aware_bn and int(new.step_counter.numpy()) == 0
    x = np.random.default_rng(9).normal(size=(5, 10, 10, 3)).astype("float32")
    for name in ("logits", "actions", "q_values"):
        np.testing.assert_allclose(
            new.run(x)[name], rnp.run(x)[name], rtol=1e-6, atol=1e-6
        )
    assert new.backbone is not rnp.backbone
    with pytest.raises(ValueError, match="structure.*Received: groups"):
        keras_rnp.rewrap(rnp, groups=2)
    with pytest.raises(ValueError, match="Received: nonsense"):
        keras_rnp.rewrap(rnp, nonsense=1)


def test_rewrap_gives_the_target_network_the_trained_decision_weights():
    rnp = width_aware_rnp()  # spread_decisions changed the decision net.
    new = keras_rnp.rewrap(rnp, target_update_steps=10)
    for target, online in zip(
        new.target_decision.weights, rnp.decision.weights, strict=True
    ):
        np.testing.assert_array_equal(target.numpy(), online.numpy())


def test_per_width_gamma_and_beta_against_numpy():
    bn = batch_norm()
    norm = WidthBatchNorm(groups=3, channels=6, affine=True)
    norm.copy_affine_from(bn)
    gamma, beta, mean, var = bn.get_weights()
    # Copied from the batch norm: a new model computes what it did.
    np.testing.assert_allclose(norm.gamma, np.tile(gamma, (2, 1)))
    np.testing.assert_allclose(norm.beta, np.tile(beta, (2, 1)))
    rng = np.random.default_rng(3)
    norm.gamma.assign(rng.uniform(0.5, 1.5, (2, 6)))
    norm.beta.assign(rng.normal(0, 0.5, (2, 6)))
    norm.moving_mean.assign(rng.normal(size=(2, 6)))
    norm.moving_variance.assign(rng.uniform(0.5, 2, (2, 6)))
    y = rng.normal(size=(3, 4, 4, 6)).astype("float32")
    width = np.array([2, 3, 1])
    out = norm.normalize(tf.constant(y), bn, tf.constant(width), False)
    means = np.concatenate([norm.moving_mean.numpy(), mean[None]])
    variances = np.concatenate([norm.moving_variance.numpy(), var[None]])
    gammas = np.concatenate([norm.gamma.numpy(), gamma[None]])
    betas = np.concatenate([norm.beta.numpy(), beta[None]])
    expected = [
        (y[i] - means[w - 1]) / np.sqrt(variances[w - 1] + 1e-3) * gammas[w - 1]
        + betas[w - 1]
        for i, w in enumerate(width)
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    for i, w in enumerate(width):  # The sliced path's folded form.
        scale, offset = norm.affine(bn, int(w), 4)
        np.testing.assert_allclose(
            y[i, ..., :4] * scale + offset, expected[i][..., :4], atol=1e-5
        )


# Slow (the default run keeps to 15 minutes): about 30 s; per-width gamma and
# beta are checked against NumPy above.
@pytest.mark.slow
def test_per_width_affine_model_masked_sliced_exports_and_training(tmp_path):
    from helpers import onnx_outputs
    from helpers import onnx_session

    rnp = keras_rnp.wrap(
        small_cnn(),
        groups=4,
        gate_first=True,
        width_aware_bn=True,
        width_aware_affine=True,
        seed=0,
    )
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 10, 10, 3)).astype("float32")
    # Starts as the backbone: every width's gamma and beta are its own.
    np.testing.assert_allclose(
        rnp.run(x, actions=4)["logits"], rnp.backbone(x), atol=1e-5
    )
    for norm in rnp.width_norms:
        norm.gamma.assign(rng.uniform(0.5, 1.5, norm.gamma.shape))
        norm.beta.assign(rng.normal(0, 0.3, norm.beta.shape))
    actions = rng.integers(1, 5, size=(6, 3))
    actions[:, 0] = [1, 2, 3, 1, 2, 3]  # Narrow inputs to units 1 and 2.
    masked, _, _ = rnp.forward(tf.constant(x), actions=tf.constant(actions))
    sliced = rnp.run(x, actions=actions)["logits"]
    np.testing.assert_allclose(sliced, masked, rtol=1e-4, atol=1e-4)
    path = keras_rnp.export_onnx(rnp, tmp_path / "m.onnx", forced_actions=True)
    session = onnx_session(path)
    got = onnx_outputs(
        session, {"images": x, "forced_actions": actions.astype("int32")}
    )
    np.testing.assert_allclose(got["logits"], masked, rtol=1e-4, atol=1e-4)
    uniform = np.full((6, 3), 2, np.int32)  # The one-convolution branch.
    got = onnx_outputs(session, {"images": x, "forced_actions": uniform})
    np.testing.assert_allclose(
        got["logits"], rnp.run(x, actions=uniform)["logits"], atol=1e-4
    )
    # Saved and loaded with the rest; trainable, and trained by fit.
    rnp.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(
        loaded.run(x, actions=actions)["logits"], sliced, atol=1e-6
    )
    gammas = [norm.gamma.numpy() for norm in rnp.width_norms]
    trainable = {id(w) for w in rnp.trainable_weights}
    assert all(id(norm.gamma) in trainable for norm in rnp.width_norms)
    rnp = keras_rnp.rewrap(
        rnp, decision_steps=0, backbone_epsilon=1.0, sandwich_paths=1
    )
    rnp.compile(optimizer=keras.optimizers.SGD(0.1))
    rnp.fit(x, rng.integers(0, 5, 6), epochs=2, batch_size=6, verbose=0)
    moved = [
        not np.allclose(norm.gamma.numpy(), before)
        for norm, before in zip(rnp.width_norms, gammas, strict=True)
    ]
    assert all(moved)


def test_per_width_affine_needs_per_width_statistics():
    with pytest.raises(ValueError, match="needs width_aware_bn=True"):
        keras_rnp.wrap(small_cnn(), width_aware_affine=True)
