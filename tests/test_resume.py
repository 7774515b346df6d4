"""Interrupted training resumes where it was (keras BackupAndRestore)."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from helpers import small_cnn
from test_callbacks import tear

import keras_rnp
from keras_rnp.callbacks import BackupAndRestore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Crash(Exception):
    pass


class CrashAt(keras.callbacks.Callback):
    """Raises in the middle of an epoch, as a killed process would stop."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch = epoch, batch
        self.current = None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            raise Crash()


class Snapshot(keras.callbacks.Callback):
    """Records the whole training state at train begin and epoch ends."""

    def __init__(self):
        super().__init__()
        self.at_begin = None
        self.at_epoch_end = {}

    def state(self):
        model = self.model
        return {
            "weights": [np.array(v) for v in model.weights],
            "optimizer": [np.array(v) for v in model.optimizer.variables],
            "decision_optimizer": [
                np.array(v) for v in model.decision_optimizer.variables
            ],
            "epsilon": float(model.epsilon()),
            "alpha": float(model.alpha()),
            "phase": bool(model.in_decision_phase()),
        }

    def on_train_begin(self, logs=None):
        self.at_begin = self.state()

    def on_epoch_end(self, epoch, logs=None):
        self.at_epoch_end[epoch] = self.state()


def make_rnp():
    # Without the dropout layer: Keras does not checkpoint its random
    # generator, so a resumed run would drop other units than the
    # uninterrupted one.
    cnn = small_cnn(seed=3)
    cnn = keras.Sequential(
        [keras.Input((10, 10, 3))]
        + [x for x in cnn.layers if not isinstance(x, keras.layers.Dropout)]
    )
    rnp = keras_rnp.wrap(
        cnn,
        groups=4,
        decision_steps=3,
        backbone_steps=2,
        epsilon_decay_steps=20,
        backbone_epsilon=0.2,
        seed=7,
    )
    rnp.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        decision_optimizer=keras.optimizers.Adam(1e-3),
    )
    return rnp


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(56, 10, 10, 3)).astype("float32")
    return x, rng.integers(0, 5, 56)


def assert_same_state(a, b):
    for key in ("weights", "optimizer", "decision_optimizer"):
        assert len(a[key]) == len(b[key])
        for u, v in zip(a[key], b[key], strict=True):
            np.testing.assert_array_equal(u, v, err_msg=key)
    for key in ("epsilon", "alpha", "phase"):
        assert a[key] == b[key], key


def test_backup_and_restore_resumes_every_piece_of_training_state(tmp_path):
    x, y = data()
    fit = dict(batch_size=8, epochs=4, shuffle=False, verbose=0)
    backup = str(tmp_path / "backup")

    keras.utils.set_random_seed(0)
    first = Snapshot()
    with pytest.raises(Crash):
        make_rnp().fit(
            x,
            y,
            callbacks=[
                keras.callbacks.BackupAndRestore(backup),
                first,
                CrashAt(epoch=2, batch=3),
            ],
            **fit,
        )
    saved = first.at_epoch_end[1]  # The last checkpoint: after epoch 2.
    # 7 steps per epoch, 14 steps in; rounds of 3 decision + 2 backbone.
    assert int(first.model.step_counter.numpy()) > 14
    keras.utils.set_random_seed(0)
    resumed = Snapshot()
    model = make_rnp()
    model.fit(
        x,
        y,
        callbacks=[keras.callbacks.BackupAndRestore(backup), resumed],
        **fit,
    )
    assert_same_state(resumed.at_begin, saved)
    assert int(model.step_counter.numpy()) == 4 * 7
    assert sorted(resumed.at_epoch_end) == [2, 3]  # Epochs 1-2 not redone.
    assert saved["alpha"] != 1.0 and 0.0 < saved["epsilon"] < 1.0

    # The same as a run that was never interrupted.
    keras.utils.set_random_seed(0)
    straight = Snapshot()
    make_rnp().fit(x, y, callbacks=[straight], **fit)
    assert_same_state(straight.at_epoch_end[1], saved)
    final, expected = resumed.at_epoch_end[3], straight.at_epoch_end[3]
    names = [v.path for v in model.weights]
    weights = zip(names, final["weights"], expected["weights"], strict=True)
    for name, u, v in weights:
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6, err_msg=name)


