"""The tiny training run that test_distributed.py repeats under several
strategies (imported by distributed_run.py and multi_worker_run.py once
TensorFlow's devices are set)."""

import keras
import numpy as np
import tensorflow as tf

import keras_rnp

L = keras.layers


def data(batch_size=16):
    """64 training and 32 validation images in batches of `batch_size`
    (split among the replicas), sharded by data on several workers."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(96, 8, 8, 3)).astype("float32")
    labels = (images[..., 0].mean(axis=(1, 2)) > 0).astype("int32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )

    def dataset(start, stop):
        return (
            tf.data.Dataset.from_tensor_slices(
                (images[start:stop], labels[start:stop])
            )
            .batch(batch_size)
            .with_options(options)
        )

    return dataset(0, 64), dataset(64, 96)


def cnn():
    # No batch norm: per-replica batch statistics would (rightly) differ
    # from whole-batch ones.
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(8, 3, padding="same", activation="relu"),
            L.Conv2D(8, 3, padding="same", activation="relu"),
            L.MaxPooling2D(),
            L.Conv2D(8, 3, padding="same", activation="relu"),
            L.GlobalAveragePooling2D(),
            L.Dense(3),
        ]
    )


def train_rnp(strategy, epochs=3, callbacks=None, validation=False):
    """Trains a wrapped `cnn()` with Algorithm 1 under `strategy`."""
    keras.utils.set_random_seed(0)
    train, val = data()
    with strategy.scope():
        rnp = keras_rnp.wrap(
            cnn(),
            groups=4,
            penalty=0.05,
            decision_steps=2,
            backbone_steps=2,
            # No exploration: the same actions on one device and on two.
            epsilon_start=0.0,
            epsilon_end=0.0,
            seed=0,
        )
        rnp.compile(
            optimizer=keras.optimizers.SGD(0.05),
            decision_optimizer=keras.optimizers.SGD(0.05),
        )
    history = rnp.fit(
        train,
        epochs=epochs,
        verbose=0,
        validation_data=val if validation else None,
        callbacks=callbacks,
    )
    return rnp, {
        "replicas": strategy.num_replicas_in_sync,
        "weights": [np.asarray(w).tolist() for w in rnp.trainable_weights],
        "step_counter": int(rnp.step_counter.numpy()),
        "decision_step_counter": int(rnp.decision_step_counter.numpy()),
        "loss_ema": float(rnp.loss_ema.numpy()),
        "history": {
            k: [float(v) for v in vs] for k, vs in history.history.items()
        },
    }


def train_plain(strategy, epochs=2):
    """Trains `cnn()` with Keras' own fit (through
    `keras_rnp.distribute.multi_worker_model`) under `strategy`."""
    keras.utils.set_random_seed(0)
    train, val = data()
    with strategy.scope():
        model = cnn()
        trainable = keras_rnp.distribute.multi_worker_model(model)
        trainable.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    history = trainable.fit(
        train, epochs=epochs, verbose=0, validation_data=val
    )
    return {
        "weights": [np.asarray(w).tolist() for w in model.weights],
        "iterations": int(trainable.optimizer.iterations.numpy()),
        "history": {
            k: [float(v) for v in vs] for k, vs in history.history.items()
        },
    }
