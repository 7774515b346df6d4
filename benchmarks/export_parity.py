"""Parity of the exports with Keras on keras.applications residual networks.

Wraps ResNet50, ResNet50V2 and MobileNetV2 (`weights=None`; each batch
norm's moving statistics set from one batch of random images, so that the
activations of these deep random networks stay in a trained network's
range), exports each as a SavedModel and as ONNX (the budget file and the
forced-actions file), and compares logits (log-probabilities: these end in
a softmax) and actions with Keras' `rnp.run()` at batch 1 and 9: forced
actions uniform at 1, 2 and every group and mixed per image (at batch 1,
per block), and budgets 0 and spread over the batch. The control: the
plain network converted to ONNX the same way, against Keras, on the same
images (the float32 rounding of onnxruntime's convolutions against
TensorFlow's, with no RNP graph involved). Use the default 224x224: at
32x32 the deepest maps are 1x1, the statistics set from 9 images (or 1)
are degenerate, and the control itself differs by 4e-4 (or 10).

    python benchmarks/export_parity.py
    python benchmarks/export_parity.py --models=mobilenetv2 --size=96
"""

import os
import platform
import tempfile

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_rnp  # noqa: E402
from keras_rnp import export as export_lib  # noqa: E402
from keras_rnp import io_utils  # noqa: E402

MODELS = {
    "resnet50": keras.applications.ResNet50,
    "resnet50v2": keras.applications.ResNet50V2,
    "mobilenetv2": keras.applications.MobileNetV2,
}

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(MODELS), f"Networks: {', '.join(MODELS)}.")
flags.DEFINE_integer("size", 224, "Input height and width.")
flags.DEFINE_integer("groups", 4, "Channel groups per gated width.")
flags.DEFINE_list("batches", ["1", "9"], "Batch sizes.")
flags.DEFINE_float("tolerance", 1e-4, "Largest logit difference that passes.")
flags.DEFINE_string(
    "output",
    "benchmarks/results/export_parity.json",
    "Where to write the JSON.",
)


def set_batch_norm_statistics(model, images):
    """Each batch norm's moving mean and variance from one training-mode
    pass over `images` (momentum 0 for that pass)."""
    norms = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    model(images, training=True)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def cases(rnp, batch, rng):
    """`(label, forced actions or None, budgets)` to compare."""
    steps, k = rnp.num_gated_layers, rnp.groups
    out = [
        (f"a={a}", np.full((batch, steps), a, np.int32), None)
        for a in (1, 2, k)
    ]
    out.append(
        ("mixed", rng.integers(1, k + 1, (batch, steps), np.int32), None)
    )
    out.append(("budget 0", None, np.zeros(batch, np.float32)))
    spread = np.linspace(0.5, 0.0, batch) if batch > 1 else np.array([0.05])
    out.append(("budgets spread", None, spread.astype(np.float32)))
    return out


def plain_onnx_difference(backbone, images, workdir, options):
    """The largest difference of the plain network's log-probabilities in
    onnxruntime (converted as `export_onnx` converts) from Keras'."""
    path = os.path.join(workdir, "plain.onnx")
    export_lib.plain_model_to_onnx(backbone, path)
    session = ort.InferenceSession(
        path, options, providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: images}
    got = np.log(np.maximum(session.run(None, feed)[0], 1e-30))
    want = np.log(np.maximum(backbone.predict(images, verbose=0), 1e-30))
    return float(np.abs(got - want).max())


