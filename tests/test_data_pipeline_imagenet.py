"""Tests of class-folder data, the imagenet preprocessing and --num_classes."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from model_garden import data as data_lib
from model_garden.data import preprocessing

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_image(path, height, width, seed):
    """Write a seeded random RGB image as JPEG or PNG, chosen by the file extension."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if path.suffix.lower() == ".png":
        encoded = tf.io.encode_png(pixels)
    else:
        encoded = tf.io.encode_jpeg(pixels)
    path.write_bytes(encoded.numpy())


def _make_class_folders(root, classes=("zebra", "ant", "moth"), train_per_class=4,
                        eval_per_class=2, eval_folder="test"):
    """Write train/<class>/ and <eval_folder>/<class>/ images of mixed sizes and formats."""
    seed = 0
    for folder, per_class in (("train", train_per_class), (eval_folder, eval_per_class)):
        for name in classes:
            class_dir = root / folder / name
            class_dir.mkdir(parents=True)
            for index in range(per_class):
                extension = ".png" if index % 2 else ".JPG"
                _write_image(class_dir / f"{index:02d}{extension}", 20 + 3 * index, 30, seed)
                seed += 1
    return root


def _collect(dataset):
    images = []
    labels = []
    for image_batch, label_batch in dataset:
        images.append(image_batch.numpy())
        labels.append(label_batch.numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_class_folders_labels_follow_sorted_names(tmp_path):
    _make_class_folders(tmp_path)
    info = data_lib.read_split(str(tmp_path), "train")
    assert info.data_format == "class_folders"
    assert info.class_names == ("ant", "moth", "zebra")
    assert info.num_classes == 3
    assert info.num_records == 12
    for path, label in zip(info.files, info.labels):
        assert os.path.basename(os.path.dirname(path)) == info.class_names[label]
    # Records take one image of every class in turn, so a prefix spreads over classes.
    assert info.labels[:3] == (0, 1, 2)


def test_class_folders_max_records_keeps_classes(tmp_path):
    _make_class_folders(tmp_path)
    info = data_lib.read_split(str(tmp_path), "train", max_records=6)
    assert info.num_records == 6
    assert sorted(info.labels) == [0, 0, 1, 1, 2, 2]


def test_class_folders_val_without_test(tmp_path):
    _make_class_folders(tmp_path, eval_folder="val")
    info = data_lib.read_split(str(tmp_path), "test")
    assert info.pattern == str(tmp_path / "val" / "*" / "*")
    assert info.num_records == 6
    assert info.labels == (0, 1, 2, 0, 1, 2)


@pytest.mark.parametrize("recipe, size", [("cifar", 16), ("imagenet", 24)])
@pytest.mark.parametrize("split", ["train", "test"])
def test_class_folder_batches_shape_and_range(tmp_path, recipe, size, split):
    _make_class_folders(tmp_path)
    dataset = data_lib.make_dataset(
        str(tmp_path), split, batch_size=4, standardize=False, seed=1,
        preprocessing=recipe, image_size=size,
    )
    images, labels = _collect(dataset)
    expected_records = 12 if split == "train" else 6
    assert images.shape == (expected_records, size, size, 3)
    assert images.dtype == np.float32
    assert labels.dtype == np.int32
    assert images.min() >= 0.0
    assert images.max() <= 1.0
    assert sorted(labels.tolist()) == sorted([0, 1, 2] * (expected_records // 3))


def test_imagenet_same_seed_same_batches(tmp_path):
    _make_class_folders(tmp_path)

    def batches(seed):
        return _collect(data_lib.make_dataset(
            str(tmp_path), "train", batch_size=4, seed=seed, preprocessing="imagenet",
            image_size=16,
        ))

    images_first, labels_first = batches(5)
    images_second, labels_second = batches(5)
    images_other, _ = batches(6)
    np.testing.assert_array_equal(labels_first, labels_second)
    np.testing.assert_array_equal(images_first, images_second)
    assert not np.array_equal(images_first, images_other)


def test_imagenet_upscales_cifar_records():
    dataset = data_lib.make_dataset(
        None, "train", batch_size=4, seed=0, max_records=8, preprocessing="imagenet",
        image_size=64,
    )
    images, labels = _collect(dataset)
    assert images.shape == (8, 64, 64, 3)
    assert np.all(np.isfinite(images))
    assert set(labels.tolist()) <= set(range(10))


def test_imagenet_standardizes_with_imagenet_statistics():
    color = np.array([200, 100, 50], np.uint8)
    image = tf.constant(np.broadcast_to(color, (40, 50, 3)))
    cropped = preprocessing.center_crop_for_eval(image, 16)
    normalized = preprocessing.normalize(
        cropped, True, preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD
    ).numpy()
    expected = (color / 255.0 - np.array(preprocessing.IMAGENET_MEAN)) / np.array(
        preprocessing.IMAGENET_STD
    )
    assert normalized.shape == (16, 16, 3)
    np.testing.assert_allclose(normalized, np.broadcast_to(expected, (16, 16, 3)), rtol=1e-6)


def test_cache_modes_give_same_batches():
    def batches(cache):
        return _collect(data_lib.make_dataset(
            None, "train", batch_size=32, seed=4, max_records=128, cache=cache
        ))

    images_cached, labels_cached = batches("decoded")
    images_uncached, labels_uncached = batches("none")
    np.testing.assert_array_equal(labels_cached, labels_uncached)
    np.testing.assert_array_equal(images_cached, images_uncached)


def _gradient_image(height, width):
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pixels = (rows * 16 + cols).astype(np.uint8)
    return np.stack([pixels, pixels, pixels], axis=-1)


def test_center_crop_geometry():
    image = _gradient_image(10, 14)
    cropped = preprocessing.center_crop(tf.constant(image), 6).numpy()
    np.testing.assert_array_equal(cropped, image[2:8, 4:10])


def test_eval_crop_takes_center_after_resize():
    # eval_resize_size(8) is round(8 * 256 / 224) = 9, the shorter side of the image, so
    # no resize happens and the crop is rows 0-7 and columns 2-9.
    assert preprocessing.eval_resize_size(8) == 9
    assert preprocessing.eval_resize_size(224) == 256
    image = _gradient_image(9, 13)
    cropped = preprocessing.center_crop_for_eval(tf.constant(image), 8).numpy()
    np.testing.assert_array_equal(cropped, image[0:8, 2:10])


def test_eval_resize_keeps_aspect_ratio():
    image = tf.zeros((18, 26, 3), tf.uint8)
    resized = preprocessing.resize_shorter_side(image, 9)
    assert tuple(resized.shape) == (9, 13, 3)
    upscaled = preprocessing.resize_shorter_side(tf.zeros((32, 32, 3), tf.uint8), 256)
    assert tuple(upscaled.shape) == (256, 256, 3)


def test_random_crop_window_bounds():
    height, width = 60, 90
    area = height * width
    whole_image = 0
    for seed in range(200):
        offset, size = preprocessing.sample_crop_window(
            tf.constant([height, width, 3]), tf.constant([seed, 11], tf.int64)
        )
        top, left, _ = offset.numpy().tolist()
        crop_height, crop_width, _ = size.numpy().tolist()
        assert top >= 0
        assert left >= 0
        assert top + crop_height <= height
        assert left + crop_width <= width
        if (crop_height, crop_width) == (height, width):
            whole_image += 1  # The fallback after CROP_MAX_ATTEMPTS failed samples.
            continue
        # Allow one pixel of rounding in each side.
        assert (crop_height + 1) * (crop_width + 1) >= 0.08 * area
        assert (crop_width + 1) / max(crop_height - 1, 1) >= 3 / 4
        assert (crop_width - 1) / (crop_height + 1) <= 4 / 3
    assert whole_image < 20


def test_random_resized_crop_output():
    image = tf.constant(_gradient_image(30, 40))
    seed = tf.constant([3, 9], tf.int64)
    first = preprocessing.random_resized_crop(image, seed, 12).numpy()
    second = preprocessing.random_resized_crop(image, seed, 12).numpy()
    other = preprocessing.random_resized_crop(
        image, tf.constant([4, 9], tf.int64), 12
    ).numpy()
    assert first.shape == (12, 12, 3)
    assert first.dtype == np.float32
    assert first.min() >= 0.0
    assert first.max() <= 255.0
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_class_folders_reject_no_class_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(data_lib.DataError, match=r"whose train folder contains no subfolder"):
        data_lib.read_split(str(tmp_path), "train")


def test_class_folders_reject_class_only_in_test(tmp_path):
    _make_class_folders(tmp_path)
    (tmp_path / "test" / "wasp").mkdir()
    _write_image(tmp_path / "test" / "wasp" / "00.png", 8, 8, 99)
    with pytest.raises(data_lib.DataError, match=re.escape("classes only in test=['wasp']")):
        data_lib.read_split(str(tmp_path), "test")


def test_class_folders_reject_empty_class(tmp_path):
    _make_class_folders(tmp_path)
    empty = tmp_path / "train" / "bee"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here", encoding="utf-8")
    with pytest.raises(data_lib.DataError) as info:
        data_lib.read_split(str(tmp_path), "train")
    assert re.search(re.escape(f"1 folder(s) without one: [{str(empty)!r}]"), str(info.value))


def test_class_folders_reject_missing_eval_folder(tmp_path):
    _make_class_folders(tmp_path)
    (tmp_path / "test").rename(tmp_path / "holdout")
    with pytest.raises(data_lib.DataError, match=r"Expected a test or val folder"):
        data_lib.read_split(str(tmp_path), "test")


def test_corrupt_image_error_names_file(tmp_path):
    _make_class_folders(tmp_path)
    corrupt = tmp_path / "train" / "moth" / "01.png"
    corrupt.write_bytes(b"not an image at all")
    info = data_lib.read_split(str(tmp_path), "train")
    dataset = data_lib.dataset_from_split(info, batch_size=4, cache="none")
    with pytest.raises(data_lib.DataError) as error:
        with data_lib.convert_read_errors(info.pattern, info.data_format):
            _collect(dataset)
    message = str(error.value)
    assert re.search(re.escape(f"Received: file={corrupt}, which starts with neither"), message)
    assert "Replace or delete that file" in message
    assert "\n" not in message


def test_num_classes_rejects_smaller_than_folders(tmp_path):
    _make_class_folders(tmp_path)
    with pytest.raises(data_lib.DataError, match=r"num_classes=2 for .*which has 3 class folders"):
        data_lib.read_split(str(tmp_path), "train", num_classes=2)


def _write_labeled_records(path, labels):
    encoded = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()
    with tf.io.TFRecordWriter(str(path)) as writer:
        for label in labels:
            example = tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
                "image/class/label": tf.train.Feature(
                    int64_list=tf.train.Int64List(value=[label])
                ),
            }))
            writer.write(example.SerializeToString())


