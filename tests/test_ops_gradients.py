"""Float-level tests of keras_dfp.ops.conv2d and keras_dfp.ops.matmul.

Forward results and gradients are compared with float64 TensorFlow within a
tolerance derived from DFP16 precision, and the backward pass is checked to
run through the INT16 ops.

Derivation of the tolerance. With round half to even, quantizing a tensor `a`
changes each element by at most `EPS * max|a|` with `EPS = 1 / 32767.5`.
An unsaturated element moves by at most half a step `2**e / 2`, and
`max|a| >= 2**(e + 14)`. A saturated element moves by less than one step, but
then `max|a| >= 32767.5 * 2**e`. Let `L(a, b)` be the bilinear op (a
convolution, one of its backprops, or a matmul) and `qa = a + da`,
`qb = b + db` the quantized operands. Then

    L(qa, qb) - L(a, b) = L(da, b) + L(a, db) + L(da, db)

and, because every output of `L` is a sum of products of single elements
(padding contributes zeros),

    |L(da, b)|  <= EPS * max|a| * L(1, |b|)
    |L(a, db)|  <= EPS * max|b| * L(|a|, 1)
    |L(da, db)| <= EPS**2 * max|a| * max|b| * L(1, 1)

where `1` is an all-ones tensor of the operand's shape. The int64 sum is exact
and rounded once to float32, adding at most `2**-24 * |L(qa, qb)|`. The
float64 TensorFlow result is off by about `K * 2**-53 * L(|a|, |b|)`, which
the `2**-40 * L(|a|, |b|)` term covers.

Stochastic rounding moves an element by less than one step `2**e`, and
`max|a| >= 2**(e + 14)`, so there `EPS_STOCHASTIC = 2**-14` replaces `EPS`.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_dfp import ops

EPS = 1 / 32767.5
EPS_STOCHASTIC = 2.0**-14
ROUNDING_EPS = {"nearest_even": EPS, "stochastic": EPS_STOCHASTIC}


def dfp16_error_bound(op, a, b, eps=EPS):
    """Return the elementwise error bound of the DFP16 result of op(a, b).

    `op` computes the exact bilinear op in float64 on NumPy arrays, and `eps`
    is the quantization error relative to max|operand|.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    max_a = np.abs(a).max()
    max_b = np.abs(b).max()
    ones_a = np.ones_like(a)
    ones_b = np.ones_like(b)
    quantization = (
        eps * max_a * op(ones_a, np.abs(b))
        + eps * max_b * op(np.abs(a), ones_b)
        + eps**2 * max_a * max_b * op(ones_a, ones_b)
    )
    rounding = 2.0**-24 * (np.abs(op(a, b)) + quantization)
    float64_slack = 2.0**-40 * op(np.abs(a), np.abs(b))
    return quantization + rounding + float64_slack


def assert_within_bound(actual, expected, bound):
    error = np.abs(np.asarray(actual, np.float64) - expected)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert np.all(error <= bound), (
        f"DFP16 error {error[worst]} exceeds the bound {bound[worst]} at index "
        f"{worst} (expected {expected[worst]}, actual {actual[worst]})"
    )


# ---------------------------------------------------------------------------
# Float64 TensorFlow references. TensorFlow's CPU backprop kernels reject
# dilation > 1, so dilated filters are expanded with zeros between the taps.
# ---------------------------------------------------------------------------


def _pair(value):
    values = list(np.atleast_1d(value))
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    return values[1], values[2]


def _dilate_filter(w, dilations):
    dh, dw = _pair(dilations)
    kh, kw, c, o = w.shape
    dilated = np.zeros(((kh - 1) * dh + 1, (kw - 1) * dw + 1, c, o), np.float64)
    dilated[::dh, ::dw] = w
    return dilated


def _strides4(strides):
    sh, sw = _pair(strides)
    return [1, int(sh), int(sw), 1]


def conv2d_float64(x, w, strides, padding, dilations):
    return tf.nn.conv2d(
        np.asarray(x, np.float64), _dilate_filter(w, dilations), _strides4(strides), padding
    ).numpy()


def conv2d_backprop_input_float64(input_shape, w, dy, strides, padding, dilations):
    return tf.raw_ops.Conv2DBackpropInput(
        input_sizes=list(input_shape),
        filter=_dilate_filter(w, dilations),
        out_backprop=np.asarray(dy, np.float64),
        strides=_strides4(strides),
        padding=padding,
    ).numpy()