def compare(name, rnp, images, workdir):
    """Rows of the largest logit difference and the share of images whose
    actions match, per runtime, batch and case."""
    serving = tf.saved_model.load(
        keras_rnp.export_saved_model(rnp, os.path.join(workdir, "sm"))
    ).signatures
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {}
    for forced in (False, True):
        path = os.path.join(workdir, f"rnp_{forced}.onnx")
        keras_rnp.export_onnx(rnp, path, forced_actions=forced)
        sessions[forced] = ort.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
    rng = np.random.default_rng(0)
    rows = []
    for batch in map(int, FLAGS.batches):  # Checked in main().
        x = images[:batch]
        for label, actions, budget in cases(rnp, batch, rng):
            if actions is None:
                expected = rnp.run(x, budget=budget)
                saved = serving["serving_budget"](
                    images=tf.constant(x), budget=tf.constant(budget)
                )
                feeds = {"images": x, "budget": budget}
            else:
                expected = rnp.run(x, actions=actions)
                saved = serving["serving_actions"](
                    images=tf.constant(x), forced_actions=tf.constant(actions)
                )
                feeds = {"images": x, "forced_actions": actions}
            onnx_out = sessions[actions is not None].run(
                ["logits", "actions"], feeds
            )
            outputs = {
                "saved_model": (saved["logits"].numpy(), saved["actions"]),
                "onnx": onnx_out,
            }
            want = expected["logits"].numpy()
            if rnp.ends_in_softmax:
                # The exports' logits are then log-probabilities (their
                # doc strings): compared with those of Keras' outputs.
                want = np.log(np.maximum(want, 1e-30))  # As the exports floor.
            for runtime, (logits, taken) in outputs.items():
                difference = float(np.abs(logits - want).max())
                same = np.all(np.asarray(taken) == expected["actions"], axis=1)
                # Forced actions are echoed: only a budget's are compared.
                identical = None if actions is not None else float(same.mean())
                rows.append(
                    {
                        "model": name,
                        "runtime": runtime,
                        "batch": batch,
                        "case": label,
                        "max_abs_logit_difference": difference,
                        "largest_abs_log_probability": float(
                            np.abs(want).max()
                        ),
                        "actions_identical_fraction": identical,
                        "distinct_action_rows": len(
                            np.unique(expected["actions"], axis=0)
                        ),
                        "passes": difference <= FLAGS.tolerance
                        and bool(same.all()),  # (Always, when forced.)
                    }
                )
                print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row):
    identical = row["actions_identical_fraction"]
    identical = "forced" if identical is None else f"{identical:.0%}"
    return (
        f"{row['model']:<12} {row['runtime']:<12} {row['batch']:>3} "
        f"{row['case']:<15} {row['max_abs_logit_difference']:9.2e} "
        f"(largest |log p| {row['largest_abs_log_probability']:6.2f}) "
        f"actions identical {identical:>6} "
        f"({row['distinct_action_rows']} distinct rows)"
        f"{'' if row['passes'] else '  FAILS'}"
    )


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.models) - set(MODELS))
    if unknown or not FLAGS.models:
        raise app.UsageError(
            f"--models: expected names from {sorted(MODELS)}. "
            f"Received: {FLAGS.models}."
        )
    if FLAGS.groups < 3:
        raise app.UsageError(
            "--groups: expected at least 3 (the cases force 1, 2 and every "
            f"group). Received: {FLAGS.groups}."
        )
    batches = [int(batch) for batch in FLAGS.batches]
    if not batches or min(batches) < 1:
        raise app.UsageError(
            f"--batches: expected sizes of at least 1. Received: {batches}."
        )
    shape = (FLAGS.size, FLAGS.size, 3)
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (max(batches), *shape)).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    rows, controls = [], {}
    for name in FLAGS.models:
        keras.utils.set_random_seed(0)
        backbone = MODELS[name](weights=None, input_shape=shape)
        set_batch_norm_statistics(backbone, images)
        rnp = keras_rnp.wrap(backbone, groups=FLAGS.groups, seed=0)
        with tempfile.TemporaryDirectory() as workdir:
            rows += compare(name, rnp, images, workdir)
            controls[name] = plain_onnx_difference(
                backbone, images, workdir, options
            )
        print(
            f"{name}: the plain network in onnxruntime against Keras, "
            f"batch {max(batches)}: {controls[name]:.2e}",
            flush=True,
        )
    failed = [row for row in rows if not row["passes"]]
    print(
        f"{len(rows) - len(failed)} of {len(rows)} comparisons within "
        f"{FLAGS.tolerance:g} with identical actions"
    )
    io_utils.write_json(
        FLAGS.output,
        {
            "machine": {
                "platform": platform.platform(),
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "onnxruntime": ort.__version__,
            },
            "size": FLAGS.size,
            "groups": FLAGS.groups,
            "tolerance": FLAGS.tolerance,
            "rows": rows,
            "plain_onnx_max_abs_difference": controls,
        },
    )
    print(f"Wrote {FLAGS.output}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
