"""Registry of model builders, keyed by the name that `--model` accepts.

Every builder takes `input_shape` and `num_classes` and returns an uncompiled
keras.Model that outputs logits.
"""

from model_garden.models.cifar_cnn import build_cifar_cnn

MODELS = {
    "cifar_cnn": build_cifar_cnn,
}


def get_builder(name):
    """Return the builder registered as `name`, or raise ValueError for an unknown name."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"Expected a model name in {sorted(MODELS)}. Received: model={name!r}. "
            "Pick one of these names, or register a new builder in model_garden/models."
        ) from None


def build_model(name, input_shape=(32, 32, 3), num_classes=10):
    """Build the registered model `name` for the given input shape and class count."""
    return get_builder(name)(input_shape=input_shape, num_classes=num_classes)
