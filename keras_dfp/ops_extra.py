"""Differentiable DFP16 ops built from the raw INT16 ops of `keras_dfp.ops`.

- `grouped_conv2d`: a convolution with `groups > 1`. The input, the kernel
  and the output gradient are each quantized ONCE, so every group shares one
  exponent per tensor. The int16 mantissas are then split along the channel
  axis and each group runs the INT16 conv op. Group g's float32 output is its
  exact int64 sum times 2**(e_x + e_w), rounded once, which is exactly what a
  single convolution over that group computes. A depthwise convolution is the
  case groups = input channels.
- `conv2d_transpose`: the transposed convolution (the gradient of a
  convolution with respect to its input) with forward, input and kernel
  gradients all in INT16.
- `einsum_matmul`: the two-operand einsum of `keras.layers.EinsumDense`
  rewritten as transpose/reshape, one DFP16 matmul, reshape/transpose.
  Transposes and reshapes move values without changing them, and quantization
  uses one exponent per tensor, so the mantissas equal those of the einsum
  operands.

Stochastic rounding draws activation, weight and gradient streams from seed,
seed ^ 1 and seed ^ 2, as in `keras_dfp.ops`.
"""

import string

import tensorflow as tf

from keras_dfp import ops

_ELLIPSIS = "..."

# The equations `EinsumPlan` accepts, as shown in error messages.
EINSUM_FORM = (
    "an einsum equation 'input,kernel->output' in which every index appears "
    "in exactly two of the three terms, at most once per term, with '...' "
    "only in the input and output (for example 'ab,bc->ac', 'abc,cd->abd', "
    "'abc,cde->abde', 'abcd,cde->abe')"
)


def grouped_conv2d(
    x,
    kernel,
    groups,
    strides=1,
    padding="VALID",
    dilations=1,
    rounding="nearest_even",
    seed=0,
    name=None,
    nonfinite="raise",
    observer=None,
):
    """Differentiable DFP16 grouped 2-D convolution.

    Args:
      x: float32 NHWC input with C channels, C divisible by `groups`.
      kernel: float32 HWIO kernel [KH, KW, C // groups, O], O divisible by
        `groups`. Output channels [g * O // groups, (g + 1) * O // groups)
        read input channels [g * C // groups, (g + 1) * C // groups), as in
        tf.nn.conv2d and keras.layers.Conv2D(groups=...).
      groups: positive int.
      strides, padding, dilations, rounding, seed, name, nonfinite, observer:
        as in `keras_dfp.ops.conv2d`.

    Returns:
      float32 [N, OH, OW, O].
    """
    # NOTE: every group runs its own INT16 ops, so many small groups are slow.
    # A DepthwiseConv2D(3, padding="same") step (forward, input and kernel
    # gradients) on an 8x32x32x64 batch runs 64 groups and took 91 ms against
    # 2.0 ms in float32 TensorFlow (about 45x), measured on a 2-core AMD EPYC
    # (Zen 4). A fused depthwise INT16 kernel would remove the per-group cost.
    name = name or "grouped_conv2d"
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(
            f"Expected groups to be a positive int. Received: groups={groups!r}"
        )
    if groups == 1:
        return ops.conv2d(
            x, kernel, strides, padding, dilations, rounding, seed, name,
            nonfinite, observer,
        )
    x = ops._as_float32(x, "x")
    kernel = ops._as_float32(kernel, "kernel")
    quantizer = ops.OperandQuantizer(rounding, name, nonfinite, observer)
    _check_group_shapes(x, kernel, groups)
    attrs = dict(
        strides=ops._spatial_attr(strides, "strides"),
        padding=ops._normalize_padding(padding),
        dilations=ops._spatial_attr(dilations, "dilations"),
    )

    @tf.custom_gradient
    def _grouped_conv2d(x, kernel):
        x_seed, w_seed, dy_seed = ops._operand_seeds(seed)
        x_m, x_e = quantizer(x, x_seed, "activation")
        w_m, w_e = quantizer(kernel, w_seed, "weight")
        x_groups = tf.split(x_m, groups, axis=-1)
        w_groups = tf.split(w_m, groups, axis=-1)
        y = tf.concat(
            [
                ops.conv2d_int(x_g, x_e, w_g, w_e, **attrs)
                for x_g, w_g in zip(x_groups, w_groups)
            ],
            axis=-1,
        )
        (y,) = quantizer.finish([y])

        def grad(dy):
            dy_m, dy_e = quantizer(dy, dy_seed, "gradient")
            dy_groups = tf.split(dy_m, groups, axis=-1)
            x_group_shape = tf.shape(x_groups[0], out_type=tf.int32)
            w_group_shape = tf.shape(w_groups[0], out_type=tf.int32)
            dx = tf.concat(
                [
                    ops.conv2d_backprop_input_int(
                        x_group_shape, w_g, w_e, dy_g, dy_e, **attrs
                    )
                    for w_g, dy_g in zip(w_groups, dy_groups)
                ],
                axis=-1,
            )
            dw = tf.concat(
                [
                    ops.conv2d_backprop_filter_int(
                        x_g, x_e, w_group_shape, dy_g, dy_e, **attrs
                    )
                    for x_g, dy_g in zip(x_groups, dy_groups)
                ],
                axis=-1,
            )
            return tuple(quantizer.finish([dx, dw]))

        return y, grad

    with tf.name_scope(name):
        return _grouped_conv2d(x, kernel)


