"""A default path with a margin: the decision rule, saving, exports, and
choosing both on validation data."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import small_cnn
from helpers import spread_decisions

import keras_rnp
from keras_rnp import export as export_lib
from keras_rnp import policy


def test_path_bonus_and_greedy_actions_with_it():
    bonus = policy.path_bonus((2, 1), 0.5, 3)
    np.testing.assert_array_equal(bonus, [[0, 0.5, 0], [0.5, 0, 0]])
    assert policy.path_bonus(None, 0.5, 3) is None
    q = tf.constant([[0.0, 1.0, 1.4], [0.0, 1.0, 1.6], [0.0, 1.0, 1.6]])
    cost = tf.constant([0.0, 1.0, 2.0])
    budget = tf.constant([0.0, 0.0, 0.2])
    finite = tf.constant([True, True, True])
    actions = policy.greedy_actions(q, budget, cost, finite, bonus[0])
    # Scores q - b * cost + [0, 0.5, 0]: [0, 1.5, 1.4] -> 2;
    # [0, 1.5, 1.6] -> 3; [0, 1.3, 1.2] -> 2.
    np.testing.assert_array_equal(actions, [2, 3, 2])


def _rnp(seed=0, **kwargs):
    model = small_cnn(seed=seed)
    return spread_decisions(
        keras_rnp.wrap(model, groups=4, seed=seed, **kwargs), seed
    )


def _images(count=16, seed=0):
    """Images of different scales and colours: a random decision network
    then takes different paths for them."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 5, (count, 1, 1, 1))
    colour = rng.normal(0, 2, (count, 1, 1, 3))
    x = rng.normal(size=(count, 10, 10, 3)) * scale + colour
    return x.astype("float32")


def test_decisions_keep_the_path_unless_q_values_prefer_another_by_the_margin():
    rnp = _rnp()
    x = _images()
    policy_actions = rnp.run(x)["actions"].numpy()
    path = (2, 3)
    kept = {}
    for margin in (0.0, 0.3, policy.FIXED_PATH_MARGIN):
        rnp.set_default_path(path, margin)
        out = rnp.run(x, budget=0.1)
        actions, q = out["actions"].numpy(), out["q_values"].numpy()
        kept[margin] = np.mean(actions == path)  # Of all decisions.
        # The rule, recomputed in NumPy from the Q-values of the states
        # the images reached.
        cost = np.asarray(rnp.action_cost)
        scores = q - 0.1 * cost[None] + policy.path_bonus(path, margin, 4)
        np.testing.assert_array_equal(actions, scores.argmax(-1) + 1)
        if margin == 0.0:  # The policy as trained.
            rnp.set_default_path(None)
            np.testing.assert_array_equal(
                actions, rnp.run(x, budget=0.1)["actions"].numpy()
            )
    # A margin beyond every Q-value difference is the fixed path.
    np.testing.assert_array_equal(actions, np.tile(path, (len(x), 1)))
    rnp.set_default_path(None)
    np.testing.assert_array_equal(rnp.run(x)["actions"].numpy(), policy_actions)
    # The decisions vary per image, and the middle margin keeps the path
    # in some decisions only: the checks above could fail.
    assert len({tuple(a) for a in policy_actions}) > 1
    assert kept[0.0] < kept[0.3] < kept[policy.FIXED_PATH_MARGIN] == 1.0


def test_the_path_is_saved_and_exported(tmp_path):
    rnp = _rnp(default_path=(1, 4), path_margin=1e6)
    x = _images(5)
    path = tmp_path / "rnp.keras"
    rnp.save(path)
    loaded = keras.saving.load_model(path)
    assert (loaded.default_path, loaded.path_margin) == ((1, 4), 1e6)
    np.testing.assert_array_equal(loaded.run(x)["actions"], [[1, 4]] * 5)
    saved = keras_rnp.export_saved_model(rnp, tmp_path / "saved_model")
    serve = tf.saved_model.load(saved).signatures["serving_default"]
    np.testing.assert_array_equal(
        serve(images=tf.constant(x))["actions"], [[1, 4]] * 5
    )


@pytest.mark.parametrize(
    "path, margin, match",
    [
        ((1, 2, 3), 0.0, "default_path expects 2 ints in 1..4 .* or None"),
        ((0, 2), 0.0, "default_path expects 2 ints in 1..4 .* or None"),
        ((1.5, 2), 0.0, "default_path expects 2 ints in 1..4 .* or None"),
        (
            (1, 2),
            -0.1,
            r"path_margin must be a finite number in \[0.0, 1e\+30\]",
        ),
        ((1, 2), 1e31, "path_margin must be a finite number in"),
        ((1, 2), float("nan"), "path_margin must be a finite number in"),
    ],
)
def test_bad_paths_and_margins_are_refused(path, margin, match):
    rnp = _rnp()
    with pytest.raises(ValueError, match=match):
        rnp.set_default_path(path, margin)
    assert rnp.default_path is None  # Left as it was.


