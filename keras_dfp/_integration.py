"""Route stock Keras layers through the DFP16 ops under a `DFPPolicy`.

`install()` patches Keras 3.15 at the narrowest points, so model code needs no
change and every layer without a `DFPPolicy` runs the original Keras method:

- `DTypePolicy.__init__` turns the new object into a `DFPPolicy` for the
  names "dfp16", "dfp16_stochastic" and "dfp16_stochastic_seed<int>" (and for
  name=None while the global policy is a `DFPPolicy`). Every string path
  (`set_dtype_policy`, `dtype_policies.get`, a layer's `dtype=`) goes through
  `DTypePolicy(name)`, so this one hook covers them all.
- Convolutions run as 2-D NHWC DFP16 ops; a 1-D layer becomes a 2-D one with
  height 1. `BaseConv.convolution_op` and `Conv1D.call` (which handles
  "causal" padding itself) call `keras_dfp.ops_extra.grouped_conv2d`.
  `BaseDepthwiseConv.call` runs a grouped convolution with groups = channels,
  `BaseSeparableConv.call` that followed by a 1x1 `keras_dfp.ops.conv2d`, and
  `BaseConvTranspose.call` `keras_dfp.ops_extra.conv2d_transpose`.
- `Dense.call` calls `keras_dfp.ops.matmul`, and `EinsumDense.call` rewrites
  its equation into one `keras_dfp.ops.matmul` (`ops_extra.einsum_matmul`).
  Bias add and activation stay float32.
- The `build` of every patched layer rejects options without a DFP16 path
  (3-D convolutions, channels_first, dilated transposed convolutions, LoRA,
  einsum equations that are not one matmul) before any weight is created.
  The call-time checks repeat them for a policy assigned after build.
- `model_supports_jit`, the `jit_compile` setter and the TensorFlow trainer's
  `make_*_function` keep XLA away from models with DFP16 layers, because the
  custom ops have no XLA kernels.
- `Layer._check_quantize_args` rejects Keras post-training quantization of a
  DFP16 layer.
- `dtype_policies.serialize`, which `Layer.get_config` calls, writes a
  `DFPPolicy` as a stock DTypePolicy whose name is the policy name with the
  prefix "keras_dfp>" and an install hint (`policy.serialized_name`). Keras
  without keras_dfp then fails with "Cannot convert 'keras_dfp>dfp16 (pip
  install keras-dfp, then import keras_dfp before loading)' to a mixed
  precision DTypePolicy", where the registered-class form would fail with an
  AttributeError on a str.
- `use_ops(backend)` temporarily routes every DFP16 layer call through another
  set of functions with the signatures of `DFP_OPS`. `keras_dfp.export` uses it
  to trace a model with stock TensorFlow ops only.
- `BaseOptimizer.apply` makes every update of a traced train step wait for
  all gradients, so a step that fails on a non-finite gradient updates no
  variable. For variables of layers whose policy has nonfinite="skip_step" it
  skips the whole update when a gradient is NaN or infinite and counts the
  step instead (see `_patch_optimizer_apply`).
- `TensorFlowTrainer.train_step` of such a model restores the non-trainable
  and metric variables that the forward pass changed when the optimizer
  skipped the step (see `_patch_train_step`).
- `Trainer.compile` of such a model creates the skipped-step counter, so
  `load_model` and `BackupAndRestore` can restore the saved count into it.
  The counter and the stochastic-rounding generator state are saved through
  `keras_dfp._state.DFPState` objects (see that module).
"""

import contextlib
import functools
import hashlib
import types
import inspect
import logging

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util
from keras.src.backend.common.backend_utils import compute_conv_transpose_output_shape
from keras.src.backend.tensorflow import trainer as tf_trainer_module
from keras.src import dtype_policies as dtype_policies_module
from keras.src.dtype_policies import dtype_policy as dtype_policy_module
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.dtype_policies.dtype_policy_map import DTypePolicyMap
from keras.src.layers.convolutional.base_conv import BaseConv
from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv
from keras.src.layers.convolutional.conv1d import Conv1D
from keras.src.layers.core.dense import Dense
from keras.src.layers.core.einsum_dense import EinsumDense
from keras.src.layers.layer import Layer
from keras.src.trainers import trainer as trainer_module

from keras_dfp import ops
from keras_dfp import ops_extra
from keras_dfp import telemetry
from keras_dfp import _state
from keras_dfp.policy import POLICY_NAME
from keras_dfp.policy import parse_policy_name
from keras_dfp.policy import serialized_name
from keras_dfp.policy import DFPPolicy

