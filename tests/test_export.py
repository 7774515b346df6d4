"""SavedModel and ONNX exports: parity with Keras, layout, atomic writes."""

import os
import subprocess
import sys

import helpers
import keras
import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf
from helpers import small_cnn
from helpers import spread_decisions

import keras_rnp

L = keras.layers


@pytest.fixture(scope="module")
def rnp():
    return spread_decisions(keras_rnp.wrap(small_cnn(), groups=4, seed=0))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    return rng.normal(size=(9, 10, 10, 3)).astype("float32")


@pytest.fixture(scope="module")
def saved_model(rnp, tmp_path_factory):
    base = tmp_path_factory.mktemp("serving") / "rnp"
    path = keras_rnp.export_saved_model(rnp, base)
    return base, path


@pytest.fixture(scope="module")
def onnx_path(rnp, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "rnp.onnx"
    keras_rnp.export_onnx(rnp, path)
    return path


@pytest.fixture(scope="module")
def onnx_session(onnx_path):
    return helpers.onnx_session(onnx_path)


def onnx_run(session, images, budget=(0.0,)):
    feeds = {"images": images, "budget": np.asarray(budget, np.float32)}
    return helpers.onnx_outputs(session, feeds)


def test_saved_model_layout_for_tf_serving(saved_model):
    base, path = saved_model
    assert os.listdir(base) == ["1"]
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures) == {
        "serving_default",
        "serving_budget",
        "serving_actions",
    }
    inputs = loaded.signatures["serving_budget"].structured_input_signature
    assert set(inputs[1]) == {"images", "budget"}
    outputs = loaded.signatures["serving_default"].structured_outputs
    assert set(outputs) == {"logits", "probabilities", "actions", "flops"}
    assert outputs["actions"].dtype == tf.int32


