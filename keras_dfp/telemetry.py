"""DFP16 health telemetry: exponents, saturation and underflow per layer.

Telemetry is off by default. After `enable()`, every DFP16 op traced or run
eagerly records, for each tensor it quantizes (kinds "activation", "weight"
and the backward "gradient"), three statistics of its latest call in
non-trainable `tf.Variable`s attached to the layer:

- `exponent`: the shared exponent e, so the tensor is mantissa * 2**e.
- `saturated_fraction`: the fraction of elements with |x| * 2**-e >= 32767.5,
  the elements whose round-half-to-even value exceeds 32767 and is clamped to
  +-32767. The exponent rule maps the largest magnitude into [2**14, 2**15),
  so only values in [32767.5, 32768) * 2**e saturate. The count comes from
  the input and the exponent, so under stochastic rounding it leaves out
  elements in (32767, 32767.5) * 2**e that happened to round up.
- `underflow_fraction`: among the non-zero elements of x, the fraction whose
  mantissa is 0 (0.0 when x has no non-zero element).

The statistics are computed with TensorFlow ops from the input and the
mantissas, and the op's outputs depend on the variable updates, so they run
inside `tf.function` too. The gradient statistics are written inside the
custom gradient function, that is, in the backward pass.

>>> import keras_dfp
>>> keras_dfp.telemetry.enable()   # before the model's first train step
>>> model.fit(x, y, callbacks=[keras_dfp.telemetry.TensorBoardCallback("logs")])
>>> keras_dfp.telemetry.collect(model)["conv1"]["gradient"]["exponent"]

Enable telemetry before the train function is traced: a step function traced
while telemetry was off records nothing until Keras traces it again.
"""

import logging

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from keras_dfp import _state

_logger = logging.getLogger(__name__)

KINDS = ("activation", "weight", "gradient")
STATISTICS = ("exponent", "saturated_fraction", "underflow_fraction")

# |x| * 2**-e at or above this value rounds (half to even) past the largest
# int16 mantissa 32767.
_SATURATION_THRESHOLD = 32767.5

# Attribute of a layer that maps op names to `_OpTelemetry` objects.
_LAYER_ATTRIBUTE = "_keras_dfp_telemetry"

_enabled = False

# tf.Variable(bool) created on first use by `_recording_flag`.
_recording = None


def enable():
    """Record DFP16 statistics in every DFP16 op traced or run from now on."""
    global _enabled
    _enabled = True
    _logger.info("DFP16 telemetry enabled.")


def disable():
    """Stop recording in DFP16 ops traced or run from now on.

    Step functions that Keras traced while telemetry was on keep recording
    until they are traced again.
    """
    global _enabled
    _enabled = False


def is_enabled():
    """Return True if new DFP16 op calls record telemetry."""
    return _enabled


