"""Does fine-tuning the shared weights around a default path close the gap
to a static network of those widths?

A trained RNP model's best fixed path trails static L1 pruning at the same
FLOPs (BENCHMARKS.md, "a default path chosen on validation"): the shared
weights serve every width. This script sets a default path and margin
(given, or chosen on the validation split with `keras_rnp.choose_path`),
then fine-tunes the backbone under the greedy decisions they give
(`decision_steps=0`: the decision network is left as it is) and measures,
before and after, on the test split: the fixed path, the path with its
margin, every uniform path and the policy without a path.

With `--paths`, it fine-tunes several fixed paths together instead
(`RNPModel(fixed_paths=...)`: the full path on the labels, each path on its
predictions), and measures each of them.

    python benchmarks/path_finetune.py --data_dir=../shared/data/cifar10 \\
        --model=runs/proxy_f1/rnp_p0.07.keras --speedup=4 --epochs=5 \\
        --work_dir=runs/path_finetune
"""

import os
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_rnp  # noqa: E402
from keras_rnp import datasets  # noqa: E402
from keras_rnp import io_utils  # noqa: E402
from keras_rnp.data_utils import load_split  # noqa: E402
from keras_rnp.evaluation import accuracy  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A trained RNP model (.keras).")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset name.")
flags.DEFINE_string("data_dir", None, "ImageFolder or tfds data directory.")
flags.DEFINE_float("speedup", 4.0, "FLOPs reduction of the default path.")
flags.DEFINE_string(
    "path", "", "The default path, one digit per gated layer ('' chooses it)."
)
flags.DEFINE_float("margin", -1.0, "Its margin (< 0 chooses it).")
flags.DEFINE_list(
    "paths",
    [],
    "Instead of fine-tuning under one default path: fixed paths (digits) "
    "fine-tuned together, each step the full path on the labels and every "
    "path on the full path's predictions (the sandwich rule on these paths).",
)
flags.DEFINE_string(
    "control",
    "",
    "Instead: a plain Keras model (e.g. a static pruned network) fine-tuned "
    "the same way for the same epochs, its test accuracy before and after.",
)
flags.DEFINE_integer(
    "sandwich_paths",
    0,
    "With --paths: also the narrowest path and sandwich_paths - 1 random "
    "ones each step (RNPModel's sandwich_paths), to keep the other widths.",
)
flags.DEFINE_integer("epochs", 5, "Fine-tuning epochs.")
flags.DEFINE_float("lr", 0.01, "Peak SGD learning rate (cosine decay).")
flags.DEFINE_float("weight_decay", 5e-3, "Decoupled SGD weight decay.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("work_dir", "runs/path_finetune", "Model and results.")


def run(rnp, images, labels, path=None, **kwargs):
    """Test accuracy and FLOPs speed-up of `rnp.run(**kwargs)`, or of the
    fixed `path`."""
    logits, flops = [], []
    for i in range(0, len(images), 500):
        part = images[i : i + 500]
        if path is not None:
            kwargs["actions"] = np.tile(path, (len(part), 1))
        out = rnp.run(part, **kwargs)
        logits.append(out["logits"].numpy())
        flops.append(out["flops"].numpy().astype(np.float64))
    return {
        "accuracy": accuracy(np.concatenate(logits), labels),
        "speedup": rnp.full_flops / float(np.mean(np.concatenate(flops))),
    }


def measure(rnp, images, labels, path):
    """Test accuracy and FLOPs speed-up of the fixed path, the default
    path with its margin, every uniform path and the policy alone."""

    def run_(**kwargs):
        return run(rnp, images, labels, **kwargs)

    rows = {"fixed_path": run_(path=path), "default_path": run_()}
    for a in range(1, rnp.groups + 1):
        rows[f"uniform_{a}"] = run_(actions=a)
    before = rnp.default_path, rnp.path_margin
    rnp.set_default_path(None)
    rows["policy"] = run_()
    rnp.set_default_path(*before)
    return rows


def main_control():
    """`--control`: a plain model fine-tuned as the paths are."""
    model = io_utils.load_model(FLAGS.control, "plain model")
    images, labels = load_split(FLAGS.dataset, "test", FLAGS.data_dir)

    def test_accuracy():
        logits = model.predict(images, batch_size=500, verbose=0)
        return accuracy(logits, labels)

    start = time.perf_counter()
    results = {"control": FLAGS.control, "before": test_accuracy()}
    print("before:", results["before"], flush=True)
    train = _train_split()
    steps = FLAGS.epochs * int(train.cardinality())
    model.compile(
        optimizer=_optimizer(steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(train, epochs=FLAGS.epochs, verbose=2)
    results["after"] = test_accuracy()
    print("after:", results["after"], flush=True)
    results["image_passes"] = steps * FLAGS.batch_size
    _write(results, start)


def main(argv):
    del argv
    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.sandwich_paths and not FLAGS.paths:
        raise app.UsageError("--sandwich_paths goes with --paths.")
    if FLAGS.control:
        return main_control()
    if not FLAGS.model:
        raise app.UsageError("Expected --model (or --control).")
    rnp = io_utils.load_model(FLAGS.model, "trained RNP model")
    if not isinstance(rnp, keras_rnp.RNPModel):
        raise app.UsageError(
            f"--model expects a trained RNP model; {FLAGS.model} holds a "
            f"{type(rnp).__name__}."
        )
    val_images, val_labels = load_split(
        FLAGS.dataset, "validation", FLAGS.data_dir
    )
    test_images, test_labels = load_split(FLAGS.dataset, "test", FLAGS.data_dir)
    start = time.perf_counter()
    if FLAGS.paths:
        return main_paths(rnp, test_images, test_labels, start)
    choice = None
    if FLAGS.path:
        path = tuple(int(c) for c in FLAGS.path)
    else:
        choice = keras_rnp.choose_path(
            rnp, val_images, val_labels, FLAGS.speedup
        )
        path = choice["path"]
    margin = FLAGS.margin if FLAGS.margin >= 0 else None
    if margin is None:
        margin = choice["margin"] if choice else 0.0
    rnp.set_default_path(path, margin)
    print(f"default path {path}, margin {margin:g}", flush=True)
    results = {
        "model": FLAGS.model,
        "path": list(path),
        "margin": margin,
        "choice": choice,
        "before": measure(rnp, test_images, test_labels, path),
    }
    print("before:", results["before"], flush=True)

    # Under the greedy decisions (with the default path and margin).
    tuned, steps = _fine_tune(rnp, sandwich_paths=0, fixed_paths=())
    results["after"] = measure(tuned, test_images, test_labels, path)
    print("after:", results["after"], flush=True)
    results["image_passes"] = steps * FLAGS.batch_size
    _write(results, start, tuned)


def _write(results, start, model=None):
    """`results.json` (with the wall time since `start`) and the tuned
    model, if any, in `--work_dir`."""
    results["seconds"] = time.perf_counter() - start
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    if model is not None:
        model.save(os.path.join(FLAGS.work_dir, "tuned.keras"))
    out = os.path.join(FLAGS.work_dir, "results.json")
    io_utils.write_json(out, results)
    print(f"{results['seconds']:.0f} s. Wrote {out}")


def _fine_tune(rnp, **paths):
    """A copy of `rnp` whose backbone is fine-tuned for `--epochs`, the
    decision network left as it is (`paths`: `sandwich_paths` and
    `fixed_paths`); returns it and the number of steps."""
    tuned = keras_rnp.rewrap(
        rnp,
        decision_steps=0,
        backbone_steps=1,
        backbone_epsilon=0.0,
        distillation=0.0,
        **paths,
    )
    train = _train_split()
    steps = FLAGS.epochs * int(train.cardinality())
    tuned.compile(optimizer=_optimizer(steps), metrics=["accuracy"])
    tuned.fit(train, epochs=FLAGS.epochs, verbose=2)
    return tuned, steps


def _train_split():
    train, _ = datasets.load(FLAGS.dataset, "train", FLAGS.data_dir)
    return datasets.pipeline(
        train, FLAGS.batch_size, training=True, seed=FLAGS.seed
    )


def _optimizer(steps):
    return keras.optimizers.SGD(
        keras.optimizers.schedules.CosineDecay(FLAGS.lr, steps),
        momentum=0.9,
        nesterov=True,
        weight_decay=FLAGS.weight_decay,
    )


def main_paths(rnp, images, labels, start):
    """`--paths`: several fixed paths fine-tuned together."""
    paths = [tuple(int(c) for c in text) for text in FLAGS.paths]
    results = {"model": FLAGS.model, "paths": [list(p) for p in paths]}

    def measure_all(model):
        # Each path alone, then the rest of `measure` (its fixed path is
        # the first path's).
        rows = measure(model, images, labels, paths[0])
        named = {"".join(map(str, p)): p for p in paths}
        first = "".join(map(str, paths[0]))
        return {
            **{
                name: rows["fixed_path"]
                if name == first
                else run(model, images, labels, path=p)
                for name, p in named.items()
            },
            **rows,
        }

    results["before"] = measure_all(rnp)
    print("before:", results["before"], flush=True)
    # The library's sandwich step on these paths: the full path on the
    # labels and each path (and any --sandwich_paths) on its predictions.
    tuned, steps = _fine_tune(
        rnp, sandwich_paths=FLAGS.sandwich_paths, fixed_paths=paths
    )
    results["after"] = measure_all(tuned)
    print("after:", results["after"], flush=True)
    # Forward and backward: the full path and every other path trained.
    trained = 1 + len(paths) + FLAGS.sandwich_paths
    results["image_passes"] = steps * FLAGS.batch_size * trained
    _write(results, start, tuned)


if __name__ == "__main__":
    app.run(main)
