"""benchmarks/routing_bounds.py's oracle and two-pass rule, on cases
worked out by hand."""

import importlib.util
import os

import numpy as np
import pytest

PATH = os.path.join(
    os.path.dirname(__file__), "..", "benchmarks", "routing_bounds.py"
)


@pytest.fixture(scope="module")
def bounds():
    spec = importlib.util.spec_from_file_location("routing_bounds", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oracle_takes_the_cheapest_right_path(bounds):
    labels = np.zeros(4, int)
    runs = [  # (FLOPs ratio, name, right per image), cheapest first.
        (0.25, "a", np.array([True, False, False, False])),
        (0.5, "b", np.array([True, True, False, False])),
        (1.0, "c", np.array([False, True, True, False])),
    ]
    rows = bounds.oracle(runs, labels)
    # Over a: image 0 right; the rest wrong, at a's cost.
    assert rows[0]["accuracy"] == 0.25
    assert rows[0]["speedup"] == pytest.approx(4.0)
    # Over a, b: images 0 (a) and 1 (b) right; 2 and 3 at b's cost.
    assert rows[1]["accuracy"] == 0.5
    assert rows[1]["speedup"] == pytest.approx(1 / ((0.25 + 3 * 0.5) / 4))
    # Over all: image 2 right on c; image 3 wrong everywhere, at c's cost.
    assert rows[2]["accuracy"] == 0.75
    assert rows[2]["speedup"] == pytest.approx(1 / ((0.25 + 0.5 + 2) / 4))


def test_two_pass_reruns_the_least_confident_images(bounds):
    labels = np.array([0, 1, 0, 1])
    # Top softmax probabilities, lowest first: image 3, 2, 1, 0.
    cheap = np.array([[5.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.2, 0.0]])
    wide = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    losses = np.array([0.1, 0.2, 0.3, 0.4])
    rows = bounds.two_pass(
        (cheap, 0.25), (wide, 1.0), labels, [0.25, 0.5], losses
    )
    # A quarter: image 3 runs again, on the wide path (right there).
    assert rows[0]["rerun_share"] == 0.25
    assert rows[0]["accuracy"] == 1.0
    assert rows[0]["speedup"] == pytest.approx(1 / (0.25 + 0.25 * 1.0))
    # Half: images 2 and 3; FLOPs rank with the losses: +0.894 (Spearman
    # of [0, 0, 1, 1] against [1, 2, 3, 4], ties averaged).
    assert rows[1]["rerun_share"] == 0.5
    assert rows[1]["accuracy"] == 1.0
    assert rows[1]["loss_rank_correlation"] == pytest.approx(0.8944, abs=1e-3)
