"""benchmarks/speed.py: the rows `--settings` asks for, their FLOPs, and a
clear error for a setting it does not know. Timings are not checked (the
script measures them; a test does not)."""

import json
import os
import subprocess
import sys

import keras_rnp
from keras_rnp import backbones
from keras_rnp.static_pruning import l1_prune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "benchmarks", "speed.py")


def run_speed(*flags):
    return subprocess.run(
        [sys.executable, PATH, *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


def test_speed_times_the_settings_asked_for(tmp_path):
    output = tmp_path / "speed.json"
    result = run_speed(
        "--models=cifar4",
        "--batches=1,2",
        "--runtimes=keras,saved_model",
        "--settings=a=1,decided",
        "--repeats=1",
        f"--output={output}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(output.read_text())["rows"]
    assert [(r["runtime"], r["actions"], r["batch"]) for r in rows] == [
        (runtime, actions, batch)
        for runtime in ("keras", "saved_model")
        for actions in ("decided", "a=1")
        for batch in (1, 2)
    ]
    # At a=1 the RNP model runs the widths of the static network that
    # keeps a quarter of each gated convolution, plus its decision network.
    plain = backbones.cifar_cnn(pool_first=False, normalize=False)
    rnp = keras_rnp.wrap(plain, groups=4)
    static = l1_prune(plain, keep=0.25, prune_first=rnp.gate_first)
    narrow = keras_rnp.count_flops(static) + rnp.decision_flops
    for row in rows[2:4] + rows[6:]:
        expected = keras_rnp.count_flops(plain) / narrow
        assert abs(row["flops_speedup"] - expected) < 1e-6 * expected
        assert row["static_seconds"] > 0 and row["rnp_seconds"] > 0
    for row in rows[:2] + rows[4:6]:
        # Deciding, beside the forced run of the actions it took.
        assert row["forced_seconds"] > 0
        assert len(row["mean_actions"]) == rnp.num_gated_layers
        assert all(1 <= a <= 4 for a in row["mean_actions"])


def test_speed_rejects_an_unknown_setting():
    result = run_speed("--models=cifar4", "--settings=a=5")
    assert result.returncode != 0
    assert "--settings expects some of uniform, a=1..a=4" in result.stderr
    assert "Traceback" not in result.stderr
