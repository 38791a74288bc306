"""Registry of model builders, keyed by the name that `--model` accepts.

Every builder takes `input_shape` and `num_classes` (plus its own keyword options) and
returns an uncompiled keras.Model that outputs logits.
"""

from model_garden.models.alexnet import build_alexnet
from model_garden.models.cifar_cnn import build_cifar_cnn
from model_garden.models.googlenet import build_googlenet
from model_garden.models.resnet50 import build_resnet50
from model_garden.models.simplenet import build_simplenet
from model_garden.models.vgg16 import build_vgg16

MODELS = {
    "alexnet": build_alexnet,
    "cifar_cnn": build_cifar_cnn,
    "googlenet": build_googlenet,
    "resnet50": build_resnet50,
    "simplenet": build_simplenet,
    "vgg16": build_vgg16,
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


def build_model(name, input_shape=(32, 32, 3), num_classes=10, **options):
    """Build the registered model `name` for the given input shape and class count.

    `options` go to the builder as keyword arguments, for example `aux_logits=True` for
    "googlenet".
    """
    return get_builder(name)(input_shape=input_shape, num_classes=num_classes, **options)
