"""Is the input pipeline the bottleneck? tf.data with and without caching,
parallel decoding and prefetching, on the CIFAR-10 ImageFolder.

Two pipelines over the same images, timed alternately, repeat after repeat:

- `plain`: decode every JPEG every epoch, one thread, no prefetching;
- `tuned`: `keras_rnp.datasets.pipeline` as the examples use it (decoded
  images cached in memory, parallel decode and augmentation, prefetching).

For each it measures the pipeline alone (training batches per second, a
full pass after a warm-up pass that fills the cache) and the backbone's
training steps per second fed by it.

    python benchmarks/input_pipeline.py --data_dir=../shared/data/cifar10

Prints a table and writes JSON (`--output`).
"""

import os
import platform
import sys
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_rnp import backbones  # noqa: E402
from keras_rnp import datasets  # noqa: E402
from keras_rnp.io_utils import write_json  # noqa: E402

FLAGS = flags.FLAGS
# The CIFAR example's --data_dir and --batch_size.
flags.DEFINE_string(
    "data_dir",
    None,
    "An ImageFolder directory (data_dir/{train,test}/<class>/<image>), or "
    "tfds' data directory. Default: tfds' default directory.",
)
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("images", 6400, "Training images per pass.")
flags.DEFINE_integer("train_steps", 20, "Timed training steps per repeat.")
flags.DEFINE_integer("repeats", 3, "Repeats (median).")
flags.DEFINE_string(
    "output", "benchmarks/results/input_pipeline.json", "JSON output."
)

VARIANTS = {
    "plain": dict(cache=False, parallel=False, prefetch=False),
    "tuned": dict(cache=True, parallel=True, prefetch=True),
}


def make(variant):
    ds, _ = datasets.load("cifar10", "train", FLAGS.data_dir)
    return datasets.pipeline(
        ds,
        FLAGS.batch_size,
        training=True,
        limit=FLAGS.images,
        seed=0,
        **VARIANTS[variant],
    )


def batches_per_second(ds):
    start, count = time.perf_counter(), 0
    for _ in ds:
        count += 1
    return count / (time.perf_counter() - start)


def train_steps_per_second(model, ds):
    iterator = iter(ds.repeat())
    model.train_on_batch(*next(iterator))  # Compiled before timing.
    start = time.perf_counter()
    for _ in range(FLAGS.train_steps):
        model.train_on_batch(*next(iterator))
    return FLAGS.train_steps / (time.perf_counter() - start)


def main(argv):
    del argv
    pipelines = {name: make(name) for name in VARIANTS}
    for ds in pipelines.values():
        batches_per_second(ds)  # Warm-up pass (fills the tuned cache).
    model = backbones.cifar_cnn()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    results = {name: {"pipeline": [], "training": []} for name in VARIANTS}
    for repeat in range(FLAGS.repeats):
        for name, ds in pipelines.items():
            results[name]["pipeline"].append(batches_per_second(ds))
            results[name]["training"].append(train_steps_per_second(model, ds))
        print(f"repeat {repeat + 1}/{FLAGS.repeats} done", flush=True)
    rows = []
    for name, runs in results.items():
        rows.append(
            {
                "variant": name,
                **VARIANTS[name],
                "pipeline_batches_per_s": float(np.median(runs["pipeline"])),
                "training_steps_per_s": float(np.median(runs["training"])),
                "runs": runs,
            }
        )
    print(f"{'variant':<8} {'pipeline batches/s':>19} {'train steps/s':>14}")
    for row in rows:
        print(
            f"{row['variant']:<8} {row['pipeline_batches_per_s']:>19.1f} "
            f"{row['training_steps_per_s']:>14.2f}"
        )
    report = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        "command": " ".join(sys.argv),
        "batch_size": FLAGS.batch_size,
        "images": FLAGS.images,
        "rows": rows,
    }
    write_json(FLAGS.output, report)
    print(f"Wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
