"""keras_rnp.evaluation against hand computations."""

import numpy as np
import pytest
from helpers import small_cnn

import keras_rnp
from keras_rnp import evaluation


def test_accuracy_counts_the_largest_output():
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5], [1.0, 0.0]])
    assert evaluation.accuracy(logits, [1, 0, 0, 1]) == 0.5
    assert isinstance(evaluation.accuracy(logits, [1, 0, 1, 0]), float)
    with pytest.raises(ValueError, match=r"Received: logits.shape=\(4, 2\)"):
        evaluation.accuracy(logits, [1, 0, 1])


def test_per_image_losses_are_the_cross_entropy_of_each_image():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype("float32")
    labels = np.array([0, 3, 1, 1, 2, 0])
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    expected = -log_probs[np.arange(6), labels]
    losses = evaluation.per_image_losses(labels, logits)
    assert losses.shape == (6,) and losses.dtype == np.float32
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    probabilities = np.exp(log_probs)
    np.testing.assert_allclose(
        evaluation.per_image_losses(labels, probabilities, from_logits=False),
        expected,
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="labels of shape"):
        evaluation.per_image_losses(labels[:, None], logits)


def test_flops_ratio_and_spread():
    ratio, spread = evaluation.flops_ratio_and_spread([50.0, 100.0], 200)
    assert ratio == 0.375 and spread == 0.125
    assert evaluation.flops_ratio_and_spread(np.full(3, 4.0), 8.0) == (
        0.5,
        0.0,
    )
    with pytest.raises(ValueError, match="Received: full_flops=0"):
        evaluation.flops_ratio_and_spread([1.0], 0)
    with pytest.raises(ValueError, match=r"Received: flops.shape=\(0,\)"):
        evaluation.flops_ratio_and_spread([], 1.0)


def row(ratio, accuracy, penalty=0.1, budget=0.0):
    return {
        "flops_ratio": ratio,
        "accuracy": accuracy,
        "penalty": penalty,
        "budget": budget,
    }


def test_interpolate_accuracy_reads_between_rows():
    rows = [row(0.2, 0.8), row(0.5, 0.89), row(0.8, 0.9)]
    assert evaluation.interpolate_accuracy(rows, 0.5) == pytest.approx(0.89)
    assert evaluation.interpolate_accuracy(rows, 0.35) == pytest.approx(0.845)
    assert evaluation.interpolate_accuracy(rows, 0.1) is None
    assert evaluation.interpolate_accuracy(rows, 0.9) is None
    assert evaluation.interpolate_accuracy([], 0.5) is None
    with pytest.raises(ValueError, match="'flops_ratio', 'accuracy'"):
        evaluation.interpolate_accuracy([{"accuracy": 0.5}], 0.5)


def test_rnp_is_compared_at_the_static_models_flops():
    results = {
        "full": {"accuracy": 0.90},
        "rnp": [row(0.8, 0.895, penalty=0.05), row(0.4, 0.85, penalty=0.2)],
        "sweep": [
            row(0.8, 0.895, penalty=0.05),
            row(0.5, 0.89, penalty=0.05, budget=1.0),
            row(0.2, 0.80, penalty=0.05, budget=4.0),
        ],
        "static": [
            {"speedup": 2.0, "flops_ratio": 0.5, "accuracy": 0.88},
            {"speedup": 4.0, "flops_ratio": 0.25, "accuracy": 0.80},
            {"speedup": 8.0, "flops_ratio": 0.125, "accuracy": 0.70},
        ],
    }
    comparison = evaluation.compare(results)
    # 0.89 at half the FLOPs is the largest reduction within one point.
    assert comparison["within_1_point"] == {
        "penalty": 0.05,
        "budget": 1.0,
        "speedup": 2.0,
        "accuracy": 0.89,
    }
    static = comparison["static"]
    assert static[0]["rnp_accuracy"] == pytest.approx(0.89)
    assert static[0]["difference"] == pytest.approx(0.01)
    # 0.25 lies between the sweep's 0.2 (0.80) and 0.5 (0.89): 1/6 of the way.
    assert static[1]["rnp_accuracy"] == pytest.approx(0.80 + 0.09 / 6)
    assert static[1]["difference"] == pytest.approx(0.09 / 6)
    # The sweep does not go below 0.2 of the FLOPs.
    assert static[2]["rnp_accuracy"] is None
    assert static[2]["difference"] is None
    assert [r["speedup"] for r in static] == [2.0, 4.0, 8.0]
    assert [r["static_accuracy"] for r in static] == [0.88, 0.80, 0.70]

    # No RNP row within one point of the full network.
    results["full"]["accuracy"] = 0.99
    assert evaluation.compare(results)["within_1_point"] is None


