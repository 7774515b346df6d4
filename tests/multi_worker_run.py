"""One worker of a two-worker MultiWorkerMirroredStrategy run on localhost,
or the same training in one process; prints the results as JSON. Run by
test_multi_worker.py.

    multi_worker_run.py parity (single | <index> <port0>,<port1>)
    multi_worker_run.py resume <backup_dir> (single | <index> <ports>)

`resume` trains 4 epochs with `keras_rnp.callbacks.BackupAndRestore` and
saves the model as `<backup_dir>-rnp.keras` (the chief); with
KILL_AT=<epoch>,<batch> in the environment the process SIGKILLs itself
when that batch of that epoch begins.
"""

import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
MODE = sys.argv[1]
BACKUP_DIR = sys.argv[2] if MODE == "resume" else None
TASK = sys.argv[3:] if MODE == "resume" else sys.argv[2:]
if TASK[0] != "single":
    from helpers import tf_config

    os.environ["TF_CONFIG"] = tf_config(int(TASK[0]), TASK[1])

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from distributed_training import train_plain  # noqa: E402
from distributed_training import train_rnp  # noqa: E402

import keras_rnp  # noqa: E402


class KillAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    if TASK[0] == "single":
        strategy = tf.distribute.get_strategy()
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if MODE == "parity":
        _, rnp = train_rnp(strategy, validation=True)
        plain = train_plain(strategy)
        # Workers leave together (one leaving early can fail the others'
        # shutdown: tensorflow/tensorflow#58434).
        keras_rnp.distribute.barrier(strategy)
        json.dump({"rnp": rnp, "plain": plain}, sys.stdout)
        return
    callbacks = [
        keras_rnp.callbacks.BackupAndRestore(
            BACKUP_DIR, delete_checkpoint=False
        )
    ]
    if os.environ.get("KILL_AT"):
        callbacks.append(KillAt(*map(int, os.environ["KILL_AT"].split(","))))
    model, rnp = train_rnp(strategy, epochs=4, callbacks=callbacks)
    if keras_rnp.distribute.is_chief(strategy):  # Written whole or not.
        model.save(BACKUP_DIR.rstrip(os.sep) + "-rnp.keras")
    keras_rnp.distribute.barrier(strategy)
    json.dump(rnp, sys.stdout)


if __name__ == "__main__":
    main()
