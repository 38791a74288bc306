"""keras-dfp: train Keras CNNs with INT16 dynamic fixed point (DFP16).

Importing the package checks the environment (TensorFlow backend, tensorflow
2.21.*, keras 3.15.*), loads the custom-op library and installs the Keras
integration, after which the dtype policy name "dfp16" works everywhere Keras
accepts a policy name:

>>> import keras, keras_dfp
>>> keras.config.set_dtype_policy("dfp16")
"""

from keras_dfp import _compat

_compat.check_environment()

from keras_dfp import ops  # noqa: E402
from keras_dfp import reference  # noqa: E402
from keras_dfp import _distribute  # noqa: E402
from keras_dfp import _integration  # noqa: E402
from keras_dfp.policy import DFPPolicy  # noqa: E402
from keras_dfp._integration import skipped_steps  # noqa: E402

_integration.install()
_distribute.install()

from keras_dfp import layers  # noqa: E402
from keras_dfp import telemetry  # noqa: E402
from keras_dfp.export import export_for_serving  # noqa: E402
from keras_dfp.export import list_saved_model_ops  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DFPPolicy",
    "export_for_serving",
    "layers",
    "list_saved_model_ops",
    "ops",
    "reference",
    "skipped_steps",
    "telemetry",
    "__version__",
]
