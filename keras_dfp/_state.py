"""keras_dfp state that checkpoints store next to the variables Keras saves.

Two kinds of state live outside the variables that Keras saves for a layer or
an optimizer:

- the state of the stochastic-rounding `keras.random.SeedGenerator` of each
  DFP16 layer under a stochastic policy (key "seed_generator_state");
- the count of optimizer steps skipped under nonfinite="skip_step" (key
  "skipped_steps").

A `DFPState` object contains each of them and is attached to the layer or the
optimizer as the attribute `_keras_dfp_state`. The object is both:

- a `KerasSaveable`. Keras' `.keras` and `.weights.h5` saving (and so
  `ModelCheckpoint` and `BackupAndRestore`) walks the attributes of every layer
  and optimizer, and saves each `KerasSaveable` attribute in its own group, for
  example "layers/conv2d/_keras_dfp_state/vars" or
  "optimizer/_keras_dfp_state/vars";
- a TensorFlow `AutoTrackable`, so `tf.train.Checkpoint` and
  `tf.train.CheckpointManager` store it as a dependency of the layer or the
  optimizer.

The state is not tracked as a layer variable because Keras 3.15 `Dense` and
`BaseConv` save only kernel and bias, while their `load_own_variables` counts
every tracked variable: an extra tracked variable makes `load_model` fail with
"Layer 'dense' expected 3 variables, but received 2 variables during
loading". The separate group also leaves the groups of stock Keras objects
unchanged, so Keras without keras_dfp still loads a `.weights.h5` file into a
float32 model and ignores the extra groups.

Loading restores the state only into objects that exist when Keras walks the
model, so they are created before that. The rounding state is created in the
layer's `build`. The skipped-step state is created when a model with a
"skip_step" layer is compiled, and `load_model` compiles from the saved config
before it loads the variables.
"""

import logging

import numpy as np
import tensorflow as tf
from keras.src.saving.keras_saveable import KerasSaveable

logger = logging.getLogger(__name__)

STATE_ATTRIBUTE = "_keras_dfp_state"
ROUNDING_KEY = "seed_generator_state"
SKIPPED_STEPS_KEY = "skipped_steps"


class DFPState(KerasSaveable, tf.__internal__.tracking.AutoTrackable):
    """Named variables that Keras files and TensorFlow checkpoints store.

    Args:
        owner: description of the layer or optimizer, used in log messages.
        variables: dict of key to variable. Each variable is also set as the
            attribute of that name, which makes it a checkpoint dependency.
    """

    def __init__(self, owner, variables):
        # Plain attributes, so that only the variables become dependencies.
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_keys", tuple(variables))
        for key, variable in variables.items():
            setattr(self, key, variable)

    def _obj_type(self):
        # Keras' attribute walk accepts only its own type names. The name only
        # selects which attributes the walk skips, and this object has no
        # saveable children.
        return "Operation"

    def save_own_variables(self, store):
        for key in self._keys:
            store[key] = np.asarray(getattr(self, key).numpy())

    def load_own_variables(self, store):
        saved_keys = set(store.keys())
        for key in self._keys:
            variable = getattr(self, key)
            if key not in saved_keys:
                # Files saved before keras_dfp stored this state, or by a
                # model without it, leave the current value in place.
                logger.warning(
                    "Found no saved %s for %s; keeping its current value %s.",
                    key,
                    self._owner,
                    variable.numpy().tolist(),
                )
                continue
            value = store[key]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Expected a saved {key} of shape {tuple(variable.shape)} "
                    f"for {self._owner}. Received: shape {tuple(value.shape)}. "
                    "Load the file into a model built from the same code."
                )
            variable.assign(value)


def attach_rounding_state(layer, generator):
    """Attach the state of `layer`'s stochastic-rounding generator for saving."""
    setattr(
        layer,
        STATE_ATTRIBUTE,
        DFPState(f"layer '{layer.name}'", {ROUNDING_KEY: generator.state}),
    )


def skipped_steps_variable(optimizer):
    """Return the int64 count of steps `optimizer` skipped, creating it at 0 if needed.

    The counter is not in `optimizer.variables`, so Keras' own optimizer state
    does not change. It is saved through the `DFPState` attached to the
    optimizer.
    """
    state = getattr(optimizer, STATE_ATTRIBUTE, None)
    if state is None:
        with tf.init_scope():
            # Every replica receives the same all-reduced gradients and skips
            # the same steps, so the first replica's count is the total.
            counter = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="dfp_skipped_steps",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        state = DFPState(f"optimizer '{optimizer.name}'", {SKIPPED_STEPS_KEY: counter})
        setattr(optimizer, STATE_ATTRIBUTE, state)
    return getattr(state, SKIPPED_STEPS_KEY)


def skipped_steps_count(optimizer):
    """Return the skipped-step count of `optimizer` as an int, 0 if it has no counter."""
    state = getattr(optimizer, STATE_ATTRIBUTE, None)
    if state is None:
        return 0
    return int(getattr(state, SKIPPED_STEPS_KEY).numpy())
