"""Export a DFP16 Keras model as a SavedModel that needs only stock TensorFlow ops.

A TensorFlow Serving binary has no `KerasDfp>*` ops, so `export_for_serving`
traces a serving twin of the model: every DFP16 layer call runs a stock-op
emulation (through `keras_dfp._integration.use_ops`), and every other layer
runs its usual Keras call with `training=False`. The weights of the DFP16
layers are quantized once, at export time, with `keras_dfp.ops.quantize`.

Two modes:

- "exact" reproduces keras-dfp inference bit for bit. The activation is
  quantized at serving time from its float32 bit pattern with integer ops
  (exponent `ilogb(max|x|) - 14`, round half to even, clamp to +-32767).
  The weight mantissas are stored as int16 variables. The convolution or
  matmul runs on the mantissas cast to float64. Each output is a sum of
  `K` products with `|product| <= 2**30`, so every partial sum is an integer
  of magnitude at most `K * 2**30`. float64 represents such integers exactly for
  `K <= 2**23`, so the sum `S` equals the int64 sum of the custom op, in any
  summation order. `S * 2**(e_x + e_w)` is then exact in float64 and is
  rounded to float32 once, as the custom ops do. Layers with `K > 2**23`
  are rejected at export time.
- "fast" runs plain float32 ops on the dequantized DFP16 weights and does not
  quantize activations, so outputs deviate slightly from keras-dfp inference
  (`docs/serving.md` gives a measured deviation).

TensorFlow runs CPU kernels with flush-to-zero and denormals-are-zero set, so
a float32 cast would flush subnormal inputs and results to 0. The exact mode
therefore reads exponents and significands from the bit pattern
(`tf.bitcast`) and builds subnormal float32 results from bits as well.

The custom Quantize op raises on NaN and infinity. The exact mode keeps that
contract with `tf.debugging.check_numerics` on every quantized activation, so
such an input fails at serving time with InvalidArgumentError. The fast mode
has no check and propagates NaN and infinity like float32 Keras.

>>> keras_dfp.export_for_serving(model, "/models/cnn", version=1)
'/models/cnn/1'
"""

import functools
import os
import types

import keras
import tensorflow as tf
from keras.src.backend.common.stateless_scope import StatelessScope
from tensorflow.core.protobuf import saved_model_pb2

from keras_dfp import _integration
from keras_dfp import ops
from keras_dfp import ops_extra
from keras_dfp import reference

MODES = ("exact", "fast")

# The largest reduction length K for which a float64 sum of int16 * int16
# products is exact: K * 2**30 <= 2**53.
MAX_EXACT_REDUCTION_LENGTH = 2**23

# Attributes that hold the quantized weights of the DFP16 layer types.
_WEIGHT_ATTRIBUTES = ("kernel", "depthwise_kernel", "pointwise_kernel")

# Ops that move values without changing them. A quantized weight keeps its
# exponent through them, because quantization uses one exponent per tensor.
_VALUE_PRESERVING_OPS = ("Identity", "Reshape", "Transpose", "ExpandDims", "Squeeze")

_FLOAT32_MIN_NORMAL = 2.0**-126
_FLOAT32_SUBNORMAL_SCALE = 2.0**149  # 1 / (smallest float32 subnormal)


# ---------------------------------------------------------------------------
# DFP16 numerics with stock TensorFlow ops.
# ---------------------------------------------------------------------------


def _ilogb_of_integer(values):
    """Return floor(log2(values)) for int32 values in [1, 2**31).

    The int32 to float64 cast is exact and gives a normal float64, so the
    biased exponent field of its bit pattern is floor(log2) + 1023.
    """
    bits = tf.bitcast(tf.cast(values, tf.float64), tf.int64)
    return tf.cast(tf.bitwise.right_shift(bits, 52), tf.int32) - 1023


