"""Locate, check and load the keras-dfp custom-op library.

The library is keras_dfp/_keras_dfp_ops.so unless the environment variable
KERAS_DFP_OPS_LIBRARY names another file (for example a Bazel build). Next to
it, _keras_dfp_ops.build_info.json records the TensorFlow version the library
was compiled against. A custom-op library only works with the exact
TensorFlow build whose headers it was compiled with, so the version is
checked before tf.load_op_library, which could otherwise crash the process.
"""

import functools
import json
import os
import pathlib

import tensorflow as tf

LIBRARY_ENV_VAR = "KERAS_DFP_OPS_LIBRARY"
DEFAULT_LIBRARY = pathlib.Path(__file__).resolve().parent / "_keras_dfp_ops.so"

_REBUILD_HINT = (
    "Rebuild it with `make build`, or with "
    "`pip install --no-build-isolation --force-reinstall .` "
    "(`pip install --no-build-isolation -e .` for a source checkout)."
)


def library_path():
    """Return the path of the op library, honouring KERAS_DFP_OPS_LIBRARY."""
    override = os.environ.get(LIBRARY_ENV_VAR)
    if override:
        return pathlib.Path(override).expanduser().resolve()
    return DEFAULT_LIBRARY


def build_info_path(library):
    """Return the build-info JSON path that belongs to `library`."""
    return library.with_name(library.name.removesuffix(".so") + ".build_info.json")


def _read_build_info(library):
    info_path = build_info_path(library)
    try:
        text = info_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ImportError(
            f"Expected the build record {info_path} next to the keras-dfp op "
            f"library {library}, but it is missing, so the TensorFlow version "
            f"the library was built for is unknown. {_REBUILD_HINT}"
        ) from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as error:
        raise ImportError(
            f"Expected valid JSON in the build record {info_path}. "
            f"Received: {error}. {_REBUILD_HINT}"
        ) from error
    if not isinstance(info, dict) or "tensorflow_version" not in info:
        raise ImportError(
            f"Expected a 'tensorflow_version' entry in the build record "
            f"{info_path}. Received: {text.strip()!r}. {_REBUILD_HINT}"
        )
    return info


@functools.lru_cache(maxsize=None)
def load_ops_library():
    """Load the op library once after checking its TensorFlow version.

    Raises:
      ImportError: if the library or its build record is missing, the record
        names another TensorFlow version than the running one, or TensorFlow
        fails to load the library.
    """
    library = library_path()
    if not library.is_file():
        source = (
            f"{LIBRARY_ENV_VAR}={os.environ[LIBRARY_ENV_VAR]!r}"
            if os.environ.get(LIBRARY_ENV_VAR)
            else "the keras_dfp package directory"
        )
        raise ImportError(
            f"The keras-dfp op library was not found at {library} (from "
            f"{source}). Build it with `make build` or "
            f"`pip install --no-build-isolation .` "
            f"(`pip install --no-build-isolation -e .` for a source checkout)."
        )

    info = _read_build_info(library)
    built_for = info["tensorflow_version"]
    if built_for != tf.__version__:
        override_hint = (
            f" {LIBRARY_ENV_VAR} selects this library, so rebuild it where it "
            f"came from (for example the Bazel build) or unset the variable."
            if os.environ.get(LIBRARY_ENV_VAR)
            else ""
        )
        raise ImportError(
            f"Expected the keras-dfp op library to be built for the running "
            f"TensorFlow {tf.__version__}. Received: {library} built for "
            f"TensorFlow {built_for}. {_REBUILD_HINT}{override_hint}"
        )

    try:
        return tf.load_op_library(str(library))
    except (tf.errors.NotFoundError, tf.errors.AlreadyExistsError) as error:
        raise ImportError(
            f"TensorFlow {tf.__version__} failed to load the keras-dfp op "
            f"library {library}: {error.message}. {_REBUILD_HINT}"
        ) from error
