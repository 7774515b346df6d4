"""Training on several workers: a small workaround and the chief's helpers.

Keras 3's `fit` does not run under `tf.distribute.MultiWorkerMirroredStrategy`
(keras-team/keras#20585, tensorflow/tensorflow#72388; still so in Keras
3.15 with TensorFlow 2.21). It fails at the first step in two places of
Keras' TensorFlow trainer:

1. `fit` builds the model from its first batch, which it reduces with one
   `strategy.reduce` call on the whole `(x, y)` structure. Collective
   all-reduce takes one distributed value, not a structure: "Attempt to
   convert a value (PerReplica:{...}) ... to a Tensor".
2. Every step's logs are reduced with `strategy.reduce("MEAN", v, axis=0)`,
   which fails on a scalar log ("Invalid reduction dimension 0").

The first also breaks `MirroredStrategy` when the first batch does not
split evenly among the replicas (a validation set of 5 images on 2
replicas: "Inputs to operation AddN ... must have the same size").

`MultiWorkerFit` mends both in a model class, without touching Keras: it
builds from the first replica's share of the batch (only shapes and dtypes
matter there), and runs each train or test step through `strategy.run`,
reducing the logs over all replicas with `axis=None`. `RNPModel` has it; a
plain Keras model gets it through `multi_worker_model(model)`. Both are to
go when Keras fixes the issue.

The rest is for scripts that write files: `is_chief`, `worker_dir` (where a
worker that is not the chief writes what nobody reads) and `barrier`.
"""

import os
import shutil
import tempfile

import keras
import tensorflow as tf


def step_function(model, step):
    """`model`'s per-step function for `fit`/`evaluate` under its strategy:
    `step(data)` on every replica, the logs averaged over all replicas (in
    one collective call: the logs travel packed in one vector).

    Args:
        model: a Keras model built under a tf.distribute strategy.
        step: a function of one batch returning a structure of tensors of
            static shapes (a `train_step` or `test_step`'s logs).

    Returns:
        A function of a distributed iterator, as Keras' `train_function`.
    """
    strategy = model.distribute_strategy

    def one_step(iterator):
        traced = {}

        def packed(data):
            logs = step(data)
            flat = tf.nest.flatten(logs)
            traced["logs"] = logs
            traced["specs"] = [(v.shape, v.dtype) for v in flat]
            if not flat:
                return tf.zeros([0])
            return tf.concat(
                [tf.reshape(tf.cast(v, tf.float32), [-1]) for v in flat], 0
            )

        total = strategy.reduce(
            "MEAN", strategy.run(packed, args=(next(iterator),)), axis=None
        )
        sizes = [shape.num_elements() for shape, _ in traced["specs"]]
        parts = tf.split(total, sizes) if sizes else []
        return tf.nest.pack_sequence_as(
            traced["logs"],
            [
                tf.cast(tf.reshape(part, shape), dtype)
                for part, (shape, dtype) in zip(
                    parts, traced["specs"], strict=True
                )
            ],
        )

    if not model.run_eagerly:
        one_step = tf.function(
            one_step, reduce_retracing=True, jit_compile=model.jit_compile
        )
    return one_step


