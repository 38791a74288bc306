"""NumPy reference for DFP16 numerics and the integer convolution/matmul ops.

This module is the oracle that the C++ kernels are tested against bit for bit.
It favours obvious correctness over speed and does not load the C++ library.

A DFP16 tensor is an int16 mantissa array `m` and one integer exponent `e`,
representing `m * 2**e`.

Quantization of float32 `x`:

- `e = ilogb(max|x|) - 14`, so the largest element scales to `|s|` in
  `[2**14, 2**15)` where `s = x * 2**-e` (exact in float64).
- `m = clamp(round(s), -32767, 32767)`. Rounding is round half to even, or
  stochastic: `floor(s) + (u < s - floor(s))` with `u` in `[0, 1)` derived from
  a splitmix64 hash of `(seed, flat index)`, so the result does not depend on
  how the work is split across threads.
- Only `s` in `[32767.5, 32768)` (or its negative mirror) saturates, because
  round half to even would give 32768. Quantization never produces -32768, but
  every op accepts it as an input mantissa.
- NaN and +-Inf raise `ValueError`. Empty and all-zero tensors give `e = 0` and
  zero mantissas.

Integer ops compute the exact sum `S` of int16 * int16 products in int64 and
return `S * 2**(e_a + e_b)` rounded once to float32 (round half to even, IEEE
overflow to +-inf and gradual underflow). Each product has `|p| <= 2**30`, so
int64 cannot overflow for reduction lengths up to `2**32`.

The single rounding uses round-to-odd: if `|S| >= 2**53`, shift it right by
`k` bits to 53 bits and set the last bit when any shifted-out bit was 1. Then
`ldexp` in float64 is exact, and the final float64 -> float32 cast is correctly
rounded because 53 >= 24 + 2 bits carry the odd sticky bit.

Convolutions use NHWC activations and HWIO filters, with output shapes and
SAME padding as `tf.nn.conv2d` (the extra padding row/column goes to the
bottom/right).
"""

import numbers

import numpy as np

MANTISSA_MAX = 32767
# Largest reduction length for which an int64 sum of int16 * int16 products is
# exact: 2**32 products of magnitude <= 2**30 stay below 2**62.
MAX_REDUCTION_LENGTH = 2**32
ROUNDING_MODES = ("nearest_even", "stochastic")
PADDINGS = ("SAME", "VALID")

# Clamping the ldexp exponent to these bounds cannot change a float32 result,
# because a nonzero 53-bit value scaled by 2**-1200 rounds to 0 and one scaled
# by 2**1100 overflows to inf.
_LDEXP_EXPONENT_MIN = -1200
_LDEXP_EXPONENT_MAX = 1100

_UINT64_MASK = (1 << 64) - 1
_SPLITMIX64_GAMMA = 0x9E3779B97F4A7C15
_SPLITMIX64_MUL1 = 0xBF58476D1CE4E5B9
_SPLITMIX64_MUL2 = 0x94D049BB133111EB


# ---------------------------------------------------------------------------
# Scalar numerics: hash, exponent, rounding, conversion back to float32.
# ---------------------------------------------------------------------------


def splitmix64(z):
    """Apply the splitmix64 finalizer to a uint64 array (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 wraparound is intended
        z = z + np.uint64(_SPLITMIX64_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_SPLITMIX64_MUL1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_SPLITMIX64_MUL2)
    return z ^ (z >> np.uint64(31))


def stochastic_uniforms(seed, size):
    """Return the float64 uniforms `u` in [0, 1) for flat indices 0..size-1.

    `u = (h >> 11) * 2**-53` with `h = splitmix64(splitmix64(seed) ^ i)`, where
    the int64 seed is reinterpreted as uint64.
    """
    seed_bits = np.array([int(seed) & _UINT64_MASK], dtype=np.uint64)
    seed_hash = splitmix64(seed_bits)[0]
    index = np.arange(size, dtype=np.uint64)
    h = splitmix64(index ^ seed_hash)
    return np.ldexp((h >> np.uint64(11)).astype(np.float64), -53)


def exponent_for_max_abs(max_abs):
    """Return the DFP16 exponent `ilogb(max_abs) - 14` (0 when max_abs == 0).

    `max_abs` is a non-negative finite float32. float64 represents float32
    subnormals as normal numbers, so `frexp` gives the exact ilogb for them too.
    """
    if max_abs == 0:
        return 0
    _, frexp_exponent = np.frexp(np.float64(max_abs))
    # frexp returns a mantissa in [0.5, 1), so ilogb = frexp exponent - 1.
    return int(frexp_exponent) - 1 - 14


def _raise_if_non_finite(x, tensor_name):
    """Raise ValueError naming the first NaN/+Inf/-Inf element of `x`."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return
    flat_index = int(np.flatnonzero(bad.ravel())[0])
    value = x.ravel()[flat_index]
    if np.isnan(value):
        kind = "NaN"
    elif value > 0:
        kind = "+Inf"
    else:
        kind = "-Inf"
    name = tensor_name or "(unnamed tensor)"
    raise ValueError(
        f"Expected finite values in tensor {name!r} for DFP16 quantization. "
        f"Received: {kind} at flat index {flat_index} of a tensor with shape "
        f"{list(x.shape)}. DFP16 cannot represent NaN or Inf. Find where the "
        "value comes from (for example a diverging loss or a too high "
        "learning rate) and fix it there."
    )


