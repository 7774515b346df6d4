"""Can the decision network's inputs tell a hard image from an easy one?

The decision network decides gated layer `t` from the global average of
the feature map entering it, and (through its LSTM) of those entering the
layers before. This script runs every image on one fixed path (by default
the cheapest, 1 group everywhere), records those averages, and asks how
well they predict that the path gets the image wrong ("wrong"), and that
it does while a wider path (`--wide`, by default every group) gets it
right ("fixable": what routing the image wider would win):

- for each `t`, a logistic regression on the averages of layer `t` alone
  and of layers `0..t` (its regularisation chosen by cross-validation),
  fitted on the validation split and scored on the test split by ROC AUC;
- beside it, what the path's own output says: the AUC of one minus its top
  softmax probability (no fitting), the signal a two-pass rule reads, and
  a logistic regression on its sorted softmax probabilities.

`--statistics=mean,max,std` asks the same of richer per-channel
statistics than the decision network's encoder reads. `--read_path=4444`
(every group) gives the probes the widest inputs a policy could have seen,
still predicting the errors of `--path`.

An AUC near the output's at an early layer means the decisions could route
by difficulty there and the policy's training is what fails; an AUC near
0.5 means a policy reading these inputs could not, since the difficulty
is not yet visible in them when that layer's width is chosen (a linear
reading: a nonlinear one may find more; BENCHMARKS.md, issue 13).
Needs scikit-learn (the examples' and tests' extras).

    python benchmarks/routing_probe.py --data_dir=../shared/data/cifar10 \\
        --model=runs/resnet20c/warmup_rnp.keras
"""

import os
import warnings

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.linear_model import LogisticRegressionCV  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from keras_rnp import RNPModel  # noqa: E402
from keras_rnp import execution  # noqa: E402
from keras_rnp import io_utils  # noqa: E402
from keras_rnp import rank_correlation  # noqa: E402
from keras_rnp import validation  # noqa: E402
from keras_rnp.data_utils import load_split  # noqa: E402
from keras_rnp.evaluation import per_image_losses  # noqa: E402

# scikit-learn 1.9 announces changes to LogisticRegressionCV's defaults
# that do not change the fit used here.
warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A trained RNP model (.keras).")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset name.")
flags.DEFINE_string("data_dir", None, "ImageFolder or tfds data directory.")
flags.DEFINE_string(
    "path", "", "The fixed path, one digit per gated layer (default: all 1)."
)
flags.DEFINE_string(
    "wide",
    "",
    "A wider path, one digit per gated layer (default: every group): an "
    "image is fixable if --path gets it wrong and this path right.",
)
flags.DEFINE_string(
    "read_path",
    "",
    "The path whose layer inputs the probes read (default: --path). "
    "Every group (e.g. 4444) gives them the widest inputs a policy could "
    "have seen.",
)
flags.DEFINE_list(
    "statistics",
    ["mean"],
    "Per-channel statistics of each layer's input the probes read: mean "
    "(what the decision network reads), max, std.",
)
flags.DEFINE_integer(
    "batch_size", 500, "Images per forward pass.", lower_bound=1
)
flags.DEFINE_string(
    "output", "benchmarks/results/routing_probe.json", "Where to write."
)


STATISTICS = {
    "mean": lambda x: tf.reduce_mean(x, [1, 2]),
    "max": lambda x: tf.reduce_max(x, [1, 2]),
    "std": lambda x: tf.math.reduce_std(x, [1, 2]),
}


class _Recorder:
    """Stands in for the decision network: records per-channel statistics
    of each gated layer's input over space (the decision network reads the
    mean) and reports no Q-values of its own.

    A uniform batch hands a gated layer only the channels the layer before
    it computed; the others are zeros in the full feature map, and so are
    their statistics, which are padded back (as the decision network pads
    its mean)."""

    def __init__(self, groups, statistics, input_channels):
        self.groups = groups
        self.statistics = statistics
        self.input_channels = input_channels
        self.averages = []

    def initial_state(self, batch_size):
        del batch_size
        return []

    def step(self, t, feature_map, state):
        padding = self.input_channels[t] - feature_map.shape[-1]
        values = [
            tf.pad(STATISTICS[name](feature_map), [[0, 0], [0, padding]])
            for name in self.statistics
        ]
        values = tf.cast(tf.concat(values, axis=-1), tf.float32)
        self.averages.append(values.numpy())
        batch = tf.shape(feature_map)[0]
        return tf.zeros([batch, self.groups]), state


