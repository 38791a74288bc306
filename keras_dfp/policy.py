"""The `dfp16` Keras dtype policy.

A layer under `DFPPolicy` keeps float32 variables (FP32 master weights) and a
float32 compute dtype, but its convolution or matrix multiply runs as DFP16.
The input, the kernel and, in the backward pass, the output gradient are
quantized to int16 mantissas with one shared power-of-two exponent per tensor.
The INT16 kernels of `keras_dfp.ops` then accumulate the products exactly in
int64.
Everything else in the layer (bias add, activation) and every other layer
(BatchNormalization, pooling, softmax, losses) stays float32.

`quantization_mode` is None on purpose: a non-None mode makes Keras run its
own post-training quantization (`Layer.quantized_call`), which is a different
scheme.
"""

import re

import keras

POLICY_NAME = "dfp16"
ROUNDING_MODES = ("nearest_even", "stochastic")
NONFINITE_MODES = ("raise", "skip_step")

# Keras' `Operation.from_config` keeps only the name of a policy whose
# quantization_mode is None, so the name itself carries rounding, seed and
# non-finite mode: "dfp16", "dfp16_stochastic" (seed 0) or
# "dfp16_stochastic_seed<int>", each followed by "_skip" for
# nonfinite="skip_step".
_STOCHASTIC_PREFIX = POLICY_NAME + "_stochastic"
_SEED_PREFIX = _STOCHASTIC_PREFIX + "_seed"
_SKIP_SUFFIX = "_skip"

# Layer configs store the policy name between this prefix and suffix (see
# `serialized_name`). Keras without keras_dfp quotes the stored name in its
# error, "Cannot convert '<name>' to a mixed precision DTypePolicy", so the
# suffix names the package to install and import. Files written before the
# suffix existed store the prefixed name alone and still load.
SERIALIZED_PREFIX = "keras_dfp>"
SERIALIZED_SUFFIX = " (pip install keras-dfp, then import keras_dfp before loading)"

# Stochastic-rounding seeds are int64 values, as the KerasDfp>Quantize seed input.
MIN_SEED = -(2**63)
MAX_SEED = 2**63 - 1
_CANONICAL_SEED = re.compile(r"-?[1-9][0-9]*")


def policy_name(rounding, seed, nonfinite="raise"):
    """Return the canonical policy name for a rounding mode, seed and non-finite mode."""
    if rounding == "nearest_even":
        name = POLICY_NAME
    elif seed == 0:
        name = _STOCHASTIC_PREFIX
    else:
        name = f"{_SEED_PREFIX}{seed}"
    if nonfinite == "skip_step":
        name += _SKIP_SUFFIX
    return name


def serialized_name(policy):
    """Return the name a layer config stores for `policy`.

    For example "keras_dfp>dfp16 (pip install keras-dfp, then import keras_dfp
    before loading)".
    """
    return SERIALIZED_PREFIX + policy.name + SERIALIZED_SUFFIX


def parse_policy_name(name):
    """Return `(rounding, seed, nonfinite)` for a DFP16 policy name, or None.

    Accepts the names of `policy_name()`, alone or as `serialized_name()`
    stores them (with the "keras_dfp>" prefix, and with or without the install
    hint), and returns None for every other name. Rounding and seed are None
    when the name does not fix them ("dfp16", "dfp16_skip"). The non-finite
    mode is "skip_step" for names ending in "_skip" and "raise" otherwise.
    """
    if not isinstance(name, str):
        return None
    if name.startswith(SERIALIZED_PREFIX):
        name = name[len(SERIALIZED_PREFIX) :]
        if name.endswith(SERIALIZED_SUFFIX):
            name = name[: -len(SERIALIZED_SUFFIX)]
    nonfinite = "raise"
    if name.endswith(_SKIP_SUFFIX):
        name = name[: -len(_SKIP_SUFFIX)]
        nonfinite = "skip_step"
    parsed = _parse_rounding_name(name)
    if parsed is None:
        return None
    return (*parsed, nonfinite)


def _parse_rounding_name(name):
    """Return `(rounding, seed)` for a policy name without the "_skip" suffix."""
    if name == POLICY_NAME:
        return None, None
    if name == _STOCHASTIC_PREFIX:
        return "stochastic", 0
    if name.startswith(_SEED_PREFIX):
        digits = name[len(_SEED_PREFIX) :]
        # Only the canonical spelling of policy_name(): no sign other than
        # "-", no leading zeros, no spaces, so each seed has exactly one name.
        if not _CANONICAL_SEED.fullmatch(digits):
            return None
        seed = int(digits)
        if not MIN_SEED <= seed <= MAX_SEED:
            return None
        return "stochastic", seed
    return None