def conv2d_backprop_filter_float64(x, filter_shape, dy, strides, padding, dilations):
    dh, dw = _pair(dilations)
    kh, kw, c, o = filter_shape
    dilated_shape = [(kh - 1) * dh + 1, (kw - 1) * dw + 1, c, o]
    dilated_grad = tf.raw_ops.Conv2DBackpropFilter(
        input=np.asarray(x, np.float64),
        filter_sizes=dilated_shape,
        out_backprop=np.asarray(dy, np.float64),
        strides=_strides4(strides),
        padding=padding,
    ).numpy()
    return dilated_grad[::dh, ::dw]


# ---------------------------------------------------------------------------
# Forward and gradients.
# ---------------------------------------------------------------------------

# (N, H, W, C, KH, KW, O, strides, padding, dilations)
CONV_CASES = [
    (2, 8, 8, 3, 3, 3, 4, 1, "SAME", 1),
    (1, 9, 7, 1, 3, 3, 2, 2, "SAME", 1),
    (3, 9, 8, 17, 3, 2, 5, 2, "VALID", 1),
    (2, 10, 10, 3, 3, 3, 3, 1, "SAME", 2),
    (1, 11, 9, 17, 3, 3, 6, 1, "VALID", (2, 1)),
    (2, 6, 6, 8, 1, 1, 4, (1, 2), "SAME", 1),
]


@pytest.mark.parametrize("rounding", sorted(ROUNDING_EPS))
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_conv2d_forward_and_gradients(rng, case, rounding):
    n, h, w, c, kh, kw, o, strides, padding, dilations = case
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    kernel = (rng.standard_normal((kh, kw, c, o)) * 0.1).astype(np.float32)
    y_shape = conv2d_float64(x, kernel, strides, padding, dilations).shape
    dy = (rng.standard_normal(y_shape) * 1e-3).astype(np.float32)

    x_tf = tf.constant(x)
    kernel_tf = tf.constant(kernel)
    with tf.GradientTape() as tape:
        tape.watch([x_tf, kernel_tf])
        y = ops.conv2d(
            x_tf, kernel_tf, strides=strides, padding=padding, dilations=dilations,
            rounding=rounding, seed=31,
        )
    dx, dkernel = tape.gradient(y, [x_tf, kernel_tf], output_gradients=tf.constant(dy))
    assert y.dtype == tf.float32
    assert y.shape == y_shape

    def forward(a, b):
        return conv2d_float64(a, b, strides, padding, dilations)

    def input_grad(dy_, w_):
        return conv2d_backprop_input_float64(x.shape, w_, dy_, strides, padding, dilations)

    def filter_grad(x_, dy_):
        return conv2d_backprop_filter_float64(x_, kernel.shape, dy_, strides, padding, dilations)

    eps = ROUNDING_EPS[rounding]
    assert_within_bound(
        y.numpy(), forward(x, kernel), dfp16_error_bound(forward, x, kernel, eps)
    )
    assert_within_bound(
        dx.numpy(), input_grad(dy, kernel), dfp16_error_bound(input_grad, dy, kernel, eps)
    )
    assert_within_bound(
        dkernel.numpy(), filter_grad(x, dy), dfp16_error_bound(filter_grad, x, dy, eps)
    )


@pytest.mark.parametrize("rounding", sorted(ROUNDING_EPS))
@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 1, 1), (33, 130, 17)])
def test_matmul_forward_and_gradients(rng, shape, rounding):
    m, k, n = shape
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = (rng.standard_normal((k, n)) * 3e-2).astype(np.float32)
    dy = (rng.standard_normal((m, n)) * 10).astype(np.float32)

    a_tf = tf.constant(a)
    b_tf = tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([a_tf, b_tf])
        y = ops.matmul(a_tf, b_tf, rounding=rounding, seed=47)
    da, db = tape.gradient(y, [a_tf, b_tf], output_gradients=tf.constant(dy))

    def forward(a_, b_):
        return a_ @ b_

    def a_grad(dy_, b_):
        return dy_ @ b_.T

    def b_grad(a_, dy_):
        return a_.T @ dy_

    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    dy64 = dy.astype(np.float64)
    eps = ROUNDING_EPS[rounding]
    assert_within_bound(y.numpy(), forward(a64, b64), dfp16_error_bound(forward, a, b, eps))
    assert_within_bound(da.numpy(), a_grad(dy64, b64), dfp16_error_bound(a_grad, dy, b, eps))
    assert_within_bound(db.numpy(), b_grad(a64, dy64), dfp16_error_bound(b_grad, a, dy, eps))


