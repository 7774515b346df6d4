"""examples/cifar.py end to end on a tiny ImageFolder."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image
from test_datasets import make_image_folder

import keras_rnp
from keras_rnp import backbones
from keras_rnp import evaluation
from keras_rnp.static_pruning import l1_prune_to_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import cifar  # noqa: E402


@pytest.mark.slow  # 45-65 s; the default run stayed over 15 minutes.
def test_every_step_runs_and_writes_its_results(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", classes=3, train=12)
    work_dir = tmp_path / "work"
    config = cifar.Config(
        data_dir=data_dir,
        work_dir=str(work_dir),
        widths=(4, 16, 32, 32),
        backbone_epochs=1,
        rnp_epochs=2,
        warmup_epochs=1,
        distillation=0.5,
        penalties=(0.1, 0.5),
        decision_steps=2,
        backbone_steps=1,
        static_speedups=(2.0, 4.0),
        budgets=(0.0, 1.0, 1e6),
        batch_size=8,
        verbose=0,
        select_flops_ratio=0.9,
        path_speedups=(2.0,),
    )
    config.steps = list(cifar.STEPS)
    results = cifar.run(config)

    for name in [
        "backbone.keras",
        "warmup.keras",
        "rnp_p0.1.keras",
        "rnp_p0.5.keras",
        "static_2x.keras",
        "static_4x.keras",
        "results.json",
        "per_image.npz",
    ]:
        assert (work_dir / name).is_file(), name
    with open(work_dir / "results.json") as f:
        assert json.load(f) == json.loads(json.dumps(results))
    full = results["full"]
    assert 0.0 <= full["accuracy"] <= 1.0
    assert full["flops"] == keras_rnp.count_flops(
        backbones.cifar_cnn(3, (4, 16, 32, 32))
    )
    assert [row["penalty"] for row in results["rnp"]] == [0.1, 0.5]
    assert [row["budget"] for row in results["sweep"]] == [0.0, 1.0, 1e6]
    for row in results["rnp"] + results["sweep"]:
        assert row["images"] == 12
        assert 0.0 <= row["accuracy"] <= 1.0
        assert 0.0 < row["flops_ratio"] <= 1.1
        assert -1.0 <= row["loss_rank_correlation"] <= 1.0
        for layer in row["layers"]:
            assert sum(layer["action_counts"]) == 12
    # A huge budget takes one group in every gated layer.
    assert all(
        layer["action_counts"][0] == 12
        for layer in results["sweep"][-1]["layers"]
    )
    # A default path chosen on the validation split for 2x: its FLOPs
    # (the decision network's included) within the bound, the model
    # measured under it on the 12 test images.
    (row,) = results["paths"]
    assert row["target_speedup"] == 2.0 and row["images"] == 12
    margins = (0, 0.05, 0.1, 0.2, 0.5, 1, keras_rnp.policy.FIXED_PATH_MARGIN)
    assert len(row["path"]) == 4 and row["margin"] in margins
    assert row["fixed_path_flops_ratio"] <= 0.5
    assert 0.0 <= row["fixed_path_accuracy"] <= 1.0
    for row, speedup in zip(results["static"], [2.0, 4.0], strict=True):
        assert row["speedup"] == speedup
        assert row["flops_ratio"] <= 1 / speedup
        assert 0.0 <= row["accuracy"] <= 1.0
    # Static pruning fine-tunes for as many batch passes as RNP trains the
    # backbone: warm-up plus Algorithm 1's N2 share, each step two passes
    # with distillation (the path and the full network), up to the
    # rounding of steps into epochs.
    per_epoch = cifar._steps_per_epoch(config)
    rnp_updates = cifar._rnp_updates(config)
    passes = 2 * (per_epoch + rnp_updates)
    assert cifar._backbone_updates(config) == passes
    assert results["image_passes"]["static_per_model"] == passes * 8
    assert results["image_passes"]["rnp_backbone"] == passes * 8
    rnp = keras.saving.load_model(work_dir / "rnp_p0.1.keras")
    assert int(rnp.optimizer.iterations) == rnp_updates
    assert rnp.distillation == 0.5
    static = keras.saving.load_model(work_dir / "static_2x.keras")
    assert 0 <= int(static.optimizer.iterations) - passes < config.rnp_epochs
    comparison = results["comparison"]
    assert comparison == evaluation.compare(results)
    assert len(comparison["static"]) == 2
    per_image = np.load(work_dir / "per_image.npz")
    assert per_image["flops_b0"].shape == (12,)
    np.testing.assert_allclose(
        per_image["flops_b0"].mean(), results["sweep"][0]["mean_flops"]
    )
    for png in ["accuracy_vs_flops.png", "images_by_flops.png"]:
        with open(work_dir / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(work_dir / png) as image:
            image.verify()
    # TensorBoard event files for every training run.
    for run in ["backbone", "warmup", "rnp_p0.1", "static_2x"]:
        events = [
            name
            for _, _, files in os.walk(work_dir / "logs" / run)
            for name in files
            if name.startswith("events.out.tfevents")
        ]
        assert events, run
    # Rerunning reuses the trained models instead of training them again.
    before = {
        name: os.path.getmtime(work_dir / name)
        for name in [
            "backbone.keras",
            "warmup.keras",
            "rnp_p0.1.keras",
            "static_2x.keras",
        ]
    }
    config.steps = ["backbone", "rnp", "static"]
    cifar.run(config)
    assert all(
        os.path.getmtime(work_dir / name) == mtime
        for name, mtime in before.items()
    )
    # No staging leftovers of the atomic writes.
    assert not [p for p in os.listdir(work_dir) if p.startswith(".keras_rnp")]


@pytest.mark.slow
def test_supernet_warmup_with_width_aware_statistics(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", classes=3, train=12)
    work_dir = tmp_path / "work"
    config = cifar.Config(
        data_dir=data_dir,
        work_dir=str(work_dir),
        widths=(4, 16, 32, 32),
        backbone_epochs=1,
        rnp_epochs=1,
        warmup_epochs=1,
        width_aware_bn=True,
        sandwich_paths=2,
        penalties=(0.1,),
        decision_steps=1,
        backbone_steps=1,
        batch_size=8,
        verbose=0,
    )
    config.steps = ["backbone", "rnp"]
    cifar.run(config)
    warm = keras.saving.load_model(work_dir / "warmup_rnp.keras")
    assert warm.sandwich_paths == 2 and warm.width_aware_bn
    # One warm-up epoch, each batch one update of three paths.
    per_epoch = cifar._steps_per_epoch(config)
    assert int(warm.optimizer.iterations) == per_epoch
    assert cifar._backbone_updates(config) == (
        per_epoch * 3 + cifar._rnp_updates(config)
    )
    rnp = keras.saving.load_model(work_dir / "rnp_p0.1.keras")
    assert rnp.width_aware_bn and rnp.sandwich_paths == 0
    # The per-width statistics the warm-up learnt carried over (and moved
    # on in Algorithm 1's fine-tuning, one width group at a time).
    fresh = keras_rnp.wrap(
        keras_rnp.strip(rnp), groups=4, gate_first=True, width_aware_bn=True
    )
    for norm, warm_norm, fresh_norm in zip(
        rnp.width_norms, warm.width_norms, fresh.width_norms, strict=True
    ):
        assert not np.allclose(warm_norm.moving_mean, fresh_norm.moving_mean)
        assert norm.moving_mean.shape == warm_norm.moving_mean.shape


@pytest.mark.slow  # 80 s; the residual pieces have fast tests of their own.
def test_resnet20_runs_every_training_step_on_inner_widths(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", classes=3, train=12)
    work_dir = tmp_path / "work"
    config = cifar.Config(
        data_dir=data_dir,
        work_dir=str(work_dir),
        arch="resnet20",
        widths=(4, 8, 8),
        backbone_epochs=1,
        rnp_epochs=1,
        warmup_epochs=1,
        width_aware_bn=True,
        sandwich_paths=1,
        penalties=(0.1,),
        decision_steps=1,
        backbone_steps=1,
        static_speedups=(1.5,),
        budgets=(0.0, 1e6),
        batch_size=8,
        verbose=0,
    )
    config.steps = ["backbone", "rnp", "static", "evaluate"]
    results = cifar.run(config)
    backbone = keras.saving.load_model(work_dir / "backbone.keras")
    assert results["full"]["flops"] == keras_rnp.count_flops(
        backbones.resnet20(3, (4, 8, 8))
    )
    rnp = keras.saving.load_model(work_dir / "rnp_p0.1.keras")
    assert rnp.num_gated_layers == 9  # One decision per basic block.
    # Static pruning narrows the same inner widths and nothing else.
    static = keras.saving.load_model(work_dir / "static_1.5x.keras")
    gated = {conv.name for conv in rnp.gated_layers}
    for before, after in zip(backbone.layers, static.layers, strict=True):
        if isinstance(before, keras.layers.Conv2D):
            narrower = after.filters < before.filters
            assert narrower == (before.name in gated), before.name
    assert results["static"][0]["flops_ratio"] <= 1 / 1.5
    assert all(
        layer["action_counts"][0] == 12
        for layer in results["sweep"][-1]["layers"]
    )


@pytest.mark.parametrize(
    "prune_first",
    # The first case is slow: the default run keeps to 15 minutes.
    [pytest.param(False, marks=pytest.mark.slow), True],
)
def test_static_pruning_keeps_or_prunes_the_first_convolution(
    tmp_path, prune_first
):
    data_dir = make_image_folder(tmp_path / "data", classes=3, train=12)
    config = cifar.Config(
        data_dir=data_dir,
        work_dir=str(tmp_path / "work"),
        widths=(8, 16, 32, 32),
        rnp_epochs=1,
        warmup_epochs=0,
        decision_steps=1,
        backbone_steps=1,
        static_speedups=(2.0,),
        static_prune_first=prune_first,
        batch_size=8,
        verbose=0,
    )
    os.makedirs(config.work_dir)
    backbone = backbones.cifar_cnn(3, config.widths)
    backbone.save(config.path("backbone.keras"))
    cifar.train_static(config)

    def filters(model):
        return [
            layer.filters
            for layer in model.layers
            if isinstance(layer, keras.layers.Conv2D)
        ]

    static = keras.saving.load_model(config.path("static_2x.keras"))
    assert keras_rnp.count_flops(static) <= keras_rnp.count_flops(backbone) / 2
    # The first convolution is pruned with the others, or left whole.
    assert (filters(static)[0] < 8) == prune_first
    assert max(filters(static)[1:]) < 32
    expected, _ = l1_prune_to_flops(backbone, 2.0, prune_first=prune_first)
    assert filters(static) == filters(expected)


def test_comparison_lines():
    comparison = {
        "within_1_point": {
            "penalty": 0.05,
            "budget": 1.0,
            "speedup": 2.0,
            "accuracy": 0.89,
        },
        "static": [
            {
                "speedup": 2.0,
                "static_accuracy": 0.88,
                "rnp_accuracy": 0.89,
                "difference": 0.01,
            },
            {
                "speedup": 4.0,
                "static_accuracy": 0.80,
                "rnp_accuracy": 0.815,
                "difference": 0.015,
            },
            {
                "speedup": 8.0,
                "static_accuracy": 0.70,
                "rnp_accuracy": None,
                "difference": None,
            },
        ],
    }
    assert cifar.format_comparison(comparison) == [
        "largest reduction within 1 point of the full network: 2.00x "
        "(p=0.05, budget 1, accuracy 0.8900)",
        "at 2x: static 0.8800, RNP sweep 0.8900 (+0.0100)",
        "at 4x: static 0.8000, RNP sweep 0.8150 (+0.0150)",
        "at 8x: static 0.7000, the sweep does not reach it",
    ]
    comparison["within_1_point"] = None
    assert cifar.format_comparison(comparison)[0] == (
        "largest reduction within 1 point of the full network: none"
    )


def run_script(*flags):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "cifar.py"), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


@pytest.mark.slow  # 30 s of interpreter start-ups; the library's own
# bad-input tests run by default.
def test_bad_flags_and_missing_inputs_give_one_line_errors(tmp_path):
    result = run_script("--penalties=high")
    assert result.returncode != 0
    assert "--penalties expects a list of floats" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script("--warmup_epochs=-1")
    assert result.returncode != 0
    assert "--warmup_epochs=-1: -1 is not a non-negative" in result.stderr
    result = run_script(
        f"--data_dir={tmp_path / 'nowhere'}",
        f"--work_dir={tmp_path}",
        "--steps=backbone",
    )
    assert result.returncode == 1
    assert "error: Expected data_dir to be a directory" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script(f"--work_dir={tmp_path}", "--steps=plots")
    assert result.returncode == 1
    assert "run --steps=evaluate first" in result.stderr
    # A directory in the wrong layout (images not in train/<class>/).
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "0001.jpg").write_bytes(b"not a jpeg")
    result = run_script(
        f"--data_dir={tmp_path / 'flat'}", f"--work_dir={tmp_path}"
    )
    assert result.returncode == 1
    assert "Expected data_dir to hold an ImageFolder layout" in result.stderr
    assert "Traceback" not in result.stderr
    # A corrupt model file.
    data_dir = make_image_folder(tmp_path / "data", classes=2, train=2)
    (tmp_path / "backbone.keras").write_bytes(b"truncated")
    result = run_script(
        f"--data_dir={data_dir}", f"--work_dir={tmp_path}", "--steps=rnp"
    )
    assert result.returncode == 1
    errors = [x for x in result.stderr.splitlines() if x.startswith("error")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: Cannot load the backbone from")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "arch, decay, decayed",
    [
        ("resnet20", "auto", {"kernel"}),
        ("cnn4", "auto", {"kernel", "bias", "gamma", "beta"}),
        ("cnn4", "kernels", {"kernel"}),
        ("resnet20", "all", {"kernel", "gamma", "beta", "bias"}),
    ],
)
def test_weight_decay_reaches_the_weights_decay_names(arch, decay, decayed):
    config = cifar.Config(arch=arch, decay=decay)
    model = (
        backbones.resnet20() if arch == "resnet20" else backbones.cifar_cnn()
    )
    optimizer = cifar._sgd(config, 0.1, 10)
    optimizer.build(model.trainable_variables)
    names = {
        variable.name
        for variable in model.trainable_variables
        if optimizer._use_weight_decay(variable)
    }
    assert names == decayed
