"""CIFAR reproduction: full backbone, RNP, static L1 pruning, budget sweep.

The paper's CIFAR experiment: a 4-convolution network with 3x3 kernels,
wrapped with RNP, against the same network with its channels pruned
statically to the same FLOPs. One command runs every step; `--steps` runs
some of them (each reads what the earlier steps saved in `--work_dir`):

    python examples/cifar.py --data_dir=../shared/data/cifar10
    python examples/cifar.py --data_dir=... --steps=rnp --penalties=0.1
    python examples/cifar.py --dataset=cifar100       # tfds.load, online
    python examples/cifar.py --data_dir=... --arch=resnet20 \
        --work_dir=runs/resnet20                      # a residual network

With `--arch=resnet20` RNP gates the inner width of each basic block (one
decision per block) and static pruning prunes the same inner widths.

Steps:
    backbone  train the full network (SGD, Nesterov, cosine schedule)
    rnp       wrap it (filters sorted by L1 norm, every convolution gated,
              the penalty weighted by each layer's FLOPs), fine-tune it
              under random actions for --warmup_epochs (once), then train
              RNP (Algorithm 1) once per --penalties
    static    L1-norm filter pruning of every convolution to
              --static_speedups fewer FLOPs, each fine-tuned for as many
              steps as RNP fine-tunes the backbone
    evaluate  test accuracy and FLOPs of everything, a budget sweep of the
              first RNP model, per-layer action tables, the rank correlation
              of per-image FLOPs with the full network's loss
    plots     accuracy vs FLOPs, and test images ordered by FLOPs (PNG)

Training is checkpointed every epoch in `--work_dir/backup`: rerun the same
command after an interruption and it resumes from the last completed epoch.
Models already trained in `--work_dir` are reused, not retrained (pass
`--fresh` to retrain them). TensorBoard logs: `--work_dir/logs`.
"""

import dataclasses
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_rnp  # noqa: E402
from keras_rnp import backbones  # noqa: E402
from keras_rnp import datasets  # noqa: E402
from keras_rnp import distribute  # noqa: E402
from keras_rnp import evaluation  # noqa: E402
from keras_rnp import io_utils  # noqa: E402
from keras_rnp.data_utils import load_split  # noqa: E402
from keras_rnp.policy import epsilon_decay_steps_for  # noqa: E402
from keras_rnp.q_learning import phase_counts  # noqa: E402
from keras_rnp.static_pruning import l1_prune_to_flops  # noqa: E402
from keras_rnp.static_pruning import sort_filters  # noqa: E402

STEPS = ("backbone", "rnp", "static", "evaluate", "plots")
# ResNet-20's stage widths, the default of --widths with --arch=resnet20.
RESNET20_WIDTHS = (16, 32, 64)

FLAGS = flags.FLAGS


def setting(default, help_text, flag=None, item=None, minimum=None, **options):
    """A `Config` field that is also a command-line flag.

    Args:
        default: the default value; its type picks the flag's (bool,
            int, float, str or None: string; a tuple: a comma-separated
            list of `item`).
        help_text: the flag's help text.
        flag: the flag's name, when it is not the field's.
        item: the type of a list's elements (int, float or str).
        minimum: the smallest number a list accepts.
        **options: for the flag definition: `enum_values` (a string flag
            with fixed choices), `lower_bound`, `choices` (a list's allowed
            elements).
    """
    metadata = dict(help=help_text, flag=flag, item=item, minimum=minimum)
    return dataclasses.field(default=default, metadata={**metadata, **options})