logger = logging.getLogger(__name__)

_CONV_OP = "KerasDfp>Conv2D"
_CONV_TRANSPOSE_OP = "KerasDfp>Conv2DBackpropInput"
_MATMUL_OP = "KerasDfp>MatMul"

_FLOAT_FIX = "Pass dtype='float32' to this layer to run it in float32."

_installed = False

# The functions that patched layer calls run their DFP16 products with.
DFP_OPS = types.SimpleNamespace(
    conv2d=ops.conv2d,
    grouped_conv2d=ops_extra.grouped_conv2d,
    conv2d_transpose=ops_extra.conv2d_transpose,
    matmul=ops.matmul,
    einsum_matmul=ops_extra.einsum_matmul,
)
_active_ops = DFP_OPS


@contextlib.contextmanager
def use_ops(backend):
    """Run DFP16 layer calls with `backend`'s functions inside the context.

    `backend` has the attributes of `DFP_OPS` with the same signatures. The
    setting is process-wide, so trace only one model at a time inside it.
    """
    global _active_ops
    previous = _active_ops
    _active_ops = backend
    try:
        yield
    finally:
        _active_ops = previous


def effective_policy(layer):
    """Return the dtype policy a layer computes with, resolving a DTypePolicyMap."""
    policy = layer._dtype_policy
    if isinstance(policy, DTypePolicyMap) and layer.path:
        policy = policy[layer.path]
    return policy


def runs_dfp(layer):
    """Return True if `layer` is under a `DFPPolicy`."""
    return isinstance(effective_policy(layer), DFPPolicy)


def dfp_op_name(layer):
    """Return the custom op a DFP16 layer runs forward, or None for other layers."""
    if not runs_dfp(layer):
        return None
    if isinstance(layer, (BaseConv, BaseDepthwiseConv, BaseSeparableConv)):
        return _CONV_OP
    if isinstance(layer, BaseConvTranspose):
        return _CONV_TRANSPOSE_OP
    if isinstance(layer, (Dense, EinsumDense)):
        return _MATMUL_OP
    return None


def _unsupported_error(layer, expected, reason, received):
    return ValueError(
        f"Expected {expected} for layer '{layer.name}' ({type(layer).__name__}) "
        f"under the '{POLICY_NAME}' dtype policy, because {reason}. "
        f"Received: {received}. {_FLOAT_FIX}"
    )


def _check_lora(layer):
    if layer.lora_rank or layer.lora_enabled:
        raise _unsupported_error(
            layer,
            "no LoRA",
            "LoRA is not supported in DFP16 yet",
            f"lora_rank={layer.lora_rank}",
        )


def _check_rank_and_format(layer):
    """Raise ValueError for a 3-D or channels_first convolution layer."""
    if layer.rank not in (1, 2):
        raise _unsupported_error(
            layer,
            "a 1-D or 2-D convolution",
            "the DFP16 ops are 2-D NHWC convolutions and 3-D convolutions "
            "have no DFP16 kernel",
            f"rank={layer.rank}",
        )
    if layer.data_format != "channels_last":
        raise _unsupported_error(
            layer,
            "data_format='channels_last'",
            "the DFP16 convolution ops take NHWC inputs",
            f"data_format={layer.data_format!r}",
        )


def check_conv_supported(layer):
    """Raise ValueError if a BaseConv layer uses an option DFP16 lacks."""
    _check_rank_and_format(layer)
    _check_lora(layer)


def check_conv_transpose_supported(layer):
    """Raise ValueError if a BaseConvTranspose layer uses an option DFP16 lacks."""
    _check_rank_and_format(layer)
    if any(rate != 1 for rate in layer.dilation_rate):
        raise _unsupported_error(
            layer,
            "dilation_rate=1",
            "the DFP16 transposed convolution supports no dilation",
            f"dilation_rate={layer.dilation_rate}",
        )


def check_dense_supported(layer):
    """Raise ValueError if a Dense layer uses an option DFP16 lacks."""
    _check_lora(layer)


def _layer_rounding_key(policy, layer):
    """Return an int64 key that mixes the full policy seed with the layer name.

    Every op seed of the layer is XORed with this key, so two policy seeds or
    two layer names give different rounding streams even if the 31-bit seeds
    of their Keras generators collide.
    """
    digest = hashlib.blake2b(
        f"{policy.seed}/{layer.name}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little", signed=True)