def run_path(rnp, images, path, batch_size, statistics=("mean",)):
    """Per-layer input statistics (a list of `[N, len(statistics) * C_t]`)
    and `[N, classes]` logits of `images` on the fixed `path`."""
    layers = [[] for _ in path]
    logits = []
    for i in range(0, len(images), batch_size):
        part = tf.convert_to_tensor(images[i : i + batch_size])
        recorder = _Recorder(
            rnp.groups, statistics, rnp.decision.input_channels
        )
        actions = tf.constant(np.tile(path, (len(part), 1)), tf.int32)
        out = execution.forward(
            rnp.plan,
            recorder,
            tf.cast(part, rnp.compute_dtype),
            lambda t, q, actions=actions: actions[:, t],
            mode=execution.SLICED,
        )[0]
        logits.append(keras.ops.convert_to_numpy(out).astype("float32"))
        for t, average in enumerate(recorder.averages):
            layers[t].append(average)
    return [np.concatenate(a) for a in layers], np.concatenate(logits)


def probe_auc(train_features, train_wrong, test_features, test_wrong):
    """Test ROC AUC of a logistic regression fitted on the train side (its
    regularisation chosen by 3-fold cross-validation there, on ROC AUC),
    and its `[N]` test scores."""
    classifier = LogisticRegressionCV(
        Cs=[0.001, 0.01, 0.1, 1.0], cv=3, scoring="roc_auc", max_iter=2000
    )
    probe = make_pipeline(StandardScaler(), classifier)
    probe.fit(train_features, train_wrong)
    scores = probe.predict_proba(test_features)[:, 1]
    return float(roc_auc_score(test_wrong, scores)), scores