@dataclasses.dataclass(eq=False)
class Config:
    """Every setting of a run. Each field is also a flag (see `setting`)."""

    dataset: str = setting("cifar10", "tfds dataset name.")
    data_dir: str | None = setting(
        None,
        "An ImageFolder directory (data_dir/{train,test}/<class>/<image>), or "
        "tfds' data directory. Default: tfds' default directory.",
    )
    work_dir: str = setting("runs/cifar10", "Models, logs, results.")
    arch: str = setting(
        "cnn4",
        "The backbone: cnn4, the 4-convolution network (keras_rnp.backbones."
        "cifar_cnn), or resnet20, the CIFAR ResNet-20 (backbones.resnet20; "
        "RNP gates each block's inner width).",
        enum_values=["cnn4", "resnet20"],
    )
    widths: tuple = setting(
        (64, 128, 256, 512),
        "Conv widths: cnn4's four convolutions, or resnet20's three stages "
        "(16,32,64 unless given).",
        item=int,
        minimum=1,
    )
    backbone_epochs: int = setting(30, "Epochs of backbone training.")
    backbone_lr: float = setting(0.1, "Peak SGD learning rate.")
    weight_decay: float = setting(
        5e-3,
        "SGD weight decay, Keras' decoupled kind (w -= lr * wd * w each "
        "step): 5e-3 is about the usual coupled L2 of 5e-4 at momentum 0.9.",
    )
    decay: str = setting(
        "auto",
        "Which weights the weight decay shrinks: all, or kernels only (not "
        "batch-norm gamma and beta, not biases, as the ResNet recipe "
        "does). auto: kernels for resnet20, all for cnn4 (the recipe of "
        "every cnn4 figure in BENCHMARKS.md).",
        enum_values=["auto", "all", "kernels"],
    )
    rnp_epochs: int = setting(10, "Epochs of RNP training.")
    penalties: tuple = setting(
        (0.07, 0.04),
        "RNP penalties (one model each).",
        item=float,
        minimum=0.0,
    )
    penalty_mode: str = setting(
        "flops", "See keras_rnp.wrap.", enum_values=["flat", "flops"]
    )
    groups: int = setting(4, "Channel groups per gated convolution.")
    gate_first: bool = setting(
        True,
        "Also gate the first convolution: narrowing it narrows the second "
        "one's input, so 4x fewer FLOPs does not force one group there.",
    )
    decision_steps: int = setting(20, "N1: decision steps per round.")
    backbone_steps: int = setting(10, "N2: backbone steps per round.")
    backbone_epsilon: float = setting(0.2, "Exploration in fine-tuning.")
    distillation: float = setting(
        0.0,
        "In-place distillation weight in [0, 1] for the warm-up and RNP's "
        "fine-tuning steps: the paths taken learn from the full network's "
        "predictions (see keras_rnp.wrap), at about twice the cost per step.",
    )
    sort_filters: bool = setting(
        True,
        "Order each convolution's filters by L1 norm before wrapping, so "
        "RNP's first groups are the filters static pruning would keep.",
    )
    warmup_epochs: int = setting(
        4,
        "Epochs of fine-tuning the wrapped backbone under random actions "
        "(every width trained) before Algorithm 1; done once for all "
        "penalties. Static pruning fine-tunes as many more steps.",
        lower_bound=0,
    )
    width_aware_bn: bool = setting(
        False,
        "Batch norms inside gated units keep one set of statistics per "
        "input width (see keras_rnp.wrap); the warm-up's statistics carry "
        "over to every penalty's model.",
    )
    width_aware_affine: bool = setting(
        False,
        "With --width_aware_bn, each input width also gets its own "
        "batch-norm gamma and beta (see keras_rnp.wrap).",
    )
    sandwich_paths: int = setting(
        0,
        "Train the warm-up as a supernet: each step trains the full path on "
        "the labels and this many narrower paths (the narrowest, the rest "
        "random) on its predictions. 0: random actions, one path a step.",
        lower_bound=0,
    )
    target_update_steps: int = setting(
        0,
        "DQN target network for Q-learning, refreshed every this many "
        "decision steps (0: none, the paper).",
        lower_bound=0,
    )
    double_dqn: bool = setting(False, "Double DQN targets.")
    select_flops_ratio: float = setting(
        0.0,
        "Keep the RNP epoch with the best validation accuracy among those "
        "at most this FLOPs ratio (keras_rnp.callbacks.SelectOnValidation); "
        "0 keeps the last epoch.",
        lower_bound=0.0,
    )
    finetune_lr: float = setting(0.01, "SGD learning rate of fine-tuning.")
    warmup_lr: float = setting(
        0.0,
        "Peak SGD learning rate of the warm-up (cosine decay); 0 uses "
        "--finetune_lr.",
        lower_bound=0.0,
    )
    static_speedups: tuple = setting(
        (2.0, 3.0, 4.0, 6.0, 8.0), "Static pruning.", item=float, minimum=1.0
    )
    static_prune_first: bool = setting(
        True,
        "Static pruning also prunes the first convolution, with the keep "
        "fraction of the others (--nostatic_prune_first keeps it whole: "
        "a weaker baseline, 1.1 points lower at 4x on CIFAR-10).",
    )
    path_speedups: tuple = setting(
        (),
        "For each of these FLOPs reductions, a default path and margin for "
        "the first penalty's model, chosen on the validation split "
        "(keras_rnp.choose_path), measured on the test split.",
        item=float,
        minimum=1.0,
    )
    budgets: tuple = setting(
        (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3),
        "Budgets of the sweep (of the first penalty's model).",
        item=float,
        minimum=0.0,
    )
    batch_size: int = setting(128, "Batch size.")
    limit: int = setting(0, "Use only this many images per split.")
    seed: int = setting(0, "Random seed.")
    verbose: int = setting(2, "Keras fit verbosity (0, 1 or 2).")
    fresh: bool = setting(False, "Retrain models already in --work_dir.")
    distribution: str = setting(
        "default",
        "tf.distribute strategy: one device, the local devices, or the "
        "workers named in TF_CONFIG.",
        flag="strategy",
        enum_values=["default", "mirrored", "multi_worker"],
    )
    steps: tuple = setting(
        STEPS, f"Steps to run, from {STEPS}.", item=str, choices=STEPS
    )
    # Created when first needed (see `strategy` and `_steps_per_epoch`).
    _strategy: object = dataclasses.field(default=None, init=False, repr=False)
    _steps_per_epoch: int | None = dataclasses.field(
        default=None, init=False, repr=False
    )

    def path(self, *names):
        """Where the files of the run are (and are read from)."""
        return os.path.join(self.work_dir, *names)

    def output(self, *names):
        """Where this process writes: `path(*names)` on the chief; on the
        other workers of a multi-worker run, a temporary directory removed
        when the run ends (only the chief writes models, logs and
        results)."""
        return os.path.join(
            distribute.worker_dir(self.work_dir, self.strategy()), *names
        )

    def strategy(self):
        """The tf.distribute strategy (created once)."""
        if self._strategy is None:
            self._strategy = {
                "default": tf.distribute.get_strategy,
                "mirrored": tf.distribute.MirroredStrategy,
                "multi_worker": tf.distribute.MultiWorkerMirroredStrategy,
            }[self.distribution]()
        return self._strategy

    def done(self, name):
        """Whether the model file `name` exists and may be reused."""
        path = self.path(name)
        if os.path.exists(path) and not self.fresh:
            print(f"{path} exists: reusing it (--fresh retrains).")
            return True
        return False


