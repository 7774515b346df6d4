"""RNP's uniform paths, which share one set of weights, against static
pruning's separate networks, on the same split.

For each model in `--models` (a plain backbone, wrapped with `--groups`
and `--gate_first`, or an RNP model as it is, per-width statistics
included), forces the same number of groups at every
gated layer and measures accuracy and FLOPs; for each model in `--static`,
accuracy and FLOPs as it is. FLOPs ratios are against the first model's full
network. No decision network is involved: these are the widths Q-learning
chooses among.

    python benchmarks/shared_paths.py --data_dir=../shared/data/cifar10 \
        --models=runs/cifar10_c/warmup.keras \
        --static=runs/cifar10_c/static_2x.keras,runs/cifar10_c/static_4x.keras
"""

import os

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import keras_rnp  # noqa: E402
from keras_rnp import io_utils  # noqa: E402
from keras_rnp.data_utils import load_split  # noqa: E402
from keras_rnp.evaluation import accuracy  # noqa: E402
from keras_rnp.evaluation import uniform_paths  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "Backbones or RNP models (.keras).")
flags.DEFINE_list("static", [], "Statically pruned models (.keras).")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset name.")
flags.DEFINE_string("data_dir", None, "ImageFolder or tfds data directory.")
flags.DEFINE_string("split", "validation", "Split to measure on.")
flags.DEFINE_integer("groups", 4, "Channel groups per gated convolution.")
flags.DEFINE_bool("gate_first", False, "Also gate the first convolution.")
flags.DEFINE_string(
    "results", "benchmarks/results/shared_paths.json", "Where to write JSON."
)
flags.mark_flag_as_required("models")


def _backbone(path):
    """A plain model, or an RNP model as it is (with its per-width
    statistics, if it has them)."""
    return keras.saving.load_model(path)


def main(argv):
    del argv
    images, labels = load_split(FLAGS.dataset, FLAGS.split, FLAGS.data_dir)
    results = {
        "split": FLAGS.split,
        "images": len(labels),
        "gate_first": FLAGS.gate_first,
        "paths": {},
        "static": {},
    }
    full_flops = None
    for path in FLAGS.models:
        backbone = _backbone(path)
        full_flops = full_flops or keras_rnp.count_flops(backbone)
        results["paths"][path] = uniform_paths(
            backbone, images, labels, FLAGS.groups, FLAGS.gate_first
        )
    for path in FLAGS.static:
        model = keras.saving.load_model(path)
        logits = model.predict(images, batch_size=500, verbose=0)
        results["static"][path] = {
            "accuracy": accuracy(logits, labels),
            "flops": float(keras_rnp.count_flops(model)),
        }

    print(f"{len(labels)} {FLAGS.split} images; FLOPs ratio = full / used")
    for path, rows in results["paths"].items():
        print(f"{path} (every gated layer at the same action):")
        for row in rows:
            print(
                f"  {row['action']} groups {full_flops / row['flops']:6.2f}x "
                f"{row['accuracy']:.4f}"
            )
    for path, row in results["static"].items():
        print(
            f"{path}: {full_flops / row['flops']:6.2f}x {row['accuracy']:.4f}"
        )
    io_utils.write_json(FLAGS.results, results)
    print(f"Wrote {FLAGS.results}")


if __name__ == "__main__":
    app.run(main)
