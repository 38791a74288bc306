"""NaN and Inf in DFP16 layers: the default error and the "skip_step" mode."""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dfp
from keras_dfp import DFPPolicy


@pytest.fixture(autouse=True)
def reset_global_policy():
    previous = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(previous)


def _model(policy, optimizer="adam", run_eagerly=False):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same", name="conv", dtype=policy),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, name="head", dtype=policy),
        ]
    )
    model.compile(optimizer=optimizer, loss="mse", run_eagerly=run_eagerly)
    return model


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    y = rng.normal(size=(16, 3)).astype(np.float32)
    return x, y


def _state(model):
    """Return copies of every weight and optimizer variable, keyed by path."""
    variables = model.weights + model.optimizer.variables
    return {variable.path: variable.numpy().copy() for variable in variables}


# Default mode: NaN and Inf raise, naming the layer and the tensor.


def test_default_raises_on_activation():
    model = _model("dfp16")
    x, _ = _data()
    x[2, 3, 4, 1] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"conv \(activation\)"):
        model.predict(x, verbose=0)


def test_default_raises_on_weight():
    model = _model("dfp16")
    x, _ = _data()
    kernel = model.get_layer("head").kernel
    kernel.assign(np.where(np.eye(4, 3) > 0, np.inf, kernel.numpy()).astype(np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"head \(weight\)"):
        model.predict(x, verbose=0)


def test_default_raises_on_gradient():
    model = _model("dfp16")
    x, y = _data()
    y[5, 1] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"head \(gradient\)"):
        model.fit(x, y, batch_size=16, verbose=0)


# Policy names and validation.


@pytest.mark.parametrize(
    "name, rounding, seed, nonfinite",
    [
        ("dfp16", "nearest_even", 0, "raise"),
        ("dfp16_skip", "nearest_even", 0, "skip_step"),
        ("dfp16_stochastic", "stochastic", 0, "raise"),
        ("dfp16_stochastic_skip", "stochastic", 0, "skip_step"),
        ("dfp16_stochastic_seed7", "stochastic", 7, "raise"),
        ("dfp16_stochastic_seed-7_skip", "stochastic", -7, "skip_step"),
    ],
)
def test_policy_name_encodes_nonfinite(name, rounding, seed, nonfinite):
    policy = keras.DTypePolicy(name)
    assert type(policy) is DFPPolicy
    assert policy.name == name
    assert policy.rounding == rounding
    assert policy.seed == seed
    assert policy.nonfinite == nonfinite
    assert DFPPolicy(rounding=rounding, seed=seed, nonfinite=nonfinite) == policy


def test_policy_nonfinite_argument_sets_name():
    assert DFPPolicy(nonfinite="skip_step").name == "dfp16_skip"
    assert DFPPolicy("dfp16", nonfinite="skip_step").name == "dfp16_skip"
    assert DFPPolicy().nonfinite == "raise"


def test_policy_rejects_unknown_nonfinite():
    with pytest.raises(ValueError, match=re.escape("Received: nonfinite='ignore'")):
        DFPPolicy(nonfinite="ignore")


def test_policy_rejects_nonfinite_name_mismatch():
    with pytest.raises(ValueError, match=r"match the policy name 'dfp16_skip'"):
        DFPPolicy("dfp16_skip", nonfinite="raise")


@pytest.mark.parametrize("name", ["dfp16_skip_skip", "dfp16_skip_stochastic", "dfp16skip"])
def test_policy_rejects_malformed_skip_name(name):
    with pytest.raises(ValueError, match=re.escape(name)):
        keras.DTypePolicy(name)


def test_unnamed_policy_inherits_global_nonfinite():
    keras.config.set_dtype_policy("dfp16_stochastic_seed3_skip")
    policy = DFPPolicy()
    assert policy.nonfinite == "skip_step"
    assert policy.seed == 3


# Skip mode: a step with a NaN or Inf changes nothing and is counted.


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["tf_function", "eager"])
@pytest.mark.parametrize("bad_tensor", ["labels", "inputs"])
def test_skip_mode_leaves_state_identical(bad_tensor, run_eagerly):
    model = _model("dfp16_skip", run_eagerly=run_eagerly)
    x, y = _data()
    model.fit(x, y, batch_size=16, verbose=0)
    before = _state(model)

    bad_x, bad_y = x.copy(), y.copy()
    if bad_tensor == "labels":
        bad_y[3, 2] = np.nan
    else:
        bad_x[1, 2, 3, 0] = np.inf
    model.fit(bad_x, bad_y, batch_size=16, verbose=0)

    after = _state(model)
    assert after.keys() == before.keys()
    for path, value in before.items():
        assert np.array_equal(after[path], value), path
    assert keras_dfp.skipped_steps(model) == 1


def test_skip_mode_trains_after_skipped_step():
    model = _model("dfp16_skip")
    x, y = _data()
    bad_y = y.copy()
    bad_y[0, 0] = np.nan
    model.fit(x, bad_y, batch_size=16, verbose=0)
    before = _state(model)

    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)

    assert np.isfinite(history.history["loss"]).all()
    assert int(model.optimizer.iterations.numpy()) == 4
    assert keras_dfp.skipped_steps(model) == 1
    kernel_path = model.get_layer("conv").kernel.path
    assert not np.array_equal(model.get_layer("conv").kernel.numpy(), before[kernel_path])
    for variable in model.weights:
        assert np.isfinite(variable.numpy()).all(), variable.path


