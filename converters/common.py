"""Shared by the converters: loading models and one-line errors."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras_rnp  # noqa: E402
from keras_rnp import io_utils  # noqa: E402


class ConverterError(Exception):
    """An error to report in one line, with a non-zero exit."""


def load_model(path, want_rnp):
    """Loads a .keras file, as an RNPModel if `want_rnp`, else a plain one."""
    if not os.path.isfile(path):
        raise ConverterError(f"no such file: {path}")
    try:
        model = io_utils.load_model(path)
    except io_utils.ModelLoadError as error:
        raise ConverterError(
            f"cannot load a Keras model from {path}: {error.reason}"
        ) from None
    if want_rnp and not isinstance(model, keras_rnp.RNPModel):
        raise ConverterError(
            f"{path} holds a plain Keras model ({type(model).__name__}); "
            "expected an RNP model (convert it with keras_to_rnp.py first)"
        )
    if not want_rnp and isinstance(model, keras_rnp.RNPModel):
        raise ConverterError(f"{path} already holds an RNP model")
    return model


def run(convert):
    """Runs `convert()`; reports errors in one line and exits with 1."""
    try:
        convert()
    except (ConverterError, ValueError, OSError) as error:
        message = str(error).strip().splitlines()[0]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def check_new_file(path, overwrite):
    if os.path.exists(path) and not overwrite:
        raise ConverterError(f"{path} exists; pass --overwrite to replace it")
