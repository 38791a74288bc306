"""The error type of unusable training or test data, and its conversion from TF errors."""

import contextlib
import re

import tensorflow as tf

# The fix that every message about unreadable TFRecord records ends with.
RECORD_FIX = (
    "Each record must be a tf.train.Example with image/encoded (JPEG or PNG bytes) and "
    "image/class/label (int64 in [0, num_classes - 1], [0, 9] for CIFAR-10). Regenerate "
    "the shards, or copy them again if the copy was cut short."
)


class DataError(ValueError):
    """Training or test data that cannot be used: no matching file, or unreadable records."""


def summarize_tf_error(error):
    """Return the message of a tf.errors.OpError on one line, without graph node details."""
    message = re.sub(r"\{\{function_node [^}]*\}\}", "", error.message)
    message = re.sub(r"\[Op:[^\]]*\].*", "", message)
    # Errors raised inside a dataset map start with the iterator path, for example
    # "Error in user-defined function passed to ... with iterator: Iterator::Root::...: ".
    message = re.sub(r"Error in user-defined function .*?Iterator::\S*: ", "", message)
    # A failed tf.debugging.Assert prints its data as "assertion failed: [text]".
    assertion = re.search(r"assertion failed: \[(.*)\]", message)
    if assertion:
        return assertion.group(1).rstrip(". ")
    lines = [
        line.strip() for line in message.splitlines()
        if line.strip()
        and not line.strip().startswith("[[")
        and line.strip() not in ("Graph execution error:", "<stack traces unavailable>")
        and not line.startswith("Detected at node")
    ]
    return " ".join(lines).rstrip(". ")


@contextlib.contextmanager
def convert_read_errors(pattern, data_format="tfrecord"):
    """Raise DataError, naming `pattern`, for records that fail to read or decode in the block.

    Use it around `model.fit` and `model.evaluate`, where the image decoding and the
    tf.train.Example parsing of `make_dataset` run. `data_format` is the `data_format`
    of the split ("tfrecord" or "class_folders"), which selects the fix in the message.
    An InvalidArgumentError, NotFoundError or PermissionDeniedError counts as a data
    error only when it was raised while fetching the next input batch (IteratorGetNext),
    so errors of the model itself propagate unchanged.
    """
    try:
        yield
    except (
        tf.errors.DataLossError,
        tf.errors.InvalidArgumentError,
        tf.errors.NotFoundError,
        tf.errors.PermissionDeniedError,
    ) as error:
        if not isinstance(error, tf.errors.DataLossError) and (
            "IteratorGetNext" not in error.message
        ):
            raise
        if data_format == "class_folders":
            # NOTE: the message names no file when an image has a valid header but a
            # corrupt body, because the decoder's error does not contain the path.
            raise DataError(
                f"Expected readable JPEG or PNG image files. Received: pattern={pattern!r}, "
                f"where an image failed to read or decode: {summarize_tf_error(error)}. "
                "Replace or delete that file."
            ) from error
        raise DataError(
            f"Expected readable tf.train.Example records. Received: pattern={pattern!r}, "
            f"where a record failed to read or decode: "
            f"{summarize_tf_error(error)}. {RECORD_FIX}"
        ) from error
