"""Tests of the per-model training presets and of the parity report tool."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from model_garden import models
from model_garden import presets

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_model_has_a_preset():
    assert sorted(presets.PRESETS) == sorted(models.MODELS)


def test_cifar_cnn_preset_keeps_main_job_settings():
    preset = presets.get_preset("cifar_cnn")
    assert (preset.optimizer, preset.learning_rate, preset.batch_size, preset.epochs) == (
        "adam", 4e-3, 64, 15
    )


def test_sgd_rate_scales_linearly_with_batch_size():
    preset = presets.resolve("resnet50", batch_size=64)
    assert preset.learning_rate == pytest.approx(0.1 * 64 / 256)
    assert preset.batch_size == 64


def test_explicit_learning_rate_is_used_unchanged():
    preset = presets.resolve("resnet50", batch_size=64, learning_rate=0.3)
    assert preset.learning_rate == 0.3


def test_adam_rate_does_not_scale():
    assert presets.resolve("simplenet", batch_size=256).learning_rate == 2e-3


def test_step_schedule_values_at_boundaries():
    preset = presets.resolve("resnet50", batch_size=256)
    schedule = presets.make_schedule(preset, steps_per_epoch=10)
    rates = [float(schedule(step)) for step in (0, 299, 301, 601, 801)]
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.01, 0.001, 0.0001], rtol=1e-6)


def test_step_schedule_drops_boundaries_after_last_epoch():
    preset = presets.resolve("vgg16", epochs=40)
    schedule = presets.make_schedule(preset, steps_per_epoch=5)
    assert float(schedule(149)) == pytest.approx(0.01)
    assert float(schedule(151)) == pytest.approx(0.001)
    assert float(schedule(199)) == pytest.approx(0.001)


def test_cosine_schedule_reaches_zero_at_last_step():
    preset = presets.resolve("simplenet", epochs=2)
    schedule = presets.make_schedule(preset, steps_per_epoch=5)
    assert float(schedule(0)) == pytest.approx(2e-3)
    assert float(schedule(10)) == pytest.approx(0.0, abs=1e-9)


def test_make_optimizer_kinds():
    sgd = presets.make_optimizer(presets.resolve("alexnet"), steps_per_epoch=3)
    adam = presets.make_optimizer(presets.resolve("cifar_cnn"), steps_per_epoch=3)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.9
    assert sgd.weight_decay == 5e-4
    assert isinstance(adam, keras.optimizers.Adam)


def test_unknown_model_error_names_value():
    with pytest.raises(ValueError, match="Received: model='lenet'"):
        presets.get_preset("lenet")


def test_bad_steps_per_epoch_error_names_value():
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        presets.make_schedule(presets.get_preset("alexnet"), steps_per_epoch=0)


def _write_run(runs_dir, policy, seed, accuracy):
    run_dir = os.path.join(runs_dir, f"simplenet-{policy}-seed{seed}")
    os.makedirs(run_dir)
    summary = {
        "model": "simplenet", "policy": policy, "seed": seed, "batch_size": 64,
        "steps_per_epoch": 40, "seconds_per_epoch": [100.0, 64.0, 64.0],
        "test_accuracy": accuracy, "test_loss": 1.5,
        "train_curve": [[10, 2.3, 0.1], [20, 2.0, 0.2]],
    }
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as file:
        json.dump(summary, file)


def test_parity_report_table_and_plot(tmp_path):
    runs_dir = str(tmp_path / "runs")
    for seed, (base, dfp) in enumerate([(0.40, 0.41), (0.42, 0.42), (0.44, 0.46)]):
        _write_run(runs_dir, "float32", seed, base)
        _write_run(runs_dir, "dfp16", seed, dfp)
    plot_path = tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "parity_report.py"), runs_dir,
         f"--plot={plot_path}"],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )
    assert "| float32 | 3 | 42.00 ± 2.00 % | 40.0 |" in result.stdout
    assert "| dfp16 | 3 | 43.00 ± 2.65 % | 40.0 |" in result.stdout
    assert "Paired difference dfp16 - float32 over seeds [0, 1, 2]: +1.00 percentage" \
        in result.stdout
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parity_report_rejects_empty_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "parity_report.py"),
         str(tmp_path)],
        capture_output=True, text=True, check=False, cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    assert "which has none" in result.stderr


def test_cli_steps_per_epoch_writes_curve_and_logs(tmp_path):
    model_dir = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "model_garden.train", "--policy=float32",
         "--steps_per_epoch=2", "--epochs=2", "--batch_size=8", "--max_train_records=12",
         "--max_test_records=16", "--log_every_n_steps=1", "--optimizer=sgd",
         "--learning_rate=0.01",
         f"--model_dir={model_dir}", "--verbose=0"],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )
    with open(model_dir / "summary.json", encoding="utf-8") as file:
        summary = json.load(file)
    assert summary["steps_per_epoch"] == 2
    assert summary["optimizer"] == "sgd"
    assert [point[0] for point in summary["train_curve"]] == [1, 2, 3, 4]
    assert all(np.isfinite(point[1]) for point in summary["train_curve"])
    assert list((model_dir / "logs" / "train").glob("events.out.tfevents.*"))


def test_parity_report_rejects_unfinished_summary(tmp_path):
    runs_dir = str(tmp_path / "runs")
    _write_run(runs_dir, "float32", 0, 0.4)
    summary_path = os.path.join(runs_dir, "simplenet-float32-seed0", "summary.json")
    with open(summary_path, encoding="utf-8") as file:
        summary = json.load(file)
    del summary["test_accuracy"]
    with open(summary_path, "w", encoding="utf-8") as file:
        json.dump(summary, file)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "parity_report.py"), runs_dir],
        capture_output=True, text=True, check=False, cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    assert "which has no test_accuracy" in result.stderr
