"""Two workers of MultiWorkerMirroredStrategy on localhost (CPU, collective
ops over the loopback) train as one process does, resume after one of them
is killed, and only the chief writes."""

import json
import os
import shutil
import sys
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_same_training
from helpers import run_workers
from helpers import tf_config

from keras_rnp import distribute

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "multi_worker_run.py")


def _single(*args):
    [result] = run_workers(lambda i, p: [sys.executable, SCRIPT, *args], 1)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _two_workers(*args, kill_at=None):
    return run_workers(
        lambda index, ports: [sys.executable, SCRIPT, *args, str(index), ports],
        env=lambda index, ports: (
            {"KILL_AT": kill_at[index]} if index in (kill_at or {}) else {}
        ),
    )


def test_two_workers_train_as_one_process():
    workers = _two_workers("parity")
    for worker in workers:
        assert worker.returncode == 0, worker.stderr[-3000:]
    first, second = (json.loads(w.stdout) for w in workers)
    one = _single("parity", "single")
    assert first["rnp"]["replicas"] == 2 and one["rnp"]["replicas"] == 1
    # 3 epochs of 4 global batches of 16 (8 per worker), rounds of 2
    # decision and 2 backbone steps; validation every epoch.
    assert one["rnp"]["step_counter"] == 12
    assert one["rnp"]["decision_step_counter"] == 6
    assert one["plain"]["iterations"] == 8
    for part in ("rnp", "plain"):
        assert_same_training(first[part], one[part])
        assert_same_training(second[part], one[part])
        assert "val_loss" in one[part]["history"]
    # Training moved the weights: the comparison is not of two no-ops.
    assert (
        one["rnp"]["history"]["q_loss"][0]
        != one["rnp"]["history"]["q_loss"][-1]
    )


@pytest.mark.slow  # 65 s: a single run and two two-worker runs.
def test_a_killed_worker_resumes_with_the_others(tmp_path):
    backups = str(tmp_path / "backup")
    reference = _single("resume", str(tmp_path / "reference"), "single")
    # Worker 1 is killed as the second batch of its third epoch begins;
    # worker 0 then stops with an error (its peer stopped sending
    # heartbeats, says TensorFlow).
    killed = _two_workers("resume", backups, kill_at={1: "2,1"})
    assert killed[1].returncode == -9
    assert killed[0].returncode != 0
    for worker in ("worker-0", "worker-1"):
        names = sorted(os.listdir(os.path.join(backups, worker)))
        assert names == ["backup-000001-000000004", "backup-000002-000000008"]
    # No model yet (the reference run's is there).
    assert sorted(os.listdir(tmp_path)) == [
        "backup",
        "reference",
        "reference-rnp.keras",
    ]
    # The same commands again: both resume at epoch 2 and end as one
    # uninterrupted process does.
    resumed = _two_workers("resume", backups)
    for worker in resumed:
        assert worker.returncode == 0, worker.stderr[-3000:]
        result = json.loads(worker.stdout)
        assert len(result["history"]["loss"]) == 2  # epochs 3 and 4
        reference_tail = {
            key: values[2:] for key, values in reference["history"].items()
        }
        assert_same_training(result, {**reference, "history": reference_tail})
    # The chief's model, whole, with every step of the four epochs.
    saved = keras.saving.load_model(tmp_path / "backup-rnp.keras")
    assert int(saved.step_counter.numpy()) == reference["step_counter"] == 16


@pytest.mark.slow  # 65 s
def test_workers_whose_newest_backups_differ_resume_together(tmp_path):
    backups = str(tmp_path / "backup")
    reference = _single("resume", str(tmp_path / "reference"), "single")
    killed = _two_workers("resume", backups, kill_at={1: "2,1"})
    assert killed[1].returncode == -9
    # A kill inside worker 1's last backup write: it holds epoch 1 only.
    shutil.rmtree(os.path.join(backups, "worker-1", "backup-000002-000000008"))
    resumed = _two_workers("resume", backups)
    for worker in resumed:
        assert worker.returncode == 0, worker.stderr[-3000:]
        assert "all resume from epoch 1" in worker.stderr
        result = json.loads(worker.stdout)
        assert len(result["history"]["loss"]) == 3  # epochs 2 to 4
        assert_same_training(
            result,
            {
                **reference,
                "history": {k: v[1:] for k, v in reference["history"].items()},
            },
        )


class _Strategy:
    """What `distribute` reads of a strategy: its cluster resolver."""

    def __init__(self, cluster, task_type, task_id):
        self.cluster_resolver = (
            tf.distribute.cluster_resolver.SimpleClusterResolver(
                tf.train.ClusterSpec(cluster),
                task_type=task_type,
                task_id=task_id,
            )
        )


def test_only_the_chief_writes_where_the_chief_does(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tempfile.tempdir)
    workers = {"worker": ["localhost:1", "localhost:2"]}
    with_chief = {"chief": ["localhost:0"], **workers}
    path = str(tmp_path / "models")
    cases = [
        (tf.distribute.get_strategy(), True, None),
        (_Strategy(workers, "worker", 0), True, "worker-0"),
        (_Strategy(workers, "worker", 1), False, "worker-1"),
        (_Strategy(with_chief, "chief", 0), True, "chief-0"),
        (_Strategy(with_chief, "worker", 0), False, "worker-0"),
    ]
    for strategy, chief, name in cases:
        assert distribute.is_chief(strategy) is chief
        assert distribute.worker_name(strategy) == name
        directory = distribute.worker_dir(path, strategy)
        if chief:
            assert directory == path
            continue
        # A new directory of the worker's own, the same for the same path
        # (relative or not), removed whole.
        assert os.path.isdir(directory)
        assert os.path.dirname(directory) == tempfile.tempdir
        assert f"keras_rnp-{name}-" in directory
        relative = os.path.relpath(path)
        assert distribute.worker_dir(relative, strategy) == directory
        open(os.path.join(directory, "model.keras"), "w").close()
        distribute.remove_worker_dir(relative, strategy)
        assert not os.path.exists(directory)
    assert os.listdir(tempfile.tempdir) == []
    # Outside a cluster the collective helpers are local.
    assert distribute.gather(3) == [3]
    distribute.barrier()


