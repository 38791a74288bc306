"""Regenerate the embedded CIFAR-10 sample from the full TFRecord shards.

The sample is class-balanced: 500 training and 100 test records per class. A seeded
permutation of all records of a split picks, for each class, the first records that
appear in permutation order, and the sample is written in that order. Records are
copied byte for byte, so they keep the keys and the JPEG encoding of the source.

Usage (from the repository root):

    python -m model_garden.data.make_sample \
        --source /data/cifar10 --output model_garden/data/cifar10_sample
"""

import collections
import glob
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

NUM_CLASSES = 10
RECORDS_PER_CLASS = {"train": 500, "test": 100}


def read_split(source_dir, split):
    """Return (serialized records, labels) of all `split` shards, in sorted shard order."""
    pattern = os.path.join(source_dir, f"{split}-*.tfrecord")
    files = sorted(glob.glob(pattern))
    if not files:
        raise ValueError(
            f"Expected TFRecord shards matching {pattern}. Received: source={source_dir!r}. "
            "Pass --source=DIR, where DIR contains the full CIFAR-10 shards."
        )
    records = []
    labels = []
    for record in tf.data.TFRecordDataset(files):
        serialized = record.numpy()
        example = tf.train.Example.FromString(serialized)
        records.append(serialized)
        labels.append(example.features.feature["image/class/label"].int64_list.value[0])
    return records, np.asarray(labels, dtype=np.int64)


def select_balanced(labels, per_class, seed):
    """Return record indices with `per_class` records of each class, in seeded random order."""
    order = np.random.default_rng(seed).permutation(len(labels))
    selected_per_class = collections.Counter()
    selected = []
    for index in order:
        label = int(labels[index])
        if selected_per_class[label] < per_class:
            selected_per_class[label] += 1
            selected.append(int(index))
    short = {
        label: selected_per_class[label]
        for label in range(NUM_CLASSES)
        if selected_per_class[label] < per_class
    }
    if short:
        raise ValueError(
            f"Expected {per_class} records per class. Received: counts of short classes={short}. "
            "Use the full CIFAR-10 shards as --source."
        )
    return selected


def write_split(records, indices, path):
    with tf.io.TFRecordWriter(path) as writer:
        for index in indices:
            writer.write(records[index])


def define_flags():
    """Define the command-line flags of the script.

    Only `__main__` calls this, so importing the module (as the tests do) registers no
    absl flag that could clash with the flags of model_garden.train.
    """
    flags.DEFINE_string(
        "source", None, "Directory with the full train-*.tfrecord and test-*.tfrecord shards."
    )
    flags.DEFINE_string(
        "output",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_sample"),
        "Directory that receives train-00000-of-00001.tfrecord and "
        "test-00000-of-00001.tfrecord.",
    )
    flags.DEFINE_integer("seed", 20180430, "Seed of the permutation that picks records.")


def main(argv):
    del argv  # Unused.
    source = flags.FLAGS.source
    output = flags.FLAGS.output
    seed = flags.FLAGS.seed
    if source is None:
        raise app.UsageError("Missing --source: pass the directory of the full CIFAR-10 shards.")
    os.makedirs(output, exist_ok=True)
    for split, per_class in RECORDS_PER_CLASS.items():
        records, labels = read_split(source, split)
        indices = select_balanced(labels, per_class, seed)
        path = os.path.join(output, f"{split}-00000-of-00001.tfrecord")
        write_split(records, indices, path)
        logging.info(
            "Wrote %d of %d %s records to %s (%d bytes).",
            len(indices), len(records), split, path, os.path.getsize(path),
        )


if __name__ == "__main__":
    define_flags()
    app.run(main)
