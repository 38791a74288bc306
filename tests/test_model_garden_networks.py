"""Tests of the model-garden networks: parameter counts, shapes, arguments, dfp16 training."""

import gc

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_dfp  # Registers the "dfp16" policy.
from model_garden import models
from model_garden.models import googlenet

NETWORKS = ("resnet50", "googlenet", "vgg16", "alexnet", "simplenet")

# Exact counts at the published configuration: (input size, classes, Keras count_params(),
# trainable parameters). count_params() includes the BatchNormalization moving mean and
# variance, which are not trainable.
PUBLISHED_COUNTS = {
    "resnet50": (224, 1000, 25_610_152, 25_557_032),
    "googlenet": (224, 1000, 6_998_552, 6_998_552),
    "vgg16": (224, 1000, 138_357_544, 138_357_544),
    "alexnet": (224, 1000, 61_100_840, 61_100_840),
    "simplenet": (32, 10, 5_502_922, 5_493_834),
}

# Approximate figures that the literature quotes, with the relative tolerance of each
# comparison. GoogLeNet as built from the 2015 paper's filter counts has 2.9% more
# parameters than the quoted 6.8M. The SimpleNet figure matches the Conv2D and Dense
# weights without the BatchNormalization values.
PUBLISHED_FIGURES = {
    "resnet50": (25.6e6, 0.01),
    "googlenet": (6.8e6, 0.035),
    "vgg16": (138e6, 0.01),
    "alexnet": (61e6, 0.01),
    "simplenet": (5.48e6, 0.01),
}


@pytest.fixture(autouse=True)
def float32_policy_and_free_memory():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy(previous)
    keras.backend.clear_session()
    gc.collect()


def _conv_and_dense_weights(model):
    layers = [
        layer for layer in model.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
    ]
    return sum(int(np.prod(weight.shape)) for layer in layers for weight in layer.weights)


def _trainable_count(model):
    return sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)


@pytest.mark.parametrize("name", NETWORKS)
def test_parameter_count_published_config(name):
    size, num_classes, total, trainable = PUBLISHED_COUNTS[name]
    model = models.build_model(name, input_shape=(size, size, 3), num_classes=num_classes)
    assert model.name == name
    assert model.output_shape == (None, num_classes)
    assert model.count_params() == total
    assert _trainable_count(model) == trainable

    figure, tolerance = PUBLISHED_FIGURES[name]
    counted = _conv_and_dense_weights(model) if name == "simplenet" else trainable
    assert abs(counted - figure) <= tolerance * figure, counted


def test_simplenet_conv_and_dense_weights():
    model = models.build_model("simplenet", input_shape=(32, 32, 3), num_classes=10)
    assert _conv_and_dense_weights(model) == 5_484_746


@pytest.mark.parametrize("name", NETWORKS)
def test_cifar_input_forward_shape(name):
    keras.utils.set_random_seed(3)
    model = models.build_model(name, input_shape=(32, 32, 3), num_classes=10)
    images = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    logits = model(images, training=False)
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits.numpy()))


@pytest.mark.parametrize("name", ["resnet50", "googlenet", "alexnet", "simplenet"])
def test_imagenet_input_other_class_count(name):
    # VGG-16 at 224x224 is covered by the published-count test, which builds its 550 MB
    # of weights once.
    model = models.build_model(name, input_shape=(224, 224, 3), num_classes=37)
    assert model.input_shape == (None, 224, 224, 3)
    assert model.output_shape == (None, 37)


def test_vgg16_grayscale_other_class_count():
    model = models.build_model("vgg16", input_shape=(48, 40, 1), num_classes=5)
    assert model.output_shape == (None, 5)
    assert model.get_layer("fc1").units == 512


def test_layout_auto_picks_stem_by_input_size():
    small = models.build_model("resnet50", input_shape=(63, 63, 3), num_classes=10)
    large = models.build_model("resnet50", input_shape=(64, 64, 3), num_classes=10)
    assert small.get_layer("stem_conv").kernel_size == (3, 3)
    assert large.get_layer("stem_conv").kernel_size == (7, 7)
    assert "stem_pool" not in [layer.name for layer in small.layers]
    assert "stem_pool" in [layer.name for layer in large.layers]


def test_resnet50_strides_on_3x3_conv():
    model = models.build_model("resnet50", input_shape=(224, 224, 3), num_classes=10)
    assert model.get_layer("stage3_block1_1_conv").strides == (1, 1)
    assert model.get_layer("stage3_block1_2_conv").strides == (2, 2)
    assert model.get_layer("stage3_block1_shortcut_conv").strides == (2, 2)
    assert model.get_layer("stage5_block3_out").output.shape == (None, 7, 7, 2048)


