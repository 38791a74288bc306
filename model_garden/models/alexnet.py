"""AlexNet, single-tower form (Krizhevsky 2014, "One weird trick for parallelizing
convolutional neural networks").

Five convolutions of 64, 192, 384, 256 and 256 filters (kernels 11x11 stride 4, 5x5,
3x3, 3x3, 3x3), each followed by ReLU, with 3x3 stride-2 max pooling after the first,
second and fifth. Then Flatten, Dropout, Dense(4096), ReLU, Dropout, Dense(4096), ReLU
and Dense(num_classes). At 224x224 the last map is 6x6x256 and the model has 61,100,840
parameters for 1000 classes.

Differences from the two-tower network of Krizhevsky et al. 2012:
- Channel counts 64/192/384/256/256 instead of 96/256/384/384/256, with no grouped
  convolutions: grouped Conv2D has no dfp16 kernel yet. The 2012 counts without groups
  would give 62.4M parameters instead of about 61M.
- No local response normalization, because Keras has no LRN layer.

The "cifar" layout replaces the first convolution with a 3x3 stride-1 one, pads the
poolings ("same"), so 32x32 inputs end at 4x4x256, and uses Dense(1024) instead of
Dense(4096) in the classifier.
"""

import keras

from model_garden.models import _common

# (filters, kernel size, max pooling after this convolution) for convolutions 2 to 5.
CONVS = ((192, 5, True), (384, 3, False), (256, 3, False), (256, 3, True))
CONV1_FILTERS = 64

DENSE_UNITS = {"imagenet": 4096, "cifar": 1024}

# Smallest input height and width per layout. For "imagenet", the unpadded 11x11 stride-4
# convolution and three unpadded 3x3 stride-2 poolings leave a 1x1 map at 63x63; for
# "cifar", three padded stride-2 poolings divide the size by 8.
MIN_INPUT_SIZE = {"imagenet": 63, "cifar": 8}


def build_alexnet(
    input_shape=(224, 224, 3),
    num_classes=1000,
    layout="auto",
    dense_units=None,
    dropout_rate=0.5,
):
    """Build AlexNet, which outputs logits (no softmax).

    Args:
        input_shape: (height, width, channels) of the input images.
        num_classes: number of output logits.
        layout: "imagenet" (11x11 stride-4 first convolution), "cifar" (3x3 stride-1
            first convolution, padded poolings) or "auto", which picks "cifar" for
            inputs smaller than 64x64.
        dense_units: width of the two hidden Dense layers. None means 4096 for
            "imagenet" and 1024 for "cifar".
        dropout_rate: rate of the Dropout before each hidden Dense layer.

    Raises:
        ValueError: for an invalid argument or an input smaller than the layout allows.
    """
    layout = _common.resolve_layout(layout, input_shape)
    input_shape = _common.check_input_shape(
        input_shape, MIN_INPUT_SIZE[layout], _common.layout_size_fix(layout, MIN_INPUT_SIZE)
    )
    num_classes = _common.check_num_classes(num_classes)
    if dense_units is None:
        dense_units = DENSE_UNITS[layout]
    dense_units = _common.check_positive_int("dense_units", dense_units)
    dropout_rate = _common.check_rate("dropout_rate", dropout_rate)

    pool_padding = "valid" if layout == "imagenet" else "same"

    inputs = keras.Input(shape=input_shape, name="image")
    if layout == "imagenet":
        # Two pixels of zero padding make the first map 55x55 for 224x224 inputs.
        x = keras.layers.ZeroPadding2D(2, name="conv1_pad")(inputs)
        x = _common.conv_bn_relu(x, CONV1_FILTERS, 11, "conv1", strides=4, padding="valid",
                                 batch_norm=False)
    else:
        x = _common.conv_bn_relu(inputs, CONV1_FILTERS, 3, "conv1", batch_norm=False)
    x = keras.layers.MaxPooling2D(3, strides=2, padding=pool_padding, name="pool1")(x)

    for index, (filters, kernel_size, pool_after) in enumerate(CONVS, start=2):
        x = _common.conv_bn_relu(x, filters, kernel_size, f"conv{index}", batch_norm=False)
        if pool_after:
            x = keras.layers.MaxPooling2D(3, strides=2, padding=pool_padding,
                                          name=f"pool{index}")(x)

    x = keras.layers.Flatten(name="flatten")(x)
    for index in (6, 7):
        x = keras.layers.Dropout(dropout_rate, name=f"fc{index}_dropout")(x)
        x = keras.layers.Dense(dense_units, activation="relu", name=f"fc{index}")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="alexnet")