def quantize(x, rounding="nearest_even", seed=0, tensor_name=""):
    """Quantize a float32 array to DFP16.

    Args:
        x: float32 array of any shape.
        rounding: "nearest_even" (round half to even) or "stochastic".
        seed: int64 seed of the stochastic rounding hash.
        tensor_name: name used in error messages.

    Returns:
        `(mantissa, exponent)`: an int16 array of the shape of `x` and a Python
        int.

    Raises:
        TypeError: if `x` is not float32.
        ValueError: if `x` contains NaN or +-Inf, or `rounding` is unknown.
    """
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(
            f"Expected a float32 array to quantize. Received: x.dtype={x.dtype}. "
            "Cast with x.astype(np.float32) first."
        )
    if rounding not in ROUNDING_MODES:
        raise ValueError(
            f"Expected rounding to be one of {ROUNDING_MODES}. "
            f"Received: rounding={rounding!r}"
        )
    _raise_if_non_finite(x, tensor_name)

    if x.size == 0:
        return np.zeros(x.shape, dtype=np.int16), 0
    max_abs = np.max(np.abs(x))
    if max_abs == 0:
        return np.zeros(x.shape, dtype=np.int16), 0

    exponent = exponent_for_max_abs(max_abs)
    # Exact: x has 24 significant bits, and the scaled values stay within the
    # float64 normal range because exponent is in [-163, 113].
    scaled = np.ldexp(x.astype(np.float64), -exponent)

    if rounding == "nearest_even":
        rounded = np.rint(scaled)
    else:
        floor = np.floor(scaled)
        fraction = scaled - floor  # exact: both have at most 24 significant bits
        u = stochastic_uniforms(seed, x.size).reshape(x.shape)
        rounded = floor + (u < fraction)

    mantissa = np.clip(rounded, -MANTISSA_MAX, MANTISSA_MAX).astype(np.int16)
    return mantissa, exponent


def dequantize(mantissa, exponent):
    """Return `mantissa * 2**exponent` as float32, rounded once per IEEE."""
    mantissa = np.asarray(mantissa)
    _check_integer_array("mantissa", mantissa)
    return to_float32_scaled(mantissa.astype(np.int64), exponent)


def _bit_length_uint64(magnitude):
    """Return the bit length of each element of a uint64 array (0 for 0)."""
    length = np.zeros(magnitude.shape, dtype=np.int64)
    remaining = magnitude.copy()
    for shift in (32, 16, 8, 4, 2, 1):
        wide = remaining >= (np.uint64(1) << np.uint64(shift))
        remaining = np.where(wide, remaining >> np.uint64(shift), remaining)
        length += np.where(wide, shift, 0)
    return length + (remaining != 0)


def to_float32_scaled(sums, exponent):
    """Return `sums * 2**exponent` rounded once to float32.

    Rounding is round half to even, with IEEE overflow to +-inf and gradual
    underflow to subnormals and signed zero.

    Args:
        sums: int64 array of exact integer sums (any value, including -2**63).
        exponent: integer power of two applied to every element.
    """
    sums = np.asarray(sums)
    if sums.dtype != np.int64:
        raise TypeError(
            f"Expected int64 sums. Received: sums.dtype={sums.dtype}. "
            "Pass the exact int64 result of an integer op."
        )
    exponent = _check_exponent("exponent", exponent)

    negative = sums < 0
    # Two's complement magnitude in uint64, exact even for -2**63.
    magnitude = np.where(
        negative,
        (~sums.view(np.uint64)) + np.uint64(1),
        sums.view(np.uint64),
    )

    # Round to odd: keep the top 53 bits, OR in a sticky bit for the rest.
    shift = np.maximum(_bit_length_uint64(magnitude) - 53, 0).astype(np.uint64)
    kept = magnitude >> shift
    dropped = magnitude & ((np.uint64(1) << shift) - np.uint64(1))
    kept = kept | (dropped != 0).astype(np.uint64)

    ldexp_exponent = np.clip(
        exponent + shift.astype(np.int64), _LDEXP_EXPONENT_MIN, _LDEXP_EXPONENT_MAX
    )
    # kept < 2**53, so the float64 conversion and the scaling are exact except
    # in ranges where the float32 result is 0 or inf anyway.
    with np.errstate(over="ignore", under="ignore"):
        value = np.ldexp(kept.astype(np.float64), ldexp_exponent)
        value = np.where(negative, -value, value)
        return value.astype(np.float32)


