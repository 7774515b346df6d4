"""Does a trained policy gain from starting at a good fixed path?

`benchmarks/fixed_paths.py` showed a learned policy losing to the best
fixed path of its own weights at no more FLOPs. This script asks whether
the policy's per-image departures are worth keeping when the fixed path is
the default: at gated layer `t` each image takes

    argmax_a [Q(s_t, a) - budget * cost_t(a) + margin * [a == path_t]]

so `margin` 0 is the policy as trained and a huge margin is the fixed path
`path`; in between, an image leaves the path only where its Q-values
prefer another action by more than `margin`. For each default path and
margin it prints the accuracy, the FLOPs ratio, the spread of per-image
FLOPs and the rank correlation of an image's FLOPs with the full network's
loss, on the validation split (to choose) and the test split (to report).

    python benchmarks/departures.py --data_dir=../shared/data/cifar10 \\
        --model=runs/proxy_f1/rnp_p0.07.keras \\
        --paths=2232,3232,2132 --margins=0,0.05,0.1,0.2,0.5,inf
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
from keras_rnp import policy  # noqa: E402
from keras_rnp.data_utils import load_split  # noqa: E402
from keras_rnp.evaluation import accuracy  # noqa: E402
from keras_rnp.evaluation import flops_ratio_and_spread  # noqa: E402
from keras_rnp.evaluation import per_image_losses  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A trained RNP model (.keras).")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset name.")
flags.DEFINE_string("data_dir", None, "ImageFolder or tfds data directory.")
flags.DEFINE_list("splits", ["validation", "test"], "Splits to measure.")
flags.DEFINE_list(
    "paths", ["2232"], "Default paths, one digit (action) per gated layer."
)
flags.DEFINE_list(
    "margins", ["0", "0.05", "0.1", "0.2", "0.5", "inf"], "Margins."
)
flags.DEFINE_float("budget", 0.0, "The run-time budget weight.")
flags.DEFINE_integer("batch_size", 500, "Images per call.")
flags.DEFINE_string(
    "results", "benchmarks/results/departures.json", "Where to write JSON."
)
flags.mark_flag_as_required("model")


def departing_run(rnp, images):
    """`(logits, actions, flops)` of the model on `images`, in batches,
    under its default path and margin (`RNPModel.set_default_path`)."""
    outs = [
        rnp.run(images[i : i + FLAGS.batch_size], budget=FLAGS.budget)
        for i in range(0, len(images), FLAGS.batch_size)
    ]
    return [
        np.concatenate([out[key].numpy() for out in outs])
        for key in ("logits", "actions", "flops")
    ]


def parse_path(text, layers, groups):
    path = [int(c) for c in text]
    if len(path) != layers or not all(1 <= a <= groups for a in path):
        raise app.UsageError(
            f"--paths expects {layers} digits in 1..{groups} each. "
            f"Received: {text!r}"
        )
    return path


def main(argv):
    del argv
    rnp = keras.saving.load_model(FLAGS.model)
    if not isinstance(rnp, keras_rnp.RNPModel):
        raise app.UsageError(
            f"--model expects a trained RNP model; {FLAGS.model} holds a "
            f"{type(rnp).__name__}."
        )
    layers, groups = rnp.num_gated_layers, rnp.groups
    paths = [parse_path(p, layers, groups) for p in FLAGS.paths]
    try:
        margins = [float(m) for m in FLAGS.margins]
    except ValueError:
        margins = [-1.0]
    if not all(m >= 0 for m in margins):  # Also refuses NaN.
        raise app.UsageError(
            "--margins expects numbers >= 0 (inf for the fixed path). "
            f"Received: {FLAGS.margins}"
        )
    rows = []
    start = time.perf_counter()
    print(
        f"{'split':<11} {'path':<6} {'margin':>6} {'accuracy':>8} "
        f"{'FLOPs':>6} {'spread':>6} {'rank':>6} {'left path':>9}"
    )
    for split in FLAGS.splits:
        images, labels = load_split(FLAGS.dataset, split, FLAGS.data_dir)
        full = np.concatenate(
            [
                rnp.run(images[i : i + FLAGS.batch_size], actions=groups)[
                    "logits"
                ].numpy()
                for i in range(0, len(images), FLAGS.batch_size)
            ]
        )
        losses = per_image_losses(
            labels, full, from_logits=not rnp.ends_in_softmax
        )
        for path in paths:
            for margin in margins:
                # inf: the fixed path.
                fixed = min(margin, policy.FIXED_PATH_MARGIN)
                rnp.set_default_path(path, fixed)
                logits, actions, flops = departing_run(rnp, images)
                ratio, spread = flops_ratio_and_spread(flops, rnp.full_flops)
                row = {
                    "split": split,
                    "path": path,
                    "margin": margin,
                    "accuracy": accuracy(logits, labels),
                    "flops_ratio": ratio,
                    "flops_speedup": 1 / ratio,
                    "spread": spread,
                    "rank_correlation": (
                        keras_rnp.rank_correlation(flops, losses)
                        if np.ptp(flops) > 0
                        else None
                    ),
                    "left_path": float(
                        np.mean(np.any(actions != np.array(path), axis=1))
                    ),
                }
                rows.append(row)
                rank = row["rank_correlation"]
                print(
                    f"{split:<11} {''.join(map(str, path)):<6} "
                    f"{margin:>6g} {row['accuracy']:>8.4f} "
                    f"{1 / ratio:>5.2f}x {spread:>6.3f} "
                    f"{'-' if rank is None else f'{rank:+.3f}':>6} "
                    f"{row['left_path']:>9.3f}",
                    flush=True,
                )
    seconds = time.perf_counter() - start
    io_utils.write_json(
        FLAGS.results,
        {
            "model": FLAGS.model,
            "budget": FLAGS.budget,
            "seconds": seconds,
            "rows": rows,
        },
    )
    print(f"{seconds:.0f} s. Wrote {FLAGS.results}")


if __name__ == "__main__":
    app.run(main)