def _check_group_shapes(x, kernel, groups):
    in_channels = x.shape[-1]
    kernel_shape = kernel.shape
    if x.shape.rank != 4 or kernel_shape.rank != 4:
        raise ValueError(
            "Expected a 4-D NHWC input and a 4-D HWIO kernel. Received: "
            f"x.shape={x.shape}, kernel.shape={kernel_shape}"
        )
    if in_channels is None or kernel_shape[2] is None or kernel_shape[3] is None:
        raise ValueError(
            "Expected static channel sizes for a grouped convolution. "
            f"Received: x.shape={x.shape}, kernel.shape={kernel_shape}"
        )
    if in_channels != groups * kernel_shape[2] or kernel_shape[3] % groups:
        raise ValueError(
            "Expected input channels = groups * kernel.shape[2] and "
            "kernel.shape[3] divisible by groups. Received: "
            f"groups={groups}, x.shape={x.shape}, kernel.shape={kernel_shape}"
        )


def conv2d_transpose(
    x,
    kernel,
    output_shape,
    strides=1,
    padding="VALID",
    rounding="nearest_even",
    seed=0,
    name=None,
    nonfinite="raise",
    observer=None,
):
    """Differentiable DFP16 transposed 2-D convolution (dilation 1).

    Computes what tf.nn.conv2d_transpose(x, kernel, output_shape, strides,
    padding) computes: the input gradient of a convolution with `kernel`
    whose output has x's shape. With A the linear map of that convolution,
    y = A^T x, so
      forward:          y  = Conv2DBackpropInput(output_shape, kernel, x),
      input gradient:   dx = A dy = Conv2D(dy, kernel),
      kernel gradient:  dw = Conv2DBackpropFilter(input=dy, out_backprop=x),
    because dw[kh, kw, c, o] = sum over n, p of dy[n, p * s + k, c] * x[n, p, o],
    which is the filter gradient of a convolution of dy with output gradient x.

    Args:
      x: float32 NHWC [N, H, W, Cin].
      kernel: float32 [KH, KW, Cout, Cin], the layout of
        keras.layers.Conv2DTranspose and tf.nn.conv2d_transpose.
      output_shape: int32 [4] tensor or list [N, OH, OW, Cout]. A convolution
        of that shape with `strides` and `padding` must give x's shape.
      strides, padding, rounding, seed, name, nonfinite, observer: as in
        `keras_dfp.ops.conv2d`.

    Returns:
      float32 tensor of shape `output_shape`.
    """
    name = name or "conv2d_transpose"
    x = ops._as_float32(x, "x")
    kernel = ops._as_float32(kernel, "kernel")
    quantizer = ops.OperandQuantizer(rounding, name, nonfinite, observer)
    attrs = dict(
        strides=ops._spatial_attr(strides, "strides"),
        padding=ops._normalize_padding(padding),
        dilations=[1, 1, 1, 1],
    )
    output_shape = tf.cast(tf.stack(output_shape), tf.int32)

    @tf.custom_gradient
    def _conv2d_transpose(x, kernel):
        x_seed, w_seed, dy_seed = ops._operand_seeds(seed)
        x_m, x_e = quantizer(x, x_seed, "activation")
        w_m, w_e = quantizer(kernel, w_seed, "weight")
        y = ops.conv2d_backprop_input_int(output_shape, w_m, w_e, x_m, x_e, **attrs)
        (y,) = quantizer.finish([y])

        def grad(dy):
            dy_m, dy_e = quantizer(dy, dy_seed, "gradient")
            dx = ops.conv2d_int(dy_m, dy_e, w_m, w_e, **attrs)
            dw = ops.conv2d_backprop_filter_int(
                dy_m, dy_e, tf.shape(kernel, out_type=tf.int32), x_m, x_e, **attrs
            )
            return tuple(quantizer.finish([dx, dw]))

        return y, grad

    with tf.name_scope(name):
        return _conv2d_transpose(x, kernel)


class EinsumPlan:
    """Transposes and reshapes that turn an EinsumDense equation into a matmul.

    The input's free axes (in input and output only) become the matmul rows,
    the contracted axes (in input and kernel only) the reduction, and the
    kernel's free axes (in kernel and output only) the columns.

    Attributes:
      equation: the equation as given.
      input_perm: permutation of the input to [free..., contracted...].
      kernel_perm: permutation of the kernel to [contracted..., free...].
      free_input_count: number of input free axes.
      output_perm: permutation of [input free..., kernel free...] to the
        output order.
    """

    def __init__(self, equation, input_rank):
        self.equation = equation
        input_axes, kernel_axes, output_axes = _split_equation(equation, input_rank)
        free_input = [a for a in input_axes if a in output_axes and a not in kernel_axes]
        contracted = [a for a in input_axes if a in kernel_axes and a not in output_axes]
        free_kernel = [a for a in kernel_axes if a in output_axes and a not in input_axes]
        self.input_perm = [input_axes.index(a) for a in free_input + contracted]
        self.kernel_perm = [kernel_axes.index(a) for a in contracted + free_kernel]
        self.free_input_count = len(free_input)
        matmul_axes = free_input + free_kernel
        self.output_perm = [matmul_axes.index(a) for a in output_axes]