# ---------------------------------------------------------------------------
# Argument checks shared by the ops.
# ---------------------------------------------------------------------------


def _check_exponent(name, exponent):
    array = np.asarray(exponent)
    if array.shape != () or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"Expected {name} to be an integer scalar. Received: {name}={exponent!r}"
        )
    return int(array)


def _check_integer_array(name, array):
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"Expected {name} to be an integer (int16 mantissa) array. "
            f"Received: {name}.dtype={array.dtype}"
        )


def _as_mantissas(name, array, rank):
    array = np.asarray(array)
    _check_integer_array(name, array)
    if array.ndim != rank:
        raise ValueError(
            f"Expected {name} to have rank {rank}. "
            f"Received: {name}.shape={list(array.shape)}"
        )
    if array.size and (array.min() < -32768 or array.max() > 32767):
        raise ValueError(
            f"Expected {name} to contain int16 mantissas in [-32768, 32767]. "
            f"Received: min={array.min()}, max={array.max()}"
        )
    return array.astype(np.int64)


def _spatial_pair(name, value):
    """Normalize an int, a pair, or a length-4 NHWC list to (height, width)."""
    if isinstance(value, (numbers.Integral, np.integer)):
        pair = (int(value), int(value))
    else:
        values = [int(v) for v in value]
        if len(values) == 2:
            pair = (values[0], values[1])
        elif len(values) == 4 and values[0] == 1 and values[3] == 1:
            pair = (values[1], values[2])
        else:
            raise ValueError(
                f"Expected {name} to be an int, a pair (height, width), or a "
                f"list [1, height, width, 1]. Received: {name}={value!r}"
            )
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(
            f"Expected positive {name}. Received: {name}={value!r}"
        )
    return pair


def _check_padding(padding):
    if padding not in PADDINGS:
        raise ValueError(
            f"Expected padding to be one of {PADDINGS}. Received: padding={padding!r}"
        )


def _check_reduction_length(length, description):
    if length > MAX_REDUCTION_LENGTH:
        raise ValueError(
            f"Expected a reduction length of at most 2**32 = {MAX_REDUCTION_LENGTH} "
            f"so that int64 sums are exact. Received: {description} = {length}. "
            "Split the computation into smaller batches."
        )


# ---------------------------------------------------------------------------
# Convolution geometry (identical to tf.nn.conv2d).
# ---------------------------------------------------------------------------


