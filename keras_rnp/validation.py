"""Argument and input checks, each with a message that says what was
expected and what was received."""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_rnp import policy


def check_backend():
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "keras_rnp needs the TensorFlow backend of Keras 3 (set "
            "KERAS_BACKEND=tensorflow). Received: "
            f"backend={keras.backend.backend()}."
        )


def check_int(name, value, minimum):
    """An int (not a bool) >= `minimum`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(
            f"{name} must be an integer >= {minimum}. Received: "
            f"{name}={value!r}."
        )


def check_number(name, value, minimum=None, maximum=None):
    """A finite real number (not a bool) within the bounds given."""
    ok = (
        isinstance(value, (int, float, np.number))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (minimum is None or value >= minimum)
        and (maximum is None or value <= maximum)
    )
    if not ok:
        bounds = (
            f"in [{minimum}, {maximum}]"
            if maximum is not None
            else f">= {minimum}"
        )
        raise ValueError(
            f"{name} must be a finite number {bounds}. Received: "
            f"{name}={value!r}."
        )


def check_budget(budget, batch):
    """A budget >= 0: one number, or one per image; as a float32 tensor."""
    values = np.asarray(budget, dtype=np.float64)
    if values.ndim > 1 or (values.ndim == 1 and values.shape[0] != batch):
        raise ValueError(
            f"budget must be a number or one number per image ({batch}). "
            f"Received: budget with shape {values.shape}."
        )
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(
            f"budget must be finite and >= 0. Received: budget={budget!r}."
        )
    return tf.constant(values, tf.float32)


def check_images(images, image_shape, dtype):
    """Images as a float tensor of `dtype`; a clear error for the wrong
    rank, size, channels or dtype (dimensions unknown while tracing pass).
    """
    expected = (None, *image_shape)
    pair = (
        isinstance(images, tuple)
        and len(images) == 2
        and np.ndim(images[0]) != np.ndim(images[1])
    )
    if pair or isinstance(images, (tf.data.Dataset, dict)):
        raise ValueError(
            f"Expected a batch of images of shape {expected} (an array or "
            "a tensor); for a dataset or (images, labels), use "
            "rnp.predict(), rnp.evaluate() or keras_rnp.report(). "
            f"Received: {type(images).__name__}."
        )
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4 or any(
        got is not None and got != want
        for got, want in zip(images.shape[1:], expected[1:], strict=True)
    ):
        raise ValueError(
            f"Expected images of shape {expected}. Received: "
            f"images.shape={tuple(images.shape)}."
        )
    if not images.dtype.is_floating:
        raise ValueError(
            "Expected float images. Received: "
            f"images.dtype={images.dtype.name}."
        )
    return tf.cast(images, dtype)


def check_actions(actions, batch, num_layers, groups):
    """Forced actions: an int for every layer, or `[batch, num_layers]`
    ints, all in `1..groups`; as an int32 tensor."""
    if isinstance(actions, (int, np.integer)):
        actions = np.full((batch, num_layers), actions)
    actions = np.asarray(actions)
    if actions.shape != (batch, num_layers) or not np.issubdtype(
        actions.dtype, np.integer
    ):
        raise ValueError(
            f"Expected actions as an int or an int array of shape "
            f"({batch}, {num_layers}). Received: actions with shape "
            f"{actions.shape} and dtype {actions.dtype}."
        )
    if actions.size and (actions.min() < 1 or actions.max() > groups):
        raise ValueError(
            f"Expected actions in 1..{groups}. Received: actions "
            f"from {actions.min()} to {actions.max()}."
        )
    return tf.constant(actions, tf.int32)


def check_model_arguments(arguments):
    """Checks RNPModel's constructor arguments (a `locals()` dict)."""
    check_int("groups", arguments["groups"], minimum=1)
    check_number("penalty", arguments["penalty"], minimum=0.0)
    if arguments["penalty_mode"] not in policy.PENALTY_MODES:
        raise ValueError(
            f"penalty_mode must be one of {policy.PENALTY_MODES}. Received: "
            f"penalty_mode={arguments['penalty_mode']!r}."
        )
    check_number("gamma", arguments["gamma"], minimum=0.0, maximum=1.0)
    for name in ("epsilon_start", "epsilon_end"):
        check_number(name, arguments[name], 0.0, 1.0)
    check_int("epsilon_decay_steps", arguments["epsilon_decay_steps"], 0)
    for name in ("backbone_epsilon", "distillation"):
        check_number(name, arguments[name], 0.0, 1.0)
    decision_steps = arguments["decision_steps"]
    backbone_steps = arguments["backbone_steps"]
    check_int("decision_steps", decision_steps, minimum=0)
    check_int("backbone_steps", backbone_steps, minimum=0)
    if decision_steps + backbone_steps == 0:
        raise ValueError(
            "decision_steps + backbone_steps must be at least 1. "
            f"Received: decision_steps={decision_steps}, "
            f"backbone_steps={backbone_steps}."
        )
    check_int("code_dim", arguments["code_dim"], minimum=1)
    check_int("hidden_units", arguments["hidden_units"], minimum=1)
    check_number("alpha_momentum", arguments["alpha_momentum"], 0.0, 1.0)
    check_int("sandwich_paths", arguments["sandwich_paths"], minimum=0)
    check_int(
        "target_update_steps", arguments["target_update_steps"], minimum=0
    )
    if arguments["width_aware_affine"] and not arguments["width_aware_bn"]:
        raise ValueError(
            "width_aware_affine gives each width's batch-norm statistics "
            "their own gamma and beta: it needs width_aware_bn=True. "
            "Received: width_aware_affine=True, width_aware_bn=False."
        )
    fixed_paths = arguments["fixed_paths"]
    if (
        isinstance(fixed_paths, (str, bytes))
        or not hasattr(fixed_paths, "__len__")
        or any(np.ndim(path) != 1 for path in fixed_paths)
    ):
        raise ValueError(
            "fixed_paths expects a list of paths, each a list of actions "
            "(one path: [(2, 1, 3)]). Received: "
            f"fixed_paths={fixed_paths!r}."
        )
    if (arguments["sandwich_paths"] or len(fixed_paths)) and arguments[
        "distillation"
    ]:
        raise ValueError(
            "sandwich_paths and fixed_paths already distill their paths "
            "from the full one; use them or distillation, not both. "
            f"Received: sandwich_paths={arguments['sandwich_paths']}, "
            f"fixed_paths={fixed_paths!r}, "
            f"distillation={arguments['distillation']}."
        )


def check_default_path(path, margin, layers, groups):
    """A default path (None, or `layers` ints in `1..groups`) and margin
    (in `[0, 1e30]`), as `(tuple or None, float)`."""
    check_number(
        "path_margin", margin, minimum=0.0, maximum=policy.FIXED_PATH_MARGIN
    )
    if path is None:
        return None, float(margin)
    path = check_path("default_path", path, layers, groups, or_none=True)
    return path, float(margin)


def check_path(name, path, layers, groups, or_none=False):
    """A path, `layers` ints in `1..groups` (one action per gated layer),
    as a tuple of ints; `name` is the argument's, for the error, which
    names None as the other choice if `or_none`."""
    values = np.asarray(path)
    if not (
        values.shape == (layers,)
        and np.issubdtype(values.dtype, np.integer)
        and values.min() >= 1
        and values.max() <= groups
    ):
        raise ValueError(
            f"{name} expects {layers} ints in 1..{groups} (one action per "
            f"gated layer){' or None' if or_none else ''}. Received: "
            f"{name}={path!r}."
        )
    return tuple(int(a) for a in values)
