"""Trains a tiny RNP model on one device and under MirroredStrategy with two
logical CPUs; prints the results as JSON (run by test_distributed.py in a
subprocess: logical devices must be set before TensorFlow starts)."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_rnp  # noqa: E402

L = keras.layers


def train(strategy, images, labels):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        # No batch norm: per-replica batch statistics would (rightly)
        # differ from whole-batch ones.
        cnn = keras.Sequential(
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
        rnp = keras_rnp.wrap(
            cnn,
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
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    history = rnp.fit(data, epochs=3, verbose=0)
    return {
        "replicas": strategy.num_replicas_in_sync,
        "weights": [np.asarray(w).tolist() for w in rnp.trainable_weights],
        "step_counter": int(rnp.step_counter.numpy()),
        "decision_step_counter": int(rnp.decision_step_counter.numpy()),
        "loss_ema": float(rnp.loss_ema.numpy()),
        "history": {
            k: [float(v) for v in vs] for k, vs in history.history.items()
        },
    }


def main():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    labels = (images[..., 0].mean(axis=(1, 2)) > 0).astype("int32")
    one = train(tf.distribute.OneDeviceStrategy("/cpu:0"), images, labels)
    two = train(
        tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), images, labels
    )
    # One replica, mirrored (the README's MirroredStrategy() on a machine
    # with one device): mirrored variables even so.
    mirrored_one = train(
        tf.distribute.MirroredStrategy(["/cpu:0"]), images, labels
    )
    json.dump(
        {"one": one, "two": two, "mirrored_one": mirrored_one}, sys.stdout
    )


if __name__ == "__main__":
    main()
