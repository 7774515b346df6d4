"""Exports of an RNPModel: a SavedModel for TF Serving, ONNX, and LiteRT
(TensorFlow Lite) for devices.

All run the same sliced execution as `RNPModel.run()`: each gated
convolution computes only its active channel groups, images grouped by their
actions, so the exported graphs save real time, not only counted FLOPs.
"""

import contextlib
import os
import tempfile

import keras
import tensorflow as tf

from keras_rnp import execution
from keras_rnp.io_utils import atomic_path
from keras_rnp.rnp_model import RNPModel

_TINY = 1e-30


def _check_model(rnp):
    if not isinstance(rnp, RNPModel):
        raise ValueError(
            "Expected a keras_rnp.RNPModel (see keras_rnp.wrap). Received: "
            f"{type(rnp).__name__}."
        )


def _signatures(rnp, mode=execution.SLICED):
    """The exported functions: `{name: (function, input_signature)}`.

    `mode` is `execution.SLICED` for a SavedModel (checks that raise, empty
    batches skipped with `tf.cond`), `execution.SLICED_ONNX`,
    `SLICED_BLOCKS` or `SLICED_PREFIXES` (no errors, which ONNX and LiteRT
    cannot express).

    - `serving_default(images)`: greedy decisions.
    - `serving_budget(images, budget)`: decisions under a budget.
    - `serving_actions(images, forced_actions)`: forced `[B, L]` actions,
      for benchmarks and tests of the exported graph.
    """
    images_spec = tf.TensorSpec(
        (None, *rnp.image_shape), tf.float32, name="images"
    )
    budget_spec = tf.TensorSpec((None,), tf.float32, name="budget")
    actions_spec = tf.TensorSpec(
        (None, rnp.num_gated_layers), tf.int32, name="forced_actions"
    )
    ends_in_softmax = rnp.ends_in_softmax

    def outputs(images, budget=None, actions=None):
        batch = tf.shape(images)[0]
        budget = tf.broadcast_to(0.0 if budget is None else budget, [batch])
        images, budget, actions = _checked(images, budget, actions)

        def run():
            out = rnp.infer(images, actions=actions, budget=budget, mode=mode)
            return out["logits"], out["actions"], out["flops"]

        def empty():
            out = execution.empty_outputs(rnp.plan)
            return out["logits"], out["actions"], out["flops"]

        if mode == execution.SLICED:
            logits, taken, flops = execution.unless_empty(images, run, empty)
        else:
            logits, taken, flops = run()
        if ends_in_softmax:
            # The backbone outputs probabilities; their logarithm is a set
            # of logits for them (softmax(log p) = p), floored where p
            # underflows to 0.
            probabilities = logits
            logits = tf.math.log(tf.maximum(probabilities, _TINY))
        else:
            probabilities = tf.nn.softmax(logits)
        return {
            "logits": tf.identity(logits, name="logits"),
            "probabilities": tf.identity(probabilities, name="probabilities"),
            "actions": tf.identity(taken, name="actions"),
            "flops": tf.identity(flops, name="flops"),
        }

    def _checked(images, budget, actions):
        budget_ok = tf.math.is_finite(budget) & (budget >= 0)
        if mode == execution.SLICED:
            # A SavedModel's signature does not enforce its TensorSpec's
            # shape: a global-pooling network would silently run on images
            # of another size.
            expected = (None, *rnp.image_shape)
            checks = [
                tf.debugging.assert_equal(
                    tf.shape(images)[1:],
                    tf.constant(expected[1:]),
                    message=f"Expected images of shape {expected}. Received:",
                ),
                tf.debugging.Assert(
                    tf.reduce_all(budget_ok),
                    ["budget must be finite and >= 0. Received:", budget],
                ),
            ]
            if actions is not None:
                in_range = (actions >= 1) & (actions <= rnp.groups)
                checks.append(
                    tf.debugging.Assert(
                        tf.reduce_all(in_range),
                        [
                            f"forced_actions must be in 1..{rnp.groups}. "
                            "Received:",
                            actions,
                        ],
                    )
                )
            with tf.control_dependencies(checks):
                return tf.identity(images), tf.identity(budget), actions
        # ONNX has no errors: a bad budget counts as 0, actions are clipped.
        # (tf2onnx turns a float tf.where into arithmetic, where NaN * 0 is
        # NaN: pick the values with a Gather instead.)
        batch = tf.shape(budget)[0]
        candidates = tf.concat([tf.fill([batch], 0.0), budget], axis=0)
        index = tf.range(batch) + batch * tf.cast(budget_ok, tf.int32)
        budget = tf.gather(candidates, index)
        if actions is not None:
            actions = tf.clip_by_value(actions, 1, rnp.groups)
        return images, budget, actions

    def serving_default(images):
        return outputs(images, budget=tf.zeros([1]))

    def serving_budget(images, budget):
        return outputs(images, budget=budget)

    def serving_actions(images, forced_actions):
        return outputs(images, actions=forced_actions)

    return {
        "serving_default": (serving_default, [images_spec]),
        "serving_budget": (serving_budget, [images_spec, budget_spec]),
        "serving_actions": (serving_actions, [images_spec, actions_spec]),
    }


