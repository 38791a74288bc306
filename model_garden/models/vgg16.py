"""VGG-16, configuration D of Simonyan and Zisserman 2015 ("Very Deep Convolutional
Networks for Large-Scale Image Recognition").

Thirteen 3x3 convolutions with ReLU in five stages of 64, 128, 256, 512 and 512 filters,
each stage ending with 2x2 max pooling, then the classifier. Classifiers per layout:
- "imagenet": Flatten, Dense(4096), ReLU, Dropout, Dense(4096), ReLU, Dropout,
  Dense(num_classes). At 224x224 the flattened map is 7x7x512, and the model has
  138,357,544 parameters for 1000 classes.
- "cifar": Flatten, Dense(512), ReLU, Dropout, Dense(num_classes). At 32x32 the
  flattened map is 1x1x512.

`batch_norm=True` builds the VGG-16-BN variant: BatchNormalization between every
convolution and its ReLU, and convolutions without bias.
"""

import keras

from model_garden.models import _common

# Filters of the 3x3 convolutions, per stage.
STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

CLASSIFIER_UNITS = {"imagenet": 4096, "cifar": 512}
CLASSIFIER_LAYERS = {"imagenet": 2, "cifar": 1}

# Five 2x2 poolings halve the maps five times, so 32x32 ends at 1x1.
MIN_INPUT_SIZE = 32


def build_vgg16(
    input_shape=(224, 224, 3),
    num_classes=1000,
    layout="auto",
    batch_norm=False,
    dropout_rate=0.5,
):
    """Build VGG-16, which outputs logits (no softmax).

    Args:
        input_shape: (height, width, channels) of the input images.
        num_classes: number of output logits.
        layout: "imagenet" (two Dense(4096) layers), "cifar" (one Dense(512) layer) or
            "auto", which picks "cifar" for inputs smaller than 64x64.
        batch_norm: if True, put BatchNormalization after every convolution.
        dropout_rate: rate of the Dropout after each hidden Dense layer.

    Raises:
        ValueError: for an invalid argument or an input smaller than 32x32.
    """
    layout = _common.resolve_layout(layout, input_shape)
    input_shape = _common.check_input_shape(input_shape, MIN_INPUT_SIZE)
    num_classes = _common.check_num_classes(num_classes)
    batch_norm = _common.check_bool("batch_norm", batch_norm)
    dropout_rate = _common.check_rate("dropout_rate", dropout_rate)

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for stage, stage_filters in enumerate(STAGES, start=1):
        for index, filters in enumerate(stage_filters, start=1):
            x = _common.conv_bn_relu(x, filters, 3, f"stage{stage}_{index}",
                                     batch_norm=batch_norm)
        x = keras.layers.MaxPooling2D(2, name=f"stage{stage}_pool")(x)

    x = keras.layers.Flatten(name="flatten")(x)
    for index in range(1, CLASSIFIER_LAYERS[layout] + 1):
        x = keras.layers.Dense(CLASSIFIER_UNITS[layout], activation="relu", name=f"fc{index}")(x)
        x = keras.layers.Dropout(dropout_rate, name=f"fc{index}_dropout")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="vgg16")