def read_counter(weights_file):
    """The RNP step counter stored in a Keras weights file."""
    import h5py

    found = []
    with h5py.File(weights_file, "r") as f:
        f.visititems(
            lambda name, item: (
                found.append(item[()])
                if isinstance(item, h5py.Dataset)
                and item.dtype == np.int64
                and item.shape == ()
                and name.startswith("vars/")
                else None
            )
        )
    # The model's own variables: step_counter, decision_step_counter.
    return [int(v) for v in found]


# Slow (the default run keeps to 15 minutes): about 50 s; the backup test above
# resumes every piece of state.
@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL a real quickstart run in the middle of RNP training, run
    the same command again: it continues from the last completed epoch."""
    command = [
        sys.executable,
        os.path.join(ROOT, "examples", "quickstart.py"),
        f"--work_dir={tmp_path}",
        f"--output={tmp_path / 'rnp.keras'}",
        "--backbone_epochs=2",
        "--rnp_epochs=60",
        "--budgets=0",
        "--verbose=2",
    ]
    env = {**os.environ, "PYTHONPATH": ROOT}
    backups = BackupAndRestore(str(tmp_path / "backup" / "rnp"))

    def newest_epoch():
        newest = backups.backups()
        if not newest:
            return 0
        with open(os.path.join(newest[0], "state.json")) as f:
            return json.load(f)["epoch"]

    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.time() + 240
        epoch = 0
        while time.time() < deadline and process.poll() is None:
            epoch = newest_epoch()  # Backups appear whole: no torn reads.
            if epoch >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, "training ended before the kill"
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert epoch >= 3
    epoch = newest_epoch()
    weights = os.path.join(backups.backups()[0], "model.weights.h5")
    steps_per_epoch = 22  # 1,348 training digits in batches of 64.
    step, decision_steps = read_counter(weights)
    assert step == epoch * steps_per_epoch > 0
    assert 0 < decision_steps < step
    assert not (tmp_path / "rnp.keras").exists()

    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "Loading the trained backbone" in out
    assert f"Epoch {epoch + 1}/60" in out
    assert "Epoch 1/60" not in out
    final = keras.saving.load_model(tmp_path / "rnp.keras")
    assert int(final.step_counter.numpy()) == 60 * steps_per_epoch


@pytest.mark.slow  # About 2.5 minutes.
def test_kills_at_random_points_and_torn_backups_never_stop_a_rerun(tmp_path):
    """SIGKILL the quickstart at random moments (in the backbone's
    training, its save, RNP's epochs or a backup's write), tear every file
    of the newest backup in half after every other kill (as a kill inside
    its write would): every rerun goes on, and the last one finishes with
    all of RNP's steps."""
    import random

    command = [
        sys.executable,
        os.path.join(ROOT, "examples", "quickstart.py"),
        f"--work_dir={tmp_path}",
        f"--output={tmp_path / 'rnp.keras'}",
        "--backbone_epochs=3",
        "--rnp_epochs=150",
        "--budgets=0",
        "--verbose=2",
    ]
    env = {**os.environ, "PYTHONPATH": ROOT}
    rng = random.Random(0)
    torn_before = []  # Runs that start on a torn newest backup.
    for kill in range(5):
        with open(tmp_path / f"run{kill}.log", "w") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env
            )
            time.sleep(rng.uniform(6, 30))
            # Still training (not ended, not stopped by an error).
            assert process.poll() is None, (
                tmp_path / f"run{kill}.log"
            ).read_text()[-2000:]
            process.send_signal(signal.SIGKILL)
            process.wait()
        if kill % 2:
            for phase in ("backbone", "rnp"):
                newest = BackupAndRestore(
                    str(tmp_path / "backup" / phase)
                ).backups()
                for path in newest[:1]:
                    for name in os.listdir(path):
                        tear(os.path.join(path, name))
                    torn_before.append(kill + 1)
    assert torn_before  # Something was torn.
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    logs = [(tmp_path / f"run{k}.log").read_text() for k in range(5)]
    logs.append(result.stdout + result.stderr)
    # Each run after a tear read past the torn backup, and said so.
    for run in torn_before:
        assert "BackupAndRestore: " in logs[run], run
    final = keras.saving.load_model(tmp_path / "rnp.keras")
    assert int(final.step_counter.numpy()) == 150 * 22  # 22 steps an epoch.
