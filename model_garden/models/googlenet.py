"""GoogLeNet, also called Inception v1 (Szegedy et al. 2015, "Going Deeper with
Convolutions").

Nine Inception modules, each of which concatenates four branches: a 1x1 convolution; a
1x1 reduction then a 3x3 convolution; a 1x1 reduction then a 5x5 convolution; and 3x3
max pooling (stride 1) then a 1x1 projection. Every convolution is followed by ReLU.

Differences from the 2015 network:
- No local response normalization (LRN) after the stem's first pooling and its 3x3
  convolution, because Keras has no LRN layer. `batch_norm=True` puts
  BatchNormalization after every convolution in its place (and drops the convolution
  biases, which the norm's beta replaces).
- The "cifar" layout replaces the 7x7 stride-2 stem convolution with a 3x3 stride-1
  one and drops the two stem max poolings, so the modules run at 1/1, 1/2 and 1/4 of
  the input size (32, 16 and 8 for 32x32) instead of 1/8, 1/16 and 1/32.

Auxiliary classifiers (`aux_logits=True`): after modules 4a and 4d, 5x5 average pooling
with stride 3, a 1x1 convolution of 128 filters with ReLU, Dense(1024) with ReLU,
Dropout(0.7) and Dense(num_classes). The model then returns three logit tensors,
[main, aux after 4a, aux after 4d]. Train it with one loss per output and the weights
`LOSS_WEIGHTS` (the paper weights each auxiliary loss by 0.3), and repeat the labels for
each output:

    model.compile(optimizer, loss=[ce, ce, ce], loss_weights=list(googlenet.LOSS_WEIGHTS))
    model.fit(dataset.map(lambda images, labels: (images, (labels, labels, labels))))

For inference, keep only the main output, which shares all weights with the training
model: `keras.Model(model.inputs, model.outputs[0])`.
"""

import keras

from model_garden.models import _common

# Output filters per module: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection).
MODULES = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}

# Loss weights of the outputs [main, aux after 4a, aux after 4d] when aux_logits=True.
LOSS_WEIGHTS = (1.0, 0.3, 0.3)

# Stride of the feature map at module 4a relative to the input, per layout.
_STRIDE_AT_4A = {"imagenet": 16, "cifar": 2}

# Smallest input height and width per layout: the total stride, so the last modules run
# on at least 1x1 maps.
MIN_INPUT_SIZE = {"imagenet": 32, "cifar": 4}

# The auxiliary heads pool 5x5 windows, so module 4a needs maps of at least 5x5.
_AUX_POOL_SIZE = 5


def _conv(x, filters, kernel_size, name, batch_norm, strides=1):
    return _common.conv_bn_relu(x, filters, kernel_size, name, strides=strides,
                                batch_norm=batch_norm)


def _inception(x, name, batch_norm):
    filters_1x1, reduce_3x3, filters_3x3, reduce_5x5, filters_5x5, pool_proj = MODULES[name]
    prefix = f"inception{name}"

    branch_1x1 = _conv(x, filters_1x1, 1, f"{prefix}_1x1", batch_norm)

    branch_3x3 = _conv(x, reduce_3x3, 1, f"{prefix}_3x3_reduce", batch_norm)
    branch_3x3 = _conv(branch_3x3, filters_3x3, 3, f"{prefix}_3x3", batch_norm)

    branch_5x5 = _conv(x, reduce_5x5, 1, f"{prefix}_5x5_reduce", batch_norm)
    branch_5x5 = _conv(branch_5x5, filters_5x5, 5, f"{prefix}_5x5", batch_norm)

    branch_pool = keras.layers.MaxPooling2D(3, strides=1, padding="same",
                                            name=f"{prefix}_pool")(x)
    branch_pool = _conv(branch_pool, pool_proj, 1, f"{prefix}_pool_proj", batch_norm)

    return keras.layers.Concatenate(name=f"{prefix}_concat")(
        [branch_1x1, branch_3x3, branch_5x5, branch_pool]
    )


def _aux_head(x, num_classes, name, batch_norm):
    x = keras.layers.AveragePooling2D(_AUX_POOL_SIZE, strides=3, name=f"{name}_pool")(x)
    x = _conv(x, 128, 1, f"{name}_proj", batch_norm)
    x = keras.layers.Flatten(name=f"{name}_flatten")(x)
    x = keras.layers.Dense(1024, activation="relu", name=f"{name}_fc")(x)
    x = keras.layers.Dropout(0.7, name=f"{name}_dropout")(x)
    return keras.layers.Dense(num_classes, name=f"{name}_logits")(x)


def _max_pool(x, name):
    return keras.layers.MaxPooling2D(3, strides=2, padding="same", name=name)(x)


def build_googlenet(
    input_shape=(224, 224, 3),
    num_classes=1000,
    layout="auto",
    aux_logits=False,
    batch_norm=False,
    dropout_rate=0.4,
):
    """Build GoogLeNet (Inception v1), which outputs logits (no softmax).

    Args:
        input_shape: (height, width, channels) of the input images.
        num_classes: number of output logits.
        layout: "imagenet" (7x7 stride-2 stem and two max poolings), "cifar" (3x3
            stride-1 stem, no stem pooling) or "auto", which picks "cifar" for inputs
            smaller than 64x64.
        aux_logits: if True, add the two auxiliary classifiers, so the model returns
            [main logits, aux logits after 4a, aux logits after 4d].
        batch_norm: if True, put BatchNormalization after every convolution.
        dropout_rate: rate of the Dropout before the main classifier.

    Raises:
        ValueError: for an invalid argument or an input smaller than the layout allows.
    """
    layout = _common.resolve_layout(layout, input_shape)
    aux_logits = _common.check_bool("aux_logits", aux_logits)
    batch_norm = _common.check_bool("batch_norm", batch_norm)
    dropout_rate = _common.check_rate("dropout_rate", dropout_rate)
    min_sizes = dict(MIN_INPUT_SIZE)
    if aux_logits:
        for name, stride in _STRIDE_AT_4A.items():
            min_sizes[name] = max(min_sizes[name], _AUX_POOL_SIZE * stride)
    input_shape = _common.check_input_shape(
        input_shape, min_sizes[layout], _common.layout_size_fix(layout, min_sizes)
    )
    num_classes = _common.check_num_classes(num_classes)

    inputs = keras.Input(shape=input_shape, name="image")
    if layout == "imagenet":
        x = _conv(inputs, 64, 7, "stem_1", batch_norm, strides=2)
        x = _max_pool(x, "stem_pool1")
    else:
        x = _conv(inputs, 64, 3, "stem_1", batch_norm)
    x = _conv(x, 64, 1, "stem_2", batch_norm)
    x = _conv(x, 192, 3, "stem_3", batch_norm)
    if layout == "imagenet":
        x = _max_pool(x, "stem_pool2")

    x = _inception(x, "3a", batch_norm)
    x = _inception(x, "3b", batch_norm)
    x = _max_pool(x, "pool3")

    aux_outputs = []
    for name in ("4a", "4b", "4c", "4d", "4e"):
        x = _inception(x, name, batch_norm)
        if aux_logits and name in ("4a", "4d"):
            aux_name = f"aux{len(aux_outputs) + 1}"
            aux_outputs.append(_aux_head(x, num_classes, aux_name, batch_norm))
    x = _max_pool(x, "pool4")

    x = _inception(x, "5a", batch_norm)
    x = _inception(x, "5b", batch_norm)

    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    outputs = [logits, *aux_outputs] if aux_logits else logits
    return keras.Model(inputs, outputs, name="googlenet")