def parse_path(text, rnp, flag):
    """`--flag`'s digits as a path of `rnp` (keras_rnp's own check)."""
    try:
        if not text.isdigit():
            raise ValueError(
                f"--{flag} expects digits, one per gated layer. Received: "
                f"{text!r}."
            )
        return validation.check_path(
            f"--{flag}",
            [int(c) for c in text],
            rnp.num_gated_layers,
            rnp.groups,
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from None


def sorted_probabilities(logits):
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
    return -np.sort(-probabilities, axis=-1)


def score(train, test, target):
    """The AUCs of every predictor of one target. `train` and `test` are
    dicts of the path's `averages` and `logits`, the `targets` (`[N]`
    bools by name) and `wide_losses` (each image's loss on the wide
    path). The rank correlations are of each continuous test score with
    the wide path's loss. A policy's FLOPs, which take a few values, rank
    images more coarsely than the score they follow, so these are
    upper sides, not what such a policy would measure.

    Returns None (and says so) when a split has images of one kind only
    (e.g. no fixable image: `--wide` no better than `--path`)."""
    train_avg, train_y = train["averages"], train["targets"][target]
    test_avg, test_y = test["averages"], test["targets"][target]
    for name, y in (("validation", train_y), ("test", test_y)):
        if y.all() or not y.any():
            print(f"{target}: every {name} image is alike; not scored.")
            return None
    probabilities = sorted_probabilities(test["logits"])
    confidence = 1 - probabilities[:, 0]
    result = {
        "test_rate": float(test_y.mean()),
        "output_confidence_auc": float(roc_auc_score(test_y, confidence)),
        "output_confidence_loss_rank_correlation": rank_correlation(
            confidence, test["wide_losses"]
        ),
        "probabilities_probe_auc": probe_auc(
            sorted_probabilities(train["logits"]),
            train_y,
            probabilities,
            test_y,
        )[0],
        "layers": [],
    }
    print(
        f"{target} ({result['test_rate']:.1%} of the test images): the "
        f"path's output gives AUC {result['output_confidence_auc']:.3f} "
        f"(confidence; rank correlation with the wide path's loss "
        f"{result['output_confidence_loss_rank_correlation']:+.3f}), "
        f"{result['probabilities_probe_auc']:.3f} (a probe on its sorted "
        "probabilities)"
    )
    for t in range(len(test_avg)):
        seen = slice(0, t + 1)
        so_far = (
            np.concatenate(train_avg[seen], axis=1),
            train_y,
            np.concatenate(test_avg[seen], axis=1),
            test_y,
        )
        so_far_auc, so_far_scores = probe_auc(*so_far)
        row = {
            "layer": t,
            "features": int(test_avg[t].shape[1]),
            "this_layer_auc": probe_auc(
                train_avg[t], train_y, test_avg[t], test_y
            )[0],
            "layers_so_far_auc": so_far_auc,
            "layers_so_far_loss_rank_correlation": rank_correlation(
                so_far_scores, test["wide_losses"]
            ),
        }
        result["layers"].append(row)
        print(
            f"  gated layer {t}: {row['features']} input features, AUC "
            f"{row['this_layer_auc']:.3f} alone, "
            f"{row['layers_so_far_auc']:.3f} with the layers before "
            f"(its score's rank correlation "
            f"{row['layers_so_far_loss_rank_correlation']:+.3f})"
        )
    return result


def main(argv):
    del argv
    if not FLAGS.model:
        raise app.UsageError("Expected --model.")
    unknown = sorted(set(FLAGS.statistics) - set(STATISTICS))
    if unknown or not FLAGS.statistics:
        raise app.UsageError(
            f"Expected --statistics from {sorted(STATISTICS)}. Received: "
            f"{FLAGS.statistics}."
        )
    rnp = io_utils.load_model(FLAGS.model, "trained RNP model")
    if not isinstance(rnp, RNPModel):
        raise app.UsageError(
            f"Expected --model to be an RNP model (keras_rnp.wrap). "
            f"Received: a {type(rnp).__name__} from {FLAGS.model}."
        )
    layers = rnp.num_gated_layers
    path = parse_path(FLAGS.path or "1" * layers, rnp, "path")
    wide = parse_path(FLAGS.wide or str(rnp.groups) * layers, rnp, "wide")
    read = (
        parse_path(FLAGS.read_path, rnp, "read_path")
        if FLAGS.read_path
        else path
    )
    sides = {}
    for split in ("validation", "test"):
        images, labels = load_split(FLAGS.dataset, split, FLAGS.data_dir)
        runs = {}  # Each distinct path once (--read_path may be --wide).
        for p in (path, read, wide):
            if p not in runs:
                runs[p] = run_path(
                    rnp, images, p, FLAGS.batch_size, FLAGS.statistics
                )
        averages, logits = runs[read][0], runs[path][1]
        wide_logits = runs[wide][1]
        wrong = logits.argmax(-1) != labels
        fixable = wrong & (wide_logits.argmax(-1) == labels)
        print(
            f"{split}: {len(labels)} images, error {wrong.mean():.4f} on the "
            f"path, {np.mean(wide_logits.argmax(-1) != labels):.4f} on the "
            "wide path"
        )
        sides[split] = {
            "averages": averages,
            "logits": logits,
            "targets": {"wrong": wrong, "fixable": fixable},
            "wide_losses": per_image_losses(labels, wide_logits),
        }
    results = {
        "model": FLAGS.model,
        "path": "".join(map(str, path)),
        "wide": "".join(map(str, wide)),
        "read_path": "".join(map(str, read)),
        "statistics": FLAGS.statistics,
    }
    for target in ("wrong", "fixable"):
        results[target] = score(sides["validation"], sides["test"], target)
    io_utils.write_json(FLAGS.output, results)
    print(f"Wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
