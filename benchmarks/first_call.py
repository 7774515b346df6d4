"""How long the first calls and the exports take, and what they cost.

Each measurement runs in a fresh Python process (a first call is first
only once, and peak memory is per process): the first `rnp.run()` and
`rnp.predict()` of a freshly wrapped model, `export_saved_model`, and
`export_onnx` beside tf2onnx's export of the plain backbone (the file
sizes side by side), `export_onnx` of the model loaded from its `.keras`
file in a process that never built it (`onnx_loaded`, as a user exports a
trained model), each with the memory resident when it starts and the peak
from there (VmHWM reset before the call, so the peak of building and
wrapping the model is not counted). Prints a table and writes JSON
(`--output`).

    python benchmarks/first_call.py                       # toys and VGG-16
    python benchmarks/first_call.py --models=toy2,toy4,toy8

Models: `toyL`, L gated 3x3 convolutions of 8 filters on 32x32 images
(the deployment issue's toy networks); `vgg16`, `keras.applications.VGG16`
(weights=None) at 224x224. Random weights: time does not depend on them.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["toy2", "toy4", "toy8", "vgg16"], "Networks.")
flags.DEFINE_list(
    "measures",
    ["run", "predict", "saved_model", "onnx", "onnx_loaded", "plain_onnx"],
    "What to time, each in a fresh process.",
)
flags.DEFINE_integer("groups", 4, "Channel groups per gated layer.")
flags.DEFINE_string(
    "output", "benchmarks/results/first_call.json", "Where to write JSON."
)
flags.DEFINE_string("one", None, "Internal: run one 'model:measure' here.")
flags.DEFINE_string(
    "keras_file", None, "Internal: the saved RNP model of onnx_loaded."
)

MEASURES = (
    "run",
    "predict",
    "saved_model",
    "onnx",
    "onnx_loaded",
    "plain_onnx",
)


def build(name, groups):
    import keras

    from keras_rnp import backbones

    keras.utils.set_random_seed(0)
    if name == "vgg16":
        return backbones.vgg16()
    if name.startswith("toy") and name[3:].isdigit():
        layers = [keras.Input((32, 32, 3))]
        for _ in range(int(name[3:])):
            layers += [
                keras.layers.Conv2D(8, 3, padding="same"),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
            ]
        layers += [
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
        return keras.Sequential(layers, name=name)
    raise app.UsageError(
        f"--models expects vgg16 or toyL (L an integer). Received: {name!r}"
    )


def measure_one(name, measure, groups):
    """Times one measure in this (fresh) process; returns a dict."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_rnp
    import keras_rnp.io_utils

    if measure == "onnx_loaded":
        # As a user exports a trained model: loaded from its .keras file
        # in a process that never built the backbone.
        rnp = keras.models.load_model(FLAGS.keras_file)
    else:
        backbone = build(name, groups)
        rnp = keras_rnp.wrap(backbone, groups=groups, gate_first=True)
        if measure == "save":
            keras_rnp.io_utils.save_model(rnp, FLAGS.keras_file)
            return {}
    images = (
        np.random.default_rng(0)
        .normal(size=(1, *rnp.image_shape))
        .astype("float32")
    )
    result = {"model": name, "measure": measure}
    # What the process holds before the call (the model, TensorFlow), and
    # the peak from there: the call's own, without building and wrapping.
    result["before_bytes"] = resident_memory("VmRSS")
    result["reset_peak"] = reset_peak_memory()
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        if measure == "run":
            rnp.run(images)["logits"].numpy()
        elif measure == "predict":
            rnp.predict(images, verbose=0)
        elif measure == "saved_model":
            keras_rnp.export_saved_model(rnp, os.path.join(workdir, "m"))
        elif measure in ("onnx", "onnx_loaded"):
            path = os.path.join(workdir, "m.onnx")
            keras_rnp.export_onnx(rnp, path)
            result["bytes"] = os.path.getsize(path)
        elif measure == "plain_onnx":
            import tf2onnx

            # As export_onnx does: no copy of the graph per optimizer pass
            # (without it, VGG-16's plain export ran out of 24 GB).
            os.environ["TF2ONNX_CATCH_ERRORS"] = "FALSE"

            path = os.path.join(workdir, "plain.onnx")
            spec = tf.TensorSpec((None, *rnp.image_shape), name="images")
            tf2onnx.convert.from_function(
                tf.function(lambda x: backbone(x, training=False)),
                input_signature=[spec],
                opset=17,
                output_path=path,
            )
            result["bytes"] = os.path.getsize(path)
        result["seconds"] = time.perf_counter() - start
    result["peak_bytes"] = resident_memory("VmHWM")
    return result


