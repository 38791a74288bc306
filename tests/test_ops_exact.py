"""Bit-exact tests of the C++ DFP16 ops against the NumPy reference.

Every integer op must equal keras_dfp.reference exactly: the same int16
mantissas and int32 exponents from quantize, and the same float32 bits from
the convolution and matmul ops (one rounding of the exact int64 sum).
"""

import itertools
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from keras_dfp import ops
from keras_dfp import reference

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Exponent pairs (first operand, second operand). Sums of K full-range
# products lie between about 2**30 * sqrt(K) (random signs) and 2**30 * K
# (extreme mantissas). Combined exponents of -40, -175 and 95 therefore give
# normal results, subnormal results or zeros, and overflow to +-inf.
EXPONENT_PAIRS = [(-25, -15), (-163, -12), (40, 55)]


def assert_float32_bits_equal(actual, expected):
    """Compare float32 arrays bit for bit, so -0.0 != 0.0 and NaN patterns count."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == np.float32, actual.dtype
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32))


def make_mantissas(rng, shape, kind):
    """Return int16 mantissas: 'random' (full range), 'extreme' or 'min'."""
    if kind == "random":
        return rng.integers(-32768, 32768, shape).astype(np.int16)
    if kind == "extreme":
        return rng.choice(np.array([-32768, 32767], np.int16), shape)
    if kind == "min":
        return np.full(shape, -32768, np.int16)
    raise ValueError(f"Expected a mantissa kind. Received: kind={kind!r}")


def exponent(value):
    return tf.constant(value, tf.int32)


# ---------------------------------------------------------------------------
# Quantize and dequantize.
# ---------------------------------------------------------------------------


def _quantize_inputs():
    """Return named float32 arrays covering ties, saturation and extremes."""
    rng = np.random.default_rng(7)
    ties = np.array([16384, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5, 16383.5], np.float32)
    saturation = np.array([32767.5, -32767.75, 1.0, 32766.5, -0.25], np.float32)
    finfo = np.finfo(np.float32)
    return {
        "normal": rng.standard_normal((37, 29)).astype(np.float32),
        "wide_range": (
            rng.standard_normal(4099) * 2.0 ** rng.integers(-60, 60, 4099)
        ).astype(np.float32),
        "ties": ties,
        "ties_scaled": ties * np.float32(2.0**-100),
        "saturation": saturation,
        "subnormal": np.array(
            [2.0**-149, -(2**23 - 1) * 2.0**-149, 3 * 2.0**-149, 0.0], np.float32
        ),
        # Large enough to be split across threads, each of which must keep
        # subnormals (TensorFlow sets flush-to-zero per thread).
        "subnormal_large": (
            rng.uniform(-1, 1, 300_000) * 2.0**-127
        ).astype(np.float32),
        "float32_max": np.array([finfo.max, -finfo.max, 1.0, finfo.tiny], np.float32),
        "large_4d": rng.uniform(-3, 3, (4, 16, 16, 33)).astype(np.float32),
        "zeros": np.zeros((3, 5), np.float32),
        "negative_zero": np.full((4,), -0.0, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(-0.1, np.float32),
    }


QUANTIZE_INPUTS = _quantize_inputs()


@pytest.mark.parametrize("name", sorted(QUANTIZE_INPUTS))
@pytest.mark.parametrize(
    "rounding, seed",
    [("nearest_even", 0), ("stochastic", 0), ("stochastic", -1), ("stochastic", 2**62 + 12345)],
)
def test_quantize_matches_reference(name, rounding, seed):
    x = QUANTIZE_INPUTS[name]
    mantissa, exp = ops.quantize(tf.constant(x), rounding=rounding, seed=seed)
    expected_mantissa, expected_exponent = reference.quantize(x, rounding, seed)
    assert mantissa.dtype == tf.int16
    assert exp.dtype == tf.int32
    assert mantissa.shape == x.shape
    np.testing.assert_array_equal(mantissa.numpy(), expected_mantissa)
    assert int(exp.numpy()) == expected_exponent


_THREAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
    from keras_dfp import ops

    x = np.load(sys.argv[2])
    mantissa, exponent = ops.quantize(tf.constant(x), rounding="stochastic", seed=20180430)
    np.save(sys.argv[3], mantissa.numpy())
    np.save(sys.argv[4], np.array(exponent.numpy()))
    """
)


