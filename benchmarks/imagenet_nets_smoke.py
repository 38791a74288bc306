"""Train each ImageNet network for a few dfp16 steps on real images and check the loss.

For every network in --models the script builds the model-garden model at
--image_size x --image_size with 10 classes under the --policy dtype policy. The
default is "dfp16", and "float32" gives reference times per step. It trains each
network with the optimizer of its preset (model_garden/presets.py) for --steps steps on
one fixed set of --num_images CIFAR-10 training images, resized with bilinear
interpolation. The set is chosen by --seed and is the same every step, so the network
only has to memorize a few images and the loss should fall within a few steps.

    python benchmarks/imagenet_nets_smoke.py --out smoke.json
    python benchmarks/imagenet_nets_smoke.py --models=alexnet --steps=10 --image_size=128

The script prints one table row per network and exits with status 1 when a loss is not
finite or the mean loss of the last 3 steps is not below that of the first 3.
Seconds per step is the median over the steps after the first step, which also traces
and compiles the training function. It is given in wall-clock time and in CPU time of
the whole process, which does not grow when other jobs share the cores.
No test asserts on these times.
"""

import gc
import json
import math
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras_dfp  # noqa: E402  Registers the "dfp16" policy.
from keras_dfp import ops  # noqa: E402
from model_garden import data as data_lib  # noqa: E402
from model_garden.data import preprocessing  # noqa: E402
from model_garden.data import tfrecords  # noqa: E402
from model_garden import models  # noqa: E402
from model_garden import presets  # noqa: E402

IMAGENET_MODELS = ("resnet50", "googlenet", "vgg16", "alexnet")

# Training records from which --num_images images are drawn: the first records of the
# shuffled train shards, so the draw does not read the whole data set.
CANDIDATE_RECORDS = 1000

# Steps averaged at each end of the loss curve to decide whether the loss fell.
ENDPOINT_STEPS = 3

FLAGS = flags.FLAGS


def define_flags():
    """Define the command-line flags of the script.

    The flags are defined only when the script runs as a program, so that tests can
    import it next to model_garden.train, which defines flags of the same names.
    """
    flags.DEFINE_list(
        "models", list(IMAGENET_MODELS), "Comma-separated model-garden networks to run."
    )
    flags.DEFINE_integer(
        "steps", 15, "Training steps per network (at least 2 * 3, so the first and last 3 "
        "steps do not overlap).", lower_bound=2 * ENDPOINT_STEPS,
    )
    # VGG-16 costs about 15.5 billion multiply-adds per 224x224 image in the forward pass,
    # almost 4 times ResNet-50, so it runs fewer steps on fewer images by default.
    flags.DEFINE_integer(
        "vgg16_steps", 10, "Training steps for vgg16. 0 uses --steps.", lower_bound=0,
    )
    flags.DEFINE_integer(
        "vgg16_num_images", 4,
        "vgg16 trains on only the first this many images of the set, with a batch size of "
        "at most this many. 0 uses the whole set.",
        lower_bound=0,
    )
    flags.DEFINE_integer(
        "batch_size", 8, "Images per step, all drawn from the fixed set.", lower_bound=1
    )
    flags.DEFINE_integer(
        "num_images", 8,
        "Size of the fixed set of training images that every step draws its batch from.",
        lower_bound=1,
    )
    flags.DEFINE_integer(
        "image_size", 224, "Height and width in pixels that the 32x32 images are resized to.",
        lower_bound=1,
    )
    flags.DEFINE_float(
        "learning_rate", None,
        "Learning rate for every network. Defaults to each preset's rate, scaled linearly "
        "from its reference batch size to --batch_size.",
    )
    flags.DEFINE_string(
        "data", "../shared/datasets/cifar10",
        "CIFAR-10 TFRecord shards: a directory with train-* files or a glob, relative to "
        "the working directory. Empty uses the embedded 5,000-image sample.",
    )
    flags.DEFINE_integer(
        "seed", 0, "Seed of the image draw and of the weight initialization.", lower_bound=0,
        upper_bound=2**32 - 1,
    )
    flags.DEFINE_enum(
        "policy", "dfp16", ("dfp16", "float32", "mixed_bfloat16"),
        "Keras dtype policy of the networks. dfp16 runs Conv2D and Dense through the "
        "INT16 ops; float32 and mixed_bfloat16 give reference times per step.",
    )
    flags.DEFINE_string(
        "out", "", "Write the per-step losses and the table values to this JSON file."
    )

    flags.register_validator(
        "learning_rate",
        lambda value: value is None or (math.isfinite(value) and value > 0),
        message="--learning_rate must be a finite number > 0, for example 0.01.",
    )


