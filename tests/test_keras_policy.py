"""Tests of the 'dfp16' dtype policy and the import-time environment checks."""

import copy
import os
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

import keras_dfp
from keras_dfp import _compat
from keras_dfp import DFPPolicy

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def reset_global_policy():
    yield
    keras.config.set_dtype_policy("float32")


def test_set_global_policy_string():
    keras.mixed_precision.set_global_policy("dfp16")
    policy = keras.mixed_precision.global_policy()
    assert isinstance(policy, DFPPolicy)
    assert policy.name == "dfp16"


def test_set_dtype_policy_string():
    keras.config.set_dtype_policy("dfp16")
    assert isinstance(keras.config.dtype_policy(), DFPPolicy)


def test_dtype_policy_constructor_string():
    policy = keras.DTypePolicy("dfp16")
    assert type(policy) is DFPPolicy
    assert policy.rounding == "nearest_even"


def test_float_dtype_policy_constructor_string():
    assert type(keras.dtype_policies.FloatDTypePolicy("dfp16")) is DFPPolicy


def test_dtype_policies_get_string():
    assert type(keras.dtype_policies.get("dfp16")) is DFPPolicy


def test_layer_dtype_string():
    layer = keras.layers.Dense(3, dtype="dfp16")
    assert isinstance(layer.dtype_policy, DFPPolicy)


def test_dfp_policy_default_name():
    policy = keras_dfp.DFPPolicy()
    assert policy.name == "dfp16"
    assert policy == keras.DTypePolicy("dfp16")


def test_unnamed_policy_follows_global():
    assert type(keras.DTypePolicy()) is keras.DTypePolicy
    keras.config.set_dtype_policy(DFPPolicy(rounding="stochastic", seed=7))
    policy = keras.DTypePolicy()
    assert type(policy) is DFPPolicy
    assert policy.rounding == "stochastic"
    assert policy.seed == 7


def test_float_policy_deepcopy_under_dfp_global():
    policy = keras.DTypePolicy("float32")
    keras.config.set_dtype_policy("dfp16")
    copied = copy.deepcopy(policy)
    assert type(copied) is keras.DTypePolicy
    assert copied.name == "float32"
    assert copy.deepcopy(DFPPolicy(rounding="stochastic", seed=4)) == DFPPolicy(
        rounding="stochastic", seed=4
    )


def test_global_policy_reaches_new_layers():
    keras.config.set_dtype_policy("dfp16")
    assert isinstance(keras.layers.Conv2D(2, 3).dtype_policy, DFPPolicy)
    assert isinstance(keras.layers.Dense(2).dtype_policy, DFPPolicy)


def test_float_policies_unchanged():
    keras.config.set_dtype_policy("dfp16")
    for name in ("float32", "mixed_bfloat16", "float16"):
        policy = keras.DTypePolicy(name)
        assert type(policy) is keras.DTypePolicy
        assert policy.name == name


def test_policy_dtypes():
    policy = DFPPolicy()
    assert policy.compute_dtype == "float32"
    assert policy.variable_dtype == "float32"
    assert policy.quantization_mode is None


def test_layer_under_policy_has_float32_variables():
    layer = keras.layers.Dense(3, dtype="dfp16")
    layer.build((2, 4))
    assert layer.compute_dtype == "float32"
    assert layer.quantization_mode is None
    assert all(v.dtype == "float32" for v in layer.weights)


def test_invalid_rounding_rejected():
    with pytest.raises(ValueError, match=r"rounding.*Received: rounding='down'"):
        DFPPolicy(rounding="down")


def test_invalid_seed_rejected():
    with pytest.raises(TypeError, match=r"Received: seed=1\.5"):
        DFPPolicy(rounding="stochastic", seed=1.5)


def test_invalid_name_rejected():
    with pytest.raises(ValueError, match=r"Expected a DFPPolicy name.*Received: name='float32'"):
        DFPPolicy("float32")


def test_conflicting_name_and_rounding_rejected():
    with pytest.raises(ValueError, match=r"match the policy name 'dfp16_stochastic'"):
        DFPPolicy("dfp16_stochastic", rounding="nearest_even")