def einsum_plan(layer, input_rank):
    """Return the matmul plan of an EinsumDense layer, or raise ValueError."""
    try:
        return ops_extra.EinsumPlan(layer.equation, input_rank)
    except ops_extra.UnsupportedEinsumError as error:
        raise _unsupported_error(
            layer,
            ops_extra.EINSUM_FORM,
            error.reason,
            f"equation={layer.equation!r}",
        ) from None


def _stochastic_seed_generator_seed(policy, layer):
    # One generator per layer. Keras seed generators take 31-bit seeds, so the
    # generator is started from the low bits of the layer key.
    return _layer_rounding_key(policy, layer) % (2**31)


def _create_seed_generator(layer):
    policy = effective_policy(layer)
    if policy.rounding == "stochastic":
        layer._dfp_seed_generator = keras.random.SeedGenerator(
            _stochastic_seed_generator_seed(policy, layer),
            name="dfp_rounding_seed",
        )
        _state.attach_rounding_state(layer, layer._dfp_seed_generator)


def _rounding_args(layer):
    """Return the rounding mode and the int64 seed tensor for one forward call."""
    policy = effective_policy(layer)
    if policy.rounding != "stochastic":
        return policy.rounding, tf.constant(0, tf.int64)
    generator = getattr(layer, "_dfp_seed_generator", None)
    if generator is None:
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) received a "
            "stochastic-rounding DFPPolicy after it was built, so it has no "
            "rounding seed generator. Received: "
            f"dtype_policy={policy!r}. Set the policy before the layer is built."
        )
    # Two 31-bit draws make a 62-bit per-call value; the layer key spreads it
    # over all 64 bits of the op seed.
    draws = keras.random.randint(
        (2,), minval=0, maxval=2**31 - 1, dtype="int32", seed=generator
    )
    draws = tf.cast(draws, tf.int64)
    per_call = tf.bitwise.bitwise_or(tf.bitwise.left_shift(draws[0], 31), draws[1])
    key = tf.constant(_layer_rounding_key(policy, layer), tf.int64)
    return policy.rounding, tf.bitwise.bitwise_xor(per_call, key)


def _dfp_op_args(layer, name):
    """Return the keyword arguments of one DFP16 op call of `layer` named `name`.

    Each call draws a new stochastic-rounding seed. It also tags the layer's
    variables with the policy's non-finite mode, which the patched
    `BaseOptimizer.apply` reads.
    """
    policy = effective_policy(layer)
    rounding, seed = _rounding_args(layer)
    for variable in layer.variables:
        variable._keras_dfp_nonfinite = policy.nonfinite
    return dict(
        rounding=rounding,
        seed=seed,
        name=name,
        nonfinite=policy.nonfinite,
        observer=telemetry.observer(layer, name),
    )


def _check_not_in_xla(layer, op_name):
    """Raise ValueError when the layer is traced inside an XLA-compiled function.

    `tf.function(jit_compile=True)` enters an XLA control-flow context on the
    graph it traces into, so this catches every XLA path, including models
    whose DFP16 layers are created only when the train step is first traced.
    """
    if tf.executing_eagerly():
        return
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        raise _jit_error(layer, op_name)


def _float32_input(inputs):
    if isinstance(inputs, tf.SparseTensor):
        raise TypeError(
            "Expected a dense input tensor for a DFP16 layer. Received: "
            f"inputs of type {type(inputs).__name__}. Convert it with "
            "tf.sparse.to_dense or run this layer with dtype='float32'."
        )
    inputs = tf.convert_to_tensor(inputs)
    if inputs.dtype != tf.float32:
        inputs = tf.cast(inputs, tf.float32)
    return inputs


def _patch_policy_init():
    """Turn new `DTypePolicy` objects with a DFP16 name into `DFPPolicy` objects.

    The class is switched in `__init__` and not in `__new__`, because
    `copy.deepcopy` and pickle call `DTypePolicy.__new__(cls)` without a name
    and must get back the class they copy.
    """
    stock_classes = (keras.DTypePolicy, keras.dtype_policies.FloatDTypePolicy)
    original_init = keras.DTypePolicy.__init__

    @functools.wraps(original_init)
    def policy_init(self, name=None):
        if type(self) in stock_classes:
            global_policy = dtype_policy_module.global_state.get_global_attribute(
                "dtype_policy", None
            )
            unnamed_under_dfp = name is None and isinstance(global_policy, DFPPolicy)
            if unnamed_under_dfp or parse_policy_name(name) is not None:
                self.__class__ = DFPPolicy
                DFPPolicy.__init__(self, name)
                return
        original_init(self, name)

    keras.DTypePolicy.__init__ = policy_init