def load_images(data, num_images, image_size, seed):
    """Return `num_images` CIFAR-10 training images resized to `image_size`, with labels.

    The images are drawn without replacement by `seed` from the first CANDIDATE_RECORDS
    records of the train shards, decoded by the model-garden pipeline, scaled and
    standardized per channel like its training images, then resized with bilinear
    interpolation. Returns (float32 array [n, size, size, 3], int32 array [n]).

    Raises:
      ValueError: if `num_images` exceeds CANDIDATE_RECORDS or the records found.
      data_lib.DataError: if no train shard matches `data`.
    """
    files = data_lib.list_files(data, "train")
    records = [
        record.numpy()
        for record in tf.data.TFRecordDataset(files).take(CANDIDATE_RECORDS)
    ]
    if not 1 <= num_images <= len(records):
        raise ValueError(
            f"Expected num_images from 1 to {len(records)}, the records drawn from. "
            f"Received: num_images={num_images!r}. Pass a smaller --num_images."
        )
    indices = np.random.default_rng(seed).choice(len(records), num_images, replace=False)
    images, labels = [], []
    for index in sorted(indices):
        encoded, label = tfrecords.parse_example(records[index])
        images.append(preprocessing.normalize(preprocessing.decode(encoded)))
        labels.append(int(label))
    resized = tf.image.resize(tf.stack(images), (image_size, image_size), method="bilinear")
    return resized.numpy(), np.asarray(labels, np.int32)


def make_optimizer(name, batch_size, steps, learning_rate=None):
    """Return (optimizer, description) of the preset of `name` for a `steps`-step run.

    The whole run counts as one epoch, so every preset's step schedule keeps its first
    rate, because the first decay of each preset comes after epoch 8 or later.
    """
    preset = presets.resolve(name, batch_size=batch_size, learning_rate=learning_rate)
    return presets.make_optimizer(preset, steps_per_epoch=steps), presets.describe(preset)


def run_model(
    name, images, labels, steps, batch_size, seed=0, learning_rate=None, policy="dfp16"
):
    """Train `name` under `policy` for `steps` steps on `images` and return the results.

    Step i trains on the `batch_size` images that start at (i * batch_size) modulo the
    set size, so a batch as large as the set is the same batch every step. The global
    dtype policy is restored before returning.

    Returns a dict with the settings, the parameter count, the optimizer description and
    the per-step losses, wall-clock seconds and CPU seconds (all threads of the
    process). first_loss and last_loss are the means of the first and last
    ENDPOINT_STEPS steps, or of all steps in shorter runs. seconds_per_step and
    cpu_seconds_per_step are medians over the steps after the first.
    nonfinite_count counts NaN and infinite losses, and kernel_path is the active
    keras-dfp kernel path.
    """
    num_images = len(images)
    if not 1 <= batch_size <= num_images:
        raise ValueError(
            f"Expected batch_size from 1 to the {num_images} images of the set. "
            f"Received: batch_size={batch_size!r}. Lower --batch_size or raise "
            "--num_images."
        )
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(seed)
        model = models.build_model(name, input_shape=images.shape[1:], num_classes=10)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    optimizer, optimizer_text = make_optimizer(name, batch_size, steps, learning_rate)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    losses, seconds, cpu_seconds = [], [], []
    for step in range(steps):
        positions = (np.arange(batch_size) + step * batch_size) % num_images
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model.train_on_batch(images[positions], labels[positions])
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
        losses.append(float(loss))
        logging.info("%s step %d/%d: loss %.4f, %.2f s, %.2f CPU s", name, step + 1, steps,
                     losses[-1], seconds[-1], cpu_seconds[-1])

    endpoint = min(ENDPOINT_STEPS, steps)
    result = {
        "model": name,
        "policy": policy,
        "params": int(model.count_params()),
        "input_shape": list(images.shape[1:]),
        "num_images": num_images,
        "batch_size": batch_size,
        "steps": steps,
        "optimizer": optimizer_text,
        "losses": losses,
        "seconds": seconds,
        "first_loss": statistics.fmean(losses[:endpoint]),
        "last_loss": statistics.fmean(losses[-endpoint:]),
        "cpu_seconds": cpu_seconds,
        "seconds_per_step": _median_after_first(seconds),
        "cpu_seconds_per_step": _median_after_first(cpu_seconds),
        "nonfinite_count": sum(1 for loss in losses if not math.isfinite(loss)),
        # The keras-dfp kernel path applies only to the INT16 ops of the dfp16 policy.
        "kernel_path": ops.get_kernel_path() if policy == "dfp16" else "-",
    }
    del model, optimizer
    keras.backend.clear_session()
    gc.collect()
    return result