def tensor_statistics(x, mantissa, exponent):
    """Return (exponent, saturated_fraction, underflow_fraction) of one quantized tensor.

    Args:
      x: the float32 tensor that was quantized.
      mantissa: its int16 mantissas.
      exponent: its int32 shared exponent.

    Returns:
      An int32 scalar and two float32 scalars in [0, 1], as defined in the
      module docstring.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    exponent = tf.convert_to_tensor(exponent, tf.int32)
    size = tf.cast(tf.size(x), tf.float64)

    # float64 represents 32767.5 * 2**e and every float32 |x| exactly, for every
    # exponent the quantize op returns (-163 to 113).
    # NOTE: the cast reads subnormal x as 0 (TensorFlow CPU kernels run with
    # denormals-are-zero), so a tensor whose largest magnitude is subnormal
    # (e <= -141) reports no saturation even if an element saturated.
    threshold = _SATURATION_THRESHOLD * tf.pow(
        tf.constant(2.0, tf.float64), tf.cast(exponent, tf.float64)
    )
    saturated = tf.reduce_sum(
        tf.cast(tf.abs(tf.cast(x, tf.float64)) >= threshold, tf.float64)
    )
    saturated_fraction = tf.math.divide_no_nan(saturated, size)

    # TensorFlow's CPU kernels treat subnormal float32 inputs as zero
    # (denormals-are-zero), so x != 0.0 would miss them. The bits of x are
    # non-zero, apart from the sign bit, exactly when x is non-zero.
    magnitude_bits = tf.bitwise.bitwise_and(
        tf.bitcast(x, tf.int32), tf.constant(0x7FFFFFFF, tf.int32)
    )
    nonzero = tf.not_equal(magnitude_bits, 0)
    underflowed = tf.logical_and(nonzero, tf.equal(mantissa, 0))
    underflow_fraction = tf.math.divide_no_nan(
        tf.reduce_sum(tf.cast(underflowed, tf.float64)),
        tf.reduce_sum(tf.cast(nonzero, tf.float64)),
    )
    return (
        exponent,
        tf.cast(saturated_fraction, tf.float32),
        tf.cast(underflow_fraction, tf.float32),
    )


class _OpTelemetry:
    """Variables with the latest statistics of one DFP16 op, per tensor kind."""

    def __init__(self, name):
        self.name = name
        self.variables = {}
        with tf.init_scope():
            for kind in KINDS:
                self.variables[kind] = {
                    "exponent": tf.Variable(
                        0, dtype=tf.int32, trainable=False, name=f"{kind}_exponent"
                    ),
                    "saturated_fraction": tf.Variable(
                        0.0, trainable=False, name=f"{kind}_saturated_fraction"
                    ),
                    "underflow_fraction": tf.Variable(
                        0.0, trainable=False, name=f"{kind}_underflow_fraction"
                    ),
                    # Number of recorded calls, so `collect` can leave out
                    # kinds that never ran (the gradient before a backward pass).
                    "updates": tf.Variable(
                        0, dtype=tf.int64, trainable=False, name=f"{kind}_updates"
                    ),
                }

    def record(self, kind, x, mantissa, exponent):
        """Assign the statistics of one quantized tensor if recording is on.

        Returns the ops that the DFP16 op's outputs must wait for: the assigns
        inside a `tf.cond` on the recording flag in a graph, nothing eagerly.
        """
        variables = self.variables[kind]

        def assign_statistics():
            values = tensor_statistics(x, mantissa, exponent)
            updates = [
                variables[statistic].assign(value, read_value=False)
                for statistic, value in zip(STATISTICS, values)
            ]
            updates.append(variables["updates"].assign_add(1, read_value=False))
            # Eager assigns return None and have already run.
            return [update for update in updates if update is not None]

        flag = _recording_flag()
        if tf.executing_eagerly():
            if bool(flag.numpy()):
                assign_statistics()
            return []

        def record_branch():
            with tf.control_dependencies(assign_statistics()):
                return tf.constant(True)

        return [tf.cond(flag, record_branch, lambda: tf.constant(False))]


def _recording_flag():
    """Return the process-wide flag that switches the statistics on and off.

    It is True unless a `TensorBoardCallback` is training: the callback turns
    it on only for the steps it writes, so the other steps skip the
    statistics (a `tf.cond` branch) and cost almost nothing.
    """
    global _recording
    if _recording is None:
        with tf.init_scope():
            _recording = tf.Variable(
                True, trainable=False, name="keras_dfp_telemetry_recording"
            )
    return _recording


def observer(layer, name):
    """Return the recording function of op `name` of `layer`, or None when disabled.

    The variables are created on first use, outside any `tf.function`, and
    stored on the layer without Keras tracking, so `layer.weights` and saved
    models do not change.
    """
    if not _enabled:
        return None
    telemetry = getattr(layer, _LAYER_ATTRIBUTE, None)
    if telemetry is None:
        telemetry = {}
        object.__setattr__(layer, _LAYER_ATTRIBUTE, telemetry)
    if name not in telemetry:
        telemetry[name] = _OpTelemetry(name)
    return telemetry[name].record


def collect(model):
    """Return the latest statistics of every DFP16 op in `model`.

    Returns:
      A dict {op name: {kind: {"exponent": int, "saturated_fraction": float,
      "underflow_fraction": float}}}. The op name is the layer name, or
      "<layer>/depthwise" and "<layer>/pointwise" for separable convolutions.
      Kinds that never ran are left out, and so are layers that never ran
      with telemetry enabled.
    """
    statistics = {}
    for layer in model._flatten_layers():
        for name, telemetry in getattr(layer, _LAYER_ATTRIBUTE, {}).items():
            kinds = {}
            for kind, variables in telemetry.variables.items():
                if int(variables["updates"].numpy()) == 0:
                    continue
                kinds[kind] = {
                    "exponent": int(variables["exponent"].numpy()),
                    "saturated_fraction": float(variables["saturated_fraction"].numpy()),
                    "underflow_fraction": float(variables["underflow_fraction"].numpy()),
                }
            if kinds:
                statistics[name] = kinds
    return statistics


def _scalar_metadata():
    # `tf.summary.scalar` needs the tensorboard package, which keras-dfp does
    # not require. `tf.summary.write` with this metadata writes the same
    # record: a float32 scalar that TensorBoard's "scalars" plugin displays.
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    return metadata


def scalar_tag(op_name, kind, statistic):
    """Return the TensorBoard tag of one statistic, e.g. "dfp16/conv1/gradient/exponent"."""
    return f"dfp16/{op_name}/{kind}/{statistic}"


def _trained_steps(model):
    """Return the train batches `model`'s optimizer has seen: applied plus skipped steps."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return 0
    return int(optimizer.iterations.numpy()) + _state.skipped_steps_count(optimizer)