def quantize_with_stock_ops(x, tensor_name):
    """Quantize float32 `x` to DFP16 (round half to even) with stock TensorFlow ops.

    Returns (int32 mantissas shaped like x, int32 scalar exponent), equal to
    `keras_dfp.ops.quantize(x)` for every finite input, subnormals included.
    NaN or infinity raises InvalidArgumentError through check_numerics.
    """
    x = tf.debugging.check_numerics(
        x, f"{tensor_name} contains NaN or Inf, which DFP16 cannot quantize"
    )
    bits = tf.bitcast(x, tf.int32)
    magnitude_bits = tf.bitwise.bitwise_and(bits, 0x7FFFFFFF)
    biased_exponent = tf.bitwise.right_shift(magnitude_bits, 23)
    fraction = tf.bitwise.bitwise_and(magnitude_bits, 0x7FFFFF)

    # |x| = significand * 2**power, with the implicit leading bit for normals.
    is_normal = biased_exponent > 0
    significand = tf.where(is_normal, tf.bitwise.bitwise_or(fraction, 0x800000), fraction)
    power = tf.where(is_normal, biased_exponent - 150, tf.fill(tf.shape(bits), -149))

    # Magnitude bit patterns order like the magnitudes, so the largest one
    # belongs to max|x|. An empty tensor reduces to the lowest int32.
    max_bits = tf.reduce_max(magnitude_bits)
    max_biased = tf.bitwise.right_shift(max_bits, 23)
    max_ilogb = tf.where(
        max_biased > 0,
        max_biased - 127,
        _ilogb_of_integer(tf.maximum(tf.bitwise.bitwise_and(max_bits, 0x7FFFFF), 1))
        - 149,
    )
    exponent = tf.where(max_bits > 0, max_ilogb - 14, 0)

    # s = significand * 2**(power - exponent) and |s| < 2**15. A right shift
    # by `right` bits rounds half to even from the shifted-out remainder.
    # Shifts beyond 40 bits clip harmlessly because significand < 2**24.
    shift = exponent - power
    right = tf.cast(tf.clip_by_value(shift, 0, 40), tf.int64)
    left = tf.cast(tf.clip_by_value(-shift, 0, 15), tf.int64)
    significand = tf.cast(significand, tf.int64)
    quotient = tf.bitwise.right_shift(significand, right)
    remainder = significand - tf.bitwise.left_shift(quotient, right)
    half = tf.bitwise.right_shift(tf.bitwise.left_shift(tf.constant(1, tf.int64), right), 1)
    quotient_is_odd = tf.equal(tf.bitwise.bitwise_and(quotient, 1), 1)
    round_up = tf.logical_or(
        remainder > half,
        tf.logical_and(tf.equal(remainder, half), tf.logical_and(right > 0, quotient_is_odd)),
    )
    rounded = tf.bitwise.left_shift(quotient + tf.cast(round_up, tf.int64), left)
    saturated = tf.cast(tf.minimum(rounded, reference.MANTISSA_MAX), tf.int32)
    mantissa = tf.where(bits < 0, -saturated, saturated)
    return mantissa, exponent


def _power_of_two(exponent):
    """Return 2.0**exponent in float64, built from bits, for exponent in [-1022, 1023]."""
    biased = tf.cast(exponent, tf.int64) + 1023
    return tf.bitcast(tf.bitwise.left_shift(biased, 52), tf.float64)


def round_sums_to_float32(sums, exponent):
    """Return float32(sums * 2**exponent) with one round half to even.

    `sums` are float64 integers with |sums| <= 2**53 and `exponent` is in
    [-326, 226], so the float64 product is exact and normal (or zero).
    Results below 2**-126 would be flushed to 0 by a cast under
    flush-to-zero, so they are rounded to units of 2**-149 and assembled as
    subnormal float32 bit patterns. A zero sum gives +0.0, as the int64 sum 0
    does in the custom ops.
    """
    exact = sums * _power_of_two(exponent)
    normal = tf.cast(exact, tf.float32)

    magnitude = tf.abs(exact)
    units = tf.cast(tf.round(magnitude * _FLOAT32_SUBNORMAL_SCALE), tf.int32)
    sign = tf.where(exact < 0, tf.constant(-(2**31), tf.int32), 0)
    subnormal = tf.bitcast(tf.bitwise.bitwise_or(units, sign), tf.float32)
    return tf.where(magnitude < _FLOAT32_MIN_NORMAL, subnormal, normal)


# ---------------------------------------------------------------------------
# Serving backends with the signatures of `_integration.DFP_OPS`.
# ---------------------------------------------------------------------------


