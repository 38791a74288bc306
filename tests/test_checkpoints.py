"""Tests of checkpoints and resumed training for models with DFP16 layers.

Resume tests compare against an uninterrupted run with the same seed, with
np.array_equal: under nearest-even rounding every DFP16 op is deterministic,
stochastic rounding draws from per-layer seed generators whose state the
checkpoints store, and the float32 ops of these small models
(BatchNormalization, pooling, Adam) give the same result for the same inputs
on one CPU. The tests do not call `enable_op_determinism`, because it would
stay on for later tests in the same process and change Keras'
jit_compile="auto" choice.

Every format (`.keras`, `.weights.h5`, ModelCheckpoint, BackupAndRestore,
`tf.train.Checkpoint`) stores weights, optimizer state, the
stochastic-rounding generator states and the skipped-step count. `.keras`
files also store the policy. Stochastic rounding streams also depend on layer
names, so a resumed model must use the same layer names as the saved one.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dfp
from keras_dfp import DFPPolicy

SEED = 2468
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(REPO_ROOT, "tests", "training_job.py")
SUBPROCESS_TIMEOUT_SECONDS = 300
EPOCHS = 4
RESUME_EPOCH = 2
# Nearest-even rounding, stochastic rounding, and stochastic rounding that
# skips the NaN batch of every epoch (`_data`), which also saves a nonzero
# skipped-step count.
POLICIES = ["dfp16", "dfp16_stochastic_seed11", "dfp16_stochastic_seed11_skip"]
STOCHASTIC_POLICIES = POLICIES[1:]
SKIP_POLICY = POLICIES[2]


@pytest.fixture(autouse=True)
def reset_global_policy():
    yield
    keras.config.set_dtype_policy("float32")


def _data(policy="dfp16"):
    """Return 16 images and labels. Under a skip policy, batch 1 contains a NaN."""
    rng = np.random.default_rng(SEED)
    images = rng.standard_normal((16, 8, 8, 3)).astype("float32")
    if DFPPolicy(policy).nonfinite == "skip_step":
        images[5, 2, 3, 1] = np.nan
    return images, np.arange(16) % 3


def _model(policy="dfp16", init_seed=SEED):
    # Fixed layer names, because the stochastic rounding stream of a layer
    # depends on its name, and this process builds several models.
    keras.utils.set_random_seed(init_seed)
    keras.config.set_dtype_policy(policy)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(
        inputs
    )
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, name="dense")(x)
    model = keras.Model(inputs, outputs, name="classifier")
    keras.config.set_dtype_policy("float32")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _policy_name(model):
    return model.get_layer("conv").dtype_policy.name


def _fit(model, epochs, initial_epoch=0, callbacks=()):
    images, labels = _data(_policy_name(model))
    model.fit(
        images,
        labels,
        batch_size=4,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        callbacks=list(callbacks),
        verbose=0,
    )


def _uninterrupted(policy="dfp16"):
    model = _model(policy)
    _fit(model, EPOCHS)
    return model


def _rounding_state(model, layer_name="conv"):
    return model.get_layer(layer_name)._dfp_seed_generator.state.numpy()


def _assert_same_state(expected, actual):
    """Assert equal variables, optimizer variables and skipped-step counts."""
    assert len(expected.variables) == len(actual.variables)
    for want, got in zip(expected.variables, actual.variables):
        np.testing.assert_array_equal(want.numpy(), got.numpy(), err_msg=want.path)
    for want, got in zip(expected.optimizer.variables, actual.optimizer.variables):
        np.testing.assert_array_equal(want.numpy(), got.numpy(), err_msg=want.path)
    assert keras_dfp.skipped_steps(actual) == keras_dfp.skipped_steps(expected)


def _assert_resumed_run(policy, restored):
    """Finish a resumed run and compare it with an uninterrupted one."""
    _fit(restored, EPOCHS, initial_epoch=RESUME_EPOCH)
    expected = _uninterrupted(policy)
    _assert_same_state(expected, restored)
    if policy == SKIP_POLICY:
        assert keras_dfp.skipped_steps(restored) == EPOCHS


@pytest.mark.parametrize("policy", POLICIES)
def test_keras_file_resume_bit_identical(tmp_path, policy):
    model = _model(policy)
    _fit(model, RESUME_EPOCH)
    path = str(tmp_path / "model.keras")
    model.save(path)

    restored = keras.models.load_model(path)
    assert restored.get_layer("conv").dtype_policy == DFPPolicy(policy)
    _assert_same_state(model, restored)
    _assert_resumed_run(policy, restored)


@pytest.mark.parametrize("policy", STOCHASTIC_POLICIES)
def test_keras_file_keeps_rounding_state(tmp_path, policy):
    model = _model(policy)
    fresh_state = _rounding_state(model)
    _fit(model, 1)
    path = str(tmp_path / "model.keras")
    model.save(path)

    restored = keras.models.load_model(path)
    assert not np.array_equal(_rounding_state(model), fresh_state)
    for layer_name in ("conv", "dense"):
        np.testing.assert_array_equal(
            _rounding_state(restored, layer_name), _rounding_state(model, layer_name)
        )


def test_skipped_steps_survive_keras_file(tmp_path):
    model = _model(SKIP_POLICY)
    _fit(model, 3)
    assert keras_dfp.skipped_steps(model) == 3
    path = str(tmp_path / "model.keras")
    model.save(path)

    assert keras_dfp.skipped_steps(keras.models.load_model(path)) == 3


def test_file_without_rounding_state_restarts_stream(tmp_path, caplog):
    policy = STOCHASTIC_POLICIES[0]
    model = _model(policy)
    _fit(model, 1)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    # The layout of a file written before keras_dfp stored its state.
    with h5py.File(path, "a") as weights:
        for layer_name in ("conv2d", "dense"):
            del weights[f"layers/{layer_name}/_keras_dfp_state"]

    restored = _model(policy)
    fresh_state = _rounding_state(restored)
    restored.load_weights(path)

    np.testing.assert_array_equal(_rounding_state(restored), fresh_state)
    assert "Found no saved seed_generator_state for layer 'conv'" in caplog.text


@pytest.mark.parametrize("policy", STOCHASTIC_POLICIES)
def test_tf_checkpoint_resume_bit_identical(tmp_path, policy):
    model = _model(policy)
    _fit(model, RESUME_EPOCH)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=2)
    manager.save()

    # A model with other initial weights, so that only the restore can make it equal.
    restored = _model(policy, init_seed=SEED + 1)
    restored.optimizer.build(restored.trainable_variables)
    restored_checkpoint = tf.train.Checkpoint(
        model=restored, optimizer=restored.optimizer
    )
    status = restored_checkpoint.restore(manager.latest_checkpoint)
    status.assert_existing_objects_matched()
    np.testing.assert_array_equal(_rounding_state(restored), _rounding_state(model))
    _assert_same_state(model, restored)
    _assert_resumed_run(policy, restored)


@pytest.mark.parametrize("policy", POLICIES)
def test_model_checkpoint_resume_bit_identical(tmp_path, policy):
    pattern = str(tmp_path / "epoch{epoch}.keras")
    model = _model(policy)
    _fit(model, RESUME_EPOCH, callbacks=[keras.callbacks.ModelCheckpoint(pattern)])

    restored = keras.models.load_model(pattern.format(epoch=RESUME_EPOCH))
    _assert_resumed_run(policy, restored)


class _Interrupt(keras.callbacks.Callback):
    """Raise RuntimeError at the start of one epoch, as a crash would."""

    def __init__(self, epoch):
        super().__init__()
        self._epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self._epoch:
            raise RuntimeError("interrupted on purpose")


@pytest.mark.parametrize("policy", POLICIES)
def test_backup_and_restore_resume_bit_identical(tmp_path, policy):
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    model = _model(policy)
    with pytest.raises(RuntimeError, match="interrupted on purpose"):
        _fit(model, EPOCHS, callbacks=[backup, _Interrupt(RESUME_EPOCH)])

    restored = _model(policy, init_seed=SEED + 1)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    _fit(restored, EPOCHS, callbacks=[backup])
    expected = _uninterrupted(policy)
    _assert_same_state(expected, restored)
    if policy == SKIP_POLICY:
        assert keras_dfp.skipped_steps(restored) == EPOCHS


def _h5_datasets(path):
    """Return {dataset path: array} of an .h5 file or of the weights in a .keras file."""
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            data = archive.read("model.weights.h5")
        path = path + ".weights.h5"
        with open(path, "wb") as extracted:
            extracted.write(data)
    datasets = {}

    def collect(name, item):
        if isinstance(item, h5py.Dataset):
            datasets[name] = item[()]

    with h5py.File(path, "r") as weights:
        weights.visititems(collect)
    return datasets


def _assert_same_datasets(first, second):
    assert first.keys() == second.keys()
    for name, value in first.items():
        np.testing.assert_array_equal(value, second[name], err_msg=name)


def test_keras_file_save_load_twice_is_stable(tmp_path):
    model = _model(SKIP_POLICY)
    _fit(model, 1)
    first = str(tmp_path / "first.keras")
    second = str(tmp_path / "second.keras")
    model.save(first)
    loaded_once = keras.models.load_model(first)
    loaded_once.save(second)
    loaded_twice = keras.models.load_model(second)

    assert loaded_twice.get_config() == loaded_once.get_config()
    _assert_same_state(model, loaded_twice)
    datasets = _h5_datasets(first)
    assert "layers/conv2d/_keras_dfp_state/vars/seed_generator_state" in datasets
    assert "optimizer/_keras_dfp_state/vars/skipped_steps" in datasets
    _assert_same_datasets(datasets, _h5_datasets(second))


def test_weights_file_save_load_twice_is_stable(tmp_path):
    model = _model(SKIP_POLICY)
    _fit(model, 1)
    first = str(tmp_path / "first.weights.h5")
    second = str(tmp_path / "second.weights.h5")
    model.save_weights(first)
    restored = _model(SKIP_POLICY, init_seed=SEED + 1)
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(first)
    restored.save_weights(second)

    _assert_same_state(model, restored)
    _assert_same_datasets(_h5_datasets(first), _h5_datasets(second))


def test_tf_checkpoint_save_restore_twice_is_stable(tmp_path):
    model = _model(SKIP_POLICY)
    _fit(model, 1)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path / "first")
    )
    restored = _model(SKIP_POLICY, init_seed=SEED + 1)
    restored.optimizer.build(restored.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=restored, optimizer=restored.optimizer)
    checkpoint.restore(path).assert_existing_objects_matched()
    second = checkpoint.save(str(tmp_path / "second"))

    first_values = dict(tf.train.list_variables(path))
    assert first_values.keys() == dict(tf.train.list_variables(second)).keys()
    dfp_names = [name for name in first_values if "_keras_dfp_state" in name]
    # Two rounding generator states and the skipped-step count.
    assert len(dfp_names) == 3, dfp_names
    for name in first_values:
        if name.startswith("save_counter") or name == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        np.testing.assert_array_equal(
            tf.train.load_variable(path, name), tf.train.load_variable(second, name)
        )
    assert keras_dfp.skipped_steps(restored) == 1


def _run_python(script, cwd):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=str(cwd),
        env=env,
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
        check=False,
    )


@pytest.fixture
def saved_formats(tmp_path):
    """Save one trained model in every format and return the paths and predictions.

    The model rounds stochastically and skipped one step, so the predictions
    match only if a format restores the rounding generator states.
    """
    model = _model(SKIP_POLICY)
    _fit(
        model,
        1,
        callbacks=[
            keras.callbacks.ModelCheckpoint(str(tmp_path / "callback.keras")),
            keras.callbacks.BackupAndRestore(
                str(tmp_path / "backup"), delete_checkpoint=False
            ),
        ],
    )
    model.save(str(tmp_path / "model.keras"))
    tf.train.Checkpoint(model=model).write(str(tmp_path / "tf_checkpoint"))
    np.save(tmp_path / "images.npy", _data()[0][:4])
    np.save(tmp_path / "expected.npy", model.predict(_data()[0][:4], verbose=0))
    return tmp_path


def test_formats_load_before_any_layer_is_built(saved_formats):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {REPO_ROOT!r})
        import numpy as np
        import keras
        import tensorflow as tf
        import keras_dfp

        directory = {str(saved_formats)!r}
        images = np.load(directory + "/images.npy")
        expected = np.load(directory + "/expected.npy")
        for name in ("model.keras", "callback.keras"):
            model = keras.models.load_model(directory + "/" + name)
            np.testing.assert_array_equal(model.predict(images, verbose=0), expected)
            assert keras_dfp.skipped_steps(model) == 1, name
            print("loaded", name)

        # Weights-only formats need the architecture: rebuild it from the config.
        model = keras.models.load_model(directory + "/model.keras")
        for name in ("weights", "checkpoint"):
            fresh = keras.Model.from_config(model.get_config())
            if name == "weights":
                fresh.load_weights(directory + "/backup/latest.weights.h5")
            else:
                tf.train.Checkpoint(model=fresh).read(
                    directory + "/tf_checkpoint").assert_existing_objects_matched()
            np.testing.assert_array_equal(fresh.predict(images, verbose=0), expected)
            print("loaded", name)
        """
    )
    result = _run_python(script, saved_formats)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n").count("loaded model.keras") == 1
    assert "loaded checkpoint" in result.stdout