def _patch_policy_serialize():
    """Serialize a `DFPPolicy` as a stock DTypePolicy with a prefixed name."""
    original_serialize = dtype_policies_module.serialize

    @functools.wraps(original_serialize)
    def serialize(dtype_policy):
        if isinstance(dtype_policy, DFPPolicy):
            return original_serialize(keras.DTypePolicy("float32")) | {
                "config": {"name": serialized_name(dtype_policy)}
            }
        return original_serialize(dtype_policy)

    dtype_policies_module.serialize = serialize
    keras.dtype_policies.serialize = serialize


def _spatial_2d(values):
    """Return a 1-D (w,) or 2-D (h, w) tuple of ints as a 2-D [h, w] list."""
    values = list(values)
    return [1] + values if len(values) == 1 else values


def _to_nhwc(layer, inputs, kernels):
    """Return float32 NHWC inputs and 4-D kernels for a 1-D or 2-D layer.

    A 1-D layer runs as a 2-D one with height 1: inputs [N, W, C] become
    [N, 1, W, C] and kernels [K, ...] become [1, K, ...].
    """
    inputs = _float32_input(inputs)
    kernels = [tf.convert_to_tensor(kernel) for kernel in kernels]
    if layer.rank == 1:
        inputs = tf.expand_dims(inputs, 1)
        kernels = [tf.expand_dims(kernel, 0) for kernel in kernels]
    return inputs, kernels


def _from_nhwc(layer, outputs):
    return tf.squeeze(outputs, 1) if layer.rank == 1 else outputs


def _bias_and_activation(layer, outputs):
    # Channels are last, so the bias broadcasts without a reshape.
    if layer.bias is not None:
        outputs = tf.add(outputs, layer.bias)
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return outputs


def _conv(layer, inputs, kernel, padding):
    """Run a 1-D or 2-D, possibly grouped, DFP16 convolution of a BaseConv layer."""
    check_conv_supported(layer)
    _check_not_in_xla(layer, _CONV_OP)
    inputs, (kernel,) = _to_nhwc(layer, inputs, [kernel])
    outputs = _active_ops.grouped_conv2d(
        inputs,
        kernel,
        groups=layer.groups,
        strides=_spatial_2d(layer.strides),
        padding=padding.upper(),
        dilations=_spatial_2d(layer.dilation_rate),
        **_dfp_op_args(layer, layer.name),
    )
    return _from_nhwc(layer, outputs)


def _dfp_build(check):
    """Return a `build` wrapper that checks options and creates the seed generator."""

    def wrap(original_build):
        @functools.wraps(original_build)
        def build(self, input_shape):
            if runs_dfp(self):
                check(self, input_shape)
                _create_seed_generator(self)
            return original_build(self, input_shape)

        return build

    return wrap


def _patch_conv():
    original_convolution_op = BaseConv.convolution_op
    original_conv1d_call = Conv1D.call

    @functools.wraps(original_convolution_op)
    def convolution_op(self, inputs, kernel):
        if not runs_dfp(self):
            return original_convolution_op(self, inputs, kernel)
        return _conv(self, inputs, kernel, self.padding)

    # Conv1D.call calls keras.ops.conv itself instead of convolution_op, and
    # implements "causal" padding: pad dilation * (kernel - 1) steps on the
    # left, then a VALID convolution.
    @functools.wraps(original_conv1d_call)
    def conv1d_call(self, inputs):
        if not runs_dfp(self):
            return original_conv1d_call(self, inputs)
        padding = self.padding
        if padding == "causal":
            inputs = tf.pad(_float32_input(inputs), self._compute_causal_padding())
            padding = "valid"
        outputs = _conv(self, inputs, self.kernel, padding)
        return _bias_and_activation(self, outputs)

    BaseConv.build = _dfp_build(lambda layer, _: check_conv_supported(layer))(
        BaseConv.build
    )
    BaseConv.convolution_op = convolution_op
    Conv1D.call = conv1d_call


