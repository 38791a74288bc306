"""Tests of the NumPy DFP16 reference (keras_dfp.reference) against independent oracles."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf

from keras_dfp import reference

FLOAT32_MAX = float(np.finfo(np.float32).max)
SMALLEST_SUBNORMAL = 2.0**-149
LARGEST_SUBNORMAL = (2**23 - 1) * 2.0**-149


# ---------------------------------------------------------------------------
# Independent oracles.
# ---------------------------------------------------------------------------


def _float32_as_fraction(value):
    """Return the exact value of a float32, with +-inf standing for +-2**128.

    IEEE round to nearest overflows to inf exactly when rounding with an
    unbounded exponent would give 2**128, which has an even significand, so
    treating inf as 2**128 makes "nearest, ties to even" pick inf correctly.
    """
    if np.isinf(value):
        return Fraction(2**128) if value > 0 else Fraction(-(2**128))
    return Fraction(float(value))


def _is_even_significand(value):
    if np.isinf(value):
        return True
    return int(np.float32(value).view(np.int32)) & 1 == 0


def exact_float32(numerator, exponent):
    """Return the float32 nearest to numerator * 2**exponent, ties to even.

    Uses exact rational arithmetic: a first guess from Python's correctly
    rounded Fraction -> float64 conversion, then the nearest of that float32
    and its two neighbours.
    """
    value = Fraction(int(numerator)) * Fraction(2) ** int(exponent)
    if value == 0:
        return np.float32(0.0)
    if abs(value) > 2**129:
        return np.float32(np.inf if value > 0 else -np.inf)
    with np.errstate(over="ignore"):
        guess = np.float32(float(value))
        candidates = [
            np.nextafter(guess, np.float32(-np.inf)),
            guess,
            np.nextafter(guess, np.float32(np.inf)),
        ]
    best = None
    for candidate in candidates:
        distance = abs(_float32_as_fraction(candidate) - value)
        if best is None or distance < best[0]:
            best = (distance, candidate)
        elif distance == best[0] and _is_even_significand(candidate):
            best = (distance, candidate)
    return np.float32(best[1])


def splitmix64_python(z):
    """splitmix64 finalizer on Python ints, masked to 64 bits."""
    mask = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def assert_bitwise_equal(actual, expected):
    """Compare float32 arrays bit for bit (distinguishes -0.0 from 0.0)."""
    actual = np.asarray(actual, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float32)
    np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32))


# ---------------------------------------------------------------------------
# Quantize: rounding, exponent, saturation, special values.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale_power", [0, -20, 30, -130])
def test_quantize_ties_round_to_even(scale_power):
    # 16384 = 2**14 sets the exponent to scale_power, so s equals the listed values.
    values = np.array([16384, 2.5, 3.5, -2.5, -3.5, 0.5, 1.5, -0.5, 16383.5])
    x = np.ldexp(values, scale_power).astype(np.float32)
    mantissa, exponent = reference.quantize(x)
    assert exponent == scale_power
    np.testing.assert_array_equal(mantissa, [16384, 2, 4, -2, -4, 0, 2, 0, 16384])
    assert mantissa.dtype == np.int16


@pytest.mark.parametrize("power", list(range(-149, 128)))
def test_quantize_power_of_two_exponent(power):
    x = np.array([np.ldexp(1.0, power)], dtype=np.float32)
    mantissa, exponent = reference.quantize(x)
    assert exponent == power - 14
    np.testing.assert_array_equal(mantissa, [16384])


@pytest.mark.parametrize(
    "max_value, expected_mantissa",
    [
        (32767.0, 32767),
        (32767.25, 32767),
        (32767.5, 32767),  # round half to even gives 32768: saturates
        (32767.75, 32767),  # rounds to 32768: saturates
        (32766.5, 32766),  # tie, even neighbour below
        (-32767.5, -32767),
        (-32767.75, -32767),
        (-32767.0, -32767),
    ],
)
def test_quantize_saturates_below_2_pow_15(max_value, expected_mantissa):
    x = np.array([max_value, 1.0, -0.25], dtype=np.float32)
    mantissa, exponent = reference.quantize(x)
    assert exponent == 0
    np.testing.assert_array_equal(mantissa, [expected_mantissa, 1, 0])


def test_quantize_never_produces_minus_32768(rng):
    x = rng.standard_normal(10000).astype(np.float32)
    x[17] = -np.abs(x).max() * np.float32(1.99999)
    for rounding in reference.ROUNDING_MODES:
        mantissa, _ = reference.quantize(x, rounding=rounding, seed=3)
        assert mantissa.min() >= -32767
        assert mantissa.max() <= 32767


@pytest.mark.parametrize(
    "value, expected_exponent, expected_mantissa",
    [
        (SMALLEST_SUBNORMAL, -163, 16384),
        (3 * SMALLEST_SUBNORMAL, -162, 24576),
        # (2**23 - 1) / 2**8 = 32767.996 rounds to 32768 and saturates.
        (LARGEST_SUBNORMAL, -141, 32767),
        (float(np.finfo(np.float32).tiny), -140, 16384),
        # (2 - 2**-23) * 2**14 = 32768 - 2**-9 rounds to 32768 and saturates.
        (FLOAT32_MAX, 113, 32767),
        (-FLOAT32_MAX, 113, -32767),
    ],
)
def test_quantize_extreme_magnitudes(value, expected_exponent, expected_mantissa):
    x = np.array([value], dtype=np.float32)
    mantissa, exponent = reference.quantize(x)
    assert exponent == expected_exponent
    np.testing.assert_array_equal(mantissa, [expected_mantissa])


def test_quantize_max_element_scales_into_range(rng):
    for power in range(-140, 120, 7):
        x = (rng.standard_normal(257) * 2.0**power).astype(np.float32)
        mantissa, exponent = reference.quantize(x)
        max_abs = float(np.abs(x).max())
        assert 2**14 <= max_abs * 2.0**-exponent < 2**15
        assert np.abs(mantissa.astype(np.int64)).max() >= 2**14


def test_quantize_nearest_error_at_most_half_step(rng):
    x = (rng.standard_normal(5000) * 1e-3).astype(np.float32)
    mantissa, exponent = reference.quantize(x)
    error = mantissa.astype(np.float64) * 2.0**exponent - x.astype(np.float64)
    assert np.abs(error).max() <= 0.5 * 2.0**exponent


@pytest.mark.parametrize("rounding", reference.ROUNDING_MODES)
@pytest.mark.parametrize("shape", [(0,), (2, 0, 3), (3, 4), ()])
def test_quantize_zero_and_empty(rounding, shape):
    x = np.zeros(shape, dtype=np.float32)
    if x.size:
        x.ravel()[0] = -0.0
    mantissa, exponent = reference.quantize(x, rounding=rounding, seed=1)
    assert exponent == 0
    assert mantissa.shape == shape
    assert mantissa.dtype == np.int16
    assert not mantissa.any()


@pytest.mark.parametrize(
    "bad_value, kind", [(np.nan, "NaN"), (np.inf, r"\+Inf"), (-np.inf, "-Inf")]
)
def test_quantize_non_finite_raises(bad_value, kind):
    x = np.ones((2, 3), dtype=np.float32)
    x[1, 1] = bad_value
    with pytest.raises(
        ValueError, match=rf"'conv1 \(activation\)'.*{kind} at flat index 4 .*\[2, 3\]"
    ):
        reference.quantize(x, tensor_name="conv1 (activation)")


def test_quantize_rejects_float64_and_bad_rounding():
    with pytest.raises(TypeError, match=r"Received: x.dtype=float64"):
        reference.quantize(np.ones(3))
    with pytest.raises(ValueError, match=r"Received: rounding='up'"):
        reference.quantize(np.ones(3, np.float32), rounding="up")


# ---------------------------------------------------------------------------
# Stochastic rounding.
# ---------------------------------------------------------------------------


def test_splitmix64_known_values():
    # First outputs of the splitmix64 generator started from state 0.
    assert int(reference.splitmix64(np.uint64(0))) == 0xE220A8397B1DCDAF
    assert int(reference.splitmix64(np.uint64(0x9E3779B97F4A7C15))) == (
        0x6E789E6AA1B965F4
    )


@pytest.mark.parametrize("seed", [0, 1, -1, 2**63 - 1, -(2**63), 123456789])
def test_stochastic_uniforms_match_python_hash(seed):
    uniforms = reference.stochastic_uniforms(seed, 64)
    seed_hash = splitmix64_python(seed & ((1 << 64) - 1))
    expected = [
        Fraction(splitmix64_python(seed_hash ^ i) >> 11, 2**53) for i in range(64)
    ]
    assert [Fraction(float(u)) for u in uniforms] == expected


def test_stochastic_reproducible_from_seed(rng):
    x = rng.standard_normal((64, 33)).astype(np.float32)
    first, e1 = reference.quantize(x, rounding="stochastic", seed=42)
    second, e2 = reference.quantize(x, rounding="stochastic", seed=42)
    other, _ = reference.quantize(x, rounding="stochastic", seed=43)
    np.testing.assert_array_equal(first, second)
    assert e1 == e2
    assert (first != other).any()


def test_stochastic_depends_only_on_index(rng):
    # Same seed, same max element: a prefix quantizes to the same mantissas.
    x = rng.standard_normal(1000).astype(np.float32)
    x[0] = 8.0
    full, _ = reference.quantize(x, rounding="stochastic", seed=9)
    prefix, _ = reference.quantize(x[:300], rounding="stochastic", seed=9)
    np.testing.assert_array_equal(full[:300], prefix)


@pytest.mark.parametrize("fraction", [0.125, 0.25, 1 / 3, 0.5, 0.9])
def test_stochastic_round_up_probability(fraction):
    count = 100_000
    x = np.full(count, 100.0 + fraction, dtype=np.float32)
    x[0] = 16384.0  # fixes the exponent at 0, so s = x
    mantissa, exponent = reference.quantize(x, rounding="stochastic", seed=2024)
    assert exponent == 0
    rest = mantissa[1:].astype(np.int64)
    assert set(np.unique(rest)) <= {100, 101}
    # Binomial: 6 standard deviations gives a false failure rate near 1e-9.
    p = float(np.float32(100.0 + fraction)) - 100.0
    bound = 6 * math.sqrt(p * (1 - p) / rest.size)
    assert abs(np.mean(rest == 101) - p) <= bound


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_stochastic_symmetric_for_negatives(fraction):
    count = 100_000
    magnitudes = {}
    for sign in (1.0, -1.0):
        x = np.full(count, sign * (100.0 + fraction), dtype=np.float32)
        x[0] = 16384.0  # fixes the exponent at 0, so s = x
        mantissa, exponent = reference.quantize(x, rounding="stochastic", seed=31)
        assert exponent == 0
        magnitudes[sign] = np.abs(mantissa[1:].astype(np.int64))
    bound = 6 * math.sqrt(fraction * (1 - fraction) / (count - 1))
    for sign, values in magnitudes.items():
        assert set(np.unique(values)) <= {100, 101}, sign
        # |s| = 100 + fraction moves away from zero with probability fraction
        # for either sign: s - floor(s) is 1 - fraction for negative s.
        assert abs(np.mean(values == 101) - fraction) <= bound, sign


def test_stochastic_rounding_unbiased(rng):
    count = 200_000
    x = rng.uniform(-1, 1, count).astype(np.float32)
    mantissa, exponent = reference.quantize(x, rounding="stochastic", seed=77)
    error = mantissa.astype(np.float64) * 2.0**exponent - x.astype(np.float64)
    step = 2.0**exponent
    assert np.abs(error).max() < step
    # An element with fraction f has error mean 0 and variance
    # f * (1 - f) * step**2 <= step**2 / 4. The mean of count independent
    # errors thus has standard deviation <= step / (2 * sqrt(count)), and the
    # check allows 6 of them.
    assert abs(error.mean()) <= 6 * step / (2 * math.sqrt(count))


def test_stochastic_integers_unchanged():
    x = np.array([16384, -3, 0, 7, -16000], dtype=np.float32)
    mantissa, exponent = reference.quantize(x, rounding="stochastic", seed=5)
    assert exponent == 0
    np.testing.assert_array_equal(mantissa, x.astype(np.int16))


def test_stochastic_saturates():
    # s = 32767.75 rounds up to 32768 with probability 3/4 and must saturate.
    x = np.full(1000, 32767.75, dtype=np.float32)
    x[::2] *= -1
    mantissa, _ = reference.quantize(x, rounding="stochastic", seed=11)
    np.testing.assert_array_equal(np.abs(mantissa.astype(np.int64)), 32767)


# ---------------------------------------------------------------------------
# Dequantize and to_float32_scaled against the exact rational oracle.
# ---------------------------------------------------------------------------


def _adversarial_sums():
    """Return (sum, exponent) pairs at rounding ties, overflow and underflow."""
    cases = []
    even = 2**23 + 2  # 24-bit significand with even last bit
    odd = 2**23 + 3
    for significand in (even, odd):
        for low_bits in (38, 30):
            tie = (2 * significand + 1) << low_bits  # halfway between floats
            for delta in (-1, 0, 1):
                for sign in (1, -1):
                    cases.append((sign * (tie + delta), -40))
    # Exactly 2**53 and its neighbours, where float64 stops being exact.
    for delta in range(-2, 3):
        cases.append(((1 << 53) + delta, 0))
    # Subnormal results: 0.5, 1.5 and just above 0.5 units of 2**-149.
    cases += [(1, -150), (3, -150), (-3, -150), (1, -151), (5, -151)]
    cases += [((1 << 62) + 1, -212), ((1 << 62) - 1, -212), ((3 << 60) + 1, -211)]
    cases += [(2**23 - 1, -149), (2**23, -149), (1, -149), (1, -1000)]
    # Overflow: float32 max is (2**24 - 1) * 2**104. The tie between it and
    # 2**128 is (2**25 - 1) * 2**103, which goes to inf (even significand).
    tie_with_inf = (2**25 - 1) << 37
    cases += [(tie_with_inf, 66), (tie_with_inf - 1, 66), (-tie_with_inf, 66)]
    cases += [((2**24 - 1) << 39, 65), (1 << 62, 66), (1 << 62, 65), (1, 2000)]
    cases += [(-(1 << 63), 0), ((1 << 63) - 1, 0), (-(1 << 63), -200), (0, 0), (0, 500)]
    return cases


@pytest.mark.parametrize("total, exponent", _adversarial_sums())
def test_to_float32_scaled_adversarial(total, exponent):
    actual = reference.to_float32_scaled(np.array([total], dtype=np.int64), exponent)
    assert_bitwise_equal(actual, [exact_float32(total, exponent)])


def test_to_float32_scaled_random(rng):
    count = 3000
    bit_lengths = rng.integers(0, 64, count)
    magnitudes = [int(rng.integers(0, 2**62)) >> (62 - min(b, 62)) for b in bit_lengths]
    magnitudes = [m | (1 << 62) if b == 63 else m for m, b in zip(magnitudes, bit_lengths)]
    signs = rng.choice([-1, 1], count)
    totals = [int(s) * m for s, m in zip(signs, magnitudes)]
    exponents = rng.integers(-260, 100, count)
    actual = np.array(
        [
            reference.to_float32_scaled(np.array([t], np.int64), int(e))[0]
            for t, e in zip(totals, exponents)
        ]
    )
    expected = [exact_float32(t, e) for t, e in zip(totals, exponents)]
    assert_bitwise_equal(actual, expected)


def test_to_float32_scaled_vectorized_matches_elementwise(rng):
    totals = rng.integers(-(2**62), 2**62, 500, dtype=np.int64)
    totals[::7] >>= 20
    vectorized = reference.to_float32_scaled(totals.reshape(20, 25), -30)
    expected = [exact_float32(int(t), -30) for t in totals]
    assert_bitwise_equal(vectorized.ravel(), expected)


@pytest.mark.parametrize("exponent", [-163, -160, -150, -140, -20, 0, 100, 113, 114, 200])
def test_dequantize_exact(exponent):
    mantissa = np.array([-32768, -32767, -1, 0, 1, 3, 12345, 32767], dtype=np.int16)
    actual = reference.dequantize(mantissa, exponent)
    assert actual.dtype == np.float32
    assert_bitwise_equal(actual, [exact_float32(int(m), exponent) for m in mantissa])


def test_quantize_dequantize_round_trip_exact(rng):
    # Values with at most 15 significant bits below the max survive exactly.
    ints = rng.integers(-32767, 32768, 1000)
    ints[0] = 20000
    x = np.ldexp(ints.astype(np.float64), -40).astype(np.float32)
    mantissa, exponent = reference.quantize(x)
    np.testing.assert_array_equal(reference.dequantize(mantissa, exponent), x)


# ---------------------------------------------------------------------------
# Reference convolutions and matmul against TensorFlow in float64.
# ---------------------------------------------------------------------------


def _random_mantissas(rng, shape, low=-300, high=300):
    return rng.integers(low, high, shape).astype(np.int16)


CONV_CASES = [
    # (N, H, W, C, KH, KW, O, stride, padding, dilation)
    (2, 5, 7, 3, 3, 2, 4, 1, "SAME", 1),
    (1, 6, 6, 1, 3, 3, 2, 2, "SAME", 1),
    (2, 7, 5, 3, 2, 3, 1, 2, "VALID", 1),
    (1, 8, 9, 2, 3, 3, 3, (2, 1), "SAME", 1),
    (1, 9, 8, 2, 3, 2, 2, 1, "SAME", 2),
    (2, 9, 9, 3, 3, 3, 2, 1, "VALID", (2, 1)),
    (1, 4, 4, 17, 1, 1, 5, [1, 2, 2, 1], "VALID", [1, 1, 1, 1]),
    (1, 3, 3, 2, 5, 5, 2, 1, "SAME", 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_reference_conv2d_matches_tf(rng, case):
    n, h, w, c, kh, kw, o, stride, padding, dilation = case
    x = _random_mantissas(rng, (n, h, w, c))
    kernel = _random_mantissas(rng, (kh, kw, c, o))
    actual = reference.conv2d_int64(x, kernel, stride, padding, dilation)
    # float64 sums of these small integers are exact.
    expected = tf.nn.conv2d(
        x.astype(np.float64),
        kernel.astype(np.float64),
        strides=stride,
        padding=padding,
        dilations=dilation,
    ).numpy()
    assert actual.shape == expected.shape
    assert actual.shape == reference.conv2d_output_shape(
        x.shape, kernel.shape, stride, padding, dilation
    )
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("case", CONV_CASES)
def test_reference_conv2d_backprops(rng, case):
    n, h, w, c, kh, kw, o, stride, padding, dilation = case
    x = _random_mantissas(rng, (n, h, w, c))
    kernel = _random_mantissas(rng, (kh, kw, c, o))
    out_shape = reference.conv2d_output_shape(x.shape, kernel.shape, stride, padding, dilation)
    dy = _random_mantissas(rng, out_shape)
    dx = reference.conv2d_backprop_input_int64(x.shape, kernel, dy, stride, padding, dilation)
    dw = reference.conv2d_backprop_filter_int64(x, kernel.shape, dy, stride, padding, dilation)
    assert dx.shape == x.shape
    assert dw.shape == kernel.shape

    # Adjoint identities: <conv(x, w), dy> = <x, dx> = <w, dw>, exact in int64.
    y = reference.conv2d_int64(x, kernel, stride, padding, dilation)
    inner = int(np.sum(y * dy.astype(np.int64)))
    assert int(np.sum(x.astype(np.int64) * dx)) == inner
    assert int(np.sum(kernel.astype(np.int64) * dw)) == inner

    if _spatial_pair_max(dilation) > 1:
        return  # TensorFlow's CPU backprop kernels reject dilation > 1.
    x64 = tf.constant(x.astype(np.float64))
    w64 = tf.constant(kernel.astype(np.float64))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x64, w64])
        y64 = tf.nn.conv2d(x64, w64, strides=stride, padding=padding, dilations=dilation)
    dx_tf, dw_tf = tape.gradient(y64, [x64, w64], output_gradients=dy.astype(np.float64))
    np.testing.assert_array_equal(dx, dx_tf.numpy())
    np.testing.assert_array_equal(dw, dw_tf.numpy())


def _spatial_pair_max(value):
    return max(np.atleast_1d(value))


@pytest.mark.parametrize("transpose_a, transpose_b", list(itertools.product([False, True], repeat=2)))
def test_reference_matmul_matches_numpy(rng, transpose_a, transpose_b):
    a = _random_mantissas(rng, (5, 7), -32768, 32768)
    b = _random_mantissas(rng, (7, 3), -32768, 32768)
    a_in = a.T.copy() if transpose_a else a
    b_in = b.T.copy() if transpose_b else b
    actual = reference.matmul_int64(a_in, b_in, transpose_a, transpose_b)
    expected = [[sum(int(a[i, k]) * int(b[k, j]) for k in range(7)) for j in range(3)] for i in range(5)]
    np.testing.assert_array_equal(actual, expected)
    scaled = reference.matmul(a_in, -20, b_in, -25, transpose_a, transpose_b)
    assert_bitwise_equal(scaled, [[exact_float32(v, -45) for v in row] for row in expected])


def test_reference_matmul_long_reduction_exceeds_int32():
    k = 4096
    a = np.full((2, k), -32768, dtype=np.int16)
    b = np.full((k, 3), -32768, dtype=np.int16)
    total = reference.matmul_int64(a, b)
    np.testing.assert_array_equal(total, np.full((2, 3), k * 2**30, dtype=np.int64))
    assert total[0, 0] > 2**31


def test_reference_zero_size_shapes():
    x = np.zeros((0, 5, 5, 3), np.int16)
    kernel = np.ones((3, 3, 3, 4), np.int16)
    assert reference.conv2d(x, 0, kernel, 0, 1, "SAME").shape == (0, 5, 5, 4)
    empty_channels = reference.conv2d(
        np.ones((1, 4, 4, 0), np.int16), 0, np.ones((2, 2, 0, 3), np.int16), 0
    )
    np.testing.assert_array_equal(empty_channels, np.zeros((1, 3, 3, 3), np.float32))
    np.testing.assert_array_equal(
        reference.matmul(np.ones((2, 0), np.int16), 0, np.ones((0, 3), np.int16), 0),
        np.zeros((2, 3), np.float32),
    )


def test_reference_rejects_bad_arguments():
    x = np.ones((1, 4, 4, 3), np.int16)
    kernel = np.ones((2, 2, 2, 1), np.int16)
    with pytest.raises(ValueError, match=r"input channels to equal"):
        reference.conv2d_int64(x, kernel)
    with pytest.raises(ValueError, match=r"Received: padding='FULL'"):
        reference.conv2d_int64(x, np.ones((2, 2, 3, 1), np.int16), 1, "FULL")
    with pytest.raises(ValueError, match=r"Received: strides=\[2, 2, 2, 1\]"):
        reference.conv2d_int64(x, np.ones((2, 2, 3, 1), np.int16), [2, 2, 2, 1])
    with pytest.raises(ValueError, match=r"dilated kernel height=5"):
        reference.conv2d_int64(x, np.ones((3, 1, 3, 1), np.int16), 1, "VALID", 2)
    with pytest.raises(ValueError, match=r"inner dimensions"):
        reference.matmul_int64(np.ones((2, 3), np.int16), np.ones((2, 3), np.int16))
    with pytest.raises(ValueError, match=r"out_backprop of shape \[1, 3, 3, 1\]"):
        reference.conv2d_backprop_input_int64(
            [1, 4, 4, 3], np.ones((2, 2, 3, 1), np.int16), np.ones((1, 4, 4, 1), np.int16)
        )
    with pytest.raises(TypeError, match=r"integer scalar"):
        reference.matmul(np.ones((2, 2), np.int16), 1.5, np.ones((2, 2), np.int16), 0)
