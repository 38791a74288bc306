"""Failed steps, second-order gradients and stochastic-rounding seeds under dfp16."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dfp


@pytest.fixture(autouse=True)
def dfp16_global_policy():
    previous = keras.config.dtype_policy()
    keras.mixed_precision.set_global_policy("dfp16")
    yield
    keras.mixed_precision.set_global_policy(previous)


def _small_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_nan_gradient_step_changes_no_weight():
    model = _small_model()
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
    before = [variable.numpy().copy() for variable in model.weights]

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"dense.*\(gradient\)"):
        model.fit(x, np.full((16, 3), np.nan, np.float32), batch_size=16, verbose=0)

    for old, variable in zip(before, model.weights):
        np.testing.assert_array_equal(variable.numpy(), old, err_msg=variable.path)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_training_continues_after_failed_step():
    model = _small_model()
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype(np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError):
        model.fit(x, np.full((16, 3), np.inf, np.float32), batch_size=16, verbose=0)

    history = model.fit(x, np.zeros((16, 3), np.float32), batch_size=16, verbose=0)

    assert np.isfinite(history.history["loss"][0])
    for variable in model.weights:
        assert np.isfinite(variable.numpy()).all(), variable.path


@pytest.mark.parametrize("use_function", [False, True], ids=["eager", "tf_function"])
@pytest.mark.parametrize("layer_kind", ["dense", "conv2d"])
def test_second_order_gradient_raises(layer_kind, use_function):
    if layer_kind == "dense":
        layer = keras.layers.Dense(3, name="penalized")
        inputs = tf.ones([2, 4])
    else:
        layer = keras.layers.Conv2D(2, 3, name="penalized")
        inputs = tf.ones([1, 5, 5, 1])
    layer.build(inputs.shape)

    def gradient_penalty_gradient():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(inputs)
                loss = tf.reduce_sum(layer(inputs) ** 2)
            penalty = tf.reduce_sum(inner.gradient(loss, inputs) ** 2)
        return outer.gradient(penalty, layer.kernel)

    run = tf.function(gradient_penalty_gradient) if use_function else gradient_penalty_gradient
    with pytest.raises(NotImplementedError, match=r"Second-order gradients .*'penalized'"):
        run()


def test_first_order_gradient_still_works():
    layer = keras.layers.Dense(3)
    inputs = tf.ones([2, 4])
    layer.build(inputs.shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(inputs))
    kernel_gradient = tape.gradient(loss, layer.kernel)
    np.testing.assert_array_equal(kernel_gradient.numpy(), np.full((4, 3), 2.0, np.float32))


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**64])
def test_policy_rejects_seed_outside_int64(seed):
    with pytest.raises(ValueError, match=re.escape(f"Received: seed={seed}")):
        keras_dfp.DFPPolicy(rounding="stochastic", seed=seed)


@pytest.mark.parametrize(
    "name",
    [
        "dfp16_stochastic_seed 3",
        "dfp16_stochastic_seed+3",
        "dfp16_stochastic_seed007",
        "dfp16_stochastic_seed99999999999999999999999",
    ],
)
def test_policy_rejects_noncanonical_seed_name(name):
    with pytest.raises(ValueError, match=re.escape(name)):
        keras.DTypePolicy(name)


def test_stochastic_seeds_give_different_rounding():
    inputs = tf.constant(
        np.random.default_rng(2).normal(size=(4, 64)).astype(np.float32)
    )
    outputs = {}
    for seed in (0, 1, 2**32, 2**62, -(2**63)):
        policy = keras_dfp.DFPPolicy(rounding="stochastic", seed=seed)
        layer = keras.layers.Dense(
            32, dtype=policy, name="same_name", kernel_initializer="glorot_uniform"
        )
        layer.build(inputs.shape)
        layer.kernel.assign(np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32))
        outputs[seed] = layer(inputs).numpy()

    seeds = list(outputs)
    for i, first in enumerate(seeds):
        for second in seeds[i + 1 :]:
            assert not np.array_equal(outputs[first], outputs[second]), (first, second)


def test_stochastic_seed_reproduces_output():
    inputs = tf.constant(np.linspace(-3, 3, 4 * 16, dtype=np.float32).reshape(4, 16))
    results = []
    for _ in range(2):
        policy = keras_dfp.DFPPolicy(rounding="stochastic", seed=2**40 + 5)
        layer = keras.layers.Dense(8, dtype=policy, name="repeatable")
        layer.build(inputs.shape)
        layer.kernel.assign(np.linspace(-1, 1, 16 * 8, dtype=np.float32).reshape(16, 8))
        results.append(layer(inputs).numpy())
    np.testing.assert_array_equal(results[0], results[1])