def _settings():
    """The fields of `Config` that are flags."""
    return [f for f in dataclasses.fields(Config) if "help" in f.metadata]


def define_flags():
    """Defines a flag per `Config` setting, and --traceback.

    Called when the script runs, not when it is imported: the tests import
    both examples, whose flags share names.
    """
    for field in _settings():
        meta, default = field.metadata, field.default
        name = meta["flag"] or field.name
        if meta["item"] is not None:
            text = [v if isinstance(v, str) else f"{v:g}" for v in default]
            flags.DEFINE_list(name, text, meta["help"])
        elif "enum_values" in meta:
            flags.DEFINE_enum(name, default, meta["enum_values"], meta["help"])
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, meta["help"])
        elif isinstance(default, int):
            flags.DEFINE_integer(
                name, default, meta["help"], lower_bound=meta.get("lower_bound")
            )
        elif isinstance(default, float):
            flags.DEFINE_float(
                name, default, meta["help"], lower_bound=meta.get("lower_bound")
            )
        else:
            flags.DEFINE_string(name, default, meta["help"])
    flags.DEFINE_bool("traceback", False, "Show the full trace of an error.")


def _list_setting(name, values, item, minimum=None, choices=None):
    """The parsed elements of the list flag --name."""
    if choices is not None:
        values = [v.strip() for v in values]
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise app.UsageError(
                f"--{name} expects names from {choices}. Received: {unknown}"
            )
        return tuple(values)
    try:
        numbers = tuple(item(v) for v in values)
    except ValueError:
        raise app.UsageError(
            f"--{name} expects a list of {item.__name__}s. Received: "
            f"{','.join(values)}"
        ) from None
    if minimum is not None and any(n < minimum for n in numbers):
        raise app.UsageError(
            f"--{name} expects values >= {minimum}. Received: {numbers}"
        )
    return numbers


def config_from_flags():
    """The `Config` of the parsed flags (lists parsed and checked)."""
    values = {}
    for field in _settings():
        meta = field.metadata
        name = meta["flag"] or field.name
        value = FLAGS[name].value
        if meta["item"] is not None:
            value = _list_setting(
                name, value, meta["item"], meta["minimum"], meta.get("choices")
            )
        values[field.name] = value
    if values["arch"] == "resnet20" and not FLAGS["widths"].present:
        values["widths"] = RESNET20_WIDTHS
    return Config(**values)


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


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _callbacks(config, name):
    return [
        keras_rnp.callbacks.BackupAndRestore(config.path("backup", name)),
        keras.callbacks.TensorBoard(config.output("logs", name)),
    ]


