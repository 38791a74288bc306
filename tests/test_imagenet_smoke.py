"""Tests of benchmarks/imagenet_nets_smoke.py on a small network and input size."""

import gc
import importlib.util
import math
import os

import keras
import numpy as np
import pytest

import keras_dfp  # Registers the "dfp16" policy.
from keras_dfp import ops

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "imagenet_nets_smoke.py")

# AlexNet's ImageNet layout accepts 63x63 and up, and builders pick it from 64x64 on.
IMAGE_SIZE = 64


def _load_script():
    spec = importlib.util.spec_from_file_location("imagenet_nets_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


smoke = _load_script()


@pytest.fixture(autouse=True)
def float32_policy_and_free_memory():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy(previous)
    keras.backend.clear_session()
    gc.collect()


def test_load_images_seeded_and_resized():
    images, labels = smoke.load_images("", 4, IMAGE_SIZE, seed=3)
    again_images, again_labels = smoke.load_images("", 4, IMAGE_SIZE, seed=3)
    other_images, _ = smoke.load_images("", 4, IMAGE_SIZE, seed=4)

    assert images.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert images.dtype == np.float32
    assert labels.dtype == np.int32
    assert np.all((labels >= 0) & (labels <= 9))
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(labels, again_labels)
    assert not np.array_equal(images, other_images)
    # Standardized pixels: the mean over a few images is near 0, not near 0.5 or 128.
    assert abs(float(images.mean())) < 1.0


def test_load_images_rejects_too_many():
    with pytest.raises(ValueError, match=r"Received: num_images=1001"):
        smoke.load_images("", 1001, IMAGE_SIZE, seed=0)


def test_run_model_alexnet_finite_losses():
    images, labels = smoke.load_images("", 4, IMAGE_SIZE, seed=0)

    result = smoke.run_model("alexnet", images, labels, steps=3, batch_size=4)

    assert len(result["losses"]) == 3
    assert len(result["seconds"]) == 3
    assert all(math.isfinite(loss) for loss in result["losses"])
    assert result["nonfinite_count"] == 0
    assert result["first_loss"] == pytest.approx(np.mean(result["losses"]))
    assert result["params"] > 1_000_000
    assert result["input_shape"] == [IMAGE_SIZE, IMAGE_SIZE, 3]
    assert result["optimizer"].startswith("sgd lr=0.000156")  # 0.01 * 4 / 256
    assert result["kernel_path"] in ops.supported_kernel_paths()
    assert keras.config.dtype_policy().name == "float32"


def test_run_model_rejects_batch_larger_than_set():
    images = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    labels = np.zeros((2,), np.int32)
    with pytest.raises(ValueError, match=r"Received: batch_size=4"):
        smoke.run_model("alexnet", images, labels, steps=3, batch_size=4)


def _result(losses):
    return {
        "model": "alexnet",
        "steps": len(losses),
        "first_loss": float(np.mean(losses[:3])),
        "last_loss": float(np.mean(losses[-3:])),
        "nonfinite_count": sum(1 for loss in losses if not math.isfinite(loss)),
    }


def test_find_problems_falling_loss_passes():
    assert smoke.find_problems(_result([2.4, 2.3, 2.2, 2.0, 1.9, 1.8])) == []


def test_find_problems_nan_loss():
    problems = smoke.find_problems(_result([2.4, 2.3, math.nan, 2.0, 1.9, 1.8]))
    assert problems == ["alexnet: 1 of 6 step losses are not finite."]


def test_find_problems_flat_loss():
    problems = smoke.find_problems(_result([2.3] * 6))
    assert len(problems) == 1
    assert "the loss did not fall" in problems[0]
