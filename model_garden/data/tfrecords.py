"""TFRecord shards of tf.train.Example records: finding, counting and parsing them.

The pipeline reads the keys image/encoded (JPEG or PNG bytes) and image/class/label
(int64 in [0, num_classes - 1]) and ignores the others, such as image/format,
image/height, image/width and image/class/text. Shards are named `train-*` and `test-*`.
"""

import glob
import os

import numpy as np
import tensorflow as tf

from model_garden.data.errors import RECORD_FIX
from model_garden.data.errors import DataError
from model_garden.data.errors import summarize_tf_error

SPLITS = ("train", "test")
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_sample")

_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}
_LABEL_FEATURE = {"image/class/label": _FEATURES["image/class/label"]}


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
            "contains train-*.tfrecord and test-*.tfrecord shards, a directory with "
            "train/<class>/ and test/<class>/ image folders, a glob such as "
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
                f"{summarize_tf_error(error)}. {RECORD_FIX}"
            ) from error
    return count


def scan_labels(files, max_records=None, pattern=None):
    """Return (count, min_label, max_label) of the records in `files`.

    Reads at most `max_records` records. The labels are None when there is no record.

    Raises:
      DataError: if a file is truncated or is not a TFRecord file, or a record is not a
        tf.train.Example with an int64 image/class/label.
    """
    dataset = tf.data.TFRecordDataset(files)
    if max_records is not None:
        dataset = dataset.take(max_records)
    dataset = dataset.batch(4096).map(
        lambda serialized: tf.io.parse_example(serialized, _LABEL_FEATURE)["image/class/label"]
    )
    count = 0
    batch_mins = []
    batch_maxes = []
    try:
        for labels in dataset:
            labels = labels.numpy()
            count += labels.size
            batch_mins.append(int(np.min(labels)))
            batch_maxes.append(int(np.max(labels)))
    except tf.errors.DataLossError as error:
        # count_records names the file and the record where reading fails.
        count_records(files, max_records, pattern=pattern)
        raise DataError(
            f"Expected complete TFRecord files. Received: pattern={pattern!r}, where reading "
            f"failed: {summarize_tf_error(error)}. {RECORD_FIX}"
        ) from error
    except tf.errors.InvalidArgumentError as error:
        raise DataError(
            f"Expected tf.train.Example records with an int64 image/class/label. Received: "
            f"pattern={pattern!r}, where parsing failed: {summarize_tf_error(error)}. "
            f"{RECORD_FIX}"
        ) from error
    if not count:
        return 0, None, None
    return count, min(batch_mins), max(batch_maxes)


def parse_example(serialized):
    """Parse one serialized tf.train.Example into (encoded image bytes, int32 label)."""
    features = tf.io.parse_single_example(serialized, _FEATURES)
    return features["image/encoded"], tf.cast(features["image/class/label"], tf.int32)