def test_saved_model_cli_lists_both_signatures(saved_model):
    cli = os.path.join(
        os.path.dirname(os.path.abspath(tf.__file__)),
        "..",
        "..",
        "..",
        "..",
        "bin",
        "saved_model_cli",
    )
    if not os.path.exists(cli):
        pytest.skip("saved_model_cli is not installed beside tensorflow")
    shown = subprocess.run(
        [cli, "show", "--dir", saved_model[1], "--all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "signature_def['serving_default']" in shown
    assert "signature_def['serving_budget']" in shown


def check_matches_keras(rnp, x, default, budgeted):
    """An export's `default(images)` and `budgeted(images, budget)` give
    Keras' logits, actions, FLOPs and probabilities."""
    expected = rnp.run(x)
    out = default(x)
    np.testing.assert_allclose(out["logits"], expected["logits"], atol=1e-4)
    np.testing.assert_array_equal(out["actions"], expected["actions"])
    np.testing.assert_allclose(out["flops"], expected["flops"], rtol=1e-6)
    np.testing.assert_allclose(
        out["probabilities"], tf.nn.softmax(expected["logits"]), atol=1e-5
    )
    # From 2 down to 0 (at batch 1, 2: not the default's budget again).
    budget = np.linspace(2, 0, len(x)).astype("float32")
    assert not np.array_equal(
        rnp.run(x[:1], budget=budget[:1])["actions"], rnp.run(x[:1])["actions"]
    )
    expected = rnp.run(x, budget=budget)
    out = budgeted(x, budget)
    np.testing.assert_array_equal(out["actions"], expected["actions"])
    np.testing.assert_allclose(out["logits"], expected["logits"], atol=1e-4)


@pytest.mark.parametrize("batch", [1, 9])
def test_saved_model_matches_keras(rnp, images, saved_model, batch):
    signatures = tf.saved_model.load(saved_model[1]).signatures
    check_matches_keras(
        rnp,
        images[:batch],
        lambda x: signatures["serving_default"](images=tf.constant(x)),
        lambda x, budget: signatures["serving_budget"](
            images=tf.constant(x), budget=tf.constant(budget)
        ),
    )


def test_saved_model_empty_batch(saved_model):
    loaded = tf.saved_model.load(saved_model[1])
    out = loaded.signatures["serving_default"](images=tf.zeros((0, 10, 10, 3)))
    assert out["logits"].shape == (0, 5)
    assert out["actions"].shape == (0, 2)


@pytest.mark.parametrize("batch", [1, 9])
def test_onnx_matches_keras(rnp, images, onnx_session, batch):
    x = images[:batch]
    expected = rnp.run(x)
    out = onnx_run(onnx_session, x)
    np.testing.assert_allclose(out["logits"], expected["logits"], atol=1e-4)
    np.testing.assert_array_equal(out["actions"], expected["actions"])
    assert out["actions"].dtype == np.int32
    np.testing.assert_allclose(out["flops"], expected["flops"], rtol=1e-6)
    budget = np.linspace(2, 0, batch).astype("float32")
    expected = rnp.run(x, budget=budget)
    out = onnx_run(onnx_session, x, budget)
    np.testing.assert_array_equal(out["actions"], expected["actions"])
    np.testing.assert_allclose(out["logits"], expected["logits"], atol=1e-4)


def test_forced_actions_in_both_exports(rnp, images, saved_model, tmp_path):
    actions = np.random.default_rng(2).integers(1, 5, size=(9, 2))
    expected = rnp.run(images, actions=actions)
    loaded = tf.saved_model.load(saved_model[1])
    out = loaded.signatures["serving_actions"](
        images=tf.constant(images),
        forced_actions=tf.constant(actions, tf.int32),
    )
    np.testing.assert_array_equal(out["actions"], actions)
    np.testing.assert_allclose(out["logits"], expected["logits"], atol=1e-4)
    np.testing.assert_allclose(out["flops"], expected["flops"], rtol=1e-6)
    path = tmp_path / "forced.onnx"
    keras_rnp.export_onnx(rnp, path, forced_actions=True)
    session = ort.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    )
    inputs = [i.name for i in session.get_inputs()]
    assert inputs == ["images", "forced_actions"]
    logits, flops = session.run(
        ["logits", "flops"],
        {"images": images, "forced_actions": actions.astype(np.int32)},
    )
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-4)
    np.testing.assert_allclose(flops, expected["flops"], rtol=1e-6)
    # Uniform batches take the one-convolution branch (a run-time slice in
    # the SavedModel, a kernel prefix in ONNX); mixed previous actions with
    # one action take the groups (the blocks in ONNX).
    mixed_previous = np.stack([actions[:, 0], np.full(9, 3)], axis=1)
    for forced in [np.full((9, 2), a) for a in (1, 2, 4)] + [mixed_previous]:
        forced = forced.astype(np.int32)
        expected = rnp.run(images, actions=forced)["logits"]
        logits, taken = session.run(
            ["logits", "actions"],
            {"images": images, "forced_actions": forced},
        )
        np.testing.assert_array_equal(taken, forced)
        np.testing.assert_allclose(logits, expected, atol=1e-4)
        out = loaded.signatures["serving_actions"](
            images=tf.constant(images), forced_actions=tf.constant(forced)
        )
        np.testing.assert_array_equal(out["actions"], forced)
        np.testing.assert_allclose(out["logits"], expected, atol=1e-4)


def test_onnx_every_uniform_and_mixed_transition_matches_keras(tmp_path):
    # Between ONNX layers a batch's output holds the groups up to its
    # largest action: a uniform layer's convolution output as it is, a
    # mixed one's groups joined. Every transition, three gated layers.
    rnp = keras_rnp.wrap(small_cnn(), groups=4, gate_first=True, seed=1)
    assert rnp.num_gated_layers == 3
    path = keras_rnp.export_onnx(
        rnp, tmp_path / "forced.onnx", forced_actions=True
    )
    session = helpers.onnx_session(path)
    x = np.random.default_rng(5).normal(size=(3, 10, 10, 3)).astype("float32")
    patterns = [
        [[2, 2, 2]] * 3,  # uniform throughout
        [[4, 4, 4]] * 3,  # every group
        [[2, 1, 3], [2, 4, 3], [2, 1, 3]],  # uniform, mixed, mixed
        [[1, 2, 2], [3, 2, 2], [4, 2, 2]],  # mixed, mixed, uniform
        [[3, 3, 1], [3, 3, 4], [3, 3, 2]],  # uniform, uniform, mixed
        [[1, 3, 4], [2, 3, 4], [4, 3, 4]],  # mixed, then one action
        [[1, 2, 3], [2, 1, 1], [1, 2, 4]],  # mixed, cut below k, mixed
    ]
    for actions in np.array(patterns, np.int32):
        masked, _, _ = rnp.forward(tf.constant(x), actions=actions)
        logits, flops = session.run(
            ["logits", "flops"], {"images": x, "forced_actions": actions}
        )
        np.testing.assert_allclose(logits, masked, atol=1e-4)
        np.testing.assert_allclose(
            flops, rnp.flops_from_actions(actions), rtol=1e-6
        )


