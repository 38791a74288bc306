"""Tests of `keras_dfp.export_for_serving`: stock-op SavedModels for TensorFlow Serving.

The exported models are loaded in a fresh Python process that never imports
keras_dfp, so the custom ops are not registered there, as in a TensorFlow
Serving binary.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dfp
from keras_dfp import export
from keras_dfp import ops
from keras_dfp import reference

SEED = 20180430
IMAGE_SHAPE = (8, 8, 3)
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")

# Measured fast-mode deviation for the trained test model is about 1.3e-4 of
# max|y| (docs/serving.md). The test allows 2**-10 of max|y| so that it fails
# on a real regression such as unquantized weights, not on noise.
FAST_RELATIVE_BOUND = 2.0**-10

# Runs in a fresh interpreter: loads both exports and the plain Keras export,
# checks the op registry, and writes the serving outputs next to the inputs.
_FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.framework import op_def_registry

    config = json.loads(sys.argv[1])
    result = {"outputs": {}, "unregistered": {}, "signatures": {}}
    x = np.load(config["inputs"])
    for mode in ("exact", "fast"):
        path = config[mode]
        signature = tf.saved_model.load(path).signatures["serving_default"]
        _, input_specs = signature.structured_input_signature
        result["signatures"][mode] = {
            "inputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in input_specs.items()},
            "outputs": {k: v.dtype.name for k, v in signature.structured_outputs.items()},
        }
        (input_name,) = input_specs
        (output,) = signature(**{input_name: tf.constant(x)}).values()
        np.save(config[mode + "_outputs"], output.numpy())
        result["unregistered"][mode] = [
            op for op in config[mode + "_ops"] if op_def_registry.get(op) is None
        ]
    try:
        tf.saved_model.load(config["keras_export"])
        result["keras_export_error"] = None
    except Exception as error:  # Report any failure to the parent test.
        result["keras_export_error"] = f"{type(error).__name__}: {error}"
    result["keras_dfp_imported"] = any(name.startswith("keras_dfp") for name in sys.modules)
    print(json.dumps(result))
    """
)


