"""SimpleNet (Hasanpour et al. 2016, "Lets keep it simple, Using simple architectures to
outperform deeper and more complex architectures").

Thirteen convolutions, each followed by BatchNormalization and ReLU (no bias, because
the norm's beta replaces it): 3x3 convolutions of 64, 128, 128, 128, 128, 128, 256, 256,
256 and 512 filters, 1x1 convolutions of 2048 and 256 filters, and a last 3x3
convolution of 256 filters. 2x2 max pooling follows convolutions 4, 7, 9, 12 and 13, and
Dropout follows each of these five poolings. Global average pooling and a Dense layer
give the logits.

At 32x32 the five poolings bring the maps to 1x1. The convolution and Dense weights
number 5,484,746 for 10 classes, which matches the 5.48M quoted for SimpleNet.
BatchNormalization adds 9,088 trainable and 9,088 non-trainable values, so Keras's
count_params() returns 5,502,922.
"""

import keras

from model_garden.models import _common

# (filters, kernel size, max pooling after this convolution) for the 13 convolutions.
LAYERS = (
    (64, 3, False),
    (128, 3, False),
    (128, 3, False),
    (128, 3, True),
    (128, 3, False),
    (128, 3, False),
    (256, 3, True),
    (256, 3, False),
    (256, 3, True),
    (512, 3, False),
    (2048, 1, False),
    (256, 1, True),
    (256, 3, True),
)

# Five 2x2 poolings halve the maps five times, so 32x32 ends at 1x1.
MIN_INPUT_SIZE = 32


def build_simplenet(input_shape=(224, 224, 3), num_classes=1000, dropout_rate=0.2):
    """Build SimpleNet, which outputs logits (no softmax).

    The same 13-layer network serves every input size of at least 32x32, because global
    average pooling feeds the classifier.

    Args:
        input_shape: (height, width, channels) of the input images.
        num_classes: number of output logits.
        dropout_rate: rate of the Dropout after each of the five max poolings.

    Raises:
        ValueError: for an invalid argument or an input smaller than 32x32.
    """
    input_shape = _common.check_input_shape(input_shape, MIN_INPUT_SIZE)
    num_classes = _common.check_num_classes(num_classes)
    dropout_rate = _common.check_rate("dropout_rate", dropout_rate)

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    pool_index = 0
    for index, (filters, kernel_size, pool_after) in enumerate(LAYERS, start=1):
        x = _common.conv_bn_relu(x, filters, kernel_size, f"block{index}")
        if pool_after:
            pool_index += 1
            x = keras.layers.MaxPooling2D(2, name=f"pool{pool_index}")(x)
            x = keras.layers.Dropout(dropout_rate, name=f"dropout{pool_index}")(x)

    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="simplenet")
