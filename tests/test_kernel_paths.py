"""Exactness of every int16 GEMM kernel path against the NumPy reference.

The conv and matmul ops run on one of the kernel paths avx512_vnni, avx2 or
portable (keras_dfp.ops.set_kernel_path). Each path must return the same
float32 bits as keras_dfp.reference. The cases cover odd sizes, channel
counts that are not multiples of any vector width, strides, dilations, both
paddings, operands of only -32768 or +-32767 and reductions whose int64 sum
is far beyond the int32 range. Paths this CPU lacks are skipped.
"""

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
ALL_PATHS = ("avx512_vnni", "avx2", "portable")

# Exponents that keep every result a normal float32.
X_EXPONENT = -20
W_EXPONENT = -21

# (input NHWC, filter (KH, KW, O), strides, padding, dilations)
CONV_CASES = {
    "c1_same": ((2, 7, 9, 1), (3, 3, 5), 1, "SAME", 1),
    "c3_stride2_valid": ((1, 11, 10, 3), (3, 3, 17), 2, "VALID", 1),
    "c17_dilation2": ((2, 9, 9, 17), (3, 3, 33), 1, "SAME", 2),
    "c65_stride3": ((1, 8, 13, 65), (3, 3, 40), 3, "SAME", 1),
    "c65_1x1": ((1, 6, 7, 65), (1, 1, 65), 1, "VALID", 1),
    "mixed_strides": ((3, 5, 6, 3), (2, 3, 7), (2, 1), "SAME", (1, 2)),
}

# Reductions longer than one 256-term block with sums beyond int32 for the
# extreme operands: forward K = 3*3*521 = 4689, backprop filter over
# 39 * 41 = 1599 positions, backprop input over 3*3*301 = 2709 terms.
LONG_CONV_CASES = {
    "forward_k4689": ((1, 3, 3, 521), (3, 3, 3), 1, "VALID", 1),
    "filter_1599_positions": ((1, 41, 43, 2), (3, 3, 3), 1, "VALID", 1),
    "input_stride1_o301": ((1, 6, 6, 2), (3, 3, 301), 1, "SAME", 1),
    "input_stride2_o301": ((1, 7, 7, 2), (3, 3, 301), 2, "SAME", 1),
}

MANTISSA_KINDS = ("random", "min", "extreme", "ternary")


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


def make_mantissas(rng, shape, kind):
    """Return int16 mantissas of one kind.

    'ternary' draws from {-1, 0, 1}: paired with full-range mantissas, the
    sums stay below 2**24 and are exact in float32, so an off-by-one error
    in the integer sum cannot hide in the final rounding.
    """
    if kind == "random":
        return rng.integers(-32768, 32768, shape).astype(np.int16)
    if kind == "min":
        return np.full(shape, -32768, np.int16)
    if kind == "extreme":
        return rng.choice(np.array([-32768, 32767], np.int16), shape)
    if kind == "ternary":
        return rng.integers(-1, 2, shape).astype(np.int16)
    raise ValueError(f"Expected a mantissa kind. Received: kind={kind!r}")


def second_kind(kind):
    """Return the kind of the second operand: full range next to 'ternary'."""
    return "random" if kind == "ternary" else kind


def assert_float32_bits_equal(actual, expected):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32))


def conv_operands(rng, case, kind):
    input_shape, (kh, kw, out_c), strides, padding, dilations = case
    filter_shape = (kh, kw, input_shape[3], out_c)
    x = make_mantissas(rng, input_shape, kind)
    w = make_mantissas(rng, filter_shape, second_kind(kind))
    out_shape = reference.conv2d_output_shape(
        input_shape, filter_shape, strides, padding, dilations
    )
    dy = make_mantissas(rng, out_shape, second_kind(kind))
    return x, w, dy, strides, padding, dilations


def check_conv_directions(rng, case, kind):
    x, w, dy, strides, padding, dilations = conv_operands(rng, case, kind)
    geometry = dict(strides=strides, padding=padding, dilations=dilations)

    forward = ops.conv2d_int(x, X_EXPONENT, w, W_EXPONENT, **geometry)
    assert_float32_bits_equal(
        forward, reference.conv2d(x, X_EXPONENT, w, W_EXPONENT, **geometry)
    )

    grad_input = ops.conv2d_backprop_input_int(
        x.shape, w, W_EXPONENT, dy, X_EXPONENT, **geometry
    )
    assert_float32_bits_equal(
        grad_input,
        reference.conv2d_backprop_input(
            x.shape, w, W_EXPONENT, dy, X_EXPONENT, **geometry
        ),
    )

    grad_filter = ops.conv2d_backprop_filter_int(
        x, X_EXPONENT, w.shape, dy, W_EXPONENT, **geometry
    )
    assert_float32_bits_equal(
        grad_filter,
        reference.conv2d_backprop_filter(
            x, X_EXPONENT, w.shape, dy, W_EXPONENT, **geometry
        ),
    )


