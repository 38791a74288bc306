"""Tests for Conv1D, grouped Conv2D, depthwise, separable and transposed
convolutions and EinsumDense under the dfp16 policy.

Forward outputs are compared bit for bit with `keras_dfp.reference`.
Gradients are compared with the stock Keras layer in float64 (see
`_dfp_error_bound` for the tolerance).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dfp
from keras_dfp import reference

SEED = 4321

# Float ops that must not appear in a DFP16 layer's train step.
FLOAT_CONV_AND_MATMUL_OPS = {
    "Conv2D",
    "Conv2DBackpropInput",
    "Conv2DBackpropFilter",
    "Conv3D",
    "DepthwiseConv2dNative",
    "DepthwiseConv2dNativeBackpropInput",
    "DepthwiseConv2dNativeBackpropFilter",
    "MatMul",
    "BatchMatMulV2",
    "BatchMatMulV3",
    "Einsum",
}
DFP_CONV_OPS = {"KerasDfp>Conv2D", "KerasDfp>Conv2DBackpropInput", "KerasDfp>Conv2DBackpropFilter"}
DFP_MATMUL_OPS = {"KerasDfp>MatMul"}


@pytest.fixture(autouse=True)
def reset_global_policy():
    keras.utils.set_random_seed(SEED)
    yield
    keras.config.set_dtype_policy("float32")


def _inputs(shape, seed=SEED):
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _weights(layer):
    return [np.asarray(w) for w in layer.get_weights()]


def _add_bias(outputs, layer):
    return outputs + np.asarray(layer.bias) if layer.bias is not None else outputs


# --- NumPy reference pipelines ----------------------------------------------


def _reference_grouped_conv(x, kernel, groups, strides, padding, dilations=1):
    """Quantize x and kernel once, then run the int64 reference per group."""
    x_m, x_e = reference.quantize(x)
    w_m, w_e = reference.quantize(kernel)
    outputs = [
        reference.conv2d(x_g, x_e, w_g, w_e, strides, padding, dilations)
        for x_g, w_g in zip(np.split(x_m, groups, axis=-1), np.split(w_m, groups, axis=-1))
    ]
    return np.concatenate(outputs, axis=-1)


def _reference_depthwise(x, kernel, strides, padding, dilations=1):
    kernel_h, kernel_w, channels, multiplier = kernel.shape
    grouped = kernel.reshape(kernel_h, kernel_w, 1, channels * multiplier)
    return _reference_grouped_conv(x, grouped, channels, strides, padding, dilations)


# --- forward: exact equality with keras_dfp.reference -----------------------


@pytest.mark.parametrize(
    "padding, strides, dilation",
    [("causal", 1, 2), ("same", 2, 1), ("valid", 1, 3)],
)
def test_conv1d_forward_matches_reference(padding, strides, dilation):
    x = _inputs((2, 11, 3))
    layer = keras.layers.Conv1D(4, 3, strides=strides, padding=padding, dilation_rate=dilation, dtype="dfp16")
    outputs = layer(x).numpy()
    kernel = _weights(layer)[0]

    x_2d = x
    ref_padding = padding.upper()
    if padding == "causal":
        x_2d = np.pad(x, ((0, 0), (dilation * 2, 0), (0, 0)))
        ref_padding = "VALID"
    expected = _reference_grouped_conv(
        x_2d[:, None], kernel[None], 1, (1, strides), ref_padding, (1, dilation)
    )[:, 0]
    np.testing.assert_array_equal(outputs, _add_bias(expected, layer))


def test_conv1d_grouped_forward_matches_reference():
    x = _inputs((2, 9, 4))
    layer = keras.layers.Conv1D(6, 3, groups=2, padding="same", dtype="dfp16")
    outputs = layer(x).numpy()
    expected = _reference_grouped_conv(x[:, None], _weights(layer)[0][None], 2, 1, "SAME")[:, 0]
    np.testing.assert_array_equal(outputs, _add_bias(expected, layer))


@pytest.mark.parametrize(
    "groups, strides, padding, dilation",
    [(2, 2, "same", 1), (3, 1, "valid", 2), (6, 1, "same", 1)],
)
def test_grouped_conv2d_forward_matches_reference(groups, strides, padding, dilation):
    x = _inputs((2, 9, 9, 6))
    layer = keras.layers.Conv2D(
        12, 3, groups=groups, strides=strides, padding=padding, dilation_rate=dilation, dtype="dfp16"
    )
    outputs = layer(x).numpy()
    expected = _reference_grouped_conv(x, _weights(layer)[0], groups, strides, padding.upper(), dilation)
    np.testing.assert_array_equal(outputs, _add_bias(expected, layer))


def test_grouped_conv2d_shares_one_exponent():
    # Group 1's inputs are 2**-10 times smaller, so a per-group exponent would
    # keep more of their bits than the shared per-tensor exponent does.
    x = _inputs((1, 6, 6, 4))
    x[..., 2:] *= 2.0**-10
    layer = keras.layers.Conv2D(2, 3, groups=2, use_bias=False, dtype="dfp16")
    outputs = layer(x).numpy()
    kernel = _weights(layer)[0]
    np.testing.assert_array_equal(outputs, _reference_grouped_conv(x, kernel, 2, 1, "VALID"))
    per_group = _reference_grouped_conv(x[..., 2:], kernel[..., 1:], 1, 1, "VALID")
    assert not np.array_equal(outputs[..., 1:], per_group)


@pytest.mark.parametrize(
    "multiplier, strides, padding, dilation",
    [(1, 1, "same", 1), (2, 2, "valid", 1), (3, 1, "same", 2), (1, 2, "valid", 2)],
)
def test_depthwise_conv2d_forward_matches_reference(multiplier, strides, padding, dilation):
    x = _inputs((2, 8, 8, 3))
    layer = keras.layers.DepthwiseConv2D(
        3, depth_multiplier=multiplier, strides=strides, padding=padding, dilation_rate=dilation, dtype="dfp16"
    )
    outputs = layer(x).numpy()
    expected = _reference_depthwise(x, _weights(layer)[0], strides, padding.upper(), dilation)
    np.testing.assert_array_equal(outputs, _add_bias(expected, layer))


def test_depthwise_conv1d_forward_matches_reference():
    x = _inputs((2, 10, 3))
    layer = keras.layers.DepthwiseConv1D(3, depth_multiplier=2, padding="same", dtype="dfp16")
    outputs = layer(x).numpy()
    expected = _reference_depthwise(x[:, None], _weights(layer)[0][None], 1, "SAME")[:, 0]
    np.testing.assert_array_equal(outputs, _add_bias(expected, layer))


@pytest.mark.parametrize("strides, padding", [(1, "same"), (2, "valid")])
def test_separable_conv2d_forward_matches_reference(strides, padding):
    x = _inputs((2, 8, 8, 3))
    layer = keras.layers.SeparableConv2D(5, 3, depth_multiplier=2, strides=strides, padding=padding, dtype="dfp16")
    outputs = layer(x).numpy()
    depthwise_kernel, pointwise_kernel = _weights(layer)[:2]

    # The depthwise output is a float32 tensor that the pointwise convolution
    # quantizes again with its own exponent.
    depthwise = _reference_depthwise(x, depthwise_kernel, strides, padding.upper())
    expected = _reference_grouped_conv(depthwise, pointwise_kernel, 1, 1, "VALID")
    np.testing.assert_array_equal(outputs, _add_bias(expected, layer))


def _reference_conv_transpose(x, kernel, output_shape, strides, padding):
    x_m, x_e = reference.quantize(x)
    w_m, w_e = reference.quantize(kernel)
    return reference.conv2d_backprop_input(output_shape, w_m, w_e, x_m, x_e, strides, padding)


@pytest.mark.parametrize(
    "strides, padding, output_padding, expected_hw",
    [(2, "same", None, 10), (2, "valid", None, 11), (2, "valid", 1, 12), (3, "same", 2, 15), (1, "same", None, 5)],
)
def test_conv2d_transpose_forward_matches_reference(strides, padding, output_padding, expected_hw):
    x = _inputs((2, 5, 5, 3))
    layer = keras.layers.Conv2DTranspose(
        4, 3, strides=strides, padding=padding, output_padding=output_padding, dtype="dfp16"
    )
    outputs = layer(x).numpy()
    assert outputs.shape == (2, expected_hw, expected_hw, 4)
    expected = _reference_conv_transpose(x, _weights(layer)[0], outputs.shape, strides, padding.upper())
    np.testing.assert_array_equal(outputs, _add_bias(expected, layer))


def test_conv1d_transpose_forward_matches_reference():
    x = _inputs((2, 6, 3))
    layer = keras.layers.Conv1DTranspose(4, 3, strides=2, padding="same", dtype="dfp16")
    outputs = layer(x).numpy()
    assert outputs.shape == (2, 12, 4)
    expected = _reference_conv_transpose(
        x[:, None], _weights(layer)[0][None], (2, 1, 12, 4), (1, 2), "SAME"
    )[:, 0]
    np.testing.assert_array_equal(outputs, _add_bias(expected, layer))


@pytest.mark.parametrize(
    "equation, output_shape, bias_axes, input_shape, contracted, input_perm, kernel_perm",
    [
        ("ab,bc->ac", 4, "c", (5, 3), 3, None, None),
        ("abc,cd->abd", (None, 4), "d", (2, 5, 3), 3, None, None),
        ("abc,cde->abde", (None, 2, 4), "de", (2, 5, 3), 3, None, None),
        ("abcd,cde->abe", (None, 4), "e", (2, 5, 3, 2), 6, None, None),
        ("...b,bc->...c", 4, None, (2, 3, 5), 5, None, None),
        ("abc,db->adc", (4, None), None, (2, 3, 5), 3, (0, 2, 1), (1, 0)),
    ],
)
def test_einsum_dense_forward_matches_reference(
    equation, output_shape, bias_axes, input_shape, contracted, input_perm, kernel_perm
):
    x = _inputs(input_shape)
    layer = keras.layers.EinsumDense(equation, output_shape=output_shape, bias_axes=bias_axes, dtype="dfp16")
    outputs = layer(x).numpy()
    kernel = _weights(layer)[0]

    x_rows = np.transpose(x, input_perm) if input_perm else x
    kernel_rows = np.transpose(kernel, kernel_perm) if kernel_perm else kernel
    x_m, x_e = reference.quantize(x_rows.reshape(-1, contracted))
    w_m, w_e = reference.quantize(kernel_rows.reshape(contracted, -1))
    product = reference.matmul(x_m, x_e, w_m, w_e)
    if input_perm == (0, 2, 1):
        # Rows are (a, c) and columns d; the output order is a, d, c.
        product = product.reshape(x.shape[0], x.shape[2], -1).transpose(0, 2, 1)
    expected = product.reshape(outputs.shape)
    np.testing.assert_array_equal(outputs, _add_bias(expected, layer))

    # The rewrite computes the same einsum: compare with float64 NumPy.
    float64_outputs = np.einsum(equation, x.astype(np.float64), kernel.astype(np.float64))
    np.testing.assert_allclose(outputs, _add_bias(float64_outputs, layer), atol=2e-3)


# --- gradients: close to float64 TensorFlow ---------------------------------

# (factory, input shape, number of DFP16 quantizations on any path to an
# output or gradient element).
LAYER_CASES = {
    "conv1d_causal": (lambda dtype: keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2, dtype=dtype), (2, 9, 3), 2),
    "conv1d_grouped": (lambda dtype: keras.layers.Conv1D(4, 3, strides=2, groups=2, padding="same", dtype=dtype), (2, 9, 4), 2),
    "conv2d_grouped": (lambda dtype: keras.layers.Conv2D(6, 3, groups=3, padding="same", dtype=dtype), (2, 7, 7, 6), 2),
    "depthwise": (lambda dtype: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="same", dtype=dtype), (2, 7, 7, 3), 2),
    "depthwise_1d": (lambda dtype: keras.layers.DepthwiseConv1D(3, dtype=dtype), (2, 8, 3), 2),
    "separable": (lambda dtype: keras.layers.SeparableConv2D(5, 3, depth_multiplier=2, dtype=dtype), (2, 7, 7, 3), 4),
    "separable_1d": (lambda dtype: keras.layers.SeparableConv1D(4, 3, padding="same", dtype=dtype), (2, 8, 3), 4),
    "transpose_same": (lambda dtype: keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", dtype=dtype), (2, 5, 5, 3), 2),
    "transpose_valid_output_padding": (
        lambda dtype: keras.layers.Conv2DTranspose(4, 3, strides=2, output_padding=1, dtype=dtype),
        (2, 4, 4, 3),
        2,
    ),
    "transpose_1d": (lambda dtype: keras.layers.Conv1DTranspose(3, 4, strides=2, padding="same", dtype=dtype), (2, 6, 2), 2),
    "einsum_3d": (lambda dtype: keras.layers.EinsumDense("abc,cde->abde", (None, 2, 4), bias_axes="de", dtype=dtype), (2, 5, 3), 2),
    "einsum_4d": (lambda dtype: keras.layers.EinsumDense("abcd,cde->abe", (None, 4), bias_axes="e", dtype=dtype), (2, 5, 3, 2), 2),
}


def _linear_loss_gradients(layer, x, upstream):
    """Return [dx, d(each trainable weight)] of sum(layer(x) * upstream)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x) * upstream)
    return tape.gradient(loss, [x] + layer.trainable_weights)


