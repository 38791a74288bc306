"""Small seeded DFP16 training job that the checkpoint and distribution tests run.

The tests start it as a subprocess so that they can kill it with SIGKILL, give it
its own logical CPU devices, or run two of them as MultiWorkerMirroredStrategy
workers. It prints one line per event ("EPOCH <n>", "BATCH <epoch> <batch>",
"PAUSED", "DONE") and writes the final weights to --output as an .npz file.

Every epoch reads the same batches in the same order (no shuffling), so a run
that resumes at the start of epoch e reads the same data as an uninterrupted run.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SEED = 1234
SAMPLES = 32
IMAGE_SHAPE = (8, 8, 3)
CLASSES = 3
# Upper bound of a pause, so a paused job that is not killed still ends.
MAX_PAUSE_SECONDS = 60


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, help="Path of the .npz weights.")
    parser.add_argument("--policy", default="dfp16")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4, help="Global batch size.")
    parser.add_argument("--steps", type=int, default=None, help="Steps per epoch.")
    parser.add_argument("--backup_dir", default="")
    parser.add_argument(
        "--save_freq", default="epoch", help='"epoch" or a number of steps.'
    )
    parser.add_argument(
        "--pause_at",
        default="",
        help='"<epoch>:<batch>": print PAUSED after that batch and sleep, so the '
        "test can kill the process mid-epoch.",
    )
    parser.add_argument(
        "--strategy", default="none", choices=("none", "mirrored", "multi_worker")
    )
    parser.add_argument(
        "--logical_cpus", type=int, default=0, help="Split CPU:0 into this many devices."
    )
    parser.add_argument(
        "--graph_report",
        default="",
        help="Write the dtypes of tensors that cross devices to this JSON file.",
    )
    return parser.parse_args(argv)


def _data():
    rng = np.random.default_rng(SEED)
    images = rng.standard_normal((SAMPLES, *IMAGE_SHAPE)).astype("float32")
    labels = (np.arange(SAMPLES) % CLASSES).astype("int64")
    return images, labels


def _dataset(batch_size):
    images, labels = _data()
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(
        batch_size, drop_remainder=True
    )
    options = tf.data.Options()
    # Shard by element, so two workers together process each global batch that
    # a single worker would process.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


def _build_model(keras, policy):
    """Build a Conv2D + Dense network without BatchNormalization.

    BatchNormalization would normalize each replica's batch on its own, which
    differs from single-device training for reasons unrelated to DFP16.
    """
    keras.utils.set_random_seed(SEED)
    keras.config.set_dtype_policy(policy)
    model = keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(CLASSES),
        ]
    )
    keras.config.set_dtype_policy("float32")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _make_progress_callback(keras, pause_at):
    pause_epoch, pause_batch = (None, None)
    if pause_at:
        pause_epoch, pause_batch = (int(part) for part in pause_at.split(":"))

    class Progress(keras.callbacks.Callback):
        """Print epochs and batches, and pause after the --pause_at batch."""

        def on_train_begin(self, logs=None):
            # BackupAndRestore sets _initial_epoch when it restores a backup.
            self._epoch = self.model._initial_epoch or 0

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch
            print(f"EPOCH {epoch}", flush=True)

        def on_train_batch_end(self, batch, logs=None):
            print(f"BATCH {self._epoch} {batch}", flush=True)
            if (self._epoch, batch) == (pause_epoch, pause_batch):
                print("PAUSED", flush=True)
                time.sleep(MAX_PAUSE_SECONDS)

    return Progress()


def _strategy(name):
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(
            [device.name for device in tf.config.list_logical_devices("CPU")]
        )
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _graph_report(model, strategy, batch_size):
    """Return dtype counts of one traced distributed train step.

    "cross_device" counts, by dtype, the tensors whose producer and consumer
    are pinned to different devices. "collective" counts, by dtype, the
    tensors that collective all-reduce ops reduce. "int16" counts all int16
    tensors in the step.
    The step is traced, not run, so no weight changes.
    """
    dataset = strategy.experimental_distribute_dataset(_dataset(batch_size))
    step = tf.function(lambda data: strategy.run(model.train_step, args=(data,)))
    graph = step.get_concrete_function(next(iter(dataset))).graph
    report = {"cross_device": {}, "collective": {}, "int16": 0}
    for operation in graph.get_operations():
        for tensor in operation.outputs:
            if tensor.dtype == tf.int16:
                report["int16"] += 1
        for tensor in operation.inputs:
            name = tensor.dtype.name
            producer = tensor.op.device
            if producer and operation.device and producer != operation.device:
                report["cross_device"][name] = report["cross_device"].get(name, 0) + 1
        if operation.type.startswith("Collective") and operation.inputs:
            # The first input is the tensor being reduced, the rest are keys.
            name = operation.inputs[0].dtype.name
            report["collective"][name] = report["collective"].get(name, 0) + 1
    return report


def _backup_dir(args, strategy):
    """Return the BackupAndRestore directory of this process.

    Keras 3.15 BackupAndRestore does not know about workers, so each
    MultiWorkerMirroredStrategy worker backs up into its own subdirectory.
    """
    if args.strategy != "multi_worker":
        return args.backup_dir
    return os.path.join(args.backup_dir, f"worker{strategy.cluster_resolver.task_id}")


def _fit(keras, model, strategy, args):
    callbacks = [_make_progress_callback(keras, args.pause_at)]
    if args.backup_dir:
        save_freq = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)
        callbacks.append(
            keras.callbacks.BackupAndRestore(
                _backup_dir(args, strategy),
                save_freq=save_freq,
                double_checkpoint=True,
                delete_checkpoint=False,
            )
        )
    model.fit(
        _dataset(args.batch_size),
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        callbacks=callbacks,
        shuffle=False,
        verbose=0,
    )


def main(argv):
    args = _parse_args(argv)
    if args.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus
        )
    tf.config.experimental.enable_op_determinism()

    import keras  # pylint: disable=import-outside-toplevel
    import keras_dfp  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

    # Full tracebacks, so that a failing test shows where a worker failed.
    keras.config.disable_traceback_filtering()

    strategy = _strategy(args.strategy)
    with strategy.scope():
        model = _build_model(keras, args.policy)

    _fit(keras, model, strategy, args)

    weights = {f"w{index}": value for index, value in enumerate(model.get_weights())}
    weights["iterations"] = np.array(int(model.optimizer.iterations.numpy()))
    np.savez(args.output, **weights)
    if args.graph_report:
        report = _graph_report(model, strategy, args.batch_size)
        with open(args.graph_report, "w", encoding="utf-8") as report_file:
            json.dump(report, report_file)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