def test_keras_file_without_keras_dfp_names_package(saved_formats):
    script = textwrap.dedent(
        f"""
        import sys
        import keras
        for name in ("model.keras", "callback.keras"):
            try:
                keras.models.load_model({str(saved_formats)!r} + "/" + name)
            except ValueError as error:
                print(name, "ValueError", error)
            else:
                print(name, "loaded")

        # Weights-only files store no policy, so they load into a float32 model.
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        float_model = keras.Model(inputs, keras.layers.Dense(3, name="dense")(x))
        float_model.load_weights({str(saved_formats)!r} + "/backup/latest.weights.h5")
        assert "keras_dfp" not in sys.modules
        """
    )
    result = _run_python(script, saved_formats)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().split("\n")
    # Two lines, one per .keras file: the weights-only load printed nothing.
    assert len(lines) == 2, result.stdout
    for line in lines:
        # Keras' own message quotes the stored policy name, which carries the
        # install hint: "Cannot convert 'keras_dfp>dfp16_stochastic_seed11_skip
        # (pip install keras-dfp, then import keras_dfp before loading)' to a
        # mixed precision DTypePolicy".
        assert "ValueError" in line, line
        assert f"Cannot convert 'keras_dfp>{SKIP_POLICY} (" in line, line
        assert "pip install keras-dfp, then import keras_dfp" in line, line