def test_choose_path_takes_the_most_accurate_path_that_fits():
    rnp = _rnp()
    x = _images(40)
    # Labels the full network gets right about half the time.
    full = np.argmax(rnp.run(x, actions=4)["logits"], -1)
    labels = np.where(np.arange(40) % 2 == 0, full, (full + 1) % 5)
    choice = keras_rnp.choose_path(
        rnp, x, labels, speedup=1.3, margins=(0.0, 0.2, 1e6), batch_size=16
    )
    # Every path, by hand: the most accurate whose FLOPs (the decision
    # network's included) are within the bound; of equals, the faster.
    bound = rnp.full_flops / 1.3
    best = None
    for path in itertools.product(range(1, 5), repeat=2):
        out = rnp.run(x, actions=np.tile(path, (40, 1)))
        flops = float(np.mean(out["flops"]))
        accuracy = float(np.mean(np.argmax(out["logits"], -1) == labels))
        if flops <= bound and (
            best is None or (accuracy, -flops) > (best[1], -best[2])
        ):
            best = (path, accuracy, flops)
    assert choice["path"] == best[0]
    assert choice["fixed_path"]["accuracy"] == pytest.approx(best[1])
    assert len(choice["paths"]) == sum(
        rnp.flops_from_actions(np.array([p])).numpy()[0] <= bound
        for p in itertools.product(range(1, 5), repeat=2)
    )
    # The margins: measured under the path, the best that fits chosen.
    rows = {row["margin"]: row for row in choice["margins"]}
    assert set(rows) == {0.0, 0.2, 1e6, policy.FIXED_PATH_MARGIN}
    fixed = rows[policy.FIXED_PATH_MARGIN]  # The fixed path itself.
    assert fixed["accuracy"] == pytest.approx(best[1])
    fitting = [r for r in rows.values() if r["fits"]]
    assert choice["accuracy"] == max(r["accuracy"] for r in fitting)
    assert all(r["fits"] == (r["speedup"] >= 1.3) for r in rows.values())
    # The model is left as it was.
    assert rnp.default_path is None and rnp.path_margin == 0.0


def test_choose_path_descends_greedily_past_max_paths():
    rnp = _rnp()
    x = _images(24)
    full = np.argmax(rnp.run(x, actions=4)["logits"], -1)
    labels = np.where(np.arange(24) % 3 == 0, (full + 1) % 5, full)
    choice = keras_rnp.choose_path(
        rnp, x, labels, speedup=2.0, margins=(0.0,), max_paths=3
    )

    def measured(path):
        out = rnp.run(x, actions=np.tile(path, (24, 1)))
        accuracy = np.mean(np.argmax(out["logits"], -1) == labels)
        return accuracy, -float(np.mean(out["flops"]))

    def fits(path):
        flops = rnp.flops_from_actions(np.array([path])).numpy()[0]
        return flops <= rnp.full_flops / 2.0

    # By hand: from (4, 4), lower one group at a time the layer whose
    # lowering keeps the most accuracy (of equals, the cheaper), until
    # the path fits.
    path, steps = (4, 4), 0
    while not fits(path):
        lowered = [
            path[:t] + (path[t] - 1,) + path[t + 1 :]
            for t in range(2)
            if path[t] > 1
        ]
        path, steps = max(lowered, key=measured), steps + 1
    assert steps >= 2  # More than one step: the choices matter.
    assert choice["path"] == path
    assert len(choice["paths"]) < 16  # Not every path.


def test_choose_path_refuses_bad_arguments():
    rnp = _rnp()
    x = _images(4)
    labels = np.zeros(4, int)
    with pytest.raises(ValueError, match="No path reaches a speed-up of 1000"):
        keras_rnp.choose_path(rnp, x, labels, speedup=1000)
    with pytest.raises(ValueError, match="speedup to be a number >= 1"):
        keras_rnp.choose_path(rnp, x, labels, speedup=0.5)
    with pytest.raises(ValueError, match="margins to be one or more numbers"):
        keras_rnp.choose_path(rnp, x, labels, speedup=1.5, margins=(-1,))
    with pytest.raises(ValueError, match="labels"):
        keras_rnp.choose_path(rnp, x, labels[:3], speedup=1.5)
    with pytest.raises(TypeError, match="keras_rnp.RNPModel"):
        keras_rnp.choose_path(keras.Sequential(), x, labels, speedup=1.5)


def test_the_exports_say_how_the_path_enters_the_decisions():
    rnp = _rnp()
    assert export_lib.budget_doc(rnp) == export_lib.BUDGET_DOC
    rnp.set_default_path((2, 3), 0.25)
    assert (
        "a_t = argmax_a [Q(s_t, a) - budget * cost_t(a) + 0.25 * "
        "[a == path_t]], where path = 2-3 is the model's default path"
    ) in export_lib.budget_doc(rnp)


# Slow (17 s): the default run keeps to 15 minutes; the other default-path
# tests cover run() and the exports under a new path there.
@pytest.mark.slow
def test_keras_functions_made_before_a_new_path_follow_it():
    rnp = _rnp()
    rnp.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = _images(8)
    labels = np.zeros(8, int)
    rnp.predict(x, verbose=0)
    rnp.evaluate(x, labels, verbose=0)
    rnp.fit(x, labels, epochs=1, verbose=0)
    rnp.set_default_path((1, 1), policy.FIXED_PATH_MARGIN)
    # predict() returns what the model computes on the fixed path.
    np.testing.assert_allclose(
        rnp.predict(x, verbose=0),
        rnp.run(x, actions=1)["logits"].numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
    # A training step (greedy decisions on the path) runs.
    rnp.fit(x, labels, epochs=1, verbose=0)