def test_multi_worker_model_refuses_what_it_cannot_view():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(ValueError, match="expects a built functional"):
        distribute.multi_worker_model("model")
    subclassed = Subclassed()
    with pytest.raises(ValueError, match="expects a built functional"):
        distribute.multi_worker_model(subclassed)
    subclassed(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="`MultiWorkerFit` mixin"):
        distribute.multi_worker_model(subclassed)


def test_multi_worker_model_shares_the_weights():
    # Under a strategy (MultiWorkerFit's own step functions) and without.
    x = np.random.default_rng(0).normal(size=(6, 3)).astype("float32")
    y = np.zeros((6, 2), "float32")
    trained = []
    for strategy in (
        tf.distribute.get_strategy(),
        tf.distribute.OneDeviceStrategy("/cpu:0"),
    ):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            view = distribute.multi_worker_model(model)
            view.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = model.predict(x, verbose=0)
        history = view.fit(
            x, y, batch_size=4, epochs=2, validation_data=(x, y), verbose=0
        )
        after = model.predict(x, verbose=0)
        np.testing.assert_allclose(view.predict(x, verbose=0), after)
        assert not np.allclose(before, after)
        trained.append((after, history.history))
    (plain, plain_logs), (mirrored, mirrored_logs) = trained
    np.testing.assert_allclose(mirrored, plain, atol=1e-6)
    for key, values in plain_logs.items():
        np.testing.assert_allclose(mirrored_logs[key], values, rtol=1e-5)


def _cifar_flags(data_dir, work_dir, strategy):
    return [
        f"--data_dir={data_dir}",
        f"--work_dir={work_dir}",
        f"--strategy={strategy}",
        "--widths=4,8,8,8",
        "--backbone_epochs=2",
        "--rnp_epochs=2",
        "--warmup_epochs=0",
        "--penalties=0.1",
        "--static_speedups=2",
        "--budgets=0",
        "--batch_size=8",
        "--decision_steps=1",
        "--backbone_steps=1",
        "--steps=backbone,rnp,static,evaluate",
        "--verbose=0",
    ]


def _weights(path):
    return [np.asarray(w) for w in keras.saving.load_model(path).weights]


# 70-105 s. Slow: with it the default run took 14m19s in a clean clone on
# 2 idle cores (12m22s without), too close to the 15-minute limit.
@pytest.mark.slow
def test_cifar_script_on_two_workers(tmp_path):
    from test_datasets import make_image_folder

    data_dir = make_image_folder(tmp_path / "data", classes=3, train=16)
    script = os.path.join(os.path.dirname(HERE), "examples", "cifar.py")
    work = tmp_path / "workers"
    temporary = tmp_path / "tmp"  # The workers' temporary directories.
    temporary.mkdir()
    workers = run_workers(
        lambda index, ports: [
            sys.executable,
            script,
            *_cifar_flags(data_dir, work, "multi_worker"),
        ],
        env=lambda index, ports: {
            "TF_CONFIG": tf_config(index, ports),
            "TMPDIR": str(temporary),
        },
    )
    for worker in workers:
        assert worker.returncode == 0, worker.stderr[-3000:]
    one = tmp_path / "one"
    [single] = run_workers(
        lambda index, ports: [
            sys.executable,
            os.path.join(HERE, "cifar_two_cpus.py"),
            *_cifar_flags(data_dir, one, "mirrored"),
        ],
        count=1,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    # The chief's results, as one process with two replicas gets them.
    for name in ("backbone.keras", "rnp_p0.1.keras", "static_2x.keras"):
        for a, b in zip(
            _weights(work / name), _weights(one / name), strict=True
        ):
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)
    with open(work / "results.json") as f, open(one / "results.json") as g:
        mine, theirs = json.load(f), json.load(g)
    assert mine["rnp"][0]["accuracy"] == theirs["rnp"][0]["accuracy"]
    rnp = keras.saving.load_model(work / "rnp_p0.1.keras")
    # 2 epochs of 48 images in global batches of 8 (4 per worker).
    assert int(rnp.step_counter.numpy()) == 12
    # Only the chief wrote: every TensorBoard event file is its own (the
    # writer's process id is in the name), the other worker's temporary
    # directory is gone, and it printed that the chief evaluates.
    events = [
        name
        for _, _, names in os.walk(work / "logs")
        for name in names
        if name.startswith("events.out.tfevents")
    ]
    assert events
    for name in events:
        assert f".{workers[0].pid}." in name
        assert f".{workers[1].pid}." not in name
    assert "== evaluate: the chief's ==" in workers[1].stdout
    # Worker 1's temporary directory (its models, logs) is gone.
    assert not [n for n in os.listdir(temporary) if n.startswith("keras_rnp")]


def test_one_step_per_call_under_a_strategy():
    from distributed_training import cnn
    from distributed_training import data

    import keras_rnp

    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        rnp = keras_rnp.wrap(cnn(), groups=4, seed=0)
        rnp.compile(optimizer="sgd", steps_per_execution=2)
    with pytest.raises(ValueError, match="steps_per_execution=2"):
        rnp.fit(data()[0], epochs=1, verbose=0)
