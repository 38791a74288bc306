"""Conv ops on every kernel path, driven by the case table in conv_cases.py.

For every case, every kernel path this CPU supports and every mantissa kind
(seeded random, all -32768, all 32767), the forward, backprop-input and
backprop-filter ops must return the same float32 bits as keras_dfp.reference.
The tests also check the output shapes against tf.nn.conv2d, the padding
placement against a float32 TensorFlow convolution of small integers (which
is exact), exact zeros in the input gradient where no window reads the
input, and zero results for the zero-size cases.
"""

import numpy as np
import pytest
import tensorflow as tf

from conv_cases import CONV_CASES
from keras_dfp import ops
from keras_dfp import reference

ALL_PATHS = ("avx512_vnni", "avx2", "portable")
VALUE_KINDS = ("random", "min", "max")

# Exponents that keep every result of the table a normal float32: the largest
# sum, 3185 * 2**30 (about 2**41.6), times 2**-41 is near 3.1.
X_EXPONENT = -20
W_EXPONENT = -21
DY_EXPONENT = -19

NONEMPTY_CASES = [case for case in CONV_CASES if not case.is_zero_size]
ZERO_SIZE_CASES = [case for case in CONV_CASES if case.is_zero_size]
# tf.nn.conv2d rejects filters with 0 input channels, so it cannot give a
# shape for those cases.
TF_SHAPE_CASES = [case for case in CONV_CASES if case.input_shape[3] > 0]


def case_param(case):
    return pytest.param(case, id=case.id)


@pytest.fixture(params=ALL_PATHS)
def kernel_path(request):
    """Run the test on one kernel path and restore the previous path after it."""
    path = request.param
    if path not in ops.supported_kernel_paths():
        pytest.skip(f"CPU or operating system lacks the {path} kernel path")
    previous = ops.get_kernel_path()
    ops.set_kernel_path(path)
    yield path
    ops.set_kernel_path(previous)


def make_mantissas(seed, shape, kind):
    """Return int16 mantissas: seeded full-range random, all -32768 or all 32767."""
    if kind == "random":
        rng = np.random.default_rng(seed)
        return rng.integers(-32768, 32768, shape).astype(np.int16)
    if kind == "min":
        return np.full(shape, -32768, np.int16)
    if kind == "max":
        return np.full(shape, 32767, np.int16)
    raise ValueError(f"Expected a kind in {VALUE_KINDS}. Received: kind={kind!r}")


def case_operands(case, kind):
    """Return the input, filter and output-gradient mantissas of one case."""
    # A fixed seed per operand keeps every test independent of the run order.
    x = make_mantissas(1, case.input_shape, kind)
    w = make_mantissas(2, case.filter_shape, kind)
    out_shape = reference.conv2d_output_shape(
        case.input_shape, case.filter_shape, **case.attrs
    )
    dy = make_mantissas(3, out_shape, kind)
    return x, w, dy