def test_quantize_stochastic_same_for_1_and_2_threads(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 128, 65)).astype(np.float32)
    input_path = tmp_path / "x.npy"
    np.save(input_path, x)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    expected_mantissa, expected_exponent = reference.quantize(x, "stochastic", 20180430)
    for threads in (1, 2):
        mantissa_path = tmp_path / f"mantissa_{threads}.npy"
        exponent_path = tmp_path / f"exponent_{threads}.npy"
        completed = subprocess.run(
            [
                sys.executable,
                "-c",
                _THREAD_SCRIPT,
                str(threads),
                str(input_path),
                str(mantissa_path),
                str(exponent_path),
            ],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        np.testing.assert_array_equal(np.load(mantissa_path), expected_mantissa)
        assert int(np.load(exponent_path)) == expected_exponent


@pytest.mark.parametrize(
    "bad_value, kind", [(np.nan, "NaN"), (np.inf, "+Inf"), (-np.inf, "-Inf")]
)
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
def test_quantize_non_finite_raises(bad_value, kind, rounding):
    x = np.ones((2, 3, 4), np.float32)
    x[1, 2, 3] = bad_value
    x[1, 2, 2] = 5.0
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        ops.quantize(tf.constant(x), rounding=rounding, tensor_name="dense_3 (weight)")
    message = str(raised.value)
    assert "'dense_3 (weight)'" in message
    assert kind in message
    assert "flat index 23" in message


@pytest.mark.parametrize("exp", [-200, -163, -149, -30, 0, 30, 113, 114, 200])
def test_dequantize_matches_reference(rng, exp):
    mantissa = rng.integers(-32768, 32768, (5, 11)).astype(np.int16)
    mantissa[0, :4] = [-32768, 32767, 1, -1]
    actual = ops.dequantize(tf.constant(mantissa), exponent(exp))
    assert_float32_bits_equal(actual.numpy(), reference.dequantize(mantissa, exp))


# ---------------------------------------------------------------------------
# Convolutions.
# ---------------------------------------------------------------------------

# (N, H, W, C, KH, KW, O, strides, padding, dilations, mantissa kind)
CONV_CASES = [
    (2, 8, 8, 3, 3, 3, 4, 1, "SAME", 1, "random"),
    (1, 7, 9, 1, 3, 3, 2, 2, "SAME", 1, "random"),
    (3, 9, 8, 17, 3, 2, 5, 2, "VALID", 1, "random"),
    (2, 10, 10, 3, 3, 3, 3, 1, "SAME", 2, "random"),
    (1, 11, 11, 17, 3, 3, 17, 1, "VALID", 2, "extreme"),
    (2, 6, 6, 3, 1, 1, 4, 2, "VALID", 1, "min"),
    (1, 5, 5, 3, 5, 5, 3, 1, "SAME", 1, "min"),
    (2, 16, 16, 17, 3, 3, 8, 1, "SAME", 1, "extreme"),
    (1, 4, 6, 1, 2, 2, 1, (1, 2), "SAME", 1, "random"),
    (1, 9, 9, 17, 5, 5, 3, 1, "SAME", 1, "min"),  # 425 terms per sum
    (2, 6, 6, 300, 1, 1, 3, 1, "VALID", 1, "extreme"),
    (1, 6, 7, 3, 2, 2, 2, [1, 2, 2, 1], "SAME", [1, 1, 1, 1], "random"),
    (2, 5, 4, 3, 3, 3, 2, 1, "VALID", (2, 1), "random"),
]


def _conv_case_id(case):
    return "-".join(str(v).replace(" ", "") for v in case)


@pytest.fixture(params=CONV_CASES, ids=_conv_case_id)
def conv_case(request, rng):
    n, h, w, c, kh, kw, o, strides, padding, dilations, kind = request.param
    x = make_mantissas(rng, (n, h, w, c), kind)
    kernel = make_mantissas(rng, (kh, kw, c, o), kind)
    out_shape = reference.conv2d_output_shape(x.shape, kernel.shape, strides, padding, dilations)
    dy = make_mantissas(rng, out_shape, kind)
    attrs = {"strides": strides, "padding": padding, "dilations": dilations}
    return x, kernel, dy, attrs


@pytest.mark.parametrize("exponents", EXPONENT_PAIRS)
def test_conv2d_matches_reference(conv_case, exponents):
    x, kernel, _, attrs = conv_case
    x_e, w_e = exponents
    actual = ops.conv2d_int(
        tf.constant(x), exponent(x_e), tf.constant(kernel), exponent(w_e), **attrs
    )
    expected = reference.conv2d(x, x_e, kernel, w_e, **attrs)
    assert_float32_bits_equal(actual.numpy(), expected)


def test_conv2d_output_shape_matches_tf(conv_case):
    x, kernel, _, attrs = conv_case
    actual = ops.conv2d_int(tf.constant(x), exponent(0), tf.constant(kernel), exponent(0), **attrs)
    expected = tf.nn.conv2d(
        x.astype(np.float32), kernel.astype(np.float32), attrs["strides"],
        attrs["padding"], dilations=attrs["dilations"],
    )
    assert actual.shape == expected.shape


@pytest.mark.parametrize("exponents", EXPONENT_PAIRS)
def test_conv2d_backprop_input_matches_reference(conv_case, exponents):
    x, kernel, dy, attrs = conv_case
    w_e, dy_e = exponents
    actual = ops.conv2d_backprop_input_int(
        tf.constant(x.shape, tf.int32),
        tf.constant(kernel),
        exponent(w_e),
        tf.constant(dy),
        exponent(dy_e),
        **attrs,
    )
    expected = reference.conv2d_backprop_input(x.shape, kernel, w_e, dy, dy_e, **attrs)
    assert_float32_bits_equal(actual.numpy(), expected)


@pytest.mark.parametrize("exponents", EXPONENT_PAIRS)
def test_conv2d_backprop_filter_matches_reference(conv_case, exponents):
    x, kernel, dy, attrs = conv_case
    x_e, dy_e = exponents
    actual = ops.conv2d_backprop_filter_int(
        tf.constant(x),
        exponent(x_e),
        tf.constant(kernel.shape, tf.int32),
        tf.constant(dy),
        exponent(dy_e),
        **attrs,
    )
    expected = reference.conv2d_backprop_filter(x, x_e, kernel.shape, dy, dy_e, **attrs)
    assert_float32_bits_equal(actual.numpy(), expected)


@pytest.mark.parametrize("kind", ["min", "extreme"])
def test_conv2d_backprop_filter_long_reduction(rng, kind):
    # N*OH*OW = 4*64*64 = 16384 terms per sum: up to 2**44 in magnitude.
    x = make_mantissas(rng, (4, 64, 64, 2), kind)
    dy = make_mantissas(rng, (4, 64, 64, 3), kind)
    filter_sizes = (3, 3, 2, 3)
    actual = ops.conv2d_backprop_filter_int(
        tf.constant(x), exponent(-30), tf.constant(filter_sizes, tf.int32),
        tf.constant(dy), exponent(-20), strides=1, padding="SAME", dilations=1,
    )
    sums = reference.conv2d_backprop_filter_int64(x, filter_sizes, dy, 1, "SAME", 1)
    assert np.abs(sums).max() > 2**31
    expected = reference.to_float32_scaled(sums, -50)
    assert_float32_bits_equal(actual.numpy(), expected)


def test_conv2d_zero_size_shapes():
    kernel = np.ones((3, 3, 3, 4), np.int16)
    empty_batch = ops.conv2d_int(
        tf.zeros((0, 5, 5, 3), tf.int16), exponent(0), tf.constant(kernel), exponent(0),
        strides=1, padding="SAME", dilations=1,
    )
    assert empty_batch.shape == (0, 5, 5, 4)
    no_channels = ops.conv2d_int(
        tf.ones((1, 4, 4, 0), tf.int16), exponent(0), tf.ones((2, 2, 0, 3), tf.int16),
        exponent(0), strides=1, padding="VALID", dilations=1,
    )
    assert_float32_bits_equal(no_channels.numpy(), np.zeros((1, 3, 3, 3), np.float32))
    filter_grad = ops.conv2d_backprop_filter_int(
        tf.zeros((0, 5, 5, 3), tf.int16), exponent(0), tf.constant([3, 3, 3, 4], tf.int32),
        tf.zeros((0, 5, 5, 4), tf.int16), exponent(0), strides=1, padding="SAME", dilations=1,
    )
    assert_float32_bits_equal(filter_grad.numpy(), np.zeros((3, 3, 3, 4), np.float32))


# ---------------------------------------------------------------------------
# Matmul.
# ---------------------------------------------------------------------------

# (M, K, N, mantissa kind)
MATMUL_CASES = [
    (5, 7, 3, "random"),
    (1, 1, 1, "random"),
    (17, 33, 9, "random"),
    (64, 300, 31, "extreme"),
    (4, 4096, 3, "min"),  # sums of 2**42, far beyond int32
    (3, 5000, 2, "extreme"),
    (0, 4, 3, "random"),
    (2, 0, 3, "random"),
]


@pytest.mark.parametrize("case", MATMUL_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("transpose_a, transpose_b", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("exponents", EXPONENT_PAIRS)
def test_matmul_matches_reference(rng, case, transpose_a, transpose_b, exponents):
    m, k, n, kind = case
    a = make_mantissas(rng, (m, k), kind)
    b = make_mantissas(rng, (k, n), kind)
    a_in = np.ascontiguousarray(a.T) if transpose_a else a
    b_in = np.ascontiguousarray(b.T) if transpose_b else b
    a_e, b_e = exponents
    actual = ops.matmul_int(
        tf.constant(a_in), exponent(a_e), tf.constant(b_in), exponent(b_e),
        transpose_a=transpose_a, transpose_b=transpose_b,
    )
    expected = reference.matmul(a_in, a_e, b_in, b_e, transpose_a, transpose_b)
    assert_float32_bits_equal(actual.numpy(), expected)


@pytest.mark.parametrize("above_tie", [True, False])
def test_matmul_sum_beyond_2_pow_53_rounds_once(above_tie):
    # 2**23 products of 2**30 give 2**53, plus 2**29 (half a float32 ulp at
    # 2**53) and +-1. Converting the sum to float64 first would lose the +-1
    # and round the tie to even, giving 2**53 in both cases. The correct
    # results are 2**53 + 2**30 above the tie and 2**53 below it.
    k = 2**23 + 2
    a = np.full((1, k), -32768, np.int16)
    b = np.full((k, 1), -32768, np.int16)
    a[0, -2] = -16384  # (-16384) * (-32768) = 2**29
    a[0, -1] = 1
    b[-1, 0] = 1 if above_tie else -1
    sums = reference.matmul_int64(a, b)
    assert int(sums[0, 0]) == 2**53 + 2**29 + (1 if above_tie else -1)
    actual = ops.matmul_int(tf.constant(a), exponent(0), tf.constant(b), exponent(0))
    expected_value = 2.0**53 + 2.0**30 if above_tie else 2.0**53
    assert float(actual.numpy()[0, 0]) == expected_value
    assert_float32_bits_equal(actual.numpy(), reference.matmul(a, 0, b, 0))


# ---------------------------------------------------------------------------
# Input validation.
# ---------------------------------------------------------------------------


def test_conv2d_rejects_bad_shapes_and_attrs():
    x = tf.ones((1, 5, 5, 3), tf.int16)
    kernel = tf.ones((3, 3, 3, 2), tf.int16)
    e = exponent(0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"rank 4"):
        ops.conv2d_int(tf.ones((5, 5, 3), tf.int16), e, kernel, e, strides=1, padding="SAME")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"channels"):
        ops.conv2d_int(x, e, tf.ones((3, 3, 2, 2), tf.int16), e, strides=1, padding="SAME")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"dilated filter height=9"):
        ops.conv2d_int(x, e, kernel, e, strides=1, padding="VALID", dilations=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?i)scalar"):
        ops.conv2d_int(x, tf.zeros((2,), tf.int32), kernel, e, strides=1, padding="SAME")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"out_backprop"):
        ops.conv2d_backprop_input_int(
            tf.constant([1, 5, 5, 3]), kernel, e, tf.ones((1, 4, 4, 2), tf.int16), e,
            strides=1, padding="SAME",
        )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"filter_sizes"):
        ops.conv2d_backprop_filter_int(
            x, e, tf.constant([3, 3, 3]), tf.ones((1, 5, 5, 2), tf.int16), e,
            strides=1, padding="SAME",
        )


