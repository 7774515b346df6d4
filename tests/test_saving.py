"""Saving and loading: .keras round trip and configs."""

import inspect

import keras
import numpy as np
from helpers import small_cnn

import keras_rnp


def test_get_config_holds_every_constructor_argument():
    rnp = keras_rnp.wrap(
        small_cnn(),
        groups=2,
        penalty=0.3,
        penalty_mode="flops",
        gamma=0.9,
        epsilon_start=0.8,
        epsilon_end=0.05,
        epsilon_decay_steps=7,
        decision_steps=5,
        backbone_steps=6,
        code_dim=8,
        hidden_units=12,
        gate_first=True,
        alpha_momentum=0.9,
        seed=11,
    )
    config = rnp.get_config()
    arguments = set(inspect.signature(keras_rnp.RNPModel).parameters)
    arguments.discard("kwargs")
    assert arguments <= set(config)
    clone = keras_rnp.RNPModel.from_config(config)
    for name in arguments - {"backbone"}:
        assert getattr(clone, name) == getattr(rnp, name), name
    assert clone.num_gated_layers == 3


def test_keras_round_trip_gives_identical_outputs_and_actions(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 10, 10, 3)).astype("float32")
    y = rng.integers(0, 5, 16)
    rnp = keras_rnp.wrap(
        small_cnn(), groups=4, decision_steps=2, backbone_steps=2, seed=5
    )
    rnp.compile(optimizer="adam", decision_optimizer="sgd")
    rnp.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "rnp.keras"
    rnp.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects
    assert isinstance(loaded, keras_rnp.RNPModel)
    for budget in [0.0, 0.3]:
        before, after = rnp.run(x, budget=budget), loaded.run(x, budget=budget)
        np.testing.assert_array_equal(before["actions"], after["actions"])
        np.testing.assert_array_equal(before["logits"], after["logits"])
        np.testing.assert_array_equal(before["flops"], after["flops"])
    # Training state and compile settings come back too.
    assert int(loaded.step_counter) == 4
    assert int(loaded.decision_step_counter) == 2
    assert float(loaded.loss_ema) == float(rnp.loss_ema)
    assert int(loaded.optimizer.iterations) == 2
    assert isinstance(loaded.decision_optimizer, keras.optimizers.SGD)
    # And it trains on from there.
    loaded.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert int(loaded.step_counter) == 8


def test_stripped_model_saves_as_a_plain_keras_model(tmp_path):
    rnp = keras_rnp.wrap(small_cnn(), groups=4)
    plain = keras_rnp.strip(rnp)
    path = tmp_path / "plain.keras"
    plain.save(path)
    loaded = keras.saving.load_model(path)
    x = np.ones((2, 10, 10, 3), "float32")
    np.testing.assert_allclose(
        loaded(x), rnp.run(x, actions=4)["logits"], rtol=1e-5, atol=1e-6
    )
