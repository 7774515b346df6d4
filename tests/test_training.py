"""Algorithm 1 inside fit(): Q-learning numbers, alternation, learning."""

import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import small_cnn

import keras_rnp
from keras_rnp import policy


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 10, 10, 3)).astype("float32")
    return x, rng.integers(0, 5, size=n)


def weights(variables):
    return [v.numpy().copy() for v in variables]


def changed(before, variables):
    return any(
        not np.array_equal(b, v.numpy())
        for b, v in zip(before, variables, strict=True)
    )


def test_fit_alternates_phases_and_freezes_the_other_network():
    x, y = data(40)
    rnp = keras_rnp.wrap(
        small_cnn(),
        groups=4,
        decision_steps=3,
        backbone_steps=2,
        epsilon_decay_steps=4,
        seed=0,
    )
    rnp.compile(
        optimizer=keras.optimizers.SGD(0.1),
        decision_optimizer=keras.optimizers.SGD(0.1),
    )
    backbone_vars = rnp.backbone.trainable_variables
    decision_vars = rnp.decision.trainable_variables

    # Steps 1-3: decision phase, backbone frozen.
    b0, d0 = weights(backbone_vars), weights(decision_vars)
    rnp.fit(x[:24], y[:24], batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert not changed(b0, backbone_vars)
    assert changed(d0, decision_vars)
    assert int(rnp.decision_step_counter) == 3
    # Steps 4-5: backbone phase, decision network frozen.
    b1, d1 = weights(backbone_vars), weights(decision_vars)
    rnp.fit(x[:16], y[:16], batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert changed(b1, backbone_vars)
    assert not changed(d1, decision_vars)
    assert int(rnp.optimizer.iterations) == 2
    # Round 2 starts with decision steps again; epsilon has reached its end.
    rnp.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)
    assert int(rnp.step_counter) == 6
    assert int(rnp.decision_step_counter) == 4
    assert float(rnp.epsilon()) == pytest.approx(0.1)


def test_history_reports_losses_reward_epsilon_and_flops():
    x, y = data(32)
    rnp = keras_rnp.wrap(
        small_cnn(),
        groups=4,
        decision_steps=2,
        backbone_steps=2,
        epsilon_decay_steps=100,
    )
    rnp.compile(optimizer="adam")
    history = rnp.fit(
        x, y, batch_size=8, epochs=2, verbose=0, validation_data=(x, y)
    )
    logs = history.history
    for name in [
        "loss",
        "accuracy",
        "q_loss",
        "reward",
        "epsilon",
        "flops_ratio",
        "val_loss",
        "val_accuracy",
        "val_flops_ratio",
    ]:
        assert name in logs and len(logs[name]) == 2, name
    assert "val_q_loss" not in logs
    # Epoch 1 saw decision steps 0 and 1 (epsilon 1.0, 0.991).
    assert logs["epsilon"][0] == pytest.approx((1.0 + 0.991) / 2, rel=1e-5)
    assert all(r <= 0 for r in logs["reward"])
    assert all(0 < f <= 1.0 + 1e-6 for f in logs["flops_ratio"])
    evaluation = rnp.evaluate(x, y, verbose=0, return_dict=True)
    greedy = rnp.run(x)
    np.testing.assert_allclose(
        evaluation["flops_ratio"],
        np.mean(greedy["flops"] / rnp.full_flops),
        rtol=1e-5,
    )
    accuracy = np.mean(greedy["logits"].numpy().argmax(1) == y)
    assert evaluation["accuracy"] == pytest.approx(accuracy)


def easy_hard_task(n, rng, size=12):
    """Half the images are easy (a nearly constant bright image, class 0),
    half are hard (one of four noisy templates, classes 1-4)."""
    templates = np.random.default_rng(7).normal(size=(4, size, size, 1))
    y = np.where(rng.random(n) < 0.5, 0, rng.integers(1, 5, n))
    x = np.where(
        (y == 0)[:, None, None, None],
        2.0 + 0.05 * rng.normal(size=(n, size, size, 1)),
        templates[np.maximum(y - 1, 0)]
        + 0.8 * rng.normal(size=(n, size, size, 1)),
    )
    return x.astype("float32"), y


def test_it_learns_to_spend_less_on_easy_images():
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(0)
    x, y = easy_hard_task(2000, rng)
    x_test, y_test = easy_hard_task(400, rng)
    layers = keras.layers
    backbone = keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            layers.Conv2D(16, 3, padding="same"),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Conv2D(32, 3, padding="same"),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same"),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.GlobalAveragePooling2D(),
            layers.Dense(5),
        ]
    )
    backbone.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    backbone.fit(x, y, batch_size=64, epochs=10, verbose=0)
    full_accuracy = backbone.evaluate(x_test, y_test, verbose=0)[1]
    assert full_accuracy > 0.95

    rnp = keras_rnp.wrap(
        backbone,
        groups=4,
        penalty=0.1,
        decision_steps=20,
        backbone_steps=10,
        epsilon_decay_steps=100,
        seed=0,
    )
    rnp.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        decision_optimizer=keras.optimizers.Adam(3e-3),
    )
    rnp.fit(x, y, batch_size=64, epochs=6, verbose=0)

    out = rnp.run(x_test)
    mean_action = out["actions"].numpy().mean(axis=1)
    easy, hard = y_test == 0, y_test > 0
    accuracy = np.mean(out["logits"].numpy().argmax(1) == y_test)
    assert mean_action[easy].mean() <= mean_action[hard].mean() - 1.0
    assert accuracy >= full_accuracy - 0.05
    assert out["flops"].numpy()[easy].mean() < out["flops"].numpy()[hard].mean()


