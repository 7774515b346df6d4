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

from distributed_training import train_rnp  # noqa: E402


def main():
    _, one = train_rnp(tf.distribute.OneDeviceStrategy("/cpu:0"))
    _, two = train_rnp(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    # One replica, mirrored (the README's MirroredStrategy() on a machine
    # with one device): mirrored variables even so.
    _, mirrored_one = train_rnp(tf.distribute.MirroredStrategy(["/cpu:0"]))
    json.dump(
        {"one": one, "two": two, "mirrored_one": mirrored_one}, sys.stdout
    )


if __name__ == "__main__":
    main()