def test_conv2d_rejects_bad_attrs():
    # The Python wrapper may reject these before the op's own attribute check.
    x = tf.ones((1, 5, 5, 3), tf.int16)
    kernel = tf.ones((3, 3, 3, 2), tf.int16)
    e = exponent(0)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=r"FULL"):
        ops.conv2d_int(x, e, kernel, e, strides=1, padding="FULL")
    with pytest.raises(
        (tf.errors.InvalidArgumentError, ValueError), match=r"strides=\[2, 2, 2, 1\]"
    ):
        ops.conv2d_int(x, e, kernel, e, strides=[2, 2, 2, 1], padding="SAME")
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=r"dilations=0"):
        ops.conv2d_int(x, e, kernel, e, strides=1, padding="SAME", dilations=0)


def test_matmul_rejects_bad_shapes():
    e = exponent(0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"inner dimensions"):
        ops.matmul_int(tf.ones((2, 3), tf.int16), e, tf.ones((2, 3), tf.int16), e)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"rank 2"):
        ops.matmul_int(tf.ones((2, 3, 1), tf.int16), e, tf.ones((3, 3), tf.int16), e)


def test_reduction_longer_than_2_pow_32_rejected():
    # Zero-size operands keep memory small while the reduction length is 2**33.
    e = exponent(0)
    length = 2**33
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"reduction length"):
        ops.matmul_int(tf.zeros((0, length), tf.int16), e, tf.zeros((length, 0), tf.int16), e)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"reduction length"):
        ops.conv2d_backprop_filter_int(
            tf.zeros((length, 1, 1, 0), tf.int16), e, tf.constant([1, 1, 0, 0]),
            tf.zeros((length, 1, 1, 0), tf.int16), e, strides=1, padding="VALID",
        )


