"""Make Keras 3.15 `Model.fit` and `Model.evaluate` run under MultiWorkerMirroredStrategy.

With more than one worker, two functions of `keras.src.backend.tensorflow.trainer`
fail in Keras 3.15 (keras-team/keras#20585, open upstream):

1. `TensorFlowTrainer._maybe_symbolic_build` reads the first distributed batch and
   averages it over replicas with an eager `strategy.reduce("MEAN", ..., axis=None)`.
   MultiWorkerMirroredStrategy's reduce passes the PerReplica value to
   `tf.convert_to_tensor`, which raises "Attempt to convert a value (PerReplica ...)
   with an unsupported type to a Tensor" before the first step. The averaged batch
   only supplies shapes and dtypes for `_symbolic_build`, so the patch passes the
   first local replica's batch instead. That batch has the same shapes and dtypes,
   and reading it needs no collective operation.
2. `reduce_per_replica`, which averages the per-replica logs of every train and test
   step, calls `strategy.reduce("MEAN", value, axis=0)` in multi-worker mode. Axis 0
   makes the reduce also average along the first dimension of each value, which
   fails on the scalar loss and metric values ("Invalid reduction dimension 0 for
   input with 0 dimensions"). The patch reduces with `axis=None`, the mean over
   replicas that the single-worker branch of the same function computes.

Both patches change only the multi-worker code paths: for other strategies the
original functions run unchanged, apart from the shape-only batch of (1), which
every strategy receives. `BackupAndRestore` itself needs no patch, but in Keras 3.15
it does not know about workers, so every worker must be given its own backup
directory (two workers writing one `latest.weights.h5` fail on the HDF5 file lock).
"""

import functools

import keras
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as tf_trainer

# The Keras minor release whose trainer these patches fit. keras_dfp._compat rejects
# every other release at import, and `install` checks again so that a future change
# of the pinned version cannot apply these patches to a trainer they were not
# written for.
PATCHED_KERAS = "3.15"

_installed = False


def _first_local_value(strategy, value):
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _patch_symbolic_build():
    original = tf_trainer.TensorFlowTrainer._maybe_symbolic_build

    @functools.wraps(original)
    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is None or self._distribute_strategy is None:
            return original(self, iterator=iterator, data_batch=data_batch)
        # Like the original, read one batch of the first epoch. The caller resets
        # the iterator afterwards.
        batch = None
        for _, _, distributed_iterator in iterator:
            batch = next(distributed_iterator)
            break
        if batch is None:
            # An empty epoch: the original fails or builds as it would unpatched.
            return original(self, iterator=iterator, data_batch=data_batch)
        strategy = self.distribute_strategy
        data_batch = tf.nest.map_structure(
            functools.partial(_first_local_value, strategy), batch
        )
        return original(self, iterator=None, data_batch=data_batch)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build


def _patch_reduce_per_replica():
    original = tf_trainer.reduce_per_replica

    @functools.wraps(original)
    def reduce_per_replica(values, strategy, reduction):
        # "auto" means "mean" for every strategy but TPUStrategy.
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(
            strategy
        ):
            return tf.nest.map_structure(
                lambda value: strategy.reduce("MEAN", value, axis=None), values
            )
        return original(values, strategy, reduction)

    # The train, test and predict functions look the name up in the module at trace
    # time, so replacing the module attribute is enough.
    tf_trainer.reduce_per_replica = reduce_per_replica


def install():
    """Install both patches once if Keras is the release they fit, else do nothing."""
    global _installed
    version = ".".join(keras.__version__.split(".")[:2])
    if _installed or version != PATCHED_KERAS:
        return
    _patch_symbolic_build()
    _patch_reduce_per_replica()
    _installed = True