def resident_memory(key):
    """This process's resident memory in bytes from /proc/self/status:
    `VmRSS` now or `VmHWM` its peak (which exec resets, where ru_maxrss
    keeps the parent's peak across fork and exec), None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory():
    """Resets VmHWM to the current resident memory (Linux 4.0+: writing 5
    to /proc/self/clear_refs); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def format_row(row):
    if "error" in row:
        return f"{row['model']:<6} {row['measure']:<12} {row['error']}"
    size = f"{row['bytes'] / 2**20:9.2f}" if "bytes" in row else " " * 9

    def gib(key):
        value = row.get(key)
        return f"{value / 2**30:8.2f}" if value is not None else " " * 8

    return (
        f"{row['model']:<6} {row['measure']:<12} {row['seconds']:9.2f} "
        f"{gib('before_bytes')} {gib('peak_bytes')} {size}"
    )


# Before: resident memory when the call starts; peak: the peak from there
# (the process's peak, model building included, where VmHWM cannot be
# reset: see each row's reset_peak).
HEADER = (
    f"{'model':<6} {'measure':<12} {'seconds':>9} {'GiB at 0':>8} "
    f"{'peak GiB':>8} {'MiB':>9}"
)


def main(argv):
    del argv
    if FLAGS.one:
        name, measure = FLAGS.one.split(":")
        print(json.dumps(measure_one(name, measure, FLAGS.groups)))
        return
    unknown = set(FLAGS.measures) - set(MEASURES)
    if unknown:
        raise app.UsageError(
            f"--measures expects some of {list(MEASURES)}. Received: "
            f"{sorted(unknown)}"
        )
    for name in FLAGS.models:
        build(name, FLAGS.groups)  # Fails early on a bad name.
    print(HEADER, flush=True)
    rows = []
    for name in FLAGS.models:
        for measure in FLAGS.measures:
            with tempfile.TemporaryDirectory() as workdir:
                done = run_one(name, measure, workdir)
            lines = done.stdout.strip().splitlines()
            if done.returncode or not lines:
                error = (done.stderr.strip().splitlines() or ["failed"])[-1]
                row = {"model": name, "measure": measure, "error": error}
            else:
                row = json.loads(lines[-1])
            rows.append(row)
            print(format_row(row), flush=True)
            write_results(rows)
    print(f"Wrote {FLAGS.output}")


def run_one(name, measure, workdir):
    """Runs one measure in a fresh process (for `onnx_loaded`, after
    another that wraps the model and saves it in `workdir`)."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--groups={FLAGS.groups}",
        f"--keras_file={os.path.join(workdir, 'rnp.keras')}",
    ]
    if measure == "onnx_loaded":
        saved = subprocess.run(
            [*command, f"--one={name}:save"], capture_output=True, text=True
        )
        if saved.returncode:
            return saved
    return subprocess.run(
        [*command, f"--one={name}:{measure}"], capture_output=True, text=True
    )


def write_results(rows):
    from importlib import metadata

    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "tensorflow": metadata.version("tensorflow"),
        },
        "flags": {
            "models": FLAGS.models,
            "measures": FLAGS.measures,
            "groups": FLAGS.groups,
        },
        "rows": rows,
    }
    # Written here, not with keras_rnp.io_utils: importing TensorFlow in
    # this parent process would cost every measurement's start-up memory.
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    staging = FLAGS.output + ".tmp"
    with open(staging, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(staging, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
