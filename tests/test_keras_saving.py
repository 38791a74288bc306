"""Tests of `.keras` saving and loading for models with DFP16 layers."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dfp  # noqa: F401  (installs the Keras integration)
from keras_dfp import DFPPolicy
from keras_dfp.layers import DFPConv2D
from keras_dfp.layers import DFPDense

SEED = 4321
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Guards against a hung interpreter only. A fresh TensorFlow import can take
# minutes on a loaded machine.
SUBPROCESS_TIMEOUT_SECONDS = 300


@pytest.fixture(autouse=True)
def reset_global_policy():
    keras.utils.set_random_seed(SEED)
    yield
    keras.config.set_dtype_policy("float32")


def _images(count=6):
    return np.random.default_rng(SEED).standard_normal((count, 8, 8, 3)).astype("float32")


def _global_policy_model():
    keras.config.set_dtype_policy("dfp16")
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    keras.config.set_dtype_policy("float32")
    return model


def _explicit_layer_model():
    inputs = keras.Input((8, 8, 3))
    x = DFPConv2D(4, 3, strides=2)(inputs)
    x = keras.layers.Flatten()(x)
    outputs = DFPDense(3)(x)
    return keras.Model(inputs, outputs)


def _train_briefly(model):
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(_images(), np.arange(6) % 3, epochs=1, batch_size=3, verbose=0)


def test_global_policy_model_round_trip(tmp_path):
    model = _global_policy_model()
    _train_briefly(model)
    path = str(tmp_path / "model.keras")
    model.save(path)

    restored = keras.models.load_model(path)
    for layer in restored.layers:
        assert isinstance(layer.dtype_policy, DFPPolicy), layer.name
    x = _images(4)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), restored.predict(x, verbose=0)
    )


def test_explicit_layer_model_round_trip(tmp_path):
    model = _explicit_layer_model()
    _train_briefly(model)
    path = str(tmp_path / "model.keras")
    model.save(path)

    restored = keras.models.load_model(path)
    conv, dense = restored.layers[1], restored.layers[3]
    assert type(conv) is DFPConv2D
    assert type(dense) is DFPDense
    assert conv.dtype_policy == DFPPolicy()
    assert dense.dtype_policy == DFPPolicy()
    x = _images(4)
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), restored.predict(x, verbose=0)
    )


def test_stochastic_policy_round_trip(tmp_path):
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, dtype="dfp16_stochastic_seed9")]
    )
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.layers[0].dtype_policy == DFPPolicy(rounding="stochastic", seed=9)
    np.testing.assert_array_equal(
        model.layers[0].get_weights()[0], restored.layers[0].get_weights()[0]
    )


def test_round_trip_differs_from_float32_model(tmp_path):
    model = _global_policy_model()
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)

    float_model = keras.models.clone_model(model)
    for layer in float_model.layers:
        layer.dtype_policy = "float32"
    float_model.set_weights(model.get_weights())
    x = _images(4)
    assert not np.array_equal(
        restored.predict(x, verbose=0), float_model.predict(x, verbose=0)
    )


def _subprocess_env():
    """Return an environment in which Python finds keras_dfp only through sys.path edits."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    return env


def test_load_without_keras_dfp_names_package(tmp_path):
    path = str(tmp_path / "model.keras")
    _global_policy_model().save(path)
    script = textwrap.dedent(
        f"""
        import sys
        import keras
        try:
            keras.models.load_model({path!r})
        except Exception as error:
            assert "keras_dfp" not in sys.modules, "keras_dfp was imported"
            print(type(error).__name__)
            print(error)
        else:
            print("loaded without error")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env=_subprocess_env(),
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "loaded without error" not in result.stdout
    assert "Cannot convert 'keras_dfp>dfp16 (" in result.stdout
    assert "pip install keras-dfp, then import keras_dfp before loading" in result.stdout


# Loads the two SavedModels and prints one JSON line: the outputs, or the error.
_SAVED_MODEL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    if sys.argv[1] == "import":
        sys.path.insert(0, sys.argv[2])
        import keras_dfp
    x = tf.constant(np.load("images.npy"))
    result = {}
    for name in ("exported", "saved"):
        try:
            loaded = tf.saved_model.load(name)
        except Exception as error:  # Report any failure to the parent test.
            result[name] = f"{type(error).__name__}: {error}"
            continue
        signature = loaded.signatures["serving_default"]
        (output,) = signature(**{list(signature.structured_input_signature[1])[0]: x}).values()
        np.save(name + "_outputs.npy", output.numpy())
        result[name] = "served"
    result["keras_dfp_imported"] = "keras_dfp" in sys.modules
    print(json.dumps(result))
    """
)


def test_saved_model_needs_keras_dfp_ops(tmp_path):
    """Load `model.export` and `tf.saved_model.save` outputs with and without keras_dfp.

    Without keras_dfp, TensorFlow fails inside `tf.saved_model.load` on the
    first unregistered op, before any code of the SavedModel runs, so the
    message can only name the op: "Op type not registered 'KerasDfp>...'".
    """
    model = _global_policy_model()
    model.export(str(tmp_path / "exported"), verbose=False)
    tf.saved_model.save(model, str(tmp_path / "saved"))
    np.save(tmp_path / "images.npy", _images(4))
    expected = model.predict(_images(4), verbose=0)

    results = {}
    for mode in ("no_import", "import"):
        completed = subprocess.run(
            [sys.executable, "-c", _SAVED_MODEL_SCRIPT, mode, REPO_ROOT],
            capture_output=True,
            text=True,
            cwd=str(tmp_path),
            env=_subprocess_env(),
            timeout=SUBPROCESS_TIMEOUT_SECONDS,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        results[mode] = json.loads(completed.stdout.strip().split("\n")[-1])

    assert results["no_import"]["keras_dfp_imported"] is False
    for name in ("exported", "saved"):
        error = results["no_import"][name]
        assert error.startswith("RuntimeError: Op type not registered 'KerasDfp>"), error
    assert results["import"]["keras_dfp_imported"] is True
    for name in ("exported", "saved"):
        assert results["import"][name] == "served"
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}_outputs.npy"), expected)