def _split_groups(function, x, kernel, groups):
    """Run `function(x_group, kernel_group)` per group and concatenate the channels.

    Stock grouped convolutions have no CPU kernel, so each group runs alone.
    """
    if groups == 1:
        return function(x, kernel)
    pairs = zip(tf.split(x, groups, axis=-1), tf.split(kernel, groups, axis=-1))
    return tf.concat([function(x_g, k_g) for x_g, k_g in pairs], axis=-1)


class _ExactOps:
    """Stock-op products of int16 mantissas, exact in float64.

    Weight operands are the float32-cast mantissa tensors registered in
    `weight_exponents` (keyed by tensor reference), possibly reshaped or
    transposed by the layer call.

    The methods take the keyword arguments of the `keras_dfp.ops` functions
    that the layers pass. `nonfinite` and `observer` are ignored here and in
    `_FastOps`: a served graph has no optimizer step to skip and records no
    telemetry, and exact mode checks activations with tf.debugging.check_numerics.
    """

    def __init__(self):
        self.weight_exponents = {}
        self.einsum_matmul = functools.partial(ops_extra.einsum_matmul, matmul=self.matmul)

    def _weight_exponent(self, kernel, name):
        tensor = kernel
        while tensor.ref() not in self.weight_exponents:
            if tensor.op.type not in _VALUE_PRESERVING_OPS:
                raise RuntimeError(
                    f"Expected the weight of DFP16 op '{name}' to be a layer "
                    "weight quantized at export time. Received: a tensor made "
                    f"by op type {tensor.op.type!r}. export_for_serving supports "
                    "DFP16 layers that use their own kernel variables only."
                )
            tensor = tensor.op.inputs[0]
        return self.weight_exponents[tensor.ref()]

    @staticmethod
    def _check_reduction_length(length, name):
        if length > MAX_EXACT_REDUCTION_LENGTH:
            raise ValueError(
                f"Expected a reduction length of at most 2**23 = "
                f"{MAX_EXACT_REDUCTION_LENGTH} in every DFP16 op for "
                "mode='exact', because float64 sums of int16 products are "
                f"exact only up to 2**53. Received: {length} for op '{name}'. "
                "Export with mode='fast' instead."
            )

    def _product(self, x, kernel, name, reduction_length, product):
        # Dense passes its Keras variable, which the StatelessScope of
        # `_ServingModule.serve` converts to the registered mantissa tensor.
        kernel = tf.convert_to_tensor(kernel)
        w_e = self._weight_exponent(kernel, name)
        self._check_reduction_length(reduction_length, name)
        x_m, x_e = quantize_with_stock_ops(x, f"{name} (activation)")
        sums = product(tf.cast(x_m, tf.float64), tf.cast(kernel, tf.float64))
        return round_sums_to_float32(sums, x_e + w_e)

    def grouped_conv2d(
        self, x, kernel, groups, strides=1, padding="VALID", dilations=1,
        rounding="nearest_even", seed=0, name=None, nonfinite="raise", observer=None,
    ):
        del rounding, seed  # export_for_serving accepts nearest_even layers only.
        attrs = _conv_attrs(strides, padding, dilations)
        kernel_h, kernel_w, group_channels, _ = kernel.shape

        def product(x64, w64):
            return _split_groups(
                lambda x_g, w_g: tf.nn.conv2d(x_g, w_g, **attrs), x64, w64, groups
            )

        return self._product(x, kernel, name, kernel_h * kernel_w * group_channels, product)

    def conv2d(
        self, x, kernel, strides=1, padding="VALID", dilations=1,
        rounding="nearest_even", seed=0, name=None, nonfinite="raise", observer=None,
    ):
        return self.grouped_conv2d(
            x, kernel, 1, strides, padding, dilations, rounding, seed, name
        )

    def conv2d_transpose(
        self, x, kernel, output_shape, strides=1, padding="VALID",
        rounding="nearest_even", seed=0, name=None, nonfinite="raise", observer=None,
    ):
        del rounding, seed
        output_shape = tf.cast(tf.stack(output_shape), tf.int32)
        strides = ops._spatial_attr(strides, "strides")
        padding = ops._normalize_padding(padding)
        kernel_h, kernel_w, _, input_channels = kernel.shape

        def product(x64, w64):
            return tf.nn.conv2d_transpose(x64, w64, output_shape, strides, padding)

        return self._product(x, kernel, name, kernel_h * kernel_w * input_channels, product)

    def matmul(
        self, a, b, rounding="nearest_even", seed=0, name=None, nonfinite="raise",
        observer=None,
    ):
        del rounding, seed
        return self._product(a, b, name, b.shape[0], tf.matmul)


