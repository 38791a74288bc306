"""Check the Keras backend and the TensorFlow and Keras versions before loading.

keras-dfp patches Keras internals (`keras.src`) and loads a custom-op library
compiled against one TensorFlow ABI, so it supports exactly one TensorFlow minor
release and one Keras minor release, on the TensorFlow backend only.
"""

import os

REQUIRED_TENSORFLOW = "2.21"
REQUIRED_KERAS = "3.15"

_REBUILD_HINT = (
    f"Install the pinned versions (pip install 'tensorflow=={REQUIRED_TENSORFLOW}.*' "
    f"'keras=={REQUIRED_KERAS}.*') and rebuild keras-dfp with `make build`."
)


def _minor_version(version):
    return ".".join(version.split(".")[:2])


def _backend_error(backend, source):
    return ImportError(
        "keras-dfp requires the TensorFlow backend of Keras. "
        f"Received: {source}={backend!r}. "
        "Set the environment variable KERAS_BACKEND=tensorflow before "
        "importing keras, or set \"backend\": \"tensorflow\" in "
        "~/.keras/keras.json."
    )


def check_backend():
    """Raise ImportError unless Keras runs on the TensorFlow backend."""
    # Checked before `import keras`, which itself fails when the requested
    # backend's package (jax, torch, ...) is missing.
    requested = os.environ.get("KERAS_BACKEND")
    if requested and requested != "tensorflow":
        raise _backend_error(requested, "KERAS_BACKEND")

    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise _backend_error(backend, "keras.backend.backend()")


def check_versions():
    """Raise ImportError unless TensorFlow and Keras have the pinned minor versions."""
    import keras

    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            f"keras-dfp requires tensorflow {REQUIRED_TENSORFLOW}.*, but importing "
            f"tensorflow failed: {error}. {_REBUILD_HINT}"
        ) from error

    found = {"tensorflow": tf.__version__, "keras": keras.__version__}
    required = {"tensorflow": REQUIRED_TENSORFLOW, "keras": REQUIRED_KERAS}
    for package, version in found.items():
        if _minor_version(version) != required[package]:
            raise ImportError(
                f"keras-dfp requires {package} {required[package]}.*. "
                f"Received: {package}=={version}. {_REBUILD_HINT}"
            )


def check_environment():
    """Run every import-time check.

    The backend is checked first because a non-TensorFlow setup may lack
    tensorflow entirely, and the backend message gives the better fix.
    """
    check_backend()
    check_versions()