def _trainable(config, model):
    """The model to compile and fit: `model`, or under a strategy a view
    of it whose fit works on several workers, and on a first batch that
    splits unevenly among replicas (see `keras_rnp.distribute`)."""
    if config.distribution == "default":
        return model
    return distribute.multi_worker_model(model)


def train_backbone(config):
    """Step 1: trains the full network; saves `backbone.keras`."""
    if config.done("backbone.keras"):
        return
    train, classes = data(config, "train", training=True)
    val, _ = data(config, "validation")
    steps = config.backbone_epochs * int(train.cardinality())
    with config.strategy().scope():
        if config.arch == "resnet20":
            model = backbones.resnet20(classes, config.widths)
        else:
            model = backbones.cifar_cnn(classes, config.widths)
        trainable = _trainable(config, model)
        trainable.compile(
            optimizer=_sgd(config, config.backbone_lr, max(1, steps)),
            loss=_loss(),
            metrics=["accuracy"],
        )
    trainable.fit(
        train,
        epochs=config.backbone_epochs,
        validation_data=val,
        callbacks=_callbacks(config, "backbone"),
        verbose=config.verbose,
    )
    io_utils.save_model(model, config.output("backbone.keras"))
    return model


def _steps_per_epoch(config):
    """Training batches per epoch (building the dataset once per config:
    an ImageFolder lists every file)."""
    if config._steps_per_epoch is None:
        ds, _ = data(config, "train", training=True)
        config._steps_per_epoch = int(ds.cardinality())
    return config._steps_per_epoch


def _rnp_steps(config):
    """Training steps of Algorithm 1 (both phases)."""
    return config.rnp_epochs * _steps_per_epoch(config)


def _rnp_updates(config):
    """Backbone updates of Algorithm 1 (its N2 share of the steps)."""
    _, backbone_updates = phase_counts(
        _rnp_steps(config), config.decision_steps, config.backbone_steps
    )
    return max(1, backbone_updates)


def _backbone_updates(config):
    """Backbone training passes of RNP, in batches, warm-up included
    (every path of a sandwich step and the full network of a distillation
    step counted); static pruning fine-tunes for as many steps."""
    warmup = config.warmup_epochs * _steps_per_epoch(config)
    warmup_paths = 1 + config.sandwich_paths
    rnp_paths = 2 if config.distillation else 1
    if not config.sandwich_paths and config.distillation:
        warmup_paths = 2
    return warmup * warmup_paths + _rnp_updates(config) * rnp_paths


def image_passes(config):
    """Training image-passes (forward and backward) of each side, for the
    fair-protocol line of the results: RNP's warm-up and Algorithm 1's
    fine-tuning against each static model's fine-tuning, and the forward
    passes of Algorithm 1's decision steps apart."""
    batch = config.batch_size
    decision, _ = phase_counts(
        _rnp_steps(config), config.decision_steps, config.backbone_steps
    )
    return {
        "rnp_backbone": _backbone_updates(config) * batch,
        "rnp_decision_forward": decision * batch,
        "static_per_model": _backbone_updates(config) * batch,
    }


def _finetune_optimizer(config, steps, learning_rate=None):
    return _sgd(config, learning_rate or config.finetune_lr, steps)


def _sgd(config, peak_lr, steps):
    """Nesterov SGD on a cosine schedule, with `--weight_decay` on the
    weights `--decay` names."""
    optimizer = keras.optimizers.SGD(
        keras.optimizers.schedules.CosineDecay(peak_lr, steps),
        momentum=0.9,
        nesterov=True,
        weight_decay=config.weight_decay,
    )
    decay = config.decay
    if decay == "auto":
        decay = "kernels" if config.arch == "resnet20" else "all"
    if decay == "kernels":
        optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return optimizer


def _load(path, what):
    return io_utils.load_model(
        path, what, hint="run the step that makes it first (see --steps)"
    )


def rnp_name(penalty):
    return f"rnp_p{penalty:g}"


