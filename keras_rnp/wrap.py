"""wrap() and strip(): from a plain Keras model to an RNPModel and back."""

import keras

from keras_rnp import planner
from keras_rnp.rnp_model import RNPModel


def wrap(model, groups=4, gate_first=False, **kwargs):
    """Turns a CNN into an `RNPModel` with runtime channel pruning.

    In a chain, every Conv2D except the first (all of them with
    `gate_first=True`) has its filters split into `groups` contiguous
    groups; a decision network chooses per image how many to compute. In a
    residual network (a functional model whose blocks an `Add` joins) the
    stream stays whole and each block's inner width is gated, one decision
    per block (see "Residual networks" in the README). The model is cloned:
    training the result leaves `model` untouched, and its trained weights
    carry over.

    Supported chains: `keras.Sequential` and functional models that form a
    chain, channels-last, built with a fixed image size: Conv2D (any
    strides, padding, dilation, with or without bias or activation),
    BatchNormalization, activations (Activation, ReLU, LeakyReLU, ELU),
    MaxPooling2D, AveragePooling2D, Dropout, SpatialDropout2D, Rescaling and
    Normalization at the input, then GlobalAveragePooling2D,
    GlobalMaxPooling2D or Flatten, then Dense layers. Residual networks may
    also hold DepthwiseConv2D, ZeroPadding2D and Add. Each gated Conv2D's
    filters must be divisible by `groups`.

    Args:
        model: the plain Keras model.
        groups: channel groups per gated convolution (the paper uses 4).
        gate_first: also gate the first convolution.
        **kwargs: passed to `RNPModel` (penalty, gamma, epsilon schedule,
            decision_steps, backbone_steps, ...).

    Returns:
        A `keras_rnp.RNPModel`.

    Raises:
        ValueError: naming the layer that is not supported, its class and
            what is supported; or an argument out of range.

    Example:

    ```python
    backbone = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(128, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    rnp = keras_rnp.wrap(backbone, groups=4)
    ```
    """
    if isinstance(model, RNPModel):
        raise ValueError(
            "keras_rnp.wrap() expects a plain Keras model. Received: an "
            f"RNPModel ({model.name}); use keras_rnp.strip() first."
        )
    # Check before cloning, so errors name the user's layers.
    planner.is_residual(model)
    backbone = keras.models.clone_model(model)
    backbone.set_weights(model.get_weights())
    return RNPModel(backbone, groups=groups, gate_first=gate_first, **kwargs)


def strip(rnp):
    """Returns the backbone of an `RNPModel` as a plain Keras model.

    The result is a clone that holds the backbone's current (fine-tuned)
    weights and runs every channel, like the model given to `wrap()`.

    Raises:
        ValueError: if `rnp` is not an `RNPModel`.
    """
    if not isinstance(rnp, RNPModel):
        raise ValueError(
            "keras_rnp.strip() expects a keras_rnp.RNPModel. Received: "
            f"{type(rnp).__name__}."
        )
    model = keras.models.clone_model(rnp.backbone)
    model.set_weights(rnp.backbone.get_weights())
    return model


# Arguments that fix an RNPModel's structure (its variables).
_STRUCTURE = (
    "groups",
    "gate_first",
    "width_aware_bn",
    "width_aware_affine",
    "code_dim",
    "hidden_units",
)


def rewrap(rnp, **kwargs):
    """A new `RNPModel` with `rnp`'s weights and other training settings.

    The backbone, its per-width batch-norm statistics and the decision
    network carry over; the training progress (step counters, the loss
    mean) starts again. Use it to run Algorithm 1 after a supernet stage
    (`wrap(..., decision_steps=0, sandwich_paths=n)`), once per penalty,
    without losing what the stage learnt.

    Args:
        rnp: the `keras_rnp.RNPModel` to start from (left untouched).
        **kwargs: `RNPModel` arguments to change (penalty, decision_steps,
            backbone_steps, the epsilon schedule, sandwich_paths,
            fixed_paths, ...); the others, `fixed_paths` included, carry
            over.
            Those that fix the model's structure (groups, gate_first,
            width_aware_bn, width_aware_affine, code_dim, hidden_units)
            cannot change.

    Returns:
        A new, uncompiled `keras_rnp.RNPModel`.

    Raises:
        ValueError: if `rnp` is not an `RNPModel`, or a structure argument
            or an unknown argument is given.
    """
    if not isinstance(rnp, RNPModel):
        raise ValueError(
            "keras_rnp.rewrap() expects a keras_rnp.RNPModel. Received: "
            f"{type(rnp).__name__}."
        )
    config = rnp.get_config()
    fixed = sorted(set(kwargs) & set(_STRUCTURE))
    unknown = sorted(set(kwargs) - set(config) - {"backbone"})
    if fixed or unknown or "backbone" in kwargs:
        raise ValueError(
            "keras_rnp.rewrap() changes training settings only; the "
            f"structure ({', '.join(_STRUCTURE)}) and the backbone stay. "
            f"Received: {', '.join(fixed + unknown) or 'backbone'}."
        )
    new = RNPModel.from_config({**config, **kwargs})
    new.backbone.set_weights(rnp.backbone.get_weights())
    new.decision.set_weights(rnp.decision.get_weights())
    if new.target_decision is not None:  # It copied the fresh network.
        new.target_decision.set_weights(rnp.decision.get_weights())
    for target, source in zip(new.width_norms, rnp.width_norms, strict=True):
        target.set_weights(source.get_weights())
    return new