def _conv_transpose_output_shape(layer, inputs):
    """Return the output shape that stock Keras computes, with a dynamic batch."""
    input_shape = list(inputs.shape)
    dynamic_shape = tf.shape(inputs)
    for axis, size in enumerate(input_shape):
        if size is None:
            input_shape[axis] = dynamic_shape[axis]
    return compute_conv_transpose_output_shape(
        input_shape,
        layer.kernel_size,
        layer.filters,
        layer.strides,
        layer.padding,
        layer.output_padding,
        layer.data_format,
        layer.dilation_rate,
    )


def _patch_conv_transpose():
    original_call = BaseConvTranspose.call

    @functools.wraps(original_call)
    def call(self, inputs):
        if not runs_dfp(self):
            return original_call(self, inputs)
        check_conv_transpose_supported(self)
        _check_not_in_xla(self, _CONV_TRANSPOSE_OP)
        output_shape = _conv_transpose_output_shape(self, _float32_input(inputs))
        if self.rank == 1:
            output_shape = [output_shape[0], 1, *output_shape[1:]]
        inputs, (kernel,) = _to_nhwc(self, inputs, [self.kernel])
        outputs = _active_ops.conv2d_transpose(
            inputs,
            kernel,
            output_shape,
            strides=_spatial_2d(self.strides),
            padding=self.padding.upper(),
            **_dfp_op_args(self, self.name),
        )
        return _bias_and_activation(self, _from_nhwc(self, outputs))

    BaseConvTranspose.build = _dfp_build(
        lambda layer, _: check_conv_transpose_supported(layer)
    )(BaseConvTranspose.build)
    BaseConvTranspose.call = call


def _depthwise_conv(layer, inputs, kernel, name):
    """Run a depthwise convolution on NHWC inputs as a grouped convolution.

    The depthwise kernel [KH, KW, C, M] reshaped to [KH, KW, 1, C * M] is the
    grouped kernel with groups = C, because output channel c * M + m of a
    depthwise convolution reads input channel c only.
    """
    kernel_h, kernel_w, channels, multiplier = kernel.shape
    grouped_kernel = tf.reshape(kernel, [kernel_h, kernel_w, 1, channels * multiplier])
    return _active_ops.grouped_conv2d(
        inputs,
        grouped_kernel,
        groups=channels,
        strides=_spatial_2d(layer.strides),
        padding=layer.padding.upper(),
        dilations=_spatial_2d(layer.dilation_rate),
        **_dfp_op_args(layer, name),
    )


def _patch_depthwise_conv():
    original_call = BaseDepthwiseConv.call

    @functools.wraps(original_call)
    def call(self, inputs):
        if not runs_dfp(self):
            return original_call(self, inputs)
        _check_rank_and_format(self)
        _check_not_in_xla(self, _CONV_OP)
        inputs, (kernel,) = _to_nhwc(self, inputs, [self.kernel])
        outputs = _depthwise_conv(self, inputs, kernel, self.name)
        return _bias_and_activation(self, _from_nhwc(self, outputs))

    BaseDepthwiseConv.build = _dfp_build(
        lambda layer, _: _check_rank_and_format(layer)
    )(BaseDepthwiseConv.build)
    BaseDepthwiseConv.call = call


def _patch_separable_conv():
    original_call = BaseSeparableConv.call

    @functools.wraps(original_call)
    def call(self, inputs):
        if not runs_dfp(self):
            return original_call(self, inputs)
        _check_rank_and_format(self)
        _check_not_in_xla(self, _CONV_OP)
        inputs, (depthwise_kernel, pointwise_kernel) = _to_nhwc(
            self, inputs, [self.depthwise_kernel, self.pointwise_kernel]
        )
        # Each of the two convolutions draws its own stochastic rounding seed.
        depthwise_outputs = _depthwise_conv(
            self, inputs, depthwise_kernel, f"{self.name}/depthwise"
        )
        outputs = _active_ops.conv2d(
            depthwise_outputs,
            pointwise_kernel,
            strides=1,
            padding="VALID",
            **_dfp_op_args(self, f"{self.name}/pointwise"),
        )
        return _bias_and_activation(self, _from_nhwc(self, outputs))

    BaseSeparableConv.build = _dfp_build(
        lambda layer, _: _check_rank_and_format(layer)
    )(BaseSeparableConv.build)
    BaseSeparableConv.call = call


