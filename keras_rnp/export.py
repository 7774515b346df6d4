"""Exports of an RNPModel: a SavedModel for TF Serving, and ONNX.

Both run the same sliced execution as `RNPModel.run()`: each gated
convolution computes only its active channel groups, images grouped by their
actions, so the exported graphs save real time, not only counted FLOPs.
"""

import os

import keras
import numpy as np
import tensorflow as tf

from keras_rnp.io_utils import atomic_path
from keras_rnp.rnp_model import RNPModel


def _check_model(rnp):
    if not isinstance(rnp, RNPModel):
        raise ValueError(
            "Expected a keras_rnp.RNPModel (see keras_rnp.wrap). Received: "
            f"{type(rnp).__name__}."
        )


def _signature_functions(rnp):
    """Returns `(serve, serve_budget, images_spec, budget_spec)`."""
    images_spec = tf.TensorSpec(
        (None, *rnp._plan.input_shape), tf.float32, name="images"
    )
    budget_spec = tf.TensorSpec((None,), tf.float32, name="budget")
    ends_in_softmax = rnp.ends_in_softmax

    def outputs(images, budget):
        batch = tf.shape(images)[0]
        budget = tf.broadcast_to(budget, [batch])

        def run():
            out = rnp.infer(images, budget=budget)
            return out["logits"], out["actions"], out["flops"]

        def empty():
            # oneDNN convolutions mis-shape empty batches: skip them.
            out = rnp._empty_outputs()
            return out["logits"], out["actions"], out["flops"]

        if rnp._skip_empty_groups:
            logits, actions, flops = tf.cond(batch > 0, run, empty)
        else:
            logits, actions, flops = run()
        probabilities = logits if ends_in_softmax else tf.nn.softmax(logits)
        return {
            "logits": tf.identity(logits, name="logits"),
            "probabilities": tf.identity(probabilities, name="probabilities"),
            "actions": tf.identity(actions, name="actions"),
            "flops": tf.identity(flops, name="flops"),
        }

    def serve(images):
        return outputs(images, tf.zeros([1]))

    def serve_budget(images, budget):
        return outputs(images, budget)

    return serve, serve_budget, images_spec, budget_spec


def export_saved_model(rnp, path, version=1, overwrite=False):
    """Exports an RNPModel as a SavedModel laid out for TF Serving.

    Writes `path/<version>/` (TF Serving's model base path is `path`), with
    two signatures:

    - `serving_default`: input `images` float32 `[None, H, W, C]`; outputs
      `logits` (what the backbone outputs), `probabilities` (softmax of the
      logits, or the backbone's own softmax output), `actions` int32
      `[B, L]` and `flops` float32 `[B]`.
    - `serving_budget`: the same, with a second input `budget` float32
      `[B]` (or `[1]` for the whole batch) that moves the trade-off at run
      time (see `RNPModel.run`).

    The graph computes only the active channel groups of each gated
    convolution. The write is atomic: the version directory appears whole
    or not at all, and a failed export leaves what was there untouched.

    Args:
        rnp: the `keras_rnp.RNPModel`.
        path: the model's base directory.
        version: the version subdirectory (a positive integer).
        overwrite: replace an existing version directory.

    Returns:
        The path of the version directory.

    Raises:
        ValueError: for a model that is not an RNPModel, a bad version, or
            an existing version directory without `overwrite=True`.
    """
    _check_model(rnp)
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or (version < 1)
    ):
        raise ValueError(
            "version must be a positive integer. Received: "
            f"version={version!r}."
        )
    target = os.path.join(os.fspath(path), str(version))
    if os.path.exists(target) and not overwrite:
        raise ValueError(
            "Expected a new version directory (or overwrite=True). Received: "
            f"path={target!r}, which exists."
        )
    serve, serve_budget, images_spec, budget_spec = _signature_functions(rnp)
    archive = keras.export.ExportArchive()
    archive.track(rnp)
    archive.add_endpoint(
        "serving_default", serve, input_signature=[images_spec]
    )
    archive.add_endpoint(
        "serving_budget",
        serve_budget,
        input_signature=[images_spec, budget_spec],
    )
    with atomic_path(target, is_dir=True) as staging:
        archive.write_out(staging, verbose=False)
    return target


def export_onnx(rnp, path, opset=17, overwrite=True):
    """Exports an RNPModel to ONNX (through tf2onnx).

    The model has two inputs, `images` float32 `[N, H, W, C]` and `budget`
    float32 (`[N]`, or `[1]` for the whole batch). `budget` has a default of
    `[0.0]` stored in the file, so a runtime that allows overriding
    initializers (onnxruntime does) can be fed `images` alone. Outputs:
    `logits`, `probabilities`, `actions` (int32 `[N, L]`) and `flops`
    (float32 `[N]`), as in `export_saved_model`.

    The graph computes only the active channel groups of each gated
    convolution (ONNX `Compress`/`ScatterElements` group the images). The
    write is atomic.

    Args:
        rnp: the `keras_rnp.RNPModel`.
        path: the `.onnx` file to write.
        opset: the ONNX opset (13 or later).
        overwrite: replace an existing file.

    Returns:
        `path`.
    """
    import onnx
    import tf2onnx

    _check_model(rnp)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 13:
        raise ValueError(
            f"opset must be an integer >= 13. Received: opset={opset!r}."
        )
    if os.path.exists(path) and not overwrite:
        raise ValueError(
            "Expected a new file (or overwrite=True). Received: "
            f"path={os.fspath(path)!r}, which exists."
        )
    rnp._skip_empty_groups = False  # onnxruntime runs empty groups.
    try:
        _, serve_budget, images_spec, budget_spec = _signature_functions(rnp)
        function = tf.function(
            serve_budget, input_signature=[images_spec, budget_spec]
        )
        model_proto, _ = tf2onnx.convert.from_function(
            function,
            input_signature=[images_spec, budget_spec],
            opset=opset,
        )
    finally:
        rnp._skip_empty_groups = True
    _name_inputs_and_add_default_budget(model_proto)
    with atomic_path(path, is_dir=False) as staging:
        onnx.save(model_proto, staging)
    return os.fspath(path)


def _name_inputs_and_add_default_budget(model_proto):
    """Names the inputs `images` and `budget` (tf2onnx may keep only the
    first spec's name), and gives `budget` a default of `[0.0]`."""
    from onnx import numpy_helper

    graph = model_proto.graph
    renames = {}
    for graph_input, name in zip(
        graph.input, ["images", "budget"], strict=True
    ):
        renames[graph_input.name] = name
        graph_input.name = name
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    default = numpy_helper.from_array(np.zeros([1], np.float32), "budget")
    graph.initializer.append(default)
