"""DFP16 telemetry: exact statistics, recording in layers, TensorBoard and plots."""

import importlib.util
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dfp
from keras_dfp import ops
from keras_dfp import telemetry

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_plot_tool():
    path = os.path.join(REPO_ROOT, "tools", "plot_telemetry.py")
    spec = importlib.util.spec_from_file_location("plot_telemetry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def telemetry_off_after_test():
    previous = keras.config.dtype_policy()
    yield
    telemetry.disable()
    keras.config.set_dtype_policy(previous)


# With e = 0, |x| * 2**-e is x itself:
# - 32767.75, 32767.5 (a tie, even 32768) and -32767.5 round past 32767 and
#   saturate; 32767.0 does not.
# - 0.25 and 0.5 (a tie, even 0) are non-zero and get mantissa 0.
# - 0.0 is not counted as underflow.
_VALUES = [32767.75, 32767.5, -32767.5, 32767.0, 16384.0, 0.25, 0.5, 1.5, 0.0]
_SATURATED = 3 / 9
_UNDERFLOWED = 2 / 8


@pytest.mark.parametrize("scale_exponent", [0, -20, 30, -140])
def test_statistics_exact(scale_exponent):
    # Scaling by a power of two is exact (2**-140 makes the small values
    # subnormal), and it shifts the exponent only.
    x = tf.constant(np.ldexp(np.array(_VALUES, np.float32), scale_exponent))
    mantissa, exponent = ops.quantize(x)

    result = telemetry.tensor_statistics(x, mantissa, exponent)

    assert int(exponent) == scale_exponent
    assert int(result[0]) == scale_exponent
    assert float(result[1]) == np.float32(_SATURATED)
    assert float(result[2]) == np.float32(_UNDERFLOWED)
    np.testing.assert_array_equal(np.abs(mantissa.numpy()[:3]), [32767, 32767, 32767])


def test_statistics_of_zero_tensor():
    x = tf.zeros([4, 3])
    mantissa, exponent = ops.quantize(x)
    _, saturated, underflowed = telemetry.tensor_statistics(x, mantissa, exponent)
    assert float(saturated) == 0.0
    assert float(underflowed) == 0.0


def test_disabled_by_default_records_nothing():
    layer = keras.layers.Dense(2, dtype="dfp16")
    layer(tf.ones([3, 4]))
    model = keras.Sequential([keras.Input((4,)), layer])
    assert not telemetry.is_enabled()
    assert telemetry.collect(model) == {}


@pytest.mark.parametrize("use_function", [False, True], ids=["eager", "tf_function"])
def test_dense_records_forward_and_backward(use_function):
    telemetry.enable()
    layer = keras.layers.Dense(2, dtype="dfp16", name="probe", use_bias=False)
    inputs = tf.constant([[3.0, 0.0, 1.0, -2.0], [0.5, 1.0, 0.0, 1.0]])
    layer.build(inputs.shape)
    layer.kernel.assign([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [1e-9, 0.5]])
    output_gradient = tf.constant([[2.0**-30, 0.0], [0.0, 1.0]])

    def step():
        with tf.GradientTape() as tape:
            outputs = layer(inputs)
        return tape.gradient(outputs, layer.kernel, output_gradients=output_gradient)

    (tf.function(step) if use_function else step)()

    statistics = telemetry.collect(keras.Sequential([keras.Input((4,)), layer]))
    recorded = statistics["probe"]
    assert set(recorded) == {"activation", "weight", "gradient"}
    # ilogb(3) - 14 = -13, ilogb(2) - 14 = -13, ilogb(1) - 14 = -14.
    assert recorded["activation"]["exponent"] == -13
    assert recorded["weight"]["exponent"] == -13
    assert recorded["gradient"]["exponent"] == -14
    # 1e-9 * 2**13 rounds to 0: one of the 4 non-zero weights underflows.
    assert recorded["weight"]["underflow_fraction"] == 0.25
    # 2**-30 * 2**14 rounds to 0: one of the 2 non-zero gradients underflows.
    assert recorded["gradient"]["underflow_fraction"] == 0.5
    for kind in ("activation", "weight", "gradient"):
        assert recorded[kind]["saturated_fraction"] == 0.0, kind


def test_telemetry_leaves_outputs_unchanged():
    inputs = tf.constant(np.random.default_rng(3).normal(size=(2, 6, 6, 3)).astype(np.float32))
    results = []
    for enabled in (False, True):
        if enabled:
            telemetry.enable()
        keras.utils.set_random_seed(1)
        layer = keras.layers.SeparableConv2D(4, 3, dtype="dfp16", name="sep")
        results.append(layer(inputs).numpy())
    np.testing.assert_array_equal(results[0], results[1])
    statistics = telemetry.collect(keras.Sequential([keras.Input((6, 6, 3)), layer]))
    assert set(statistics) == {"sep/depthwise", "sep/pointwise"}


def _fit_with_callback(log_dir, every_n_steps):
    keras.config.set_dtype_policy("dfp16")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, name="head"),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 6, 6, 2)).astype(np.float32)
    y = rng.normal(size=(16, 2)).astype(np.float32)
    callback = telemetry.TensorBoardCallback(log_dir, every_n_steps=every_n_steps)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[callback])
    return model


