"""How should an ONNX graph hold a gated convolution's weights?

Times, in onnxruntime at batch 1, one gated 3x3 convolution (input and
output channels in `--groups` groups) computing its first `a` groups of
input and output channels, three ways, alternately run after run:

- `fixed`: the slice `kernel[:, :, :a*gi, :a*go]` as a constant of its own
  (what `export_onnx` writes: one constant per action pair, the weights
  stored about `(k + 1)^2 / 4` times);
- `runtime`: one stored kernel, sliced in the graph from `a` given at run
  time (each weight stored once);
- `blocks`: the kernel stored once as `k x k` constant blocks of
  `gi x go` channels; output group `o` is the sum over input groups
  `i < a` of the block convolutions (`a^2` small convolutions).

    python benchmarks/onnx_weights.py
    python benchmarks/onnx_weights.py --size=28 --channels=128,256

Prints a table and writes JSON (`--output`).
"""

import os
import platform
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_rnp import io_utils  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 8, "Height and width of the feature map.")
flags.DEFINE_list("channels", ["256", "512"], "Input and output channels.")
flags.DEFINE_integer("groups", 4, "Channel groups.")
flags.DEFINE_integer("repeats", 7, "Timed rounds (median).")
flags.DEFINE_integer("calls", 30, "Calls per round.")
flags.DEFINE_string(
    "output", "benchmarks/results/onnx_weights.json", "Where to write JSON."
)

WAYS = ("fixed", "runtime", "blocks")


def graph(way, kernel, size, groups, a):
    """A tf.function of `(x, a)` for one way of holding the weights."""
    cin, cout = kernel.shape[2:]
    gi, go = cin // groups, cout // groups
    spec = [
        tf.TensorSpec([None, size, size, cin], name="x"),
        tf.TensorSpec([1], tf.int32, name="a"),
    ]

    @tf.function(input_signature=spec)
    def run(x, active):
        # Constants built inside the function: tf2onnx stores them as
        # initializers (captured tensors would become graph inputs).
        if way == "fixed":
            w = tf.constant(kernel[:, :, : a * gi, : a * go])
            y = tf.nn.conv2d(x[..., : a * gi], w, 1, "SAME")
        elif way == "runtime":
            n = active[0]
            w = tf.constant(kernel)[:, :, : n * gi, : n * go]
            w = tf.reshape(w, tf.stack([3, 3, n * gi, n * go]))
            y = tf.nn.conv2d(x[:, :, :, : n * gi], w, 1, "SAME")
        else:
            outputs = []
            for o in range(a):
                total = None
                for i in range(a):
                    block = kernel[:, :, i * gi : (i + 1) * gi]
                    block = tf.constant(block[..., o * go : (o + 1) * go])
                    part = x[..., i * gi : (i + 1) * gi]
                    y = tf.nn.conv2d(part, block, 1, "SAME")
                    total = y if total is None else total + y
                outputs.append(total)
            y = tf.concat(outputs, axis=-1)
        # Every way reads `active`, so every model has the same inputs.
        return y + tf.cast(active[0] * 0, y.dtype)

    return run, spec


def session(function, spec):
    import onnxruntime as ort
    import tf2onnx

    proto, _ = tf2onnx.convert.from_function(
        function, input_signature=spec, opset=17
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    stored = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    return (
        ort.InferenceSession(
            proto.SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
        ),
        stored,
    )


def main(argv):
    del argv
    try:
        cin, cout = (int(c) for c in FLAGS.channels)
    except ValueError:
        raise app.UsageError(
            "--channels expects two integers (input, output). Received: "
            f"{FLAGS.channels}"
        ) from None
    if cin % FLAGS.groups or cout % FLAGS.groups:
        raise app.UsageError(
            f"--channels must be divisible by --groups={FLAGS.groups}. "
            f"Received: {cin}, {cout}"
        )
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, cin, cout)).astype("float32")
    x = rng.normal(size=(1, FLAGS.size, FLAGS.size, cin)).astype("float32")
    print(
        f"{'a':>2} {'way':<8} {'ms':>8} {'weights in model':>16} "
        f"{'max diff':>9}"
    )
    rows = []
    for a in range(1, FLAGS.groups + 1):
        runs = {}
        for way in WAYS:
            model, stored = session(
                *graph(way, kernel, FLAGS.size, FLAGS.groups, a)
            )
            feed = {"x": x, "a": np.array([a], np.int32)}
            names = [i.name for i in model.get_inputs()]
            feed = dict(zip(names, feed.values(), strict=True))
            runs[way] = (model, feed, stored, model.run(None, feed)[0])
        times = {way: [] for way in WAYS}
        for _ in range(FLAGS.repeats):
            for way in WAYS:
                model, feed = runs[way][:2]
                start = time.perf_counter()
                for _ in range(FLAGS.calls):
                    model.run(None, feed)
                times[way].append((time.perf_counter() - start) / FLAGS.calls)
        reference = runs["fixed"][3]
        for way in WAYS:
            row = {
                "a": a,
                "way": way,
                "seconds": float(np.median(times[way])),
                "stored_weights": runs[way][2],
                "max_abs_difference": float(
                    np.abs(runs[way][3] - reference).max()
                ),
            }
            rows.append(row)
            print(
                f"{a:>2} {way:<8} {row['seconds'] * 1e3:8.3f} "
                f"{row['stored_weights']:16,} {row['max_abs_difference']:9.1e}"
            )
    io_utils.write_json(
        FLAGS.output,
        {
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "tensorflow": tf.__version__,
            },
            "flags": {
                "size": FLAGS.size,
                "channels": [cin, cout],
                "groups": FLAGS.groups,
                "repeats": FLAGS.repeats,
                "calls": FLAGS.calls,
            },
            "rows": rows,
        },
    )
    print(f"Wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
