"""keras_rnp.callbacks.BackupAndRestore: every backup whole, and a rerun
that resumes whatever a crash left."""

import os
import warnings

import keras
import numpy as np
import pytest
from helpers import small_cnn

import keras_rnp
from keras_rnp.callbacks import BackupAndRestore

FIT = dict(batch_size=8, shuffle=False, verbose=0)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 10, 10, 3)).astype("float32")
    return x, rng.integers(0, 5, size=24)


def make_rnp():
    keras.utils.set_random_seed(0)
    model = small_cnn()  # With dropout before its last layer.
    rnp = keras_rnp.wrap(
        model, groups=4, decision_steps=2, backbone_steps=1, seed=0
    )
    rnp.compile(
        optimizer=keras.optimizers.SGD(0.01),
        decision_optimizer=keras.optimizers.Adam(1e-3),
    )
    return rnp


class Begin(keras.callbacks.Callback):
    """Records the step counter when fit starts its first epoch."""

    def on_epoch_begin(self, epoch, logs=None):
        if not hasattr(self, "epoch"):
            self.epoch = epoch
            self.step = int(self.model.step_counter.numpy())


def run(backup, epochs, **kwargs):
    model, begin = make_rnp(), Begin()
    callback = BackupAndRestore(backup, delete_checkpoint=False, **kwargs)
    x, y = data()
    model.fit(x, y, epochs=epochs, callbacks=[callback, begin], **FIT)
    return model, begin, callback


def tear(path):
    """Cuts a file in half, as a kill in the middle of its write would."""
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: len(content) // 2])


def test_backups_are_whole_directories_and_the_last_two_stay(tmp_path):
    backup = str(tmp_path / "backup")
    _, _, callback = run(backup, epochs=3)
    names = sorted(os.listdir(backup))
    assert names == ["backup-000002-000000006", "backup-000003-000000009"]
    for path in callback.backups():
        assert sorted(os.listdir(path)) == ["model.weights.h5", "state.json"]


@pytest.mark.parametrize(
    "torn",
    # The second case is slow: the default run keeps to 15 minutes.
    ["model.weights.h5", pytest.param("state.json", marks=pytest.mark.slow)],
)
def test_a_torn_newest_backup_falls_back_to_the_previous(tmp_path, torn):
    backup = str(tmp_path / "backup")
    run(backup, epochs=3)
    newest = BackupAndRestore(backup).backups()[0]
    tear(os.path.join(newest, torn))
    with pytest.warns(UserWarning, match="resuming from the previous backup"):
        model, begin, _ = run(backup, epochs=4)
    assert (begin.epoch, begin.step) == (2, 6)  # After epoch 2's backup.
    assert int(model.step_counter.numpy()) == 4 * 3


