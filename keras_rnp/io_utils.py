"""Model and result files: atomic writes, and loads that explain failures.

`atomic_path` makes a file or directory appear whole or not at all;
`write_json` and `save_model` write through it. `load_model` reads a
`.keras` file or says what is wrong with it (`ModelLoadError`).
"""

import contextlib
import json
import os
import shutil
import tempfile

import keras


@contextlib.contextmanager
def atomic_path(path, is_dir=False):
    """Yields a temporary path beside `path`; moves it there on success."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".keras_rnp-", dir=parent)
    target = os.path.join(staging, os.path.basename(path))
    try:
        yield target
        if not os.path.exists(target):
            raise RuntimeError(f"Nothing was written to {target}.")
        if is_dir and os.path.exists(path):
            old = os.path.join(staging, "old")
            os.replace(path, old)
        os.replace(target, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path, data):
    """Writes `data` as indented JSON to `path`, atomically."""
    with atomic_path(path) as staging:
        with open(staging, "w") as f:
            json.dump(data, f, indent=1)


def save_model(model, path):
    """Saves a Keras model to `path`, atomically.

    The model is written beside `path` and renamed into place: a crash
    during the write leaves any previous file at `path` as it was.

    Args:
        model: a `keras.Model`.
        path: where to write it, a file name ending in `.keras` (missing
            parent directories are made).
    """
    if not os.fspath(path).endswith(".keras"):
        raise ValueError(
            f"Expected a path ending in .keras. Received: path={path!r}"
        )
    with atomic_path(path) as staging:
        model.save(staging)


class ModelLoadError(ValueError):
    """A model file exists but Keras cannot load it.

    Attributes:
        path: the file.
        reason: the error Keras raised, in one line (`"Type: message"`).
    """

    def __init__(self, path, what, reason):
        self.path, self.reason = path, reason
        super().__init__(
            f"Cannot load the {what} from {path} (a corrupt or foreign "
            f"file?): {reason}"
        )


def load_model(path, what="model", hint=None):
    """Loads a saved Keras model, or raises an error that says why not.

    Args:
        path: the `.keras` file.
        what: what the file should hold, for the messages (e.g.
            `"trained backbone"`).
        hint: how to make a missing file (e.g. which step writes it),
            appended to the message of the `FileNotFoundError`.

    Returns:
        The model (custom objects of keras_rnp need no `custom_objects`).

    Raises:
        FileNotFoundError: nothing at `path`.
        ModelLoadError: the file is not a model Keras can load (a
            `ValueError`, with the first line of Keras' error).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Expected the {what} at {path}" + (f": {hint}." if hint else ".")
        )
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for a bad file.
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ModelLoadError(
            path, what, f"{type(error).__name__}: {first_line}"
        ) from error