@pytest.mark.parametrize("kind", MANTISSA_KINDS)
@pytest.mark.parametrize("case_name", sorted(CONV_CASES))
def test_conv_matches_reference(kernel_path, rng, case_name, kind):
    check_conv_directions(rng, CONV_CASES[case_name], kind)


@pytest.mark.parametrize("kind", ("min", "extreme", "random"))
@pytest.mark.parametrize("case_name", sorted(LONG_CONV_CASES))
def test_conv_long_reduction(kernel_path, rng, case_name, kind):
    check_conv_directions(rng, LONG_CONV_CASES[case_name], kind)


# (M, K, N): K odd, K below one vector, K over many 256-term blocks.
MATMUL_SHAPES = [(1, 1, 1), (7, 3, 5), (13, 257, 33), (37, 1001, 45), (5, 4099, 7)]


@pytest.mark.parametrize("transpose_b", (False, True))
@pytest.mark.parametrize("transpose_a", (False, True))
@pytest.mark.parametrize("kind", MANTISSA_KINDS)
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matmul_matches_reference(kernel_path, rng, shape, kind, transpose_a,
                                  transpose_b):
    m, k, n = shape
    a = make_mantissas(rng, (k, m) if transpose_a else (m, k), kind)
    b = make_mantissas(rng, (n, k) if transpose_b else (k, n), second_kind(kind))
    actual = ops.matmul_int(a, X_EXPONENT, b, W_EXPONENT, transpose_a, transpose_b)
    expected = reference.matmul(a, X_EXPONENT, b, W_EXPONENT, transpose_a, transpose_b)
    assert_float32_bits_equal(actual, expected)


def test_matmul_sum_beyond_int32(kernel_path):
    # 4099 * (-32768)**2 = 4099 * 2**30 is about 2**42: every int32 stage
    # would wrap, and exponent 0 makes the float32 result the rounded sum.
    a = np.full((6, 4099), -32768, np.int16)
    b = np.full((4099, 3), -32768, np.int16)
    actual = ops.matmul_int(a, 0, b, 0).numpy()
    assert_float32_bits_equal(actual, reference.matmul(a, 0, b, 0))
    np.testing.assert_array_equal(actual, np.float32(4099 * 2**30))


def test_supported_paths_end_with_portable():
    supported = ops.supported_kernel_paths()
    assert supported[-1] == "portable"
    assert set(supported) <= set(ALL_PATHS)


def test_auto_selects_best_supported_path():
    previous = ops.get_kernel_path()
    try:
        assert ops.set_kernel_path("auto") == ops.supported_kernel_paths()[0]
        assert ops.get_kernel_path() == ops.supported_kernel_paths()[0]
    finally:
        ops.set_kernel_path(previous)


def test_set_kernel_path_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"Received: name='amx'"):
        ops.set_kernel_path("amx")


def test_set_kernel_path_rejects_unsupported_path():
    missing = [path for path in ALL_PATHS if path not in ops.supported_kernel_paths()]
    if not missing:
        pytest.skip("this CPU supports every kernel path")
    with pytest.raises(ValueError, match=missing[0]):
        ops.set_kernel_path(missing[0])


def test_kernel_path_op_rejects_unknown_name():
    with pytest.raises(tf.errors.InvalidArgumentError, match="Received: .*'fast'"):
        ops._run_kernel_path_op("fast")


def _run_with_env(value, code):
    env = dict(os.environ, KERAS_DFP_KERNEL_PATH=value, TF_CPP_MIN_LOG_LEVEL="0")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
        check=False,
    )


def test_env_var_forces_portable_path():
    result = _run_with_env(
        "portable",
        """
        from keras_dfp import ops
        print("ACTIVE", ops.get_kernel_path())
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "ACTIVE portable" in result.stdout
    assert "kernel path 'portable'" in result.stderr


def test_env_var_rejects_invalid_value():
    result = _run_with_env(
        "sse9",
        """
        import numpy as np
        from keras_dfp import ops
        a = np.ones((2, 2), np.int16)
        ops.matmul_int(a, 0, a, 0)
        """,
    )
    assert result.returncode != 0
    assert "KERAS_DFP_KERNEL_PATH='sse9'" in result.stderr
