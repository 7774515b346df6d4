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

# What was recorded is what the decision network reads: its Q-values,
# stepped on the recorded averages (as 1x1 feature maps), are the model's.
state = rnp.decision.initial_state(7)
want = rnp.run(x, actions=np.tile([1, 2], (7, 1)))["q_values"].numpy()
for t, average in enumerate(averages):
    q, state = rnp.decision.step(t, average[:, None, None, :], state)
    np.testing.assert_allclose(q.numpy(), want[:, t], rtol=1e-4, atol=1e-5)

# score(): probes are fitted on the validation side and scored on the
# test side. The test side's labels are the reverse of what its feature
# says on the validation side, so a probe fitted there scores AUC 0 (one
# fitted on the test side would score 1). The test logits' confidence
# orders its errors exactly: AUC 1.
rng = np.random.default_rng(2)
feature = rng.normal(size=(60, 1))
rule = feature[:, 0] > 0
test_logits = np.stack([np.where(rule, 5.0, 0.0), np.zeros(60)], axis=1)
side = lambda y, logits: {
    "averages": [feature],
    "logits": logits,
    "targets": {"wrong": y},
    "wide_losses": rng.normal(size=60),
}
train, test = side(rule, rng.normal(size=(60, 2))), side(~rule, test_logits)
result = probe.score(train, test, "wrong")
assert result["layers"][0]["layers_so_far_auc"] < 0.05, result
assert result["output_confidence_auc"] == 1.0, result
assert result["test_rate"] == np.mean(~rule)
# One kind of image only: not scored.
assert probe.score(train, side(rule & False, test_logits), "wrong") is None
print("ok")
"""


def test_probe_records_each_gated_layer_s_averaged_input():
    run_checks(CHECKS, PATH=PATH, HERE=HERE)