def _build_model():
    """Return the test model: conv, BN, ReLU, pool, depthwise, separable, grouped,
    transposed and dense layers."""
    keras.config.set_dtype_policy("dfp16")
    try:
        inputs = keras.Input(IMAGE_SHAPE, name="image")
        x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
        x = keras.layers.SeparableConv2D(8, 3, padding="same")(x)
        x = keras.layers.Conv2D(8, 3, padding="same", groups=2, activation="relu")(x)
        x = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same")(x)
        x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
        x = keras.layers.Flatten()(x)
        outputs = keras.layers.Dense(5, name="logits")(x)
        return keras.Model(inputs, outputs)
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Train the test model briefly, export it three ways and run the fresh process."""
    keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    model = _build_model()
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    train_x = rng.standard_normal((32, *IMAGE_SHAPE)).astype("float32")
    model.fit(train_x, rng.integers(0, 5, 32), epochs=2, batch_size=8, verbose=0)

    root = tmp_path_factory.mktemp("export")
    paths = {
        "exact": export.export_for_serving(model, root / "exact", mode="exact", version=1),
        "fast": export.export_for_serving(model, root / "fast", mode="fast", version=1),
        "keras_export": str(root / "keras_export"),
    }
    model.export(paths["keras_export"], verbose=False)

    inputs = 3 * rng.standard_normal((16, *IMAGE_SHAPE)).astype("float32")
    config = dict(paths, inputs=str(root / "inputs.npy"))
    np.save(config["inputs"], inputs)
    for mode in ("exact", "fast"):
        config[mode + "_outputs"] = str(root / f"{mode}_outputs.npy")
        config[mode + "_ops"] = export.list_saved_model_ops(paths[mode])
    completed = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS_SCRIPT, json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    fresh = json.loads(completed.stdout.strip().splitlines()[-1])
    return {
        "model": model,
        "root": root,
        "paths": paths,
        "config": config,
        "fresh": fresh,
        "inputs": inputs,
        "expected": model(inputs, training=False).numpy(),
    }


def test_exact_export_is_bit_identical(exported):
    served = np.load(exported["config"]["exact_outputs"])
    np.testing.assert_array_equal(served, exported["expected"])


def test_fast_export_within_bound(exported):
    served = np.load(exported["config"]["fast_outputs"])
    expected = exported["expected"]
    deviation = np.max(np.abs(served - expected))
    assert deviation <= FAST_RELATIVE_BOUND * np.max(np.abs(expected))
    # The fast mode skips activation quantization, so it must differ somewhere.
    assert deviation > 0


def test_fresh_process_never_imported_keras_dfp(exported):
    assert exported["fresh"]["keras_dfp_imported"] is False


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_export_ops_are_stock(exported, mode):
    op_types = exported["config"][mode + "_ops"]
    assert op_types
    assert not [op for op in op_types if op.startswith("KerasDfp")]
    assert exported["fresh"]["unregistered"][mode] == []


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_signature_is_float32(exported, mode):
    signature = exported["fresh"]["signatures"][mode]
    assert signature["inputs"] == {"image": ["float32", [None, *IMAGE_SHAPE]]}
    assert signature["outputs"] == {"logits": "float32"}


def test_exact_export_op_types(exported):
    op_types = set(exported["config"]["exact_ops"])
    assert {"Bitcast", "CheckNumerics", "Round", "Conv2D", "MatMul"} <= op_types
    assert "Conv2DBackpropInput" in op_types  # the transposed convolution


def test_plain_keras_export_needs_keras_dfp(exported):
    error = exported["fresh"]["keras_export_error"]
    assert error is not None
    assert "KerasDfp>" in error


def test_saved_model_cli_runs_exact_export(exported, tmp_path):
    # saved_model_cli accepts only Python literals here, so the input is a
    # nested list of multiples of 1/8, which float32 represents exactly.
    inputs = (np.arange(2 * 8 * 8 * 3) % 49 - 24).astype(np.float32) / 8
    inputs = inputs.reshape(2, *IMAGE_SHAPE)
    completed = subprocess.run(
        [
            SAVED_MODEL_CLI,
            "run",
            "--dir",
            exported["paths"]["exact"],
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--input_exprs",
            f"image={inputs.tolist()!r}",
            "--outdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    served = np.load(tmp_path / "logits.npy")
    expected = exported["model"](inputs, training=False).numpy()
    np.testing.assert_array_equal(served, expected)


def test_exact_export_rejects_nan_at_serving(exported):
    signature = tf.saved_model.load(exported["paths"]["exact"]).signatures["serving_default"]
    inputs = exported["inputs"][:2].copy()
    inputs[1, 2, 3, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        signature(image=tf.constant(inputs))


def test_exact_export_stores_int16_weights(exported):
    module = tf.saved_model.load(exported["paths"]["exact"])
    stored = {variable.name: variable for variable in module.dfp_weight_values}
    dense = exported["model"].get_layer("logits")
    mantissa, _ = ops.quantize(dense.kernel.value)
    np.testing.assert_array_equal(stored["logits_mantissa:0"].numpy(), mantissa.numpy())
    for variable in stored.values():
        assert variable.dtype == tf.int16


def test_export_version_directory(exported):
    assert exported["paths"]["exact"] == str(exported["root"] / "exact" / "1")
    assert os.path.isfile(os.path.join(exported["paths"]["exact"], "saved_model.pb"))


def test_export_rejects_existing_directory(exported):
    with pytest.raises(ValueError, match="Expected a new or empty export directory"):
        export.export_for_serving(exported["model"], exported["paths"]["exact"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "int8"}, r"Expected mode to be one of .* Received: mode='int8'"),
        ({"version": 0}, r"Expected version to be a positive int.*version=0"),
    ],
)
def test_export_rejects_bad_arguments(exported, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export.export_for_serving(exported["model"], tmp_path / "out", **kwargs)


def test_export_rejects_stochastic_rounding(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, dtype="dfp16_stochastic", name="noisy")(inputs)
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match=r"rounding='stochastic' in layer 'noisy'"):
        export.export_for_serving(model, tmp_path / "out")


def test_exact_export_rejects_long_reduction(tmp_path):
    inputs = keras.Input((export.MAX_EXACT_REDUCTION_LENGTH + 1,))
    outputs = keras.layers.Dense(1, dtype="dfp16", name="wide")(inputs)
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match=r"Received: 8388609 for op 'wide'"):
        export.export_for_serving(model, tmp_path / "out", mode="exact")


def test_exact_export_two_inputs_conv1d_einsum(tmp_path):
    keras.utils.set_random_seed(SEED)
    left = keras.Input((3, 4), name="left")
    right = keras.Input((6,), name="right")
    x = keras.layers.Conv1D(4, 2, padding="causal", dtype="dfp16")(left)
    x = keras.layers.EinsumDense("abc,cd->abd", output_shape=(3, 5), dtype="dfp16")(x)
    x = keras.layers.Flatten()(x)
    y = keras.layers.Dense(15, dtype="dfp16")(right)
    outputs = keras.layers.Add(name="sum")([x, y])
    model = keras.Model([left, right], outputs)

    path = export.export_for_serving(model, tmp_path / "out")
    signature = tf.saved_model.load(path).signatures["serving_default"]
    rng = np.random.default_rng(SEED)
    left_x = rng.standard_normal((4, 3, 4)).astype("float32")
    right_x = rng.standard_normal((4, 6)).astype("float32")
    served = signature(left=tf.constant(left_x), right=tf.constant(right_x))["sum"]
    expected = model([left_x, right_x], training=False)
    np.testing.assert_array_equal(served.numpy(), expected.numpy())


# Hard cases of the stock-op numerics: subnormals, ties, saturation, zeros.
_QUANTIZE_CASES = {
    "worked_example": [0.75, -3.0, 1.1],
    "saturation": [65535.0, -1.0, 3.0],
    "just_below_two": [2 - 2**-23, 1e-45, -1e-40],
    "subnormal_only": [1e-45, 3e-45, -2e-45, 1.1754942e-38],
    "ties": [2.5, 3.5, -2.5, 0.5, 1.5, 16384.0],
    "float32_max": [3.4028235e38, -1.0, 1e30],
    "signed_zeros": [-0.0, 0.0],
    "empty": [],
}


@pytest.mark.parametrize("values", _QUANTIZE_CASES.values(), ids=_QUANTIZE_CASES.keys())
def test_stock_quantize_matches_op(values):
    x = np.array(values, dtype=np.float32)
    expected_mantissa, expected_exponent = ops.quantize(x)
    quantize = tf.function(lambda t: export.quantize_with_stock_ops(t, "x"))
    mantissa, exponent = quantize(tf.constant(x))
    np.testing.assert_array_equal(mantissa.numpy(), expected_mantissa.numpy())
    assert int(exponent) == int(expected_exponent)


def test_stock_quantize_random_bit_patterns(rng):
    quantize = tf.function(lambda t: export.quantize_with_stock_ops(t, "x"))
    for _ in range(20):
        bits = rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32)
        x = bits.view(np.float32)
        x = x[np.isfinite(x)]
        expected_mantissa, expected_exponent = ops.quantize(x)
        mantissa, exponent = quantize(tf.constant(x))
        np.testing.assert_array_equal(mantissa.numpy(), expected_mantissa.numpy())
        assert int(exponent) == int(expected_exponent)


def test_stock_rounding_matches_reference(rng):
    to_float32 = tf.function(export.round_sums_to_float32)
    cases = [(0, -200), (-1, -150), (1, -150), (3, -150), (2**53, 100), (-(2**53), -326)]
    for _ in range(300):
        sums = int(rng.integers(-(2**53), 2**53)) >> int(rng.integers(0, 53))
        cases.append((sums, int(rng.integers(-326, 227))))
    for sums, exponent in cases:
        expected = reference.to_float32_scaled(np.array([sums], np.int64), exponent)
        result = to_float32(
            tf.constant([float(sums)], tf.float64), tf.constant(exponent, tf.int32)
        ).numpy()
        assert result.view(np.int32)[0] == expected.view(np.int32)[0], (sums, exponent)


def test_package_exports_functions():
    assert keras_dfp.export_for_serving is export.export_for_serving
    assert keras_dfp.list_saved_model_ops is export.list_saved_model_ops
