"""Atomic writes: a file appears whole, or the previous one stays; loads
that say what is wrong."""

import json
import os

import keras
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


def tiny_model():
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2)], name="tiny"
    )


def test_save_model_writes_atomically_and_loads_back(tmp_path):
    model = tiny_model()
    path = tmp_path / "sub" / "model.keras"
    io_utils.save_model(model, path)
    assert os.listdir(tmp_path / "sub") == ["model.keras"]
    loaded = io_utils.load_model(path, "tiny model")
    for u, v in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match="Received: path='model.h5'"):
        io_utils.save_model(model, "model.h5")


def test_a_failed_save_keeps_the_previous_model(tmp_path):
    path = tmp_path / "model.keras"
    io_utils.save_model(tiny_model(), path)
    before = path.read_bytes()

    class Broken(keras.Sequential):
        def save(self, filepath, **kwargs):
            with open(filepath, "wb") as f:
                f.write(b"half a model")
            raise OSError("disk full")

    broken = Broken([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(OSError, match="disk full"):
        io_utils.save_model(broken, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.keras"]


def test_load_model_explains_a_missing_or_corrupt_file(tmp_path):
    missing = tmp_path / "backbone.keras"
    with pytest.raises(FileNotFoundError) as error:
        io_utils.load_model(missing, "backbone", hint="train it first")
    assert str(error.value) == (
        f"Expected the backbone at {missing}: train it first."
    )
    with pytest.raises(FileNotFoundError, match=r"model at .*\.keras\.$"):
        io_utils.load_model(missing)

    missing.write_bytes(b"truncated")
    with pytest.raises(io_utils.ModelLoadError) as error:
        io_utils.load_model(missing, "backbone")
    assert isinstance(error.value, ValueError)
    assert str(error.value).startswith(
        f"Cannot load the backbone from {missing} (a corrupt or foreign "
        "file?): "
    )
    assert error.value.path == str(missing)
    assert (
        error.value.reason.split(":")[0] == type(error.value.__cause__).__name__
    )
    assert "\n" not in str(error.value)
