"""Is the learned policy better than the best fixed path of its own weights?

Takes a trained RNP model and, on one split, measures every fixed path
(the same per-layer actions for every image: static pruning of the
fine-tuned backbone, with no decision network to pay for) and the learned
policy at several budgets. For each policy point it prints the most accurate
fixed path that costs no more FLOPs. If a fixed path beats the policy, the
decision network is losing accuracy to its own choices, before any question
of per-image routing.

    python benchmarks/fixed_paths.py --data_dir=../shared/data/cifar10 \
        --model=runs/cifar10_g/rnp_p0.07.keras

With `groups ** layers` above `--max_paths`, only the paths whose FLOPs
ratio (full / used) lies in `--ratios` are measured.
"""

import os
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_rnp  # noqa: E402
from keras_rnp import io_utils  # noqa: E402
from keras_rnp.data_utils import load_split  # noqa: E402
from keras_rnp.evaluation import accuracy  # noqa: E402
from keras_rnp.evaluation import candidate_paths  # noqa: E402
from keras_rnp.evaluation import pareto  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A trained RNP model (.keras).")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset name.")
flags.DEFINE_string("data_dir", None, "ImageFolder or tfds data directory.")
flags.DEFINE_string("split", "validation", "Split to measure on.")
flags.DEFINE_list(
    "budgets", ["0", "0.025", "0.05", "0.1", "0.2"], "Policy budgets."
)
flags.DEFINE_list(
    "ratios", ["2", "8"], "FLOPs ratios (low, high) of the paths measured."
)
flags.DEFINE_integer("max_paths", 300, "Measure every path up to this many.")
flags.DEFINE_string(
    "results", "benchmarks/results/fixed_paths.json", "Where to write JSON."
)
flags.mark_flag_as_required("model")


def main(argv):
    del argv
    try:
        low, high = (float(r) for r in FLAGS.ratios)
    except ValueError:
        raise app.UsageError(
            f"--ratios expects two numbers, low,high. Received: {FLAGS.ratios}"
        ) from None
    images, labels = load_split(FLAGS.dataset, FLAGS.split, FLAGS.data_dir)
    rnp = keras.saving.load_model(FLAGS.model)
    if not isinstance(rnp, keras_rnp.RNPModel):
        raise app.UsageError(
            f"--model expects a trained RNP model; {FLAGS.model} holds a "
            f"{type(rnp).__name__}."
        )
    full = rnp.full_flops
    start = time.perf_counter()
    policy = []
    for budget in (float(b) for b in FLAGS.budgets):
        out = rnp.run(images, budget=budget)
        policy.append(
            {
                "budget": budget,
                "accuracy": accuracy(out["logits"], labels),
                "flops": float(np.mean(out["flops"])),
                "distinct_paths": len(np.unique(out["actions"], axis=0)),
            }
        )
    paths, flops = candidate_paths(rnp, low, high, FLAGS.max_paths)
    print(f"{len(paths)} fixed paths on {len(labels)} {FLAGS.split} images")
    fixed = []
    for path, cost in zip(paths, flops, strict=True):
        actions = np.broadcast_to(path, (len(labels), len(path)))
        out = rnp.run(images, actions=actions)
        fixed.append(
            {
                "path": path.tolist(),
                "accuracy": accuracy(out["logits"], labels),
                "flops": float(cost),
            }
        )
    seconds = time.perf_counter() - start

    print(f"{FLAGS.model}: FLOPs ratio = full / used")
    print(
        f"{'budget':>7} {'ratio':>6} {'policy':>7} {'paths':>6}   "
        f"{'best fixed path at no more FLOPs':<34}"
    )
    for row in policy:
        affordable = [r for r in fixed if r["flops"] <= row["flops"]]
        best = max(affordable, key=lambda r: r["accuracy"], default=None)
        row["best_fixed"] = best
        shown = "none measured"
        if best:
            shown = (
                f"{best['accuracy']:.4f} at {full / best['flops']:.2f}x "
                f"{best['path']}"
            )
        print(
            f"{row['budget']:>7g} {full / row['flops']:>6.2f} "
            f"{row['accuracy']:>7.4f} {row['distinct_paths']:>6}   {shown}"
        )
    front = pareto(fixed)
    print("Pareto front of the fixed paths:")
    for row in front:
        print(
            f"  {full / row['flops']:>5.2f}x {row['accuracy']:.4f} "
            f"{row['path']}"
        )
    io_utils.write_json(
        FLAGS.results,
        {
            "model": FLAGS.model,
            "split": FLAGS.split,
            "images": len(labels),
            "full_flops": full,
            "seconds": seconds,
            "policy": policy,
            "fixed": fixed,
            "pareto": front,
        },
    )
    print(f"{seconds:.0f} s. Wrote {FLAGS.results}")


if __name__ == "__main__":
    app.run(main)
