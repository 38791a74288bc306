"""Tests of the model garden: embedded sample, input pipeline, model registry."""

import collections
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from model_garden import data as data_lib
from model_garden import models
from model_garden.data import make_sample

SAMPLE_FILES = {
    "train": os.path.join(data_lib.SAMPLE_DIR, "train-00000-of-00001.tfrecord"),
    "test": os.path.join(data_lib.SAMPLE_DIR, "test-00000-of-00001.tfrecord"),
}
SAMPLE_SIZES = {"train": 5000, "test": 1000}


def _collect(dataset):
    images = []
    labels = []
    for image_batch, label_batch in dataset:
        images.append(image_batch.numpy())
        labels.append(label_batch.numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_sample_files_fit_size_budget():
    total_bytes = sum(os.path.getsize(path) for path in SAMPLE_FILES.values())
    assert total_bytes <= 8 * 1024 * 1024


@pytest.mark.parametrize("split", ["train", "test"])
def test_sample_records_keep_source_keys(split):
    serialized = next(iter(tf.data.TFRecordDataset(SAMPLE_FILES[split]))).numpy()
    feature = tf.train.Example.FromString(serialized).features.feature
    assert set(feature) == {
        "image/encoded", "image/format", "image/height", "image/width",
        "image/class/label", "image/class/text",
    }
    assert feature["image/format"].bytes_list.value[0] == b"jpeg"
    label = feature["image/class/label"].int64_list.value[0]
    class_text = feature["image/class/text"].bytes_list.value[0].decode()
    assert class_text == data_lib.CLASS_NAMES[label]


@pytest.mark.parametrize("split", ["train", "test"])
def test_sample_pipeline_shapes_and_balance(split):
    dataset = data_lib.make_dataset(
        None, split, batch_size=500, training=False, standardize=False
    )
    images, labels = _collect(dataset)
    assert images.shape == (SAMPLE_SIZES[split], 32, 32, 3)
    assert images.dtype == np.float32
    assert labels.dtype == np.int32
    assert images.min() >= 0.0
    assert images.max() <= 1.0
    counts = collections.Counter(labels.tolist())
    per_class = SAMPLE_SIZES[split] // data_lib.NUM_CLASSES
    assert counts == {label: per_class for label in range(data_lib.NUM_CLASSES)}


def test_pipeline_cardinality_counts_last_partial_batch():
    dataset = data_lib.make_dataset(None, "test", batch_size=300)
    assert int(dataset.cardinality()) == 4


def test_pipeline_standardizes_per_channel():
    images, _ = _collect(data_lib.make_dataset(None, "train", batch_size=1000, training=False))
    channel_mean = images.mean(axis=(0, 1, 2))
    channel_std = images.std(axis=(0, 1, 2))
    np.testing.assert_allclose(channel_mean, 0.0, atol=0.05)
    np.testing.assert_allclose(channel_std, 1.0, atol=0.05)


def test_pipeline_same_seed_same_batches():
    first = data_lib.make_dataset(None, "train", batch_size=64, seed=7, max_records=256)
    second = data_lib.make_dataset(None, "train", batch_size=64, seed=7, max_records=256)
    images_first, labels_first = _collect(first)
    images_second, labels_second = _collect(second)
    np.testing.assert_array_equal(labels_first, labels_second)
    np.testing.assert_array_equal(images_first, images_second)


def test_pipeline_reshuffles_and_reaugments_each_epoch():
    dataset = data_lib.make_dataset(None, "train", batch_size=64, seed=7, max_records=256)
    images_epoch1, labels_epoch1 = _collect(dataset)
    images_epoch2, labels_epoch2 = _collect(dataset)
    assert not np.array_equal(labels_epoch1, labels_epoch2)
    assert sorted(labels_epoch1.tolist()) == sorted(labels_epoch2.tolist())
    assert not np.array_equal(images_epoch1, images_epoch2)


def test_augmentation_only_flips_and_shifts():
    image = tf.reshape(tf.range(32 * 32 * 3, dtype=tf.int32) % 251, (32, 32, 3))
    image = tf.cast(image + 1, tf.uint8)  # No zero pixels, so padding is recognizable.
    for seed in range(20):
        augmented = data_lib.pipeline.augment(image, tf.constant([seed, 3], tf.int64))
        assert augmented.shape == (32, 32, 3)
        nonzero = augmented.numpy()[augmented.numpy().sum(axis=-1) > 0]
        # The window keeps at least 28x28 of the original pixels (padding is 4 per side).
        assert nonzero.shape[0] >= 28 * 28


def test_list_files_accepts_directory_and_globs():
    directory = data_lib.list_files(data_lib.SAMPLE_DIR, "train")
    with_split = data_lib.list_files(
        os.path.join(data_lib.SAMPLE_DIR, "{split}-*.tfrecord"), "test"
    )
    plain_glob = data_lib.list_files(os.path.join(data_lib.SAMPLE_DIR, "*.tfrecord"), "test")
    assert directory == [SAMPLE_FILES["train"]]
    assert with_split == [SAMPLE_FILES["test"]]
    assert plain_glob == [SAMPLE_FILES["test"]]


def test_list_files_defaults_to_sample():
    assert data_lib.list_files(None, "train") == [SAMPLE_FILES["train"]]
    assert data_lib.list_files("", "test") == [SAMPLE_FILES["test"]]


def test_list_files_missing_data_names_pattern(tmp_path):
    missing = str(tmp_path / "no-such-dir" / "*.tfrecord")
    expected = re.escape(f"Received: data={missing!r}")
    with pytest.raises(data_lib.DataError, match=expected) as info:
        data_lib.list_files(missing, "train")
    assert "Pass a directory that contains train-*.tfrecord" in str(info.value)


def test_list_files_directory_without_split_shards(tmp_path):
    (tmp_path / "validation-00000-of-00001.tfrecord").write_bytes(b"")
    with pytest.raises(ValueError, match=r"matches no file named train-\*"):
        data_lib.list_files(str(tmp_path), "train")


def test_list_files_rejects_unknown_split():
    with pytest.raises(ValueError, match=r"Received: split='validation'"):
        data_lib.list_files(None, "validation")


def test_split_pattern_forms():
    assert data_lib.split_pattern(None, "train") == os.path.join(data_lib.SAMPLE_DIR, "train-*")
    assert data_lib.split_pattern("/d/{split}-*.tfrecord", "test") == "/d/test-*.tfrecord"
    assert data_lib.split_pattern("/no-such-dir/*.tfrecord", "test") == "/no-such-dir/*.tfrecord"


def test_make_dataset_names_truncated_file(tmp_path):
    with open(SAMPLE_FILES["train"], "rb") as source:
        (tmp_path / "train-00000-of-00002.tfrecord").write_bytes(source.read(100_000))
    expected = (
        re.escape(f"Received: file={str(tmp_path / 'train-00000-of-00002.tfrecord')!r} ")
        + re.escape(f"(matched by {str(tmp_path / 'train-*')!r}), ")
        + r"where reading failed after 90 records: truncated record at \d+"
    )
    with pytest.raises(data_lib.DataError, match=expected) as info:
        data_lib.make_dataset(str(tmp_path), "train")
    assert re.search(r"Regenerate the shards, or copy them again", str(info.value))
    assert "\n" not in str(info.value)


def test_count_records_stops_before_truncation(tmp_path):
    truncated = tmp_path / "train-00000-of-00001.tfrecord"
    with open(SAMPLE_FILES["train"], "rb") as source:
        truncated.write_bytes(source.read(100_000))
    assert data_lib.count_records([str(truncated)], max_records=50) == 50


@pytest.mark.parametrize(
    "content",
    [b"", b"hi\n", b"plain text that is longer than one TFRecord header\n" * 4],
    ids=["empty", "short_text", "long_text"],
)
def test_make_dataset_rejects_files_without_records(tmp_path, content):
    (tmp_path / "train-x").write_bytes(content)
    pattern = str(tmp_path / "train-*")
    with pytest.raises(data_lib.DataError) as info:
        data_lib.make_dataset(str(tmp_path), "train")
    message = str(info.value)
    # Short files read as zero records, and longer ones as a corrupt first record.
    assert re.search(
        re.escape(f"Received: pattern={pattern!r}, which matches 1 file(s) that contain no "
                  "readable TFRecord records")
        + "|"
        + re.escape(f"(matched by {pattern!r}), where reading failed after 0 records: "
                    "corrupted record at 0"),
        message,
    ), message
    assert re.search(r"image/encoded \(JPEG or PNG bytes\) and image/class/label", message)


def _write_examples(path, encoded, num_records):
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[3])),
    }))
    with tf.io.TFRecordWriter(str(path)) as writer:
        for _ in range(num_records):
            writer.write(example.SerializeToString())


