"""Does RNP save real time? Forced actions against the plain backbone.

For each network and batch size, times the plain (unwrapped) backbone and
the RNP model, alternately run after run, with every gated layer forced to
a = 1..groups, plus mixed per-image actions drawn uniformly from 1..groups,
in four runtimes: Keras (`rnp.run`, a compiled tf.function), the exported
SavedModel (`serving_actions` signature), onnxruntime (the forced-actions
ONNX export) and the LiteRT interpreter with XNNPACK (the forced-actions
LiteRT export); the plain backbone runs in the same runtime each time.
Random weights: speed does not depend on them. Each uniform setting below
the full width also times the static network of the same widths (L1
pruning), in the same loop: what a network that narrow costs in the
runtime, so the gap between it and RNP is what the decisions and the
run-time slices cost.

With `--policy_model`, a trained RNP model (`.keras`) is also timed as it
serves: its learned policy decides each image's actions (no forced
actions; the default signature or file of each export) on the first
`--policy_images` images of a real split, batch after batch, against its
own full-width network (`keras_rnp.strip`) on the same images. With
`--settings=decided`, the random-weight RNP model's own decision network
decides instead of forced actions, beside the forced-actions export on the
actions it took: what deciding costs in each runtime.

    python benchmarks/speed.py --models=cifar4 --repeats=7
    python benchmarks/speed.py --models=vgg16 --batches=1
    python benchmarks/speed.py --models=resnet20,mobilenetv2 --batches=1
    python benchmarks/speed.py --models=resnet50 --settings=decided
    python benchmarks/speed.py --models= \
        --policy_model=runs/cifar10/rnp_p0.07.keras \
        --data_dir=../shared/data/cifar10

Prints a table and writes JSON (`--output`): per setting, the FLOPs
speed-up (full FLOPs over the FLOPs the RNP model executes, decision
network included) and the measured speed-up (median plain time over median
RNP time), side by side.
"""

import os
import platform
import tempfile
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_rnp  # noqa: E402
from keras_rnp import backbones  # noqa: E402
from keras_rnp import export as export_lib  # noqa: E402
from keras_rnp import io_utils  # noqa: E402
from keras_rnp.data_utils import load_split  # noqa: E402
from keras_rnp.static_pruning import l1_prune  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "models",
    ["cifar4", "vgg16"],
    "Networks to time (random weights); --models= for none, with "
    "--policy_model.",
)
flags.DEFINE_list("batches", ["1", "64"], "Batch sizes.")
flags.DEFINE_list(
    "runtimes",
    ["keras", "saved_model", "onnx", "litert"],
    "Runtimes to time: keras, saved_model, onnx, litert (export_litert's "
    "default layout, prefixes), litert_blocks (layout='blocks').",
)
flags.DEFINE_integer("groups", 4, "Channel groups per gated layer.")
flags.DEFINE_integer("repeats", 5, "Timed runs per setting (median).")
flags.DEFINE_string(
    "output", "benchmarks/results/speed.json", "Where to write the JSON."
)
flags.DEFINE_integer("seed", 0, "Seed of the weights, images and actions.")
flags.DEFINE_string(
    "policy_model",
    None,
    "A trained RNP model (.keras) to time under its learned policy on real "
    "images (the 'policy' rows).",
)
flags.DEFINE_string(
    "data_dir",
    None,
    "The policy model's images (with --policy_model): an ImageFolder "
    "directory, or tfds' data directory for --dataset.",
)
flags.DEFINE_string("dataset", "cifar10", "tfds dataset of the images.")
flags.DEFINE_string("split", "test", "Split of the images.")
flags.DEFINE_integer(
    "policy_images",
    256,
    "Images the policy model is timed on (each run).",
    lower_bound=1,
)
flags.DEFINE_list(
    "settings",
    ["uniform", "mixed"],
    "Actions timed per model: 'uniform' (every gated layer at a = 1.."
    "groups, and the static network of those widths), or one of them "
    "('a=2'), 'mixed' (per-image "
    "actions drawn uniformly, batches above 1), 'decided' (the default "
    "signature or file, whose decision network, random like the weights, "
    "decides; beside it, the forced-actions one on the actions it took: "
    "the two differ by what deciding costs; in Keras, run() with forced "
    "actions still steps the decision network for its Q-values, so there "
    "they differ by the greedy choice alone).",
)
flags.DEFINE_enum(
    "ort_rnp_level",
    "all",
    ["all", "extended", "basic"],
    "onnxruntime's graph optimization level for the RNP model's session "
    "(the plain model's is always 'all', the default): 'extended' leaves "
    "out the NCHWc layout transformer.",
)

