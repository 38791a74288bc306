"""Train a model-garden network on TFRecords or class folders and report test accuracy.

Usage (from the repository root):

    python -m model_garden.train                      # cifar_cnn, dfp16, embedded sample
    python -m model_garden.train --policy=float32     # same run in float32, for comparison
    python -m model_garden.train --data=/data/cifar10 --epochs=30
    python -m model_garden.train --model=resnet50 --image_size=224 --data=/data/images

The run writes `<model_dir>/<model>.keras` (the trained model) and
`<model_dir>/summary.json` (settings, seconds per epoch, test accuracy and loss, versions),
replacing those files if an earlier run left them there. During training,
BackupAndRestore keeps `<model_dir>/backup` (deleted when training ends), from which
--resume continues a run that was interrupted. docs/distributed.md describes --strategy.

absl reports flag parsing errors, such as --seed=-1. A flag value that parses but that the
run cannot use, for example unreadable --data records or an unwritable --model_dir, is
logged as one error line, and the run exits with status 2.
"""

import json
import math
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import keras
import tensorflow as tf

from model_garden import data as data_lib
from model_garden import models
from model_garden import presets

POLICIES = ("dfp16", "float32", "mixed_bfloat16")

_MODEL = flags.DEFINE_enum("model", "cifar_cnn", sorted(models.MODELS), "Network to train.")
_DATA = flags.DEFINE_string(
    "data",
    "",
    "Training and test data: a directory with train-*.tfrecord and test-*.tfrecord shards "
    "(for example /data/cifar10), a glob that may contain {split}, a directory with "
    "train/<class>/ and test/<class>/ (or val/<class>/) folders of JPEG and PNG files, or "
    "empty for the embedded 5,000/1,000-record sample. Each record is a tf.train.Example "
    "with image/encoded (JPEG or PNG bytes) and image/class/label (int64 in "
    "[0, --num_classes - 1]).",
)
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None,
    "Number of classes of the model. Defaults to the number of class folders, or to 10 "
    "for TFRecords. Every label of --data must be below it.",
    lower_bound=1,
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None,
    "Height and width in pixels of the model input. Defaults to 32 for "
    "--preprocessing=cifar and to 224 for --preprocessing=imagenet.",
    lower_bound=1,
)
_PREPROCESSING = flags.DEFINE_enum(
    "preprocessing", None, data_lib.PREPROCESSINGS,
    "cifar: pad-and-crop and flip, CIFAR-10 channel statistics. imagenet: random resized "
    "crop (8%-100% of the area, aspect ratio 3/4 to 4/3) and flip for training, "
    "resize and central crop for evaluation, ImageNet channel statistics. Defaults to "
    "cifar when --image_size is below 64 (or unset), otherwise imagenet.",
)
_CACHE = flags.DEFINE_enum(
    "cache", "auto", data_lib.CACHE_MODES,
    "decoded: keep the decoded images in memory across epochs. none: decode every "
    "epoch. auto: decoded for --preprocessing=cifar when the images take at most 1 GiB, "
    "otherwise none.",
)
_POLICY = flags.DEFINE_enum(
    "policy", "dfp16", POLICIES,
    "Keras global dtype policy: dfp16 runs Conv2D and Dense through the INT16 DFP ops.",
)
_EPOCHS = flags.DEFINE_integer(
    "epochs", None,
    "Passes over the training data (or of --steps_per_epoch steps). Defaults to the "
    "model's preset (model_garden/presets.py), 15 for cifar_cnn.",
    lower_bound=1,
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Images per batch. Defaults to the model's preset, 64 for cifar_cnn.",
    lower_bound=1,
)
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", None,
    "Peak learning rate at --batch_size. Defaults to the model's preset (0.004 Adam with "
    "cosine decay for cifar_cnn; SGD presets scale their rate linearly with the batch size).",
)
_OPTIMIZER = flags.DEFINE_enum(
    "optimizer", None, ("adam", "sgd"),
    "Optimizer; defaults to the model's preset. The preset's schedule is kept.",
)
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", None,
    "Train this many batches per epoch, repeating the shuffled training data, instead of "
    "one pass over it. Use it for runs shorter than an epoch of a large data set.",
    lower_bound=1,
)
_LOG_EVERY_N_STEPS = flags.DEFINE_integer(
    "log_every_n_steps", 10,
    "Record the training loss and accuracy every this many steps in "
    "<model_dir>/summary.json (train_curve) and <model_dir>/logs (TensorBoard).",
    lower_bound=1,
)
# NumPy seeds are unsigned 32-bit integers, and keras.utils.set_random_seed seeds NumPy.
_SEED = flags.DEFINE_integer(
    "seed", 0,
    "Seed of weight initialization, dropout, data order and augmentation, "
    "from 0 to 2**32 - 1.",
    lower_bound=0, upper_bound=2**32 - 1,
)
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", "", "Output directory. Defaults to runs/<model>-<policy>."
)
_MAX_TRAIN_RECORDS = flags.DEFINE_integer(
    "max_train_records", None, "Use only this many training records (for quick checks).",
    lower_bound=1,
)
_MAX_TEST_RECORDS = flags.DEFINE_integer(
    "max_test_records", None, "Use only this many test records (for quick checks).",
    lower_bound=1,
)
_TELEMETRY_EVERY_N_STEPS = flags.DEFINE_integer(
    "telemetry_every_n_steps", 0,
    "Under --policy=dfp16, write DFP16 telemetry (exponent, saturated and underflow "
    "fractions per layer and tensor) as TensorBoard scalars to <model_dir>/telemetry "
    "every this many train steps. 0 turns telemetry off.",
    lower_bound=0,
)
_VERBOSE = flags.DEFINE_enum(
    "verbose", "1", ("0", "1", "2"),
    "Keras fit/evaluate verbosity: 0 silent, 1 progress bar, 2 one line per epoch.",
)

