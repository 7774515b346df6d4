"""Training callbacks: crash-safe backups, and choosing the epoch to keep.

Keras' `BackupAndRestore` writes its weights file and its metadata file in
place: a kill in the middle of the write leaves a torn file, and every
rerun stops with an error until the user deletes the backup folder. This
one writes each backup whole or not at all, keeps the one before it, and
falls back to it (or starts over) with a warning when a backup cannot be
read.
"""

import json
import os
import re
import shutil
import warnings

import keras

from keras_rnp import distribute
from keras_rnp import io_utils

_BACKUP = re.compile(r"^backup-(\d{6})-(\d{9})$")


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Backs up training as it goes, and resumes it after a crash.

    Each backup is a directory `backup-<epoch>-<step>` in `backup_dir`
    holding `model.weights.h5` (the model's and its optimizers' variables:
    for an `RNPModel` also the step counters and the loss mean) and
    `state.json` (the epoch to resume at, and the states of the random
    generators of layers such as dropout, which Keras' weights files leave
    out: a resumed run draws what an uninterrupted one would). It is
    written in a staging directory beside it and renamed into place when
    complete, so a kill leaves either the new backup or none. The newest
    `keep` backups stay.

    At the start of `fit`, the newest backup that can be read is loaded.
    When it is not the newest, or none can be read, a one-line warning
    says so and training resumes from the older backup or starts over;
    `fit` never stops on a damaged backup.

    Under `MultiWorkerMirroredStrategy` every worker keeps its own backups,
    in `backup_dir/<task_type>-<task_id>`, and the workers resume together
    from the newest epoch all of them hold (all start over when there is
    none), with a warning when their newest backups differ.

    Args:
        backup_dir: where the backups go (created if needed).
        save_freq: `"epoch"`, or a number of batches.
        keep: how many backups to keep (at least 2, so that one survives
            a damaged newest one).
        delete_checkpoint: delete `backup_dir` when training ends.

    Example:

    ```python
    rnp.fit(train_ds, epochs=10,
            callbacks=[keras_rnp.callbacks.BackupAndRestore("backup")])
    ```
    """

    def __init__(
        self, backup_dir, save_freq="epoch", keep=2, delete_checkpoint=True
    ):
        super().__init__(
            backup_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint
        )
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 2:
            raise ValueError(
                f"keep must be an integer >= 2. Received: keep={keep!r}."
            )
        self.keep = keep
        self._steps = 0
        self._worker = None

    def backups(self):
        """The complete backups in `backup_dir`, newest first."""
        if not os.path.isdir(self.backup_dir):
            return []
        found = []
        for name in os.listdir(self.backup_dir):
            match = _BACKUP.match(name)
            if match:
                key = (int(match.group(1)), int(match.group(2)))
                found.append((key, os.path.join(self.backup_dir, name)))
        return [path for _, path in sorted(found, reverse=True)]

    def on_train_begin(self, logs=None):
        if not self.model.built:
            raise ValueError(
                "BackupAndRestore expects a built model (call it on a batch "
                f"first). Received: model={self.model.name}, not built."
            )
        optimizers = [
            optimizer
            for optimizer in (
                getattr(self.model, "optimizer", None),
                getattr(self.model, "decision_optimizer", None),
            )
            if optimizer is not None and not optimizer.built
        ]
        for optimizer in optimizers:  # Their variables must exist to load.
            optimizer.build(self.model.trainable_variables)
        # What an earlier fit (or backup) of this model set is not ours.
        self.model._initial_epoch = None
        worker = distribute.worker_name(self.model.distribute_strategy)
        if worker is not None and self._worker is None:
            # Every worker keeps its own backups.
            self._worker = worker
            self.backup_dir = os.path.join(self.backup_dir, worker)
        variables = list(self.model.weights) + _random_states(self.model)
        for optimizer in (
            getattr(self.model, "optimizer", None),
            getattr(self.model, "decision_optimizer", None),
        ):
            if optimizer is not None:
                variables += list(optimizer.variables)
        initial = [variable.numpy() for variable in variables]
        key = self._restore(variables, initial)
        if worker is None:
            return
        # The workers resume together, from the newest backup (epoch and
        # step) all of them hold: the newest of one may be a killed write
        # on another. Each round every worker loads its newest backup no
        # newer than the oldest newest one; all start over if one has none.
        strategy = self.model.distribute_strategy
        differed = False
        while True:
            keys = distribute.gather(_encode(key), strategy)
            if len(set(keys)) == 1:
                break
            differed = True
            if min(keys) < 0:
                self._reset(variables, initial)
                key = None
            else:
                key = self._restore(variables, initial, _decode(min(keys)))
        if differed:
            where = "the start" if key is None else f"epoch {key[0]}"
            warnings.warn(
                f"BackupAndRestore: the workers' newest backups differ; all "
                f"resume from {where}.",
                stacklevel=2,
            )

    def _reset(self, variables, initial):
        """Back to the state before any backup was read: training starts
        over (at fit's `initial_epoch`)."""
        for variable, value in zip(variables, initial, strict=True):
            variable.assign(value)
        self.model._initial_epoch = None
        self._resume_at(0, 0)

    def _resume_at(self, epoch, steps):
        self._steps = steps
        self._current_epoch = epoch  # Names the next backups.
        self._last_batch_seen = 0
        self._batches_seen_since_last_saving = 0

    def _restore(self, variables, initial, at_most=None):
        """Loads the newest readable backup (no newer than the key
        `at_most`, `(epoch, steps)`); returns its key, or None when
        training starts over."""
        backups = self.backups()
        if at_most is not None:
            backups = [p for p in backups if _key_of(p) <= at_most]
            self._reset(variables, initial)
        failures = []
        for path in backups:
            try:
                with open(os.path.join(path, "state.json")) as f:
                    state = json.load(f)
                epoch = int(state["epoch"])
                self.model.load_weights(os.path.join(path, "model.weights.h5"))
                _set_random_states(self.model, state.get("random_states"))
            except Exception as error:  # A torn file fails in many ways.
                reason = (str(error).strip().splitlines() or [""])[0]
                failures.append(
                    f"{os.path.basename(path)} ({type(error).__name__}: "
                    f"{reason[:120]})"
                )
                # A half-read file may have set some variables.
                self._reset(variables, initial)
                continue
            self.model._initial_epoch = epoch  # Read by Keras' fit.
            self._resume_at(epoch, int(state.get("steps", 0)))
            if failures:
                warnings.warn(
                    f"BackupAndRestore: could not read {failures[0]}; "
                    f"resuming from the previous backup, "
                    f"{os.path.basename(path)} (epoch {epoch}).",
                    stacklevel=3,
                )
            return _key_of(path)
        if failures:
            warnings.warn(
                f"BackupAndRestore: no backup in {self.backup_dir} could be "
                f"read ({'; '.join(failures)}); training starts over.",
                stacklevel=3,
            )
        return None

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        super().on_train_batch_end(batch, logs)

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        for name in os.listdir(self.backup_dir):  # A killed write's staging.
            if name.startswith(".keras_rnp-"):
                shutil.rmtree(
                    os.path.join(self.backup_dir, name), ignore_errors=True
                )
        name = f"backup-{self._current_epoch:06d}-{self._steps:09d}"
        target = os.path.join(self.backup_dir, name)
        with io_utils.atomic_path(target, is_dir=True) as staging:
            os.makedirs(staging)
            self.model.save_weights(os.path.join(staging, "model.weights.h5"))
            with open(os.path.join(staging, "state.json"), "w") as f:
                json.dump(
                    {
                        "epoch": self._current_epoch,
                        "batch": self._last_batch_seen,
                        "steps": self._steps,
                        "random_states": [
                            state.numpy().tolist()
                            for state in _random_states(self.model)
                        ],
                    },
                    f,
                )
        for old in self.backups()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and os.path.isdir(self.backup_dir):
            shutil.rmtree(self.backup_dir)
            if self._worker is not None:  # The workers' shared parent.
                try:
                    os.rmdir(os.path.dirname(self.backup_dir))
                except OSError:  # Another worker's backups are still there.
                    pass


class SelectOnValidation(keras.callbacks.Callback):
    """Ends training on the epoch with the best validation accuracy within
    a FLOPs budget.

    Q-learning's operating point moves between epochs (the validation
    FLOPs ratio of one run can swing by 0.2 of the full network from one
    epoch to the next), so the last epoch is often not the one to keep.
    After every validated epoch this reads the validation accuracy and
    FLOPs ratio that `fit` logs (give it `validation_data`), keeps a copy of the
    weights of the best epoch so far, and puts them back when training
    ends. "Best": the highest accuracy among the epochs whose FLOPs ratio
    is at most `max_flops_ratio`; while no epoch is that cheap, the
    cheapest. The step counters and the loss mean are not rolled back
    (`RNPModel.set_weights`). After `fit`, `best_epoch` (0-based), `best`
    (its logs) and `epochs` (every epoch's accuracy and FLOPs ratio) say
    what was chosen.

    The choice is not in `BackupAndRestore`'s backups: a resumed run
    chooses among the epochs it ran itself.

    Args:
        max_flops_ratio: the largest validation FLOPs ratio (of the full
            network's FLOPs, decision network counted) an epoch may have;
            None for any.
        accuracy: the log to maximize.
        flops_ratio: the log of the FLOPs ratio.
        verbose: print the choice when training ends.

    Example:

    ```python
    select = keras_rnp.callbacks.SelectOnValidation(max_flops_ratio=0.3)
    rnp.fit(train_ds, epochs=10, validation_data=val_ds, callbacks=[select])
    ```
    """

    def __init__(
        self,
        max_flops_ratio=None,
        accuracy="val_accuracy",
        flops_ratio="val_flops_ratio",
        verbose=1,
    ):
        super().__init__()
        if max_flops_ratio is not None and (
            isinstance(max_flops_ratio, bool)
            or not isinstance(max_flops_ratio, (int, float))
            or not max_flops_ratio > 0
        ):
            raise ValueError(
                "max_flops_ratio must be a positive number or None. "
                f"Received: max_flops_ratio={max_flops_ratio!r}."
            )
        self.max_flops_ratio = max_flops_ratio
        self.accuracy, self.flops_ratio = accuracy, flops_ratio
        self.verbose = verbose

    def on_train_begin(self, logs=None):
        self.epochs, self.best_epoch, self.best = [], None, None
        self._key, self._weights, self._seen_logs = None, None, None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self._seen_logs = sorted(logs)
        if self.accuracy not in logs or self.flops_ratio not in logs:
            return  # Not validated this epoch (validation_freq > 1).
        accuracy = float(logs[self.accuracy])
        ratio = float(logs[self.flops_ratio])
        self.epochs.append({"accuracy": accuracy, "flops_ratio": ratio})
        cheap = self.max_flops_ratio is None or ratio <= self.max_flops_ratio
        key = (cheap, accuracy if cheap else -ratio)
        if self._key is None or key > self._key:
            self._key, self.best_epoch, self.best = key, epoch, dict(logs)
            self._weights = self.model.get_weights()

    def on_train_end(self, logs=None):
        if self._weights is None:
            if self._seen_logs is not None:
                warnings.warn(
                    f"SelectOnValidation: no epoch logged {self.accuracy} "
                    f"and {self.flops_ratio}, so the last epoch stays: pass "
                    "validation_data to fit (and an accuracy metric to "
                    f"compile). Received logs: {self._seen_logs}.",
                    stacklevel=2,
                )
            return
        self.model.set_weights(self._weights)
        self._weights = None  # Memory: the model holds them now.
        if self.verbose:
            print(
                f"SelectOnValidation: kept epoch {self.best_epoch + 1} "
                f"({self.accuracy} {self.best[self.accuracy]:.4f}, "
                f"{self.flops_ratio} {self.best[self.flops_ratio]:.3f})",
                flush=True,
            )


def _key_of(path):
    """`(epoch, steps)` of a backup directory, from its name."""
    match = _BACKUP.match(os.path.basename(path))
    return int(match.group(1)), int(match.group(2))


def _encode(key):
    """A backup key as one integer for the workers to compare (-1: none)."""
    return -1 if key is None else key[0] * 10**9 + key[1]


def _decode(number):
    return divmod(number, 10**9)


def _random_states(model):
    """The state variables of the model's random seed generators (one per
    dropout layer, say), in a fixed order: Keras tracks them as variables
    but leaves them out of `weights` and of weights files."""
    weights = {id(variable) for variable in model.weights}
    return [
        variable
        for variable in model.variables
        if id(variable) not in weights
        and variable.name == "seed_generator_state"
    ]


def _set_random_states(model, values):
    if values is None:  # A backup written before random states were kept.
        return
    states = _random_states(model)
    if len(values) != len(states):
        raise ValueError(
            f"the backup holds {len(values)} random generator states; the "
            f"model has {len(states)}"
        )
    for state, value in zip(states, values, strict=True):
        state.assign(value)