def test_stochastic_policy_names():
    assert DFPPolicy(rounding="stochastic").name == "dfp16_stochastic"
    assert DFPPolicy(rounding="stochastic", seed=7).name == "dfp16_stochastic_seed7"
    policy = keras.DTypePolicy("dfp16_stochastic_seed-3")
    assert type(policy) is DFPPolicy
    assert policy.rounding == "stochastic"
    assert policy.seed == -3
    assert keras.DTypePolicy("dfp16_stochastic").seed == 0


def test_malformed_stochastic_name_rejected():
    with pytest.raises(ValueError, match=r"Cannot convert 'dfp16_stochastic_seedx'"):
        keras.DTypePolicy("dfp16_stochastic_seedx")


def test_policy_equality():
    assert DFPPolicy() == DFPPolicy("dfp16")
    assert DFPPolicy() != keras.DTypePolicy("float32")
    assert keras.DTypePolicy("float32") != DFPPolicy()
    assert DFPPolicy(rounding="stochastic", seed=1) != DFPPolicy(rounding="stochastic", seed=2)
    assert hash(DFPPolicy()) == hash(DFPPolicy("dfp16"))


def test_policy_serialization_round_trip():
    policy = DFPPolicy(rounding="stochastic", seed=11)
    config = keras.dtype_policies.serialize(policy)
    assert config["class_name"] == "DTypePolicy"
    assert config["config"] == {
        "name": "keras_dfp>dfp16_stochastic_seed11 (pip install keras-dfp, "
        "then import keras_dfp before loading)"
    }
    restored = keras.dtype_policies.deserialize(config)
    assert type(restored) is DFPPolicy
    assert restored == policy


def test_policy_deserializes_name_without_install_hint():
    # Files saved before the install hint existed store the name in this form.
    config = {
        "module": "keras",
        "class_name": "DTypePolicy",
        "config": {"name": "keras_dfp>dfp16_stochastic_seed11_skip"},
        "registered_name": None,
    }
    restored = keras.dtype_policies.deserialize(config)
    assert restored == DFPPolicy("dfp16_stochastic_seed11_skip")


def test_policy_registered_serialization_round_trip():
    policy = DFPPolicy(rounding="stochastic", seed=11)
    config = keras.saving.serialize_keras_object(policy)
    assert config["registered_name"] == "keras_dfp>DFPPolicy"
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is DFPPolicy
    assert restored == policy


def test_layer_config_round_trip():
    layer = keras.layers.Conv2D(2, 3, dtype=DFPPolicy(rounding="stochastic", seed=3))
    restored = keras.layers.Conv2D.from_config(layer.get_config())
    assert restored.dtype_policy == DFPPolicy(rounding="stochastic", seed=3)


def test_version_check_rejects_other_tensorflow(monkeypatch):
    monkeypatch.setattr(tf, "__version__", "2.20.1")
    with pytest.raises(
        ImportError,
        match=r"requires tensorflow 2\.21\.\*\. Received: tensorflow==2\.20\.1\. "
        r"Install the pinned versions.*make build",
    ):
        _compat.check_versions()


def test_version_check_rejects_other_keras(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.16.0")
    with pytest.raises(ImportError, match=r"requires keras 3\.15\.\*\. Received: keras==3\.16\.0"):
        _compat.check_versions()


def test_version_check_accepts_pinned_versions():
    assert tf.__version__.startswith("2.21.")
    assert keras.__version__.startswith("3.15.")
    _compat.check_versions()


def test_backend_check_rejects_jax(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(
        ImportError,
        match=r"requires the TensorFlow backend.*Received: keras\.backend\.backend\(\)='jax'"
        r".*KERAS_BACKEND=tensorflow",
    ):
        _compat.check_backend()


def test_backend_check_rejects_environment_variable(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    with pytest.raises(ImportError, match=r"Received: KERAS_BACKEND='torch'.*KERAS_BACKEND=tensorflow"):
        _compat.check_backend()


def test_import_with_jax_backend_fails_clearly():
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", "import keras_dfp"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "ImportError: keras-dfp requires the TensorFlow backend" in result.stderr
    assert "Received: KERAS_BACKEND='jax'" in result.stderr


def test_package_exports():
    assert keras_dfp.__version__ == "0.1.0"
    assert keras_dfp.DFPPolicy is DFPPolicy
    assert hasattr(keras_dfp.layers, "DFPConv2D")
    assert hasattr(keras_dfp.ops, "conv2d")
    assert hasattr(keras_dfp.reference, "quantize")
