"""Property-based fuzzing of the DFP16 ops against keras_dfp.reference.

Hypothesis draws conv geometries (batch, sizes, kernel, strides, dilations,
padding, channels), matmul shapes with transpose flags, exponents (extremes
included, so results overflow to +-inf or underflow to subnormals and 0),
mantissa patterns (full-range random, all -32768, all 32767, 0, and mixes of
the extremes) and the kernel path. Every op result must equal the reference
bit for bit. Quantize is fuzzed with float32 arrays that contain subnormals,
+-float32 max, powers of two and values that round up past 32767.

The runs are derandomized, so every run draws the same examples. The five
tests share a total of 500 examples by default (100 each). The environment
variable KERAS_DFP_FUZZ_EXAMPLES sets another total, split evenly and rounded
up, for example 10,000 examples (2,000 per test) with

    KERAS_DFP_FUZZ_EXAMPLES=10000 python -m pytest tests/test_fuzz_exact.py

docs/testing.md records the last such run.
"""

import os

import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_dfp import ops
from keras_dfp import reference

FUZZ_TESTS = 5
TOTAL_EXAMPLES = int(os.environ.get("KERAS_DFP_FUZZ_EXAMPLES", "500"))
EXAMPLES_PER_TEST = -(-TOTAL_EXAMPLES // FUZZ_TESTS)

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_TEST,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SUPPORTED_PATHS = ops.supported_kernel_paths()

# Exponents of quantized tensors lie in [-163, 113]. The ops accept any int32,
# so the extremes of int32 check that the exponent sum cannot wrap.
EXPONENTS = st.one_of(
    st.integers(-163, 113),
    st.sampled_from([-163, -160, -150, -149, -126, -75, 0, 64, 100, 110, 113]),
    st.sampled_from([-(2**31), -1000, 1000, 2**31 - 1]),
)

MANTISSA_KINDS = ("random", "min", "max", "zero", "extremes", "ternary", "sparse")
FLOAT32_MAX = np.finfo(np.float32).max


def make_mantissas(kind, seed, shape):
    """Return int16 mantissas of one pattern, generated from a seed."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(-32768, 32768, shape).astype(np.int16)
    if kind == "min":
        return np.full(shape, -32768, np.int16)
    if kind == "max":
        return np.full(shape, 32767, np.int16)
    if kind == "zero":
        return np.zeros(shape, np.int16)
    if kind == "extremes":
        return rng.choice(np.array([-32768, 32767, 0], np.int16), shape)
    if kind == "ternary":
        return rng.integers(-1, 2, shape).astype(np.int16)
    if kind == "sparse":
        values = rng.integers(-32768, 32768, shape).astype(np.int16)
        values[rng.random(shape) < 0.9] = 0
        return values
    raise ValueError(f"Expected a kind in {MANTISSA_KINDS}. Received: kind={kind!r}")


@st.composite
def mantissas(draw, shape):
    kind = draw(st.sampled_from(MANTISSA_KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_mantissas(kind, seed, shape)


def assert_float32_bits_equal(actual, expected):
    """Compare float32 arrays bit for bit, so -0.0 differs from 0.0."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32))


def use_kernel_path(path):
    """Select `path` if it differs from the active one (selection logs once)."""
    if ops.get_kernel_path() != path:
        ops.set_kernel_path(path)


def spatial_size(draw, kernel, dilation, padding):
    """Draw an input size for one axis.

    VALID inputs start at the dilated kernel size, because smaller ones are an
    error (as in tf.nn.conv2d); SAME inputs include size 0.
    """
    if padding == "VALID":
        effective = (kernel - 1) * dilation + 1
        return draw(st.integers(effective, effective + 10))
    return draw(st.integers(0, 12))


@st.composite
def conv_problems(draw):
    """Draw a conv geometry, the three mantissa operands and three exponents."""
    padding = draw(st.sampled_from(["SAME", "VALID"]))
    kernel_h = draw(st.integers(1, 7))
    kernel_w = draw(st.integers(1, 7))
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    channels = st.one_of(st.integers(0, 9), st.sampled_from([16, 17, 31, 33, 65]))
    batch = draw(st.integers(0, 3))
    in_h = spatial_size(draw, kernel_h, dilation[0], padding)
    in_w = spatial_size(draw, kernel_w, dilation[1], padding)
    in_c = draw(channels)
    out_c = draw(channels)

    attrs = {"strides": stride, "padding": padding, "dilations": dilation}
    x_shape = (batch, in_h, in_w, in_c)
    w_shape = (kernel_h, kernel_w, in_c, out_c)
    dy_shape = reference.conv2d_output_shape(x_shape, w_shape, **attrs)
    return {
        "x": draw(mantissas(x_shape)),
        "w": draw(mantissas(w_shape)),
        "dy": draw(mantissas(dy_shape)),
        "x_e": draw(EXPONENTS),
        "w_e": draw(EXPONENTS),
        "dy_e": draw(EXPONENTS),
        "attrs": attrs,
        "path": draw(st.sampled_from(SUPPORTED_PATHS)),
    }


@FUZZ_SETTINGS
@given(problem=conv_problems())
def test_conv2d_fuzz(problem):
    p = problem
    use_kernel_path(p["path"])
    actual = ops.conv2d_int(p["x"], p["x_e"], p["w"], p["w_e"], **p["attrs"])
    expected = reference.conv2d(p["x"], p["x_e"], p["w"], p["w_e"], **p["attrs"])
    assert_float32_bits_equal(actual, expected)


@FUZZ_SETTINGS
@given(problem=conv_problems())
def test_conv2d_backprop_input_fuzz(problem):
    p = problem
    use_kernel_path(p["path"])
    input_sizes = p["x"].shape
    actual = ops.conv2d_backprop_input_int(
        input_sizes, p["w"], p["w_e"], p["dy"], p["dy_e"], **p["attrs"]
    )
    expected = reference.conv2d_backprop_input(
        input_sizes, p["w"], p["w_e"], p["dy"], p["dy_e"], **p["attrs"]
    )
    assert_float32_bits_equal(actual, expected)


@FUZZ_SETTINGS
@given(problem=conv_problems())
def test_conv2d_backprop_filter_fuzz(problem):
    p = problem
    use_kernel_path(p["path"])
    filter_sizes = p["w"].shape
    actual = ops.conv2d_backprop_filter_int(
        p["x"], p["x_e"], filter_sizes, p["dy"], p["dy_e"], **p["attrs"]
    )
    expected = reference.conv2d_backprop_filter(
        p["x"], p["x_e"], filter_sizes, p["dy"], p["dy_e"], **p["attrs"]
    )
    assert_float32_bits_equal(actual, expected)


@st.composite
def matmul_problems(draw):
    """Draw matmul operands (stored transposed when the flag is set)."""
    m = draw(st.integers(0, 40))
    n = draw(st.integers(0, 40))
    # Reductions beyond one 256-term block and beyond 2**31 / 2**30 terms' worth.
    k = draw(st.one_of(st.integers(0, 70), st.sampled_from([255, 256, 257, 1031, 4099])))
    transpose_a = draw(st.booleans())
    transpose_b = draw(st.booleans())
    a_shape = (k, m) if transpose_a else (m, k)
    b_shape = (n, k) if transpose_b else (k, n)
    return {
        "a": draw(mantissas(a_shape)),
        "b": draw(mantissas(b_shape)),
        "a_e": draw(EXPONENTS),
        "b_e": draw(EXPONENTS),
        "transpose_a": transpose_a,
        "transpose_b": transpose_b,
        "path": draw(st.sampled_from(SUPPORTED_PATHS)),
    }


@FUZZ_SETTINGS
@given(problem=matmul_problems())
def test_matmul_fuzz(problem):
    p = problem
    use_kernel_path(p["path"])
    args = (p["a"], p["a_e"], p["b"], p["b_e"], p["transpose_a"], p["transpose_b"])
    actual = ops.matmul_int(*args)
    expected = reference.matmul(*args)
    assert_float32_bits_equal(actual, expected)


@st.composite
def boundary_floats(draw):
    """Draw float32 arrays whose largest element rounds to or past 32767.

    Elements are s * 2**e with one shared e, where s includes 32767.25,
    32767.5 (a tie that rounds to 32768 and saturates), 32767.75, their
    negatives, other ties and random values below 2**15.
    """
    exponent = draw(st.integers(-163, 113))
    size = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    special = np.array(
        [32767.25, 32767.5, 32767.75, -32767.5, -32767.75, 16384.5, 2.5, -0.5, 0.0]
    )
    scaled = np.concatenate(
        [rng.choice(special, size), rng.uniform(-32768, 32768, size).round(2)]
    )
    with np.errstate(over="ignore"):
        values = np.ldexp(scaled, exponent).astype(np.float32)
    # Scaling past float32 max gives inf, which quantize rejects by design.
    return np.where(np.isfinite(values), values, np.float32(FLOAT32_MAX))


FLOAT32_ARRAYS = st.one_of(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=8),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    hnp.arrays(
        np.float32,
        st.integers(1, 30),
        elements=st.one_of(
            st.sampled_from([FLOAT32_MAX, -FLOAT32_MAX, 2.0**-149, -(2.0**-149)]),
            st.integers(-149, 127).map(lambda e: np.float32(2.0**e)),
            st.floats(
                min_value=-(2.0**-126), max_value=2.0**-126, width=32,
                allow_subnormal=True,
            ),
        ),
    ),
    boundary_floats(),
)


@FUZZ_SETTINGS
@given(
    x=FLOAT32_ARRAYS,
    rounding=st.sampled_from(["nearest_even", "stochastic"]),
    seed=st.integers(-(2**63), 2**63 - 1),
)
def test_quantize_fuzz(x, rounding, seed):
    mantissa, exponent = ops.quantize(tf.constant(x), rounding=rounding, seed=seed)
    expected_mantissa, expected_exponent = reference.quantize(x, rounding, seed)
    mantissa = mantissa.numpy()

    assert mantissa.dtype == np.int16
    np.testing.assert_array_equal(mantissa, expected_mantissa)
    assert int(exponent) == expected_exponent
    # Quantization never produces -32768, and the exponent stays in range.
    assert not np.any(mantissa == -32768)
    assert -163 <= int(exponent) <= 113