def assert_float32_bits_equal(actual, expected):
    """Compare float32 arrays bit for bit, so -0.0 differs from 0.0."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32))


def tf_conv2d_shape(case):
    """Return the output shape that tf.nn.conv2d gives for the case.

    Non-empty cases run TensorFlow's float32 kernel. Zero-size cases use the
    op's shape function in a traced graph instead.
    NOTE: with TensorFlow 2.21 on CPU, the oneDNN kernel returns the input
    channel count instead of the filter count for a batch of 0, so its eager
    result shape is wrong there.
    """
    if not case.is_zero_size:
        x = tf.zeros(case.input_shape, tf.float32)
        w = tf.zeros(case.filter_shape, tf.float32)
        return tuple(tf.nn.conv2d(x, w, **case.attrs).shape)

    traced = tf.function(lambda x, w: tf.nn.conv2d(x, w, **case.attrs))
    concrete = traced.get_concrete_function(
        tf.TensorSpec(case.input_shape, tf.float32),
        tf.TensorSpec(case.filter_shape, tf.float32),
    )
    return tuple(concrete.structured_outputs.shape)


def _covered_positions(in_size, kernel_size, stride, dilation, out_size, padding):
    """Return a bool vector [in_size]: True where some window of one axis reads the input."""
    pad_before = 0
    if padding == "SAME":
        needed = (out_size - 1) * stride + (kernel_size - 1) * dilation + 1
        pad_before = max(needed - in_size, 0) // 2
    covered = np.zeros(in_size, bool)
    for out_index in range(out_size):
        for tap in range(kernel_size):
            position = out_index * stride + tap * dilation - pad_before
            if 0 <= position < in_size:
                covered[position] = True
    return covered


def uncovered_input_mask(case):
    """Return a bool mask [N, H, W, C]: True where no conv window reads the input.

    Coverage is computed from the window geometry directly, independent of
    the reference and of TensorFlow, whose CPU Conv2DBackpropInput rejects
    dilations above 1 when oneDNN is off (TensorFlow leaves it off on CPUs
    without AVX-512). Windows cover a product of rows and columns, so the
    mask is the outer product of the two axes.
    """
    out_shape = reference.conv2d_output_shape(
        case.input_shape, case.filter_shape, **case.attrs
    )
    strides = ops._spatial_attr(case.strides, "strides")
    dilations = ops._spatial_attr(case.dilations, "dilations")
    rows = _covered_positions(
        case.input_shape[1], case.filter_shape[0], strides[1], dilations[1],
        out_shape[1], case.padding,
    )
    columns = _covered_positions(
        case.input_shape[2], case.filter_shape[1], strides[2], dilations[2],
        out_shape[2], case.padding,
    )
    covered = np.outer(rows, columns)[None, :, :, None]
    return np.broadcast_to(~covered, case.input_shape)


# ---------------------------------------------------------------------------
# Bit-exact results on every kernel path.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", VALUE_KINDS)
@pytest.mark.parametrize("case", [case_param(c) for c in CONV_CASES])
def test_forward_exact(kernel_path, case, kind):
    x, w, _ = case_operands(case, kind)
    actual = ops.conv2d_int(x, X_EXPONENT, w, W_EXPONENT, **case.attrs)
    expected = reference.conv2d(x, X_EXPONENT, w, W_EXPONENT, **case.attrs)
    assert_float32_bits_equal(actual, expected)


@pytest.mark.parametrize("kind", VALUE_KINDS)
@pytest.mark.parametrize("case", [case_param(c) for c in CONV_CASES])
def test_backprop_input_exact(kernel_path, case, kind):
    _, w, dy = case_operands(case, kind)
    actual = ops.conv2d_backprop_input_int(
        case.input_shape, w, W_EXPONENT, dy, DY_EXPONENT, **case.attrs
    )
    expected = reference.conv2d_backprop_input(
        case.input_shape, w, W_EXPONENT, dy, DY_EXPONENT, **case.attrs
    )
    assert_float32_bits_equal(actual, expected)


@pytest.mark.parametrize("kind", VALUE_KINDS)
@pytest.mark.parametrize("case", [case_param(c) for c in CONV_CASES])
def test_backprop_filter_exact(kernel_path, case, kind):
    x, w, dy = case_operands(case, kind)
    actual = ops.conv2d_backprop_filter_int(
        x, X_EXPONENT, w.shape, dy, DY_EXPONENT, **case.attrs
    )
    expected = reference.conv2d_backprop_filter(
        x, X_EXPONENT, w.shape, dy, DY_EXPONENT, **case.attrs
    )
    assert_float32_bits_equal(actual, expected)


# ---------------------------------------------------------------------------
# Geometry against TensorFlow.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", [case_param(c) for c in TF_SHAPE_CASES])
def test_output_shape_matches_tf(case):
    x, w, _ = case_operands(case, "random")
    actual = ops.conv2d_int(x, 0, w, 0, **case.attrs)
    assert tuple(actual.shape) == tf_conv2d_shape(case)


@pytest.mark.parametrize("case", [case_param(c) for c in NONEMPTY_CASES])
def test_forward_matches_tf_small_values(case):
    # With |x|, |w| <= 8 every sum is below 3185 * 64 < 2**24, so TensorFlow's
    # float32 convolution is exact and must equal the op bit for bit. This
    # checks the padding placement independently of keras_dfp.reference.
    rng = np.random.default_rng(4)
    x = rng.integers(-8, 9, case.input_shape).astype(np.int16)
    w = rng.integers(-8, 9, case.filter_shape).astype(np.int16)
    actual = ops.conv2d_int(x, 0, w, 0, **case.attrs)
    expected = tf.nn.conv2d(
        x.astype(np.float32), w.astype(np.float32), **case.attrs
    ).numpy()
    assert_float32_bits_equal(actual, expected)


@pytest.mark.parametrize("case", [case_param(c) for c in NONEMPTY_CASES])
def test_uncovered_inputs_get_zero_gradient(kernel_path, case):
    _, w, dy = case_operands(case, "min")
    grad = ops.conv2d_backprop_input_int(
        case.input_shape, w, W_EXPONENT, dy, DY_EXPONENT, **case.attrs
    ).numpy()
    uncovered = uncovered_input_mask(case)
    # +0.0 has the bit pattern 0, so this also rejects -0.0.
    np.testing.assert_array_equal(grad[uncovered].view(np.int32), 0)


def test_table_has_uncovered_inputs():
    # The zero-gradient test is only meaningful if some case leaves input
    # positions unread, for example VALID padding with a stride above the kernel.
    uncovered_ids = [c.id for c in NONEMPTY_CASES if uncovered_input_mask(c).any()]
    assert "h7w8_k1_s3_valid" in uncovered_ids
    assert "h10w9_k2_s3_valid" in uncovered_ids


def test_case_ids_unique():
    ids = [case.id for case in CONV_CASES]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------
# Zero-size cases.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", [case_param(c) for c in ZERO_SIZE_CASES])
def test_zero_size_results(kernel_path, case):
    x, w, dy = case_operands(case, "min")
    out_shape = reference.conv2d_output_shape(
        case.input_shape, case.filter_shape, **case.attrs
    )

    forward = ops.conv2d_int(x, 0, w, 0, **case.attrs).numpy()
    grad_input = ops.conv2d_backprop_input_int(
        case.input_shape, w, 0, dy, 0, **case.attrs
    ).numpy()
    grad_filter = ops.conv2d_backprop_filter_int(
        x, 0, w.shape, dy, 0, **case.attrs
    ).numpy()

    assert forward.shape == out_shape
    assert grad_input.shape == case.input_shape
    assert grad_filter.shape == case.filter_shape
    np.testing.assert_array_equal(forward.view(np.int32), 0)
    np.testing.assert_array_equal(grad_input.view(np.int32), 0)
    np.testing.assert_array_equal(grad_filter.view(np.int32), 0)


def test_reference_backprop_zero_height_padded():
    # Height 0, SAME, filter height 3, dilation 3: TensorFlow pads 6 rows.
    attrs = {"strides": 2, "padding": "SAME", "dilations": (3, 1)}
    x = np.zeros((1, 0, 1, 1), np.int16)
    w = np.ones((3, 1, 1, 1), np.int16)
    dy = np.zeros((1, 0, 1, 1), np.int16)
    grad_input = reference.conv2d_backprop_input(x.shape, w, 0, dy, 0, **attrs)
    grad_filter = reference.conv2d_backprop_filter(x, 0, w.shape, dy, 0, **attrs)
    assert grad_input.shape == x.shape
    np.testing.assert_array_equal(grad_filter, np.zeros(w.shape, np.float32))