def _read_until(process, marker, deadline):
    """Return the output lines of `process` up to the line `marker`."""
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.strip() == marker:
            return lines
    raise AssertionError(f"{marker} not seen before the deadline. Output: {lines[-20:]}")


def _start_job(args, output):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = REPO_ROOT
    return subprocess.Popen(
        [sys.executable, JOB, "--output", str(output), "--epochs", "4", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_sigkill_mid_epoch_resumes_from_backup(tmp_path):
    """Kill a job with SIGKILL mid-epoch, restart it, and compare with an uninterrupted job.

    "epoch" backups resume at the start of the interrupted epoch, so the
    result is bit-identical. Step backups (save_freq=4 of 8 steps per epoch)
    store the weights after step 4 of epoch 2, but Keras 3.15
    BackupAndRestore restores only the epoch number, so the resumed job runs
    epoch 2 again from its first batch: 4 extra steps, 36 instead of 32.
    """
    processes = []
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_SECONDS
    try:
        reference = _start_job([], tmp_path / "reference.npz")
        killed = {}
        for mode, pause in (("epoch", "2:5"), ("4", "2:5")):
            backup_dir = tmp_path / f"backup_{mode}"
            args = ["--backup_dir", str(backup_dir), "--save_freq", mode]
            process = _start_job(args + ["--pause_at", pause], tmp_path / "unused.npz")
            processes.append(process)
            killed[mode] = (process, args)
        processes.append(reference)

        for mode, (process, _) in killed.items():
            _read_until(process, "PAUSED", deadline)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            assert process.returncode == -signal.SIGKILL
            metadata = json.loads(
                (tmp_path / f"backup_{mode}" / "training_metadata.json").read_text()
            )
            assert metadata["epoch"] == 2, metadata

        resumed = {}
        for mode, (_, args) in killed.items():
            process = _start_job(args, tmp_path / f"resumed_{mode}.npz")
            processes.append(process)
            resumed[mode] = process
        outputs = {
            mode: process.communicate(timeout=max(1, deadline - time.monotonic()))[0]
            for mode, process in resumed.items()
        }
        reference.communicate(timeout=max(1, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    for mode, output in outputs.items():
        assert resumed[mode].returncode == 0, output[-2000:]
        epochs = [line for line in output.split("\n") if line.startswith("EPOCH")]
        assert epochs == ["EPOCH 2", "EPOCH 3"], (mode, epochs)

    expected = np.load(tmp_path / "reference.npz")
    from_epoch = np.load(tmp_path / "resumed_epoch.npz")
    from_step = np.load(tmp_path / "resumed_4.npz")
    assert int(expected["iterations"]) == 32
    for key in expected.files:
        np.testing.assert_array_equal(expected[key], from_epoch[key])
    assert int(from_step["iterations"]) == 36


def _run_cli(*args, cwd):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = REPO_ROOT
    return subprocess.run(
        [sys.executable, "-m", "model_garden.train", *args],
        capture_output=True,
        text=True,
        cwd=str(cwd),
        env=env,
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
        check=False,
    )


def test_cli_backup_requires_resume(tmp_path):
    model_dir = tmp_path / "run"
    (model_dir / "backup").mkdir(parents=True)
    common = ["--policy=float32", "--epochs=1", "--batch_size=32",
              "--max_train_records=32", "--max_test_records=32", "--verbose=0",
              f"--model_dir={model_dir}"]

    rejected = _run_cli(*common, cwd=REPO_ROOT)
    assert rejected.returncode == 2, rejected.stderr[-3000:]
    assert "Expected no backup in --model_dir without --resume" in rejected.stderr
    assert "Pass --resume" in rejected.stderr

    # An empty backup directory has no weights, so the resumed run starts at
    # epoch 0, and BackupAndRestore deletes the backup when training ends.
    resumed = _run_cli(*common, "--resume", cwd=REPO_ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["strategy"] == "none"
    assert len(summary["seconds_per_epoch"]) == 1
    assert not (model_dir / "backup").exists()