class _FastOps:
    """Plain float32 stock ops on the dequantized weights, no activation quantization."""

    def __init__(self):
        self.einsum_matmul = functools.partial(ops_extra.einsum_matmul, matmul=self.matmul)

    def grouped_conv2d(
        self, x, kernel, groups, strides=1, padding="VALID", dilations=1,
        rounding="nearest_even", seed=0, name=None, nonfinite="raise", observer=None,
    ):
        attrs = _conv_attrs(strides, padding, dilations)
        return _split_groups(
            lambda x_g, w_g: tf.nn.conv2d(x_g, w_g, **attrs), x, kernel, groups
        )

    def conv2d(
        self, x, kernel, strides=1, padding="VALID", dilations=1,
        rounding="nearest_even", seed=0, name=None, nonfinite="raise", observer=None,
    ):
        return self.grouped_conv2d(x, kernel, 1, strides, padding, dilations)

    def conv2d_transpose(
        self, x, kernel, output_shape, strides=1, padding="VALID",
        rounding="nearest_even", seed=0, name=None, nonfinite="raise", observer=None,
    ):
        output_shape = tf.cast(tf.stack(output_shape), tf.int32)
        return tf.nn.conv2d_transpose(
            x,
            kernel,
            output_shape,
            ops._spatial_attr(strides, "strides"),
            ops._normalize_padding(padding),
        )

    def matmul(
        self, a, b, rounding="nearest_even", seed=0, name=None, nonfinite="raise",
        observer=None,
    ):
        return tf.matmul(a, b)


def _conv_attrs(strides, padding, dilations):
    return dict(
        strides=ops._spatial_attr(strides, "strides"),
        padding=ops._normalize_padding(padding),
        dilations=ops._spatial_attr(dilations, "dilations"),
    )


# ---------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------


def _dfp_weights(model):
    """Return [(layer, Keras variable)] for every weight that a DFP16 layer quantizes."""
    found = []
    for layer in model._flatten_layers():
        if _integration.dfp_op_name(layer) is None:
            continue
        rounding = _integration.effective_policy(layer).rounding
        if rounding != "nearest_even":
            raise ValueError(
                "Expected DFP16 layers with round-half-to-even rounding for "
                "export, because serving runs inference with a fixed "
                f"rounding. Received: rounding={rounding!r} in layer "
                f"'{layer.name}'. Set layer.dtype_policy = 'dfp16' on such "
                "layers before exporting."
            )
        for attribute in _WEIGHT_ATTRIBUTES:
            variable = getattr(layer, attribute, None)
            if isinstance(variable, keras.Variable):
                found.append((layer, variable))
    return found


def _input_specs(model):
    specs = []
    for index, tensor in enumerate(model.inputs):
        name = getattr(tensor, "name", None) or f"input_{index}"
        specs.append(tf.TensorSpec([None, *tensor.shape[1:]], tf.float32, name=name))
    return specs


def _output_dict(model, outputs):
    flat = tf.nest.flatten(outputs)
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(flat):
        names = [f"output_{index}" for index in range(len(flat))]
    return {name: tf.cast(tensor, tf.float32) for name, tensor in zip(names, flat)}