# ---------------------------------------------------------------------------
# Differentiable float ops: forward and gradients equal the reference pipeline.
# ---------------------------------------------------------------------------

# ops.conv2d and ops.matmul quantize the activation, weight and gradient with
# seeds seed, seed ^ 1 and seed ^ 2.
PIPELINE_ROUNDINGS = [("nearest_even", 0), ("stochastic", 12345)]


@pytest.mark.parametrize("rounding, seed", PIPELINE_ROUNDINGS)
@pytest.mark.parametrize(
    "strides, padding, dilations", [(1, "SAME", 1), (2, "VALID", 1), (1, "SAME", 2)]
)
def test_conv2d_float_op_matches_reference(rng, rounding, seed, strides, padding, dilations):
    x = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, 3, 5)) * 0.1).astype(np.float32)
    attrs = {"strides": strides, "padding": padding, "dilations": dilations}
    out_shape = reference.conv2d_output_shape(x.shape, kernel.shape, **attrs)
    dy = (rng.standard_normal(out_shape) * 1e-3).astype(np.float32)

    x_tf = tf.constant(x)
    kernel_tf = tf.constant(kernel)
    with tf.GradientTape() as tape:
        tape.watch([x_tf, kernel_tf])
        y = ops.conv2d(x_tf, kernel_tf, rounding=rounding, seed=seed, **attrs)
    dx, dkernel = tape.gradient(y, [x_tf, kernel_tf], output_gradients=tf.constant(dy))

    x_m, x_e = reference.quantize(x, rounding, seed)
    w_m, w_e = reference.quantize(kernel, rounding, seed ^ 1)
    dy_m, dy_e = reference.quantize(dy, rounding, seed ^ 2)
    assert_float32_bits_equal(y.numpy(), reference.conv2d(x_m, x_e, w_m, w_e, **attrs))
    assert_float32_bits_equal(
        dx.numpy(), reference.conv2d_backprop_input(x.shape, w_m, w_e, dy_m, dy_e, **attrs)
    )
    assert_float32_bits_equal(
        dkernel.numpy(),
        reference.conv2d_backprop_filter(x_m, x_e, kernel.shape, dy_m, dy_e, **attrs),
    )