def _dense_matmul(layer, inputs, kernel):
    """Multiply N-D `inputs` by the 2-D kernel through the DFP16 MatMul op."""
    inputs = _float32_input(inputs)
    op_args = _dfp_op_args(layer, layer.name)
    if inputs.shape.rank == 2:
        return _active_ops.matmul(inputs, kernel, **op_args)

    # The MatMul op takes 2-D operands only, so the leading axes are folded
    # into rows here and restored afterwards.
    input_dim = kernel.shape[0]
    flat = tf.reshape(inputs, [-1, input_dim])
    outputs = _active_ops.matmul(flat, kernel, **op_args)
    output_shape = tf.concat([tf.shape(inputs)[:-1], [kernel.shape[1]]], axis=0)
    outputs = tf.reshape(outputs, output_shape)
    outputs.set_shape(inputs.shape[:-1].concatenate([kernel.shape[1]]))
    return outputs


def _patch_dense():
    original_build = Dense.build
    original_call = Dense.call

    @functools.wraps(original_build)
    def build(self, input_shape):
        if runs_dfp(self):
            check_dense_supported(self)
            _create_seed_generator(self)
        return original_build(self, input_shape)

    @functools.wraps(original_call)
    def call(self, inputs, training=None):
        if not runs_dfp(self):
            return original_call(self, inputs, training=training)
        check_dense_supported(self)
        _check_not_in_xla(self, _MATMUL_OP)
        outputs = _dense_matmul(self, inputs, self.kernel)
        if self.bias is not None:
            outputs = tf.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    Dense.build = build
    Dense.call = call


def _patch_einsum_dense():
    original_call = EinsumDense.call

    def check(layer, input_shape):
        _check_lora(layer)
        einsum_plan(layer, len(input_shape))

    @functools.wraps(original_call)
    def call(self, inputs, training=None):
        if not runs_dfp(self):
            return original_call(self, inputs, training=training)
        _check_lora(self)
        _check_not_in_xla(self, _MATMUL_OP)
        inputs = _float32_input(inputs)
        plan = einsum_plan(self, inputs.shape.rank)
        outputs = _active_ops.einsum_matmul(
            plan, inputs, self.kernel, **_dfp_op_args(self, self.name)
        )
        return _bias_and_activation(self, outputs)

    EinsumDense.build = _dfp_build(check)(EinsumDense.build)
    EinsumDense.call = call


def _patch_quantize():
    original_check = Layer._check_quantize_args

    @functools.wraps(original_check)
    def check_quantize_args(self, mode, compute_dtype):
        if runs_dfp(self):
            raise _unsupported_error(
                self,
                "no Keras post-training quantization",
                "Keras post-training quantization cannot be combined with DFP16 "
                "training",
                f"mode={mode!r}",
            )
        return original_check(self, mode, compute_dtype)

    Layer._check_quantize_args = check_quantize_args


def _first_dfp_layer(model):
    """Return (layer, op name) of the first DFP16 layer in `model`, or None."""
    for layer in model._flatten_layers():
        op_name = dfp_op_name(layer)
        if op_name is not None:
            return layer, op_name
    return None


def _jit_error(layer, op_name):
    return ValueError(
        f"Expected jit_compile=False or 'auto' for a model with DFP16 layers, because "
        f"layer '{layer.name}' runs {op_name}, and {op_name} has no XLA kernel. "
        "Received: jit_compile=True. Use jit_compile=False or 'auto' "
        "('auto' never selects XLA for a model whose DFP16 layers exist at "
        "compile time, so build a subclassed model before compile())."
    )


def _patch_xla():
    original_supports_jit = trainer_module.model_supports_jit

    @functools.wraps(original_supports_jit)
    def model_supports_jit(model):
        if _first_dfp_layer(model) is not None:
            return False
        return original_supports_jit(model)

    trainer_module.model_supports_jit = model_supports_jit

    trainer_class = trainer_module.Trainer
    jit_property = trainer_class.jit_compile

    def set_jit_compile(self, value):
        if value is True:
            found = _first_dfp_layer(self)
            if found is not None:
                raise _jit_error(*found)
        jit_property.fset(self, value)

    trainer_class.jit_compile = property(jit_property.fget, set_jit_compile)

    original_compile = trainer_class.compile
    compile_signature = inspect.signature(original_compile)

    @functools.wraps(original_compile)
    def compile(self, *args, **kwargs):
        bound = compile_signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        self._dfp_requested_jit_compile = bound.arguments["jit_compile"]
        return original_compile(self, *args, **kwargs)

    trainer_class.compile = compile

    for method_name in (
        "make_train_function",
        "make_test_function",
        "make_predict_function",
    ):
        _guard_make_function(tf_trainer_module.TensorFlowTrainer, method_name)


