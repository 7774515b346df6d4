"""keras_rnp.report and rank_correlation against hand computations."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import small_cnn
from scipy import stats

import keras_rnp


def make_rnp():
    return keras_rnp.wrap(small_cnn(), groups=4, seed=0)


def batches(x, y=None, size=7):
    data = x if y is None else (x, y)
    return tf.data.Dataset.from_tensor_slices(data).batch(size)


def test_report_is_consistent_with_the_actions_taken():
    rnp = make_rnp()
    rng = np.random.default_rng(0)
    # Images of very different contrast and a decision network with large
    # random weights: images take different paths.
    scale = rng.uniform(0.0, 20.0, (20, 1, 1, 1))
    x = (rng.normal(size=(20, 10, 10, 3)) * scale).astype("float32")
    y = rng.integers(0, 5, 20)
    for weight in rnp.decision.trainable_weights:
        weight.assign(3 * rng.normal(size=weight.shape).astype("float32"))
    printed = []
    rep = keras_rnp.report(rnp, batches(x, y), print_fn=printed.append)

    out = rnp.run(x)
    actions = out["actions"].numpy()
    np.testing.assert_array_equal(rep.actions, actions)
    assert len(np.unique(actions, axis=0)) > 1
    np.testing.assert_allclose(rep.flops, out["flops"].numpy(), rtol=1e-6)
    logits = out["logits"].numpy()
    np.testing.assert_array_equal(rep.predictions, logits.argmax(1))
    assert rep.accuracy == pytest.approx(np.mean(logits.argmax(1) == y))
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    np.testing.assert_allclose(
        rep.losses, -log_probs[np.arange(20), y], rtol=1e-5
    )

    # Per layer: counts are the histogram of the actions, FLOPs the hand
    # formula, and the layers plus the rest add up to the total.
    first, second = rep.layers
    for t, row in enumerate(rep.layers):
        np.testing.assert_array_equal(
            row["action_counts"], np.bincount(actions[:, t] - 1, minlength=4)
        )
        assert sum(row["action_share"]) == pytest.approx(1.0)
        assert row["mean_action"] == pytest.approx(actions[:, t].mean())
    # Unit 1: conv 8->16 at 10x10 (ungated input), unit 2: conv 16->12 at
    # 3x3 (stride 2 after pooling), input gated by unit 1.
    conv1 = 2 * 100 * 9 * 8 * 16 * actions[:, 0] / 4
    conv2 = 2 * 9 * 9 * 16 * 12 * (actions[:, 0] / 4) * (actions[:, 1] / 4)
    assert first["mean_flops"] == pytest.approx(conv1.mean())
    assert second["mean_flops"] == pytest.approx(conv2.mean())
    assert rep.other_flops + conv1.mean() + conv2.mean() == pytest.approx(
        rep.mean_flops
    )
    assert first["flops_share"] == pytest.approx(conv1.mean() / rep.mean_flops)
    assert rep.flops_ratio == pytest.approx(rep.mean_flops / rnp.full_flops)
    assert rep.flops_spread == pytest.approx(np.std(rep.flops / rnp.full_flops))
    assert printed == [rep.table()]
    assert "conv2d_1" in printed[0] or first["layer"] in printed[0]
    summary = rep.summary()
    assert summary["images"] == 20 and summary["layers"] == rep.layers


def test_report_takes_images_without_labels_and_a_budget():
    rnp = make_rnp()
    x = np.random.default_rng(1).normal(size=(9, 10, 10, 3)).astype("float32")
    rep = keras_rnp.report(rnp, batches(x), budget=1e6, print_fn=None)
    assert rep.labels is None and rep.accuracy is None and rep.losses is None
    np.testing.assert_array_equal(rep.actions, np.ones((9, 2)))
    assert "accuracy -" in rep.table()


def test_report_refuses_bad_input():
    with pytest.raises(TypeError, match="RNPModel"):
        keras_rnp.report(small_cnn(), [])
    with pytest.raises(ValueError, match="empty dataset"):
        keras_rnp.report(make_rnp(), [], print_fn=None)


def test_rank_correlation_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 4, 60).astype(float)  # FLOPs take few values.
        b = rng.normal(size=60)
        assert keras_rnp.rank_correlation(a, b) == pytest.approx(
            stats.spearmanr(a, b).statistic, abs=1e-12
        )
    assert keras_rnp.rank_correlation([1, 2, 3], [10, 20, 35]) == 1.0
    assert keras_rnp.rank_correlation([1, 2, 3], [3, 2, 1]) == -1.0
    assert keras_rnp.rank_correlation([2, 2, 2], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError, match="1-D arrays"):
        keras_rnp.rank_correlation([1, 2], [1, 2, 3])


def test_report_takes_what_evaluate_and_predict_take():
    rnp = keras_rnp.wrap(small_cnn(), groups=4, seed=0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 10, 10, 3)).astype("float32")
    y = rng.integers(0, 5, size=7)
    reference = keras_rnp.report(
        rnp, tf.data.Dataset.from_tensor_slices((x, y)).batch(3), print_fn=None
    )
    pair = keras_rnp.report(rnp, (x, y), batch_size=2, print_fn=None)
    images = keras_rnp.report(rnp, x, print_fn=None)
    np.testing.assert_array_equal(pair.actions, reference.actions)
    np.testing.assert_allclose(pair.losses, reference.losses, rtol=1e-5)
    np.testing.assert_allclose(images.flops, reference.flops)
    assert pair.accuracy == reference.accuracy and images.labels is None
    with pytest.raises(ValueError, match="as many labels as images"):
        keras_rnp.report(rnp, (x, y[:3]), print_fn=None)
    with pytest.raises(ValueError, match="Received: an array of shape"):
        keras_rnp.report(rnp, x[0], print_fn=None)


def test_run_refuses_datasets_and_pairs_in_one_line():
    rnp = keras_rnp.wrap(small_cnn(), groups=4, seed=0)
    x = np.zeros((2, 10, 10, 3), "float32")
    for bad in (tf.data.Dataset.from_tensor_slices(x), (x, np.zeros(2))):
        with pytest.raises(ValueError, match="keras_rnp.report"):
            rnp.run(bad)
