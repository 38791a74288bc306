"""DFP16 TensorFlow ops: quantization, exact integer conv/matmul, gradients.

A DFP16 tensor is int16 mantissas with one int32 exponent e per tensor and
represents mantissa * 2**e. `quantize` picks e = ilogb(max|x|) - 14, so the
largest magnitude maps to [2**14, 2**15), and rounds half to even (or
stochastically). The integer ops sum int16 * int16 products exactly in int64
and round the result times 2**(e_a + e_b) to float32 once.

`conv2d` and `matmul` are differentiable float32 ops: the forward pass
quantizes both operands, and the backward pass quantizes the output gradient
and runs the INT16 backprop ops on the saved forward mantissas (a
straight-through estimator for the quantization itself). Bias is not part of
these ops.

>>> y = conv2d(x, kernel, strides=1, padding="SAME", name="conv1")
"""

import logging
import numbers

import numpy as np
import tensorflow as tf

from keras_dfp import _loader

_ops = _loader.load_ops_library()

_logger = logging.getLogger(__name__)

ROUNDING_MODES = ("nearest_even", "stochastic")
NONFINITE_MODES = ("raise", "skip_step")
KERNEL_PATHS = ("auto", "avx512_vnni", "avx2", "portable")
PADDINGS = ("SAME", "VALID")

# Stochastic rounding of the activation, weight and gradient of one op uses
# seed, seed ^ 1 and seed ^ 2, so the three draw independent streams.
_WEIGHT_SEED_XOR = 1
_GRADIENT_SEED_XOR = 2

for _op_type in (
    "KerasDfp>Quantize",
    "KerasDfp>Dequantize",
    "KerasDfp>Conv2D",
    "KerasDfp>Conv2DBackpropInput",
    "KerasDfp>Conv2DBackpropFilter",
    "KerasDfp>MatMul",
    "KerasDfp>KernelPath",
):
    # The raw ops have integer operands, so gradients flow only through the
    # tf.custom_gradient wrappers below.
    tf.no_gradient(_op_type)


def _as_float32(value, name):
    tensor = tf.convert_to_tensor(value)
    if tensor.dtype != tf.float32:
        raise TypeError(
            f"Expected {name} to be float32. Received: {name}.dtype="
            f"{tensor.dtype.name}. Cast it first, for example with "
            f"tf.cast({name}, tf.float32)."
        )
    return tensor


def _as_int_tensor(value, dtype, name):
    tensor = tf.convert_to_tensor(value)
    if tensor.dtype != dtype:
        raise TypeError(
            f"Expected {name} to be {dtype.name}. Received: {name}.dtype="
            f"{tensor.dtype.name}. Use the mantissa and exponent returned by "
            f"keras_dfp.ops.quantize."
        )
    return tensor


def _as_sizes(value, name):
    """Return a 4-element int32 size tensor, rejecting floats and int32 overflow."""
    tensor = tf.convert_to_tensor(value)
    if not tensor.dtype.is_integer:
        raise TypeError(
            f"Expected {name} to be integer sizes. Received: {name}.dtype="
            f"{tensor.dtype.name}. Pass the shape as ints, for example "
            f"tf.shape(x, out_type=tf.int32)."
        )
    known = tf.get_static_value(tensor)
    if known is not None and np.any(
        (np.asarray(known) < 0) | (np.asarray(known) > np.iinfo(np.int32).max)
    ):
        raise ValueError(
            f"Expected {name} to hold sizes in [0, 2**31 - 1]. Received: "
            f"{name}={np.asarray(known).tolist()}"
        )
    return tf.cast(tensor, tf.int32)


def _as_seed(seed):
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer:
        raise TypeError(
            f"Expected an integer seed. Received: seed.dtype={seed.dtype.name}"
        )
    return tf.cast(seed, tf.int64)


def _check_rounding(rounding):
    if rounding not in ROUNDING_MODES:
        raise ValueError(
            f"Expected rounding to be one of {ROUNDING_MODES}. "
            f"Received: rounding={rounding!r}"
        )


def _check_nonfinite(nonfinite):
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(
            f"Expected nonfinite to be one of {NONFINITE_MODES}. "
            f"Received: nonfinite={nonfinite!r}"
        )


def _normalize_padding(padding):
    if not isinstance(padding, str) or padding.upper() not in PADDINGS:
        raise ValueError(
            f"Expected padding to be 'SAME' or 'VALID' (any case). "
            f"Received: padding={padding!r}"
        )
    return padding.upper()


