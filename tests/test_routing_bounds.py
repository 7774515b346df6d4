"""benchmarks/routing_bounds.py's oracle and two-pass rule, on cases
worked out by hand. The script defines absl flags that other scripts the
suite imports define too, so it runs in its own interpreter."""

import os

from helpers import run_checks

PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "benchmarks",
    "routing_bounds.py",
)

CHECKS = """
import importlib.util
import numpy as np
spec = importlib.util.spec_from_file_location("routing_bounds", PATH)
bounds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bounds)

def close(a, b, tol=1e-6):
    assert abs(a - b) <= tol, (a, b)

# The oracle. (FLOPs ratio, name, right per image), cheapest first.
runs = [
    (0.25, "a", np.array([True, False, False, False])),
    (0.5, "b", np.array([True, True, False, False])),
    (1.0, "c", np.array([False, True, True, False])),
]
rows = bounds.oracle(runs, np.zeros(4, int))
# Over a: image 0 right; the rest wrong, at a's cost.
close(rows[0]["accuracy"], 0.25)
close(rows[0]["speedup"], 4.0)
# Over a, b: images 0 (a) and 1 (b) right; 2 and 3 at b's cost.
close(rows[1]["accuracy"], 0.5)
close(rows[1]["speedup"], 1 / ((0.25 + 3 * 0.5) / 4))
# Over all: image 2 right on c; image 3 wrong everywhere, at c's cost.
close(rows[2]["accuracy"], 0.75)
close(rows[2]["speedup"], 1 / ((0.25 + 0.5 + 2) / 4))

# The two-pass rule. Top softmax probabilities, lowest first: images
# 3 (0.55), 2 (0.73), 1 (0.95), 0 (0.99).
labels = np.array([0, 1, 0, 1])
cheap = np.array([[5.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.2, 0.0]])
wide = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
losses = np.array([0.1, 0.2, 0.3, 0.4])
rows = bounds.two_pass((cheap, 0.25), (wide, 1.0), labels, [0.25, 0.5], losses)
# A quarter: image 3 runs again, on the wide path (right there).
close(rows[0]["rerun_share"], 0.25)
close(rows[0]["accuracy"], 1.0)
close(rows[0]["speedup"], 1 / (0.25 + 0.25 * 1.0))
# Half: images 2 and 3. Spearman of FLOPs [0, 0, 1, 1] against the losses
# [1, 2, 3, 4] (ties averaged): 4 / (2 * sqrt(5)).
close(rows[1]["rerun_share"], 0.5)
close(rows[1]["accuracy"], 1.0)
close(rows[1]["loss_rank_correlation"], 4 / (2 * 5**0.5), 1e-3)
# Thresholds fixed on another split: the quarter quantile of [0.6, 0.9,
# 0.95, 0.99] is 0.825 (linear), so images 3 (0.55) and 2 (0.73) run again.
top = np.array([0.6, 0.9, 0.95, 0.99])
reference = np.log(np.stack([top, 1 - top], axis=1))
rows = bounds.two_pass(
    (cheap, 0.25), (wide, 1.0), labels, [0.25], None,
    bounds.confidences(reference),
)
close(rows[0]["rerun_share"], 0.5)
close(rows[0]["accuracy"], 1.0)
close(rows[0]["speedup"], 1 / (0.25 + 0.5 * 1.0))
print("ok")
"""


def test_oracle_and_two_pass_rule_on_hand_worked_cases():
    run_checks(CHECKS, PATH=PATH)
