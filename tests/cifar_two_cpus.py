"""Runs examples/cifar.py with the command-line flags given, in a process
with two logical CPUs (for `--strategy=mirrored`: one process whose
replicas split each batch as two workers do). Run by test_multi_worker.py."""

import os
import runpy
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.argv = [os.path.join(ROOT, "examples", "cifar.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