def test_onnx_runs_one_convolution_per_gated_layer_at_batch_1(
    rnp, images, tmp_path
):
    path = keras_rnp.export_onnx(
        rnp, tmp_path / "forced.onnx", forced_actions=True
    )
    for a in (1, 2, 4):
        feeds = {
            "images": images[:1],
            "forced_actions": np.full((1, 2), a, np.int32),
        }
        # small_cnn: the first convolution (not gated) and one per gated
        # layer; a mixed batch runs blocks.
        ops = helpers.executed_ops(path, feeds)
        assert helpers.convolutions(ops) == 3, a
    mixed = {
        "images": images[:2],
        "forced_actions": np.array([[1, 1], [4, 4]], np.int32),
    }
    ops = helpers.executed_ops(path, mixed)
    assert helpers.convolutions(ops) == 1 + 4 + 16


def test_decisions_are_spread_so_parity_means_something(rnp, images):
    actions = rnp.run(images)["actions"].numpy()
    assert len(np.unique(actions)) > 1
    huge = rnp.run(images, budget=1e6)["actions"].numpy()
    np.testing.assert_array_equal(huge, 1)


def values_read(graph):
    """The names `graph`'s nodes read, with those of every branch at any
    depth (branches read outer values by name)."""
    read = set()
    for node in graph.node:
        read.update(node.input)
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs]:
                read |= values_read(sub)
    return read