@keras.saving.register_keras_serializable(package="keras_dfp")
class DFPPolicy(keras.DTypePolicy):
    """Dtype policy that runs Conv2D and Dense through INT16 dynamic fixed point.

    Args:
        name: `"dfp16"`, a name from `policy_name()` such as
            `"dfp16_stochastic"` or `"dfp16_stochastic_seed7"`, or None.
            None inherits the rounding and seed of the global policy when that
            is a `DFPPolicy`.
        rounding: `"nearest_even"` (round half to even, the default) or
            `"stochastic"`. Stochastic rounding draws its bits from a
            per-layer `keras.random.SeedGenerator` started at `seed`, so one
            seed reproduces a whole training run on any thread count.
        seed: Integer seed for stochastic rounding. Ignored for
            `"nearest_even"`.
        nonfinite: What a NaN or Inf reaching a DFP16 op does. `"raise"` (the
            default) raises `tf.errors.InvalidArgumentError` naming the layer
            and the tensor. `"skip_step"` quantizes zeros in its place, makes
            the op's outputs NaN, and the optimizer then skips the whole
            update (see `keras_dfp.skipped_steps`). The name of a
            `"skip_step"` policy ends in `"_skip"`, for example
            `"dfp16_skip"`.

    Example:

    >>> import keras, keras_dfp
    >>> keras.config.set_dtype_policy("dfp16")
    >>> keras.layers.Dense(4).dtype_policy
    <DFPPolicy "dfp16">
    >>> keras.config.set_dtype_policy("float32")
    """

    def __init__(self, name=None, rounding=None, seed=None, nonfinite=None):
        if name is None:
            global_policy = keras.config.dtype_policy()
            if isinstance(global_policy, DFPPolicy):
                rounding = global_policy.rounding if rounding is None else rounding
                seed = global_policy.seed if seed is None else seed
                if nonfinite is None:
                    nonfinite = global_policy.nonfinite
            name = POLICY_NAME

        parsed = parse_policy_name(name)
        if parsed is None:
            raise ValueError(
                f"Expected a DFPPolicy name such as {POLICY_NAME!r} or "
                f"{_STOCHASTIC_PREFIX!r}. Received: name={name!r}. "
                "For a float policy use keras.DTypePolicy(name) instead."
            )
        name_rounding, name_seed, name_nonfinite = parsed
        if nonfinite is None:
            nonfinite = name_nonfinite
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(
                f"Expected `nonfinite` to be one of {NONFINITE_MODES}. "
                f"Received: nonfinite={nonfinite!r}"
            )
        if nonfinite != name_nonfinite and name.endswith(_SKIP_SUFFIX):
            raise ValueError(
                f"Expected `nonfinite` to match the policy name {name!r}, "
                f"which ends in {_SKIP_SUFFIX!r} for nonfinite='skip_step'. "
                f"Received: nonfinite={nonfinite!r}"
            )
        if name_rounding is not None:
            if rounding not in (None, name_rounding) or seed not in (None, name_seed):
                raise ValueError(
                    f"Expected `rounding` and `seed` to match the policy name "
                    f"{name!r}. Received: rounding={rounding!r}, seed={seed!r}"
                )
            rounding, seed = name_rounding, name_seed

        if rounding is None:
            rounding = "nearest_even"
        if seed is None:
            seed = 0
        if rounding not in ROUNDING_MODES:
            raise ValueError(
                f"Expected `rounding` to be one of {ROUNDING_MODES}. "
                f"Received: rounding={rounding!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(
                "Expected `seed` to be a Python int. "
                f"Received: seed={seed!r} (of type {type(seed).__name__})"
            )
        if not MIN_SEED <= seed <= MAX_SEED:
            raise ValueError(
                f"Expected `seed` to fit in int64, [{MIN_SEED}, {MAX_SEED}]. "
                f"Received: seed={seed}. Reduce it, for example with "
                "seed % 2**63."
            )

        self._rounding = rounding
        self._seed = seed
        self._nonfinite = nonfinite
        super().__init__(policy_name(rounding, seed, nonfinite))

    def _parse_name(self, name):
        # `__init__` has validated the name. Every DFP16 policy computes and
        # keeps its variables in float32.
        return "float32", "float32"

    @property
    def rounding(self):
        """Rounding mode used when quantizing to DFP16."""
        return self._rounding

    @property
    def seed(self):
        """Start seed of the per-layer stochastic-rounding generator."""
        return self._seed

    @property
    def nonfinite(self):
        """What a NaN or Inf reaching a DFP16 op does: "raise" or "skip_step"."""
        return self._nonfinite

    def get_config(self):
        return {
            "name": self.name,
            "rounding": self._rounding,
            "seed": self._seed,
            "nonfinite": self._nonfinite,
        }

    def __eq__(self, other):
        return (
            type(other) is type(self)
            and self._rounding == other._rounding
            and self._seed == other._seed
            and self._nonfinite == other._nonfinite
        )

    def __hash__(self):
        return hash((POLICY_NAME, self._rounding, self._seed, self._nonfinite))

    def __repr__(self):
        return f'<DFPPolicy "{self.name}">'

