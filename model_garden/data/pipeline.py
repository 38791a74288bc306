"""tf.data input pipeline for CIFAR-10 TFRecord shards.

Each record is a tf.train.Example. The pipeline reads the keys image/encoded (JPEG bytes)
and image/class/label (int64 in [0, 9]) and ignores image/format, image/height,
image/width and image/class/text. Shards are named `train-*` and `test-*`.

Decoded uint8 images are cached in memory (about 3 KB per image, so 150 MB for the full
training set), and augmentation runs after the cache, so every epoch gets new crops and
flips. Augmentation uses stateless random ops whose seeds come from a seeded
`tf.data.Dataset.random` stream, so a given seed gives the same batches in every run.
"""

import contextlib
import glob
import os
import re

import tensorflow as tf

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
SPLITS = ("train", "test")
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_sample")

# Per-channel mean and standard deviation of pixel values in [0, 1], measured over the
# 50,000 training images of the JPEG form of CIFAR-10 that the shards contain.
CHANNEL_MEAN = (0.4868, 0.4822, 0.4414)
CHANNEL_STD = (0.2451, 0.2425, 0.2605)

# Zero padding on each side before the random 32x32 crop.
CROP_PADDING = 4

_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}

# The fix that every message about unreadable records ends with.
_RECORD_FIX = (
    "Each record must be a tf.train.Example with image/encoded (JPEG bytes) and "
    "image/class/label (int64 in [0, 9]). Regenerate the shards, or copy them again if "
    "the copy was cut short."
)


class DataError(ValueError):
    """Training or test data that cannot be used: no matching file, or unreadable records."""


def split_pattern(data, split):
    """Return the glob pattern that `list_files` matches for `split`, for use in messages."""
    if data is None or data == "":
        data = SAMPLE_DIR
    if os.path.isdir(data):
        return os.path.join(data, f"{split}-*")
    if "{split}" in data:
        return data.replace("{split}", split)
    return data


def list_files(data, split):
    """Return the sorted TFRecord files of one split.

    Args:
      data: None for the embedded sample, a directory that contains `train-*` and
        `test-*` shards, or a glob pattern. A `{split}` in the pattern is replaced by
        the split name. A pattern without it keeps only the matches whose file name
        starts with `<split>-`.
      split: "train" or "test".

    Raises:
      ValueError: if `split` is unknown.
      DataError: if no file matches.
    """
    if split not in SPLITS:
        raise ValueError(f"Expected split in {SPLITS}. Received: split={split!r}")
    if data is None or data == "":
        data = SAMPLE_DIR
    pattern = split_pattern(data, split)
    files = glob.glob(pattern)
    if not os.path.isdir(data) and "{split}" not in data:
        files = [path for path in files if os.path.basename(path).startswith(f"{split}-")]
    files = sorted(path for path in files if os.path.isfile(path))
    if not files:
        raise DataError(
            f"Expected at least one {split} TFRecord file. Received: data={data!r}, which "
            f"matches no file named {split}-* (pattern {pattern!r}). Pass a directory that "
            "contains train-*.tfrecord and test-*.tfrecord shards, a glob such as "
            "'DIR/{split}-*.tfrecord', or leave it empty to use the embedded sample."
        )
    return files


def count_records(files, max_records=None, pattern=None):
    """Return the number of records in `files`, capped at `max_records` when it is set.

    Reading every record also finds truncated and corrupt files before training starts.
    `pattern`, when given, is the glob that matched `files` and is named in errors.

    Raises:
      DataError: if a file is truncated or is not a TFRecord file.
    """
    count = 0
    for path in files:
        count_in_file = 0
        try:
            for _ in tf.data.TFRecordDataset(path):
                count += 1
                count_in_file += 1
                if max_records is not None and count >= max_records:
                    return count
        except tf.errors.DataLossError as error:
            matched_by = f" (matched by {pattern!r})" if pattern else ""
            raise DataError(
                f"Expected complete TFRecord files. Received: file={path!r}{matched_by}, "
                f"where reading failed after {count_in_file} records: "
                f"{_summarize_tf_error(error)}. {_RECORD_FIX}"
            ) from error
    return count


def _summarize_tf_error(error):
    """Return the message of a tf.errors.OpError on one line, without graph node details."""
    message = re.sub(r"\{\{function_node [^}]*\}\}", "", error.message)
    message = re.sub(r"\[Op:[^\]]*\].*", "", message)
    # Errors raised inside a dataset map start with the iterator path, for example
    # "Error in user-defined function passed to ... with iterator: Iterator::Root::...: ".
    message = re.sub(r"Error in user-defined function .*?Iterator::\S*: ", "", message)
    lines = [
        line.strip() for line in message.splitlines()
        if line.strip()
        and not line.strip().startswith("[[")
        and line.strip() not in ("Graph execution error:", "<stack traces unavailable>")
        and not line.startswith("Detected at node")
    ]
    return " ".join(lines).rstrip(". ")


