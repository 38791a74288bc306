"""Route stock Keras layers through the DFP16 ops under a `DFPPolicy`.

`install()` patches Keras 3.15 at the narrowest points, so model code needs no
change and every layer without a `DFPPolicy` runs the original Keras method:

- `DTypePolicy.__init__` turns the new object into a `DFPPolicy` for the
  names "dfp16", "dfp16_stochastic" and "dfp16_stochastic_seed<int>" (and for
  name=None while the global policy is a `DFPPolicy`). Every string path
  (`set_dtype_policy`, `dtype_policies.get`, a layer's `dtype=`) goes through
  `DTypePolicy(name)`, so this one hook covers them all.
- `BaseConv.convolution_op` calls `keras_dfp.ops.conv2d` and `Dense.call` calls
  `keras_dfp.ops.matmul`. Bias add and activation stay float32.
- `build` of BaseConv, Dense and of the conv/dense layers without a DFP16 path
  rejects unsupported options before any weight is created. The call-time
  checks repeat them for a policy assigned after build.
- `model_supports_jit`, the `jit_compile` setter and the TensorFlow trainer's
  `make_*_function` keep XLA away from models with DFP16 layers, because the
  custom ops have no XLA kernels.
- `Layer._check_quantize_args` rejects Keras post-training quantization of a
  DFP16 layer.
- `dtype_policies.serialize`, which `Layer.get_config` calls, writes a
  `DFPPolicy` as a stock DTypePolicy named "keras_dfp>dfp16". Keras without
  keras_dfp then fails with "Cannot convert 'keras_dfp>dfp16' ...", which
  names the package, where the registered-class form would fail with an
  AttributeError on a str.
- `BaseOptimizer.apply` makes every update of a traced train step wait for
  all gradients, so a step that fails on a non-finite gradient updates no
  variable (see `_patch_optimizer_apply`).
"""

import functools
import hashlib
import inspect
import logging

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util
from keras.src.backend.tensorflow import trainer as tf_trainer_module
from keras.src import dtype_policies as dtype_policies_module
from keras.src.dtype_policies import dtype_policy as dtype_policy_module
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.dtype_policies.dtype_policy_map import DTypePolicyMap
from keras.src.layers.convolutional.base_conv import BaseConv
from keras.src.layers.convolutional.base_conv_transpose import BaseConvTranspose
from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv
from keras.src.layers.core.dense import Dense
from keras.src.layers.core.einsum_dense import EinsumDense
from keras.src.layers.layer import Layer
from keras.src.trainers import trainer as trainer_module

from keras_dfp import ops
from keras_dfp.policy import POLICY_NAME
from keras_dfp.policy import parse_policy_name
from keras_dfp.policy import serialized_name
from keras_dfp.policy import DFPPolicy

logger = logging.getLogger(__name__)

_CONV_OP = "KerasDfp>Conv2D"
_MATMUL_OP = "KerasDfp>MatMul"

# Layer classes that compute a convolution or matrix multiply but have no DFP16
# path yet, with the reason shown in the error.
_UNSUPPORTED_LAYER_CLASSES = (
    (BaseConvTranspose, "transposed convolutions have no DFP16 kernel yet"),
    (BaseDepthwiseConv, "depthwise convolutions have no DFP16 kernel yet"),
    (BaseSeparableConv, "separable convolutions have no DFP16 kernel yet"),
    (EinsumDense, "EinsumDense has no DFP16 kernel yet"),
)

_FLOAT_FIX = "Pass dtype='float32' to this layer to run it in float32."

_installed = False


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
    """Return the custom op a DFP16 layer runs, or None for other layers."""
    if not runs_dfp(layer):
        return None
    if isinstance(layer, BaseConv):
        return _CONV_OP
    if isinstance(layer, Dense):
        return _MATMUL_OP
    return None


def _unsupported_error(layer, reason, received):
    return ValueError(
        f"Layer '{layer.name}' ({type(layer).__name__}) cannot run under the "
        f"'{POLICY_NAME}' dtype policy because {reason}. Received: {received}. "
        f"{_FLOAT_FIX}"
    )


def _check_lora(layer):
    if layer.lora_rank or layer.lora_enabled:
        raise _unsupported_error(
            layer,
            "LoRA is not supported in DFP16 yet",
            f"lora_rank={layer.lora_rank}",
        )


def check_conv_supported(layer):
    """Raise ValueError if a BaseConv layer uses an option DFP16 lacks."""
    if layer.rank != 2:
        raise _unsupported_error(
            layer,
            "only 2-D convolutions (Conv2D) run in DFP16",
            f"rank={layer.rank}",
        )
    if layer.data_format != "channels_last":
        raise _unsupported_error(
            layer,
            "the DFP16 convolution expects NHWC inputs (data_format="
            "'channels_last')",
            f"data_format={layer.data_format!r}",
        )
    if layer.groups != 1:
        raise _unsupported_error(
            layer,
            "grouped convolutions have no DFP16 kernel yet",
            f"groups={layer.groups}",
        )
    _check_lora(layer)


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