def _spatial_attr(value, name):
    """Expand an int, a pair or a length-4 list to [1, h, w, 1]."""
    def is_int(v):
        # Python and NumPy integers; bool is an Integral but not a size.
        return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))

    if is_int(value):
        values = [1, value, value, 1]
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        values = [1, *value, 1]
    elif isinstance(value, (list, tuple)) and len(value) == 4:
        values = list(value)
    else:
        values = None
    if values is not None and all(is_int(v) for v in values):
        values = [int(v) for v in values]
    if (
        values is None
        or not all(is_int(v) for v in values)
        or values[0] != 1
        or values[3] != 1
        or min(values[1:3]) < 1
    ):
        raise ValueError(
            f"Expected {name} to be a positive int, a pair (h, w) or a list "
            f"[1, h, w, 1] (NHWC). Received: {name}={value!r}"
        )
    return values


def quantize(x, rounding="nearest_even", seed=0, tensor_name=""):
    """Quantize a float32 tensor to DFP16.

    Args:
      x: float32 tensor of any shape. NaN or +-Inf raises
        tf.errors.InvalidArgumentError naming `tensor_name` and the first
        offending flat index.
      rounding: "nearest_even" (round half to even) or "stochastic".
      seed: integer scalar (Python int or tensor) of the stochastic rounding;
        element i rounds up when u_i < fraction with
        u_i = (splitmix64(splitmix64(seed) ^ i) >> 11) * 2**-53.
      tensor_name: name used in error messages.

    Returns:
      (mantissa, exponent): int16 tensor shaped like x, int32 scalar.
    """
    x = _as_float32(x, "x")
    _check_rounding(rounding)
    return _ops.keras_dfp_quantize(
        x, _as_seed(seed), rounding=rounding, tensor_name=tensor_name
    )


class OperandQuantizer:
    """Quantizes the operands of one DFP16 op call, forward and backward.

    With nonfinite="raise" this is `quantize`. With nonfinite="skip_step" a
    tensor that contains NaN or Inf is replaced by zeros before the quantize
    op, so the op does not fail, and `finish` turns every output of the
    step (forward result, or input and weight gradients) into NaN. The NaN
    then reaches the loss or the float32 gradients, where the patched
    optimizer detects it and skips the update.

    `observer`, if given, is called as observer(kind, x, mantissa, exponent)
    for every quantized tensor ("activation", "weight" or "gradient") and
    returns the ops that record its statistics. `finish` makes the outputs
    depend on those ops, so they run in graph mode too.
    """

    def __init__(self, rounding, name, nonfinite="raise", observer=None):
        _check_rounding(rounding)
        _check_nonfinite(nonfinite)
        self._rounding = rounding
        self._name = name
        self._nonfinite = nonfinite
        self._observer = observer
        self._finite_flags = []
        self._pending_updates = []

    def __call__(self, x, seed, kind):
        """Return (mantissa, exponent) of float32 `x`, a tensor of the given kind."""
        tensor_name = f"{self._name} ({kind})"
        if self._nonfinite == "skip_step":
            finite = tf.reduce_all(tf.math.is_finite(x))
            self._finite_flags.append(finite)
            x = tf.cond(finite, lambda: x, lambda: tf.zeros_like(x))
        mantissa, exponent = quantize(x, self._rounding, seed, tensor_name)
        if self._observer is not None:
            self._pending_updates.extend(
                self._observer(kind, x, mantissa, exponent) or []
            )
        return mantissa, exponent

    def finish(self, outputs):
        """Return `outputs` after the recorded updates, NaN if an operand so far was non-finite."""
        outputs = list(outputs)
        if self._pending_updates:
            with tf.control_dependencies(self._pending_updates):
                outputs = [tf.identity(output) for output in outputs]
            self._pending_updates = []
        if not self._finite_flags:
            return outputs
        all_finite = tf.reduce_all(tf.stack(self._finite_flags))
        return [
            tf.cond(
                all_finite,
                lambda output=output: output,
                lambda output=output: tf.fill(
                    tf.shape(output), tf.constant(float("nan"), output.dtype)
                ),
            )
            for output in outputs
        ]


def dequantize(mantissa, exponent):
    """Return float32 mantissa * 2**exponent, rounded once."""
    mantissa = _as_int_tensor(mantissa, tf.int16, "mantissa")
    exponent = _as_int_tensor(exponent, tf.int32, "exponent")
    return _ops.keras_dfp_dequantize(mantissa, exponent)


def conv2d_int(x_m, x_e, w_m, w_e, strides=1, padding="VALID", dilations=1):
    """Convolve NHWC int16 mantissas with HWIO int16 mantissas, exactly.

    Returns float32 [N, OH, OW, O] equal to the exact int64 sum times
    2**(x_e + w_e), rounded once. `padding` and the output size follow
    tf.nn.conv2d.
    """
    return _ops.keras_dfp_conv2d(
        _as_int_tensor(x_m, tf.int16, "x_m"),
        _as_int_tensor(x_e, tf.int32, "x_e"),
        _as_int_tensor(w_m, tf.int16, "w_m"),
        _as_int_tensor(w_e, tf.int32, "w_e"),
        strides=_spatial_attr(strides, "strides"),
        padding=_normalize_padding(padding),
        dilations=_spatial_attr(dilations, "dilations"),
    )


