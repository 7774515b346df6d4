"""Models saved by earlier versions still load and give the same numbers."""

import os

import keras
import numpy as np

import keras_rnp

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def test_model_saved_by_0_1_loads_with_the_same_outputs():
    # Written by tests/fixtures/make_rnp_v0_1.py with keras_rnp 0.1.0,
    # before the module split: the saved format must keep loading.
    rnp = keras.saving.load_model(os.path.join(FIXTURES, "rnp_v0_1.keras"))
    ref = np.load(os.path.join(FIXTURES, "rnp_v0_1.npz"))
    assert isinstance(rnp, keras_rnp.RNPModel)
    assert rnp.num_gated_layers == 3
    images = ref["images"]
    runs = {
        "greedy": rnp.run(images),
        "budget": rnp.run(images, budget=0.5),
        "forced": rnp.run(images, actions=ref["forced_actions"]),
    }
    for name, out in runs.items():
        np.testing.assert_array_equal(
            out["actions"].numpy(), ref[f"{name}_actions"]
        )
        for key in ("logits", "flops", "q_values"):
            np.testing.assert_allclose(
                out[key].numpy(), ref[f"{name}_{key}"], rtol=1e-5, atol=1e-5
            )
    np.testing.assert_allclose(rnp(images).numpy(), ref["call"], atol=1e-5)
    assert int(rnp.step_counter.numpy()) == int(ref["step_counter"]) == 6
    assert int(rnp.decision_step_counter.numpy()) == int(
        ref["decision_step_counter"]
    )
    np.testing.assert_allclose(rnp.loss_ema.numpy(), ref["loss_ema"])
