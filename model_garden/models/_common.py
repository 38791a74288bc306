"""Argument checks and layer blocks shared by the model-garden builders.

Every builder uses only layers that run under the "dfp16" policy: Conv2D (2-D,
channels_last, no groups) and Dense compute in INT16 dynamic fixed point, and
BatchNormalization, ReLU, pooling, Dropout, Concatenate, Add and Flatten stay float32.
"""

import numbers

import keras

# Builders with layout="auto" pick the "cifar" layout when the input height or width is
# below this many pixels, and the "imagenet" layout otherwise.
CIFAR_LAYOUT_BELOW = 64

LAYOUTS = ("auto", "imagenet", "cifar")

# PyTorch's BatchNorm2d defaults, which torchvision's ResNet-50 uses: momentum 0.1 in
# PyTorch's convention (weight of the new batch) is 0.9 in Keras's (weight of the old
# average). Keras's own defaults (0.99, 1e-3) update the moving statistics more slowly.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def check_input_shape(input_shape, min_size, size_fix=None):
    """Return `input_shape` as a (height, width, channels) tuple of ints, or raise ValueError.

    `min_size` is the smallest height and width the network accepts, so that its last
    feature map is at least 1x1. `size_fix` ends the error for a too-small input.
    """
    fix = (
        "Pass (height, width, channels) with positive ints, "
        f"for example ({min_size}, {min_size}, 3)."
    )
    if size_fix is None:
        size_fix = "Resize the images."
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(
            f"Expected input_shape to be a (height, width, channels) tuple. "
            f"Received: input_shape={input_shape!r}. {fix}"
        ) from None
    if len(shape) != 3 or not all(_is_positive_int(size) for size in shape):
        raise ValueError(
            f"Expected input_shape to be 3 positive ints (height, width, channels). "
            f"Received: input_shape={input_shape!r}. {fix}"
        )
    height, width, _ = shape
    if height < min_size or width < min_size:
        raise ValueError(
            f"Expected an input height and width of at least {min_size} pixels. "
            f"Received: input_shape={input_shape!r}. {size_fix}"
        )
    return tuple(int(size) for size in shape)


def layout_size_fix(layout, min_sizes):
    """Return the fix for a too-small input of a builder with per-layout minimum sizes."""
    if layout == "imagenet":
        return (
            f"Resize the images, or pass layout='cifar', which accepts "
            f"{min_sizes['cifar']}x{min_sizes['cifar']} and up."
        )
    return "Resize the images."


def check_num_classes(num_classes):
    """Return `num_classes` as an int, or raise ValueError unless it is an int >= 1."""
    if not _is_positive_int(num_classes):
        raise ValueError(
            f"Expected num_classes to be an int >= 1. Received: num_classes={num_classes!r}. "
            "Pass the number of output classes, for example num_classes=10."
        )
    return int(num_classes)


def resolve_layout(layout, input_shape):
    """Return "imagenet" or "cifar", picking by input size when `layout` is "auto"."""
    if layout not in LAYOUTS:
        raise ValueError(
            f"Expected layout to be one of {LAYOUTS}. Received: layout={layout!r}. "
            "Pass 'auto' to pick by input size."
        )
    if layout != "auto":
        return layout
    try:
        height, width = int(input_shape[0]), int(input_shape[1])
    except (TypeError, ValueError, IndexError):
        # check_input_shape raises the clear error for this input.
        return "imagenet"
    return "cifar" if min(height, width) < CIFAR_LAYOUT_BELOW else "imagenet"


def check_rate(name, value):
    """Return a dropout rate as a float, or raise ValueError unless 0 <= value < 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(
            f"Expected {name} to be a number in [0, 1). Received: {name}={value!r}. "
            f"Pass, for example, {name}=0.5, or 0 for no dropout."
        )
    return float(value)


def check_bool(name, value):
    """Return `value`, or raise ValueError unless it is a bool."""
    if not isinstance(value, bool):
        raise ValueError(
            f"Expected {name} to be True or False. Received: {name}={value!r}."
        )
    return value


def check_positive_int(name, value):
    """Return `value` as an int, or raise ValueError unless it is an int >= 1."""
    if not _is_positive_int(value):
        raise ValueError(
            f"Expected {name} to be an int >= 1. Received: {name}={value!r}."
        )
    return int(value)


def conv_bn_relu(x, filters, kernel_size, name, strides=1, padding="same", batch_norm=True):
    """Apply Conv2D, then BatchNormalization when `batch_norm`, then ReLU.

    With batch norm the convolution has no bias, because the norm's beta replaces it.
    """
    x = conv(x, filters, kernel_size, f"{name}_conv", strides=strides, padding=padding,
             use_bias=not batch_norm)
    if batch_norm:
        x = batch_norm_layer(f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def conv(x, filters, kernel_size, name, strides=1, padding="same", use_bias=False):
    """Apply a Conv2D with He-normal initialization, which suits a following ReLU."""
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        kernel_initializer="he_normal",
        name=name,
    )(x)


def batch_norm_layer(name):
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _is_positive_int(value):
    # bool is a subclass of int, but True as a size or class count is a caller's mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