def _guard_make_function(trainer_class, method_name):
    """Re-check XLA when the step function is built.

    A subclassed model built after `compile` may have DFP16 layers that
    `jit_compile='auto'` did not see. Layers created while the step is traced
    are caught by `_check_not_in_xla` instead.
    """
    original = getattr(trainer_class, method_name)

    @functools.wraps(original)
    def make_function(self, *args, **kwargs):
        if self._jit_compile:
            found = _first_dfp_layer(self)
            if found is not None:
                if getattr(self, "_dfp_requested_jit_compile", True) is True:
                    raise _jit_error(*found)
                logger.info(
                    "Disabling XLA for model '%s' because layer '%s' runs %s, "
                    "which has no XLA kernel.",
                    self.name,
                    found[0].name,
                    found[1],
                )
                self._jit_compile = False
        return original(self, *args, **kwargs)

    setattr(trainer_class, method_name, make_function)


def _gradient_tensors(grads):
    """Return the dense tensors of `grads`, skipping None."""
    tensors = []
    for grad in grads:
        if isinstance(grad, tf.IndexedSlices):
            tensors.append(grad.values)
        elif grad is not None:
            tensors.append(grad)
    return tensors


def _skips_nonfinite_steps(variables):
    """Return True if a DFP16 layer with nonfinite="skip_step" owns one of `variables`."""
    return any(
        getattr(variable, "_keras_dfp_nonfinite", None) == "skip_step"
        for variable in variables
    )


def skipped_steps(model_or_optimizer):
    """Return how many optimizer steps were skipped for a non-finite gradient.

    Args:
        model_or_optimizer: a compiled `keras.Model` or a Keras optimizer.
            Steps are skipped only for variables of DFP16 layers whose policy
            has nonfinite="skip_step", such as "dfp16_skip".

    Returns:
        Python int, 0 before the first skipped step. `.keras` and
        `.weights.h5` files and `tf.train.Checkpoint` store the count with
        the optimizer, so a loaded model continues counting.
    """
    optimizer = model_or_optimizer
    if isinstance(model_or_optimizer, keras.Model):
        optimizer = getattr(model_or_optimizer, "optimizer", None)
    if not isinstance(optimizer, BaseOptimizer):
        raise TypeError(
            "Expected a compiled keras.Model or a Keras optimizer. Received: "
            f"model_or_optimizer of type {type(model_or_optimizer).__name__} "
            f"with optimizer={optimizer!r}. Call model.compile(...) first."
        )
    return _state.skipped_steps_count(optimizer)


def _log_skipped_step(optimizer_name, iterations, skipped):
    logger.warning(
        "Skipped the update of optimizer '%s' at iteration %d because a "
        "gradient is NaN or infinite (nonfinite='skip_step'); %d step(s) "
        "skipped so far.",
        optimizer_name,
        int(iterations),
        int(skipped),
    )


def _apply_or_skip(optimizer, original_apply, grads, trainable_variables, tensors):
    """Run `original_apply`, or skip it and count the step if a gradient is non-finite.

    A skipped step assigns to no weight and no optimizer variable, the
    iteration count included, so Adam moments and learning-rate schedules
    continue as if the batch had not been seen.
    """
    if trainable_variables is not None and not optimizer.built:
        # Variables cannot be created inside a tf.cond branch, so the optimizer
        # is built here, the way `BaseOptimizer.apply` does on its first call.
        with keras.name_scope(optimizer.name, caller=optimizer):
            optimizer.build(trainable_variables)
        optimizer.built = True
    counter = _state.skipped_steps_variable(optimizer)
    all_finite = tf.reduce_all(
        tf.stack([tf.reduce_all(tf.math.is_finite(tensor)) for tensor in tensors])
    )

    if tf.executing_eagerly():
        if bool(all_finite):
            return original_apply(optimizer, grads, trainable_variables)
        counter.assign_add(1)
        _log_skipped_step(
            optimizer.name, optimizer.iterations.numpy(), counter.numpy()
        )
        return None

    def apply_update():
        with tf.control_dependencies(tensors):
            original_apply(optimizer, grads, trainable_variables)
        return tf.constant(True)

    def skip_update():
        skipped = counter.assign_add(1)
        iterations = tf.convert_to_tensor(optimizer.iterations)
        tf.py_function(
            functools.partial(_log_skipped_step, optimizer.name),
            [iterations, skipped],
            [],
        )
        return tf.constant(False)

    # NOTE: only tested under the default distribution strategy. Inside a
    # multi-replica strategy the optimizer's merge_call would run inside this
    # cond, which TensorFlow may reject.
    tf.cond(all_finite, apply_update, skip_update)
    return None