@contextlib.contextmanager
def convert_read_errors(pattern):
    """Raise DataError, naming `pattern`, for records that fail to read or decode in the block.

    Use it around `model.fit` and `model.evaluate`, where the JPEG decoding and the
    tf.train.Example parsing of `make_dataset` run. An InvalidArgumentError counts as a
    data error only when it was raised while fetching the next input batch
    (IteratorGetNext), so errors of the model itself propagate unchanged.
    """
    try:
        yield
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
        if isinstance(error, tf.errors.InvalidArgumentError) and (
            "IteratorGetNext" not in error.message
        ):
            raise
        raise DataError(
            f"Expected readable tf.train.Example records. Received: pattern={pattern!r}, "
            f"where a record failed to read or decode: "
            f"{_summarize_tf_error(error)}. {_RECORD_FIX}"
        ) from error


def decode_example(serialized):
    """Parse one serialized tf.train.Example into (uint8 image [32, 32, 3], int32 label)."""
    features = tf.io.parse_single_example(serialized, _FEATURES)
    image = tf.io.decode_jpeg(features["image/encoded"], channels=3)
    image = tf.ensure_shape(image, IMAGE_SHAPE)
    label = tf.cast(features["image/class/label"], tf.int32)
    return image, label


def augment(image, seed):
    """Randomly flip left-right, then zero-pad by CROP_PADDING and crop back to 32x32.

    `seed` is an int64 tensor of shape [2], as stateless random ops expect.
    """
    flip_seed = seed
    crop_seed = tf.stack([seed[0], seed[1] + 1])
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    padded = tf.pad(
        image, [[CROP_PADDING, CROP_PADDING], [CROP_PADDING, CROP_PADDING], [0, 0]]
    )
    return tf.image.stateless_random_crop(padded, size=IMAGE_SHAPE, seed=crop_seed)


def normalize(image, standardize=True):
    """Convert uint8 pixels to float32 in [0, 1], then optionally standardize per channel."""
    image = tf.cast(image, tf.float32) / 255.0
    if standardize:
        image = (image - tf.constant(CHANNEL_MEAN)) / tf.constant(CHANNEL_STD)
    return image


def make_dataset(
    data=None,
    split="train",
    batch_size=64,
    training=None,
    augmentation=None,
    standardize=True,
    seed=0,
    shuffle_buffer=10_000,
    max_records=None,
    repeat=False,
):
    """Build a batched, prefetched dataset of (float32 images, int32 labels).

    Args:
      data: None (embedded sample), a directory of shards or a glob; see `list_files`.
      split: "train" or "test".
      batch_size: images per batch.
      training: shuffle every epoch and drop the last, smaller batch when True, so
        every training step has the same shape and Keras traces the training function
        once. Defaults to `split == "train"`.
      augmentation: random flip and pad-and-crop when True. Defaults to `training`.
      standardize: subtract CHANNEL_MEAN and divide by CHANNEL_STD when True; otherwise
        pixels stay in [0, 1].
      seed: seed of the shuffle order and of the augmentation.
      shuffle_buffer: shuffle buffer size in records.
      max_records: if set, use only the first `max_records` records of the split.
      repeat: repeat the data without end (after shuffling, so every pass gets a new
        order), for training with a fixed number of steps per epoch.

    Raises:
      ValueError: if an argument is out of range.
      DataError: if no file matches, a file is truncated or corrupt, or the files
        contain no record.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size!r}")
    if max_records is not None and max_records < 1:
        raise ValueError(
            f"Expected max_records >= 1 or None. Received: max_records={max_records!r}"
        )
    if training is None:
        training = split == "train"
    if augmentation is None:
        augmentation = training

    files = list_files(data, split)
    dataset = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
    if max_records is not None:
        dataset = dataset.take(max_records)
    # A known cardinality lets Keras size its progress bar and epoch loop.
    pattern = split_pattern(data, split)
    num_records = count_records(files, max_records, pattern=pattern)
    if num_records == 0:
        raise DataError(
            f"Expected TFRecord files that contain tf.train.Example records. Received: "
            f"pattern={pattern!r}, which matches {len(files)} file(s) that contain no "
            f"readable TFRecord records. {_RECORD_FIX}"
        )
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(num_records))
    dataset = dataset.map(decode_example, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.cache()
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    if augmentation:
        # One int64 per record, new every epoch but fixed by `seed`.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip((dataset, seeds))
        dataset = dataset.map(
            lambda example, record_seed: (
                augment(example[0], tf.stack([record_seed, tf.constant(seed, tf.int64)])),
                example[1],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    dataset = dataset.map(
        lambda image, label: (normalize(image, standardize), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    dataset = dataset.batch(batch_size, drop_remainder=training)
    return dataset.prefetch(tf.data.AUTOTUNE)
