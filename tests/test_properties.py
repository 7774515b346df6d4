"""Property tests on random chain and residual CNNs (hypothesis)."""

import math

import hypothesis.strategies as st
import keras
import numpy as np
import pytest
from helpers import onnx_outputs
from helpers import onnx_session
from helpers import randomize_batch_norm
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings

import keras_rnp
from keras_rnp import execution

L = keras.layers
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def chain_cnns(draw):
    """A random chain CNN: convolutions (kernel 1 or 3, stride 1 or 2,
    widths a multiple of `groups`, optional bias and batch norm, various
    activations, optional pooling), a reducer and one or two dense layers.
    Returns `(recipe, groups, gate_first)`: `build(recipe)` makes the
    model (outside the strategy, which must not touch global random
    state)."""
    groups = draw(st.sampled_from([2, 4]))
    size = draw(st.integers(5, 12))
    channels = draw(st.integers(1, 3))
    convs = draw(st.integers(1, 4))
    gate_first = convs == 1 or draw(st.booleans())
    layers = [("input", (size, size, channels))]
    for _ in range(convs):
        stride = draw(st.sampled_from([1, 2])) if size >= 4 else 1
        layers.append(
            (
                "Conv2D",
                dict(
                    filters=groups * draw(st.integers(1, 4)),
                    kernel_size=draw(st.sampled_from([1, 3])),
                    strides=stride,
                    padding="same",
                    use_bias=draw(st.booleans()),
                ),
            )
        )
        size = math.ceil(size / stride)
        if draw(st.booleans()):
            layers.append(("BatchNormalization", {}))
        layers.append(
            draw(
                st.sampled_from(
                    [
                        ("ReLU", {}),
                        ("Activation", {"activation": "relu"}),
                        ("Activation", {"activation": "tanh"}),
                        ("LeakyReLU", {"negative_slope": 0.1}),
                    ]
                )
            )
        )
        if size >= 2 and draw(st.booleans()):
            pool = draw(st.sampled_from(["MaxPooling2D", "AveragePooling2D"]))
            layers.append((pool, {"pool_size": 2}))
            size //= 2
    reducer = ["GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten"]
    layers.append((draw(st.sampled_from(reducer)), {}))
    if draw(st.booleans()):
        # A batch norm before the head's first dense layer: it reads every
        # channel, so the last unit's skipped ones must be exactly zero.
        layers.append(("BatchNormalization", {}))
    if draw(st.booleans()):
        hidden = draw(st.integers(2, 8))
        layers.append(("Dense", {"units": hidden, "activation": "relu"}))
    layers.append(("Dense", {"units": draw(st.integers(2, 5))}))
    layers.append(("seed", draw(st.integers(0, 2**16))))
    return layers, groups, gate_first


def build(recipe):
    """The model a `chain_cnns` recipe describes, with seeded weights and
    random batch-norm statistics."""
    (_, shape), *layers, (_, seed) = recipe
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input(shape)]
        + [getattr(L, name)(**kwargs) for name, kwargs in layers]
    )
    randomize_batch_norm(model, seed=seed)
    return model


def images_and_actions(rnp, data, batch):
    shape = (batch, *rnp.image_shape)
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    images = rng.normal(size=shape).astype("float32")
    actions = rng.integers(1, rnp.groups + 1, (batch, rnp.num_gated_layers))
    return images, actions.astype("int32")


@settings(max_examples=12, **SETTINGS)
@given(spec=chain_cnns(), data=st.data())
def test_random_chains_are_exact_and_zero_what_they_skip(spec, data):
    recipe, groups, gate_first = spec
    model = build(recipe)
    rnp = keras_rnp.wrap(model, groups=groups, gate_first=gate_first, seed=0)
    images, actions = images_and_actions(rnp, data, batch=5)

    # Full actions are the backbone itself.
    full = rnp.run(images, actions=groups)["logits"].numpy()
    np.testing.assert_allclose(
        full, model(images).numpy(), rtol=1e-4, atol=1e-4
    )

    # The sliced inference computes what masking computes, and so do
    # LiteRT's graphs (kernel blocks, kernel prefixes) and ONNX's, run in
    # TensorFlow.
    sliced = rnp.run(images, actions=actions)
    masked, _, _ = rnp.forward(images, actions=actions)
    np.testing.assert_allclose(
        sliced["logits"].numpy(), masked.numpy(), rtol=1e-4, atol=1e-4
    )
    modes = (execution.SLICED_BLOCKS, execution.SLICED_PREFIXES)
    for mode in modes + (execution.SLICED_ONNX,):
        out, _, _ = rnp.forward(images, actions=actions, mode=mode)
        np.testing.assert_allclose(
            out.numpy(), masked.numpy(), rtol=1e-4, atol=1e-4
        )
    np.testing.assert_allclose(
        sliced["flops"].numpy(),
        rnp.flops_from_actions(actions).numpy(),
        rtol=1e-6,
    )

    # Every gated unit's skipped channels are exactly zero.
    x = images
    for layer in rnp.plan.pre:
        x = layer(x)
    for t, unit in enumerate(rnp.plan.units):
        x = unit.call_masked(x, actions[:, t])
        active = actions[:, t] * unit.out_channels // groups
        channel = np.arange(unit.out_channels)
        skipped = channel[None, :] >= active[:, None]
        values = np.asarray(x).transpose(0, 3, 1, 2)
        assert np.all(values[skipped] == 0.0)