def _output_size_and_padding(in_size, kernel_size, stride, dilation, padding, axis):
    """Return `(output_size, pad_before, pad_after)` for one spatial axis."""
    effective_kernel = (kernel_size - 1) * dilation + 1
    if padding == "VALID":
        if in_size < effective_kernel:
            raise ValueError(
                f"Expected the input {axis} to be at least the dilated kernel "
                f"{axis} for VALID padding. Received: input {axis}={in_size}, "
                f"dilated kernel {axis}={effective_kernel}. Use padding='SAME' "
                "or a larger input."
            )
        return (in_size - effective_kernel) // stride + 1, 0, 0
    output_size = -(-in_size // stride)
    pad_total = max((output_size - 1) * stride + effective_kernel - in_size, 0)
    return output_size, pad_total // 2, pad_total - pad_total // 2


def conv2d_output_shape(input_shape, filter_shape, strides, padding, dilations=1):
    """Return the NHWC output shape of a convolution, as tf.nn.conv2d computes it."""
    geometry = _conv_geometry(input_shape, filter_shape, strides, padding, dilations)
    return geometry["output_shape"]


def _conv_geometry(input_shape, filter_shape, strides, padding, dilations):
    _check_padding(padding)
    stride_h, stride_w = _spatial_pair("strides", strides)
    dilation_h, dilation_w = _spatial_pair("dilations", dilations)
    batch, in_h, in_w, in_c = (int(v) for v in input_shape)
    kernel_h, kernel_w, filter_c, out_c = (int(v) for v in filter_shape)
    if in_c != filter_c:
        raise ValueError(
            "Expected the input channels to equal the filter input channels. "
            f"Received: input shape {list(input_shape)}, filter shape "
            f"{list(filter_shape)}"
        )
    out_h, pad_top, pad_bottom = _output_size_and_padding(
        in_h, kernel_h, stride_h, dilation_h, padding, "height"
    )
    out_w, pad_left, pad_right = _output_size_and_padding(
        in_w, kernel_w, stride_w, dilation_w, padding, "width"
    )
    return {
        "output_shape": (batch, out_h, out_w, out_c),
        "stride": (stride_h, stride_w),
        "dilation": (dilation_h, dilation_w),
        "pad": ((pad_top, pad_bottom), (pad_left, pad_right)),
    }


def _tap_window(geometry, tap_h, tap_w):
    """Return the padded-input slices that kernel tap (tap_h, tap_w) reads."""
    _, out_h, out_w, _ = geometry["output_shape"]
    stride_h, stride_w = geometry["stride"]
    dilation_h, dilation_w = geometry["dilation"]
    start_h = tap_h * dilation_h
    start_w = tap_w * dilation_w
    # An empty output reads nothing. The general stop below would be negative
    # for out == 0 and wrap around to the end of the axis.
    rows = slice(start_h, start_h + max(out_h - 1, 0) * stride_h + min(out_h, 1), stride_h)
    cols = slice(start_w, start_w + max(out_w - 1, 0) * stride_w + min(out_w, 1), stride_w)
    return rows, cols


def _check_sizes(name, sizes):
    sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
    if len(sizes) != 4 or min(sizes) < 0:
        raise ValueError(
            f"Expected {name} to be 4 non-negative sizes. Received: {name}={sizes}"
        )
    return tuple(sizes)


# ---------------------------------------------------------------------------
# Integer ops: exact int64 sums.
# ---------------------------------------------------------------------------


def conv2d_int64(x_m, w_m, strides=1, padding="VALID", dilations=1):
    """Return the exact int64 sums of a 2-D convolution of mantissas.

    `x_m` is NHWC and `w_m` is HWIO. The output is [N, OH, OW, O].
    """
    x = _as_mantissas("x_m", x_m, 4)
    w = _as_mantissas("w_m", w_m, 4)
    geometry = _conv_geometry(x.shape, w.shape, strides, padding, dilations)
    kernel_h, kernel_w, in_c, _ = w.shape
    _check_reduction_length(kernel_h * kernel_w * in_c, "KH*KW*C")

    x_padded = np.pad(x, ((0, 0),) + geometry["pad"] + ((0, 0),))
    out = np.zeros(geometry["output_shape"], dtype=np.int64)
    for tap_h in range(kernel_h):
        for tap_w in range(kernel_w):
            rows, cols = _tap_window(geometry, tap_h, tap_w)
            window = x_padded[:, rows, cols, :]
            out += np.einsum("nhwc,co->nhwo", window, w[tap_h, tap_w])
    return out


def conv2d_backprop_input_int64(
    input_sizes, w_m, dy_m, strides=1, padding="VALID", dilations=1
):
    """Return the exact int64 gradient sums of a convolution w.r.t. its input.

    `dy_m` is the [N, OH, OW, O] mantissa gradient of the output. The result
    has shape `input_sizes` (NHWC).
    """
    input_sizes = _check_sizes("input_sizes", input_sizes)
    w = _as_mantissas("w_m", w_m, 4)
    dy = _as_mantissas("dy_m", dy_m, 4)
    geometry = _conv_geometry(input_sizes, w.shape, strides, padding, dilations)
    _check_output_backprop_shape(geometry, dy.shape, input_sizes, w.shape)
    kernel_h, kernel_w, _, out_c = w.shape
    _check_reduction_length(kernel_h * kernel_w * out_c, "KH*KW*O")

    (pad_top, pad_bottom), (pad_left, pad_right) = geometry["pad"]
    batch, in_h, in_w, in_c = input_sizes
    dx_padded = np.zeros(
        (batch, in_h + pad_top + pad_bottom, in_w + pad_left + pad_right, in_c),
        dtype=np.int64,
    )
    for tap_h in range(kernel_h):
        for tap_w in range(kernel_w):
            rows, cols = _tap_window(geometry, tap_h, tap_w)
            dx_padded[:, rows, cols, :] += np.einsum(
                "nhwo,co->nhwc", dy, w[tap_h, tap_w]
            )
    return dx_padded[:, pad_top : pad_top + in_h, pad_left : pad_left + in_w, :]


def conv2d_backprop_filter_int64(
    x_m, filter_sizes, dy_m, strides=1, padding="VALID", dilations=1
):
    """Return the exact int64 gradient sums of a convolution w.r.t. its filter.

    The result has shape `filter_sizes` (HWIO).
    """
    x = _as_mantissas("x_m", x_m, 4)
    filter_sizes = _check_sizes("filter_sizes", filter_sizes)
    dy = _as_mantissas("dy_m", dy_m, 4)
    geometry = _conv_geometry(x.shape, filter_sizes, strides, padding, dilations)
    _check_output_backprop_shape(geometry, dy.shape, x.shape, filter_sizes)
    batch, out_h, out_w, _ = geometry["output_shape"]
    _check_reduction_length(batch * out_h * out_w, "N*OH*OW")

    kernel_h, kernel_w, in_c, out_c = filter_sizes
    x_padded = np.pad(x, ((0, 0),) + geometry["pad"] + ((0, 0),))
    dw = np.zeros(filter_sizes, dtype=np.int64)
    for tap_h in range(kernel_h):
        for tap_w in range(kernel_w):
            rows, cols = _tap_window(geometry, tap_h, tap_w)
            window = x_padded[:, rows, cols, :]
            dw[tap_h, tap_w] = np.einsum("nhwc,nhwo->co", window, dy)
    return dw


def _check_output_backprop_shape(geometry, dy_shape, input_shape, filter_shape):
    if tuple(dy_shape) != geometry["output_shape"]:
        raise ValueError(
            f"Expected out_backprop of shape {list(geometry['output_shape'])}, the "
            f"convolution output for input shape {list(input_shape)} and filter "
            f"shape {list(filter_shape)}. Received: out_backprop.shape="
            f"{list(dy_shape)}"
        )


def matmul_int64(a_m, b_m, transpose_a=False, transpose_b=False):
    """Return the exact int64 product of two mantissa matrices."""
    a = _as_mantissas("a_m", a_m, 2)
    b = _as_mantissas("b_m", b_m, 2)
    if transpose_a:
        a = a.T
    if transpose_b:
        b = b.T
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            "Expected the inner dimensions of the (transposed) operands to match. "
            f"Received: a shape {list(a.shape)}, b shape {list(b.shape)} after "
            f"transpose_a={transpose_a}, transpose_b={transpose_b}"
        )
    _check_reduction_length(a.shape[1], "K")
    # NumPy integer matmul does not use BLAS and is exact in int64.
    return a @ b


