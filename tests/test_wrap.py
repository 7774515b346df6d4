"""wrap(): what it accepts, what it refuses, and strip()."""

import keras
import numpy as np
import pytest
from helpers import small_cnn

import keras_rnp

L = keras.layers


def chain(*layers, input_shape=(8, 8, 3)):
    return keras.Sequential([keras.Input(input_shape), *layers])


def test_wrap_returns_rnp_model_and_leaves_backbone_untouched():
    backbone = small_cnn()
    before = [w.copy() for w in backbone.get_weights()]
    rnp = keras_rnp.wrap(backbone, groups=4)
    assert isinstance(rnp, keras_rnp.RNPModel)
    assert isinstance(rnp, keras.Model)
    assert rnp.num_gated_layers == 2
    assert [layer.filters for layer in rnp.gated_layers] == [16, 12]
    assert rnp.backbone is not backbone
    # Training the wrapped model must not change the user's model.
    rnp.backbone.layers[0].kernel.assign(rnp.backbone.layers[0].kernel + 1.0)
    for w, b in zip(backbone.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)


def test_gate_first_gates_every_conv():
    rnp = keras_rnp.wrap(small_cnn(), groups=4, gate_first=True)
    assert rnp.num_gated_layers == 3


def test_functional_chain_with_input_scaling_and_flatten_head():
    inputs = keras.Input((8, 8, 3))
    x = L.Rescaling(1 / 255.0)(inputs)
    x = L.Conv2D(8, 3, activation="relu")(x)
    x = L.Conv2D(8, 3, padding="same", dilation_rate=2)(x)
    x = L.LeakyReLU(0.1)(x)
    x = L.SpatialDropout2D(0.1)(x)
    x = L.AveragePooling2D(2)(x)
    x = L.Flatten()(x)
    x = L.Dense(16, activation="relu")(x)
    outputs = L.Dense(3, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    rnp = keras_rnp.wrap(model, groups=2)
    assert rnp.num_gated_layers == 1
    x = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3))
    out = rnp.run(x.astype("float32"), actions=2)
    np.testing.assert_allclose(out["logits"], model(x), rtol=1e-5, atol=1e-5)


def test_strip_returns_plain_model_with_current_weights():
    rnp = keras_rnp.wrap(small_cnn(), groups=4)
    kernel = rnp.gated_layers[0].kernel
    kernel.assign(kernel * 2.0)
    plain = keras_rnp.strip(rnp)
    assert not isinstance(plain, keras_rnp.RNPModel)
    x = np.random.default_rng(1).normal(size=(3, 10, 10, 3))
    x = x.astype("float32")
    np.testing.assert_allclose(
        plain(x), rnp.run(x, actions=4)["logits"], rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="expects a keras_rnp.RNPModel"):
        keras_rnp.strip(plain)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = L.Conv2D(4, 3)

    def call(self, x):
        return self.conv(x)


def branching_model():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="left")(inputs)
    b = L.Conv2D(4, 3, padding="same", name="right")(inputs)
    x = L.Add(name="merge")([a, b])
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(2)(x))


def residual_model():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same")(inputs)
    b = L.Conv2D(4, 3, padding="same")(a)
    x = L.Add(name="merge")([a, b])
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(2)(x))


