"""tf.data input pipeline for TFRecord shards and class-folder image data sets.

`read_split` finds and checks the records of one split: TFRecord shards (see
tfrecords.py) or one folder of JPEG and PNG files per class (see folders.py).
`dataset_from_split` decodes the images in parallel, preprocesses them with the cifar or
imagenet recipe (see preprocessing.py), batches and prefetches.

With cache="decoded", the decoded uint8 images are cached in memory and augmentation
runs after the cache, so every epoch gets new crops and flips. cache="auto" does so for
cifar preprocessing when the cached images take at most AUTO_CACHE_BYTES (150 MB for the
50,000 CIFAR-10 training images at 32x32). It caches nothing for imagenet preprocessing,
which keeps images at full size until the crop, so it decodes them again every epoch.
Augmentation uses stateless random ops whose seeds come from a seeded
`tf.data.Dataset.random` stream, so a given seed gives the same batches in every run.
"""

import dataclasses
import os

import tensorflow as tf

from model_garden.data import folders
from model_garden.data import preprocessing as preprocessing_lib
from model_garden.data import tfrecords
from model_garden.data.errors import DataError
from model_garden.data.preprocessing import augment  # pylint: disable=unused-import
from model_garden.data.preprocessing import normalize  # pylint: disable=unused-import

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
DATA_FORMATS = ("tfrecord", "class_folders")
CACHE_MODES = ("auto", "decoded", "none")
# Largest size of the decoded images that cache="auto" keeps in memory.
AUTO_CACHE_BYTES = 1 << 30

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """The records of one split, as `read_split` found and checked them.

    Attributes:
      data_format: "tfrecord" or "class_folders".
      split: "train" or "test".
      pattern: glob of the split's files, for messages.
      files: TFRecord files, or one image file per record for class folders.
      labels: the label of every image file for class folders; None for TFRecords.
      num_records: number of records that the dataset reads.
      num_classes: number of classes; every label is below it.
      class_names: class folder names in label order; None for TFRecords.
    """

    data_format: str
    split: str
    pattern: str
    files: tuple
    labels: tuple
    num_records: int
    num_classes: int
    class_names: tuple


def _check_num_classes(num_classes):
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(
            f"Expected num_classes >= 1 or None. Received: num_classes={num_classes!r}"
        )


def read_split(data, split, max_records=None, num_classes=None):
    """Find and check the records of one split.

    Args:
      data: None or "" for the embedded sample, a directory of `train-*` and `test-*`
        TFRecord shards, a glob (see `tfrecords.list_files`), or a directory with a
        `train` folder of class folders (see folders.py).
      split: "train" or "test".
      max_records: if set, use only the first `max_records` records of the split.
      num_classes: number of classes. Defaults to the number of class folders, or to
        10 (CIFAR-10) for TFRecords. Every label must be below it.

    Raises:
      ValueError: if an argument is out of range.
      DataError: if no file matches, a file is truncated or corrupt, the files contain
        no record, a label is out of range, or the class folders are unusable.
    """
    if split not in tfrecords.SPLITS:
        raise ValueError(f"Expected split in {tfrecords.SPLITS}. Received: split={split!r}")
    if max_records is not None and max_records < 1:
        raise ValueError(
            f"Expected max_records >= 1 or None. Received: max_records={max_records!r}"
        )
    _check_num_classes(num_classes)
    if folders.is_class_folder_data(data):
        return _read_class_folders(data, split, max_records, num_classes)

    files = tfrecords.list_files(data, split)
    pattern = tfrecords.split_pattern(data, split)
    num_records, min_label, max_label = tfrecords.scan_labels(files, max_records, pattern)
    if num_records == 0:
        raise DataError(
            f"Expected TFRecord files that contain tf.train.Example records. Received: "
            f"pattern={pattern!r}, which matches {len(files)} file(s) that contain no "
            f"readable TFRecord records. {tfrecords.RECORD_FIX}"
        )
    if num_classes is None:
        num_classes = NUM_CLASSES
    if min_label < 0 or max_label >= num_classes:
        fix = "Fix the labels."
        if min_label >= 0:
            fix = (
                f"Pass num_classes={max_label + 1} (--num_classes={max_label + 1} in "
                "model_garden.train) if the data has that many classes, or fix the labels."
            )
        raise DataError(
            f"Expected image/class/label in [0, {num_classes - 1}] for "
            f"num_classes={num_classes}. Received: pattern={pattern!r}, whose labels range "
            f"from {min_label} to {max_label}. {fix}"
        )
    return SplitInfo(
        data_format="tfrecord", split=split, pattern=pattern, files=tuple(files),
        labels=None, num_records=num_records, num_classes=num_classes, class_names=None,
    )