def test_bad_jpeg_error_names_pattern(tmp_path):
    _write_examples(tmp_path / "train-0.tfrecord", b"not a jpeg" * 8, 4)
    pattern = data_lib.split_pattern(str(tmp_path), "train")
    dataset = data_lib.make_dataset(str(tmp_path), "train", batch_size=2)
    with pytest.raises(data_lib.DataError) as info:
        with data_lib.convert_read_errors(pattern):
            next(iter(dataset))
    assert re.search(
        re.escape(f"Received: pattern={pattern!r}, where a record failed to read or decode: ")
        + r"Unknown image file format\.",
        str(info.value),
    )
    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, tf.errors.InvalidArgumentError)


def test_read_errors_keep_model_errors():
    model_error = tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [2] vs. [3]")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"^Incompatible shapes"):
        with data_lib.convert_read_errors("unused-*"):
            raise model_error


def test_make_dataset_rejects_bad_batch_size():
    with pytest.raises(ValueError, match=r"Received: batch_size=0"):
        data_lib.make_dataset(None, "train", batch_size=0)


FULL_DATASET_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    os.pardir, "shared", "datasets", "cifar10",
)


def test_make_sample_reproduces_embedded_files(tmp_path):
    if not os.path.isdir(FULL_DATASET_DIR):
        pytest.skip(f"full CIFAR-10 shards not found at {FULL_DATASET_DIR}")
    for split, per_class in make_sample.RECORDS_PER_CLASS.items():
        records, labels = make_sample.read_split(FULL_DATASET_DIR, split)
        indices = make_sample.select_balanced(labels, per_class, seed=20180430)
        path = str(tmp_path / f"{split}.tfrecord")
        make_sample.write_split(records, indices, path)
        with open(path, "rb") as regenerated, open(SAMPLE_FILES[split], "rb") as embedded:
            assert regenerated.read() == embedded.read(), split


