"""Parity of the exported models with Keras, on real images.

Trains the quickstart's RNP model on the scikit-learn digits (or loads one
with --rnp_model), exports it as a SavedModel and as ONNX, and compares the
three on the digits test split at batch 1 and at batch 64: the largest
logit difference and the share of images whose actions agree exactly.

    python benchmarks/parity.py
    python benchmarks/parity.py --rnp_model=runs/quickstart/rnp.keras
"""

import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_rnp  # noqa: E402
from keras_rnp import io_utils  # noqa: E402
from keras_rnp.data_utils import load_digits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("rnp_model", None, "An RNP model (.keras); else train one.")
flags.DEFINE_string(
    "results", "benchmarks/results/parity.json", "Where to write the JSON."
)


def compare(rnp, images, budgets, batch, signatures, onnx_session):
    """Keras against the SavedModel and onnxruntime, batch by batch, with
    one budget per image (which spreads the actions)."""
    rows = []
    for runtime in ["saved_model", "onnx"]:
        worst, agree = 0.0, 0
        for start in range(0, len(images), batch):
            x = images[start : start + batch]
            budget = budgets[start : start + batch]
            expected = rnp.run(x, budget=budget)
            if runtime == "saved_model":
                out = signatures["serving_budget"](
                    images=tf.constant(x), budget=tf.constant(budget)
                )
                logits, actions = out["logits"].numpy(), out["actions"].numpy()
            else:
                logits, actions = onnx_session.run(
                    ["logits", "actions"], {"images": x, "budget": budget}
                )
            worst = max(worst, float(np.abs(logits - expected["logits"]).max()))
            agree += int(
                np.sum(np.all(actions == expected["actions"].numpy(), axis=1))
            )
        rows.append(
            {
                "runtime": runtime,
                "batch": batch,
                "images": len(images),
                "max_abs_logit_difference": worst,
                "actions_identical_fraction": agree / len(images),
            }
        )
        print(
            f"{runtime:<12} batch {batch:>3}: max |logit diff| {worst:.2e}, "
            f"actions identical for {agree}/{len(images)} images"
        )
    return rows


def main(argv):
    del argv
    if FLAGS.rnp_model:
        rnp = keras.saving.load_model(FLAGS.rnp_model)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            path = os.path.join(workdir, "rnp.keras")
            # The quickstart's model, trained by its script with its
            # default settings, without checkpoints (an empty --work_dir).
            subprocess.run(
                [
                    sys.executable,
                    QUICKSTART,
                    f"--output={path}",
                    "--verbose=0",
                    "--work_dir=",
                ],
                check=True,
            )
            rnp = keras.saving.load_model(path)
    (_, _), (x_test, _) = load_digits(0)
    with tempfile.TemporaryDirectory() as workdir:
        saved = keras_rnp.export_saved_model(rnp, os.path.join(workdir, "sm"))
        serving = tf.saved_model.load(saved)
        onnx_path = os.path.join(workdir, "rnp.onnx")
        keras_rnp.export_onnx(rnp, onnx_path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            onnx_path, options, providers=["CPUExecutionProvider"]
        )
        # Budgets from 0 (the learned policy) to 4 spread the actions.
        budgets = np.random.default_rng(0).uniform(0, 4, len(x_test))
        budgets = budgets.astype("float32")
        rows = []
        for batch in [1, 64]:
            rows += compare(
                rnp, x_test, budgets, batch, serving.signatures, session
            )
    actions = rnp.run(x_test, budget=budgets)["actions"].numpy()
    result = {
        "images": "scikit-learn digits, test split",
        "budgets": "uniform in [0, 4], one per image",
        "distinct_action_rows": int(len(np.unique(actions, axis=0))),
        "rows": rows,
    }
    print(f"{result['distinct_action_rows']} distinct action rows")
    io_utils.write_json(FLAGS.results, result)
    print(f"Wrote {FLAGS.results}")


if __name__ == "__main__":
    app.run(main)
