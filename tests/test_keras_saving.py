"""Tests of `.keras` saving and loading for models with DFP16 layers."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_dfp  # noqa: F401  (installs the Keras integration)
from keras_dfp import DFPPolicy
from keras_dfp.layers import DFPConv2D
from keras_dfp.layers import DFPDense

SEED = 4321
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "loaded without error" not in result.stdout
    assert "Cannot convert 'keras_dfp>dfp16'" in result.stdout
