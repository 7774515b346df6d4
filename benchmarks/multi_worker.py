"""Step time of RNP training on two workers, and what the host's phase
switch costs.

Under a tf.distribute strategy, Algorithm 1's phase of each step is chosen
on the host (one scalar read of the step counter) and the step runs as that
phase's compiled function; without a strategy it is a `tf.cond` in the
graph. This trains the same wrapped CIFAR network on random images, the
same global batch, three ways, side by side:

- one process, no strategy (the phase in the graph);
- one process, `OneDeviceStrategy` (the phase on the host);
- `--workers` processes of `MultiWorkerMirroredStrategy` on localhost
  (collective ops over the loopback), the batch split among them;

and reports the median step time of each (after `--warmup` steps) and the
median time of the host's read alone.

    python benchmarks/multi_worker.py --steps=60

Prints a table and writes JSON (`--output`).
"""

import json
import os
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FLAGS = flags.FLAGS
flags.DEFINE_integer("workers", 2, "Worker processes of the cluster.")
flags.DEFINE_integer("steps", 60, "Training steps timed per run.")
flags.DEFINE_integer("warmup", 10, "First steps left out of the medians.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_list("widths", ["32", "64", "128", "256"], "Backbone widths.")
flags.DEFINE_string(
    "output", "benchmarks/results/multi_worker.json", "Where to write JSON."
)
# Set by the benchmark for the processes it starts.
flags.DEFINE_enum(
    "run", None, ["graph", "host", "worker"], "Internal: one timed run."
)


def timed_run(kind):
    """Trains `FLAGS.steps` steps; returns step times and read times."""
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_rnp
    from keras_rnp import backbones

    strategy = {
        "graph": tf.distribute.get_strategy,
        "host": lambda: tf.distribute.OneDeviceStrategy("/cpu:0"),
        "worker": tf.distribute.MultiWorkerMirroredStrategy,
    }[kind]()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (512, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 10, 512).astype("int32")
    data = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .repeat()
        .batch(FLAGS.batch_size)
    )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    data = data.with_options(options)
    with strategy.scope():
        backbone = backbones.cifar_cnn(10, [int(w) for w in FLAGS.widths])
        rnp = keras_rnp.wrap(
            backbone, groups=4, decision_steps=2, backbone_steps=2, seed=0
        )
        rnp.compile(
            optimizer=keras.optimizers.SGD(0.01),
            decision_optimizer=keras.optimizers.Adam(1e-3),
        )

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    clock = Clock()
    rnp.fit(
        data,
        steps_per_epoch=FLAGS.steps,
        epochs=1,
        callbacks=[clock],
        verbose=0,
    )
    steps = np.diff(clock.times)[FLAGS.warmup :]
    reads = []
    for _ in range(200):
        start = time.perf_counter()
        bool(rnp.in_decision_phase().numpy())
        reads.append(time.perf_counter() - start)
    return {
        "step_ms": float(np.median(steps) * 1e3),
        "read_us": float(np.median(reads) * 1e6),
        "steps": len(steps),
        "step_counter": int(rnp.step_counter.numpy()),
    }


def launch(kind, count):
    """Runs `count` processes of `kind` at once; returns their JSON."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    argv = [a for a in sys.argv[1:] if not a.startswith("--run")]
    processes = []
    for index in range(count):
        env = dict(os.environ)
        if kind == "worker":
            env["TF_CONFIG"] = json.dumps(
                {
                    "cluster": {
                        "worker": [f"127.0.0.1:{port}" for port in ports]
                    },
                    "task": {"type": "worker", "index": index},
                }
            )
        processes.append(
            subprocess.Popen(
                [sys.executable, sys.argv[0], *argv, f"--run={kind}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    results = []
    for process in processes:
        out, err = process.communicate()
        if process.returncode:
            raise RuntimeError(f"a {kind} run failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main(argv):
    del argv
    if FLAGS.run:
        print(json.dumps(timed_run(FLAGS.run)), flush=True)
        return
    from keras_rnp import io_utils

    runs = {
        "one process, phase in the graph": launch("graph", 1)[0],
        "one process, phase on the host": launch("host", 1)[0],
    }
    workers = launch("worker", FLAGS.workers)
    runs[f"{FLAGS.workers} workers, phase on the host"] = workers[0]
    print(
        f"RNP training, global batch {FLAGS.batch_size}, widths "
        f"{','.join(FLAGS.widths)}, medians of {FLAGS.steps - FLAGS.warmup} "
        "steps"
    )
    print(f"{'run':<36} {'step (ms)':>10} {'host read (us)':>15}")
    for name, run in runs.items():
        print(f"{name:<36} {run['step_ms']:>10.1f} {run['read_us']:>15.1f}")
    io_utils.write_json(
        FLAGS.output,
        {
            "machine": {
                "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
            },
            "command": " ".join(["python", *sys.argv]),
            "batch_size": FLAGS.batch_size,
            "widths": FLAGS.widths,
            "runs": runs,
            "workers": workers,
        },
    )
    print(f"Wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