class _ServingModule(tf.Module):
    """The serving twin: the model's non-DFP16 variables and the quantized weights."""

    def __init__(self, model, mode):
        super().__init__(name="keras_dfp_serving")
        # The Keras model is kept out of the saved object graph on purpose:
        # tf.saved_model.save would also save its compiled train and predict
        # functions, which contain the custom ops. A SimpleNamespace is not
        # trackable, so saving skips it.
        self._untracked = types.SimpleNamespace(model=model)
        self._mode = mode

        dfp_weights = _dfp_weights(model)
        replaced = {id(variable) for _, variable in dfp_weights}
        # Only these variables are saved. The float32 master copies of the
        # DFP16 weights are left out on purpose.
        self.model_variables = [
            variable.value for variable in model.variables if id(variable) not in replaced
        ]

        # Quantize each DFP16 weight once, with the custom op, at export time.
        self.dfp_weight_values = []
        self._dfp_weights = []
        for layer, variable in dfp_weights:
            mantissa, exponent = ops.quantize(
                variable.value, tensor_name=f"{layer.name} (weight)"
            )
            if mode == "exact":
                stored = tf.Variable(mantissa, trainable=False, name=f"{layer.name}_mantissa")
            else:
                stored = tf.Variable(
                    ops.dequantize(mantissa, exponent),
                    trainable=False,
                    name=f"{layer.name}_dequantized",
                )
            self.dfp_weight_values.append(stored)
            self._dfp_weights.append((variable, stored, int(exponent.numpy())))

    def serve(self, *inputs):
        backend = _ExactOps() if self._mode == "exact" else _FastOps()
        state_mapping = []
        for variable, stored, exponent in self._dfp_weights:
            value = tf.cast(stored, tf.float32)
            if self._mode == "exact":
                backend.weight_exponents[value.ref()] = exponent
            state_mapping.append((variable, value))

        model_inputs = inputs[0] if len(inputs) == 1 else list(inputs)
        with _integration.use_ops(backend), StatelessScope(state_mapping=state_mapping):
            outputs = self._untracked.model(model_inputs, training=False)
        return _output_dict(self._untracked.model, outputs)


def _export_dir(path, version):
    if version is None:
        return os.fspath(path)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            "Expected version to be a positive int, the numeric subdirectory "
            f"that TensorFlow Serving loads. Received: version={version!r}"
        )
    return os.path.join(os.fspath(path), str(version))


def export_for_serving(model, path, mode="exact", version=None):
    """Write `model` as a SavedModel with only stock TensorFlow ops.

    Args:
      model: a built Keras model with DFP16 layers (other models work too).
      path: output directory, or with `version` the model base path.
      mode: "exact" (bit-identical to keras-dfp inference) or "fast"
        (float32 with the DFP16-rounded weights). See the module docstring.
      version: optional positive int. The SavedModel then goes to
        `path/<version>`, the layout that TensorFlow Serving expects under
        `--model_base_path`.

    Returns:
      The directory written. Its `serving_default` signature takes and
      returns float32 tensors with a batch dimension of None.

    Raises:
      ValueError: for an unknown mode, a model without inputs, a DFP16 layer
        with stochastic rounding, a reduction longer than 2**23 in exact
        mode, or an existing non-empty output directory.
    """
    if mode not in MODES:
        raise ValueError(f"Expected mode to be one of {MODES}. Received: mode={mode!r}")
    if not isinstance(model, keras.Model) or not model.built or not model.inputs:
        raise ValueError(
            "Expected a built Keras model with known inputs, such as a "
            "functional or Sequential model with an Input. Received: "
            f"model={model!r}. Call the model on data or build it first."
        )
    export_dir = _export_dir(path, version)
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        raise ValueError(
            "Expected a new or empty export directory. Received: "
            f"path={export_dir!r}, which is not empty. Pass a new version or "
            "remove the directory."
        )

    module = _ServingModule(model, mode)
    serve = tf.function(module.serve, input_signature=_input_specs(model), autograph=False)
    signature = serve.get_concrete_function()
    tf.saved_model.save(module, export_dir, signatures={"serving_default": signature})

    custom = [op for op in list_saved_model_ops(export_dir) if op.startswith("KerasDfp")]
    if custom:
        raise RuntimeError(
            f"Expected only stock TensorFlow ops in the export. Received: ops "
            f"{custom} in {export_dir!r}. This is a keras-dfp bug; please "
            "report it with the model summary."
        )
    return export_dir


def list_saved_model_ops(path):
    """Return the sorted op types used by every graph and function of a SavedModel.

    Reads `path/saved_model.pb` only, so it works without loading the model
    or its op libraries. Calls of library functions by name are not listed,
    because those names are functions, not ops.
    """
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(os.fspath(path), "saved_model.pb"), "rb") as file:
        saved_model.ParseFromString(file.read())
    op_types = set()
    function_names = set()
    for meta_graph in saved_model.meta_graphs:
        graph_def = meta_graph.graph_def
        op_types.update(node.op for node in graph_def.node)
        for function in graph_def.library.function:
            function_names.add(function.signature.name)
            op_types.update(node.op for node in function.node_def)
    return sorted(op_types - function_names)
