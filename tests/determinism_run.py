"""One seeded training run of a tiny RNP model; prints a digest of its
weights and its test actions as JSON (test_determinism.py runs it twice)."""

import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import small_cnn  # noqa: E402

import keras_rnp  # noqa: E402


def main():
    keras.utils.set_random_seed(1234)
    tf.config.experimental.enable_op_determinism()
    # Images of very different contrast take different paths.
    contrast = np.random.uniform(0.05, 8.0, (96, 1, 1, 1))
    images = (np.random.normal(size=(96, 10, 10, 3)) * contrast).astype("f4")
    labels = np.random.randint(0, 5, 96)
    # Dropout in the head, exploration in both phases, shuffled batches:
    # every source of randomness is on.
    rnp = keras_rnp.wrap(
        small_cnn(),
        groups=4,
        decision_steps=3,
        backbone_steps=2,
        backbone_epsilon=0.2,
    )
    rnp.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        decision_optimizer=keras.optimizers.Adam(1e-3),
    )
    rnp.fit(images, labels, batch_size=16, epochs=3, shuffle=True, verbose=0)
    digest = hashlib.sha256()
    for weight in rnp.weights:
        digest.update(np.asarray(weight).tobytes())
    out = rnp.run(images[:32])
    json.dump(
        {
            "weights": digest.hexdigest(),
            "actions": out["actions"].numpy().tolist(),
            "logits": out["logits"].numpy().tolist(),
            "step_counter": int(rnp.step_counter.numpy()),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