def _dfp_error_bound(float64_layer, x, upstream, weights, quantization_count):
    """Return a per-element bound on |DFP16 gradient - float64 gradient|.

    Quantizing a tensor a moves each element by at most half a step, and the
    step is 2**e_a <= 2**-14 * max|a|, so |error| <= 2**-15 * max|a|. A sum of
    products a_k * b_k then moves by at most
    2**-15 * (max|a| * sum|b_k| + max|b| * sum|a_k|) plus a second-order term,
    which is at most 2 * 2**-15 * max|a| * max|b| * K for K terms. Every
    gradient here is such a sum (nested twice for the separable layers), so
    evaluating the float64 gradients with every operand replaced by its
    max|.| gives the sum of magnitudes, and `quantization_count` * 2**-15
    times it (5% margin for second-order terms and float32 rounding) bounds
    the error.
    """
    filled_weights = [np.full_like(w, np.max(np.abs(w)), dtype=np.float64) for w in weights]
    float64_layer.set_weights(filled_weights)
    x_filled = tf.fill(tf.shape(x), tf.constant(np.max(np.abs(x.numpy())), tf.float64))
    upstream_filled = tf.fill(tf.shape(upstream), tf.constant(np.max(np.abs(upstream.numpy())), tf.float64))
    magnitude_sums = _linear_loss_gradients(float64_layer, x_filled, upstream_filled)
    return [quantization_count * 2.0**-15 * 1.05 * m.numpy() for m in magnitude_sums]


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_gradients_close_to_float64(case):
    make_layer, input_shape, quantization_count = LAYER_CASES[case]
    x = _inputs(input_shape)
    dfp_layer = make_layer("dfp16")
    outputs = dfp_layer(x)
    upstream = _inputs(outputs.shape, seed=SEED + 1)
    weights = _weights(dfp_layer)

    dfp_grads = _linear_loss_gradients(dfp_layer, tf.constant(x), tf.constant(upstream))
    float64_layer = make_layer("float64")
    float64_layer.build(input_shape)
    float64_layer.set_weights([w.astype(np.float64) for w in weights])
    x64 = tf.constant(x, tf.float64)
    upstream64 = tf.constant(upstream, tf.float64)
    float64_grads = _linear_loss_gradients(float64_layer, x64, upstream64)
    bounds = _dfp_error_bound(float64_layer, x64, upstream64, weights, quantization_count)

    names = ["input"] + [w.name for w in dfp_layer.trainable_weights]
    assert len(dfp_grads) == len(float64_grads) == len(names)
    for name, dfp_grad, float64_grad, bound in zip(names, dfp_grads, float64_grads, bounds):
        assert dfp_grad is not None, name
        dfp_grad = dfp_grad.numpy()
        assert dfp_grad.dtype == np.float32, name
        assert np.all(np.isfinite(dfp_grad)), name
        error = np.abs(dfp_grad.astype(np.float64) - float64_grad.numpy())
        assert np.all(error <= bound), f"{name}: max error / bound = {np.max(error / bound)}"
        # Quantization changes every weight and input gradient a little.
        if name != "bias":
            assert np.any(error > 0), name


