"""Training callbacks: crash-safe backups.

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
    out: a resumed run draws what an uninterrupted one would). It is written in a staging
    directory beside it and renamed into place when complete, so a kill
    leaves either the new backup or none. The newest `keep` backups stay.

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
        worker = distribute.worker_name(self.model.distribute_strategy)
        if worker is not None and self._worker is None:
            # Every worker keeps its own backups.
            self._worker = worker
            self.backup_dir = os.path.join(self.backup_dir, worker)
        variables = list(self.model.weights)
        for optimizer in (
            getattr(self.model, "optimizer", None),
            getattr(self.model, "decision_optimizer", None),
        ):
            if optimizer is not None:
                variables += list(optimizer.variables)
        initial = [variable.numpy() for variable in variables]
        epoch = self._restore(variables, initial)
        if worker is None:
            return
        # The workers resume together: from the newest epoch all of them
        # hold (the newest backup of one may be a killed write on another),
        # or all from the start.
        strategy = self.model.distribute_strategy
        epochs = distribute.gather(epoch, strategy)
        if len(set(epochs)) > 1:
            epoch = self._restore(variables, initial, max_epoch=min(epochs))
            epochs = distribute.gather(epoch, strategy)
            if len(set(epochs)) > 1:
                self._reset(variables, initial)
                epochs = [0]
            warnings.warn(
                f"BackupAndRestore: the workers' newest backups differ; all "
                f"resume from epoch {epochs[0]}.",
                stacklevel=2,
            )

    def _reset(self, variables, initial):
        for variable, value in zip(variables, initial, strict=True):
            variable.assign(value)
        self.model._initial_epoch = 0
        self._steps = 0

    def _restore(self, variables, initial, max_epoch=None):
        """Loads the newest readable backup (of epoch at most `max_epoch`);
        returns its epoch, or 0 when training starts over."""
        backups = self.backups()
        if max_epoch is not None:
            backups = [p for p in backups if _epoch_of(p) <= max_epoch]
        if not backups:
            if max_epoch is not None:
                self._reset(variables, initial)
            return 0
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
            self._steps = int(state.get("steps", 0))
            if failures:
                warnings.warn(
                    f"BackupAndRestore: could not read {failures[0]}; "
                    f"resuming from the previous backup, "
                    f"{os.path.basename(path)} (epoch {epoch}).",
                    stacklevel=3,
                )
            return epoch
        warnings.warn(
            f"BackupAndRestore: no backup in {self.backup_dir} could be read "
            f"({'; '.join(failures)}); training starts over.",
            stacklevel=3,
        )
        return 0

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


def _epoch_of(path):
    return int(_BACKUP.match(os.path.basename(path)).group(1))


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
