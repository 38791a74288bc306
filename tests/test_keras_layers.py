"""Tests that stock Keras layers run through the DFP16 ops under the policy."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dfp
from keras_dfp import DFPPolicy
from keras_dfp.layers import DFPConv2D
from keras_dfp.layers import DFPDense

SEED = 1234


@pytest.fixture(autouse=True)
def reset_global_policy():
    keras.utils.set_random_seed(SEED)
    yield
    keras.config.set_dtype_policy("float32")


def _images(shape=(2, 7, 7, 3)):
    return np.random.default_rng(SEED).standard_normal(shape).astype("float32")


def _read(variable):
    return tf.convert_to_tensor(variable)


def _copy_weights(source, target):
    target.set_weights(source.get_weights())


def _graph_op_types(concrete_function):
    """Return the op types of a concrete function, including nested functions."""
    graph_def = concrete_function.graph.as_graph_def()
    op_types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        op_types.update(node.op for node in function.node_def)
    return op_types


# --- forward and backward through the DFP16 ops -----------------------------


def test_conv2d_matches_ops():
    x = _images()
    layer = keras.layers.Conv2D(4, 3, strides=2, padding="same", dtype="dfp16")
    outputs = layer(x)
    expected = keras_dfp.ops.conv2d(x, _read(layer.kernel), strides=2, padding="SAME") + layer.bias
    np.testing.assert_array_equal(outputs.numpy(), expected.numpy())


def test_conv2d_dilated_matches_ops():
    x = _images((1, 9, 9, 2))
    layer = keras.layers.Conv2D(3, 3, dilation_rate=2, use_bias=False, dtype="dfp16")
    outputs = layer(x)
    expected = keras_dfp.ops.conv2d(x, _read(layer.kernel), padding="VALID", dilations=2)
    np.testing.assert_array_equal(outputs.numpy(), expected.numpy())


def test_conv2d_differs_from_float32():
    x = _images()
    dfp_layer = keras.layers.Conv2D(4, 3, dtype="dfp16")
    float_layer = keras.layers.Conv2D(4, 3, dtype="float32")
    dfp_outputs = dfp_layer(x)
    float_layer.build(x.shape)
    _copy_weights(dfp_layer, float_layer)
    float_outputs = float_layer(x)
    assert not np.array_equal(dfp_outputs.numpy(), float_outputs.numpy())
    np.testing.assert_allclose(dfp_outputs.numpy(), float_outputs.numpy(), atol=1e-3)


def test_dense_matches_ops():
    x = _images((5, 6))
    layer = keras.layers.Dense(4, activation="relu", dtype="dfp16")
    outputs = layer(x)
    expected = tf.nn.relu(keras_dfp.ops.matmul(x, _read(layer.kernel)) + layer.bias)
    np.testing.assert_array_equal(outputs.numpy(), expected.numpy())


def test_dense_differs_from_float32():
    x = _images((5, 6))
    dfp_layer = keras.layers.Dense(4, dtype="dfp16")
    float_layer = keras.layers.Dense(4, dtype="float32")
    dfp_outputs = dfp_layer(x)
    float_layer.build(x.shape)
    _copy_weights(dfp_layer, float_layer)
    float_outputs = float_layer(x)
    assert not np.array_equal(dfp_outputs.numpy(), float_outputs.numpy())
    np.testing.assert_allclose(dfp_outputs.numpy(), float_outputs.numpy(), atol=1e-3)


def test_dense_nd_input_reshaped():
    x = _images((2, 3, 4, 6))
    layer = keras.layers.Dense(5, use_bias=False, dtype="dfp16")
    outputs = layer(x)
    assert outputs.shape == (2, 3, 4, 5)
    expected = keras_dfp.ops.matmul(x.reshape(-1, 6), _read(layer.kernel))
    np.testing.assert_array_equal(outputs.numpy(), expected.numpy().reshape(2, 3, 4, 5))


def test_dense_nd_symbolic_shape():
    inputs = keras.Input((3, 6))
    outputs = keras.layers.Dense(5, dtype="dfp16")(inputs)
    assert outputs.shape == (None, 3, 5)


def test_conv2d_gradients_match_ops():
    x = tf.constant(_images())
    layer = keras.layers.Conv2D(4, 3, padding="same", dtype="dfp16")
    layer.build(x.shape)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        layer_loss = tf.reduce_sum(tf.square(layer(x)))
        ops_outputs = keras_dfp.ops.conv2d(x, _read(layer.kernel), padding="SAME") + layer.bias
        ops_loss = tf.reduce_sum(tf.square(ops_outputs))
    layer_grads = tape.gradient(layer_loss, [x, layer.kernel])
    ops_grads = tape.gradient(ops_loss, [x, layer.kernel])
    for layer_grad, ops_grad in zip(layer_grads, ops_grads):
        np.testing.assert_array_equal(layer_grad.numpy(), ops_grad.numpy())


def test_dense_gradients_match_ops():
    x = tf.constant(_images((4, 6)))
    layer = keras.layers.Dense(3, dtype="dfp16")
    layer.build(x.shape)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        layer_loss = tf.reduce_sum(tf.square(layer(x)))
        ops_loss = tf.reduce_sum(tf.square(keras_dfp.ops.matmul(x, _read(layer.kernel)) + layer.bias))
    layer_grads = tape.gradient(layer_loss, [x, layer.kernel])
    ops_grads = tape.gradient(ops_loss, [x, layer.kernel])
    for layer_grad, ops_grad in zip(layer_grads, ops_grads):
        np.testing.assert_array_equal(layer_grad.numpy(), ops_grad.numpy())


def _small_cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(4, 3, strides=2),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(5),
            keras.layers.Softmax(),
        ]
    )


def test_train_step_graph_has_dfp_ops():
    keras.config.set_dtype_policy("dfp16")
    model = _small_cnn()
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    x = tf.constant(_images((4, 8, 8, 3)))
    y = tf.constant([0, 1, 2, 3])
    op_types = _graph_op_types(train_step.get_concrete_function(x, y))
    for op_type in (
        "KerasDfp>Conv2D",
        "KerasDfp>Conv2DBackpropInput",
        "KerasDfp>Conv2DBackpropFilter",
        "KerasDfp>MatMul",
    ):
        assert op_type in op_types
    assert "Conv2D" not in op_types
    assert "MatMul" not in op_types


def test_fit_updates_weights():
    keras.config.set_dtype_policy("dfp16")
    model = _small_cnn()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(_images((8, 8, 8, 3)), np.arange(8) % 5, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights())]
    assert all(changed[:2])


def test_float_layers_stay_float32():
    keras.config.set_dtype_policy("dfp16")
    x = _images((2, 6, 6, 3))
    float_layers = {
        "batch_norm": (keras.layers.BatchNormalization(), keras.layers.BatchNormalization(dtype="float32")),
        "relu": (keras.layers.ReLU(), keras.layers.ReLU(dtype="float32")),
        "max_pool": (keras.layers.MaxPooling2D(), keras.layers.MaxPooling2D(dtype="float32")),
        "avg_pool": (keras.layers.GlobalAveragePooling2D(), keras.layers.GlobalAveragePooling2D(dtype="float32")),
        "softmax": (keras.layers.Softmax(), keras.layers.Softmax(dtype="float32")),
    }
    for name, (dfp_layer, float_layer) in float_layers.items():
        assert isinstance(dfp_layer.dtype_policy, DFPPolicy), name
        assert dfp_layer.compute_dtype == "float32", name
        dfp_outputs = dfp_layer(x, training=True)
        assert dfp_outputs.dtype == tf.float32, name
        np.testing.assert_array_equal(dfp_outputs.numpy(), float_layer(x, training=True).numpy(), err_msg=name)


def test_loss_stays_float32():
    keras.config.set_dtype_policy("dfp16")
    loss = keras.losses.SparseCategoricalCrossentropy()(np.array([1, 0]), np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(loss.numpy(), -(np.log(0.8) + np.log(0.6)) / 2, rtol=1e-6)


def test_layers_created_before_policy_keep_theirs():
    x = _images()
    float_layer = keras.layers.Conv2D(4, 3)
    keras.config.set_dtype_policy("dfp16")
    dfp_layer = keras.layers.Conv2D(4, 3)
    assert float_layer.dtype_policy == keras.DTypePolicy("float32")
    assert isinstance(dfp_layer.dtype_policy, DFPPolicy)

    float_outputs = float_layer(x)
    reference_layer = keras.layers.Conv2D(4, 3, dtype="float32")
    reference_layer.build(x.shape)
    _copy_weights(float_layer, reference_layer)
    np.testing.assert_array_equal(float_outputs.numpy(), reference_layer(x).numpy())


def test_explicit_dfp_layers_ignore_global_policy():
    x = _images()
    conv = DFPConv2D(4, 3)
    dense = DFPDense(2)
    assert keras.config.dtype_policy() == keras.DTypePolicy("float32")
    assert isinstance(conv.dtype_policy, DFPPolicy)
    assert isinstance(dense.dtype_policy, DFPPolicy)
    outputs = conv(x)
    expected = keras_dfp.ops.conv2d(x, _read(conv.kernel)) + conv.bias
    np.testing.assert_array_equal(outputs.numpy(), expected.numpy())


def test_explicit_dfp_layer_rejects_float_dtype():
    with pytest.raises(ValueError, match=r"Expected a 'dfp16' dtype policy for DFPDense\. Received: dtype='float32'"):
        DFPDense(2, dtype="float32")


def test_explicit_dfp_layer_config_round_trip():
    layer = DFPConv2D(4, 3, dtype="dfp16_stochastic_seed5")
    config = keras.saving.serialize_keras_object(layer)
    assert config["registered_name"] == "keras_dfp>DFPConv2D"
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is DFPConv2D
    assert restored.dtype_policy == DFPPolicy(rounding="stochastic", seed=5)


def test_stochastic_rounding_is_seeded():
    x = _images((3, 6))

    def outputs_for_seed(seed):
        keras.utils.set_random_seed(SEED)
        layer = keras.layers.Dense(
            4, use_bias=False, name="probe", dtype=DFPPolicy(rounding="stochastic", seed=seed)
        )
        return layer(x).numpy(), layer(x).numpy()

    first_call, second_call = outputs_for_seed(1)
    repeated_first, repeated_second = outputs_for_seed(1)
    other_seed_first, _ = outputs_for_seed(2)
    np.testing.assert_array_equal(first_call, repeated_first)
    np.testing.assert_array_equal(second_call, repeated_second)
    assert not np.array_equal(first_call, second_call)
    assert not np.array_equal(first_call, other_seed_first)


def test_stochastic_rounding_differs_from_nearest():
    x = _images((3, 6))
    stochastic = keras.layers.Dense(4, use_bias=False, dtype="dfp16_stochastic")
    nearest = keras.layers.Dense(4, use_bias=False, dtype="dfp16")
    stochastic_outputs = stochastic(x)
    nearest.build(x.shape)
    _copy_weights(stochastic, nearest)
    assert not np.array_equal(stochastic_outputs.numpy(), nearest(x).numpy())


# --- unsupported options ----------------------------------------------------


@pytest.mark.parametrize(
    "make_layer, input_shape, message",
    [
        (lambda: keras.layers.Conv3D(2, 3), (1, 4, 4, 4, 3), r"1-D or 2-D convolution.*\(Conv3D\).*rank=3"),
        (
            lambda: keras.layers.Conv2D(2, 3, data_format="channels_first"),
            (1, 3, 6, 6),
            r"channels_last.*Received: data_format='channels_first'",
        ),
        (lambda: keras.layers.EinsumDense("abc,acd->abd", output_shape=(None, 2)), (2, 3, 4), r"\(EinsumDense\).*equation='abc,acd->abd'"),
        (lambda: keras.layers.Dense(2, lora_rank=2), (2, 3), r"\(Dense\).*LoRA.*lora_rank=2"),
        (lambda: keras.layers.Conv2D(2, 3, lora_rank=2), (1, 6, 6, 3), r"\(Conv2D\).*LoRA.*lora_rank=2"),
    ],
)
def test_unsupported_option_rejected_at_build(make_layer, input_shape, message):
    keras.config.set_dtype_policy("dfp16")
    layer = make_layer()
    with pytest.raises(ValueError, match=message + r".*dtype='float32'"):
        layer.build(input_shape)
    assert not layer.built


def test_unsupported_layer_runs_as_float32():
    layer = keras.layers.Conv3D(2, 3, dtype="float32")
    keras.config.set_dtype_policy("dfp16")
    assert layer(_images((1, 4, 4, 4, 3))).shape == (1, 2, 2, 2, 2)


@pytest.mark.parametrize(
    "make_layer, input_shape, op_name",
    [
        (lambda: keras.layers.Conv1D(2, 3), (2, 8, 3), "KerasDfp>Conv2D"),
        (lambda: keras.layers.Conv2D(4, 3, groups=2), (1, 6, 6, 4), "KerasDfp>Conv2D"),
        (lambda: keras.layers.Conv2DTranspose(2, 3), (1, 6, 6, 3), "KerasDfp>Conv2DBackpropInput"),
        (lambda: keras.layers.DepthwiseConv2D(3), (1, 6, 6, 3), "KerasDfp>Conv2D"),
        (lambda: keras.layers.SeparableConv2D(2, 3), (1, 6, 6, 3), "KerasDfp>Conv2D"),
        (lambda: keras.layers.EinsumDense("ab,bc->ac", output_shape=2), (2, 3), "KerasDfp>MatMul"),
    ],
)
def test_conv_family_layer_builds_under_policy(make_layer, input_shape, op_name):
    keras.config.set_dtype_policy("dfp16")
    layer = make_layer()
    layer.build(input_shape)
    assert layer.built
    assert keras_dfp._integration.dfp_op_name(layer) == op_name


def test_lora_enabled_after_build_rejected():
    layer = keras.layers.Dense(2, dtype="dfp16")
    layer.build((2, 3))
    layer.enable_lora(1)
    with pytest.raises(ValueError, match=r"'dense\w*' \(Dense\).*LoRA is not supported.*lora_rank=1"):
        layer(_images((2, 3)))


def test_keras_quantization_rejected():
    layer = keras.layers.Dense(2, dtype="dfp16")
    layer.build((2, 3))
    with pytest.raises(ValueError, match=r"\(Dense\).*post-training quantization.*mode='int8'"):
        layer.quantize("int8")
    assert layer.quantization_mode is None


def test_nan_input_error_names_layer():
    layer = keras.layers.Conv2D(2, 3, name="stem_conv", dtype="dfp16")
    x = _images()
    x[0, 1, 2, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape("stem_conv (activation)")):
        layer(x)


def test_nan_in_model_predict_names_layer():
    keras.config.set_dtype_policy("dfp16")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="head")])
    x = np.ones((2, 4), "float32")
    x[1, 3] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape("head (activation)")):
        model.predict(x, verbose=0)


def test_nan_weight_error_names_layer():
    layer = keras.layers.Dense(3, name="classifier", dtype="dfp16")
    layer.build((2, 4))
    kernel = layer.kernel.numpy()
    kernel[0, 0] = np.nan
    layer.kernel.assign(kernel)
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape("classifier (weight)")):
        layer(np.ones((2, 4), "float32"))


def test_nan_gradient_error_names_layer():
    layer = keras.layers.Conv2D(2, 3, name="body_conv", dtype="dfp16")
    x = tf.constant(_images())
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = layer(x)
    upstream = np.ones(outputs.shape, "float32")
    upstream[0, 0, 0, 1] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape("body_conv (gradient)")):
        tape.gradient(outputs, x, output_gradients=tf.constant(upstream))


# --- XLA --------------------------------------------------------------------


def test_jit_compile_true_rejected():
    keras.config.set_dtype_policy("dfp16")
    model = _small_cnn()
    with pytest.raises(
        ValueError,
        match=r"layer 'conv2d\w*' runs KerasDfp>Conv2D, and KerasDfp>Conv2D has no XLA kernel\. "
        r"Received: jit_compile=True\. Use jit_compile=False or 'auto'",
    ):
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)


def test_jit_compile_setter_rejected():
    model = keras.Sequential([keras.Input((4,)), DFPDense(2)])
    model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    with pytest.raises(ValueError, match=r"KerasDfp>MatMul has no XLA kernel"):
        model.jit_compile = True


def _pretend_gpu_host(monkeypatch):
    # Keras' 'auto' picks XLA only when a non-CPU device exists.
    devices = tf.config.list_physical_devices() + [
        tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    ]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda device_type=None: devices)


def test_jit_compile_auto_avoids_xla_on_gpu_host(monkeypatch):
    _pretend_gpu_host(monkeypatch)
    float_model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    float_model.compile(optimizer="sgd", loss="mse")
    assert float_model.jit_compile is True

    dfp_model = keras.Sequential([keras.Input((4,)), DFPDense(2)])
    dfp_model.compile(optimizer="sgd", loss="mse")
    assert dfp_model.jit_compile is False


class LazyModel(keras.Model):
    """Subclassed model that creates its DFP16 layer only in `build`."""

    def build(self, input_shape):
        self.head = DFPDense(2)
        self.head.build(input_shape)

    def call(self, inputs):
        return self.head(inputs)


def test_jit_auto_rechecked_at_fit(monkeypatch):
    _pretend_gpu_host(monkeypatch)
    model = LazyModel()
    model.compile(optimizer="sgd", loss="mse")
    assert model.jit_compile is True
    model.build((None, 3))
    model.fit(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"), verbose=0)
    assert model.jit_compile is False


def test_jit_auto_lazy_layers_rejected_at_trace(monkeypatch):
    _pretend_gpu_host(monkeypatch)
    model = LazyModel()
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"layer 'dfp_dense\w*' runs KerasDfp>MatMul.*build a subclassed model"):
        model.fit(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"), verbose=0)


def test_user_xla_function_rejected():
    layer = DFPConv2D(2, 3, name="xla_conv")
    layer.build((1, 5, 5, 1))
    compiled = tf.function(layer, jit_compile=True)
    with pytest.raises(ValueError, match=r"layer 'xla_conv' runs KerasDfp>Conv2D, and KerasDfp>Conv2D has no XLA kernel"):
        compiled(tf.ones((1, 5, 5, 1)))


def test_jit_true_rechecked_at_fit():
    model = LazyModel()
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    with pytest.raises(ValueError, match=r"KerasDfp>MatMul has no XLA kernel.*Received: jit_compile=True"):
        model.fit(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"), verbose=0)


def test_jit_compile_auto_default_is_false_on_cpu():
    keras.config.set_dtype_policy("dfp16")
    model = _small_cnn()
    model.compile(optimizer="sgd", loss="mse")
    assert model.jit_compile is False