_STRATEGY = flags.DEFINE_enum(
    "strategy", "none", ("none", "mirrored", "multi_worker"),
    "tf.distribute strategy: none (default device), mirrored (all local devices) or "
    "multi_worker (MultiWorkerMirroredStrategy; reads the cluster from TF_CONFIG). "
    "--batch_size is the global batch size.",
)
_RESUME = flags.DEFINE_bool(
    "resume", False,
    "Continue the run from <model_dir>/backup, which BackupAndRestore writes after "
    "every epoch. Without --resume an existing backup is an error.",
)

flags.register_validator(
    "learning_rate",
    lambda value: value is None or (math.isfinite(value) and value > 0),
    message="--learning_rate must be a finite number > 0, for example 0.004.",
)


class RunError(Exception):
    """Error for a flag value that parses but that the run cannot use.

    main logs it as one line and exits with status 2, without the usage text.
    """


def _import_keras_dfp(policy):
    """Import and return keras_dfp, which registers the "dfp16" policy.

    keras_dfp is required only under the dfp16 policy. For the other policies an import
    failure is logged and None is returned, so float32 and mixed_bfloat16 runs still work
    when the ops library has not been built.
    """
    try:
        import keras_dfp  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        if policy == "dfp16":
            reason = str(error).rstrip(".")
            raise RunError(
                f"--policy=dfp16 needs keras_dfp, but importing it failed: {reason}. "
                "Run `make build`, or pass --policy=float32."
            ) from error
        logging.warning("keras_dfp is not importable (%s); running without it.", error)
        return None
    return keras_dfp


class StepCurve(keras.callbacks.Callback):
    """Keras callback that records (step, loss, accuracy) every `every_n_steps` steps.

    The values are Keras' running means over the current epoch, as the progress bar shows.
    """

    def __init__(self, every_n_steps, steps_per_epoch):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.steps_per_epoch = steps_per_epoch
        self.points = []
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self._epoch * self.steps_per_epoch + batch + 1
        if step % self.every_n_steps == 0 and logs:
            self.points.append(
                [step, float(logs.get("loss", math.nan)), float(logs.get("accuracy", math.nan))]
            )


