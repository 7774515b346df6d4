"""The command-line converters, run as a user runs them."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf
from helpers import small_cnn

import keras_rnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert(script, *flags):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "converters", script), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "cnn.keras"
    small_cnn().save(path)
    return path


def test_keras_to_rnp_to_saved_model_and_onnx(cnn_file, tmp_path):
    rnp_file = tmp_path / "rnp.keras"
    result = convert(
        "keras_to_rnp.py",
        f"--input={cnn_file}",
        f"--output={rnp_file}",
        "--groups=2",
    )
    assert result.returncode == 0, result.stderr
    assert "2 gated layers" in result.stdout
    rnp = keras.saving.load_model(rnp_file)
    assert isinstance(rnp, keras_rnp.RNPModel) and rnp.groups == 2
    x = np.random.default_rng(0).normal(size=(3, 10, 10, 3))
    x = x.astype("float32")
    np.testing.assert_allclose(
        rnp.run(x, actions=2)["logits"],
        keras.saving.load_model(cnn_file)(x),
        atol=1e-5,
    )

    base = tmp_path / "serving"
    result = convert(
        "rnp_to_saved_model.py", f"--input={rnp_file}", f"--output={base}"
    )
    assert result.returncode == 0, result.stderr
    # Quiet by default: one line, naming every signature.
    assert result.stdout.strip().splitlines() == [
        f"Wrote {base / '1'} (signatures serving_default, serving_budget, "
        "serving_actions)."
    ]
    assert result.stderr.strip() == ""
    served = tf.saved_model.load(str(base / "1"))
    out = served.signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_array_equal(out["actions"], rnp.run(x)["actions"])

    onnx_file = tmp_path / "rnp.onnx"
    result = convert(
        "rnp_to_onnx.py", f"--input={rnp_file}", f"--output={onnx_file}"
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
    assert result.stderr.strip() == ""
    session = ort.InferenceSession(
        str(onnx_file), providers=["CPUExecutionProvider"]
    )
    budget = np.zeros([1], np.float32)
    logits = session.run(["logits"], {"images": x, "budget": budget})[0]
    np.testing.assert_allclose(logits, rnp.run(x)["logits"], atol=1e-4)

    litert_file = tmp_path / "rnp.tflite"
    result = convert(
        "rnp_to_litert.py",
        f"--input={rnp_file}",
        f"--output={litert_file}",
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
    assert result.stderr.strip() == ""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(litert_file)).get_signature_runner(
        "serving_budget"
    )
    out = runner(images=x, budget=budget)
    np.testing.assert_allclose(out["logits"], rnp.run(x)["logits"], atol=1e-4)


@pytest.mark.parametrize(
    "script, flags, message",
    [
        (
            "keras_to_rnp.py",
            ["--input=/nope.keras", "--output=/tmp/o.keras"],
            "error: no such file: /nope.keras",
        ),
        (
            "keras_to_rnp.py",
            ["--input={corrupt}", "--output={out}.keras"],
            "error: cannot load a Keras model from",
        ),
        (
            "keras_to_rnp.py",
            ["--input={cnn}", "--output={out}.keras", "--groups=3"],
            "error: keras_rnp.wrap.. cannot handle layer "
            "'conv2d_\\d+' .Conv2D.: its 16 filters are not divisible by "
            "groups=3",
        ),
        (
            "keras_to_rnp.py",
            ["--input={cnn}", "--output={out}.txt"],
            "error: --output must end in .keras",
        ),
        (
            "rnp_to_onnx.py",
            ["--input={cnn}", "--output={out}.onnx"],
            "holds a plain Keras model .Sequential.; expected an RNP model",
        ),
        (
            "rnp_to_saved_model.py",
            ["--input={cnn}"],
            "Flag --output must have a value other than None",
        ),
        (
            "rnp_to_onnx.py",
            ["--input={cnn}", "--output=x.onnx", "--opset=abc"],
            "invalid literal",
        ),
        # Checked before any model is loaded or converted:
        (
            "rnp_to_onnx.py",
            ["--input={cnn}", "--output={out}.onnx", "--opset=99"],
            "error: opset must be an integer >= 13 and <= \\d+",
        ),
        pytest.param(
            "rnp_to_onnx.py",
            ["--input={cnn}", "--output={out}.txt"],
            "error: --output must end in .onnx",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "rnp_to_onnx.py",
            ["--input={cnn}", "--output={out}/missing/m.onnx"],
            "error: the directory of --output does not exist",
            marks=pytest.mark.slow,
        ),
        (
            "rnp_to_saved_model.py",
            ["--input={dir}", "--output={out}"],
            "error: --input is a directory",
        ),
        pytest.param(
            "rnp_to_saved_model.py",
            ["--input={corrupt}", "--output={out}"],
            "error: cannot load a Keras model from .*not a .keras archive",
            marks=pytest.mark.slow,
        ),
        (
            "keras_to_rnp.py",
            ["--input={cnn}", "--output={out}/missing/m.keras"],
            "error: the directory of --output does not exist",
        ),
    ],
)
def test_converters_fail_in_one_line_with_nonzero_exit(
    script, flags, message, cnn_file, tmp_path
):
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"this is not a zip file")
    flags = [
        f.format(
            corrupt=corrupt, cnn=cnn_file, out=tmp_path / "out", dir=tmp_path
        )
        for f in flags
    ]
    result = convert(script, *flags)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    # One line (absl adds a second, "Pass --helpshort", to flag errors).
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr
    assert result.stderr.startswith(("error: ", "FATAL Flags")), result.stderr
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())