class MultiWorkerFit:
    """Mixin for a `keras.Model` subclass whose `fit` and `evaluate` work
    under `MultiWorkerMirroredStrategy` (see the module docstring). Under
    any strategy, each call of the train or test function runs one step
    (`steps_per_execution` must be 1) and averages the logs over the
    replicas, as Keras' do; without a strategy nothing changes."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if (
            iterator is None
            or getattr(self, "_distribute_strategy", None) is None
        ):
            return super()._maybe_symbolic_build(iterator, data_batch)
        strategy = self.distribute_strategy
        for _, _, batches in iterator:
            data_batch = tf.nest.map_structure(
                lambda value: strategy.experimental_local_results(value)[0],
                next(batches),
            )
            break
        return super()._maybe_symbolic_build(data_batch=data_batch)

    def _check_one_step_per_execution(self):
        if self.steps_per_execution > 1:
            raise ValueError(
                f"{type(self).__name__} runs steps_per_execution=1 under a "
                "distribution strategy. Received: "
                f"steps_per_execution={self.steps_per_execution}."
            )

    def make_train_function(self, force=False):
        if getattr(self, "_distribute_strategy", None) is None:
            return super().make_train_function(force)
        if self.train_function is None or force:
            self.train_function = self._step_function(self.train_step)
        return self.train_function

    def make_test_function(self, force=False):
        if getattr(self, "_distribute_strategy", None) is None:
            return super().make_test_function(force)
        if self.test_function is None or force:
            self.test_function = self._step_function(self.test_step)
        return self.test_function

    def _step_function(self, step):
        self._check_one_step_per_execution()
        return step_function(self, step)


class _FitView(MultiWorkerFit, keras.Model):
    pass


def multi_worker_model(model):
    """A model sharing `model`'s layers and weights whose `fit` and
    `evaluate` work under `MultiWorkerMirroredStrategy`.

    Create and compile it inside the strategy's scope, train it, then use
    (and save) `model`, which holds the trained weights.

    Args:
        model: a built functional or Sequential `keras.Model`.

    Example:

    ```python
    with strategy.scope():
        cnn = make_cnn()
        trainable = keras_rnp.distribute.multi_worker_model(cnn)
        trainable.compile(optimizer="sgd", loss=loss)
    trainable.fit(dataset, epochs=10)
    cnn.save("cnn.keras")
    ```
    """
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(
            "multi_worker_model expects a built functional or Sequential "
            f"keras.Model. Received: {model!r}."
        )
    try:
        if isinstance(model, keras.Sequential):
            inputs, outputs = model.inputs, model.outputs
        else:  # Keeps a dict or nested structure of inputs and outputs.
            inputs, outputs = model.input, model.output
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or outputs is None:
        raise ValueError(
            "multi_worker_model expects a functional or Sequential model "
            f"(one with inputs and outputs). Received: {type(model).__name__} "
            f"{model.name!r}; give a subclassed model the `MultiWorkerFit` "
            "mixin instead."
        )
    return _FitView(inputs=inputs, outputs=outputs, name=model.name)


def _task(strategy):
    """`(task_type, task_id, cluster)` of this process in a multi-worker
    cluster, or None."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return None
    cluster = resolver.cluster_spec().as_dict()
    if not cluster:
        return None
    return resolver.task_type, resolver.task_id, cluster


def is_chief(strategy=None):
    """Whether this process writes the models, logs and results: always,
    except on a multi-worker cluster, where the "chief" task does, or
    worker 0 when the cluster has no chief."""
    task = _task(strategy or tf.distribute.get_strategy())
    if task is None:
        return True
    task_type, task_id, cluster = task
    if task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def worker_name(strategy=None):
    """`"<task_type>-<task_id>"` on a multi-worker cluster, else None."""
    task = _task(strategy or tf.distribute.get_strategy())
    return None if task is None else f"{task[0]}-{task[1]}"


_WORKER_DIRS = {}


def worker_dir(path, strategy=None):
    """Where this process writes what would go to directory `path`:
    `path` itself on the chief; on another worker a new temporary
    directory of its own (Keras' multi-worker guide: workers must not write
    where the chief does), the same for the same `path` for the life of the
    process, to remove with `remove_worker_dir` when done."""
    if is_chief(strategy):
        return path
    key = os.path.abspath(path)
    if key not in _WORKER_DIRS:
        _WORKER_DIRS[key] = tempfile.mkdtemp(
            prefix=f"keras_rnp-{worker_name(strategy)}-"
        )
    return _WORKER_DIRS[key]


def remove_worker_dir(path, strategy=None):
    """Removes the directory `worker_dir(path)` gave a worker that is not
    the chief (nothing on the chief)."""
    directory = _WORKER_DIRS.pop(os.path.abspath(path), None)
    if directory is not None and not is_chief(strategy):
        shutil.rmtree(directory, ignore_errors=True)


def _local_replicas(strategy):
    """Replicas per worker (the cluster's workers and chief train)."""
    cluster = _task(strategy)[2]
    workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    return strategy.num_replicas_in_sync // workers


def barrier(strategy=None):
    """Waits until every worker of the cluster reaches this point (after
    the chief has written a file the others read, say). Does nothing
    outside a multi-worker cluster."""
    strategy = strategy or tf.distribute.get_strategy()
    if _task(strategy) is not None:
        ones = strategy.run(lambda: tf.constant(1.0))
        strategy.reduce("SUM", ones, axis=None)


def gather(value, strategy=None):
    """Every worker's `value` (an int), in task order: `[value]` outside a
    multi-worker cluster."""
    strategy = strategy or tf.distribute.get_strategy()
    if _task(strategy) is None:
        return [int(value)]
    values = strategy.run(lambda: tf.constant([int(value)], tf.int64))
    gathered = strategy.gather(values, axis=0).numpy()
    # One entry per replica: each worker's local replicas hold its value.
    return [int(v) for v in gathered[:: _local_replicas(strategy)]]