@pytest.mark.parametrize("rounding, seed", PIPELINE_ROUNDINGS)
def test_matmul_float_op_matches_reference(rng, rounding, seed):
    a = rng.standard_normal((6, 40)).astype(np.float32)
    b = (rng.standard_normal((40, 7)) * 0.05).astype(np.float32)
    dy = rng.standard_normal((6, 7)).astype(np.float32)

    a_tf = tf.constant(a)
    b_tf = tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([a_tf, b_tf])
        y = ops.matmul(a_tf, b_tf, rounding=rounding, seed=seed)
    da, db = tape.gradient(y, [a_tf, b_tf], output_gradients=tf.constant(dy))

    a_m, a_e = reference.quantize(a, rounding, seed)
    b_m, b_e = reference.quantize(b, rounding, seed ^ 1)
    dy_m, dy_e = reference.quantize(dy, rounding, seed ^ 2)
    assert_float32_bits_equal(y.numpy(), reference.matmul(a_m, a_e, b_m, b_e))
    assert_float32_bits_equal(
        da.numpy(), reference.matmul(dy_m, dy_e, b_m, b_e, transpose_b=True)
    )
    assert_float32_bits_equal(
        db.numpy(), reference.matmul(a_m, a_e, dy_m, dy_e, transpose_a=True)
    )