@pytest.mark.parametrize(
    "make_model, pattern",
    [
        (
            lambda: chain(
                L.Conv3D(4, 1, name="c3d"),
                L.Conv3D(4, 1),
                L.GlobalAveragePooling3D(),
                L.Dense(2),
                input_shape=(4, 8, 8, 3),
            ),
            "'c3d' \\(Conv3D\\).*only Conv2D",
        ),
        (
            lambda: chain(
                L.Conv2D(8, 3),
                L.DepthwiseConv2D(3, name="dw"),
                L.GlobalAveragePooling2D(),
                L.Dense(2),
            ),
            "'dw' \\(DepthwiseConv2D\\).*only Conv2D.*Supported: a chain",
        ),
        (
            lambda: chain(
                L.Conv2D(8, 3),
                L.Conv2D(8, 3, data_format="channels_first", name="cf"),
            ),
            "'cf' \\(Conv2D\\).*channels_first",
        ),
        (
            lambda: chain(
                L.Conv2D(8, 3),
                L.Conv2D(6, 3, name="odd"),
                L.GlobalAveragePooling2D(),
                L.Dense(2),
            ),
            "'odd' \\(Conv2D\\).*6 filters are not divisible by groups=4",
        ),
        (
            lambda: chain(
                L.Conv2D(8, 3),
                L.Conv2D(8, 3),
                L.Reshape((16, 8), name="rs"),
                L.LSTM(4, name="rnn"),
                L.Dense(2),
            ),
            "'rs' \\(Reshape\\).*not supported",
        ),
        (
            lambda: chain(L.Conv2D(8, 3), L.Conv2D(8, 3, groups=2, name="g")),
            "'g' \\(Conv2D\\).*grouped",
        ),
        (
            lambda: chain(
                L.Conv2D(8, 3),
                L.Conv2D(8, 3),
                L.Activation("softmax", name="sm"),
                L.GlobalAveragePooling2D(),
                L.Dense(2),
            ),
            "'sm' \\(Activation\\).*mixes channels",
        ),
        (
            lambda: chain(L.Conv2D(8, 3), L.Conv2D(8, 3)),
            "expects a classifier head",
        ),
        (
            lambda: chain(
                L.Conv2D(8, 3), L.GlobalAveragePooling2D(), L.Dense(2)
            ),
            "needs at least one Conv2D to gate",
        ),
        (branching_model, "found no block to gate in model="),
        (residual_model, "found no block to gate in model="),
        (
            lambda: chain(L.Dense(4), L.Dense(2), input_shape=(5,)),
            "4D input .*Received: input shape \\(None, 5\\)",
        ),
        (
            lambda: keras.Sequential([L.Conv2D(4, 3), L.Dense(2)]),
            "expects a built model.*not built",
        ),
        (Subclassed, "subclassed models.*Received: model=.*Subclassed"),
    ],
)
def test_unsupported_models_are_refused(make_model, pattern):
    with pytest.raises(ValueError, match=pattern):
        keras_rnp.wrap(make_model(), groups=4)


def test_recurrent_layer_in_chain_is_refused():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same")(inputs)
    x = L.Conv2D(8, 3, padding="same")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Reshape((1, 8))(x)
    model = keras.Model(inputs, L.GRU(2, name="gru")(x))
    with pytest.raises(ValueError, match="'reshape.*' \\(Reshape\\)"):
        keras_rnp.wrap(model)
    seq = chain(
        L.Conv2D(8, 3),
        L.Conv2D(8, 3),
        L.GlobalAveragePooling2D(),
        L.Reshape((1, 8)),
        L.GRU(2, name="gru2"),
    )
    with pytest.raises(ValueError, match="not supported"):
        keras_rnp.wrap(seq)


def test_wrapping_an_rnp_model_is_refused():
    rnp = keras_rnp.wrap(small_cnn())
    with pytest.raises(ValueError, match="plain Keras model.*strip"):
        keras_rnp.wrap(rnp)
    with pytest.raises(ValueError, match="expects a keras.Model"):
        keras_rnp.wrap("model.keras")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"groups": 0}, "groups must be an integer >= 1. Received: groups=0"),
        ({"groups": 2.5}, "groups must be an integer.*groups=2.5"),
        (
            {"penalty": -0.1},
            "penalty must be a finite number >= 0.0. Received: penalty=-0.1",
        ),
        (
            {"epsilon_start": 1.5},
            "epsilon_start must be a finite number in \\[0.0, 1.0\\]. "
            "Received: epsilon_start=1.5",
        ),
        ({"epsilon_end": -0.1}, "Received: epsilon_end=-0.1"),
        ({"gamma": 2.0}, "Received: gamma=2.0"),
        (
            {"penalty_mode": "linear"},
            "penalty_mode must be one of.*Received: penalty_mode='linear'",
        ),
        (
            {"decision_steps": 0, "backbone_steps": 0},
            "decision_steps \\+ backbone_steps must be at least 1",
        ),
        ({"epsilon_decay_steps": -1}, "Received: epsilon_decay_steps=-1"),
    ],
)
def test_bad_arguments_are_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        keras_rnp.wrap(small_cnn(), **kwargs)


def test_refusals_name_the_merge_layer_and_say_what_to_do():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same")(inputs)
    b = L.Conv2D(4, 3, padding="same")(a)
    x = L.Concatenate(name="concat")([a, b])
    x = L.GlobalAveragePooling2D()(x)
    dense_net = keras.Model(inputs, L.Dense(2)(x))
    with pytest.raises(ValueError) as error:
        keras_rnp.wrap(dense_net)
    message = str(error.value)
    assert "'concat' (Concatenate): concatenation" in message
    assert "README" in message and "\n" not in message


def test_filters_refusal_suggests_groups_instead_of_the_layer_list():
    model = chain(
        L.Conv2D(8, 3),
        L.Conv2D(6, 3, name="odd"),
        L.GlobalAveragePooling2D(),
        L.Dense(2),
    )
    with pytest.raises(ValueError) as error:
        keras_rnp.wrap(model, groups=4)
    message = str(error.value)
    assert (
        "divides every gated convolution's filters (this one: [2, 3, 6])"
        in (message)
    )
    assert "Supported" not in message