# ---------------------------------------------------------------------------
# Float results: exact sum scaled by 2**(e_a + e_b), rounded once to float32.
# ---------------------------------------------------------------------------


def conv2d(x_m, x_e, w_m, w_e, strides=1, padding="VALID", dilations=1):
    """Return the DFP16 convolution of `x_m * 2**x_e` and `w_m * 2**w_e` as float32."""
    sums = conv2d_int64(x_m, w_m, strides, padding, dilations)
    return to_float32_scaled(sums, _check_exponent("x_e", x_e) + _check_exponent("w_e", w_e))


def conv2d_backprop_input(
    input_sizes, w_m, w_e, dy_m, dy_e, strides=1, padding="VALID", dilations=1
):
    """Return the DFP16 input gradient of a convolution as float32."""
    sums = conv2d_backprop_input_int64(
        input_sizes, w_m, dy_m, strides, padding, dilations
    )
    return to_float32_scaled(sums, _check_exponent("w_e", w_e) + _check_exponent("dy_e", dy_e))


def conv2d_backprop_filter(
    x_m, x_e, filter_sizes, dy_m, dy_e, strides=1, padding="VALID", dilations=1
):
    """Return the DFP16 filter gradient of a convolution as float32."""
    sums = conv2d_backprop_filter_int64(
        x_m, filter_sizes, dy_m, strides, padding, dilations
    )
    return to_float32_scaled(sums, _check_exponent("x_e", x_e) + _check_exponent("dy_e", dy_e))


def matmul(a_m, a_e, b_m, b_e, transpose_a=False, transpose_b=False):
    """Return the DFP16 matrix product of `a_m * 2**a_e` and `b_m * 2**b_e` as float32."""
    sums = matmul_int64(a_m, b_m, transpose_a, transpose_b)
    return to_float32_scaled(sums, _check_exponent("a_e", a_e) + _check_exponent("b_e", b_e))
