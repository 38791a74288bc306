"""Training tests: a short dfp16 fit on the embedded sample, and the training CLI."""

import json
import os
import subprocess
import sys

from absl import flags
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dfp  # Registers the "dfp16" policy.
from model_garden import data as data_lib
from model_garden import models

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def dfp16_policy():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("dfp16")
    yield
    keras.config.set_dtype_policy(previous)


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def test_dfp16_model_uses_dfp_policy(dfp16_policy):
    model = models.build_model("cifar_cnn")
    conv_and_dense = [
        layer for layer in model.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
    ]
    assert conv_and_dense
    for layer in conv_and_dense:
        assert isinstance(layer.dtype_policy, keras_dfp.DFPPolicy), layer.name


def test_dfp16_gradients_are_finite(dfp16_policy):
    keras.utils.set_random_seed(1)
    model = models.build_model("cifar_cnn")
    images, labels = next(iter(data_lib.make_dataset(None, "train", batch_size=32, seed=1)))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(images, training=True))
    gradients = tape.gradient(loss, model.trainable_variables)
    for variable, gradient in zip(model.trainable_variables, gradients):
        assert gradient is not None, variable.path
        assert np.all(np.isfinite(gradient.numpy())), variable.path
        assert np.any(gradient.numpy() != 0), variable.path


def test_dfp16_short_fit_lowers_loss(dfp16_policy):
    keras.utils.set_random_seed(2)
    train_data = data_lib.make_dataset(None, "train", batch_size=32, seed=2, max_records=256)
    model = models.build_model("cifar_cnn")
    _compile(model)
    initial_weights = [variable.numpy().copy() for variable in model.trainable_variables]

    history = model.fit(train_data, epochs=3, shuffle=False, verbose=0)

    # Compare training-mode losses, because after so few steps the BatchNormalization
    # moving statistics are still far from the batch statistics and would dominate an
    # inference-mode loss.
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    for variable, initial in zip(model.trainable_variables, initial_weights):
        assert not np.array_equal(variable.numpy(), initial), variable.path


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "model_garden.train", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_cli_writes_summary_and_model(tmp_path):
    model_dir = tmp_path / "run"
    result = _run_cli(
        "--epochs=1", "--batch_size=32", "--max_train_records=128",
        "--max_test_records=64", "--seed=3", "--verbose=0", f"--model_dir={model_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cifar_cnn (dfp16): test accuracy" in result.stdout

    with open(model_dir / "summary.json", encoding="utf-8") as summary_file:
        summary = json.load(summary_file)
    assert summary["model"] == "cifar_cnn"
    assert summary["policy"] == "dfp16"
    assert summary["epochs"] == 1
    assert summary["seed"] == 3
    assert summary["train_samples"] == 128
    assert summary["test_samples"] == 64
    assert len(summary["seconds_per_epoch"]) == 1
    assert summary["mean_seconds_per_epoch"] > 0
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert np.isfinite(summary["test_loss"])
    assert summary["tensorflow_version"] == tf.__version__
    assert summary["keras_version"] == keras.__version__
    assert summary["keras_dfp_version"] == keras_dfp.__version__

    loaded = keras.models.load_model(model_dir / "cifar_cnn.keras")
    logits = loaded(np.zeros((2, 32, 32, 3), np.float32), training=False)
    assert logits.shape == (2, data_lib.NUM_CLASSES)
    assert isinstance(loaded.get_layer("logits").dtype_policy, keras_dfp.DFPPolicy)


def test_cli_rejects_batch_larger_than_data(tmp_path):
    result = _run_cli(
        "--batch_size=64", "--max_train_records=32", f"--model_dir={tmp_path / 'run'}"
    )
    assert result.returncode != 0
    assert "Expected at least --batch_size=64 training records" in result.stderr
    assert "Received: 32 records" in result.stderr


def test_cli_rejects_missing_data(tmp_path):
    missing = tmp_path / "no-such-dir"
    result = _run_cli(f"--data={missing}", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "Invalid --data" in result.stderr
    assert str(missing) in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture
def parse_train_flags():
    """Parse command lines with the flags of model_garden.train, then reset them."""
    from model_garden import train  # pylint: disable=import-outside-toplevel

    del train  # Imported only to define its flags.
    yield lambda argv: flags.FLAGS(["train", *argv])
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--learning_rate=-1", "--learning_rate must be a finite number > 0"),
        ("--learning_rate=nan", "--learning_rate must be a finite number > 0"),
        ("--epochs=0", "flag --epochs=0"),
        ("--batch_size=0", "flag --batch_size=0"),
        ("--policy=float16", "flag --policy=float16"),
        ("--model=resnet1000", "flag --model=resnet1000"),
    ],
)
def test_cli_rejects_bad_flags(parse_train_flags, flag, expected):
    with pytest.raises(flags.IllegalFlagValueError) as info:
        parse_train_flags([flag])
    assert expected in str(info.value)


def test_cli_flag_defaults(parse_train_flags):
    parse_train_flags([])
    assert flags.FLAGS.model == "cifar_cnn"
    assert flags.FLAGS.policy == "dfp16"
    assert flags.FLAGS.data == ""
