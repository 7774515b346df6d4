"""Exported models under concurrent requests: answers, memory, latency.

Loads one SavedModel (and one onnxruntime session) and calls it from
`--threads` threads, `--requests` requests each, with mixed batch sizes
(1-64), budgets and forced actions drawn from a fixed seed. Every answer is
compared with a single-threaded reference computed first; the resident
memory (RSS) is read after a warm-up and at the end; latencies (p50, p99)
and throughput are reported beside the plain backbone's under the same
load (the same requests, its own export in the same runtime).

    python benchmarks/concurrency.py --threads=8 --requests=500

Prints a table and writes JSON (`--output`).
"""

import concurrent.futures
import os
import platform
import tempfile
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_rnp  # noqa: E402
from keras_rnp import backbones  # noqa: E402
from keras_rnp import io_utils  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("threads", 8, "Threads sharing one loaded model.")
flags.DEFINE_integer("requests", 500, "Requests per thread.")
flags.DEFINE_integer("max_batch", 64, "Largest batch of a request.")
flags.DEFINE_list("runtimes", ["saved_model", "onnx"], "Runtimes to load.")
flags.DEFINE_string(
    "output", "benchmarks/results/concurrency.json", "Where to write JSON."
)
flags.DEFINE_integer("seed", 0, "Seed of the weights and the requests.")
flags.DEFINE_bool(
    "onnx_mem_pattern",
    True,
    "onnxruntime's memory pattern planning (SessionOptions."
    "enable_mem_pattern), which keeps a plan per input shape.",
)
flags.DEFINE_bool(
    "onnx_arena",
    True,
    "onnxruntime's CPU memory arena (SessionOptions.enable_cpu_mem_arena).",
)


def make_requests(rnp, count, max_batch, seed):
    """`count` requests: images, and a budget or forced actions."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        batch = int(rng.integers(1, max_batch + 1))
        images = rng.normal(size=(batch, *rnp.image_shape))
        request = {"images": images.astype("float32")}
        if rng.random() < 0.5:
            budget = rng.choice([0.0, 0.05, 0.2, 1.0], size=batch)
            request["budget"] = budget.astype("float32")
        else:
            shape = (batch, rnp.num_gated_layers)
            actions = rng.integers(1, rnp.groups + 1, size=shape)
            request["forced_actions"] = actions.astype("int32")
        requests.append(request)
    return requests


def saved_model_callers(rnp, backbone, workdir):
    """`(call_rnp, call_plain)`, each `request -> {name: array}`."""
    path = keras_rnp.export_saved_model(rnp, os.path.join(workdir, "rnp"))
    loaded = tf.saved_model.load(path)
    plain_path = os.path.join(workdir, "plain")
    backbone.export(plain_path, format="tf_saved_model", verbose=0)
    plain = tf.saved_model.load(plain_path)

    def call_rnp(request):
        if "budget" in request:
            function = loaded.signatures["serving_budget"]
        else:
            function = loaded.signatures["serving_actions"]
        out = function(**{k: tf.constant(v) for k, v in request.items()})
        return {k: v.numpy() for k, v in out.items() if k != "probabilities"}

    def call_plain(request):
        return {"logits": plain.serve(tf.constant(request["images"])).numpy()}

    return call_rnp, call_plain, [loaded, plain]


def onnx_callers(rnp, backbone, workdir):
    import onnxruntime as ort
    import tf2onnx

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = FLAGS.onnx_arena
    options.enable_mem_pattern = FLAGS.onnx_mem_pattern
    sessions = {}
    for key, forced in (("budget", False), ("forced_actions", True)):
        path = os.path.join(workdir, f"rnp_{key}.onnx")
        keras_rnp.export_onnx(rnp, path, forced_actions=forced)
        sessions[key] = ort.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
    spec = tf.TensorSpec(backbone.inputs[0].shape, tf.float32, name="images")
    plain_path = os.path.join(workdir, "plain.onnx")
    tf2onnx.convert.from_function(
        tf.function(lambda images: backbone(images, training=False)),
        input_signature=[spec],
        opset=17,
        output_path=plain_path,
    )
    plain = ort.InferenceSession(
        plain_path, options, providers=["CPUExecutionProvider"]
    )
    names = ["logits", "actions", "flops"]

    def call_rnp(request):
        key = "budget" if "budget" in request else "forced_actions"
        out = sessions[key].run(names, request)
        return dict(zip(names, out, strict=True))

    def call_plain(request):
        feed = {plain.get_inputs()[0].name: request["images"]}
        return {"logits": plain.run(None, feed)[0]}

    return call_rnp, call_plain, [sessions, plain]


def rss_bytes():
    """The process's resident memory, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def under_load(call, requests, threads, per_thread):
    """Runs `per_thread` requests on each of `threads` threads (thread t
    takes requests t, t + threads, ...); returns every `(request index,
    answer)`, the latencies and the wall time."""

    def worker(t):
        answers, latencies = [], []
        for j in range(per_thread):
            index = (t + j * threads) % len(requests)
            start = time.perf_counter()
            answers.append((index, call(requests[index])))
            latencies.append(time.perf_counter() - start)
        return answers, latencies

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(worker, range(threads)))
    wall = time.perf_counter() - start
    answers = [pair for a, _ in results for pair in a]
    latencies = np.concatenate([np.asarray(lat) for _, lat in results])
    return answers, latencies, wall