def export_saved_model(rnp, path, version=1, overwrite=False):
    """Exports an RNPModel as a SavedModel laid out for TF Serving.

    Writes `path/<version>/` (TF Serving's model base path is `path`), with
    the signatures:

    - `serving_default`: input `images` float32 `[None, H, W, C]`; outputs
      `logits` (what the backbone outputs; for a backbone that ends in a
      softmax, the log of its probabilities, floored at 1e-30: logits whose
      softmax is its output), `probabilities` (softmax of the logits, or
      the backbone's own softmax output), `actions` int32 `[B, L]` and
      `flops` float32 `[B]`.
    - `serving_budget`: the same, with a second input `budget` float32
      `[B]` (or `[1]` for the whole batch) that moves the trade-off at run
      time (see `RNPModel.run`).
    - `serving_actions`: the same, with a second input `forced_actions`
      int32 `[B, L]` that forces the actions (for benchmarks and tests).

    The graph computes only the active channel groups of each gated
    convolution. A negative or non-finite `budget`, or `forced_actions`
    outside `1..groups`, fail the request with an InvalidArgument error
    saying so; images with NaN or Inf pixels take the full network (see
    `RNPModel.run`). The write is atomic: the version directory appears whole
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
    with _contiguous_head_rows(rnp):
        archive = keras.export.ExportArchive()
        archive.track(rnp)
        for name, (function, signature) in _signatures(rnp).items():
            archive.add_endpoint(name, function, input_signature=signature)
        with atomic_path(target, is_dir=True) as staging:
            archive.write_out(staging, verbose=False)
    return target


def _contiguous_head_rows(rnp, split=False):
    """A chain's Flatten head reads its dense rows from a group-major copy
    (`GatedHead.rows_by_group`) in the traced graph; with `split`, one
    copy per group (for `call_blocks`)."""
    head = getattr(rnp.plan, "head", None)
    if head is None:
        return contextlib.nullcontext()
    return head.rows_by_group(rnp.groups, split=split)


def export_onnx(rnp, path, opset=17, overwrite=True, forced_actions=False):
    """Exports an RNPModel to ONNX (through tf2onnx).

    The model has two inputs, `images` float32 `[N, H, W, C]` and `budget`
    float32 `[N]` (one per image) or `[1]` (one for the batch; `[0.0]` is
    the learned policy, larger values compute less: see `RNPModel.run`).
    Both are required inputs that `InferenceSession.get_inputs()` lists; the
    file's `doc_string` and its metadata (`budget` key) say what `budget`
    means. Outputs: `logits`, `probabilities`, `actions` (int32 `[N, L]`)
    and `flops` (float32 `[N]`), as in `export_saved_model`.

    The graph computes only the active channel groups of each gated
    convolution, and stores every weight once. A batch whose images all
    took one action at a gated convolution (always so at batch 1) runs one
    convolution on the kernel prefix it needs, chosen by a tree of `If`
    nodes; in a chain, a mixed batch runs the kernel as `k x k` blocks
    (input group by output group), each on exactly the images whose
    actions include it (gathered, then added back in place); a residual
    block runs a mixed batch action by action, each action's images as a
    uniform batch. The prefixes and blocks are `Slice` nodes of the stored
    kernel, which onnxruntime folds into constant weights (which its fast
    convolutions need) when it creates a session: in memory, a session
    holds each gated kernel of a chain about `1 + (1 + 2 + ... + k)^2 /
    k^2` times (7.25 at 4 groups), of a residual block fewer (its prefixes
    share one input and output width). The write is atomic, and streams
    the weights into the file a slice at a time (`keras_rnp.onnx_file`):
    VGG-16's export peaks 1.3-1.4 GiB above the memory the model held.

    ONNX graphs cannot raise errors: where the SavedModel refuses a
    negative or non-finite budget and forced actions outside `1..groups`,
    the ONNX model treats such a budget as 0 and clips the actions. Images
    with NaN or Inf pixels take the full network in both (see
    `RNPModel.run`); onnxruntime itself refuses images of the wrong shape
    or dtype, naming the expected and received dimensions.

    A model under the `mixed_float16` policy computes in float16 in ONNX
    too; one under `mixed_bfloat16` is refused (onnxruntime has no
    bfloat16 convolution).

    Args:
        rnp: the `keras_rnp.RNPModel`.
        path: the `.onnx` file to write.
        opset: the ONNX opset (13 or later).
        overwrite: replace an existing file.
        forced_actions: export, instead, a model whose second input is
            `forced_actions` (int32 `[N, L]`, per image and layer), as the
            SavedModel's `serving_actions` signature; for benchmarks and
            tests.

    Returns:
        `path`.
    """
    import onnx

    from keras_rnp import onnx_file

    _check_model(rnp)
    check_opset(opset)
    if rnp.compute_dtype == "bfloat16":
        raise ValueError(
            "export_onnx() cannot write a model that computes in bfloat16: "
            "onnxruntime has no bfloat16 convolution. Export a SavedModel, "
            "or build the model under the float32 or mixed_float16 policy "
            "and copy the weights (rnp.get_weights()). Received: a model "
            f"with dtype policy {rnp.dtype_policy.name}."
        )
    if os.path.exists(path) and not overwrite:
        raise ValueError(
            "Expected a new file (or overwrite=True). Received: "
            f"path={os.fspath(path)!r}, which exists."
        )
    name = "serving_actions" if forced_actions else "serving_budget"
    function, signature = _signatures(rnp, execution.SLICED_ONNX)[name]
    function = tf.function(function, input_signature=signature)
    concrete = function.get_concrete_function()
    model_proto, weights = function_to_onnx(concrete, opset, len(signature))
    _name_inputs(model_proto, [spec.name for spec in signature])
    _share_branch_initializers(model_proto, reserved=weights)
    weights = _without_unread_weights(model_proto, weights)
    second = FORCED_ACTIONS_DOC if forced_actions else budget_doc(rnp)
    model_proto.doc_string = (
        f"keras_rnp RNP model ({rnp.num_gated_layers} gated layers, "
        f"{rnp.groups} channel groups). Inputs: images float32 "
        f"[N, {', '.join(map(str, rnp.image_shape))}]; {second} Outputs: "
        "logits, probabilities, actions int32 [N, L] (channel groups "
        "computed per gated layer), flops float32 [N] (per image)."
    )
    key = "forced_actions" if forced_actions else "budget"
    onnx.helper.set_model_props(model_proto, {key: second})
    with atomic_path(path, is_dir=False) as staging:
        onnx_file.write(model_proto, weights, staging)
    return os.fspath(path)


def export_litert(
    rnp, path, overwrite=True, forced_actions=False, layout="prefixes"
):
    """Exports an RNPModel to LiteRT (TensorFlow Lite, a `.tflite` file).

    Signatures as the SavedModel's: `serving_default` (input `images`
    float32 `[N, H, W, C]`) and `serving_budget` (inputs `images` and
    `budget` float32 `[N]` or `[1]`); outputs `logits`, `probabilities`,
    `actions` (int32 `[N, L]`) and `flops` (float32 `[N]`). With
    `forced_actions=True`, one signature `serving_actions` (inputs `images`
    and `forced_actions` int32 `[N, L]`) instead, for benchmarks and
    tests. Run it with `ai_edge_litert.interpreter.Interpreter` (XNNPACK
    is on by default) through `get_signature_runner(name)`.

    The graph has no control flow (XNNPACK does not run the subgraphs of
    LiteRT's `IF`) and LiteRT's builtin operators only (no Flex delegate).
    The gated convolutions run in one of two layouts:

    - `"prefixes"` (`execution.SLICED_PREFIXES`): every image runs once,
      each gated convolution as one convolution on the kernel prefix its
      actions need (in a chain, of its (input width, action) pair; in a
      residual block, of the block's action), every prefix on the images
      that took it (none, mostly). The prefixes are constants of their
      own: a chain's convolution weights are stored up to `((k + 1) / 2)^2`
      times (6.25 at `k = 4`), a residual block's at most `(k + 1) / 2`
      times; a Flatten head's first dense kernel once.
    - `"blocks"` (`execution.SLICED_BLOCKS`): each kernel stored once, as
      `k x k` blocks, each block run on the images whose actions need it
      and added back in place. A smaller file, and slower: from 1.2x to
      7x the prefixes' time (`BENCHMARKS.md`).

    A Flatten head's first dense kernel is one constant per channel group
    (see `GatedHead.rows_by_group`; another kernel above about 128 MiB
    would stay one constant, sliced at run time: not tested). Like ONNX
    the file cannot raise errors: a negative or non-finite budget counts
    as 0 and forced actions are clipped. XNNPACK refuses an empty batch.
    The write is atomic.

    Args:
        rnp: the `keras_rnp.RNPModel` (float32: under a mixed precision
            policy, copy its weights into a float32 model first).
        path: the `.tflite` file to write.
        overwrite: replace an existing file.
        forced_actions: export the `serving_actions` signature instead.
        layout: `"prefixes"` or `"blocks"`.

    Returns:
        `path`.
    """
    _check_model(rnp)
    if rnp.compute_dtype != "float32":
        raise ValueError(
            "export_litert() writes float32 models. Build the model under "
            "the float32 policy and copy the weights (rnp.get_weights()). "
            f"Received: a model with dtype policy {rnp.dtype_policy.name}."
        )
    if os.path.exists(path) and not overwrite:
        raise ValueError(
            "Expected a new file (or overwrite=True). Received: "
            f"path={os.fspath(path)!r}, which exists."
        )
    mode = _litert_mode(layout)
    names = ["serving_actions"] if forced_actions else list(LITERT_SIGNATURES)
    signatures = _signatures(rnp, mode)
    with (
        _contiguous_head_rows(rnp, split=True),
        tempfile.TemporaryDirectory() as saved_model,
    ):
        # Through a SavedModel: the converter freezes its variables into
        # constants (a concrete function would keep resource variables).
        archive = keras.export.ExportArchive()
        archive.track(rnp)
        for name in names:
            function, signature = signatures[name]
            archive.add_endpoint(name, function, input_signature=signature)
        archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            saved_model, signature_keys=names
        )
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        flatbuffer = converter.convert()
    with atomic_path(path, is_dir=False) as staging:
        with open(staging, "wb") as f:
            f.write(flatbuffer)
    return os.fspath(path)


def _litert_mode(layout):
    """The execution mode of `export_litert`'s `layout`."""
    if not isinstance(layout, str) or layout not in LITERT_LAYOUTS:
        raise ValueError(
            f"layout must be one of {tuple(LITERT_LAYOUTS)}. Received: "
            f"{layout!r}."
        )
    return LITERT_LAYOUTS[layout]


# export_litert's layouts and the execution mode of each.
LITERT_LAYOUTS = {
    "prefixes": execution.SLICED_PREFIXES,
    "blocks": execution.SLICED_BLOCKS,
}

# The signatures of a LiteRT export (without forced actions).
LITERT_SIGNATURES = ("serving_default", "serving_budget")

BUDGET_DOC = (
    "budget float32 [N] (one per image) or [1] (one for the batch): the "
    "run-time trade-off, a_t = argmax_a [Q(s_t, a) - budget * cost_t(a)]; "
    "0 is the learned policy, larger values compute fewer channel groups."
)


def budget_doc(rnp):
    """What `budget` means in `rnp`'s exports, its default path included."""
    if rnp.default_path is None:
        return BUDGET_DOC
    return (
        "budget float32 [N] (one per image) or [1] (one for the batch): the "
        "run-time trade-off, a_t = argmax_a [Q(s_t, a) - budget * cost_t(a) "
        f"+ {rnp.path_margin:g} * [a == path_t]], where path = "
        f"{'-'.join(map(str, rnp.default_path))} is the model's default "
        "path; 0 is the learned policy around it, larger values compute "
        "fewer channel groups."
    )


FORCED_ACTIONS_DOC = (
    "forced_actions int32 [N, L]: the channel groups to compute at each "
    "gated layer, 1..groups (clipped)."
)


@contextlib.contextmanager
def _tf2onnx_optimizer_without_copies():
    """tf2onnx (1.17) deep-copies the whole graph, constants included,
    before each optimizer pass so that a failing pass can be undone; on
    VGG-16 (138M weights) that took more than 24 GB, for the plain model
    too. Its TF2ONNX_CATCH_ERRORS variable turns the copies off (a failing
    pass then raises); it is set for the conversion only. (tf2onnx 1.17
    reads any value as off.)"""
    name = "TF2ONNX_CATCH_ERRORS"
    before = os.environ.get(name)
    os.environ[name] = "FALSE"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def check_opset(opset):
    """Raises a ValueError unless `opset` is an ONNX opset `export_onnx`
    can write: from 13 to the newest the installed tf2onnx converts."""
    from tf2onnx import constants

    newest = max(constants.OPSET_TO_IR_VERSION)
    if (
        isinstance(opset, bool)
        or not isinstance(opset, int)
        or not 13 <= opset <= newest
    ):
        raise ValueError(
            f"opset must be an integer >= 13 and <= {newest} (the newest "
            f"the installed tf2onnx converts). Received: opset={opset!r}."
        )


# Constants at least this large (elements) leave tf2onnx's hands (see
# `_convert_with_weights_as_inputs`).
_LIFTED_SIZE = 1024


def function_to_onnx(concrete, opset, inputs):
    """A concrete function converted to ONNX as `export_onnx` converts (for
    plain Keras models too: `plain_model_to_onnx`).

    Args:
        concrete: the `tf.function`'s concrete function.
        opset: the ONNX opset.
        inputs: how many inputs the function's signature has.

    Returns:
        The `onnx.ModelProto` without its weights and `{initializer name:
        value}`, for `onnx_file.write`.
    """
    with _tf2onnx_optimizer_without_copies():
        model_proto, weights = _convert_with_weights_as_inputs(concrete, opset)
    _inline_captured_constants(model_proto, concrete, inputs)
    return model_proto, weights


def plain_model_to_onnx(model, path, opset=17):
    """Writes a plain Keras model (a backbone) to ONNX as `export_onnx`
    converts, for side-by-side benchmarks: input `images`, the weights
    streamed into the file."""
    from keras_rnp import onnx_file

    spec = tf.TensorSpec(model.inputs[0].shape, tf.float32, "images")
    function = tf.function(
        lambda images: model(images, training=False), input_signature=[spec]
    )
    concrete = function.get_concrete_function()
    onnx_file.write(*function_to_onnx(concrete, opset, 1), path)


def _convert_with_weights_as_inputs(concrete, opset):
    """Converts a concrete function to ONNX with its weights as inputs while
    tf2onnx works, initializers of the file afterwards.

    Frozen, a model's weights are constants, which tf2onnx folds: every
    slice of a gated kernel (`GatedConv2D.call_blocks`' blocks and kernel
    prefixes) would become a constant of its own, each kernel stored
    several times, and tf2onnx's passes over the constants of VGG-16 took
    about 20 GB. So every variable the function reads becomes a
    placeholder for the conversion (`_variables_as_placeholders`), and an
    initializer of the ONNX file, stored once; onnxruntime folds the
    slices and transposes of it into constant weights when it loads the
    model. Where a variable is read inside a branch, the graph is frozen
    instead and its float constants of at least `_LIFTED_SIZE` elements
    are lifted the same way.

    Returns:
        The `onnx.ModelProto` without those weights, and `{initializer
        name: value}` (an array, or a variable's `_VariableRows`) for
        `onnx_file.write`, which streams them into the file: the weights
        are never copied all at once.
    """
    import tf2onnx

    lifted = _variables_as_placeholders(concrete)
    if lifted is None:
        graph_def, lifted = _frozen_with_large_constants_as_placeholders(
            concrete
        )
    else:
        graph_def, lifted = lifted
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.resource]
    outputs = [t.name for t in concrete.outputs if t.dtype != tf.resource]
    renames = tf2onnx.convert.tensor_names_from_structed(
        concrete, inputs, outputs
    )
    lifted = {f"{name}:0": value for name, value in lifted.items()}
    model_proto, _ = tf2onnx.convert.from_graph_def(
        graph_def,
        name=concrete.name,
        input_names=inputs + list(lifted),
        output_names=outputs,
        opset=opset,
        tensors_to_rename=renames,
    )
    graph = model_proto.graph
    for graph_input in list(graph.input):
        if graph_input.name in lifted:
            graph.input.remove(graph_input)
    return model_proto, lifted


def _variables_as_placeholders(concrete):
    """The function's graph with a placeholder in place of each variable it
    reads, and `{placeholder name: _VariableRows}`; None if a variable is
    read other than by a `ReadVariableOp` of the main graph (inside a
    `tf.cond` branch, say).

    Nothing is frozen, so no copy of the weights passes through TensorFlow
    or tf2onnx: each value is read, in slices, as the file is written.
    """
    graph_def = concrete.graph.as_graph_def(add_shapes=True)
    for function in graph_def.library.function:
        if any(arg.type == tf.resource for arg in function.signature.input_arg):
            return None
    handles = {
        placeholder.op.name: value
        for value, placeholder in concrete.graph.captures
        if placeholder.dtype == tf.resource
    }
    readers = [
        node for node in graph_def.node if handles.keys() & set(node.input)
    ]
    if any(node.op != "ReadVariableOp" for node in readers):
        return None
    lifted, nodes = {}, []
    for node in graph_def.node:
        if node.name not in handles:
            nodes.append(node)
            continue
        # The resource becomes a placeholder of its value, once however
        # often it is read; each read an identity of it.
        reads = [r for r in readers if r.input[0] == node.name]
        if not reads:
            continue
        dtype = tf.dtypes.as_dtype(reads[0].attr["dtype"].type)
        lifted[node.name] = value = _VariableRows(handles[node.name], dtype)
        node.op = "Placeholder"
        node.ClearField("attr")
        node.attr["dtype"].type = dtype.as_datatype_enum
        node.attr["shape"].shape.CopyFrom(
            tf.TensorShape(value.shape).as_proto()
        )
        nodes.append(node)
        for read in reads:
            read.op = "Identity"
            read.ClearField("attr")
            read.attr["T"].type = dtype.as_datatype_enum
    del graph_def.node[:]
    graph_def.node.extend(nodes)
    return graph_def, lifted


class _VariableRows:
    """A variable's value for `onnx_file.write`, read in slices of its
    first axis (the rows gathered): never all of it at once."""

    def __init__(self, handle, dtype):
        self.handle, self.tf_dtype = handle, dtype
        self.dtype = dtype.as_numpy_dtype
        self.shape = tuple(tf.raw_ops.VariableShape(input=handle).numpy())

    def __getitem__(self, key):
        if key is Ellipsis:
            value = tf.raw_ops.ReadVariableOp(
                resource=self.handle, dtype=self.tf_dtype
            )
        else:
            value = tf.raw_ops.ResourceGather(
                resource=self.handle,
                indices=tf.range(key.start, min(key.stop, self.shape[0])),
                dtype=self.tf_dtype,
            )
        return value.numpy()


def _frozen_with_large_constants_as_placeholders(concrete):
    """The function's frozen graph with each float constant of at least
    `_LIFTED_SIZE` elements a placeholder, and `{placeholder name: value}`.
    """
    from tensorflow.python.framework import convert_to_constants

    frozen = convert_to_constants.convert_variables_to_constants_v2(
        concrete, lower_control_flow=False, aggressive_inlining=True
    )
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    del frozen
    lifted = {}
    for node in graph_def.node:
        if node.op != "Const":
            continue
        value = node.attr["value"].tensor
        dtype = tf.dtypes.as_dtype(value.dtype)
        elements = tf.TensorShape(value.tensor_shape).num_elements()
        if not dtype.is_floating or elements < _LIFTED_SIZE:
            continue
        lifted[node.name] = tf.make_ndarray(value)
        shape = node.attr["value"].tensor.tensor_shape
        node.op = "Placeholder"
        node.ClearField("attr")
        node.attr["dtype"].type = dtype.as_datatype_enum
        node.attr["shape"].shape.CopyFrom(shape)
    return graph_def, lifted


def _inline_inputs(model_proto, values):
    """Makes initializers of the graph inputs named in `values`
    (`{name: array}`), holding those values."""
    import onnx

    graph = model_proto.graph
    for graph_input in list(graph.input):
        if graph_input.name in values:
            value = values[graph_input.name]
            graph.initializer.append(
                onnx.numpy_helper.from_array(value, graph_input.name)
            )
            graph.input.remove(graph_input)


def _inline_captured_constants(model_proto, concrete, count):
    """Makes initializers of the graph inputs after the first `count`:
    tf2onnx leaves the constant tensors a function captures (the mean and
    variance of a `keras.layers.Normalization` built with them) as inputs
    named after their placeholders; the values are the function's."""
    captured = {
        placeholder.name: value
        for value, placeholder in concrete.graph.captures
        if value.dtype != tf.resource
    }
    values = {}
    for graph_input in list(model_proto.graph.input)[count:]:
        if graph_input.name not in captured:
            raise ValueError(
                "export_onnx: tf2onnx left an input the model does not "
                f"take, {graph_input.name!r}, and it is not a captured "
                "constant; please report this with your model."
            )
        values[graph_input.name] = captured[graph_input.name].numpy()
    _inline_inputs(model_proto, values)


def _share_branch_initializers(model_proto, reserved=()):
    """Stores each constant once: tf2onnx folds the constants of every
    `If` branch on its own, so a constant that several branches use (a
    slice of a weight read inside a branch, when the graph had to be
    frozen; small constants) would be stored once per branch. Moves the
    branches' initializers to the main graph, one per distinct value,
    where the branches read them (an outer-scope value, as ONNX
    allows). `reserved`: names of the initializers the file will add."""
    import hashlib

    import onnx

    main = model_proto.graph

    def key(tensor):
        value = onnx.numpy_helper.to_array(tensor)
        digest = hashlib.sha256(value.tobytes()).hexdigest()
        return tensor.data_type, tuple(tensor.dims), digest

    def all_names(graph):
        yield from (tensor.name for tensor in graph.initializer)
        yield from (value.name for value in graph.input)
        for node in graph.node:
            yield from node.output
        for sub in _subgraphs(graph):
            yield from all_names(sub)

    names = set(all_names(main)) | set(reserved)
    shared = {key(tensor): tensor.name for tensor in main.initializer}

    def hoist(graph):
        outputs = {output.name for output in graph.output}
        renames = {}
        for tensor in list(graph.initializer):
            if tensor.name in outputs:
                continue
            tensor_key = key(tensor)
            if tensor_key not in shared:
                # A name no value of the model has (tf2onnx's are unique,
                # so none shadows another).
                name = tensor.name + "_shared"
                while name in names:
                    name += "_"
                names.add(name)
                shared[tensor_key] = name
                moved = onnx.TensorProto()
                moved.CopyFrom(tensor)
                moved.name = name
                main.initializer.append(moved)
            renames[tensor.name] = shared[tensor_key]
            graph.initializer.remove(tensor)
        _rename_inputs(graph, renames)
        for sub in _subgraphs(graph):
            hoist(sub)

    for sub in _subgraphs(main):
        hoist(sub)


def _without_unread_weights(model_proto, weights):
    """`weights` and the main graph's initializers without those no node
    reads (in the forced-actions graph, the decision network's): else
    onnxruntime warns of each when it loads the file."""
    graph = model_proto.graph

    def read(graph):  # Inputs of nodes, and outputs (a branch may
        # return an outer value as it is), at every depth.
        yield from (output.name for output in graph.output)
        for node in graph.node:
            yield from node.input
        for sub in _subgraphs(graph):
            yield from read(sub)

    names = set(read(graph))
    for tensor in list(graph.initializer):
        if tensor.name not in names:
            graph.initializer.remove(tensor)
    return {name: value for name, value in weights.items() if name in names}


def _name_inputs(model_proto, names):
    """Names the graph's inputs (tf2onnx may keep only the first spec's
    name)."""
    graph = model_proto.graph
    renames = {}
    for graph_input, name in zip(graph.input, names, strict=True):
        renames[graph_input.name] = name
        graph_input.name = name
    _rename_inputs(graph, renames)


def _subgraphs(graph):
    """The graphs of `graph`'s nodes' attributes (`If` branches, loops)."""
    import onnx

    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield attribute.g
            yield from attribute.graphs


def _rename_inputs(graph, renames):
    """Renames the values `graph`'s nodes read, and its outputs, in it and
    its subgraphs (which read outer values by name)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    for sub in _subgraphs(graph):
        for output in sub.output:
            output.name = renames.get(output.name, output.name)
        _rename_inputs(sub, renames)