# The CIFAR network without input normalization nor pooling after the
# first block, VGG-16, and residual networks: ResNet-20 (CIFAR), ResNet-50
# and MobileNetV2 (224x224, keras.applications).
MODELS = {
    "cifar4": lambda: backbones.cifar_cnn(
        pool_first=False, normalize=False, name="cifar4"
    ),
    "vgg16": backbones.vgg16,
    "resnet20": lambda: backbones.resnet20(normalize=False),
    "resnet50": lambda: keras.applications.ResNet50(weights=None),
    "mobilenetv2": lambda: keras.applications.MobileNetV2(weights=None),
}


def median_times(functions, repeats, warmup=3):
    """Median wall time of each function, run in turn `repeats` times
    after `warmup` runs of each (onnxruntime's first calls after a session
    is made ran 2x slower), so that all see the same machine load."""
    for function in functions:
        for _ in range(warmup):
            function()
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, measured in zip(functions, times, strict=True):
            start = time.perf_counter()
            function()
            measured.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


class Runtimes:
    """For each runtime, a function that makes a Keras model's callable
    `run(images)` in that runtime, and the RNP model's `run(images,
    actions)` there: the forced-actions signature or file of each export,
    or with `forced=False` the default one, where the learned policy
    decides (`actions` is then ignored, and the call returns the actions
    and FLOPs the runtime computed, as arrays)."""

    def __init__(self, rnp, workdir, forced=True):
        self.rnp, self.workdir, self.forced = rnp, workdir, forced
        # What this factory made (the count names the next file), and the
        # RNP SavedModel's loaded object, which its functions need.
        self.loaded = []

    def _path(self, name):
        return os.path.join(self.workdir, f"{name}_{len(self.loaded)}")

    def keras(self):
        def plain(model):
            function = tf.function(lambda x: model(x, training=False))
            return lambda x: function(x).numpy()

        def run_rnp(x, actions):
            if not self.forced:
                return decisions(self.rnp.run(x))
            self.rnp.run(x, actions=actions)["logits"].numpy()

        return plain, run_rnp

    def saved_model(self):
        def plain(model):
            path = self._path("plain_saved_model")
            self.loaded.append(path)
            model.export(path, format="tf_saved_model", verbose=0)
            # The closure holds the loaded object (its functions need it),
            # so dropping the closure frees it.
            loaded = tf.saved_model.load(path)
            return lambda x: loaded.serve(tf.constant(x)).numpy()

        path = keras_rnp.export_saved_model(
            self.rnp, os.path.join(self.workdir, "rnp_saved_model")
        )
        self.loaded.append(tf.saved_model.load(path))
        forced = self.loaded[-1].signatures["serving_actions"]
        default = self.loaded[-1].signatures["serving_default"]

        def run_rnp(x, actions):
            if not self.forced:
                return decisions(default(images=tf.constant(x)))
            out = forced(
                images=tf.constant(x),
                forced_actions=tf.constant(actions, tf.int32),
            )
            out["logits"].numpy()

        return plain, run_rnp

    def onnx(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3

        def plain(model):
            path = self._path("plain") + ".onnx"
            self.loaded.append(path)
            # Converted as export_onnx converts (the weights inputs while
            # tf2onnx works: VGG-16's plain model took 22 GB otherwise).
            export_lib.plain_model_to_onnx(model, path)
            session = ort.InferenceSession(
                path, options, providers=["CPUExecutionProvider"]
            )
            name = session.get_inputs()[0].name
            return lambda x: session.run(None, {name: x})

        path = os.path.join(self.workdir, "rnp.onnx")
        keras_rnp.export_onnx(self.rnp, path, forced_actions=self.forced)
        rnp_options = ort.SessionOptions()
        rnp_options.log_severity_level = 3
        level = ort.GraphOptimizationLevel
        rnp_options.graph_optimization_level = {
            "all": level.ORT_ENABLE_ALL,
            "extended": level.ORT_ENABLE_EXTENDED,
            "basic": level.ORT_ENABLE_BASIC,
        }[FLAGS.ort_rnp_level]
        session = ort.InferenceSession(
            path, rnp_options, providers=["CPUExecutionProvider"]
        )

        def run_rnp(x, actions):
            if not self.forced:  # Budget 0: the learned policy.
                budget = np.zeros([1], np.float32)
                names = ["logits", "actions", "flops"]
                out = session.run(names, {"images": x, "budget": budget})
                return decisions(dict(zip(names, out, strict=True)))
            session.run(
                ["logits"],
                {"images": x, "forced_actions": actions.astype(np.int32)},
            )

        return plain, run_rnp

    def litert(self, layout="prefixes"):
        from ai_edge_litert.interpreter import Interpreter

        def plain(model):
            # The same converter for the plain networks, builtin ops.
            converter = tf.lite.TFLiteConverter.from_keras_model(model)
            path = self._path("plain") + ".tflite"
            self.loaded.append(path)
            with open(path, "wb") as f:
                f.write(converter.convert())
            # XNNPACK is the interpreter's default delegate on CPU.
            runner = Interpreter(model_path=path).get_signature_runner()
            name = next(iter(runner.get_input_details()))
            return lambda x: runner(**{name: x})

        path = os.path.join(self.workdir, "rnp.tflite")
        keras_rnp.export_litert(
            self.rnp, path, forced_actions=self.forced, layout=layout
        )
        name = "serving_actions" if self.forced else "serving_default"
        runner = Interpreter(model_path=path).get_signature_runner(name)

        def run_rnp(x, actions):
            if not self.forced:
                return decisions(runner(images=x))
            runner(images=x, forced_actions=actions.astype(np.int32))

        return plain, run_rnp

    def litert_blocks(self):
        """LiteRT with `layout="blocks"`: each weight stored once."""
        return self.litert("blocks")


RUNTIMES = ("keras", "saved_model", "onnx", "litert", "litert_blocks")


def decisions(outputs):
    """The actions and FLOPs of a policy call's outputs, as arrays (the
    logits too are read, so that every runtime hands them over)."""
    np.asarray(outputs["logits"])
    return np.asarray(outputs["actions"]), np.asarray(outputs["flops"])


def same_widths(backbone, rnp, a):
    """The static network of the widths action `a` computes everywhere:
    each gated convolution keeps `a` of its groups (L1 pruning; speed does
    not depend on which filters). What a network of those widths costs in
    a runtime, without RNP's decisions and run-time slices."""
    return l1_prune(backbone, keep=a / rnp.groups, prune_first=rnp.gate_first)


def make_row(model, runtime, batch, label, times, full_flops, flops):
    """A result row: `times` are the plain model's, the RNP model's and
    (uniform actions below the full width only) the static network's of
    the same widths; `flops` the RNP model's per image."""
    row = {
        "model": model,
        "runtime": runtime,
        "batch": batch,
        "actions": label,
        "plain_seconds": times[0],
        "rnp_seconds": times[1],
        "flops_speedup": full_flops / float(np.mean(flops)),
        "time_speedup": times[0] / times[1],
        "static_seconds": None,
        "static_time_speedup": None,
    }
    row["efficiency"] = row["time_speedup"] / row["flops_speedup"]
    if len(times) > 2:
        row["static_seconds"] = times[2]
        row["static_time_speedup"] = times[0] / times[2]
    return row


def uniform_actions(settings, groups):
    """The uniform actions `--settings` asks for: every one for 'uniform',
    else those named 'a=K'."""
    if "uniform" in settings:
        return list(range(1, groups + 1))
    return sorted({int(s[2:]) for s in settings if s.startswith("a=")})


def benchmark_model(name, batches, runtimes, groups, repeats, seed, settings):
    keras.utils.set_random_seed(seed)
    backbone = MODELS[name]()
    rnp = keras_rnp.wrap(backbone, groups=groups)
    steps = rnp.num_gated_layers
    rng = np.random.default_rng(seed)
    shape = backbone.inputs[0].shape[1:]
    images = {
        b: rng.normal(size=(b, *shape)).astype("float32") for b in batches
    }
    mixed = {
        b: rng.integers(1, groups + 1, size=(b, steps))
        for b in batches
        if b > 1
    }
    rows = []

    def add(row):
        rows.append(row)
        print(format_row(row), flush=True)

    def time_forced(runtime, label, actions, runs):
        """Times `runs` (plain, RNP[, static]) on the images of the
        actions' batch size."""
        x = images[len(actions)]
        flops = rnp.run(x, actions=actions)["flops"].numpy()
        functions = [lambda: runs[0](x), lambda: runs[1](x, actions)]
        functions += [lambda run=run: run(x) for run in runs[2:]]
        times = median_times(functions, repeats)
        add(
            make_row(name, runtime, len(x), label, times, rnp.full_flops, flops)
        )

    with tempfile.TemporaryDirectory() as workdir:
        factory = Runtimes(rnp, workdir)
        os.makedirs(os.path.join(workdir, "decided"))
        deciding = Runtimes(rnp, os.path.join(workdir, "decided"), False)
        for runtime in runtimes:
            print(f"[{name}] preparing {runtime}...", flush=True)
            plain, run_rnp = getattr(factory, runtime)()
            run_plain = plain(backbone)
            if "decided" in settings:
                run_decided = getattr(deciding, runtime)()[1]
                for x in images.values():
                    add(
                        time_decided(
                            name,
                            runtime,
                            x,
                            rnp,
                            repeats,
                            run_plain,
                            run_decided,
                            run_rnp,
                        )
                    )
                del run_decided
            for a in uniform_actions(settings, groups):
                # One static network at a time: VGG-16's onnxruntime
                # sessions hold gigabytes each at batch 64.
                run_static = None
                if a < groups:
                    run_static = plain(same_widths(backbone, rnp, a))
                runs = [run_plain, run_rnp]
                runs += [run_static] if run_static is not None else []
                for batch in batches:
                    actions = np.full((batch, steps), a)
                    time_forced(runtime, f"a={a}", actions, runs)
                del run_static, runs
            if "mixed" in settings:
                for actions in mixed.values():
                    time_forced(runtime, "mixed", actions, [run_plain, run_rnp])
    return rows


def time_decided(name, runtime, x, rnp, repeats, plain, decided, forced):
    """A 'decided' row: the plain model, the RNP model deciding (`decided`,
    its default signature or file) and, in `forced_seconds`, the
    forced-actions one on the actions it took, in one loop. Their
    difference is what the decision network costs in the runtime."""
    actions, flops = decided(x, None)
    times = median_times(
        [
            lambda: plain(x),
            lambda: decided(x, None),
            lambda: forced(x, actions),
        ],
        repeats,
    )
    row = make_row(
        name, runtime, len(x), "decided", times[:2], rnp.full_flops, flops
    )
    row.update(
        forced_seconds=times[2],
        forced_time_speedup=times[0] / times[2],
        mean_actions=actions.mean(axis=0).tolist(),
    )
    return row


def benchmark_policy(path, batches, runtimes, repeats, on_rows):
    """A trained RNP model under its learned policy on real images.

    Each timed run serves the first `--policy_images` images of the split,
    batch after batch (a last partial batch is dropped), once through the
    model's full-width network and once through the RNP model; the
    decisions are the model's own (budget 0). The FLOPs speed-up is the
    full network's FLOPs over the mean FLOPs the runtime reported for
    those images (decision network included), from an untimed pass; the
    row also says how many of the runtime's actions match Keras'. In the
    same loop, the forced-actions export runs the same images with the
    actions the policy took (`forced_seconds`): the same sliced work
    without the decision network, so the two differ by what deciding
    costs. `on_rows(rows)` is called after each runtime.
    """
    rnp = keras.saving.load_model(path)
    if not isinstance(rnp, keras_rnp.RNPModel):
        raise app.UsageError(
            "--policy_model expects a saved keras_rnp.RNPModel. Received: "
            f"{path}, a {type(rnp).__name__}."
        )
    backbone = keras_rnp.strip(rnp)
    images, _ = load_split(FLAGS.dataset, FLAGS.split, FLAGS.data_dir)
    if images.shape[1:] != tuple(rnp.image_shape):
        raise app.UsageError(
            f"--policy_model expects images of shape {rnp.image_shape}. "
            f"Received: {images.shape[1:]} from {FLAGS.dataset} "
            f"({FLAGS.data_dir or 'tfds'})."
        )
    images = images[: FLAGS.policy_images]
    if len(images) < max(batches):
        raise app.UsageError(
            f"--policy_images expects at least one batch of {max(batches)} "
            f"images. Received: {len(images)} images."
        )
    # Keras' decisions, to compare each runtime's with (once, not per
    # runtime and batch size).
    keras_actions = rnp.run(images)["actions"].numpy()
    name = os.path.splitext(os.path.basename(path))[0]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        os.makedirs(os.path.join(workdir, "forced"))
        factory = Runtimes(rnp, workdir, forced=False)
        forced_factory = Runtimes(rnp, os.path.join(workdir, "forced"))
        for runtime in runtimes:
            print(f"[{name}] preparing {runtime}...", flush=True)
            plain, run_rnp = getattr(factory, runtime)()
            _, run_forced = getattr(forced_factory, runtime)()
            run_plain = plain(backbone)
            for batch in batches:
                count = len(images) // batch * batch
                split = np.split(images[:count], count // batch)
                taken = [run_rnp(x, None) for x in split]
                actions = np.concatenate([a for a, _ in taken])
                flops = np.concatenate([f for _, f in taken])

                def serve_plain(split=split, run=run_plain):
                    for x in split:
                        run(x)

                def serve_rnp(split=split, run=run_rnp):
                    for x in split:
                        run(x, None)

                actions_split = np.split(actions, len(split))

                def serve_forced(
                    split=split, run=run_forced, taken=actions_split
                ):
                    for x, a in zip(split, taken, strict=True):
                        run(x, a)

                times = median_times(
                    [serve_plain, serve_rnp, serve_forced], repeats
                )
                # Per batch, as in the forced rows.
                times = [t / len(split) for t in times]
                row = make_row(
                    name,
                    runtime,
                    batch,
                    "policy",
                    times[:2],
                    rnp.full_flops,
                    flops,
                )
                row.update(
                    forced_seconds=times[2],
                    forced_time_speedup=times[0] / times[2],
                    images=count,
                    mean_actions=actions.mean(axis=0).tolist(),
                    flops_ratio_spread=float(flops.std() / rnp.full_flops),
                    actions_as_keras=float(
                        np.mean(
                            np.all(actions == keras_actions[:count], axis=1)
                        )
                    ),
                )
                rows.append(row)
                print(format_row(row), flush=True)
            on_rows(rows)
    return rows


def format_row(row):
    static = "-"
    if row.get("forced_seconds") is not None:  # A policy or decided row.
        static = (
            f"forced {row['forced_seconds'] * 1e3:.2f} "
            f"({row['forced_time_speedup']:.2f}x)"
        )
    elif row["static_seconds"] is not None:
        static = (
            f"{row['static_seconds'] * 1e3:.2f} "
            f"({row['static_time_speedup']:.2f}x)"
        )
    return (
        f"{row['model']:<9} {row['runtime']:<12} {row['batch']:>5} "
        f"{row['actions']:<6} {row['plain_seconds'] * 1e3:>10.2f} "
        f"{row['rnp_seconds'] * 1e3:>10.2f} {row['flops_speedup']:>7.2f}x "
        f"{row['time_speedup']:>7.2f}x {row['efficiency']:>6.2f} "
        f"{static:>18}"
    )


HEADER = (
    f"{'model':<9} {'runtime':<12} {'batch':>5} {'acts':<6} "
    f"{'plain ms':>10} {'rnp ms':>10} {'FLOPs':>8} {'time':>8} {'eff':>6} "
    f"{'static, or forced':>18}"
)


def main(argv):
    del argv
    unknown = set(FLAGS.models) - set(MODELS)
    if unknown:
        raise app.UsageError(
            f"--models expects some of {sorted(MODELS)}. Received: "
            f"{sorted(unknown)}"
        )
    unknown = set(FLAGS.runtimes) - set(RUNTIMES)
    if unknown:
        raise app.UsageError(
            f"--runtimes expects some of {list(RUNTIMES)}. Received: "
            f"{sorted(unknown)}"
        )
    named = {"uniform", "mixed", "decided"}
    named |= {f"a={a}" for a in range(1, FLAGS.groups + 1)}
    if not FLAGS.settings or set(FLAGS.settings) - named:
        raise app.UsageError(
            "--settings expects some of uniform, a=1.."
            f"a={FLAGS.groups}, mixed, decided. Received: {FLAGS.settings}"
        )
    try:
        batches = [int(b) for b in FLAGS.batches]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise app.UsageError(
            f"--batches expects positive integers. Received: {FLAGS.batches}"
        )
    if FLAGS.models and FLAGS.settings == ["mixed"] and max(batches) == 1:
        raise app.UsageError(
            "--settings=mixed times batches above 1 only. Received: "
            f"--batches={FLAGS.batches}"
        )
    print(HEADER)
    rows = []
    for name in FLAGS.models:
        rows += benchmark_model(
            name,
            batches,
            FLAGS.runtimes,
            FLAGS.groups,
            FLAGS.repeats,
            FLAGS.seed,
            FLAGS.settings,
        )
        write_results(rows)  # After each model: a crash keeps what ran.
    if FLAGS.policy_model:
        done = list(rows)
        rows += benchmark_policy(
            FLAGS.policy_model,
            batches,
            FLAGS.runtimes,
            FLAGS.repeats,
            on_rows=lambda policy_rows: write_results(done + policy_rows),
        )
    print()
    print(HEADER)
    for row in rows:
        print(format_row(row))
    print(f"Wrote {FLAGS.output}")


def write_results(rows):
    flag_names = [
        "models",
        "batches",
        "runtimes",
        "groups",
        "repeats",
        "seed",
        "ort_rnp_level",
        "settings",
        "policy_model",
        "data_dir",
        "dataset",
        "split",
        "policy_images",
    ]
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
        "command": "python benchmarks/speed.py "
        + " ".join(FLAGS[name].serialize() for name in flag_names),
        "rows": rows,
    }
    io_utils.write_json(FLAGS.output, result)


if __name__ == "__main__":
    app.run(main)
