"""How much could per-image routing among a model's fixed paths gain?

Measurements on the test split, for a trained RNP model and a list of
its fixed paths (BENCHMARKS.md, "where the loss sits"):

- the oracle: each image takes the cheapest listed path that classifies it
  right (the widest listed path if none does), over the cheapest 1, 2, ...
  paths. An upper bound: it reads the labels.
- a two-pass rule that reads no labels: every image runs `--cheap`; the
  share `q` of images with the lowest top softmax probability runs again
  on `--wide`. Its FLOPs count both passes. With `--backbone`, also the
  rank correlation of each image's FLOPs with the full network's loss.
  `--thresholds_from=validation` fixes the thresholds on the validation
  split instead, as a deployed rule would be.
- with `--rnp`, the same measures of RNP models' own learned policies
  (budget 0), beside.

    python benchmarks/routing_bounds.py --data_dir=../shared/data/cifar10 \\
        --model=runs/anchors/five_10/tuned.keras \\
        --paths=1121,1131,2132,1331,2332,4444 --cheap=1121 --wide=2332 \\
        --backbone=runs/proxy_c/backbone.keras
"""

import os

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_rnp  # noqa: E402
from keras_rnp import evaluation  # noqa: E402
from keras_rnp import io_utils  # noqa: E402
from keras_rnp.data_utils import load_split  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A trained RNP model (.keras).")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset name.")
flags.DEFINE_string("data_dir", None, "ImageFolder or tfds data directory.")
flags.DEFINE_list("paths", [], "Fixed paths for the oracle (digits).")
flags.DEFINE_string("cheap", "", "The two-pass rule's first path.")
flags.DEFINE_list("wide", [], "Its second paths (one rule each).")
flags.DEFINE_list(
    "rerun", ["0.1", "0.2", "0.3", "0.4", "0.5"], "Shares run again."
)
flags.DEFINE_string("backbone", "", "The full network, for the correlation.")
flags.DEFINE_enum(
    "thresholds_from",
    "test",
    ["test", "validation"],
    "The two-pass rule's confidence thresholds: quantiles of the test "
    "images' own confidences, or fixed beforehand on the validation "
    "split's (as a deployed rule would be).",
)
flags.DEFINE_list(
    "rnp",
    [],
    "RNP models (.keras) whose learned policies to measure beside, at "
    "budget 0 (with --backbone, their rank correlation too).",
)
flags.DEFINE_string(
    "output", "benchmarks/results/routing_bounds.json", "Where to write."
)


def parse_path(text, layers):
    path = tuple(int(c) for c in text)
    if len(path) != layers:
        raise app.UsageError(
            f"Expected paths of {layers} digits (one per gated layer). "
            f"Received: {text!r}."
        )
    return path


def run_all(rnp, images, path=None):
    """`rnp.run` over `images`, 1,000 at a time: `[N, classes]` logits and
    `[N]` FLOPs, on the fixed `path` if given, else the learned policy."""
    outs = []
    for i in range(0, len(images), 1000):
        part = images[i : i + 1000]
        actions = None if path is None else np.tile(path, (len(part), 1))
        outs.append(rnp.run(part, actions=actions))
    return [
        np.concatenate([out[key].numpy() for out in outs])
        for key in ("logits", "flops")
    ]


def run_path(rnp, images, path):
    """Logits `[N, classes]` and the FLOPs ratio of one fixed path."""
    logits, _ = run_all(rnp, images, path)
    flops = float(rnp.flops_from_actions(np.array([path]))[0])
    return logits, flops / rnp.full_flops


def oracle(runs, labels):
    """Rows for the oracle over the cheapest 1, 2, ... of `runs` (a list
    of `(ratio, name, correct)`, cheapest first)."""
    rows = []
    for k in range(1, len(runs) + 1):
        correct = np.zeros(len(labels), bool)
        cost = np.full(len(labels), runs[k - 1][0])
        for ratio, _, right in runs[:k]:
            take = ~correct & right
            cost[take] = ratio
            correct |= take
        rows.append(
            {
                "paths": [name for _, name, _ in runs[:k]],
                "accuracy": float(correct.mean()),
                "speedup": float(1 / cost.mean()),
            }
        )
        print(f"oracle over {rows[-1]['paths']}: {rows[-1]['accuracy']:.4f}")
    return rows