def onnx_session_warnings(path):
    """What onnxruntime prints when it loads `path`, at its default level."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, onnxruntime as ort; ort.InferenceSession(sys.argv[1], "
            "providers=['CPUExecutionProvider'])",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stderr


def test_onnx_files_store_only_read_weights_and_load_quietly(
    rnp, onnx_path, tmp_path
):
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    weights = {tensor.name for tensor in graph.initializer}
    assert weights.isdisjoint(i.name for i in graph.input)
    forced = keras_rnp.export_onnx(
        rnp, tmp_path / "forced.onnx", forced_actions=True
    )
    for path in [onnx_path, forced]:
        model = onnx.load(str(path))
        weights = {tensor.name for tensor in model.graph.initializer}
        assert weights <= values_read(model.graph)
        # onnxruntime at its default log level warns of an input that is
        # also an initializer and of initializers no node reads (the
        # forced-actions graph's decision network). Its optimizer's
        # "Implicit input name ... cannot be safely updated" is not ours
        # (README, "ONNX").
        shown = onnx_session_warnings(path)
        assert "appears in graph inputs" not in shown, shown
        assert "Removing initializer" not in shown, shown


def test_onnx_budget_is_a_listed_documented_input_and_empty_batch(
    onnx_session, images
):
    inputs = onnx_session.get_inputs()
    assert [(i.name, i.type) for i in inputs] == [
        ("images", "tensor(float)"),
        ("budget", "tensor(float)"),
    ]
    meta = onnx_session.get_modelmeta()
    assert "budget float32 [N]" in meta.description
    assert "larger values compute fewer" in meta.custom_metadata_map["budget"]
    out = onnx_run(onnx_session, images, budget=[1e6])
    np.testing.assert_array_equal(out["actions"], 1)
    out = onnx_run(onnx_session, images[:0])
    assert out["logits"].shape == (0, 5) and out["actions"].shape == (0, 2)


def _onnx_graph_facts(path):
    """Weights stored (elements of all initializers and constants) and
    the Conv nodes, in the graph and every subgraph."""
    import onnx

    model = onnx.load(str(path))
    stored, convs = 0, 0

    def visit(graph):
        nonlocal stored, convs
        for tensor in graph.initializer:
            stored += int(np.prod(tensor.dims))
        for node in graph.node:
            convs += node.op_type == "Conv"
            for attribute in node.attribute:
                if attribute.t.dims:
                    stored += int(np.prod(attribute.t.dims))
                if attribute.g.node:
                    visit(attribute.g)
                for graph in attribute.graphs:
                    visit(graph)

    visit(model.graph)
    return stored, convs


def test_onnx_stores_each_weight_once(rnp, tmp_path):
    path = keras_rnp.export_onnx(rnp, tmp_path / "m.onnx")
    stored, convs = _onnx_graph_facts(path)
    # small_cnn: 3x3 convs 3->8 and 8->16 with biases, 16->12 without,
    # each followed by a batch norm (4 vectors), a 12->5 dense head.
    backbone = (27 * 8 + 8) + (72 * 16 + 16) + 144 * 12 + 4 * (8 + 16 + 12)
    backbone += 12 * 5 + 5
    weights = backbone + sum(np.prod(w.shape) for w in rnp.decision.weights)
    # With a constant slice per (previous action, action) pair, as before
    # the kernel blocks, each gated kernel was stored about 6 times.
    assert 0.9 * weights <= stored <= 1.1 * weights + 200
    # The first convolution (not gated); the second (gated, its input
    # not) in 4 output groups and 4 prefixes (one per action); the third
    # in 4 x 4 blocks and 16 prefixes (one per input width and action).
    assert convs == 1 + 4 + 4 + 16 + 16


def test_onnx_keeps_a_normalization_layers_constants(tmp_path):
    # tf2onnx leaves the mean and variance of a Normalization built with
    # them as graph inputs; the export makes them initializers.
    rng = np.random.default_rng(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Normalization(
                mean=[120.0, 110.0, 100.0], variance=[4e3, 3e3, 2e3]
            ),
            L.Conv2D(8, 3, padding="same", activation="relu"),
            L.Conv2D(8, 3, padding="same", activation="relu"),
            L.GlobalAveragePooling2D(),
            L.Dense(4),
        ]
    )
    rnp = spread_decisions(keras_rnp.wrap(model, groups=2, seed=0))
    x = rng.uniform(0, 255, size=(6, 8, 8, 3)).astype("float32")
    path = keras_rnp.export_onnx(rnp, tmp_path / "m.onnx")
    session = helpers.onnx_session(path)
    assert [i.name for i in session.get_inputs()] == ["images", "budget"]
    expected = rnp.run(x)
    out = onnx_run(session, x)
    np.testing.assert_allclose(out["logits"], expected["logits"], atol=1e-4)
    np.testing.assert_array_equal(out["actions"], expected["actions"])
    # The normalization matters: without it the logits differ.
    raw = keras.Sequential(model.layers[1:])
    assert not np.allclose(raw(x), model(x), atol=1e-2)


def test_flatten_head_and_softmax_output_export(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(8, 3, padding="same", activation="relu"),
            L.Conv2D(8, 3, padding="same", use_bias=False),
            L.BatchNormalization(),
            L.ReLU(),
            L.Flatten(),
            L.Dense(4, activation="softmax"),
        ]
    )
    rnp = keras_rnp.wrap(model, groups=2)
    x = np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype("float32")
    actions = np.array([[1], [2], [1], [2], [2]])
    np.testing.assert_allclose(
        rnp.run(x, actions=2)["logits"], model(x), atol=1e-5
    )
    path = keras_rnp.export_saved_model(rnp, tmp_path / "m")
    out = tf.saved_model.load(path).signatures["serving_default"](
        images=tf.constant(x)
    )
    # The backbone ends in a softmax: probabilities are its output, and
    # logits are their log (not the probabilities again).
    probabilities = rnp.run(x)["logits"]
    np.testing.assert_allclose(out["probabilities"], probabilities, atol=1e-5)
    np.testing.assert_allclose(
        out["logits"], np.log(probabilities), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        tf.nn.softmax(out["logits"]), out["probabilities"], atol=1e-6
    )
    masked, _, _ = rnp.forward(tf.constant(x), actions=tf.constant(actions))
    np.testing.assert_allclose(
        rnp.run(x, actions=actions)["logits"], masked, atol=1e-5
    )
    # The exported head reads its rows from a group-major copy
    # (GatedHead.rows_by_group): mixed actions, and each action at batch 1.
    loaded = tf.saved_model.load(path)
    forced = loaded.signatures["serving_actions"]
    captured = [v.name for v in forced.variables]
    assert any("rows_by_group" in name for name in captured), captured
    for images, taken in [(x, actions), (x[:1], [[1]]), (x[:1], [[2]])]:
        out = forced(
            images=tf.constant(images),
            forced_actions=tf.constant(taken, tf.int32),
        )
        np.testing.assert_allclose(
            out["probabilities"],
            rnp.run(images, actions=np.array(taken))["logits"],
            atol=1e-6,
        )


def flatten_head_litert_parity(
    tmp_path, height, channels, units, layout="prefixes"
):
    """A conv -> conv -> Flatten -> dense -> dense chain (4 groups) in LiteRT
    under XNNPACK against Keras: batch 1 at every action (the other head
    blocks multiply zero rows) and a mixed batch."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((height, height, 3)),
            L.Conv2D(8, 3, padding="same", activation="relu"),
            L.Conv2D(channels, 3, padding="same", activation="relu"),
            L.Flatten(),
            L.Dense(units, activation="relu"),
            L.Dense(3),
        ]
    )
    rnp = keras_rnp.wrap(model, groups=4)
    path = keras_rnp.export_litert(
        rnp, tmp_path / "flatten.tflite", forced_actions=True, layout=layout
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, height, height, 3)).astype("float32")
    steps = rnp.num_gated_layers
    mixed = rng.integers(1, 5, size=(6, steps)).astype("int32")
    settings = [(x[:1], np.full((1, steps), a, "int32")) for a in (1, 2, 4)]
    for images, actions in settings + [(x, mixed)]:
        # A new interpreter each time: XNNPACK failed at its first call.
        out = litert_runner(path, "serving_actions")(
            images=images, forced_actions=actions
        )
        expected = rnp.run(images, actions=actions)["logits"]
        np.testing.assert_allclose(out["logits"], expected, atol=1e-4)
    return path