def mismatches(answers, reference):
    """How many answers differ from the single-threaded reference (actions
    exactly, logits and FLOPs within float tolerance)."""
    wrong = 0
    for index, answer in answers:
        want = reference[index]
        same = all(
            np.array_equal(answer[key], want[key])
            if key == "actions"
            else np.allclose(answer[key], want[key], rtol=1e-5, atol=1e-5)
            for key in want
        )
        wrong += not same
    return wrong


def flops_ratio(answers, requests, full_flops):
    """Mean FLOPs per image of the answers over `full_flops` (None for the
    plain model, whose answers carry no FLOPs)."""
    if "flops" not in answers[0]:
        return None
    total = sum(float(np.sum(answer["flops"])) for answer in answers)
    images = sum(len(request["images"]) for request in requests)
    return total / images / full_flops


def measure(runtime, callers, requests, threads, per_thread, full_flops):
    call_rnp, call_plain, _keep = callers
    row = {"runtime": runtime, "threads": threads, "requests": per_thread}
    for name, call in (("rnp", call_rnp), ("plain", call_plain)):
        reference = [call(request) for request in requests]
        # Warm-up under load (every request, so every batch size, once),
        # then the measured run.
        under_load(call, requests, threads, -(-len(requests) // threads))
        before = rss_bytes()
        answers, latencies, wall = under_load(
            call, requests, threads, per_thread
        )
        after = rss_bytes()
        images = sum(len(requests[i]["images"]) for i, _ in answers)
        row[name] = {
            "mismatches": mismatches(answers, reference),
            # Mean FLOPs executed per image over the full network's (RNP).
            "flops_ratio": flops_ratio(reference, requests, full_flops),
            "answers": len(answers),
            "p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "p99_ms": float(np.percentile(latencies, 99) * 1e3),
            "requests_per_second": len(latencies) / wall,
            "images_per_second": images / wall,
            "rss_after_warmup_mb": before / 2**20,
            "rss_growth": (after - before) / before,
        }
    return row


FLAG_NAMES = (
    "threads",
    "requests",
    "max_batch",
    "seed",
    "runtimes",
    "onnx_arena",
    "onnx_mem_pattern",
)


def flag_text(name):
    value = FLAGS[name].value
    return ",".join(value) if isinstance(value, list) else value


def main(argv):
    del argv
    import keras

    keras.utils.set_random_seed(FLAGS.seed)
    backbone = backbones.cifar_cnn(pool_first=False, normalize=False)
    rnp = keras_rnp.wrap(backbone, groups=4, seed=FLAGS.seed)
    # Decisions that differ between images (a fresh network mostly agrees).
    rng = np.random.default_rng(FLAGS.seed)
    for decoder in rnp.decision.decoders:
        kernel, bias = decoder.get_weights()
        decoder.set_weights(
            [rng.normal(0, 1.0, kernel.shape), rng.normal(0, 0.1, bias.shape)]
        )
    requests = make_requests(rnp, 64, FLAGS.max_batch, FLAGS.seed)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for runtime in FLAGS.runtimes:
            print(f"[{runtime}] exporting and loading...", flush=True)
            makers = {"saved_model": saved_model_callers, "onnx": onnx_callers}
            callers = makers[runtime](rnp, backbone, workdir)
            row = measure(
                runtime,
                callers,
                requests,
                FLAGS.threads,
                FLAGS.requests,
                rnp.full_flops,
            )
            rows.append(row)
            for name in ("rnp", "plain"):
                r = row[name]
                print(
                    f"{runtime:12s} {name:6s} answers {r['answers']:5d} "
                    f"mismatches {r['mismatches']} p50 {r['p50_ms']:7.2f} ms "
                    f"p99 {r['p99_ms']:7.2f} ms {r['requests_per_second']:7.1f}"
                    f" req/s {r['images_per_second']:8.0f} img/s RSS "
                    f"{r['rss_after_warmup_mb']:.0f} MB growth "
                    f"{100 * r['rss_growth']:+.1f}%",
                    flush=True,
                )
    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
        },
        "command": "python benchmarks/concurrency.py "
        + " ".join(f"--{name}={flag_text(name)}" for name in FLAG_NAMES),
        "rows": rows,
    }
    io_utils.write_json(FLAGS.output, result)
    print(f"Wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
