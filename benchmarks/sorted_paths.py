"""What sorting filters by L1 norm does to RNP's narrow paths, untrained.

Wraps a trained backbone as it is and after `sort_filters`, forces the same
number of groups at every gated layer, and measures accuracy and FLOPs per
image on a split of CIFAR (no training, no decision network involved: the
paths RNP starts from).

    python benchmarks/sorted_paths.py --model=runs/cifar10/backbone.keras \
        --data_dir=../shared/data/cifar10
"""

import os

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from keras_rnp import io_utils  # noqa: E402
from keras_rnp.data_utils import load_split  # noqa: E402
from keras_rnp.evaluation import uniform_paths  # noqa: E402
from keras_rnp.static_pruning import sort_filters  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A trained backbone (.keras).")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset name.")
flags.DEFINE_string("data_dir", None, "ImageFolder or tfds data dir.")
flags.DEFINE_string("split", "validation", "Split to measure on.")
flags.DEFINE_integer("groups", 4, "Channel groups per gated convolution.")
flags.DEFINE_string(
    "results",
    "benchmarks/results/sorted_paths.json",
    "Where to write JSON.",
)
flags.mark_flag_as_required("model")


def main(argv):
    del argv
    images, labels = load_split(FLAGS.dataset, FLAGS.split, FLAGS.data_dir)
    backbone = keras.saving.load_model(FLAGS.model)
    results = {
        "model": FLAGS.model,
        "split": FLAGS.split,
        "images": len(labels),
        "as_trained": uniform_paths(backbone, images, labels, FLAGS.groups),
        "sorted": uniform_paths(
            sort_filters(backbone), images, labels, FLAGS.groups
        ),
    }
    print(f"{len(labels)} {FLAGS.split} images, {FLAGS.model}")
    print(f"{'groups':>6} {'MFLOPs':>8} {'as trained':>11} {'sorted':>8}")
    for plain, ordered in zip(
        results["as_trained"], results["sorted"], strict=True
    ):
        print(
            f"{plain['action']:>6} {plain['flops'] / 1e6:>8.1f} "
            f"{plain['accuracy']:>11.4f} {ordered['accuracy']:>8.4f}"
        )
    io_utils.write_json(FLAGS.results, results)
    print(f"Wrote {FLAGS.results}")


if __name__ == "__main__":
    app.run(main)