def litert_weights(path, op_name):
    """The shapes of the weights (second inputs) of a LiteRT file's
    `op_name` operators."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    return [
        tuple(tensors[op["inputs"][1]]["shape"])
        for op in interpreter._get_ops_details()
        if op["op_name"] == op_name
    ]


@pytest.mark.parametrize("layout", ["prefixes", "blocks"])
def test_litert_flatten_head(tmp_path, layout):
    path = flatten_head_litert_parity(tmp_path, 6, 8, 5, layout)
    # The head's first dense kernel is one constant per channel group
    # (GatedHead.rows_by_group(split=True)), each read whole by a fully
    # connected operator: 5 units x 6 * 6 * 2 rows. (At this size the
    # converter folded the slices of one kernel into the same constants;
    # the slow test below fails without the split.)
    weights = litert_weights(path, "FULLY_CONNECTED")
    assert weights.count((5, 72)) == 4, weights


@pytest.mark.parametrize("layout", ["prefixes", "blocks"])
def test_litert_layouts(rnp, images, tmp_path, layout):
    path = keras_rnp.export_litert(
        rnp, tmp_path / "forced.tflite", forced_actions=True, layout=layout
    )
    # Batch 1 at one pair of different actions (the other pairs or blocks
    # run on no image), a mixed batch and uniform batches of 9.
    mixed = np.random.default_rng(5).integers(1, 5, size=(9, 2))
    uniform = [(images, np.full((9, 2), a)) for a in (1, 4)]
    for x, actions in [(images[:1], [[3, 1]]), (images, mixed), *uniform]:
        actions = np.asarray(actions, "int32")
        out = litert_runner(path, "serving_actions")(
            images=x, forced_actions=actions
        )
        expected = rnp.run(x, actions=actions)["logits"]
        np.testing.assert_allclose(out["logits"], expected, atol=1e-4)
    # The convolutions' filters [out, h, w, in] (small_cnn: 8 filters on 3
    # channels, not gated; 16 on 8, the output gated; 12 on 16, both
    # gated). With prefixes, one per (input width, action) pair: the
    # first a_in groups of input channels by the first a_out groups of
    # output channels. With blocks, one group by one group.
    filters = sorted(
        tuple(map(int, w)) for w in litert_weights(path, "CONV_2D")
    )
    if layout == "prefixes":
        expected = [(4 * a, 3, 3, 8) for a in range(1, 5)] + [
            (3 * a, 3, 3, 4 * b) for a in range(1, 5) for b in range(1, 5)
        ]
    else:
        expected = [(4, 3, 3, 8)] * 4 + [(3, 3, 3, 4)] * 16
    assert filters == sorted(expected + [(8, 3, 3, 3)])


def test_litert_layout_is_checked(rnp, tmp_path):
    with pytest.raises(ValueError, match="layout must be one of.*'slices'"):
        keras_rnp.export_litert(rnp, tmp_path / "a.tflite", layout="slices")
    assert not os.listdir(tmp_path)


@pytest.mark.slow  # Converts a 144 MB kernel (about 40 s).
def test_litert_flatten_head_above_the_converters_folding_limit(tmp_path):
    # A dense kernel above 128 MiB (8 * 8 * 512 x 1100 floats): the
    # converter does not fold a slice of it, and XNNPACK's batch matmul on
    # the slice refused the zero-row blocks (VGG-16 failed so at a=1).
    flatten_head_litert_parity(tmp_path, 8, 512, 1100)


@pytest.fixture(scope="module")
def litert_file(rnp, tmp_path_factory):
    path = tmp_path_factory.mktemp("litert") / "rnp.tflite"
    keras_rnp.export_litert(rnp, path)
    return path


def litert_runner(path, signature):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path)).get_signature_runner(signature)


@pytest.mark.parametrize("batch", [1, 9])
def test_litert_matches_keras(rnp, images, litert_file, batch):
    default = litert_runner(litert_file, "serving_default")
    budgeted = litert_runner(litert_file, "serving_budget")
    check_matches_keras(
        rnp,
        images[:batch],
        lambda x: default(images=x),
        lambda x, budget: budgeted(images=x, budget=budget),
    )


def test_litert_signatures_forced_actions_and_builtin_ops(
    rnp, images, litert_file, tmp_path
):
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(litert_file)).get_signature_list()
    assert signatures == {
        "serving_default": {
            "inputs": ["images"],
            "outputs": ["actions", "flops", "logits", "probabilities"],
        },
        "serving_budget": {
            "inputs": ["budget", "images"],
            "outputs": ["actions", "flops", "logits", "probabilities"],
        },
    }
    path = keras_rnp.export_litert(
        rnp, tmp_path / "forced.tflite", forced_actions=True
    )
    actions = np.random.default_rng(3).integers(1, 5, size=(9, 2))
    actions = actions.astype("int32")
    out = litert_runner(path, "serving_actions")(
        images=images, forced_actions=actions
    )
    expected = rnp.run(images, actions=actions)
    np.testing.assert_allclose(out["logits"], expected["logits"], atol=1e-4)
    np.testing.assert_array_equal(out["actions"], actions)
    # (The interpreter has no Flex delegate: these runs show that the file
    # holds LiteRT's builtin operators only.)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        half = keras_rnp.wrap(helpers.small_cnn(), groups=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(ValueError, match="writes float32 models.*mixed_f"):
        keras_rnp.export_litert(half, tmp_path / "half.tflite")
    assert not os.path.exists(tmp_path / "half.tflite")


def test_exports_refuse_bad_arguments_and_existing_targets(rnp, saved_model):
    with pytest.raises(ValueError, match="Expected a keras_rnp.RNPModel"):
        keras_rnp.export_saved_model(small_cnn(), "/tmp/never")
    with pytest.raises(ValueError, match="version must be a positive"):
        keras_rnp.export_saved_model(rnp, "/tmp/never", version=0)
    with pytest.raises(ValueError, match="which exists"):
        keras_rnp.export_saved_model(rnp, saved_model[0])
    with pytest.raises(ValueError, match="opset must be an integer >= 13"):
        keras_rnp.export_onnx(rnp, "/tmp/never.onnx", opset=9)


def test_failed_export_leaves_previous_artifact_intact(
    rnp, tmp_path, monkeypatch
):
    path = tmp_path / "rnp.onnx"
    path.write_bytes(b"previous")
    from keras_rnp import onnx_file

    # The disk fills up after the model and its first weight are written.
    chunks = onnx_file._chunks
    calls = []

    def crash(*args, **kwargs):
        raise OSError("disk full")

    def crash_on_second_weight(*args):
        calls.append(args)
        if len(calls) == 2:
            crash()
        return chunks(*args)

    monkeypatch.setattr(onnx_file, "_chunks", crash_on_second_weight)
    with pytest.raises(OSError, match="disk full"):
        keras_rnp.export_onnx(rnp, path)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["rnp.onnx"]
    base = tmp_path / "serving"

    # Crash inside the SavedModel write itself, half-way through.
    def write_half_then_crash(self, filepath, **kwargs):
        os.makedirs(filepath)
        with open(os.path.join(filepath, "saved_model.pb"), "wb") as f:
            f.write(b"half")
        crash()

    archive = type(keras.export.ExportArchive())
    monkeypatch.setattr(archive, "write_out", write_half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        keras_rnp.export_saved_model(rnp, base)
    assert os.listdir(base) == []


def test_keras_export_points_to_the_keras_rnp_exporters(tmp_path):
    rnp = keras_rnp.wrap(small_cnn(), groups=4)
    with pytest.raises(ValueError, match="keras_rnp.export_saved_model"):
        rnp.export(str(tmp_path / "model"))
    assert not (tmp_path / "model").exists()