def test_tfrecord_labels_above_num_classes(tmp_path):
    _write_labeled_records(tmp_path / "train-0.tfrecord", [0, 12, 3])
    with pytest.raises(data_lib.DataError) as info:
        data_lib.read_split(str(tmp_path), "train")
    assert re.search(
        r"Expected image/class/label in \[0, 9\] for num_classes=10\. .*labels range "
        r"from 0 to 12\. Pass num_classes=13",
        str(info.value),
    )
    info = data_lib.read_split(str(tmp_path), "train", num_classes=13)
    assert info.num_classes == 13
    assert info.num_records == 3


def test_tfrecord_png_records_decode(tmp_path):
    _write_labeled_records(tmp_path / "train-0.tfrecord", [1, 2])
    images, labels = _collect(data_lib.make_dataset(
        str(tmp_path), "train", batch_size=2, training=False, standardize=False,
        preprocessing="imagenet", image_size=8,
    ))
    assert images.shape == (2, 8, 8, 3)
    assert labels.tolist() == [1, 2]
    assert np.all(images == 0.0)


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "model_garden.train", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )


def test_cli_trains_on_class_folders(tmp_path):
    data_dir = _make_class_folders(tmp_path / "data", train_per_class=6)
    model_dir = tmp_path / "run"
    result = _run_cli(
        "--model=cifar_cnn", f"--data={data_dir}", "--epochs=1", "--batch_size=6",
        "--preprocessing=imagenet", "--image_size=40", "--num_classes=4", "--seed=2",
        "--verbose=0", f"--model_dir={model_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    with open(model_dir / "summary.json", encoding="utf-8") as summary_file:
        summary = json.load(summary_file)
    assert summary["data_format"] == "class_folders"
    assert summary["num_classes"] == 4
    assert summary["class_names"] == ["ant", "moth", "zebra"]
    assert summary["preprocessing"] == "imagenet"
    assert summary["image_size"] == 40
    assert summary["train_samples"] == 18
    assert summary["test_samples"] == 6
    assert summary["steps_per_epoch"] == 3
    assert np.isfinite(summary["test_loss"])

    import keras_dfp  # pylint: disable=import-outside-toplevel,unused-import

    loaded = keras.models.load_model(model_dir / "cifar_cnn.keras")
    logits = loaded(np.zeros((2, 40, 40, 3), np.float32), training=False)
    assert logits.shape == (2, 4)


@pytest.mark.parametrize("recipe, size, expected", [
    (None, None, ("cifar", 32)),
    ("imagenet", None, ("imagenet", 224)),
    (None, 224, ("imagenet", 224)),
    (None, 48, ("cifar", 48)),
    ("cifar", 96, ("cifar", 96)),
])
def test_preprocessing_defaults_follow_image_size(recipe, size, expected):
    from model_garden import train  # pylint: disable=import-outside-toplevel

    assert train._resolve_preprocessing(recipe, size) == expected  # pylint: disable=protected-access


def test_class_folders_skip_hidden_folders(tmp_path):
    _make_class_folders(tmp_path)
    hidden = tmp_path / "train" / ".ipynb_checkpoints"
    hidden.mkdir()
    _write_image(hidden / "00.jpg", 20, 30, seed=99)
    info = data_lib.read_split(str(tmp_path), "train")
    assert info.class_names == ("ant", "moth", "zebra")
    assert info.num_records == 12


def test_cli_keeps_model_when_evaluation_fails(tmp_path):
    data_dir = _make_class_folders(tmp_path / "data", train_per_class=6)
    (data_dir / "test" / "ant" / "99.png").write_bytes(b"not an image at all")
    model_dir = tmp_path / "run"
    result = _run_cli(
        "--model=cifar_cnn", "--policy=float32", f"--data={data_dir}", "--epochs=1",
        "--batch_size=6", "--verbose=0", f"--model_dir={model_dir}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "99.png" in result.stderr
    assert (model_dir / "cifar_cnn.keras").is_file()
    assert not (model_dir / "summary.json").exists()


def test_cli_optimizer_switch_needs_learning_rate(tmp_path):
    result = _run_cli(
        "--model=resnet50", "--optimizer=adam", "--policy=float32", "--epochs=1",
        f"--model_dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    assert "Expected --learning_rate with --optimizer=adam" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_resume_rejects_finished_epochs(tmp_path):
    backup_dir = tmp_path / "run" / "backup"
    backup_dir.mkdir(parents=True)
    (backup_dir / "training_metadata.json").write_text('{"epoch": 3, "batch": -1}')
    result = _run_cli(
        "--policy=float32", "--epochs=2", "--resume", "--max_train_records=64",
        f"--model_dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    assert "Expected --epochs above the 3 epoch(s)" in result.stderr
    assert "Received: --epochs=2" in result.stderr
