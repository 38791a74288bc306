"""Training tests: a short dfp16 fit on the embedded sample, and the training CLI."""

import json
import logging
import os
import re
import shutil
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


def _assert_one_line_error(result):
    """Check that a rejected run exited with status 2 and printed no help and no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # Phrases of the module docstring and of the --data help, which app.UsageError prints.
    assert "Usage (from the repository root)" not in result.stderr
    assert "Training and test data:" not in result.stderr


def test_cli_rejects_batch_larger_than_data(tmp_path):
    result = _run_cli(
        "--policy=float32", "--batch_size=64", "--max_train_records=32",
        f"--model_dir={tmp_path / 'run'}",
    )
    _assert_one_line_error(result)
    assert re.search(
        r"Expected at least --batch_size=64 training records\. "
        r"Received: train_records=32\. Lower --batch_size",
        result.stderr,
    )
    assert not (tmp_path / "run").exists()


def test_cli_rejects_missing_data(tmp_path):
    missing = tmp_path / "no-such-dir"
    result = _run_cli("--policy=float32", f"--data={missing}", f"--model_dir={tmp_path / 'run'}")
    _assert_one_line_error(result)
    assert re.search(
        r"Invalid --data: Expected at least one train TFRecord file\. "
        + re.escape(f"Received: data={str(missing)!r}"),
        result.stderr,
    )
    assert not (tmp_path / "run").exists()


def _write_garbage_jpeg_shard(path, num_records):
    """Write tf.train.Examples whose image/encoded bytes are not an image."""
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[b"not a jpeg" * 8])
        ),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[3])),
    }))
    with tf.io.TFRecordWriter(str(path)) as writer:
        for _ in range(num_records):
            writer.write(example.SerializeToString())


def _make_bad_data(kind, directory):
    """Fill `directory` with test-* sample shards and one broken train-* file of `kind`."""
    directory.mkdir()
    sample_test = os.path.join(data_lib.SAMPLE_DIR, "test-00000-of-00001.tfrecord")
    shutil.copy(sample_test, directory / "test-00000-of-00001.tfrecord")
    sample_train = os.path.join(data_lib.SAMPLE_DIR, "train-00000-of-00001.tfrecord")
    if kind == "truncated":
        with open(sample_train, "rb") as source:
            (directory / "train-00000-of-00001.tfrecord").write_bytes(source.read(100_000))
    elif kind == "text":
        (directory / "train-x").write_text("hi\n", encoding="utf-8")
    elif kind == "garbage_jpeg":
        _write_garbage_jpeg_shard(directory / "train-00000-of-00001.tfrecord", 32)


@pytest.mark.parametrize(
    "kind, expected",
    [
        (
            "truncated",
            r"Invalid --data: Expected complete TFRecord files\. Received: "
            r"file='[^']*/train-00000-of-00001\.tfrecord' \(matched by '[^']*/train-\*'\), "
            r"where reading failed after 90 records: truncated record",
        ),
        (
            "text",
            r"Invalid --data: Expected TFRecord files that contain tf\.train\.Example records\. "
            r"Received: pattern='[^']*/train-\*', which matches 1 file\(s\) that contain "
            r"no readable TFRecord records",
        ),
        (
            "garbage_jpeg",
            r"Invalid --data: Expected readable tf\.train\.Example records\. "
            r"Received: pattern='[^']*/train-\*', where a record failed to read or decode: "
            r"Unknown image file format",
        ),
    ],
)
def test_cli_rejects_unreadable_data(tmp_path, kind, expected):
    data_dir = tmp_path / "data"
    _make_bad_data(kind, data_dir)
    result = _run_cli(
        "--policy=float32", f"--data={data_dir}", "--epochs=1", "--batch_size=32",
        "--max_test_records=64", "--verbose=0", f"--model_dir={tmp_path / 'run'}",
    )
    _assert_one_line_error(result)
    assert re.search(expected, result.stderr), result.stderr[-3000:]
    assert re.search(r"Regenerate the shards, or copy them again", result.stderr)


def test_cli_rejects_unwritable_model_dir():
    result = _run_cli(
        "--policy=float32", "--max_train_records=64", "--max_test_records=64",
        "--model_dir=/dev/null/x",
    )
    _assert_one_line_error(result)
    assert re.search(
        r"Expected --model_dir to be a directory that can be created and written\. "
        r"Received: --model_dir='/dev/null/x', which failed with NotADirectoryError: .*"
        r"Pass a writable directory path",
        result.stderr,
    )


@pytest.fixture
def train_module():
    from model_garden import train  # pylint: disable=import-outside-toplevel

    return train


def test_model_dir_rejects_file_path(train_module, tmp_path):
    regular_file = tmp_path / "file"
    regular_file.write_text("", encoding="utf-8")
    model_dir = str(regular_file / "run")
    with pytest.raises(
        train_module.RunError,
        match=re.escape(f"Received: --model_dir={model_dir!r}, which failed with "),
    ):
        train_module._prepare_model_dir(  # pylint: disable=protected-access
            model_dir, os.path.join(model_dir, "m.keras"), os.path.join(model_dir, "s.json")
        )


def test_model_dir_warns_before_replacing(train_module, tmp_path, caplog):
    model_path = tmp_path / "cifar_cnn.keras"
    summary_path = tmp_path / "summary.json"
    model_path.write_bytes(b"")
    summary_path.write_text("{}", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        train_module._prepare_model_dir(  # pylint: disable=protected-access
            str(tmp_path), str(model_path), str(summary_path)
        )
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert re.search(
        re.escape(f"already contains {model_path} and {summary_path} from an earlier run")
        + r"; this run replaces them",
        warnings[0],
    )


def test_model_dir_new_directory_no_warning(train_module, tmp_path, caplog):
    model_dir = tmp_path / "new" / "run"
    with caplog.at_level(logging.WARNING):
        train_module._prepare_model_dir(  # pylint: disable=protected-access
            str(model_dir), str(model_dir / "m.keras"), str(model_dir / "summary.json")
        )
    assert model_dir.is_dir()
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


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


@pytest.mark.parametrize("value", ["-1", "4294967296"])
def test_cli_rejects_seed_out_of_range(parse_train_flags, value):
    with pytest.raises(
        flags.IllegalFlagValueError,
        match=rf"flag --seed={value}: {value} is not an integer in the range \[0, 4294967295\]",
    ):
        parse_train_flags([f"--seed={value}"])


@pytest.mark.parametrize("value", ["0", "4294967295"])
def test_cli_accepts_seed_bounds(parse_train_flags, value):
    parse_train_flags([f"--seed={value}"])
    assert flags.FLAGS.seed == int(value)


def test_cli_seed_help_states_range(parse_train_flags):
    parse_train_flags([])
    assert re.search(r"from 0 to 2\*\*32 - 1", flags.FLAGS["seed"].help)
    assert re.search(
        r"--seed: (?:.*\n){1,4}.*\(an integer in the range \[0, 4294967295\]\)",
        flags.FLAGS.get_help(),
    )


def test_cli_flag_defaults(parse_train_flags):
    parse_train_flags([])
    assert flags.FLAGS.model == "cifar_cnn"
    assert flags.FLAGS.policy == "dfp16"
    assert flags.FLAGS.data == ""