def test_callback_writes_expected_tags(tmp_path):
    telemetry.enable()
    log_dir = str(tmp_path / "logs")
    _fit_with_callback(log_dir, every_n_steps=3)

    series = _load_plot_tool().read_scalars(log_dir)

    expected_ops = {"conv", "head"}
    for statistic in telemetry.STATISTICS:
        assert set(series[statistic]) == set(telemetry.KINDS), statistic
        for kind in telemetry.KINDS:
            assert set(series[statistic][kind]) == expected_ops, (statistic, kind)
            for op_name in expected_ops:
                steps = [step for step, _ in series[statistic][kind][op_name]]
                # 8 train batches in 2 epochs, written every 3rd.
                assert steps == [3, 6], (statistic, kind, op_name)
    assert telemetry.scalar_tag("conv", "gradient", "exponent") == "dfp16/conv/gradient/exponent"


def test_callback_computes_only_written_steps(tmp_path):
    telemetry.enable()
    model = _fit_with_callback(str(tmp_path / "logs"), every_n_steps=3)

    for op_name, ops in _op_telemetry(model).items():
        for kind in ("activation", "weight"):
            # 8 train batches in 2 epochs, written (and computed) every 3rd.
            assert int(ops.variables[kind]["updates"].numpy()) == 2, (op_name, kind)


def test_callback_continues_step_after_load(tmp_path):
    telemetry.enable()
    log_dir = str(tmp_path / "logs")
    model = _fit_with_callback(log_dir, every_n_steps=3)
    path = str(tmp_path / "model.keras")
    model.save(path)

    restored = keras.models.load_model(path)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(16, 6, 6, 2)).astype(np.float32)
    y = rng.normal(size=(16, 2)).astype(np.float32)
    callback = telemetry.TensorBoardCallback(log_dir, every_n_steps=3)
    restored.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[callback])

    series = _load_plot_tool().read_scalars(log_dir)
    steps = [step for step, _ in series["exponent"]["activation"]["conv"]]
    # Batches 1-8 before the save and 9-16 after it, written every 3rd.
    assert sorted(steps) == [3, 6, 9, 12, 15]


def _op_telemetry(model):
    found = {}
    for layer in model._flatten_layers():
        found.update(getattr(layer, "_keras_dfp_telemetry", {}))
    assert found, "no DFP16 telemetry recorded"
    return found


def test_callback_rejects_disabled_telemetry(tmp_path):
    with pytest.raises(ValueError, match=r"Received: keras_dfp.telemetry.is_enabled\(\)=False"):
        _fit_with_callback(str(tmp_path), every_n_steps=1)


@pytest.mark.parametrize("every_n_steps", [0, -1, 1.5, True])
def test_callback_rejects_invalid_interval(every_n_steps):
    with pytest.raises(ValueError, match=f"Received: every_n_steps={every_n_steps!r}"):
        telemetry.TensorBoardCallback("unused", every_n_steps=every_n_steps)


def test_plot_tool_writes_pngs(tmp_path):
    telemetry.enable()
    log_dir = str(tmp_path / "logs")
    output_dir = str(tmp_path / "plots")
    _fit_with_callback(log_dir, every_n_steps=1)

    assert _load_plot_tool().main([log_dir, "--output_dir", output_dir]) == 0

    for name in ("exponents.png", "saturation.png", "underflow.png"):
        path = os.path.join(output_dir, name)
        with open(path, "rb") as png:
            assert png.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_plot_tool_reports_missing_event_files(tmp_path):
    assert _load_plot_tool().main([str(tmp_path)]) == 1


def test_package_exports_telemetry():
    assert keras_dfp.telemetry is telemetry