class TensorBoardCallback(keras.callbacks.Callback):
    """Write the DFP16 statistics of the model as TensorBoard scalars.

    Every `every_n_steps` train batches the callback reads
    `collect(self.model)` and writes one scalar per op, tensor kind and
    statistic, tagged as in `scalar_tag`, at the global step. The DFP16 ops
    compute the statistics only in those steps, so a larger `every_n_steps`
    costs less; the other steps only read a flag.

    The global step counts train batches over all epochs and `fit` calls. At
    the first batch of each `fit` it is set to the optimizer's iteration count
    plus its skipped steps (`keras_dfp.skipped_steps`), which checkpoints store, so
    a run resumed from a `.keras` file, `BackupAndRestore` or
    `tf.train.Checkpoint` continues its TensorBoard curves at the step where
    the saved run stopped. The statistics themselves are not saved: the first
    written step after a resume computes them again.

    Args:
      log_dir: directory of the event files; created if missing.
      every_n_steps: positive int, the write interval in train batches.
    """

    def __init__(self, log_dir, every_n_steps=100):
        super().__init__()
        if (
            not isinstance(every_n_steps, int)
            or isinstance(every_n_steps, bool)
            or every_n_steps < 1
        ):
            raise ValueError(
                "Expected every_n_steps to be a positive int. "
                f"Received: every_n_steps={every_n_steps!r}"
            )
        self.log_dir = log_dir
        self.every_n_steps = every_n_steps
        self._writer = None
        self._step = 0
        self._warned_empty = False

    def on_train_begin(self, logs=None):
        if not _enabled:
            raise ValueError(
                "Expected DFP16 telemetry to be enabled for "
                "keras_dfp.telemetry.TensorBoardCallback. Received: "
                "keras_dfp.telemetry.is_enabled()=False. Call "
                "keras_dfp.telemetry.enable() before the first model.fit."
            )
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        # Read at the first batch, after BackupAndRestore (which may come later
        # in the callback list) has restored the optimizer.
        self._step = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._step is None:
            self._step = _trained_steps(self.model)
        # Statistics are computed only in the steps that are written.
        _recording_flag().assign((self._step + 1) % self.every_n_steps == 0)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every_n_steps == 0:
            self.write(self._step)

    def write(self, step):
        """Write the current statistics at `step`; return the number of scalars."""
        statistics = collect(self.model)
        if not statistics and not self._warned_empty:
            _logger.warning(
                "No DFP16 telemetry in model '%s': it has no DFP16 layer, or its "
                "train function was traced before keras_dfp.telemetry.enable().",
                self.model.name,
            )
            self._warned_empty = True
        count = 0
        metadata = _scalar_metadata()
        with self._writer.as_default(step=step):
            for op_name, kinds in statistics.items():
                for kind, values in kinds.items():
                    for statistic in STATISTICS:
                        tf.summary.write(
                            scalar_tag(op_name, kind, statistic),
                            tf.constant(values[statistic], tf.float32),
                            metadata=metadata,
                        )
                        count += 1
        self._writer.flush()
        return count

    def on_train_end(self, logs=None):
        # Later calls (evaluate, predict, a fit without this callback) record
        # every step again.
        _recording_flag().assign(True)
        if self._writer is not None:
            self._writer.flush()
