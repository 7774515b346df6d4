"""CIFAR reproduction: full backbone, RNP, static L1 pruning, budget sweep.

The paper's CIFAR experiment: a 4-convolution network with 3x3 kernels,
wrapped with RNP, against the same network with its channels pruned
statically to the same FLOPs. One command runs every step; `--steps` runs
some of them (each reads what the earlier steps saved in `--work_dir`):

    python examples/cifar.py --data_dir=../shared/data/cifar10
    python examples/cifar.py --data_dir=... --steps=rnp --penalties=0.1
    python examples/cifar.py --dataset=cifar100       # tfds.load, online

Steps:
    backbone  train the full network (SGD, Nesterov, cosine schedule)
    rnp       wrap it and train RNP (Algorithm 1), once per --penalties
    static    L1-norm filter pruning to --static_speedups fewer FLOPs, each
              fine-tuned for as many steps as RNP fine-tunes the backbone
    evaluate  test accuracy and FLOPs of everything, a budget sweep of the
              first RNP model, per-layer action tables, the rank correlation
              of per-image FLOPs with the full network's loss
    plots     accuracy vs FLOPs, and test images ordered by FLOPs (PNG)

Training is checkpointed in `--work_dir/backup`: rerun the same command
after an interruption and it resumes. TensorBoard logs: `--work_dir/logs`.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_rnp  # noqa: E402
from keras_rnp import datasets  # noqa: E402
from keras_rnp import io_utils  # noqa: E402

STEPS = ("backbone", "rnp", "static", "evaluate", "plots")
# Per-channel mean and standard deviation of the CIFAR-10 training images
# (0-255), used by the backbone's input Normalization layer.
CIFAR_MEAN = (125.3, 123.0, 113.9)
CIFAR_STD = (63.0, 62.1, 66.7)

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "cifar10", "tfds dataset name.")
flags.DEFINE_string(
    "data_dir",
    None,
    "An ImageFolder directory (data_dir/{train,test}/<class>/<image>), or "
    "tfds' data directory. Default: tfds' default directory.",
)
flags.DEFINE_string("work_dir", "runs/cifar10", "Models, logs, results.")
flags.DEFINE_list("steps", list(STEPS), f"Steps to run, from {STEPS}.")
flags.DEFINE_list("widths", ["64", "128", "256", "512"], "Conv widths.")
flags.DEFINE_integer("backbone_epochs", 25, "Epochs of backbone training.")
flags.DEFINE_float("backbone_lr", 0.1, "Peak SGD learning rate.")
flags.DEFINE_integer("rnp_epochs", 8, "Epochs of RNP training.")
flags.DEFINE_list("penalties", ["0.1"], "RNP penalties (one model each).")
flags.DEFINE_integer("groups", 4, "Channel groups per gated convolution.")
flags.DEFINE_integer("decision_steps", 20, "N1: decision steps per round.")
flags.DEFINE_integer("backbone_steps", 10, "N2: backbone steps per round.")
flags.DEFINE_float("backbone_epsilon", 0.0, "Exploration in fine-tuning.")
flags.DEFINE_float("finetune_lr", 0.01, "SGD learning rate of fine-tuning.")
flags.DEFINE_list("static_speedups", ["2", "3", "4"], "Static pruning.")
flags.DEFINE_list("budgets", ["0", "0.5", "1", "2", "4", "8"], "Sweep.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("limit", 0, "Use only this many images per split.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("verbose", 2, "Keras fit verbosity (0, 1 or 2).")


class Config:
    """Every setting of a run (the flags, as plain values)."""

    def __init__(self, **kwargs):
        self.dataset = "cifar10"
        self.data_dir = None
        self.work_dir = "runs/cifar10"
        self.widths = (64, 128, 256, 512)
        self.backbone_epochs = 25
        self.backbone_lr = 0.1
        self.rnp_epochs = 8
        self.penalties = (0.1,)
        self.groups = 4
        self.decision_steps = 20
        self.backbone_steps = 10
        self.backbone_epsilon = 0.0
        self.finetune_lr = 0.01
        self.static_speedups = (2.0, 3.0, 4.0)
        self.budgets = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
        self.batch_size = 128
        self.limit = 0
        self.seed = 0
        self.verbose = 2
        for key, value in kwargs.items():
            if not hasattr(self, key):
                raise TypeError(f"Unknown setting {key!r}.")
            setattr(self, key, value)

    def path(self, *names):
        return os.path.join(self.work_dir, *names)


def data(config, split, training=False):
    """Batches of one split (see `keras_rnp.datasets`)."""
    ds, num_classes = datasets.load(config.dataset, split, config.data_dir)
    return (
        datasets.pipeline(
            ds,
            config.batch_size,
            training=training,
            limit=config.limit or None,
            seed=config.seed,
        ),
        num_classes,
    )


def build_backbone(classes=10, widths=(64, 128, 256, 512)):
    """The 4-convolution network: input normalization, then four blocks of
    3x3 conv (no bias) - batch norm - ReLU - 2x2 max pooling, then global
    average pooling and a linear classifier. Takes 32x32x3 images in
    [0, 255]."""
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Normalization(
                mean=CIFAR_MEAN, variance=np.square(CIFAR_STD).tolist()
            ),
        ],
        name="cnn4",
    )
    for width in widths:
        model.add(layers.Conv2D(width, 3, padding="same", use_bias=False))
        model.add(layers.BatchNormalization())
        model.add(layers.ReLU())
        model.add(layers.MaxPooling2D())
    model.add(layers.GlobalAveragePooling2D())
    model.add(layers.Dense(classes))
    return model


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _callbacks(config, name):
    return [
        keras.callbacks.BackupAndRestore(config.path("backup", name)),
        keras.callbacks.TensorBoard(config.path("logs", name)),
    ]


def _save(model, path):
    with io_utils.atomic_path(path) as staging:
        model.save(staging)


def train_backbone(config):
    """Step 1: trains the full network; saves `backbone.keras`."""
    train, classes = data(config, "train", training=True)
    val, _ = data(config, "validation")
    steps = config.backbone_epochs * int(train.cardinality())
    model = build_backbone(classes, config.widths)
    model.compile(
        optimizer=keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(
                config.backbone_lr, max(1, steps)
            ),
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
        ),
        loss=_loss(),
        metrics=["accuracy"],
    )
    model.fit(
        train,
        epochs=config.backbone_epochs,
        validation_data=val,
        callbacks=_callbacks(config, "backbone"),
        verbose=config.verbose,
    )
    _save(model, config.path("backbone.keras"))
    return model


RUNNERS = {"backbone": train_backbone}


def run(config):
    """Runs `config.steps` in order; returns the evaluation results (or
    None when `evaluate` is not among them)."""
    results = None
    for step in config.steps:
        start = time.time()
        print(f"== {step} ==", flush=True)
        out = RUNNERS[step](config)
        if step == "evaluate":
            results = out
        print(f"== {step}: {time.time() - start:.0f} s ==", flush=True)
    return results


def main(argv):
    del argv
    steps = [s.strip() for s in FLAGS.steps]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise app.UsageError(
            f"--steps expects names from {STEPS}. Received: {unknown}"
        )
    config = Config(
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        work_dir=FLAGS.work_dir,
        widths=tuple(int(w) for w in FLAGS.widths),
        backbone_epochs=FLAGS.backbone_epochs,
        backbone_lr=FLAGS.backbone_lr,
        batch_size=FLAGS.batch_size,
        limit=FLAGS.limit,
        seed=FLAGS.seed,
        verbose=FLAGS.verbose,
    )
    config.steps = steps
    keras.utils.set_random_seed(config.seed)
    run(config)


if __name__ == "__main__":
    app.run(main)
