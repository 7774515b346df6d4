"""Quickstart: train a small CNN, wrap it with RNP, train RNP, compare.

Runs offline on the 8x8 handwritten digits that ship inside scikit-learn
(1,797 images, 10 classes), in a couple of minutes on 2 CPU cores:

    python examples/quickstart.py
    python examples/quickstart.py --penalty=0.2 --rnp_epochs=30

It prints a table of test accuracy and mean FLOPs per image for the full
backbone and for the RNP model (at several run-time budgets), and saves the
RNP model as a .keras file.

Training is checkpointed in `--work_dir`: the trained backbone is kept as
`backbone.keras` (and reused), and an interrupted RNP training resumes from
its last completed epoch when the same command runs again. Delete the work
directory to start over.
"""

import os
import sys
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_rnp  # noqa: E402
from keras_rnp import backbones  # noqa: E402
from keras_rnp import evaluation  # noqa: E402
from keras_rnp import io_utils  # noqa: E402
from keras_rnp.data_utils import load_digits  # noqa: E402
from keras_rnp.policy import epsilon_decay_steps_for  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("backbone_epochs", 40, "Epochs to train the backbone.")
flags.DEFINE_integer("rnp_epochs", 30, "Epochs of RNP training.")
flags.DEFINE_integer("groups", 4, "Channel groups per gated convolution.")
flags.DEFINE_float("penalty", 0.3, "Reward paid per extra channel group.")
flags.DEFINE_float(
    "backbone_epsilon", 0.0, "Exploration while fine-tuning the backbone."
)
flags.DEFINE_integer("decision_steps", 20, "N1: decision steps per round.")
flags.DEFINE_integer("backbone_steps", 10, "N2: backbone steps per round.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_list(
    "budgets", ["0", "0.5", "1", "2", "4"], "Run-time budgets to report."
)
flags.DEFINE_string(
    "output", "runs/quickstart/rnp.keras", "Where to save the RNP model."
)
flags.DEFINE_string(
    "work_dir", "runs/quickstart", "Checkpoints (resume by rerunning)."
)
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("verbose", 2, "Keras fit verbosity (0, 1 or 2).")


def accuracy_and_flops(rnp, x, y, budget=0.0):
    """Test accuracy, FLOPs per image and actions of an RNP model."""
    out = rnp.run(x, budget=budget)
    accuracy = evaluation.accuracy(out["logits"], y)
    return accuracy, out["flops"].numpy(), out["actions"].numpy()