def confidences(logits):
    """Each image's top softmax probability."""
    probabilities = keras.ops.convert_to_numpy(
        keras.ops.softmax(logits.astype("float32"))
    )
    return probabilities.max(axis=-1)


def two_pass(cheap, wide, labels, shares, full_losses, reference=None):
    """Rows of the two-pass rule for each share run again. The threshold
    for a share is that quantile of the `reference` confidences (another
    split's, on the cheap path), or of these images' own when None."""
    (cheap_logits, cheap_ratio), (wide_logits, wide_ratio) = cheap, wide
    confidence = confidences(cheap_logits)
    if reference is None:
        reference = confidence
    rows = []
    for share in shares:
        again = confidence < np.quantile(reference, share)
        predictions = np.where(
            again, wide_logits.argmax(-1), cheap_logits.argmax(-1)
        )
        flops = np.where(again, cheap_ratio + wide_ratio, cheap_ratio)
        row = {
            "share": share,
            "rerun_share": float(again.mean()),
            "accuracy": float(np.mean(predictions == labels)),
            "speedup": float(1 / flops.mean()),
        }
        if full_losses is not None:
            row["loss_rank_correlation"] = keras_rnp.rank_correlation(
                flops, full_losses
            )
        print(row)
        rows.append(row)
    return rows


def learned_policy(path, images, labels, full_losses):
    """Accuracy, FLOPs speed-up, spread and (given the full network's
    per-image losses) rank correlation of an RNP model's own decisions."""
    rnp = io_utils.load_model(path, "trained RNP model")
    logits, flops = run_all(rnp, images)
    ratio, spread = evaluation.flops_ratio_and_spread(flops, rnp.full_flops)
    row = {
        "accuracy": evaluation.accuracy(logits, labels),
        "speedup": float(1 / ratio),
        "spread": float(spread),
    }
    if full_losses is not None:
        row["loss_rank_correlation"] = keras_rnp.rank_correlation(
            flops, full_losses
        )
    print(path, row)
    return row


def main(argv):
    del argv
    if not FLAGS.model:
        raise app.UsageError("Expected --model.")
    if bool(FLAGS.cheap) != bool(FLAGS.wide):
        raise app.UsageError("--cheap and --wide go together.")
    rnp = io_utils.load_model(FLAGS.model, "trained RNP model")
    layers = rnp.num_gated_layers
    images, labels = load_split(FLAGS.dataset, "test", FLAGS.data_dir)
    cache = {}

    def measured(text):
        if text not in cache:
            cache[text] = run_path(rnp, images, parse_path(text, layers))
        return cache[text]

    results = {"model": FLAGS.model, "paths": {}}
    for text in FLAGS.paths:
        logits, ratio = measured(text)
        results["paths"][text] = {
            "accuracy": evaluation.accuracy(logits, labels),
            "speedup": 1 / ratio,
        }
        print(text, results["paths"][text])
    runs = sorted(
        (
            (measured(t)[1], t, measured(t)[0].argmax(-1) == labels)
            for t in FLAGS.paths
        ),
        key=lambda run: run[:2],
    )
    results["oracle"] = oracle(runs, labels)
    full_losses = None
    if FLAGS.backbone:
        backbone = io_utils.load_model(FLAGS.backbone, "full network")
        full_logits = backbone.predict(images, batch_size=500, verbose=0)
        full_losses = evaluation.per_image_losses(labels, full_logits)
    shares = [float(s) for s in FLAGS.rerun]
    results["two_pass"] = {}
    results["thresholds_from"] = FLAGS.thresholds_from
    reference = None
    if FLAGS.cheap and FLAGS.thresholds_from == "validation":
        held_out, _ = load_split(FLAGS.dataset, "validation", FLAGS.data_dir)
        path = parse_path(FLAGS.cheap, layers)
        reference = confidences(run_path(rnp, held_out, path)[0])
    if FLAGS.cheap:
        for wide in FLAGS.wide:
            print(f"two passes: {FLAGS.cheap}, then {wide}")
            results["two_pass"][f"{FLAGS.cheap}->{wide}"] = two_pass(
                measured(FLAGS.cheap),
                measured(wide),
                labels,
                shares,
                full_losses,
                reference,
            )
    results["rnp"] = {
        path: learned_policy(path, images, labels, full_losses)
        for path in FLAGS.rnp
    }
    io_utils.write_json(FLAGS.output, results)
    print(f"Wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