def test_alexnet_smallest_imagenet_input():
    model = models.build_model("alexnet", input_shape=(63, 63, 3), num_classes=10,
                               layout="imagenet")
    assert model.get_layer("pool5").output.shape == (None, 1, 1, 256)
    pattern = (
        r"at least 63 pixels\. Received: input_shape=\(62, 62, 3\)\. "
        r"Resize the images, or pass layout='cifar', which accepts 8x8 and up\."
    )
    with pytest.raises(ValueError, match=pattern):
        models.build_model("alexnet", input_shape=(62, 62, 3), num_classes=10,
                           layout="imagenet")


def test_registry_lists_networks():
    for name in NETWORKS:
        builder = models.get_builder(name)
        assert builder.__name__ == f"build_{name}"
    assert models.get_builder("cifar_cnn").__name__ == "build_cifar_cnn"


@pytest.mark.parametrize(
    "name, arguments, pattern",
    [
        ("resnet50", {"num_classes": 0}, r"Expected num_classes to be an int >= 1\. Received: num_classes=0\."),
        ("simplenet", {"num_classes": True}, r"Received: num_classes=True\."),
        ("vgg16", {"input_shape": (16, 16, 3)},
         r"at least 32 pixels\. Received: input_shape=\(16, 16, 3\)\. Resize the images\.$"),
        ("alexnet", {"input_shape": (224, 224)}, r"Received: input_shape=\(224, 224\)\. Pass \(height, width, channels\)"),
        ("googlenet", {"layout": "mnist"}, r"Expected layout to be one of .*Received: layout='mnist'"),
        ("googlenet", {"aux_logits": "yes"}, r"Received: aux_logits='yes'"),
        ("googlenet", {"aux_logits": True, "input_shape": (64, 64, 3), "layout": "imagenet"},
         r"at least 80 pixels.*Received: input_shape=\(64, 64, 3\).*which accepts 10x10"),
        ("simplenet", {"dropout_rate": 1.0}, r"Expected dropout_rate to be a number in \[0, 1\)\. Received: dropout_rate=1\.0"),
        ("alexnet", {"dense_units": 0}, r"Received: dense_units=0\."),
    ],
)
def test_invalid_argument_raises(name, arguments, pattern):
    with pytest.raises(ValueError, match=pattern):
        models.build_model(name, **arguments)


def test_unknown_option_raises_type_error():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'aux_logits'"):
        models.build_model("vgg16", aux_logits=True)


def test_googlenet_aux_heads_train_with_loss_weights():
    keras.utils.set_random_seed(5)
    model = models.build_model("googlenet", input_shape=(32, 32, 3), num_classes=10,
                               aux_logits=True)
    assert [output.shape for output in model.outputs] == [(None, 10)] * 3

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=[loss, loss, loss],
        loss_weights=list(googlenet.LOSS_WEIGHTS),
    )
    images = np.random.default_rng(5).normal(size=(4, 32, 32, 3)).astype(np.float32)
    labels = np.array([0, 3, 7, 9], np.int32)
    losses = model.train_on_batch(images, (labels, labels, labels), return_dict=True)
    for value in losses.values():
        assert np.isfinite(value)
    weighted_sum = (
        googlenet.LOSS_WEIGHTS[0] * losses["logits_loss"]
        + googlenet.LOSS_WEIGHTS[1] * losses["aux1_logits_loss"]
        + googlenet.LOSS_WEIGHTS[2] * losses["aux2_logits_loss"]
    )
    np.testing.assert_allclose(losses["loss"], weighted_sum, rtol=1e-5)

    inference = keras.Model(model.inputs, model.outputs[0])
    assert inference.output_shape == (None, 10)
    assert inference.count_params() < model.count_params()


@pytest.mark.parametrize("name", NETWORKS)
def test_networks_build_under_dfp16(name):
    # Building under dfp16 runs keras_dfp's checks, which reject layer options that have
    # no INT16 kernel, so this fails if a builder uses one.
    keras.config.set_dtype_policy("dfp16")
    model = models.build_model(name, input_shape=(32, 32, 3), num_classes=10)
    conv_and_dense = [
        layer for layer in model.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
    ]
    assert conv_and_dense
    for layer in conv_and_dense:
        assert isinstance(layer.dtype_policy, keras_dfp.DFPPolicy), layer.name


def test_simplenet_dfp16_training_step():
    keras.config.set_dtype_policy("dfp16")
    keras.utils.set_random_seed(11)
    model = models.build_model("simplenet", input_shape=(32, 32, 3), num_classes=10)
    rng = np.random.default_rng(11)
    images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=8).astype(np.int32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(0.01)
    initial = [variable.numpy().copy() for variable in model.trainable_variables]

    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(images, training=True))
    gradients = tape.gradient(loss, model.trainable_variables)
    optimizer.apply(gradients, model.trainable_variables)

    assert np.isfinite(loss.numpy())
    for variable, gradient in zip(model.trainable_variables, gradients):
        assert gradient is not None, variable.path
        assert np.all(np.isfinite(gradient.numpy())), variable.path
    changed = [
        not np.array_equal(variable.numpy(), before)
        for variable, before in zip(model.trainable_variables, initial)
    ]
    assert all(changed)
