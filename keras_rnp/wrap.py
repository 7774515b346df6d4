"""wrap() and strip(): from a plain Keras model to an RNPModel and back."""

import keras

from keras_rnp import planner
from keras_rnp.rnp_model import RNPModel


def wrap(model, groups=4, gate_first=False, **kwargs):
    """Turns a chain CNN into an `RNPModel` with runtime channel pruning.

    Every Conv2D except the first (all of them with `gate_first=True`) has
    its filters split into `groups` contiguous groups; a decision network
    chooses per image how many to compute. The model is cloned: training
    the result leaves `model` untouched, and its trained weights carry over.

    Supported: `keras.Sequential` and functional models that form a chain,
    channels-last, built with a fixed image size: Conv2D (any strides,
    padding, dilation, with or without bias or activation),
    BatchNormalization, activations (Activation, ReLU, LeakyReLU, ELU),
    MaxPooling2D, AveragePooling2D, Dropout, SpatialDropout2D, Rescaling and
    Normalization at the input, then GlobalAveragePooling2D,
    GlobalMaxPooling2D or Flatten, then Dense layers. Each gated Conv2D's
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
    planner.chain_layers(model)
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