class UnsupportedEinsumError(ValueError):
    """Error for an einsum equation that `EinsumPlan` cannot map to a matmul.

    `reason` is the clause after "because" in the message, so callers can
    build their own message around it.
    """

    def __init__(self, equation, reason):
        self.equation = equation
        self.reason = reason
        super().__init__(
            f"Expected {EINSUM_FORM}, because {reason}. "
            f"Received: equation={equation!r}"
        )


def _split_equation(equation, input_rank):
    """Return the index letters of input, kernel and output, '...' expanded."""
    compact = equation.replace(" ", "")
    if compact.count("->") != 1 or compact.split("->")[0].count(",") != 1:
        raise UnsupportedEinsumError(
            equation, "it needs exactly two input terms and one '->'"
        )
    inputs, output = compact.split("->")
    input_term, kernel_term = inputs.split(",")

    if _ELLIPSIS in kernel_term:
        raise UnsupportedEinsumError(equation, "the kernel term contains '...'")
    if (_ELLIPSIS in input_term) != (_ELLIPSIS in output):
        raise UnsupportedEinsumError(
            equation, "'...' must appear in both the input and the output"
        )
    used = set(input_term + kernel_term + output)
    if _ELLIPSIS in input_term:
        named_count = len(input_term.replace(_ELLIPSIS, ""))
        spare = [c for c in string.ascii_letters if c not in used]
        elided = "".join(spare[: max(input_rank - named_count, 0)])
        input_term = input_term.replace(_ELLIPSIS, elided)
        output = output.replace(_ELLIPSIS, elided)

    terms = (input_term, kernel_term, output)
    for term in terms:
        if not term.isalpha() or not term.isascii():
            raise UnsupportedEinsumError(equation, f"term {term!r} has non-letter indices")
        if len(set(term)) != len(term):
            raise UnsupportedEinsumError(equation, f"term {term!r} repeats an index")

    for letter in sorted(set("".join(terms))):
        count = sum(letter in term for term in terms)
        if count != 2:
            raise UnsupportedEinsumError(
                equation,
                f"index {letter!r} appears in {count} of the three terms, which "
                "needs a batched or reducing einsum that has no DFP16 kernel",
            )
    if len(input_term) != input_rank:
        raise UnsupportedEinsumError(
            equation,
            f"the input term {input_term!r} does not match the input rank {input_rank}",
        )
    return list(input_term), list(kernel_term), list(output)


def einsum_matmul(
    plan,
    x,
    kernel,
    rounding="nearest_even",
    seed=0,
    name=None,
    nonfinite="raise",
    observer=None,
    matmul=ops.matmul,
):
    """Compute einsum(plan.equation, x, kernel) with one DFP16 matmul.

    Args:
      plan: an `EinsumPlan` for the equation and x's rank.
      x, kernel: float32 tensors. Only x's free axes may have unknown sizes.
      rounding, seed, name, nonfinite, observer: as in `keras_dfp.ops.matmul`.
      matmul: the 2-D product to run, with the signature of
        `keras_dfp.ops.matmul`. `keras_dfp.export` passes a stock-op one.
    """
    x = ops._as_float32(x, "x")
    kernel = ops._as_float32(kernel, "kernel")
    x_t = tf.transpose(x, plan.input_perm)
    kernel_t = tf.transpose(kernel, plan.kernel_perm)
    count = plan.free_input_count
    contracted_rank = x.shape.rank - count
    contracted_size = 1
    for size in kernel_t.shape[:contracted_rank]:
        contracted_size *= size
    free_kernel_shape = kernel_t.shape[contracted_rank:]
    free_kernel_size = 1
    for size in free_kernel_shape:
        free_kernel_size *= size

    rows = tf.reshape(x_t, [-1, contracted_size])
    columns = tf.reshape(kernel_t, [contracted_size, free_kernel_size])
    product = matmul(
        rows,
        columns,
        rounding=rounding,
        seed=seed,
        name=name,
        nonfinite=nonfinite,
        observer=observer,
    )

    free_input_shape = tf.shape(x_t)[:count]
    product_shape = tf.concat(
        [free_input_shape, tf.constant(free_kernel_shape.as_list(), tf.int32)], axis=0
    )
    outputs = tf.transpose(tf.reshape(product, product_shape), plan.output_perm)
    static_shape = x_t.shape[:count].concatenate(free_kernel_shape)
    outputs.set_shape([static_shape[i] for i in plan.output_perm])
    return outputs