def test_compare_says_what_is_missing():
    with pytest.raises(ValueError, match=r"missing \['sweep', 'static'\]"):
        evaluation.compare({"full": {"accuracy": 0.9}, "rnp": []})
    results = {
        "full": {"accuracy": 0.9},
        "rnp": [{"accuracy": 0.9}],
        "sweep": [],
        "static": [],
    }
    with pytest.raises(ValueError, match=r"results\['rnp'\] to be dicts"):
        evaluation.compare(results)


def test_pareto_keeps_the_rows_nothing_beats():
    rows = [
        {"flops": 3.0, "accuracy": 0.7, "name": "c"},
        {"flops": 1.0, "accuracy": 0.5, "name": "a"},
        {"flops": 2.0, "accuracy": 0.4, "name": "dominated"},
        {"flops": 1.0, "accuracy": 0.6, "name": "b"},
        {"flops": 4.0, "accuracy": 0.7, "name": "no better"},
    ]
    assert [r["name"] for r in evaluation.pareto(rows)] == ["b", "c"]
    assert evaluation.pareto([]) == []
    with pytest.raises(ValueError, match="'flops', 'accuracy'"):
        evaluation.pareto([{"flops": 1.0}])


def test_candidate_paths_lists_every_path_or_those_in_the_ratio_range():
    rnp = keras_rnp.wrap(small_cnn(), groups=4, seed=0)
    paths, flops = evaluation.candidate_paths(rnp, 2.0, 8.0, max_paths=100)
    assert paths.dtype == np.int32
    assert sorted(map(tuple, paths.tolist())) == [
        (a, b) for a in range(1, 5) for b in range(1, 5)
    ]
    expected = rnp.flops_from_actions(paths).numpy() - rnp.decision_flops
    np.testing.assert_allclose(flops, expected)
    # The full path costs the backbone's FLOPs: no decision network.
    full = flops[np.all(paths == 4, axis=1)]
    np.testing.assert_allclose(full, rnp.full_flops, rtol=1e-6)

    kept, kept_flops = evaluation.candidate_paths(rnp, 2.0, 8.0, max_paths=15)
    reduction = rnp.full_flops / flops
    in_range = (reduction >= 2.0) & (reduction <= 8.0)
    assert 0 < in_range.sum() < len(paths)
    np.testing.assert_array_equal(kept, paths[in_range])
    np.testing.assert_array_equal(kept_flops, flops[in_range])

    with pytest.raises(ValueError, match="Received: low=8.0, high=2.0"):
        evaluation.candidate_paths(rnp, 8.0, 2.0, max_paths=4)
    with pytest.raises(TypeError, match="Received: Sequential"):
        evaluation.candidate_paths(small_cnn(), 2.0, 8.0, max_paths=4)


def test_uniform_paths_force_one_width_everywhere():
    model = small_cnn()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(9, 10, 10, 3)).astype("float32")
    labels = rng.integers(0, 5, 9)
    rows = evaluation.uniform_paths(model, images, labels, groups=4)
    assert [r["action"] for r in rows] == [1, 2, 3, 4]
    flops = [r["flops"] for r in rows]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    # At full width the wrapped network computes the backbone.
    full = np.argmax(model.predict(images, verbose=0), -1)
    assert rows[-1]["accuracy"] == pytest.approx(np.mean(full == labels))
    rnp = keras_rnp.wrap(model, groups=4)
    for r in rows:
        out = rnp.run(images, actions=r["action"])
        assert r["flops"] == pytest.approx(float(np.mean(out["flops"])))
        assert r["accuracy"] == evaluation.accuracy(out["logits"], labels)