def _median_after_first(values):
    # The first step also traces and compiles the training function.
    return statistics.median(values[1:]) if len(values) > 1 else values[0]


def find_problems(result):
    """Return the failed checks of one `run_model` result as sentences (empty if none)."""
    problems = []
    if result["nonfinite_count"]:
        problems.append(
            f"{result['model']}: {result['nonfinite_count']} of {result['steps']} step "
            "losses are not finite."
        )
    elif not result["last_loss"] < result["first_loss"]:
        problems.append(
            f"{result['model']}: the loss did not fall: mean of the last "
            f"{ENDPOINT_STEPS} steps {result['last_loss']:.4f} >= mean of the first "
            f"{ENDPOINT_STEPS} steps {result['first_loss']:.4f}."
        )
    return problems


def format_table(results):
    """Return the results as a Markdown table, one row per network."""
    lines = [
        "| model | params | images | batch | steps | first loss | last loss | s/step "
        "| CPU s/step | NaN count | kernel path |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        lines.append(
            f"| {result['model']} | {result['params']:,} | {result['num_images']} | "
            f"{result['batch_size']} | {result['steps']} | "
            f"{result['first_loss']:.3f} | {result['last_loss']:.3f} | "
            f"{result['seconds_per_step']:.2f} | {result['cpu_seconds_per_step']:.2f} | "
            f"{result['nonfinite_count']} | "
            f"{result['kernel_path']} |"
        )
    return "\n".join(lines)


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}. Pass options as --flag=value.")
    unknown = [name for name in FLAGS.models if name not in models.MODELS]
    if unknown:
        raise app.UsageError(
            f"Expected --models from {sorted(models.MODELS)}. Received: "
            f"--models={','.join(FLAGS.models)}, where {unknown} are unknown."
        )
    tf.config.experimental.enable_op_determinism()
    images, labels = load_images(
        FLAGS.data, FLAGS.num_images, FLAGS.image_size, FLAGS.seed
    )
    logging.info("Loaded %d images of shape %s, labels %s.", len(images), images.shape[1:],
                 labels.tolist())

    results = []
    for name in FLAGS.models:
        steps, num_images = FLAGS.steps, len(images)
        if name == "vgg16":
            steps = FLAGS.vgg16_steps or steps
            num_images = FLAGS.vgg16_num_images or num_images
        results.append(run_model(
            name, images[:num_images], labels[:num_images], steps,
            min(FLAGS.batch_size, num_images), seed=FLAGS.seed,
            learning_rate=FLAGS.learning_rate, policy=FLAGS.policy,
        ))

    print(
        f"A fixed set of {FLAGS.num_images} CIFAR-10 training images resized to "
        f"{FLAGS.image_size}x{FLAGS.image_size}, policy {FLAGS.policy}, "
        f"seed {FLAGS.seed}; "
        f"CPU: {_cpu_model()}; TensorFlow "
        f"{tf.__version__}, Keras {keras.__version__}."
    )
    print(format_table(results))
    for result in results:
        print(f"{result['model']} optimizer: {result['optimizer']}")

    problems = [problem for result in results for problem in find_problems(result)]
    if FLAGS.out:
        report = {
            "data": FLAGS.data or data_lib.SAMPLE_DIR,
            "num_images": FLAGS.num_images,
            "image_size": FLAGS.image_size,
            "policy": FLAGS.policy,
            "batch_size": FLAGS.batch_size,
            "seed": FLAGS.seed,
            "labels": labels.tolist(),
            "cpu": _cpu_model(),
            "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__,
            "keras_dfp_version": getattr(keras_dfp, "__version__", None),
            "results": results,
            "problems": problems,
        }
        with open(FLAGS.out, "w", encoding="utf-8") as out_file:
            json.dump(report, out_file, indent=2)
            out_file.write("\n")
        logging.info("Wrote %s.", FLAGS.out)
    for problem in problems:
        logging.error("%s", problem)
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