def test_skip_mode_counts_each_bad_batch():
    model = _model("dfp16_skip", optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    x, y = _data()
    y[[1, 12], 0] = np.nan
    model.fit(x, y, batch_size=4, verbose=0)
    assert keras_dfp.skipped_steps(model) == 2
    assert int(model.optimizer.iterations.numpy()) == 2


def test_raise_mode_has_no_skip_counter():
    model = _model("dfp16")
    x, y = _data()
    model.fit(x, y, batch_size=16, verbose=0)
    assert keras_dfp.skipped_steps(model) == 0


def test_float32_model_is_not_skipped():
    # Stock Keras behavior stays: a NaN gradient reaches the weights.
    model = _model("float32", optimizer="sgd")
    x, y = _data()
    y[0, 0] = np.nan
    model.fit(x, y, batch_size=16, verbose=0)
    assert np.isnan(model.get_layer("head").kernel.numpy()).any()
    assert keras_dfp.skipped_steps(model) == 0


def test_skipped_steps_rejects_uncompiled_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(TypeError, match=r"Received: model_or_optimizer of type Sequential"):
        keras_dfp.skipped_steps(model)


def test_skip_mode_custom_training_loop():
    policy = DFPPolicy(nonfinite="skip_step")
    layer = keras.layers.Dense(2, dtype=policy)
    layer.build((None, 4))
    optimizer = keras.optimizers.Adam()
    inputs = tf.constant(np.arange(8, dtype=np.float32).reshape(2, 4))

    @tf.function
    def train_step(targets):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((layer(inputs) - targets) ** 2)
        grads = tape.gradient(loss, layer.trainable_variables)
        optimizer.apply(grads, layer.trainable_variables)

    train_step(tf.constant([[np.nan, 0.0], [0.0, 0.0]], tf.float32))
    assert keras_dfp.skipped_steps(optimizer) == 1
    assert int(optimizer.iterations.numpy()) == 0
    assert all(np.isfinite(v.numpy()).all() for v in optimizer.variables)

    kernel_before = layer.kernel.numpy().copy()
    train_step(tf.zeros([2, 2], tf.float32))
    assert int(optimizer.iterations.numpy()) == 1
    assert not np.array_equal(layer.kernel.numpy(), kernel_before)


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (keras.layers.Conv2D(4, 3, groups=2), (2, 6, 6, 4)),
        (keras.layers.Conv2DTranspose(3, 3, strides=2), (2, 4, 4, 2)),
        (keras.layers.DepthwiseConv2D(3), (2, 6, 6, 3)),
        (keras.layers.SeparableConv2D(4, 3), (2, 6, 6, 3)),
        (keras.layers.Conv1D(3, 2), (2, 5, 3)),
        (keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 3)), (2, 4, 5)),
        (keras.layers.Dense(3), (2, 4, 5)),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, keras.layers.Layer) else None,
)
def test_skip_mode_layers_return_nan(layer, input_shape):
    config = layer.get_config()
    config["dtype"] = "dfp16_skip"
    layer = layer.from_config(config)
    assert layer.dtype_policy.nonfinite == "skip_step"
    rng = np.random.default_rng(4)
    inputs = rng.normal(size=input_shape).astype(np.float32)
    layer.build(inputs.shape)

    finite_outputs = layer(inputs).numpy()
    assert np.isfinite(finite_outputs).all()

    inputs.flat[3] = np.nan
    inputs = tf.constant(inputs)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = layer(inputs)
        loss = tf.reduce_sum(outputs)
    assert np.isnan(outputs.numpy()).all()
    # The bias gradient is the float32 sum of the output gradient, which is
    # finite here, so only the gradients of the DFP16 op are checked.
    kernels = [v for v in layer.trainable_variables if "kernel" in v.path]
    gradients = tape.gradient(loss, [inputs, *kernels])
    for source, gradient in zip(["inputs", *kernels], gradients):
        assert np.isnan(tf.convert_to_tensor(gradient).numpy()).all(), source


def test_skip_mode_nan_gradient_poisons_inputs_gradient():
    layer = keras.layers.Dense(2, dtype="dfp16_skip")
    inputs = tf.ones([3, 4])
    layer.build(inputs.shape)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = layer(inputs)
    output_gradient = tf.constant([[np.inf, 0.0], [0.0, 0.0], [0.0, 0.0]], tf.float32)
    input_gradient, kernel_gradient = tape.gradient(
        outputs, [inputs, layer.kernel], output_gradients=output_gradient
    )
    assert np.isnan(input_gradient.numpy()).all()
    assert np.isnan(kernel_gradient.numpy()).all()


def test_skip_mode_survives_keras_round_trip(tmp_path):
    model = _model(DFPPolicy(rounding="stochastic", seed=5, nonfinite="skip_step"))
    path = os.path.join(tmp_path, "skip.keras")
    model.save(path)

    restored = keras.models.load_model(path)

    for name in ("conv", "head"):
        policy = restored.get_layer(name).dtype_policy
        assert isinstance(policy, DFPPolicy), name
        assert policy.name == "dfp16_stochastic_seed5_skip"
        assert policy.nonfinite == "skip_step"
    x, y = _data()
    y[0, 0] = np.nan
    before = _state(restored)
    restored.fit(x, y, batch_size=16, verbose=0)
    for path_, value in before.items():
        assert np.array_equal(_state(restored)[path_], value), path_
    assert keras_dfp.skipped_steps(restored) == 1
