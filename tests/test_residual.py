"""Residual and inverted-residual networks: planning, exactness, FLOPs,
exports, saving and refusals."""

import helpers
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import randomize_batch_norm
from helpers import spread_decisions

import keras_rnp
from keras_rnp import execution
from keras_rnp.layers import GatedBlock

L = keras.layers


def bottleneck_net(seed=0):
    """A stem, a bottleneck block with a projection shortcut (16 -> 8 -> 8
    -> 32, ResNet v1 order), an identity bottleneck block, a head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", name="stem")(inputs)
    x = L.ReLU()(L.BatchNormalization()(x))
    for block, project in (("b1", True), ("b2", False)):
        shortcut = x
        if project:
            shortcut = L.Conv2D(32, 1, name=f"{block}_0")(x)
            shortcut = L.BatchNormalization()(shortcut)
        y = L.Conv2D(8, 1, name=f"{block}_1")(x)
        y = L.Activation("relu")(L.BatchNormalization()(y))
        y = L.Conv2D(8, 3, padding="same", name=f"{block}_2")(y)
        y = L.ReLU()(L.BatchNormalization()(y))
        y = L.Conv2D(32, 1, name=f"{block}_3")(y)
        y = L.BatchNormalization()(y)
        x = L.ReLU()(L.Add(name=f"{block}_add")([shortcut, y]))
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(5)(x))
    randomize_batch_norm(model, seed)
    return model


def preactivation_net(seed=0):
    """ResNet v2 order: batch norm and ReLU before each convolution, a
    strided basic block whose shortcut is a 1x1 max pooling."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
    for block, stride in (("b1", 1), ("b2", 2)):
        shortcut = x if stride == 1 else L.MaxPooling2D(1, stride)(x)
        y = L.ReLU()(L.BatchNormalization()(x))
        y = L.ZeroPadding2D(1)(y)
        y = L.Conv2D(8, 3, strides=stride, use_bias=False, name=f"{block}_1")(y)
        y = L.ReLU()(L.BatchNormalization()(y))
        y = L.Conv2D(8, 3, padding="same", name=f"{block}_2")(y)
        x = L.Add()([shortcut, y])
    x = L.ReLU()(L.BatchNormalization()(x))
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(4, activation="softmax")(x))
    randomize_batch_norm(model, seed)
    return model