def _graph_op_types(concrete_function):
    graph_def = concrete_function.graph.as_graph_def()
    op_types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        op_types.update(node.op for node in function.node_def)
    return op_types


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_train_step_graph_has_only_dfp_ops(case):
    make_layer, input_shape, _ = LAYER_CASES[case]
    layer = make_layer("dfp16")
    layer.build(input_shape)
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(layer.trainable_variables)

    @tf.function
    def train_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x)))
        grads = tape.gradient(loss, [x] + layer.trainable_variables)
        optimizer.apply_gradients(zip(grads[1:], layer.trainable_variables))
        return grads[0]

    op_types = _graph_op_types(train_step.get_concrete_function(tf.constant(_inputs(input_shape))))
    expected_ops = DFP_MATMUL_OPS if case.startswith("einsum") else DFP_CONV_OPS
    assert expected_ops <= op_types
    assert not op_types & FLOAT_CONV_AND_MATMUL_OPS


def test_model_fit_with_every_layer_type():
    keras.config.set_dtype_policy("dfp16")
    model = keras.Sequential(
        [
            keras.Input((8, 8, 4)),
            keras.layers.SeparableConv2D(4, 3, padding="same"),
            keras.layers.DepthwiseConv2D(3, padding="same"),
            keras.layers.Conv2D(4, 3, groups=2, strides=2, padding="same"),
            keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same"),
            keras.layers.Reshape((64, 4)),
            keras.layers.Conv1D(4, 3, padding="causal"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.EinsumDense("ab,bc->ac", output_shape=3, bias_axes="c"),
        ]
    )
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    before = model.get_weights()
    history = model.fit(_inputs((8, 8, 8, 4)), np.arange(8) % 3, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    for old, new in zip(before, model.get_weights()):
        assert not np.array_equal(old, new)


def test_nan_gradient_error_names_transposed_layer():
    layer = keras.layers.Conv2DTranspose(2, 3, strides=2, name="decoder_up", dtype="dfp16")
    x = tf.constant(_inputs((1, 4, 4, 3)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = layer(x)
    upstream = np.ones(outputs.shape, "float32")
    upstream[0, 0, 0, 1] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"decoder_up \(gradient\)"):
        tape.gradient(outputs, x, output_gradients=tf.constant(upstream))


def test_separable_stochastic_rounding_is_seeded():
    x = _inputs((2, 6, 6, 3))

    def outputs_for_seed(seed):
        keras.utils.set_random_seed(SEED)
        layer = keras.layers.SeparableConv2D(4, 3, name="probe", dtype=keras_dfp.DFPPolicy(rounding="stochastic", seed=seed))
        return layer(x).numpy()

    np.testing.assert_array_equal(outputs_for_seed(1), outputs_for_seed(1))
    assert not np.array_equal(outputs_for_seed(1), outputs_for_seed(2))


# --- unsupported options ----------------------------------------------------


@pytest.mark.parametrize(
    "make_layer, input_shape, message",
    [
        (
            lambda: keras.layers.Conv3D(2, 3),
            (1, 4, 4, 4, 3),
            r"Expected a 1-D or 2-D convolution for layer 'conv3d\w*' \(Conv3D\) under the 'dfp16' dtype policy, "
            r"because .*Received: rank=3\.",
        ),
        (
            lambda: keras.layers.Conv3DTranspose(2, 3),
            (1, 4, 4, 4, 3),
            r"Expected a 1-D or 2-D convolution for layer '\w+' \(Conv3DTranspose\).*Received: rank=3\.",
        ),
        (
            lambda: keras.layers.Conv2DTranspose(2, 3, dilation_rate=2),
            (1, 6, 6, 3),
            r"Expected dilation_rate=1 for layer '\w+' \(Conv2DTranspose\).*Received: dilation_rate=\(2, 2\)\.",
        ),
        (
            lambda: keras.layers.DepthwiseConv2D(3, data_format="channels_first"),
            (1, 3, 6, 6),
            r"Expected data_format='channels_last' for layer '\w+' \(DepthwiseConv2D\).*"
            r"Received: data_format='channels_first'\.",
        ),
        (
            lambda: keras.layers.SeparableConv1D(2, 3, data_format="channels_first"),
            (1, 3, 6),
            r"\(SeparableConv1D\).*Received: data_format='channels_first'\.",
        ),
        (
            lambda: keras.layers.EinsumDense("abc,acd->abd", output_shape=(None, 2)),
            (2, 3, 4),
            r"Expected an einsum equation 'input,kernel->output' .* for layer 'einsum_dense\w*' \(EinsumDense\) "
            r"under the 'dfp16' dtype policy, because index 'a' appears in 3 of the three terms.*"
            r"Received: equation='abc,acd->abd'\.",
        ),
        (
            lambda: keras.layers.EinsumDense("ab,bc->c", output_shape=2),
            (2, 3),
            r"\(EinsumDense\).*because index 'a' appears in 1 of the three terms.*Received: equation='ab,bc->c'\.",
        ),
        (
            lambda: keras.layers.EinsumDense("ab,bc->ac", output_shape=2, lora_rank=2),
            (2, 3),
            r"Expected no LoRA for layer '\w+' \(EinsumDense\).*Received: lora_rank=2\.",
        ),
    ],
)
def test_unsupported_option_rejected_at_build(make_layer, input_shape, message):
    keras.config.set_dtype_policy("dfp16")
    layer = make_layer()
    with pytest.raises(ValueError, match=message + r" Pass dtype='float32' to this layer"):
        layer.build(input_shape)
    assert not layer.built


def test_conv3d_runs_as_float32_in_dfp_model():
    keras.config.set_dtype_policy("dfp16")
    layer = keras.layers.Conv3D(2, 3, dtype="float32")
    assert layer(_inputs((1, 4, 4, 4, 3))).shape == (1, 2, 2, 2, 2)


def test_saved_model_predicts_identically(tmp_path):
    keras.config.set_dtype_policy("dfp16")
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            keras.layers.SeparableConv2D(4, 3, padding="same"),
            keras.layers.Conv2DTranspose(2, 3, strides=2, padding="same"),
            keras.layers.Reshape((36, 8)),
            keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 2)),
        ]
    )
    x = _inputs((2, 6, 6, 3))
    path = str(tmp_path / "conv_family.keras")
    model.save(path)
    keras.config.set_dtype_policy("float32")
    restored = keras.models.load_model(path)
    assert all(isinstance(layer.dtype_policy, keras_dfp.DFPPolicy) for layer in restored.layers)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))