def test_select_balanced_is_deterministic():
    labels = np.random.default_rng(1).integers(0, make_sample.NUM_CLASSES, size=2000)
    first = make_sample.select_balanced(labels, per_class=50, seed=3)
    second = make_sample.select_balanced(labels, per_class=50, seed=3)
    other_seed = make_sample.select_balanced(labels, per_class=50, seed=4)
    assert first == second
    assert first != other_seed
    assert len(set(first)) == 500
    counts = collections.Counter(labels[first].tolist())
    assert counts == {label: 50 for label in range(make_sample.NUM_CLASSES)}


def test_select_balanced_rejects_short_class():
    labels = np.repeat(np.arange(make_sample.NUM_CLASSES), 10)
    labels[labels == 9] = 8  # Class 9 now has no record.
    with pytest.raises(ValueError, match=r"counts of short classes=\{9: 0\}"):
        make_sample.select_balanced(labels, per_class=5, seed=0)


def test_cifar_cnn_builds_with_stock_layers():
    model = models.build_model("cifar_cnn")
    assert model.output_shape == (None, data_lib.NUM_CLASSES)
    assert model.input_shape == (None, 32, 32, 3)
    conv_layers = [layer for layer in model.layers if type(layer) is keras.layers.Conv2D]
    dense_layers = [layer for layer in model.layers if type(layer) is keras.layers.Dense]
    assert len(conv_layers) == 3
    assert len(dense_layers) == 1


def test_cifar_cnn_other_input_and_classes():
    model = models.build_model("cifar_cnn", input_shape=(64, 64, 1), num_classes=3)
    logits = model(np.zeros((2, 64, 64, 1), np.float32))
    assert logits.shape == (2, 3)


def test_registry_rejects_unknown_model():
    with pytest.raises(ValueError, match=r"Received: model='resnet1000'"):
        models.build_model("resnet1000")
