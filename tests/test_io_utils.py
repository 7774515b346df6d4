"""Atomic writes: a file appears whole, or the previous one stays."""

import json
import os

import numpy as np
import pytest

from keras_rnp import io_utils


def test_write_json_writes_and_leaves_no_staging(tmp_path):
    path = tmp_path / "sub" / "results.json"
    io_utils.write_json(path, {"accuracy": 0.5, "rows": [1, 2]})
    with open(path) as f:
        assert json.load(f) == {"accuracy": 0.5, "rows": [1, 2]}
    assert os.listdir(tmp_path / "sub") == ["results.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    io_utils.write_json(path, {"run": 1})
    with pytest.raises(TypeError):
        # A NumPy array is not JSON: json.dump fails half-way.
        io_utils.write_json(path, {"run": 2, "rows": np.arange(3)})
    with open(path) as f:
        assert json.load(f) == {"run": 1}
    assert os.listdir(tmp_path) == ["results.json"]
