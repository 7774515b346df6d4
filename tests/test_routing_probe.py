"""benchmarks/routing_probe.py records what the decision network reads
(each gated layer's input, averaged over space) on a fixed path: checked
against a NumPy version of the network. The script defines absl flags
that other scripts the suite imports define too, so it runs in its own
interpreter."""

import os

from helpers import run_checks

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "..", "benchmarks", "routing_probe.py")

CHECKS = """
import importlib.util
import sys
import numpy as np
sys.path.insert(0, HERE)
from helpers import np_batch_norm, np_conv2d, np_max_pool, np_small_cnn
from helpers import small_cnn
import keras_rnp

spec = importlib.util.spec_from_file_location("routing_probe", PATH)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)

model = small_cnn()
rnp = keras_rnp.wrap(model, groups=4)
x = np.random.default_rng(1).normal(size=(7, 10, 10, 3)).astype("float32")
averages, logits = probe.run_path(rnp, x, (1, 2), batch_size=3)

conv0, bn0, _, conv1, bn1 = model.layers[:5]
first = np.maximum(
    np_batch_norm(np_conv2d(x, *conv0.get_weights(), padding="same"), bn0), 0
)
second = np.maximum(
    np_batch_norm(np_conv2d(first, *conv1.get_weights(), padding="same"), bn1),
    0,
)
second = np_max_pool(second)
second[..., 4:] = 0  # action 1 of 4 groups keeps 4 of 16 channels
np.testing.assert_allclose(averages[0], first.mean(axis=(1, 2)), atol=1e-4)
np.testing.assert_allclose(averages[1], second.mean(axis=(1, 2)), atol=1e-4)
rich, _ = probe.run_path(rnp, x, (1, 2), 4, ("mean", "max", "std"))
expected = [f(first, axis=(1, 2)) for f in (np.mean, np.max, np.std)]
np.testing.assert_allclose(rich[0], np.concatenate(expected, axis=1), atol=1e-4)
reference = np_small_cnn(model, x, np.tile([1, 2], (7, 1)), 4)
np.testing.assert_allclose(logits, reference, atol=1e-4)

# The probe's AUC: a feature that orders the errors perfectly gives 1.
wrong = np.array([0, 1] * 20)
feature = wrong[:, None] + np.random.default_rng(2).normal(size=(40, 1)) * 0.1
assert probe.probe_auc(feature, wrong, feature, wrong)[0] == 1.0
print("ok")
"""


def test_probe_records_each_gated_layer_s_averaged_input():
    run_checks(CHECKS, PATH=PATH, HERE=HERE)
