"""A small VGG-style CNN for 32x32 images.

Built from stock Keras layers only, so the global dtype policy decides how Conv2D and
Dense compute: INT16 dynamic fixed point under "dfp16", float32 under "float32".
"""

import keras

# Output channels of each 3x3 convolution, grouped by stage. Every stage ends with 2x2
# max pooling, so three stages take 32x32 inputs down to 4x4. The widths keep a dfp16
# epoch on the 5,000-image sample near 20 s on 2 cores with the portable INT16 kernels
# (about 6.0 million multiply-adds per image in the forward pass).
DEFAULT_STAGES = ((24,), (48,), (96,))


def _conv_bn_relu(x, filters, name):
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_cifar_cnn(
    input_shape=(32, 32, 3), num_classes=10, stages=DEFAULT_STAGES, dropout_rate=0.1
):
    """Build the functional model, which outputs logits (no softmax).

    Layout: per stage, one 3x3 conv-BN-ReLU block per entry of `stages` and 2x2 max
    pooling, then global average pooling, dropout and a Dense classifier.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for stage, stage_filters in enumerate(stages, start=1):
        for index, filters in enumerate(stage_filters, start=1):
            x = _conv_bn_relu(x, filters, name=f"stage{stage}_{index}")
        x = keras.layers.MaxPooling2D(2, name=f"stage{stage}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="cifar_cnn")