def _read_class_folders(data, split, max_records, num_classes):
    folder, class_names, paths, labels = folders.list_images(data, split)
    if num_classes is None:
        num_classes = len(class_names)
    elif num_classes < len(class_names):
        raise DataError(
            f"Expected num_classes >= the number of class folders. Received: "
            f"num_classes={num_classes} for data={data!r}, which has {len(class_names)} "
            f"class folders. Pass num_classes={len(class_names)} (--num_classes in "
            "model_garden.train) or leave it unset."
        )
    if max_records is not None:
        paths = paths[:max_records]
        labels = labels[:max_records]
    return SplitInfo(
        data_format="class_folders", split=split,
        pattern=os.path.join(data, folder, "*", "*"), files=tuple(paths),
        labels=tuple(labels), num_records=len(paths), num_classes=num_classes,
        class_names=class_names,
    )


def _read_image_file(path):
    """Read and decode one image file, failing with a message that names the file."""
    contents = tf.io.read_file(path)
    is_png = tf.equal(tf.strings.substr(contents, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)
    is_known = tf.logical_or(tf.io.is_jpeg(contents), is_png)
    message = tf.strings.join(
        ["Expected a JPEG or PNG file. Received: file=", path,
         ", which starts with neither signature"]
    )
    check = tf.debugging.Assert(is_known, [message])
    with tf.control_dependencies([check]):
        return preprocessing_lib.decode(contents)


def _records(info):
    """Return the dataset of raw records of `info` and a function that decodes one.

    The decode function maps a record to (uint8 image [height, width, 3], int32 label).
    """
    if info.data_format == "class_folders":
        dataset = tf.data.Dataset.from_tensor_slices(
            (list(info.files), tf.constant(info.labels, tf.int32))
        )
        return dataset, lambda path, label: (_read_image_file(path), label)

    dataset = tf.data.TFRecordDataset(list(info.files), num_parallel_reads=tf.data.AUTOTUNE)
    dataset = dataset.take(info.num_records)

    def decode_record(serialized):
        encoded, label = tfrecords.parse_example(serialized)
        return preprocessing_lib.decode(encoded), label

    return dataset, decode_record


def _use_cache(cache, preprocessing, image_size, num_records):
    if cache not in CACHE_MODES:
        raise ValueError(f"Expected cache in {CACHE_MODES}. Received: cache={cache!r}")
    if cache == "auto":
        decoded_bytes = num_records * image_size * image_size * 3
        return preprocessing == "cifar" and decoded_bytes <= AUTO_CACHE_BYTES
    return cache == "decoded"


def dataset_from_split(
    info,
    batch_size=64,
    training=None,
    augmentation=None,
    standardize=True,
    seed=0,
    shuffle_buffer=10_000,
    repeat=False,
    preprocessing="cifar",
    image_size=32,
    cache="auto",
):
    """Build a batched, prefetched dataset of (float32 images, int32 labels) from `info`.

    Args:
      info: a SplitInfo from `read_split`.
      batch_size, training, augmentation, standardize, seed, shuffle_buffer, repeat:
        see `make_dataset`.
      preprocessing: "cifar" or "imagenet" (see preprocessing.py).
      image_size: height and width of the output images.
      cache: "decoded" caches the decoded images in memory, "none" decodes them every
        epoch, and "auto" chooses as the module docstring describes.

    Raises:
      ValueError: if an argument is out of range.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size!r}")
    preprocessing_lib.check_preprocessing(preprocessing, image_size)
    if training is None:
        training = info.split == "train"
    if augmentation is None:
        augmentation = training
    use_cache = _use_cache(cache, preprocessing, image_size, info.num_records)

    dataset, decode_record = _records(info)
    # A known cardinality lets Keras size its progress bar and epoch loop.
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(info.num_records))
    if preprocessing == "cifar":
        def decode_fn(*record):
            image, label = decode_record(*record)
            return preprocessing_lib.to_square(image, image_size), label
    else:
        decode_fn = decode_record

    if use_cache:
        dataset = dataset.map(decode_fn, num_parallel_calls=tf.data.AUTOTUNE).cache()
        if training:
            dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    else:
        # Shuffle the raw records (file names or serialized examples), so the shuffle
        # buffer contains no decoded image. All file names of a split fit in memory.
        if training:
            buffer = info.num_records if info.data_format == "class_folders" else shuffle_buffer
            dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.map(decode_fn, num_parallel_calls=tf.data.AUTOTUNE)
    if repeat:
        dataset = dataset.repeat()

    if augmentation:
        if preprocessing == "cifar":
            def augment_fn(image, seed_pair):
                return preprocessing_lib.augment(image, seed_pair)
        else:
            def augment_fn(image, seed_pair):
                return preprocessing_lib.random_resized_crop(image, seed_pair, image_size)
        # One int64 per record, new every epoch but fixed by `seed`.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip((dataset, seeds))
        dataset = dataset.map(
            lambda example, record_seed: (
                augment_fn(example[0], tf.stack([record_seed, tf.constant(seed, tf.int64)])),
                example[1],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    elif preprocessing == "imagenet":
        dataset = dataset.map(
            lambda image, label: (preprocessing_lib.center_crop_for_eval(image, image_size), label),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    if preprocessing == "cifar":
        mean, std = preprocessing_lib.CHANNEL_MEAN, preprocessing_lib.CHANNEL_STD
    else:
        mean, std = preprocessing_lib.IMAGENET_MEAN, preprocessing_lib.IMAGENET_STD
    dataset = dataset.map(
        lambda image, label: (preprocessing_lib.normalize(image, standardize, mean, std), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    dataset = dataset.batch(batch_size, drop_remainder=training)
    return dataset.prefetch(tf.data.AUTOTUNE)


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
    preprocessing="cifar",
    image_size=32,
    num_classes=None,
    cache="auto",
):
    """Build a batched, prefetched dataset of (float32 images, int32 labels).

    Args:
      data: None (embedded sample), a directory of shards, a glob, or a directory of
        class folders; see `read_split`.
      split: "train" or "test".
      batch_size: images per batch.
      training: shuffle every epoch and drop the last, smaller batch when True, so
        every training step has the same shape and Keras traces the training function
        once. Defaults to `split == "train"`.
      augmentation: random crop and flip of the preprocessing recipe when True.
        Defaults to `training`.
      standardize: subtract the recipe's channel mean and divide by its standard
        deviation when True; otherwise pixels stay in [0, 1].
      seed: seed of the shuffle order and of the augmentation.
      shuffle_buffer: shuffle buffer size in records.
      max_records: if set, use only the first `max_records` records of the split.
      repeat: repeat the data without end (after shuffling, so every pass gets a new
        order), for training with a fixed number of steps per epoch.
      preprocessing: "cifar" or "imagenet" (see preprocessing.py).
      image_size: height and width of the output images.
      num_classes: see `read_split`.
      cache: "auto", "decoded" or "none"; see `dataset_from_split`.

    Raises:
      ValueError: if an argument is out of range.
      DataError: if no file matches, a file is truncated or corrupt, the files contain
        no record, a label is out of range, or the class folders are unusable.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size!r}")
    info = read_split(data, split, max_records=max_records, num_classes=num_classes)
    return dataset_from_split(
        info, batch_size=batch_size, training=training, augmentation=augmentation,
        standardize=standardize, seed=seed, shuffle_buffer=shuffle_buffer, repeat=repeat,
        preprocessing=preprocessing, image_size=image_size, cache=cache,
    )