def conv2d_backprop_input_int(
    input_sizes, w_m, w_e, dy_m, dy_e, strides=1, padding="VALID", dilations=1
):
    """Return the exact float32 input gradient of `conv2d_int`."""
    return _ops.keras_dfp_conv2d_backprop_input(
        _as_sizes(input_sizes, "input_sizes"),
        _as_int_tensor(w_m, tf.int16, "w_m"),
        _as_int_tensor(w_e, tf.int32, "w_e"),
        _as_int_tensor(dy_m, tf.int16, "dy_m"),
        _as_int_tensor(dy_e, tf.int32, "dy_e"),
        strides=_spatial_attr(strides, "strides"),
        padding=_normalize_padding(padding),
        dilations=_spatial_attr(dilations, "dilations"),
    )


def conv2d_backprop_filter_int(
    x_m, x_e, filter_sizes, dy_m, dy_e, strides=1, padding="VALID", dilations=1
):
    """Return the exact float32 filter gradient of `conv2d_int`."""
    return _ops.keras_dfp_conv2d_backprop_filter(
        _as_int_tensor(x_m, tf.int16, "x_m"),
        _as_int_tensor(x_e, tf.int32, "x_e"),
        _as_sizes(filter_sizes, "filter_sizes"),
        _as_int_tensor(dy_m, tf.int16, "dy_m"),
        _as_int_tensor(dy_e, tf.int32, "dy_e"),
        strides=_spatial_attr(strides, "strides"),
        padding=_normalize_padding(padding),
        dilations=_spatial_attr(dilations, "dilations"),
    )


def matmul_int(a_m, a_e, b_m, b_e, transpose_a=False, transpose_b=False):
    """Multiply 2-D int16 mantissa matrices exactly; return float32 [M, N]."""
    return _ops.keras_dfp_mat_mul(
        _as_int_tensor(a_m, tf.int16, "a_m"),
        _as_int_tensor(a_e, tf.int32, "a_e"),
        _as_int_tensor(b_m, tf.int16, "b_m"),
        _as_int_tensor(b_e, tf.int32, "b_e"),
        transpose_a=transpose_a,
        transpose_b=transpose_b,
    )


def _run_kernel_path_op(requested):
    active, supported = _ops.keras_dfp_kernel_path(tf.constant(requested, tf.string))
    return active.numpy().decode(), tuple(
        name.decode() for name in supported.numpy()
    )


def supported_kernel_paths():
    """Return the int16 GEMM kernel paths this machine supports, best first.

    The paths are "avx512_vnni", "avx2" and "portable" (always supported).
    All of them give bit-identical results.
    """
    return _run_kernel_path_op("")[1]


def get_kernel_path():
    """Return the name of the int16 GEMM kernel path that the ops use now.

    The first op call selects it from the environment variable
    KERAS_DFP_KERNEL_PATH (default "auto": the best supported path).
    """
    return _run_kernel_path_op("")[0]


def set_kernel_path(name):
    """Select the int16 GEMM kernel path for every later op call in the process.

    `name` is "auto" (the best path the CPU supports) or one of
    `supported_kernel_paths()`. Returns the name of the active path.

    Raises:
        ValueError: if `name` is unknown or the CPU lacks that path.
    """
    if name not in KERNEL_PATHS:
        raise ValueError(
            f"Expected a kernel path in {KERNEL_PATHS}. Received: name={name!r}"
        )
    supported = supported_kernel_paths()
    if name != "auto" and name not in supported:
        raise ValueError(
            f"Expected a kernel path this CPU supports: {supported} or 'auto'. "
            f"Received: name={name!r}, which needs instructions that this CPU "
            f"or operating system does not provide."
        )
    active = _run_kernel_path_op(name)[0]
    _logger.info("keras-dfp int16 GEMM kernel path: %s", active)
    return active


def _first_order_only(gradients, name, sources):
    """Return `gradients` unchanged, but raise if anything differentiates them.

    The INT16 backward ops take integer mantissas, so TensorFlow would return
    None for a second-order gradient (for example a gradient penalty) instead
    of the true value. The identity below lists the float `sources` the
    gradients depend on (forward inputs and output gradient) as its inputs, so
    an outer tape records the dependency and calls its gradient, which raises.
    """

    @tf.custom_gradient
    def identity(*values):
        def grad(*_):
            raise NotImplementedError(
                f"Second-order gradients through the DFP16 op '{name}' are not "
                "supported: its backward pass runs INT16 ops on integer "
                "mantissas, which have no gradient. Received: a gradient of "
                f"the gradient of '{name}'. Compute it in float32, for example "
                "by giving the layer dtype='float32'."
            )

        outputs = [tf.identity(value) for value in values[: len(gradients)]]
        return outputs, grad

    return identity(*gradients, *sources)


