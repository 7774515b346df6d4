"""The example scripts' functions, end to end on a tiny configuration."""

import os
import subprocess
import sys

import keras
import pytest

import keras_rnp
from keras_rnp import backbones

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import quickstart  # noqa: E402


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    output = tmp_path / "model" / "rnp.keras"
    rows = quickstart.run(
        backbone_epochs=1,
        rnp_epochs=1,
        budgets=(0.0, 1e6),
        output=str(output),
        verbose=0,
    )
    printed = capsys.readouterr().out
    assert "full backbone" in printed and "Saved the RNP model" in printed
    assert [row["model"] for row in rows] == ["full backbone", "RNP", "RNP"]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert 0.0 < row["flops_ratio"] <= 1.1
    assert rows[0]["flops"] == keras_rnp.count_flops(backbones.digits_cnn())
    # A huge budget takes one group everywhere.
    assert rows[2]["mean_action"] == 1.0
    assert rows[2]["flops"] < rows[0]["flops"]
    loaded = keras.saving.load_model(output)
    assert isinstance(loaded, keras_rnp.RNPModel)
    assert [p.name for p in output.parent.iterdir()] == ["rnp.keras"]


def test_quickstart_bad_flag_exits_nonzero_with_a_short_error():
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "quickstart.py"),
            "--budgets=zero",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode != 0
    assert "--budgets expects numbers" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_quickstart_default_run_keeps_accuracy(tmp_path):
    rows = quickstart.run(output=str(tmp_path / "rnp.keras"), verbose=0)
    assert rows[0]["accuracy"] > 0.97
    assert rows[1]["accuracy"] > rows[0]["accuracy"] - 0.03
    assert rows[1]["flops_ratio"] < 0.9


def test_quickstart_corrupt_checkpoint_gives_a_one_line_error(tmp_path):
    (tmp_path / "backbone.keras").write_bytes(b"not a zip file")
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "quickstart.py"),
            f"--work_dir={tmp_path}",
            f"--output={tmp_path / 'rnp.keras'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 1
    errors = [x for x in result.stderr.splitlines() if x.startswith("error")]
    assert len(errors) == 1 and "backbone.keras" in errors[0]
    assert "Traceback" not in result.stderr