@pytest.mark.parametrize("backbone_epsilon", [0.0, 1.0])
def test_backbone_is_fine_tuned_under_greedy_or_exploring_actions(
    backbone_epsilon,
):
    x, y = data(64)
    rnp = keras_rnp.wrap(
        small_cnn(),
        groups=4,
        decision_steps=0,
        backbone_steps=1,
        backbone_epsilon=backbone_epsilon,
        seed=0,
    )
    rnp.compile(optimizer=keras.optimizers.SGD(0.0))
    # Greedy decisions on training-mode features (batch-norm batch stats).
    _, actions, _ = rnp.forward(x, training=True)
    greedy = rnp.flops_from_actions(actions).numpy() / rnp.full_flops
    logs = rnp.fit(x, y, batch_size=64, epochs=1, verbose=0).history
    if backbone_epsilon == 0.0:
        assert logs["flops_ratio"][0] == pytest.approx(greedy.mean())
    else:
        # Uniform random actions: each image's cost differs from greedy.
        assert logs["flops_ratio"][0] != pytest.approx(greedy.mean())
        assert int(rnp.decision_step_counter) == 0


def deterministic_sgd(rnp):
    """No dropout and SGD at learning rate 1: one step subtracts the
    gradient, which a test can compute by hand."""
    for layer in rnp.backbone.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0  # A deterministic forward pass to compare.
    rnp.compile(optimizer=keras.optimizers.SGD(1.0))
    variables = rnp.backbone.trainable_variables
    return variables, weights(variables)


def assert_one_step_of(gradients, variables, before, atol):
    for variable, value, gradient in zip(
        variables, before, gradients, strict=True
    ):
        np.testing.assert_allclose(
            variable.numpy(), value - gradient.numpy(), atol=atol
        )


