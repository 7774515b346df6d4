"""The README's Python code blocks run as written, in order, on a small
network (the names they assume, `backbone`, `images`, the datasets, are
defined here)."""

import os
import re

import helpers
import keras
import numpy as np
import pytest
import tensorflow as tf

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def python_blocks():
    with open(README) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_api_tour_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 7
    assert "keras_rnp.wrap(backbone" in blocks[0]
    assert any("export_onnx" in block for block in blocks)


@pytest.mark.slow
def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 10, 10, 3)).astype("float32")
    y = rng.integers(0, 5, size=16)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    namespace = {
        "backbone": helpers.small_cnn(),
        "model": helpers.small_cnn(),
        "images": x[:4],
        "train_ds": dataset,
        "val_ds": dataset,
        "test_ds": dataset,
        "x_val": x,
        "y_val": y,
        "tf": tf,
        "np": np,
        "keras": keras,
    }
    for number, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README block {number}", "exec"), namespace)
        except Exception as error:  # Name the block that failed.
            raise AssertionError(
                f"README block {number} failed:\n{block}"
            ) from error
    assert os.path.exists("rnp.keras")
    assert os.path.exists(os.path.join("serving", "rnp", "1"))
    assert os.path.exists("rnp.onnx")