class EpochTimer(keras.callbacks.Callback):
    """Keras callback that records the wall-clock seconds of every training epoch."""

    def __init__(self):
        super().__init__()
        self.seconds = []
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def _prepare_model_dir(model_dir, model_path, summary_path):
    """Create `model_dir` and check that a file can be written there, before training.

    Logs a warning that names the outputs of an earlier run that this run will replace.

    Raises:
      RunError: if the directory cannot be created or written.
    """
    try:
        os.makedirs(model_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=model_dir):
            pass
    except OSError as error:
        raise RunError(
            "Expected --model_dir to be a directory that can be created and written. "
            f"Received: --model_dir={model_dir!r}, which failed with "
            f"{type(error).__name__}: {error}. Pass a writable directory path, "
            "for example --model_dir=runs/my-run."
        ) from error

    existing = [path for path in (model_path, summary_path) if os.path.exists(path)]
    if existing:
        logging.warning(
            "--model_dir=%s already contains %s from an earlier run; this run replaces "
            "them when it finishes. Pass another --model_dir to keep them.",
            model_dir, " and ".join(existing),
        )


def _cluster_resolver():
    """Return the TF_CONFIG cluster resolver of a --strategy=multi_worker run.

    Raises:
      RunError: if TF_CONFIG is unset or does not name this process's task.
    """
    if not os.environ.get("TF_CONFIG"):
        raise RunError(
            "Expected TF_CONFIG to describe the cluster for --strategy=multi_worker. "
            "Received: TF_CONFIG unset. Set it per worker (see docs/distributed.md) "
            "or pass --strategy=none."
        )
    try:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        cluster = resolver.cluster_spec().as_dict()
    except ValueError as error:
        raise RunError(
            "Expected TF_CONFIG to be the JSON description of the cluster. "
            f"Received: TF_CONFIG={os.environ['TF_CONFIG']!r}, which failed with: {error}. "
            "See docs/distributed.md for an example."
        ) from error
    if not cluster or resolver.task_type is None or resolver.task_id is None:
        raise RunError(
            "Expected TF_CONFIG to contain \"cluster\" and this worker's \"task\" "
            f"(type and index). Received: TF_CONFIG={os.environ['TF_CONFIG']!r}. "
            "See docs/distributed.md for an example."
        )
    return resolver


def _worker_model_dir(model_dir):
    """Return the directory for this process's outputs: `model_dir`, or a subdirectory.

    Under --strategy=multi_worker only the chief (task "chief", or worker 0 if the
    cluster has no chief) writes to `model_dir`. Every other worker writes its model,
    summary, logs and BackupAndRestore backup to `model_dir/<task type><task index>`,
    because two workers that write one file on a shared file system can corrupt it
    or fail on its lock. Each worker restores its own backup, so the directories
    also work when the workers do not share a file system.

    Raises:
      RunError: from `_cluster_resolver`.
    """
    if _STRATEGY.value != "multi_worker":
        return model_dir
    resolver = _cluster_resolver()
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    task = (resolver.task_type, resolver.task_id)
    if task == (("chief", 0) if has_chief else ("worker", 0)):
        return model_dir
    return os.path.join(model_dir, f"{resolver.task_type}{resolver.task_id}")