@pytest.mark.parametrize("distillation", [0.5, 1.0])
def test_distillation_step_minimizes_full_plus_distilled_path_loss(
    distillation,
):
    x, y = data(16)
    rnp = keras_rnp.wrap(
        small_cnn(),
        groups=4,
        decision_steps=0,
        backbone_steps=1,
        distillation=distillation,
        seed=0,
    )
    variables, before = deterministic_sgd(rnp)
    # The reference: the objective written out, its gradient by hand.
    _, actions, _ = rnp.forward(x, training=True)
    full_actions = np.full(actions.shape, 4)
    with tf.GradientTape() as tape:
        path, _, _ = rnp.forward(x, actions=actions, training=True)
        full, _, _ = rnp.forward(x, actions=full_actions, training=True)
        labels = keras.ops.sparse_categorical_crossentropy
        teacher = tf.stop_gradient(tf.nn.softmax(full))
        objective = tf.reduce_mean(
            labels(y, full, from_logits=True)
            + (1 - distillation) * labels(y, path, from_logits=True)
            - distillation
            * tf.reduce_sum(teacher * tf.nn.log_softmax(path), axis=-1)
        )
    gradients = tape.gradient(objective, variables)
    path_loss = float(tf.reduce_mean(labels(y, path, from_logits=True)).numpy())
    for variable, value in zip(variables, before, strict=True):
        variable.assign(value)
    logs = rnp.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert_one_step_of(gradients, variables, before, atol=1e-5)
    assert any(np.abs(g.numpy()).max() > 1e-3 for g in gradients)
    # The reported loss stays the path's loss on the labels.
    assert logs["loss"][0] == pytest.approx(path_loss, rel=1e-5)


def test_distillation_must_be_a_weight_in_0_1():
    with pytest.raises(ValueError, match="distillation"):
        keras_rnp.wrap(small_cnn(), distillation=1.5)


@pytest.mark.parametrize(
    "convs",
    [
        2,
        pytest.param(3, marks=pytest.mark.slow),
        pytest.param(4, marks=pytest.mark.slow),
    ],
)
def test_decision_network_learns_with_one_to_three_gated_layers(convs):
    # L = convs - 1 (the first convolution is not gated). With L = 1 the
    # bootstrap term used to be empty, which made q_loss NaN on every step
    # and left the decision network untrained.
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [keras.Input((8, 8, 3))]
        + [
            keras.layers.Conv2D(8, 3, padding="same", activation="relu")
            for _ in range(convs)
        ]
        + [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5)]
    )
    rnp = keras_rnp.wrap(backbone, groups=4, decision_steps=2, seed=0)
    assert rnp.num_gated_layers == convs - 1
    rnp.compile(decision_optimizer=keras.optimizers.SGD(0.1))
    before = weights(rnp.decision.trainable_variables)
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32")
    history = rnp.fit(x, np.arange(16) % 5, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["q_loss"]).all()
    assert changed(before, rnp.decision.trainable_variables)


def test_wrap_docstring_example_trains_its_decision_network():
    # The example in wrap()'s docstring gates one convolution (L = 1).
    code = keras_rnp.wrap.__doc__.split("```python")[1].split("```")[0]
    scope = {"keras": keras, "keras_rnp": keras_rnp}
    exec(textwrap.dedent(code), scope)
    rnp = scope["rnp"]
    assert rnp.num_gated_layers == 1
    rnp.compile()
    before = weights(rnp.decision.trainable_variables)
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
    history = rnp.fit(x, np.arange(4), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["q_loss"]).all()
    assert changed(before, rnp.decision.trainable_variables)


def test_fit_warns_when_a_phase_never_runs():
    # 1 epoch of 2 steps with the default 100 + 100: decision steps only.
    x, y = data(16)
    rnp = keras_rnp.wrap(small_cnn(), groups=4, seed=0)
    rnp.compile()
    with pytest.warns(UserWarning, match="backbone was not fine-tuned"):
        rnp.fit(x, y, batch_size=8, epochs=1, verbose=0)
    # Both phases run: no warning.
    rnp = keras_rnp.wrap(
        small_cnn(), groups=4, decision_steps=1, backbone_steps=1, seed=0
    )
    rnp.compile()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        rnp.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_restoring_best_weights_keeps_the_training_progress():
    x, y = data(16)
    rnp = keras_rnp.wrap(
        small_cnn(), groups=4, decision_steps=1, backbone_steps=1, seed=0
    )
    rnp.compile(optimizer=keras.optimizers.SGD(0.1))
    # mode="max" on the loss: epoch 1 is "best", so training stops after
    # epoch 2 and restores epoch 1's weights.
    stop = keras.callbacks.EarlyStopping(
        monitor="loss", mode="max", patience=1, restore_best_weights=True
    )
    rnp.fit(x, y, batch_size=8, epochs=5, callbacks=[stop], verbose=0)
    assert stop.stopped_epoch == 1
    # 2 epochs of 2 steps: the counters are those of 4 steps, not 2.
    assert int(rnp.step_counter.numpy()) == 4
    assert int(rnp.decision_step_counter.numpy()) == 2
    best = stop.best_weights
    restored = rnp.get_weights()
    progress = {
        id(v)
        for v in (rnp.step_counter, rnp.decision_step_counter, rnp.loss_ema)
    }
    for variable, b, r in zip(rnp.weights, best, restored, strict=True):
        if id(variable) not in progress:
            np.testing.assert_array_equal(b, r)