def _operand_seeds(seed):
    seed = _as_seed(seed)
    return (
        seed,
        tf.bitwise.bitwise_xor(seed, tf.constant(_WEIGHT_SEED_XOR, tf.int64)),
        tf.bitwise.bitwise_xor(seed, tf.constant(_GRADIENT_SEED_XOR, tf.int64)),
    )


def conv2d(
    x,
    kernel,
    strides=1,
    padding="VALID",
    dilations=1,
    rounding="nearest_even",
    seed=0,
    name=None,
    nonfinite="raise",
    observer=None,
):
    """Differentiable DFP16 2-D convolution of float32 NHWC x and HWIO kernel.

    The forward pass quantizes x and kernel (tensor names "<name> (activation)"
    and "<name> (weight)") and runs the exact INT16 convolution. The gradient
    quantizes dy ("<name> (gradient)") and runs the INT16 backprop ops on the
    forward mantissas. Stochastic rounding uses seed, seed ^ 1 and seed ^ 2 for
    activation, weight and gradient. `nonfinite` and `observer` work as in
    `OperandQuantizer`.
    """
    name = name or "conv2d"
    x = _as_float32(x, "x")
    kernel = _as_float32(kernel, "kernel")
    quantizer = OperandQuantizer(rounding, name, nonfinite, observer)
    strides = _spatial_attr(strides, "strides")
    dilations = _spatial_attr(dilations, "dilations")
    padding = _normalize_padding(padding)
    attrs = dict(strides=strides, padding=padding, dilations=dilations)

    @tf.custom_gradient
    def _conv2d(x, kernel):
        x_seed, w_seed, dy_seed = _operand_seeds(seed)
        x_m, x_e = quantizer(x, x_seed, "activation")
        w_m, w_e = quantizer(kernel, w_seed, "weight")
        (y,) = quantizer.finish([conv2d_int(x_m, x_e, w_m, w_e, **attrs)])

        def grad(dy):
            dy_m, dy_e = quantizer(dy, dy_seed, "gradient")
            dx = conv2d_backprop_input_int(
                tf.shape(x, out_type=tf.int32), w_m, w_e, dy_m, dy_e, **attrs
            )
            dw = conv2d_backprop_filter_int(
                x_m, x_e, tf.shape(kernel, out_type=tf.int32), dy_m, dy_e, **attrs
            )
            dx, dw = quantizer.finish([dx, dw])
            return _first_order_only((dx, dw), name, (x, kernel, dy))

        return y, grad

    with tf.name_scope(name):
        return _conv2d(x, kernel)


def matmul(
    a, b, rounding="nearest_even", seed=0, name=None, nonfinite="raise", observer=None
):
    """Differentiable DFP16 product of float32 matrices a [M, K] and b [K, N].

    Inputs must be 2-D (reshape N-D activations first). Quantization and
    gradients work as in `conv2d`, with tensor names "<name> (activation)" for
    a, "<name> (weight)" for b and "<name> (gradient)" for the output gradient.
    """
    name = name or "matmul"
    a = _as_float32(a, "a")
    b = _as_float32(b, "b")
    quantizer = OperandQuantizer(rounding, name, nonfinite, observer)
    for operand, operand_name in ((a, "a"), (b, "b")):
        rank = operand.shape.rank
        if rank is not None and rank != 2:
            raise ValueError(
                f"Expected {operand_name} to be a 2-D matrix. Received: "
                f"{operand_name}.shape={operand.shape}. Reshape it to 2-D "
                f"first, for example tf.reshape(x, [-1, x.shape[-1]])."
            )

    @tf.custom_gradient
    def _matmul(a, b):
        a_seed, b_seed, dy_seed = _operand_seeds(seed)
        a_m, a_e = quantizer(a, a_seed, "activation")
        b_m, b_e = quantizer(b, b_seed, "weight")
        (y,) = quantizer.finish([matmul_int(a_m, a_e, b_m, b_e)])

        def grad(dy):
            dy_m, dy_e = quantizer(dy, dy_seed, "gradient")
            da = matmul_int(dy_m, dy_e, b_m, b_e, transpose_b=True)
            db = matmul_int(a_m, a_e, dy_m, dy_e, transpose_a=True)
            da, db = quantizer.finish([da, db])
            return _first_order_only((da, db), name, (a, b, dy))

        return y, grad

    with tf.name_scope(name):
        return _matmul(a, b)
