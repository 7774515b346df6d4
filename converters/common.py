"""Shared by the converters: one set of path rules, quiet output, loading
models and one-line errors.

Every converter checks its flags and paths before it loads or writes
anything, prints one line when it is done (`--verbose` lets TensorFlow,
Keras and tf2onnx say what they do), and reports an error in one line with
a non-zero exit.
"""

import contextlib
import io
import logging
import os
import sys
import zipfile

VERBOSE = any(
    arg == "--verbose"
    or arg.lower() in ("--verbose=true", "--verbose=1", "--verbose=t")
    for arg in sys.argv
)


@contextlib.contextmanager
def _silenced_descriptors():
    """Sends what C++ code writes to stdout and stderr (TensorFlow's
    start-up and device lines) to /dev/null meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in [*saved, null]:
            os.close(descriptor)


# TensorFlow prints its start-up lines when it loads: only with --verbose.
with contextlib.nullcontext() if VERBOSE else _silenced_descriptors():
    from absl import flags

    import keras_rnp
    from keras_rnp import io_utils

flags.DEFINE_bool(
    "verbose", False, "Show what TensorFlow, Keras and tf2onnx report."
)


class ConverterError(Exception):
    """An error to report in one line, with a non-zero exit."""


def check_input(path):
    """A `.keras` file that exists (not a directory)."""
    if os.path.isdir(path):
        raise ConverterError(
            f"--input is a directory: {path}; expected a .keras file"
        )
    if not path.endswith(".keras"):
        raise ConverterError(f"--input must end in .keras; received {path}")
    if not os.path.isfile(path):
        raise ConverterError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise ConverterError(
            f"cannot load a Keras model from {path}: not a .keras archive "
            "(a corrupt or foreign file?)"
        )


def check_output(path, overwrite, suffix=None, parents=False):
    """An output path in an existing directory (or, with `parents`, whose
    base directory may be new), with `suffix` if given, that is new unless
    `overwrite`."""
    if suffix and not path.endswith(suffix):
        raise ConverterError(f"--output must end in {suffix}; received {path}")
    parent = os.path.dirname(os.path.abspath(path))
    if parents:  # A SavedModel's version directory under a base path.
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConverterError(
            f"the directory of --output does not exist: {parent}; create it "
            "first"
        )
    if os.path.exists(path) and not overwrite:
        raise ConverterError(f"{path} exists; pass --overwrite to replace it")


def load_model(path, want_rnp):
    """Loads a .keras file, as an RNPModel if `want_rnp`, else a plain one."""
    check_input(path)
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


@contextlib.contextmanager
def quiet(verbose):
    """Silences TensorFlow's, absl's and tf2onnx's logs and prints, unless
    `verbose`."""
    if verbose:
        yield
        return
    from absl import logging as absl_logging

    loggers = [logging.getLogger(name) for name in ("tensorflow", "tf2onnx")]
    levels = [logger.level for logger in loggers]
    absl_level = absl_logging.get_verbosity()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            with _silenced_descriptors():
                yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        absl_logging.set_verbosity(absl_level)


def run(convert):
    """Runs `convert()`; reports errors in one line and exits with 1."""
    try:
        convert()
    except (ConverterError, ValueError, OSError) as error:
        message = str(error).strip().splitlines()[0]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