# Slow (13 s): the default run keeps to 15 minutes; test_export's parity
# tests cover ONNX on chains there.
@pytest.mark.slow
@settings(max_examples=3, **SETTINGS)
@given(spec=chain_cnns(), data=st.data())
def test_random_chains_export_to_onnx_with_parity(spec, data, tmp_path_factory):
    recipe, groups, gate_first = spec
    model = build(recipe)
    rnp = keras_rnp.wrap(model, groups=groups, gate_first=gate_first, seed=0)
    images, actions = images_and_actions(rnp, data, batch=6)
    path = tmp_path_factory.mktemp("onnx") / "rnp.onnx"
    keras_rnp.export_onnx(rnp, path, forced_actions=True)
    got = onnx_outputs(
        onnx_session(path), {"images": images, "forced_actions": actions}
    )
    want = rnp.run(images, actions=actions)
    np.testing.assert_array_equal(got["actions"], actions)
    np.testing.assert_allclose(
        got["logits"], want["logits"].numpy(), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(got["flops"], want["flops"].numpy(), rtol=1e-6)


@st.composite
def residual_cnns(draw):
    """A random residual CNN: a stem, then blocks of three kinds (basic:
    two 3x3; bottleneck: 1x1, 3x3, 1x1; inverted: 1x1 expansion, depthwise
    3x3, 1x1 projection), each with an identity shortcut, a projection
    shortcut (1x1 convolution, maybe strided, with batch norm) or none,
    then global pooling and a dense layer. Returns `(build, groups)`:
    `build()` makes the model with seeded weights and random batch-norm
    statistics."""
    groups = draw(st.sampled_from([2, 4]))
    size = 8
    stem = stream = groups * draw(st.integers(1, 3))
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["basic", "bottleneck", "inverted"]))
        inner = groups * draw(st.integers(1, 3))
        stride = draw(st.sampled_from([1, 2])) if size >= 4 else 1
        shortcut = draw(st.sampled_from(["identity", "projection", "none"]))
        out = stream
        if shortcut != "identity" or stride > 1:
            out = groups * draw(st.integers(1, 3))
            if shortcut == "identity":
                shortcut = "projection"
        blocks.append((kind, inner, stride, shortcut, out))
        stream, size = out, math.ceil(size / stride)
    if all(shortcut == "none" for _, _, _, shortcut, _ in blocks):
        # At least one Add: a network without one is a chain.
        kind, inner, stride, _, out = blocks[0]
        blocks[0] = (kind, inner, stride, "projection", out)
    seed = draw(st.integers(0, 2**16))
    bias = draw(st.booleans())
    activation = draw(st.sampled_from(["relu", "relu6", "tanh"]))
    spec = (groups, stem, blocks, seed, bias, activation)

    def build():
        keras.utils.set_random_seed(seed)

        def act(x):
            if activation == "relu6":
                return L.ReLU(6.0)(x)
            return L.Activation(activation)(x)

        def conv(x, filters, kernel, strides=1):
            x = L.Conv2D(
                filters, kernel, strides, padding="same", use_bias=bias
            )(x)
            return L.BatchNormalization()(x)

        inputs = keras.Input((8, 8, 3))
        x = act(conv(inputs, stem, 3))
        for kind, inner, stride, shortcut, out in blocks:
            if kind == "basic":
                y = act(conv(x, inner, 3, stride))
                y = conv(y, out, 3)
            elif kind == "bottleneck":
                y = act(conv(x, inner, 1))
                y = act(conv(y, inner, 3, stride))
                y = conv(y, out, 1)
            else:
                y = act(conv(x, inner, 1))
                y = L.DepthwiseConv2D(3, stride, padding="same")(y)
                y = act(L.BatchNormalization()(y))
                y = conv(y, out, 1)
            if shortcut == "projection":
                y = L.Add()([conv(x, out, 1, stride), y])
            elif shortcut == "identity":
                y = L.Add()([x, y])
            x = act(y) if kind != "inverted" else y
        x = L.GlobalAveragePooling2D()(x)
        model = keras.Model(inputs, L.Dense(3)(x))
        randomize_batch_norm(model, seed=seed)
        return model

    return build, groups, spec


@settings(max_examples=6, **SETTINGS)
@given(net=residual_cnns(), data=st.data())
def test_random_residual_networks_are_exact_and_sliced_equals_masked(net, data):
    build, groups, _ = net
    model = build()
    rnp = keras_rnp.wrap(
        model, groups=groups, width_aware_bn=data.draw(st.booleans()), seed=0
    )
    images, actions = images_and_actions(rnp, data, batch=5)
    full = rnp.run(images, actions=groups)["logits"].numpy()
    np.testing.assert_allclose(
        full, model(images).numpy(), rtol=1e-4, atol=1e-4
    )
    assert rnp.full_flops == keras_rnp.count_flops(model)
    masked, _, _ = rnp.forward(images, actions=actions)
    for mode in set(execution.MODES) - {execution.MASKED}:
        out, _, _ = rnp.forward(images, actions=actions, mode=mode)
        np.testing.assert_allclose(
            out.numpy(), masked.numpy(), rtol=1e-4, atol=1e-4
        )
    sliced = rnp.run(images, actions=actions)
    np.testing.assert_allclose(
        sliced["flops"].numpy(),
        rnp.flops_from_actions(actions).numpy(),
        rtol=1e-6,
    )