# Slow (15 s): the default run keeps to 15 minutes; the torn-backup test's
# default case reads past a torn backup there.
@pytest.mark.slow
def test_no_readable_backup_starts_over_and_finishes(tmp_path):
    backup = str(tmp_path / "backup")
    run(backup, epochs=2)
    for path in BackupAndRestore(backup).backups():
        tear(os.path.join(path, "model.weights.h5"))
    with pytest.warns(UserWarning, match="training starts over"):
        model, begin, _ = run(backup, epochs=2)
    assert (begin.epoch, begin.step) == (0, 0)
    assert int(model.step_counter.numpy()) == 2 * 3
    # The variables a half-read file set were put back: the restarted run
    # equals a fresh one.
    fresh, _, _ = run(str(tmp_path / "fresh"), epochs=2)
    for a, b in zip(model.weights, fresh.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


# Slow (21 s): the default run keeps to 15 minutes; test_resume's
# every-piece-of-state test covers what a resumed run restores there.
@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    backup = str(tmp_path / "backup")
    run(backup, epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        resumed, begin, _ = run(backup, epochs=4)
    assert begin.epoch == 2
    straight, _, _ = run(str(tmp_path / "straight"), epochs=4)
    for a, b in zip(resumed.weights, straight.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_keep_must_leave_a_previous_backup():
    with pytest.raises(ValueError, match="keep must be an integer >= 2"):
        BackupAndRestore("b", keep=1)


class Record(keras.callbacks.Callback):
    """Every epoch's weights, as the epoch ends."""

    def on_train_begin(self, logs=None):
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.get_weights())


@pytest.mark.parametrize(
    "max_flops_ratio",
    # The last case is slow: the default run keeps to 15 minutes.
    [None, 0.8, pytest.param(1e-3, marks=pytest.mark.slow)],
)
def test_select_on_validation_keeps_the_best_epoch_within_the_budget(
    max_flops_ratio,
):
    rnp = make_rnp()
    rnp.compile(
        optimizer=keras.optimizers.SGD(0.05),
        decision_optimizer=keras.optimizers.Adam(1e-2),
        metrics=["accuracy"],
    )
    x, y = data()
    record = Record()
    select = keras_rnp.callbacks.SelectOnValidation(max_flops_ratio, verbose=0)
    history = rnp.fit(
        x,
        y,
        epochs=5,
        validation_data=(x[:16], y[:16]),
        callbacks=[record, select],
        **FIT,
    ).history
    accuracy, ratio = history["val_accuracy"], history["val_flops_ratio"]
    assert len(set(ratio)) > 1  # Epochs differ: the choice means something.
    cheap = [
        e
        for e in range(5)
        if max_flops_ratio is None or ratio[e] <= max_flops_ratio
    ]
    if cheap:  # The first of the most accurate cheap epochs.
        want = max(cheap, key=lambda e: (accuracy[e], -e))
    else:  # None is cheap enough: the cheapest.
        want = min(range(5), key=lambda e: (ratio[e], e))
    assert select.best_epoch == want
    assert select.epochs[want]["flops_ratio"] == pytest.approx(ratio[want])
    steps = int(rnp.step_counter.numpy())
    for got, kept in zip(rnp.get_weights(), record.weights[want], strict=True):
        if got.shape == ():  # Counters and loss mean: not rolled back.
            continue
        np.testing.assert_array_equal(got, kept)
    assert steps == 5 * 3  # 24 images in batches of 8.


# Slow (the default run keeps to 15 minutes): the callback's choice is tested
# above.
@pytest.mark.slow
def test_select_on_validation_without_validation_logs_keeps_the_last():
    rnp = make_rnp()
    x, y = data()
    select = keras_rnp.callbacks.SelectOnValidation()
    with pytest.warns(UserWarning, match="pass validation_data to fit"):
        rnp.fit(x, y, epochs=1, callbacks=[select], **FIT)
    assert select.best_epoch is None
    # Validated every other epoch: chosen among those.
    rnp.compile(
        optimizer=keras.optimizers.SGD(0.05),
        decision_optimizer=keras.optimizers.Adam(1e-2),
        metrics=["accuracy"],
    )
    rnp.fit(
        x,
        y,
        epochs=4,
        validation_data=(x, y),
        validation_freq=2,
        callbacks=[select],
        **FIT,
    )
    assert len(select.epochs) == 2 and select.best_epoch in (1, 3)
    with pytest.raises(ValueError, match="max_flops_ratio must be"):
        keras_rnp.callbacks.SelectOnValidation(max_flops_ratio=0)


# Slow (12 s): the default run keeps to 15 minutes; test_resume covers
# resuming from backups there.
@pytest.mark.slow
def test_a_second_fit_without_backups_starts_at_its_initial_epoch(tmp_path):
    run(str(tmp_path / "first"), epochs=2)
    model, begin, _ = run(str(tmp_path / "first"), epochs=3)
    assert begin.epoch == 2  # Resumed.
    callback = BackupAndRestore(str(tmp_path / "empty"))
    x, y = data()
    history = model.fit(x, y, epochs=2, callbacks=[callback], **FIT)
    # Keras' own callback would leave the resumed epoch (2) in place.
    assert len(history.history["loss"]) == 2
