"""Image decoding and the two preprocessing recipes of the training pipeline.

cifar: every image is brought to `image_size` x `image_size` once, when it is decoded
(images of that size are left untouched). Training flips it left-right at random, pads it
with image_size // 8 zero pixels per side (4 at 32x32) and crops a random window of the
original size. Pixels are standardized with the CIFAR-10 channel statistics.

imagenet: training crops a random window that covers 8% to 100% of the image area with an
aspect ratio from 3/4 to 4/3, which are the defaults of torchvision's RandomResizedCrop.
The window is resized to `image_size` x `image_size` and flipped left-right at random.
When no sampled window fits, the crop is the whole image (torchvision takes a central
crop instead). Evaluation resizes the shorter side to image_size * 256 / 224 (256 for
224) and takes the central crop. Pixels are standardized with the ImageNet channel
statistics.

Random ops are stateless: each takes a seed of shape [2], so a given seed gives the
same crops and flips in every run. Resizing is bilinear with antialiasing.
"""

import tensorflow as tf

PREPROCESSINGS = ("cifar", "imagenet")

# Per-channel mean and standard deviation of pixel values in [0, 1], measured over the
# 50,000 training images of the JPEG form of CIFAR-10 that the shards contain.
CHANNEL_MEAN = (0.4868, 0.4822, 0.4414)
CHANNEL_STD = (0.2451, 0.2425, 0.2605)

# Per-channel mean and standard deviation of the ImageNet (ILSVRC-2012) training images
# in [0, 1], the values of the torchvision ImageNet models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Random resized crop: fraction of the image area and width / height of the window.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
# Tries of the window sampler before it falls back to the whole image.
CROP_MAX_ATTEMPTS = 10

# Evaluation resizes the shorter side to image_size * EVAL_RESIZE_RATIO before the
# central crop.
EVAL_RESIZE_RATIO = 256 / 224


def check_preprocessing(preprocessing, image_size):
    """Raise ValueError unless `preprocessing` and `image_size` are valid."""
    if preprocessing not in PREPROCESSINGS:
        raise ValueError(
            f"Expected preprocessing in {PREPROCESSINGS}. "
            f"Received: preprocessing={preprocessing!r}"
        )
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"Expected image_size >= 1. Received: image_size={image_size!r}")


def decode(contents):
    """Decode JPEG or PNG bytes of any size to a uint8 image of shape [height, width, 3].

    Grayscale images get three equal channels, and the alpha channel of a PNG is dropped.
    """
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def resize_shorter_side(image, size):
    """Resize a uint8 image so that its shorter side is `size`, keeping the aspect ratio.

    An image whose shorter side is already `size` is returned unchanged.
    """
    shape = tf.shape(image)
    height = tf.cast(shape[0], tf.float64)
    width = tf.cast(shape[1], tf.float64)
    scale = tf.cast(size, tf.float64) / tf.minimum(height, width)
    new_height = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), size)
    new_width = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), size)

    def resize():
        resized = tf.image.resize(
            image, tf.stack([new_height, new_width]), method="bilinear", antialias=True
        )
        return tf.saturate_cast(tf.round(resized), tf.uint8)

    return tf.cond(tf.minimum(shape[0], shape[1]) == size, lambda: image, resize)


def center_crop(image, size):
    """Return the central `size` x `size` window of an image at least that large."""
    shape = tf.shape(image)
    top = (shape[0] - size) // 2
    left = (shape[1] - size) // 2
    return image[top:top + size, left:left + size, :]


def to_square(image, size):
    """Resize the shorter side of a uint8 image to `size`, then take the central square."""
    image = center_crop(resize_shorter_side(image, size), size)
    return tf.ensure_shape(image, [size, size, 3])


def augment(image, seed):
    """Randomly flip left-right, then zero-pad by size // 8 and crop back to the input size.

    `image` is square with a static shape; `seed` is an int64 tensor of shape [2], as
    stateless random ops expect.
    """
    size = image.shape[0]
    padding = size // 8
    flip_seed = seed
    crop_seed = tf.stack([seed[0], seed[1] + 1])
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    return tf.image.stateless_random_crop(padded, size=image.shape.as_list(), seed=crop_seed)


def sample_crop_window(image_shape, seed):
    """Return (offset, size), each [height, width, -1], of a random resized crop window.

    The window covers CROP_AREA_RANGE of the image area with a width / height ratio in
    CROP_ASPECT_RATIO_RANGE, up to the rounding to whole pixels. When none of
    CROP_MAX_ATTEMPTS samples fits inside the image, the window is the whole image.
    """
    whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
    offset, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=whole_image,
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=CROP_ASPECT_RATIO_RANGE,
        area_range=CROP_AREA_RANGE,
        max_attempts=CROP_MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return offset, size


def random_resized_crop(image, seed, size):
    """Crop a random window (see `sample_crop_window`), resize it to `size` x `size`, flip.

    Returns float32 pixels in [0, 255]. `seed` is an int64 tensor of shape [2].
    """
    crop_seed = seed
    flip_seed = tf.stack([seed[0], seed[1] + 1])
    offset, window = sample_crop_window(tf.shape(image), crop_seed)
    image = tf.slice(image, offset, window)
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def eval_resize_size(image_size):
    """Return the shorter side that evaluation resizes to before the central crop."""
    return max(image_size, int(round(image_size * EVAL_RESIZE_RATIO)))


def center_crop_for_eval(image, size):
    """Resize the shorter side to eval_resize_size(size), then take the central crop."""
    image = center_crop(resize_shorter_side(image, eval_resize_size(size)), size)
    return tf.ensure_shape(image, [size, size, 3])


def normalize(image, standardize=True, mean=CHANNEL_MEAN, std=CHANNEL_STD):
    """Convert pixels in [0, 255] to float32 in [0, 1], then optionally standardize.

    Standardizing subtracts `mean` and divides by `std` per channel.
    """
    image = tf.cast(image, tf.float32) / 255.0
    if standardize:
        image = (image - tf.constant(mean)) / tf.constant(std)
    return image