def _rnp_start(config, train):
    """What Algorithm 1 starts from: `backbone.keras` with its filters
    sorted by L1 norm (`--sort_filters`), then fine-tuned at every width
    for `--warmup_epochs` (random actions, or a supernet with
    `--sandwich_paths`). A plain backbone (`warmup.keras`), or, with
    `--width_aware_bn`, the warm-up's RNP model (`warmup_rnp.keras`), which
    holds the per-width statistics."""
    backbone = _load(config.path("backbone.keras"), "backbone")
    if config.sort_filters:
        backbone = sort_filters(backbone)
    if not config.warmup_epochs:
        return backbone
    name = "warmup_rnp.keras" if config.width_aware_bn else "warmup.keras"
    if config.done(name):
        return _load(config.path(name), "warmed-up model")
    kind = "supernet" if config.sandwich_paths else "random widths"
    print(f"-- warm-up: {kind} --", flush=True)
    with config.strategy().scope():
        # No decision steps; every action drawn uniformly at random, or
        # the sandwich rule's paths.
        rnp = keras_rnp.wrap(
            backbone,
            groups=config.groups,
            gate_first=config.gate_first,
            decision_steps=0,
            backbone_epsilon=1.0,
            distillation=0.0 if config.sandwich_paths else config.distillation,
            sandwich_paths=config.sandwich_paths,
            width_aware_bn=config.width_aware_bn,
            width_aware_affine=config.width_aware_affine,
            seed=config.seed,
        )
        rnp.compile(
            optimizer=_finetune_optimizer(
                config,
                config.warmup_epochs * _steps_per_epoch(config),
                config.warmup_lr,
            ),
            metrics=["accuracy"],
        )
    rnp.fit(
        train,
        epochs=config.warmup_epochs,
        callbacks=_callbacks(config, "warmup"),
        verbose=config.verbose,
    )
    if config.width_aware_bn:
        rnp.save(config.output(name))
        return rnp
    backbone = keras_rnp.strip(rnp)
    io_utils.save_model(backbone, config.output(name))
    return backbone


def train_rnp(config):
    """Step 2: wraps the backbone and trains RNP once per penalty; saves
    `rnp_p<penalty>.keras`."""
    todo = [
        penalty
        for penalty in config.penalties
        if not config.done(f"{rnp_name(penalty)}.keras")
    ]
    if not todo:
        return
    train, _ = data(config, "train", training=True)
    val, _ = data(config, "validation")
    start = _rnp_start(config, train)
    for penalty in todo:
        name = rnp_name(penalty)
        print(f"-- {name} --", flush=True)
        with config.strategy().scope():
            # Both clone what they start from: each penalty starts afresh.
            if isinstance(start, keras_rnp.RNPModel):
                make = keras_rnp.rewrap
                structure = {}
            else:
                make = keras_rnp.wrap
                structure = dict(
                    groups=config.groups,
                    gate_first=config.gate_first,
                    width_aware_bn=config.width_aware_bn,
                    width_aware_affine=config.width_aware_affine,
                )
            rnp = make(
                start,
                **structure,
                sandwich_paths=0,
                fixed_paths=(),
                target_update_steps=config.target_update_steps,
                double_dqn=config.double_dqn,
                penalty=penalty,
                penalty_mode=config.penalty_mode,
                backbone_epsilon=config.backbone_epsilon,
                distillation=config.distillation,
                decision_steps=config.decision_steps,
                backbone_steps=config.backbone_steps,
                # Explore widely over the first third of the decision steps.
                epsilon_decay_steps=epsilon_decay_steps_for(
                    _rnp_steps(config),
                    config.decision_steps,
                    config.backbone_steps,
                ),
                seed=config.seed,
            )
            rnp.compile(
                optimizer=_finetune_optimizer(config, _rnp_updates(config)),
                decision_optimizer=keras.optimizers.Adam(1e-3),
                metrics=["accuracy"],
            )
        callbacks = _callbacks(config, name)
        if config.select_flops_ratio:
            callbacks.append(
                keras_rnp.callbacks.SelectOnValidation(
                    config.select_flops_ratio
                )
            )
        rnp.fit(
            train,
            epochs=config.rnp_epochs,
            validation_data=val,
            callbacks=callbacks,
            verbose=config.verbose,
        )
        rnp.save(config.output(f"{name}.keras"))


def static_name(speedup):
    return f"static_{speedup:g}x"