@pytest.mark.parametrize(
    "width_aware_bn", [pytest.param(False, marks=pytest.mark.slow), True]
)
def test_sandwich_step_minimizes_full_plus_distilled_narrow_paths(
    width_aware_bn,
):
    x, y = data(16)
    rnp = keras_rnp.wrap(
        small_cnn(),
        groups=4,
        gate_first=True,
        decision_steps=0,
        sandwich_paths=2,
        width_aware_bn=width_aware_bn,
        seed=3,
    )
    variables, before = deterministic_sgd(rnp)
    # The reference: full path on the labels, the narrowest path and one
    # random path (the draw of step 0) on the full path's predictions.
    full_actions = np.full((16, 3), 4)
    random = policy.random_actions(16, 3, 4, rnp.seed, 0, stream=0)
    assert len(np.unique(random.numpy())) == 4
    labels = keras.ops.sparse_categorical_crossentropy
    with tf.GradientTape() as tape:
        full, _, _ = rnp.forward(x, actions=full_actions, training=True)
        teacher = tf.stop_gradient(tf.nn.softmax(full))
        objective = tf.reduce_mean(labels(y, full, from_logits=True))
        for actions in (np.ones((16, 3), "int32"), random):
            path, _, _ = rnp.forward(x, actions=actions, training=True)
            objective -= tf.reduce_mean(
                tf.reduce_sum(teacher * tf.nn.log_softmax(path), axis=-1)
            )
    gradients = tape.gradient(objective, variables)
    full_loss = float(tf.reduce_mean(labels(y, full, from_logits=True)))
    for variable, value in zip(variables, before, strict=True):
        variable.assign(value)
    # Random paths are drawn per position in the batch: keep the order.
    logs = rnp.fit(
        x, y, batch_size=16, epochs=1, shuffle=False, verbose=0
    ).history
    assert_one_step_of(gradients, variables, before, atol=2e-5)
    assert logs["loss"][0] == pytest.approx(full_loss, rel=1e-5)
    # The full path's FLOPs (and the decision network's, which run() counts).
    full_ratio = 1.0 + rnp.decision_flops / rnp.full_flops
    assert logs["flops_ratio"][0] == pytest.approx(full_ratio, rel=1e-6)


@pytest.mark.parametrize(
    "sandwich_paths", [0, pytest.param(1, marks=pytest.mark.slow)]
)
def test_fixed_paths_are_distilled_from_the_full_path_every_step(
    tmp_path, sandwich_paths
):
    x, y = data(16)
    fixed = [(1, 2, 3), (2, 4, 1)]
    rnp = keras_rnp.wrap(
        small_cnn(),
        groups=4,
        gate_first=True,
        decision_steps=0,
        sandwich_paths=sandwich_paths,
        fixed_paths=fixed,
        width_aware_bn=True,
        seed=3,
    )
    variables, before = deterministic_sgd(rnp)
    labels = keras.ops.sparse_categorical_crossentropy
    with tf.GradientTape() as tape:
        full, _, _ = rnp.forward(x, actions=np.full((16, 3), 4), training=True)
        teacher = tf.stop_gradient(tf.nn.softmax(full))
        objective = tf.reduce_mean(labels(y, full, from_logits=True))
        # sandwich_paths=1 adds the narrowest path (no random ones).
        for path in fixed + [(1, 1, 1)] * sandwich_paths:
            actions = np.tile(path, (16, 1))
            logits, _, _ = rnp.forward(x, actions=actions, training=True)
            objective -= tf.reduce_mean(
                tf.reduce_sum(teacher * tf.nn.log_softmax(logits), axis=-1)
            )
    gradients = tape.gradient(objective, variables)
    for variable, value in zip(variables, before, strict=True):
        variable.assign(value)
    rnp.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert_one_step_of(gradients, variables, before, atol=2e-5)
    # Saved with the model, as tuples again after JSON's lists.
    rnp.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.fixed_paths == ((1, 2, 3), (2, 4, 1))