def _stochastic_seed_generator_seed(policy, layer):
    # One generator per layer. Keras seed generators take 31-bit seeds, so the
    # generator is started from the low bits of the layer key.
    return _layer_rounding_key(policy, layer) % (2**31)


def _create_seed_generator(layer):
    # NOTE: `.keras` files do not store the generator state, because Conv2D
    # and Dense save only kernel and bias. A loaded model restarts the rounding
    # stream from the policy seed.
    policy = effective_policy(layer)
    if policy.rounding == "stochastic":
        layer._dfp_seed_generator = keras.random.SeedGenerator(
            _stochastic_seed_generator_seed(policy, layer),
            name="dfp_rounding_seed",
        )


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


def _patch_conv():
    original_build = BaseConv.build
    original_convolution_op = BaseConv.convolution_op

    @functools.wraps(original_build)
    def build(self, input_shape):
        if runs_dfp(self):
            check_conv_supported(self)
            _create_seed_generator(self)
        return original_build(self, input_shape)

    @functools.wraps(original_convolution_op)
    def convolution_op(self, inputs, kernel):
        if not runs_dfp(self):
            return original_convolution_op(self, inputs, kernel)
        check_conv_supported(self)
        _check_not_in_xla(self, _CONV_OP)
        rounding, seed = _rounding_args(self)
        return ops.conv2d(
            _float32_input(inputs),
            kernel,
            strides=list(self.strides),
            padding=self.padding.upper(),
            dilations=list(self.dilation_rate),
            name=self.name,
            rounding=rounding,
            seed=seed,
        )

    BaseConv.build = build
    BaseConv.convolution_op = convolution_op


def _dense_matmul(layer, inputs, kernel):
    """Multiply N-D `inputs` by the 2-D kernel through the DFP16 MatMul op."""
    inputs = _float32_input(inputs)
    rounding, seed = _rounding_args(layer)
    if inputs.shape.rank == 2:
        return ops.matmul(inputs, kernel, name=layer.name, rounding=rounding, seed=seed)

    # The MatMul op takes 2-D operands only, so the leading axes are folded
    # into rows here and restored afterwards.
    input_dim = kernel.shape[0]
    flat = tf.reshape(inputs, [-1, input_dim])
    outputs = ops.matmul(flat, kernel, name=layer.name, rounding=rounding, seed=seed)
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


def _patch_unsupported_layers():
    for layer_class, reason in _UNSUPPORTED_LAYER_CLASSES:
        _reject_under_dfp(layer_class, "build", reason)
        _reject_under_dfp(layer_class, "call", reason)


def _reject_under_dfp(layer_class, method_name, reason):
    original = getattr(layer_class, method_name)

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        if runs_dfp(self):
            raise _unsupported_error(
                self, reason, f"dtype_policy={effective_policy(self)!r}"
            )
        return original(self, *args, **kwargs)

    setattr(layer_class, method_name, method)


def _patch_quantize():
    original_check = Layer._check_quantize_args

    @functools.wraps(original_check)
    def check_quantize_args(self, mode, compute_dtype):
        if runs_dfp(self):
            raise _unsupported_error(
                self,
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


def _patch_optimizer_apply():
    """Make every optimizer update of a traced step wait for all gradients.

    In a traced train step TensorFlow may run a variable's update, and the
    optimizer's iteration count, as soon as their own inputs are ready. A DFP16
    quantize op that fails later in the same step (for example on a NaN output
    gradient) would then leave earlier updates applied, such as a bias whose
    float32 gradient did not pass through a DFP16 op. With every op of `apply`
    depending on every gradient, a failing step changes no variable.
    """
    original_apply = BaseOptimizer.apply

    @functools.wraps(original_apply)
    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        tensors = _gradient_tensors(grads)
        if tf.executing_eagerly() or not tensors:
            return original_apply(self, grads, trainable_variables)
        with tf.control_dependencies(tensors):
            return original_apply(self, grads, trainable_variables)

    BaseOptimizer.apply = apply


def install():
    """Install every Keras patch once. Later calls do nothing."""
    global _installed
    if _installed:
        return
    _patch_policy_init()
    _patch_policy_serialize()
    _patch_conv()
    _patch_dense()
    _patch_unsupported_layers()
    _patch_quantize()
    _patch_xla()
    _patch_optimizer_apply()
    _installed = True