def inverted_residual_net(seed=0):
    """MobileNetV2's pieces: a stem, a block without expansion, an
    expanding block with a strided depthwise convolution and no residual,
    an expanding block with a residual, a 1x1 head convolution."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", name="stem")(inputs)
    x = L.ReLU(6.0)(L.BatchNormalization()(x))
    x = L.DepthwiseConv2D(3, padding="same", name="b0_dw")(x)
    x = L.ReLU(6.0)(L.BatchNormalization()(x))
    x = L.Conv2D(8, 1, name="b0_project")(x)
    x = L.BatchNormalization()(x)
    for block, stride in (("b1", 2), ("b2", 1)):
        y = L.Conv2D(24, 1, use_bias=False, name=f"{block}_expand")(x)
        y = L.ReLU(6.0)(L.BatchNormalization()(y))
        if stride == 2:
            y = L.ZeroPadding2D(((0, 1), (0, 1)))(y)
        y = L.DepthwiseConv2D(
            3,
            strides=stride,
            padding="valid" if stride == 2 else "same",
            use_bias=False,
            name=f"{block}_dw",
        )(y)
        y = L.ReLU(6.0)(L.BatchNormalization()(y))
        y = L.Conv2D(8, 1, use_bias=False, name=f"{block}_project")(y)
        y = L.BatchNormalization()(y)
        x = L.Add()([x, y]) if stride == 1 else y
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(16, 1)(x)))
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, L.Dense(3)(x))
    randomize_batch_norm(model, seed)
    return model


NETS = {
    "bottleneck": bottleneck_net,
    "preactivation": preactivation_net,
    "inverted": inverted_residual_net,
}


def images_for(model, batch, seed=0):
    """Random images for an RNPModel or a plain model."""
    rng = np.random.default_rng(seed)
    shape = getattr(model, "image_shape", None) or model.input_shape[1:]
    return rng.normal(size=(batch, *shape)).astype("float32")


def random_actions(rnp, batch, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, rnp.num_gated_layers)
    return rng.integers(1, rnp.groups + 1, shape).astype("int32")


@pytest.mark.parametrize(
    "net, blocks",
    [
        ("bottleneck", [["b1_1", "b1_2", "b1_3"], ["b2_1", "b2_2", "b2_3"]]),
        ("preactivation", [["b1_1", "b1_2"], ["b2_1", "b2_2"]]),
        (
            "inverted",
            [["b1_expand", "b1_project"], ["b2_expand", "b2_project"]],
        ),
    ],
)
def test_blocks_gate_the_inner_widths_and_leave_the_stream_whole(net, blocks):
    rnp = keras_rnp.wrap(NETS[net](), groups=4)
    assert [[c.name for c in block.convs] for block in rnp.plan.units] == (
        blocks
    )
    assert all(isinstance(block, GatedBlock) for block in rnp.plan.units)
    gated = [c.name for c in rnp.gated_layers]
    assert gated == [name for block in blocks for name in block[:-1]]
    if net == "inverted":
        # The depthwise convolution runs in the expansion's unit.
        tails = [
            type(layer).__name__ for layer in rnp.plan.units[0].units[0].tail
        ]
        assert tails == [
            "BatchNormalization",
            "ReLU",
            "ZeroPadding2D",
            "DepthwiseConv2D",
            "BatchNormalization",
            "ReLU",
        ]


@pytest.mark.parametrize("width_aware", [False, True])
@pytest.mark.parametrize("net", sorted(NETS))
def test_full_actions_are_the_backbone_and_masked_equals_sliced(
    net, width_aware
):
    model = NETS[net]()
    rnp = keras_rnp.wrap(model, groups=4, width_aware_bn=width_aware, seed=0)
    if width_aware:  # Per-width statistics that differ from the shared.
        rng = np.random.default_rng(3)
        for norm in rnp.width_norms:
            norm.set_weights(
                [rng.uniform(0.5, 1.5, w.shape) for w in norm.get_weights()]
            )
    x = images_for(rnp, 7)
    full = model(x).numpy()
    k = np.full((7, rnp.num_gated_layers), 4, "int32")
    for mode in execution.MODES:
        out = rnp.forward(x, actions=k, mode=mode)[0].numpy()
        np.testing.assert_allclose(out, full, rtol=1e-4, atol=1e-5)
    for batch in (1, 7):
        actions = random_actions(rnp, batch, seed=batch)
        masked = rnp.forward(x[:batch], actions=actions)[0].numpy()
        for mode in (execution.SLICED, execution.SLICED_ONNX):
            out = rnp.forward(x[:batch], actions=actions, mode=mode)[0]
            np.testing.assert_allclose(out, masked, rtol=1e-4, atol=1e-5)
    # Narrow paths change the output: the test above compares something.
    narrow = rnp.forward(x, actions=np.ones_like(k))[0].numpy()
    assert np.abs(narrow - full).max() > 1e-3


def test_skipped_inner_channels_are_exactly_zero():
    rnp = keras_rnp.wrap(bottleneck_net(), groups=4)
    block = rnp.plan.units[0]
    x = images_for(rnp, 6)
    for layer in rnp.backbone.layers[1:4]:  # The stem.
        x = layer(x)
    actions = np.array([1, 2, 3, 4, 1, 3])
    y = x
    for unit in block.units[:-1]:
        y = unit.call_masked(y, actions, previous_action=actions)
        active = actions * unit.out_channels // 4
        skipped = np.arange(unit.out_channels)[None, :] >= active[:, None]
        values = np.asarray(y).transpose(0, 3, 1, 2)
        assert np.all(values[skipped] == 0.0)
        assert np.all(np.any(values[~skipped] != 0.0, axis=(1, 2)))


def test_bottleneck_flops_match_a_hand_count():
    # 8x8 maps, k = 4, f = a / 4. Stem 3x3 3->16: 2*64*9*3*16 = 55296.
    # Block 1: projection 1x1 16->32: 2*64*16*32 = 65536 (stream);
    # 1x1 16->8: 16384 f; 3x3 8->8: 2*64*9*8*8 f^2 = 73728 f^2;
    # 1x1 8->32: 2*64*8*32 f = 32768 f. Block 2: 1x1 32->8: 32768 f;
    # 3x3: 73728 f^2; 1x1 8->32: 32768 f. Dense 32->5: 320.
    model = bottleneck_net()
    stream = 55296 + 65536 + 320
    block1 = (16384 + 32768, 73728)
    block2 = (32768 + 32768, 73728)
    assert keras_rnp.count_flops(model) == stream + sum(block1 + block2)
    rnp = keras_rnp.wrap(model, groups=4)
    assert rnp.full_flops == keras_rnp.count_flops(model)
    actions = np.array([[1, 4], [2, 3], [4, 1]])
    f = actions / 4
    expected = (
        stream
        + block1[0] * f[:, 0]
        + block1[1] * f[:, 0] ** 2
        + block2[0] * f[:, 1]
        + block2[1] * f[:, 1] ** 2
        + rnp.decision_flops
    )
    np.testing.assert_allclose(rnp.flops_from_actions(actions), expected)
    out = rnp.run(images_for(rnp, 3), actions=actions)
    np.testing.assert_allclose(out["flops"], expected, rtol=1e-6)


def test_inverted_residual_flops_match_a_hand_count():
    # Stem 3x3 s2 3->8 on 6x6: 2*36*9*3*8 = 15552; b0 depthwise 3x3 on 8:
    # 2*36*9*8 = 5184; b0 projection 8->8: 2*36*64 = 4608. Block b1
    # (stride 2, 3x3 maps out): expansion 8->24 on 6x6: 2*36*8*24 f =
    # 13824 f; depthwise 3x3 on 24, 3x3 out: 2*9*9*24 f = 3888 f;
    # projection 24->8 on 3x3: 2*9*24*8 f = 3456 f. Block b2 (3x3): 3456 f,
    # 3888 f, 3456 f. Head 1x1 8->16 on 3x3: 2304; dense 16->3: 96.
    model = inverted_residual_net()
    stream = 15552 + 5184 + 4608 + 2304 + 96
    block1 = 13824 + 3888 + 3456
    block2 = 3456 + 3888 + 3456
    assert keras_rnp.count_flops(model) == stream + block1 + block2
    rnp = keras_rnp.wrap(model, groups=4)
    actions = np.array([[1, 4], [3, 2]])
    f = actions / 4
    expected = stream + block1 * f[:, 0] + block2 * f[:, 1]
    np.testing.assert_allclose(
        rnp.flops_from_actions(actions) - rnp.decision_flops, expected
    )


def test_exports_match_keras_with_mixed_actions(tmp_path):
    rnp = spread_decisions(keras_rnp.wrap(inverted_residual_net(), seed=0))
    x = images_for(rnp, 9, seed=4)
    # Budgets per image spread the decisions across the batch.
    budget = np.linspace(0.0, 3.0, 9).astype("float32")
    assert len(np.unique(rnp.run(x, budget=budget)["actions"], axis=0)) > 2
    path = keras_rnp.export_saved_model(rnp, tmp_path / "serving")
    loaded = tf.saved_model.load(path)
    keras_rnp.export_onnx(rnp, tmp_path / "rnp.onnx")
    session = helpers.onnx_session(tmp_path / "rnp.onnx")
    for batch in (1, 9):
        want = rnp.run(x[:batch], budget=budget[:batch])
        got = loaded.signatures["serving_budget"](
            images=x[:batch], budget=budget[:batch]
        )
        onnx = helpers.onnx_outputs(
            session, {"images": x[:batch], "budget": budget[:batch]}
        )
        for out in (got, onnx):
            np.testing.assert_array_equal(out["actions"], want["actions"])
            np.testing.assert_allclose(
                out["logits"], want["logits"], rtol=1e-4, atol=1e-4
            )
            np.testing.assert_allclose(out["flops"], want["flops"], rtol=1e-6)
    from ai_edge_litert.interpreter import Interpreter

    # LiteRT: each block's kernel prefixes (every action runs, on no image
    # mostly: at batch 1 all but one); the blocks in the next test.
    path = keras_rnp.export_litert(
        rnp, tmp_path / "prefixes.tflite", layout="prefixes"
    )
    runner = Interpreter(model_path=path).get_signature_runner("serving_budget")
    for batch in (1, 9):  # One interpreter, resized between calls.
        got = runner(images=x[:batch], budget=budget[:batch])
        want = rnp.run(x[:batch], budget=budget[:batch])
        np.testing.assert_array_equal(got["actions"], want["actions"])
        np.testing.assert_allclose(
            got["logits"], want["logits"], rtol=1e-4, atol=1e-4
        )
    actions = random_actions(rnp, 9, seed=5)
    want = rnp.run(x, actions=actions)
    keras_rnp.export_onnx(rnp, tmp_path / "forced.onnx", forced_actions=True)
    got = helpers.onnx_outputs(
        helpers.onnx_session(tmp_path / "forced.onnx"),
        {"images": x, "forced_actions": actions},
    )
    np.testing.assert_allclose(
        got["logits"], want["logits"], rtol=1e-4, atol=1e-4
    )


def test_litert_blocks_of_a_residual_network(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    rnp = keras_rnp.wrap(bottleneck_net(), seed=0)
    x = images_for(rnp, 9, seed=4)
    actions = random_actions(rnp, 9, seed=5).astype(np.int32)
    path = keras_rnp.export_litert(
        rnp, tmp_path / "blocks.tflite", forced_actions=True, layout="blocks"
    )
    runner = Interpreter(model_path=path).get_signature_runner(
        "serving_actions"
    )
    for batch in (1, 9):
        got = runner(images=x[:batch], forced_actions=actions[:batch])
        want = rnp.run(x[:batch], actions=actions[:batch])
        np.testing.assert_allclose(
            got["logits"], want["logits"], rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("net", ["bottleneck", "inverted"])
def test_onnx_runs_a_uniform_batch_block_by_block_in_one_branch(net, tmp_path):
    rnp = keras_rnp.wrap(NETS[net](), groups=4, seed=0)
    x = images_for(rnp, 5, seed=2)
    path = keras_rnp.export_onnx(
        rnp, tmp_path / "forced.onnx", forced_actions=True
    )
    session = helpers.onnx_session(path)
    blocks = rnp.num_gated_layers
    convolutions = sum(
        isinstance(layer, (L.Conv2D, L.DepthwiseConv2D))
        for layer in rnp.backbone.layers
    )
    for a in range(1, rnp.groups + 1):
        actions = np.full((5, blocks), a, np.int32)
        got = helpers.onnx_outputs(
            session, {"images": x, "forced_actions": actions}
        )
        np.testing.assert_allclose(
            got["logits"],
            rnp.run(x, actions=actions)["logits"],
            rtol=1e-4,
            atol=1e-4,
        )
        # Per block: is the batch uniform, then two levels of a tree over
        # the 4 actions; inside, each convolution once, on its prefix.
        ops = helpers.executed_ops(
            path, {"images": x[:1], "forced_actions": actions[:1]}
        )
        assert ops["If"] == blocks * 3, (a, ops)
        assert helpers.convolutions(ops) == convolutions, (a, ops)


@pytest.mark.parametrize(
    "policy",
    # The second case is slow: the default run keeps to 15 minutes.
    ["float32", pytest.param("mixed_float16", marks=pytest.mark.slow)],
)
def test_onnx_mixed_batches_with_per_width_statistics(policy, tmp_path):
    # Mixed actions run block by block, each action's images as a uniform
    # batch: each must get its own width's statistics, in half precision
    # too.
    keras.mixed_precision.set_global_policy(policy)
    try:
        rnp = keras_rnp.wrap(
            inverted_residual_net(), groups=4, width_aware_bn=True, seed=0
        )
        rng = np.random.default_rng(3)
        for norm in rnp.width_norms:
            norm.set_weights(
                [rng.uniform(0.5, 1.5, w.shape) for w in norm.get_weights()]
            )
        x = images_for(rnp, 9, seed=6)
        actions = random_actions(rnp, 9, seed=7)
        want = rnp.run(x, actions=actions)["logits"]
        path = keras_rnp.export_onnx(
            rnp, tmp_path / "m.onnx", forced_actions=True
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    got = helpers.onnx_outputs(
        helpers.onnx_session(path), {"images": x, "forced_actions": actions}
    )
    tolerance = 1e-4 if policy == "float32" else 2e-2
    np.testing.assert_allclose(
        got["logits"], want, rtol=tolerance, atol=tolerance
    )


def test_onnx_export_reads_every_weight_outside_the_graph_s_branches(
    tmp_path, monkeypatch
):
    # Weights read inside a branch (a depthwise tail's) would force the
    # export to freeze the whole graph; it must not need to.
    from keras_rnp import export

    def refuse(concrete):
        raise AssertionError("export_onnx froze the graph")

    monkeypatch.setattr(
        export, "_frozen_with_large_constants_as_placeholders", refuse
    )
    for model in (inverted_residual_net(), helpers.small_cnn()):
        rnp = keras_rnp.wrap(model, seed=0)
        x = images_for(rnp, 2, seed=1)
        keras_rnp.export_onnx(rnp, tmp_path / "m.onnx")
        got = helpers.onnx_outputs(
            helpers.onnx_session(tmp_path / "m.onnx"),
            {"images": x, "budget": np.zeros([1], "f4")},
        )
        np.testing.assert_allclose(
            got["logits"], rnp.run(x)["logits"], rtol=1e-4, atol=1e-4
        )


def test_keras_file_round_trip_and_strip(tmp_path):
    rnp = spread_decisions(
        keras_rnp.wrap(bottleneck_net(), width_aware_bn=True, seed=0)
    )
    for norm in rnp.width_norms:
        norm.set_weights([w + 0.25 for w in norm.get_weights()])
    x = images_for(rnp, 5)
    path = tmp_path / "rnp.keras"
    rnp.save(path)
    loaded = keras.saving.load_model(path)
    want, got = rnp.run(x), loaded.run(x)
    for key in ("logits", "actions", "flops"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
    plain = keras_rnp.strip(loaded)
    np.testing.assert_allclose(
        plain(x), loaded.run(x, actions=4)["logits"], rtol=1e-4, atol=1e-5
    )
    assert type(plain) is type(bottleneck_net())


# Slow (the default run keeps to 15 minutes): about 30 s; chains test the same
# training.
@pytest.mark.slow
def test_training_updates_the_decision_network_and_every_width():
    model = bottleneck_net()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 5, 64)
    supernet = keras_rnp.wrap(
        model,
        decision_steps=0,
        sandwich_paths=2,
        width_aware_bn=True,
        seed=0,
    )
    supernet.compile(optimizer=keras.optimizers.SGD(0.01))
    before = [norm.get_weights() for norm in supernet.width_norms]
    supernet.fit(images, labels, batch_size=16, epochs=1, verbose=0)
    for norm, weights in zip(supernet.width_norms, before, strict=True):
        mean = norm.get_weights()[0]  # [widths, channels]
        assert np.all(np.abs(mean - weights[0]).max(axis=-1) > 0)
    rnp = keras_rnp.rewrap(supernet, decision_steps=2, backbone_steps=2)
    rnp.compile(optimizer=keras.optimizers.SGD(0.01))
    decision = [w.copy() for w in rnp.decision.get_weights()]
    backbone = [w.copy() for w in rnp.backbone.get_weights()]
    history = rnp.fit(images, labels, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["q_loss"]))
    assert any(
        np.abs(a - b).max() > 0
        for a, b in zip(rnp.decision.get_weights(), decision, strict=True)
    )
    assert any(
        np.abs(a - b).max() > 0
        for a, b in zip(rnp.backbone.get_weights(), backbone, strict=True)
    )
    report = keras_rnp.report(rnp, (images, labels), print_fn=None)
    assert [layer["layer"] for layer in report.layers] == [
        "b1_1..b1_3",
        "b2_1..b2_3",
    ]
    np.testing.assert_allclose(
        report.flops, rnp.flops_from_actions(report.actions), rtol=1e-6
    )


def test_mobilenet_v2_from_keras_applications():
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=4
    )
    randomize_batch_norm(model)
    rnp = keras_rnp.wrap(model, groups=4, seed=0)
    # Every expanding block (16 of 17: the first has no expansion).
    assert rnp.num_gated_layers == 16
    assert rnp.plan.units[0].label == "block_1_expand..block_1_project"
    assert rnp.full_flops == keras_rnp.count_flops(model)
    x = images_for(rnp, 3)
    full = rnp.run(x, actions=4)["logits"].numpy()
    np.testing.assert_allclose(full, model(x), rtol=1e-4, atol=1e-5)
    actions = random_actions(rnp, 3)
    masked = rnp.forward(x, actions=actions)[0].numpy()
    sliced = rnp.run(x, actions=actions)
    np.testing.assert_allclose(sliced["logits"], masked, rtol=1e-4, atol=1e-5)
    assert np.all(sliced["flops"] < rnp.full_flops)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ResNet50", "ResNet50V2"])
def test_resnets_from_keras_applications(name):
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(32, 32, 3), classes=4
    )
    randomize_batch_norm(model)
    rnp = keras_rnp.wrap(model, groups=4, width_aware_bn=True, seed=0)
    assert rnp.num_gated_layers == 16  # 3 + 4 + 6 + 3 bottlenecks.
    assert rnp.full_flops == keras_rnp.count_flops(model)
    x = images_for(rnp, 3)
    full = rnp.run(x, actions=4)["logits"].numpy()
    np.testing.assert_allclose(full, model(x), rtol=1e-4, atol=1e-5)
    actions = random_actions(rnp, 3)
    masked = rnp.forward(x, actions=actions)[0].numpy()
    for mode in (execution.SLICED, execution.SLICED_ONNX):
        out = rnp.forward(x, actions=actions, mode=mode)[0].numpy()
        np.testing.assert_allclose(out, masked, rtol=1e-4, atol=1e-5)


def _two_blocks_sharing_an_inner_tensor():
    inputs = keras.Input((8, 8, 4))
    x = L.ReLU()(L.Conv2D(8, 3, padding="same", name="stem")(inputs))
    inner = L.ReLU(name="inner_relu")(L.Conv2D(8, 3, padding="same")(x))
    y = L.Conv2D(8, 3, padding="same")(inner)
    x = L.Add(name="add_1")([x, y])
    x = L.Add(name="add_2")([x, inner])  # Reads the block's inner tensor.
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(2)(x))


def _squeeze_excitation():
    inputs = keras.Input((8, 8, 4))
    x = L.ReLU()(L.Conv2D(8, 3, padding="same")(inputs))
    y = L.ReLU()(L.Conv2D(8, 3, padding="same")(x))
    s = L.GlobalAveragePooling2D(keepdims=True)(y)
    s = L.Conv2D(8, 1, activation="sigmoid")(s)
    y = L.Multiply(name="excite")([y, s])
    y = L.Conv2D(8, 1)(y)
    x = L.Add()([x, y])
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(2)(x))


def _separable():
    inputs = keras.Input((8, 8, 4))
    x = L.Conv2D(8, 3, padding="same")(inputs)
    y = L.ReLU()(L.SeparableConv2D(8, 3, padding="same", name="sep")(x))
    y = L.Conv2D(8, 1)(y)
    x = L.GlobalAveragePooling2D()(L.Add()([x, y]))
    return keras.Model(inputs, L.Dense(2)(x))


def _subtract():
    inputs = keras.Input((8, 8, 4))
    x = L.Conv2D(8, 3, padding="same")(inputs)
    y = L.ReLU()(L.Conv2D(8, 3, padding="same")(x))
    y = L.Conv2D(8, 1)(y)
    x = L.GlobalAveragePooling2D()(L.Subtract(name="diff")([x, y]))
    return keras.Model(inputs, L.Dense(2)(x))


def _inception():
    inputs = keras.Input((8, 8, 4))
    a = L.Conv2D(4, 1)(inputs)
    b = L.Conv2D(4, 3, padding="same")(inputs)
    x = L.Concatenate(name="mix")([a, b])
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(2)(x))


def _odd_inner_width():
    inputs = keras.Input((8, 8, 4))
    x = L.Conv2D(8, 3, padding="same")(inputs)
    y = L.ReLU()(L.Conv2D(6, 3, padding="same", name="odd")(x))
    y = L.Conv2D(8, 3, padding="same")(y)
    x = L.GlobalAveragePooling2D()(L.Add()([x, y]))
    return keras.Model(inputs, L.Dense(2)(x))


def _grouped_writer():
    inputs = keras.Input((8, 8, 4))
    x = L.Conv2D(8, 3, padding="same")(inputs)
    y = L.ReLU()(L.Conv2D(8, 3, padding="same")(x))
    y = L.Conv2D(8, 3, padding="same", groups=2, name="grouped")(y)
    x = L.GlobalAveragePooling2D()(L.Add()([x, y]))
    return keras.Model(inputs, L.Dense(2)(x))


@pytest.mark.parametrize(
    "make_model, pattern",
    [
        (_grouped_writer, "'grouped' \\(Conv2D\\): groups=2"),
        (
            _two_blocks_sharing_an_inner_tensor,
            "'add_1' \\(Add\\): its inputs do not split from one tensor.*"
            "'inner_relu' \\(read by conv2d_\\d+, add_2\\)",
        ),
        (
            _squeeze_excitation,
            "'excite' \\(Multiply\\): multiplying.*read every channel of "
            "the tensor they scale",
        ),
        (
            _separable,
            "'sep' \\(SeparableConv2D\\): only Conv2D and DepthwiseConv2D.*"
            "a DepthwiseConv2D and a 1x1 Conv2D",
        ),
        (_subtract, "'diff' \\(Subtract\\): Add is the only merge"),
        (_inception, "'mix' \\(Concatenate\\): concatenation"),
        (
            _odd_inner_width,
            "'odd' \\(Conv2D\\): its 6 filters are not divisible by groups=4",
        ),
    ],
)
def test_out_of_scope_networks_are_refused_by_layer(make_model, pattern):
    with pytest.raises(ValueError, match=pattern) as error:
        keras_rnp.wrap(make_model(), groups=4)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("net", ["bottleneck", "inverted"])
def test_static_pruning_of_inner_widths_is_the_sorted_narrow_path(net):
    model = NETS[net]()
    x = images_for(model, 4)
    ordered = keras_rnp.static_pruning.sort_filters(model)
    np.testing.assert_allclose(ordered(x), model(x), rtol=1e-4, atol=1e-5)
    inner = "b1_2" if net == "bottleneck" else "b1_expand"
    kernel = ordered.get_layer(inner).get_weights()[0]
    assert np.all(np.diff(np.abs(kernel).sum(axis=(0, 1, 2))) <= 0)
    # Keeping half of each inner width by L1 norm is the sorted network's
    # path at action 2 of 4 (the same weights, the narrow slice).
    pruned = keras_rnp.static_pruning.l1_prune(model, 0.5)
    widths = [
        layer.filters for layer in pruned.layers if isinstance(layer, L.Conv2D)
    ]
    rnp = keras_rnp.wrap(ordered, groups=4)
    gated = {conv.name for conv in rnp.gated_layers}
    assert widths == [
        layer.filters // 2 if layer.name in gated else layer.filters
        for layer in model.layers
        if isinstance(layer, L.Conv2D)
    ]
    path = rnp.run(x, actions=2)
    np.testing.assert_allclose(path["logits"], pruned(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        path["flops"] - rnp.decision_flops, keras_rnp.count_flops(pruned)
    )