def train_static(config):
    """Step 3: L1-norm filter pruning of the backbone to 1/speedup of its
    FLOPs, fine-tuned for as many steps as RNP fine-tunes the backbone;
    saves `static_<speedup>x.keras`."""
    train, _ = data(config, "train", training=True)
    val, _ = data(config, "validation")
    updates = _backbone_updates(config)
    epochs = max(1, config.rnp_epochs)
    for speedup in config.static_speedups:
        name = static_name(speedup)
        if config.done(f"{name}.keras"):
            continue
        with config.strategy().scope():
            backbone = _load(config.path("backbone.keras"), "backbone")
            model, keep = l1_prune_to_flops(
                backbone, speedup, prune_first=config.static_prune_first
            )
        print(
            f"-- {name}: keeps {keep:.3f} of the filters, "
            f"{keras_rnp.count_flops(model):,.0f} FLOPs, "
            f"{updates} fine-tuning steps --",
            flush=True,
        )
        with config.strategy().scope():
            trainable = _trainable(config, model)
            trainable.compile(
                optimizer=_finetune_optimizer(config, updates),
                loss=_loss(),
                metrics=["accuracy"],
            )
        trainable.fit(
            train.repeat(),
            epochs=epochs,
            steps_per_epoch=-(-updates // epochs),
            validation_data=val,
            callbacks=_callbacks(config, name),
            verbose=config.verbose,
        )
        io_utils.save_model(model, config.output(f"{name}.keras"))


def _predict(model, test):
    """Per-image losses, labels and predicted classes, in one pass."""
    losses, labels, predictions = [], [], []
    for images, batch_labels in test:
        logits = model(images, training=False)
        losses.append(evaluation.per_image_losses(batch_labels, logits))
        labels.append(batch_labels.numpy())
        predictions.append(np.argmax(logits, axis=-1))
    return tuple(np.concatenate(x) for x in (losses, labels, predictions))


def evaluate(config):
    """Step 4: test accuracy and mean FLOPs per image of every model, the
    budget sweep, per-layer action tables and the rank correlation of
    per-image FLOPs with the full network's loss. Writes `results.json`
    and `per_image.npz` (the sweep model's per-image FLOPs)."""
    test, _ = data(config, "test")
    backbone = _load(config.path("backbone.keras"), "trained backbone")
    full_flops = keras_rnp.count_flops(backbone)
    losses, labels, predictions = _predict(backbone, test)
    backbone_accuracy = float(np.mean(predictions == labels))
    results = {
        "config": {
            key: value
            for key, value in vars(config).items()
            if not key.startswith("_")
            and isinstance(value, (int, float, str, tuple, list, type(None)))
        },
        "full": {"accuracy": backbone_accuracy, "flops": full_flops},
        "rnp": [],
        "sweep": [],
        "paths": [],
        "static": [],
    }
    print(
        f"full network: accuracy {backbone_accuracy:.4f}, "
        f"{full_flops / 1e6:.2f} MFLOPs"
    )

    def summarize(rnp, penalty, budget):
        rep = keras_rnp.report(rnp, test, budget=budget)
        row = rep.summary()
        row["penalty"] = penalty
        row["loss_rank_correlation"] = keras_rnp.rank_correlation(
            rep.flops, losses
        )
        return row, rep

    per_image = {}
    for penalty in config.penalties:
        rnp = _load(config.path(f"{rnp_name(penalty)}.keras"), "RNP model")
        print(f"-- {rnp_name(penalty)} --")
        at_zero = summarize(rnp, penalty, 0.0)
        results["rnp"].append(at_zero[0])
        if penalty == config.penalties[0]:
            for budget in config.budgets:
                print(f"-- {rnp_name(penalty)}, budget {budget:g} --")
                row, rep = (
                    at_zero if budget == 0 else summarize(rnp, penalty, budget)
                )
                results["sweep"].append(row)
                per_image[f"flops_b{budget:g}"] = rep.flops
            per_image["labels"] = labels
            per_image["full_losses"] = losses
            results["paths"] = default_paths(config, rnp, test, summarize)
    for speedup in config.static_speedups:
        model = _load(config.path(f"{static_name(speedup)}.keras"), "model")
        _, _, static_predictions = _predict(model, test)
        accuracy = float(np.mean(static_predictions == labels))
        flops = keras_rnp.count_flops(model)
        results["static"].append(
            {
                "speedup": speedup,
                "accuracy": accuracy,
                "flops": flops,
                "flops_ratio": flops / full_flops,
            }
        )
    results["comparison"] = evaluation.compare(results)
    results["image_passes"] = image_passes(config)
    print(format_results(results))
    print(
        "training image-passes (forward and backward): RNP's backbone "
        f"{results['image_passes']['rnp_backbone']:,}, each static model "
        f"{results['image_passes']['static_per_model']:,}; RNP's decision "
        f"steps also ran {results['image_passes']['rnp_decision_forward']:,} "
        "forward passes"
    )
    io_utils.write_json(config.path("results.json"), results)
    with io_utils.atomic_path(config.path("per_image.npz")) as staging:
        with open(staging, "wb") as f:
            np.savez(f, **per_image)
    return results


def default_paths(config, rnp, test, summarize):
    """For each of `--path_speedups`, the default path and margin chosen
    on the validation split, then the model under them on the test split
    (`summarize`'s row), beside the fixed path alone."""
    if not config.path_speedups:
        return []
    images, labels = load_split(config.dataset, "validation", config.data_dir)
    if config.limit:
        images, labels = images[: config.limit], labels[: config.limit]
    rows = []
    for speedup in config.path_speedups:
        print(f"-- {rnp.name}: a default path at {speedup:g}x --")
        choice = keras_rnp.choose_path(
            rnp, images, labels, speedup, batch_size=config.batch_size
        )
        path = choice["path"]
        correct = []
        for x, y in test:
            out = rnp.run(x, actions=np.tile(path, (len(x), 1)))
            correct.append(np.argmax(out["logits"], -1) == y.numpy())
        before = rnp.default_path, rnp.path_margin
        rnp.set_default_path(path, choice["margin"])
        try:
            row, _ = summarize(rnp, rnp.penalty, 0.0)
        finally:
            rnp.set_default_path(*before)
        row.update(
            target_speedup=speedup,
            path=list(path),
            margin=choice["margin"],
            validation_accuracy=choice["accuracy"],
            fixed_path_accuracy=float(np.mean(np.concatenate(correct))),
            fixed_path_flops_ratio=1 / choice["fixed_path"]["speedup"],
        )
        rows.append(row)
    return rows


def format_results(results):
    """The headline table: accuracy and FLOPs of every model."""
    full = results["full"]
    lines = [
        f"{'model':<22} {'accuracy':>9} {'MFLOPs':>9} {'speed-up':>9} "
        f"{'spread':>7} {'rank corr':>9}",
        f"{'full network':<22} {full['accuracy']:>9.4f} "
        f"{full['flops'] / 1e6:>9.2f} {1.0:>8.2f}x",
    ]

    def rnp_line(name, row):
        return (
            f"{name:<22} {row['accuracy']:>9.4f} "
            f"{row['mean_flops'] / 1e6:>9.2f} "
            f"{1 / row['flops_ratio']:>8.2f}x "
            f"{row['flops_spread']:>7.3f} "
            f"{row['loss_rank_correlation']:>9.3f}"
        )

    for kind, rows in (("rnp", results["rnp"]), ("sweep", results["sweep"])):
        for row in rows:
            name = f"RNP p={row['penalty']:g}"
            if kind == "sweep":
                name += f" budget {row['budget']:g}"
            lines.append(rnp_line(name, row))
    for row in results.get("paths", []):
        name = f"RNP path {''.join(map(str, row['path']))} m={row['margin']:g}"
        lines.append(rnp_line(name, row))
        name = f"  fixed path {''.join(map(str, row['path']))}"
        lines.append(
            f"{name:<22} {row['fixed_path_accuracy']:>9.4f} "
            f"{'':>9} {1 / row['fixed_path_flops_ratio']:>8.2f}x"
        )
    for row in results["static"]:
        name = f"static L1 {row['speedup']:g}x"
        lines.append(
            f"{name:<22} {row['accuracy']:>9.4f} {row['flops'] / 1e6:>9.2f} "
            f"{1 / row['flops_ratio']:>8.2f}x"
        )
    if results.get("comparison"):
        lines.extend(format_comparison(results["comparison"]))
    static = {row["speedup"]: row["accuracy"] for row in results["static"]}
    for row in results.get("paths", []):
        if row["target_speedup"] in static:
            difference = row["accuracy"] - static[row["target_speedup"]]
            lines.append(
                f"at {row['target_speedup']:g}x: static "
                f"{static[row['target_speedup']]:.4f}, RNP with a default "
                f"path {row['accuracy']:.4f} ({difference:+.4f}) at "
                f"{1 / row['flops_ratio']:.2f}x"
            )
    return "\n".join(lines)


def format_comparison(comparison):
    """The lines of `compare`'s verdicts."""
    best = comparison["within_1_point"]
    if best is None:
        verdict = "none"
    else:
        verdict = (
            f"{best['speedup']:.2f}x (p={best['penalty']:g}, budget "
            f"{best['budget']:g}, accuracy {best['accuracy']:.4f})"
        )
    lines = [f"largest reduction within 1 point of the full network: {verdict}"]
    for row in comparison["static"]:
        line = f"at {row['speedup']:g}x: static {row['static_accuracy']:.4f}"
        if row["rnp_accuracy"] is None:
            line += ", the sweep does not reach it"
        else:
            line += (
                f", RNP sweep {row['rnp_accuracy']:.4f} "
                f"({row['difference']:+.4f})"
            )
        lines.append(line)
    return lines


def plots(config):
    """Step 5: `accuracy_vs_flops.png` and `images_by_flops.png`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = config.path("results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Expected {path}: run --steps=evaluate first.")
    with open(path) as f:
        results = json.load(f)
    full = results["full"]

    figure, axes = plt.subplots(figsize=(6, 4.5))
    sweep = results["sweep"]
    if sweep:
        axes.plot(
            [1 / r["flops_ratio"] for r in sweep],
            [100 * r["accuracy"] for r in sweep],
            "o-",
            label=f"RNP, budget sweep (p={sweep[0]['penalty']:g})",
        )
    axes.plot(
        [1 / r["flops_ratio"] for r in results["rnp"]],
        [100 * r["accuracy"] for r in results["rnp"]],
        "s",
        label="RNP, one model per penalty",
    )
    axes.plot(
        [1 / r["flops_ratio"] for r in results["static"]],
        [100 * r["accuracy"] for r in results["static"]],
        "^--",
        label="static L1 pruning, fine-tuned",
    )
    axes.plot([1.0], [100 * full["accuracy"]], "k*", ms=12, label="full")
    axes.set_xlabel("FLOPs reduction (x, decision network counted)")
    axes.set_ylabel("test accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    _save_figure(figure, config.path("accuracy_vs_flops.png"))
    plt.close(figure)

    per_image = np.load(config.path("per_image.npz"))
    flops = per_image["flops_b0"]
    images = []
    test, _ = data(config, "test")
    for batch, _labels in test:
        images.append(batch.numpy().astype(np.uint8))
    images = np.concatenate(images)[: len(flops)]
    # Cheapest to most expensive; ties broken by the full network's loss.
    order = np.lexsort((per_image["full_losses"], flops))
    rows, cols = 6, 12
    cells = min(rows * cols, len(order))
    picks = order[np.linspace(0, len(order) - 1, cells).astype(int)]
    figure, grid = plt.subplots(rows, cols, figsize=(cols, rows * 1.15))
    for ax in grid.flat:
        ax.axis("off")
    for ax, index in zip(grid.flat[:cells], picks, strict=True):
        ax.imshow(images[index])
        ax.set_title(f"{flops[index] / full['flops']:.2f}", fontsize=7)
    figure.suptitle(
        "Test images ordered by the FLOPs RNP spent on them "
        "(fraction of the full network)",
        fontsize=9,
    )
    figure.tight_layout()
    _save_figure(figure, config.path("images_by_flops.png"))
    plt.close(figure)


def _save_figure(figure, path):
    with io_utils.atomic_path(path) as staging:
        figure.savefig(staging, format="png", dpi=110)
    print(f"Wrote {path}")


RUNNERS = {
    "backbone": train_backbone,
    "rnp": train_rnp,
    "static": train_static,
    "evaluate": evaluate,
    "plots": plots,
}


def run(config):
    """Runs `config.steps` in order; returns the evaluation results (or
    None when `evaluate` is not among them)."""
    results = None
    chief = distribute.is_chief(config.strategy())
    for step in config.steps:
        start = time.time()
        if step in ("evaluate", "plots") and not chief:
            print(f"== {step}: the chief's ==", flush=True)
            continue
        print(f"== {step} ==", flush=True)
        out = RUNNERS[step](config)
        if step == "evaluate":
            results = out
        if step not in ("evaluate", "plots"):
            # The other workers read what the chief wrote in the next step.
            distribute.barrier(config.strategy())
        print(f"== {step}: {time.time() - start:.0f} s ==", flush=True)
    # The workers leave together: one that leaves early (while the chief
    # evaluates) can fail the others' shutdown (tensorflow/tensorflow#58434).
    distribute.barrier(config.strategy())
    distribute.remove_worker_dir(config.work_dir, config.strategy())
    return results


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # tfds logs every split it reads.
    config = config_from_flags()
    keras.utils.set_random_seed(config.seed)
    try:
        run(config)
    except Exception as error:  # noqa: BLE001 - reported in one line.
        # Bad data directories, missing or corrupt files, bad settings.
        if FLAGS.traceback:
            raise
        lines = str(error).strip().splitlines() or [type(error).__name__]
        print(f"error: {lines[0]} (--traceback shows where)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
