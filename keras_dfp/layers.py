"""Conv2D and Dense layers that always run in DFP16.

`DFPConv2D` and `DFPDense` are the stock Keras layers with a `DFPPolicy` as
their default dtype, so they run through the INT16 ops whatever the global
dtype policy is. Under the global policy "dfp16" the stock layers behave the
same; these classes are for mixing DFP16 and float32 layers in one model.
"""

import keras

from keras_dfp.policy import DFPPolicy


def _dfp_dtype(dtype, class_name):
    """Return `dtype` as a `DFPPolicy`, defaulting to `DFPPolicy()`."""
    if dtype is None:
        return DFPPolicy()
    policy = keras.dtype_policies.get(dtype)
    if not isinstance(policy, DFPPolicy):
        raise ValueError(
            f"Expected a 'dfp16' dtype policy for {class_name}. "
            f"Received: dtype={dtype!r}. Omit `dtype`, pass a "
            f"keras_dfp.DFPPolicy, or use the stock keras.layers class for "
            "float32."
        )
    return policy


@keras.saving.register_keras_serializable(package="keras_dfp")
class DFPConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` whose convolution always runs in DFP16.

    Takes the arguments of `keras.layers.Conv2D`. `dtype` defaults to
    `keras_dfp.DFPPolicy()` and must be a DFP16 policy.
    """

    def __init__(self, *args, dtype=None, **kwargs):
        super().__init__(*args, dtype=_dfp_dtype(dtype, "DFPConv2D"), **kwargs)


@keras.saving.register_keras_serializable(package="keras_dfp")
class DFPDense(keras.layers.Dense):
    """`keras.layers.Dense` whose matrix multiply always runs in DFP16.

    Takes the arguments of `keras.layers.Dense`. `dtype` defaults to
    `keras_dfp.DFPPolicy()` and must be a DFP16 policy.
    """

    def __init__(self, *args, dtype=None, **kwargs):
        super().__init__(*args, dtype=_dfp_dtype(dtype, "DFPDense"), **kwargs)