def run(
    backbone_epochs=40,
    rnp_epochs=30,
    groups=4,
    penalty=0.3,
    backbone_epsilon=0.0,
    decision_steps=20,
    backbone_steps=10,
    batch_size=64,
    budgets=(0.0, 0.5, 1.0, 2.0, 4.0),
    output="runs/quickstart/rnp.keras",
    seed=0,
    verbose=2,
    work_dir=None,
):
    """Trains the backbone and RNP; returns the results table as a list of
    dicts (`model`, `budget`, `accuracy`, `flops` (mean per image),
    `flops_ratio`, `flops_spread` (standard deviation of the per-image
    FLOPs ratio: 0 means every image took the same path) and
    `mean_action`). With a `work_dir`, training is checkpointed there and
    resumes where it stopped."""
    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test) = load_digits(seed)
    start = time.time()

    saved_backbone = work_dir and os.path.join(work_dir, "backbone.keras")
    if saved_backbone and os.path.exists(saved_backbone):
        print(f"[1/3] Loading the trained backbone from {saved_backbone}")
        backbone = keras.saving.load_model(saved_backbone)
    else:
        print(f"[1/3] Training the backbone ({backbone_epochs} epochs)...")
        backbone = backbones.digits_cnn()
        backbone.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        backbone.fit(
            x_train,
            y_train,
            batch_size=batch_size,
            epochs=backbone_epochs,
            verbose=verbose,
            callbacks=_backup(work_dir, "backbone"),
        )
        if saved_backbone:
            io_utils.save_model(backbone, saved_backbone)
    full_accuracy = backbone.evaluate(x_test, y_test, verbose=0)[1]
    full_flops = keras_rnp.count_flops(backbone)

    print(f"[2/3] Training RNP ({rnp_epochs} epochs)...")
    steps_per_epoch = int(np.ceil(len(x_train) / batch_size))
    rnp = keras_rnp.wrap(
        backbone,
        groups=groups,
        penalty=penalty,
        backbone_epsilon=backbone_epsilon,
        decision_steps=decision_steps,
        backbone_steps=backbone_steps,
        # Anneal exploration over the first third of the decision steps.
        epsilon_decay_steps=epsilon_decay_steps_for(
            rnp_epochs * steps_per_epoch, decision_steps, backbone_steps
        ),
        seed=seed,
    )
    rnp.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        decision_optimizer=keras.optimizers.Adam(3e-3),
    )
    rnp.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=rnp_epochs,
        verbose=verbose,
        callbacks=_backup(work_dir, "rnp"),
    )

    print("[3/3] Evaluating on the test split...")
    rows = [
        {
            "model": "full backbone",
            "budget": None,
            "accuracy": full_accuracy,
            "flops": full_flops,
            "flops_ratio": 1.0,
            "flops_spread": 0.0,
            "mean_action": float(groups),
        }
    ]
    for budget in budgets:
        accuracy, flops, actions = accuracy_and_flops(
            rnp, x_test, y_test, budget
        )
        ratio, spread = evaluation.flops_ratio_and_spread(flops, full_flops)
        rows.append(
            {
                "model": "RNP",
                "budget": float(budget),
                "accuracy": accuracy,
                "flops": float(flops.mean()),
                "flops_ratio": ratio,
                "flops_spread": spread,
                "mean_action": float(actions.mean()),
            }
        )
    print(format_table(rows))
    if output:
        rnp.save(output)
        print(f"Saved the RNP model to {output}")
    print(f"Done in {time.time() - start:.0f} s.")
    return rows


def _backup(work_dir, name):
    """Checkpoints every epoch (and resumes from them) under `work_dir`."""
    if not work_dir:
        return []
    backup_dir = os.path.join(work_dir, "backup", name)
    return [keras_rnp.callbacks.BackupAndRestore(backup_dir)]


def format_table(rows):
    lines = [
        f"{'model':<14} {'budget':>7} {'accuracy':>9} {'FLOPs/image':>12} "
        f"{'vs full':>8} {'spread':>7} {'mean action':>12}"
    ]
    for row in rows:
        budget = "-" if row["budget"] is None else f"{row['budget']:g}"
        lines.append(
            f"{row['model']:<14} {budget:>7} {row['accuracy']:>9.4f} "
            f"{row['flops']:>12,.0f} {row['flops_ratio']:>8.3f} "
            f"{row['flops_spread']:>7.3f} {row['mean_action']:>12.2f}"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    try:
        budgets = [float(b) for b in FLAGS.budgets]
    except ValueError:
        raise app.UsageError(
            f"--budgets expects numbers. Received: {FLAGS.budgets}"
        ) from None
    try:
        _run_from_flags(budgets)
    except Exception as error:  # noqa: BLE001 - reported in one line.
        lines = str(error).strip().splitlines() or [type(error).__name__]
        print(f"error: {type(error).__name__}: {lines[0]}", file=sys.stderr)
        sys.exit(1)


def _run_from_flags(budgets):
    run(
        backbone_epochs=FLAGS.backbone_epochs,
        rnp_epochs=FLAGS.rnp_epochs,
        groups=FLAGS.groups,
        penalty=FLAGS.penalty,
        backbone_epsilon=FLAGS.backbone_epsilon,
        decision_steps=FLAGS.decision_steps,
        backbone_steps=FLAGS.backbone_steps,
        batch_size=FLAGS.batch_size,
        budgets=budgets,
        output=FLAGS.output,
        seed=FLAGS.seed,
        verbose=FLAGS.verbose,
        work_dir=FLAGS.work_dir,
    )


if __name__ == "__main__":
    app.run(main)