def test_bound_catches_bfloat16_error(rng):
    # The bound must be tight enough to catch bfloat16-level (2**-8) errors.
    a = rng.standard_normal((16, 64))
    b = rng.standard_normal((64, 8))
    exact = a @ b
    coarse = tf.cast(tf.cast(a, tf.bfloat16) @ tf.cast(b, tf.bfloat16), tf.float64).numpy()
    bound = dfp16_error_bound(lambda x, y: x @ y, a, b)
    assert np.any(np.abs(coarse - exact) > bound)


# ---------------------------------------------------------------------------
# The backward pass uses the INT16 ops.
# ---------------------------------------------------------------------------


def _op_types(concrete_function):
    graph_def = concrete_function.graph.as_graph_def()
    types = [node.op for node in graph_def.node]
    for function in graph_def.library.function:
        types.extend(node.op for node in function.node_def)
    return types


def test_conv2d_gradient_graph_uses_int16_ops():
    @tf.function
    def gradients(x, kernel, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = ops.conv2d(x, kernel, strides=1, padding="SAME")
        return tape.gradient(y, [x, kernel], output_gradients=dy)

    concrete = gradients.get_concrete_function(
        tf.TensorSpec((2, 6, 6, 3), tf.float32),
        tf.TensorSpec((3, 3, 3, 4), tf.float32),
        tf.TensorSpec((2, 6, 6, 4), tf.float32),
    )
    types = _op_types(concrete)
    assert "KerasDfp>Conv2D" in types
    assert "KerasDfp>Conv2DBackpropInput" in types
    assert "KerasDfp>Conv2DBackpropFilter" in types
    assert types.count("KerasDfp>Quantize") >= 3  # activation, weight, gradient
    for float_op in ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter"):
        assert float_op not in types


def test_matmul_gradient_graph_uses_int16_ops():
    @tf.function
    def gradients(a, b, dy):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            y = ops.matmul(a, b)
        return tape.gradient(y, [a, b], output_gradients=dy)

    concrete = gradients.get_concrete_function(
        tf.TensorSpec((4, 5), tf.float32),
        tf.TensorSpec((5, 3), tf.float32),
        tf.TensorSpec((4, 3), tf.float32),
    )
    types = _op_types(concrete)
    assert types.count("KerasDfp>MatMul") >= 3  # forward, da, db
    assert types.count("KerasDfp>Quantize") >= 3
    assert "MatMul" not in types
    assert "BatchMatMulV2" not in types


# ---------------------------------------------------------------------------
# Non-finite values name the tensor.
# ---------------------------------------------------------------------------


def test_conv2d_nan_gradient_raises(rng):
    x = tf.constant(rng.standard_normal((1, 5, 5, 2)).astype(np.float32))
    kernel = tf.constant(rng.standard_normal((3, 3, 2, 2)).astype(np.float32))
    dy = np.ones((1, 5, 5, 2), np.float32)
    dy[0, 2, 2, 1] = np.nan
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = ops.conv2d(x, kernel, padding="SAME", name="probe")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"probe \(gradient\).*NaN"):
        tape.gradient(y, [x, kernel], output_gradients=tf.constant(dy))


def test_matmul_nan_gradient_raises(rng):
    a = tf.constant(rng.standard_normal((3, 4)).astype(np.float32))
    b = tf.constant(rng.standard_normal((4, 2)).astype(np.float32))
    dy = np.ones((3, 2), np.float32)
    dy[1, 1] = np.nan
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        y = ops.matmul(a, b, name="dense_probe")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"dense_probe \(gradient\)"):
        tape.gradient(y, [a, b], output_gradients=tf.constant(dy))


def test_conv2d_non_finite_forward_raises(rng):
    x = rng.standard_normal((1, 4, 4, 2)).astype(np.float32)
    kernel = rng.standard_normal((2, 2, 2, 1)).astype(np.float32)
    bad_x = x.copy()
    bad_x[0, 1, 1, 0] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"probe \(activation\).*\+Inf"):
        ops.conv2d(tf.constant(bad_x), tf.constant(kernel), name="probe")
    bad_kernel = kernel.copy()
    bad_kernel[1, 0, 1, 0] = -np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"probe \(weight\).*-Inf"):
        ops.conv2d(tf.constant(x), tf.constant(bad_kernel), name="probe")