def _patch_optimizer_apply():
    """Make every optimizer update of a traced step wait for all gradients.

    In a traced train step TensorFlow may run a variable's update, and the
    optimizer's iteration count, as soon as their own inputs are ready. A DFP16
    quantize op that fails later in the same step (for example on a NaN output
    gradient) would then leave earlier updates applied, such as a bias whose
    float32 gradient did not pass through a DFP16 op. With every op of `apply`
    depending on every gradient, a failing step changes no variable.

    When a variable belongs to a DFP16 layer with nonfinite="skip_step", the
    update runs only if every gradient is finite, and otherwise the skip
    counter of `_state.skipped_steps_variable` increments (see `_apply_or_skip`).
    """
    original_apply = BaseOptimizer.apply

    @functools.wraps(original_apply)
    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        tensors = _gradient_tensors(grads)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        variables = (
            self._trainable_variables
            if trainable_variables is None and self.built
            else trainable_variables or []
        )
        if tensors and _skips_nonfinite_steps(variables):
            return _apply_or_skip(
                self, original_apply, grads, trainable_variables, tensors
            )
        if tf.executing_eagerly() or not tensors:
            return original_apply(self, grads, trainable_variables)
        with tf.control_dependencies(tensors):
            return original_apply(self, grads, trainable_variables)

    BaseOptimizer.apply = apply


def _model_skips_nonfinite_steps(model):
    """Return True if a DFP16 layer of `model` has nonfinite="skip_step"."""
    return any(
        runs_dfp(layer) and effective_policy(layer).nonfinite == "skip_step"
        for layer in model._flatten_layers()
    )


def _patch_train_step():
    """Undo the forward-pass state changes of a train step the optimizer skipped.

    Layers change non-trainable variables in the forward pass, before the
    optimizer receives the gradients: BatchNormalization moving statistics, seed
    generator states, and the metric totals. For a model with a
    nonfinite="skip_step" DFP16 layer the train step saves those variables
    first and restores them when the skip counter moved during the step, so a
    skipped batch leaves the model and its metrics as they were.
    """
    original_train_step = tf_trainer_module.TensorFlowTrainer.train_step

    @functools.wraps(original_train_step)
    def train_step(self, data):
        if self.optimizer is None or not _model_skips_nonfinite_steps(self):
            return original_train_step(self, data)
        counter = _state.skipped_steps_variable(self.optimizer)
        variables = list(self.non_trainable_variables) + list(self.metrics_variables)
        skipped_before = tf.identity(counter.read_value())
        saved = [tf.identity(variable.value) for variable in variables]

        logs = original_train_step(self, data)

        def restore():
            for variable, value in zip(variables, saved):
                variable.assign(value)
            return tf.constant(True)

        skipped = counter.read_value() > skipped_before
        if tf.executing_eagerly():
            if bool(skipped):
                restore()
        else:
            tf.cond(skipped, restore, lambda: tf.constant(False))
        return logs

    tf_trainer_module.TensorFlowTrainer.train_step = train_step


def _patch_compile_state():
    """Create the skipped-step counter when a model with a "skip_step" layer compiles.

    `load_model` compiles a model from its saved config before it loads the
    saved state, and `BackupAndRestore` loads after `fit` compiled, so the
    counter exists in time to receive the saved count.
    """
    trainer_class = trainer_module.Trainer
    original_compile = trainer_class.compile

    @functools.wraps(original_compile)
    def compile(self, *args, **kwargs):
        result = original_compile(self, *args, **kwargs)
        optimizer = getattr(self, "optimizer", None)
        if isinstance(optimizer, BaseOptimizer) and _model_skips_nonfinite_steps(self):
            _state.skipped_steps_variable(optimizer)
        return result

    trainer_class.compile = compile


def install():
    """Install every Keras patch once. Later calls do nothing."""
    global _installed
    if _installed:
        return
    _patch_policy_init()
    _patch_policy_serialize()
    _patch_conv()
    _patch_dense()
    _patch_conv_transpose()
    _patch_depthwise_conv()
    _patch_separable_conv()
    _patch_einsum_dense()
    _patch_quantize()
    _patch_xla()
    _patch_optimizer_apply()
    _patch_train_step()
    _patch_compile_state()
    _installed = True