def _make_strategy(name):
    """Return the tf.distribute strategy that --strategy selects, or None for "none".

    Raises:
      RunError: for --strategy=multi_worker without TF_CONFIG or without keras_dfp.
    """
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        _cluster_resolver()
        # Importing keras_dfp patches the two functions of the Keras 3.15 trainer
        # that make Model.fit fail with more than one worker (keras_dfp/_distribute.py).
        if "keras_dfp" not in sys.modules:
            raise RunError(
                "Expected keras_dfp to be importable for --strategy=multi_worker, "
                "because it makes Keras 3.15 Model.fit work with more than one worker. "
                "Received: importing keras_dfp failed (see the warning above). Run `make build`."
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    return None


def _shard_by_element(dataset):
    """Return `dataset` with auto-sharding by element, for --strategy=multi_worker.

    The default policy shards by file and fails when there are fewer files than
    workers (the embedded sample has one per split). Sharding by element splits
    every global batch across the workers, so every worker runs the same number of
    steps on the same global batches as a single-worker run, as long as all workers
    shuffle with the same --seed. Each worker still reads and decodes every record.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


def _backup_callback(model_dir, epochs):
    """Return the BackupAndRestore callback of the run, checking --resume.

    Raises:
      RunError: if a backup exists and --resume is not set, or if the backup has
        already finished `epochs` epochs.
    """
    backup_dir = os.path.join(model_dir, "backup")
    metadata_path = os.path.join(backup_dir, "training_metadata.json")
    if _RESUME.value and os.path.exists(metadata_path):
        try:
            with open(metadata_path, encoding="utf-8") as metadata_file:
                finished = int(json.load(metadata_file)["epoch"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RunError(
                f"Expected a readable backup in --model_dir={model_dir!r}. Received: "
                f"{metadata_path}, which failed to read ({error}). Delete {backup_dir} "
                "to start again."
            ) from error
        if finished >= epochs:
            raise RunError(
                f"Expected --epochs above the {finished} epoch(s) that the backup in "
                f"{backup_dir} has finished. Received: --epochs={epochs}. Pass a larger "
                "--epochs to continue that run."
            )
    if os.path.exists(backup_dir) and not _RESUME.value:
        raise RunError(
            f"Expected no backup in --model_dir without --resume. Received: "
            f"--model_dir={model_dir!r}, which contains {backup_dir}. Pass --resume to "
            "continue that run, or delete the backup to start again."
        )
    if _RESUME.value and not os.path.exists(backup_dir):
        logging.warning("--resume is set but %s does not exist; starting from epoch 0.",
                        backup_dir)
    # NOTE: a resumed run restarts the seeded data order at its first epoch, so
    # its batches differ from an uninterrupted run's after the resume point.
    return keras.callbacks.BackupAndRestore(backup_dir)


def _resolve_preprocessing(preprocessing, image_size):
    """Return (preprocessing, image_size), filling in the defaults of the unset flags."""
    if preprocessing is None:
        preprocessing = "cifar" if image_size is None or image_size < 64 else "imagenet"
    if image_size is None:
        image_size = 32 if preprocessing == "cifar" else 224
    return preprocessing, image_size


def _build_model(image_size, num_classes):
    """Build the --model network for square RGB images of `image_size` pixels.

    Raises:
      RunError: if the builder rejects the input size or the class count.
    """
    try:
        return models.build_model(
            _MODEL.value, input_shape=(image_size, image_size, 3), num_classes=num_classes
        )
    except ValueError as error:
        raise RunError(
            f"Expected an input size and class count that --model={_MODEL.value} accepts. "
            f"Received: --image_size={image_size}, num_classes={num_classes}, which failed "
            f"with: {error} Pass another --image_size or --model."
        ) from error


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}. Pass options as --flag=value.")
    try:
        _train()
    except data_lib.DataError as error:
        logging.error("Invalid --data: %s", error)
        sys.exit(2)
    except RunError as error:
        logging.error("%s", error)
        sys.exit(2)


def _train():
    """Train, evaluate and write the outputs, as the flags set.

    Raises:
      data_lib.DataError: if --data matches no file or its records cannot be read.
      RunError: for any other flag value that the run cannot use.
    """
    # keras_dfp registers the "dfp16" policy, so it is imported before the policy is set.
    keras_dfp = _import_keras_dfp(_POLICY.value)
    # MultiWorkerMirroredStrategy must be created before TensorFlow runs any op,
    # so before the data pipeline below.
    strategy = _make_strategy(_STRATEGY.value)
    model_dir = _worker_model_dir(
        _MODEL_DIR.value or os.path.join("runs", f"{_MODEL.value}-{_POLICY.value}")
    )
    model_path = os.path.join(model_dir, f"{_MODEL.value}.keras")
    summary_path = os.path.join(model_dir, "summary.json")
    preset = presets.resolve(
        _MODEL.value, batch_size=_BATCH_SIZE.value, epochs=_EPOCHS.value,
        learning_rate=_LEARNING_RATE.value, optimizer=_OPTIMIZER.value,
    )
    batch_size = preset.batch_size
    epochs = preset.epochs
    default_optimizer = presets.get_preset(_MODEL.value).optimizer
    if preset.optimizer != default_optimizer and _LEARNING_RATE.value is None:
        raise RunError(
            f"Expected --learning_rate with --optimizer={preset.optimizer}, because the "
            f"preset's rate of --model={_MODEL.value} is meant for {default_optimizer}. "
            f"Received: no --learning_rate. Pass one, for example --learning_rate=0.001 "
            "for adam or 0.01 for sgd."
        )
    preprocessing, image_size = _resolve_preprocessing(_PREPROCESSING.value, _IMAGE_SIZE.value)

    telemetry_every_n_steps = _TELEMETRY_EVERY_N_STEPS.value
    if telemetry_every_n_steps and _POLICY.value != "dfp16":
        raise RunError(
            "Expected --telemetry_every_n_steps=0 unless --policy=dfp16, because only "
            f"DFP16 layers record telemetry. Received: --policy={_POLICY.value}, "
            f"--telemetry_every_n_steps={telemetry_every_n_steps}."
        )
    if telemetry_every_n_steps:
        keras_dfp.telemetry.enable()

    # read_split reads the labels of every record that the run uses, so truncated or empty
    # files and out-of-range labels stop the run here, before the output directory exists.
    train_split = data_lib.read_split(
        _DATA.value, "train", _MAX_TRAIN_RECORDS.value, num_classes=_NUM_CLASSES.value
    )
    test_split = data_lib.read_split(
        _DATA.value, "test", _MAX_TEST_RECORDS.value, num_classes=train_split.num_classes
    )
    data_options = dict(
        seed=_SEED.value, preprocessing=preprocessing, image_size=image_size,
        cache=_CACHE.value,
    )
    train_data = data_lib.dataset_from_split(
        train_split, batch_size=batch_size, repeat=_STEPS_PER_EPOCH.value is not None,
        **data_options,
    )
    test_data = data_lib.dataset_from_split(test_split, batch_size=256, **data_options)
    train_samples = train_split.num_records
    test_samples = test_split.num_records
    # Training drops the last partial batch (see make_dataset), so steps round down.
    steps_per_epoch = train_samples // batch_size
    if steps_per_epoch == 0:
        raise RunError(
            f"Expected at least --batch_size={batch_size} training records. "
            f"Received: train_records={train_samples}. Lower --batch_size, or use more "
            "records (raise --max_train_records or pass a larger --data)."
        )
    if _STEPS_PER_EPOCH.value is not None:
        steps_per_epoch = _STEPS_PER_EPOCH.value
    _prepare_model_dir(model_dir, model_path, summary_path)
    backup = _backup_callback(model_dir, epochs)

    keras.mixed_precision.set_global_policy(_POLICY.value)
    # Like `with strategy.scope():` for the rest of the process, so the model and
    # its optimizer below are created under the strategy.
    tf.distribute.experimental_set_strategy(strategy)
    if _STRATEGY.value == "multi_worker":
        train_data = _shard_by_element(train_data)
        test_data = _shard_by_element(test_data)
    keras.utils.set_random_seed(_SEED.value)
    tf.config.experimental.enable_op_determinism()
    logging.info(
        "Training %s under policy %s on %d train and %d test records of %s (%s, %d "
        "classes), %s preprocessing at %dx%d; output in %s.",
        _MODEL.value, _POLICY.value, train_samples, test_samples, train_split.pattern,
        train_split.data_format, train_split.num_classes, preprocessing, image_size,
        image_size, model_dir,
    )

    model = _build_model(image_size, train_split.num_classes)
    logging.info("Hyper-parameters: %s.", presets.describe(preset))
    model.compile(
        optimizer=presets.make_optimizer(preset, steps_per_epoch),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.summary(print_fn=logging.info)

    # JPEG decoding and Example parsing run inside fit and evaluate, so records that are
    # complete TFRecords but hold no valid image fail there.
    timer = EpochTimer()
    curve = StepCurve(_LOG_EVERY_N_STEPS.value, steps_per_epoch)
    callbacks = [
        timer,
        curve,
        backup,
        keras.callbacks.TensorBoard(
            os.path.join(model_dir, "logs"), update_freq=_LOG_EVERY_N_STEPS.value
        ),
    ]
    if telemetry_every_n_steps:
        callbacks.append(
            keras_dfp.telemetry.TensorBoardCallback(
                os.path.join(model_dir, "telemetry"), every_n_steps=telemetry_every_n_steps
            )
        )
    with data_lib.convert_read_errors(train_split.pattern, train_split.data_format):
        history = model.fit(
            train_data,
            epochs=epochs,
            steps_per_epoch=_STEPS_PER_EPOCH.value,
            callbacks=callbacks,
            shuffle=False,  # make_dataset already shuffles, with the seed.
            verbose=int(_VERBOSE.value),
        )
    # Saved before the evaluation, because fit has deleted the backup by now: a failed
    # or killed evaluation must not lose the trained model.
    model.save(model_path)
    logging.info("Wrote %s; evaluating on %d test records.", model_path, test_split.num_records)
    with data_lib.convert_read_errors(test_split.pattern, test_split.data_format):
        test_loss, test_accuracy = model.evaluate(test_data, verbose=int(_VERBOSE.value))

    summary = {
        "model": _MODEL.value,
        "policy": _POLICY.value,
        "data": _DATA.value or data_lib.SAMPLE_DIR,
        "data_format": train_split.data_format,
        "num_classes": train_split.num_classes,
        "class_names": train_split.class_names,
        "preprocessing": preprocessing,
        "image_size": image_size,
        "cache": _CACHE.value,
        "epochs": epochs,
        "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch,
        "optimizer": preset.optimizer,
        "learning_rate": preset.learning_rate,
        "schedule": presets.describe(preset),
        "seed": _SEED.value,
        "telemetry_every_n_steps": telemetry_every_n_steps,
        "strategy": _STRATEGY.value,
        "train_samples": train_samples,
        "test_samples": test_samples,
        "seconds_per_epoch": timer.seconds,
        "mean_seconds_per_epoch": sum(timer.seconds) / len(timer.seconds),
        "train_loss": history.history["loss"],
        "train_accuracy": history.history["accuracy"],
        "train_curve": curve.points,
        "test_loss": float(test_loss),
        "test_accuracy": float(test_accuracy),
        "model_path": model_path,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "keras_dfp_version": getattr(keras_dfp, "__version__", None),
    }
    with open(summary_path, "w", encoding="utf-8") as summary_file:
        json.dump(summary, summary_file, indent=2)
        summary_file.write("\n")
    logging.info("Wrote %s and %s.", model_path, summary_path)
    print(
        f"{_MODEL.value} ({_POLICY.value}): test accuracy {test_accuracy:.4f}, "
        f"test loss {test_loss:.4f} on {test_samples} images; "
        f"{summary['mean_seconds_per_epoch']:.1f} s/epoch over {epochs} epochs."
    )
    if not math.isfinite(test_loss):
        logging.warning(
            "The test loss is %s, so training diverged. Lower --learning_rate (it was %g) "
            "and run again.", test_loss, preset.learning_rate,
        )


if __name__ == "__main__":
    app.run(main)
