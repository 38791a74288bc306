"""ResNet-50 v1.5 (He et al. 2016, "Deep Residual Learning for Image Recognition").

v1.5 differs from the paper's v1 in one place: a bottleneck block that halves the
resolution puts stride 2 on its 3x3 convolution instead of its first 1x1 convolution.
Each block computes 1x1 (width) -> 3x3 (width) -> 1x1 (4 x width), each convolution
followed by BatchNormalization, and adds a shortcut. The shortcut is the identity, or a
1x1 convolution with BatchNormalization where the shape changes. ReLU follows the add.

Layouts:
- "imagenet": 7x7 stride-2 convolution (64 filters) and 3x3 stride-2 max pooling, so the
  four stages run at 1/4, 1/8, 1/16 and 1/32 of the input size (56 to 7 for 224x224).
- "cifar": a 3x3 stride-1 convolution (64 filters) and no max pooling, so the stages run
  at 1/1, 1/2, 1/4 and 1/8 of the input size (32 to 4 for 32x32).
"""

import keras

from model_garden.models import _common

# (bottleneck width, number of blocks, stride of the first block) per stage.
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
EXPANSION = 4

# Smallest input height and width per layout: the total stride, so the last stage is at
# least 1x1.
MIN_INPUT_SIZE = {"imagenet": 32, "cifar": 8}


def _bottleneck(x, width, strides, name):
    shortcut = x
    out_channels = width * EXPANSION
    if strides != 1 or x.shape[-1] != out_channels:
        shortcut = _common.conv(x, out_channels, 1, f"{name}_shortcut_conv", strides=strides)
        shortcut = _common.batch_norm_layer(f"{name}_shortcut_bn")(shortcut)

    x = _common.conv_bn_relu(x, width, 1, f"{name}_1")
    x = _common.conv_bn_relu(x, width, 3, f"{name}_2", strides=strides)
    x = _common.conv(x, out_channels, 1, f"{name}_3_conv")
    x = _common.batch_norm_layer(f"{name}_3_bn")(x)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def build_resnet50(input_shape=(224, 224, 3), num_classes=1000, layout="auto"):
    """Build ResNet-50 v1.5, which outputs logits (no softmax).

    Args:
        input_shape: (height, width, channels) of the input images.
        num_classes: number of output logits.
        layout: "imagenet" (7x7 stride-2 stem and max pooling), "cifar" (3x3 stride-1
            stem, no max pooling) or "auto", which picks "cifar" for inputs smaller than
            64x64.

    Raises:
        ValueError: for an invalid argument or an input smaller than the layout allows.
    """
    layout = _common.resolve_layout(layout, input_shape)
    input_shape = _common.check_input_shape(
        input_shape, MIN_INPUT_SIZE[layout], _common.layout_size_fix(layout, MIN_INPUT_SIZE)
    )
    num_classes = _common.check_num_classes(num_classes)

    inputs = keras.Input(shape=input_shape, name="image")
    if layout == "imagenet":
        x = _common.conv_bn_relu(inputs, 64, 7, "stem", strides=2)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    else:
        x = _common.conv_bn_relu(inputs, 64, 3, "stem")

    for stage, (width, blocks, first_stride) in enumerate(STAGES, start=2):
        for block in range(1, blocks + 1):
            strides = first_stride if block == 1 else 1
            x = _bottleneck(x, width, strides, name=f"stage{stage}_block{block}")

    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet50")