@pytest.mark.parametrize(
    "fixed_paths, match",
    [
        ([(1, 2)], r"fixed_paths\[0\] expects 3 ints in 1\.\.4"),
        ([(1, 2, 3), (1, 2, 5)], r"fixed_paths\[1\] expects 3 ints in 1\.\.4"),
        ((1, 2, 3), r"expects a list of paths.*one path: \[\(2, 1, 3\)\]"),
        ("123", "fixed_paths expects a list of paths"),
        (3, "fixed_paths expects a list of paths"),
    ],
)
def test_bad_fixed_paths_are_refused(fixed_paths, match):
    with pytest.raises(ValueError, match=match):
        keras_rnp.wrap(small_cnn(), gate_first=True, fixed_paths=fixed_paths)


def test_fixed_paths_refuse_distillation_on_top():
    with pytest.raises(ValueError, match="fixed_paths.*distillation"):
        keras_rnp.wrap(small_cnn(), fixed_paths=[(1, 1)], distillation=0.5)


def test_sandwich_step_updates_every_widths_statistics():
    x, y = data(32)
    rnp = keras_rnp.wrap(
        small_cnn(),
        groups=4,
        gate_first=True,
        decision_steps=0,
        sandwich_paths=3,
        width_aware_bn=True,
        seed=0,
    )
    rnp.compile(optimizer=keras.optimizers.SGD(0.01))
    norms = rnp.width_norms
    full_stats = [
        layer.moving_mean
        for layer in rnp.backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ][1:]
    narrow_before = [n.moving_mean.numpy().copy() for n in norms]
    full_before = [v.numpy().copy() for v in full_stats]
    rnp.fit(x, y, batch_size=32, epochs=1, verbose=0)
    for norm, old in zip(norms, narrow_before, strict=True):
        for width in range(3):  # Widths 1-3 (narrowest and random paths).
            assert not np.allclose(norm.moving_mean[width], old[width])
    for variable, old in zip(full_stats, full_before, strict=True):
        assert not np.allclose(variable.numpy(), old)  # Width 4 (full).


def test_sandwich_refuses_distillation_on_top():
    with pytest.raises(ValueError, match="sandwich_paths and fixed_paths"):
        keras_rnp.wrap(small_cnn(), sandwich_paths=2, distillation=0.5)


def test_target_network_follows_the_decision_network_every_n_steps(tmp_path):
    x, y = data(24)
    rnp = keras_rnp.wrap(
        small_cnn(),
        groups=4,
        decision_steps=1,
        backbone_steps=0,
        target_update_steps=2,
        double_dqn=True,
        seed=0,
    )
    rnp.compile(decision_optimizer=keras.optimizers.SGD(0.1))
    assert rnp.target_decision.trainable_weights == []
    initial = weights(rnp.decision.weights)
    target = rnp.target_decision.weights
    rnp.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)  # Step 1.
    assert changed(initial, rnp.decision.weights)
    assert not changed(initial, target)  # Not refreshed yet.
    rnp.fit(x[8:16], y[8:16], batch_size=8, epochs=1, verbose=0)  # Step 2.
    assert not changed(weights(rnp.decision.weights), target)
    after_two = weights(target)
    rnp.fit(x[16:], y[16:], batch_size=8, epochs=1, verbose=0)  # Step 3.
    assert changed(weights(target), rnp.decision.weights)
    assert not changed(after_two, target)
    rnp.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert (loaded.target_update_steps, loaded.double_dqn) == (2, True)
    assert not changed(after_two, loaded.target_decision.weights)
