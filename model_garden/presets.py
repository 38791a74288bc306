"""Optimizer and learning-rate schedule presets, one per model-garden network.

Das et al. (ICLR 2018) trained every network in DFP16 with the hyper-parameters of its
FP32 baseline. The presets of the ImageNet networks follow the published FP32 recipes:

- ResNet-50: SGD with momentum 0.9, learning rate 0.1 per 256 images, weight decay
  1e-4, 90 epochs, divided by 10 at epochs 30, 60 and 80 (the schedule and the linear
  scaling with the batch size of Goyal et al. 2017, for He et al.'s 2016 network).
- GoogLeNet (Inception v1): SGD with momentum 0.9, learning rate 0.04 per 256 images,
  weight decay 2e-4, 64 epochs, multiplied by 0.96 every 8 epochs as in Szegedy et al.
  2015. The paper gives no base rate; 0.04 per 256 images is this project's choice.
- VGG-16: SGD with momentum 0.9, learning rate 0.01 per 256 images, weight decay 5e-4,
  74 epochs, divided by 10 at epochs 30, 50 and 65. Simonyan and Zisserman divided it by
  10 when the validation accuracy stopped improving, three times in 74 epochs; fixed
  epochs make the schedule reproducible.
- AlexNet: SGD with momentum 0.9, learning rate 0.01 per 256 images, weight decay 5e-4,
  90 epochs, divided by 10 at epochs 30 and 60. Krizhevsky et al. 2012 divided it by 10
  when the validation error stopped improving, three times in about 90 epochs; fixed
  epochs make the schedule reproducible.

The CIFAR-10 networks use Adam with a cosine decay to 0, which trains both short and
long runs without tuning: cifar_cnn keeps the main job's settings, and SimpleNet uses a
smaller peak rate for its 13 batch-normalized layers.

Flags of the training CLI override any field (see `resolve`).
"""

import dataclasses

import keras


@dataclasses.dataclass(frozen=True)
class Preset:
    """Training hyper-parameters of one network.

    Attributes:
      optimizer: "adam" or "sgd".
      learning_rate: peak learning rate at `reference_batch_size`.
      reference_batch_size: batch size that `learning_rate` is given for. SGD presets
        scale the rate linearly with the batch size; Adam presets use it unchanged.
      batch_size: default batch size.
      epochs: default number of epochs.
      schedule: "cosine" (decay to 0 over all steps) or "step" (multiply by
        `decay_factor` at each epoch in `boundaries`).
      boundaries: epochs at which a step schedule multiplies the rate by `decay_factor`.
      decay_factor: factor of each step.
      momentum: SGD momentum.
      weight_decay: weight decay of the optimizer, or 0 for none.
    """

    optimizer: str
    learning_rate: float
    reference_batch_size: int
    batch_size: int
    epochs: int
    schedule: str
    boundaries: tuple = ()
    decay_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0


PRESETS = {
    "cifar_cnn": Preset(
        optimizer="adam", learning_rate=4e-3, reference_batch_size=64, batch_size=64,
        epochs=15, schedule="cosine",
    ),
    "simplenet": Preset(
        optimizer="adam", learning_rate=2e-3, reference_batch_size=64, batch_size=64,
        epochs=60, schedule="cosine",
    ),
    "resnet50": Preset(
        optimizer="sgd", learning_rate=0.1, reference_batch_size=256, batch_size=256,
        epochs=90, schedule="step", boundaries=(30, 60, 80), weight_decay=1e-4,
    ),
    "googlenet": Preset(
        optimizer="sgd", learning_rate=0.04, reference_batch_size=256, batch_size=256,
        epochs=64, schedule="step", boundaries=tuple(range(8, 64, 8)), decay_factor=0.96,
        weight_decay=2e-4,
    ),
    "vgg16": Preset(
        optimizer="sgd", learning_rate=0.01, reference_batch_size=256, batch_size=256,
        epochs=74, schedule="step", boundaries=(30, 50, 65), weight_decay=5e-4,
    ),
    "alexnet": Preset(
        optimizer="sgd", learning_rate=0.01, reference_batch_size=256, batch_size=256,
        epochs=90, schedule="step", boundaries=(30, 60), weight_decay=5e-4,
    ),
}


def get_preset(model):
    """Return the Preset of `model`.

    Raises:
      ValueError: if `model` has no preset.
    """
    if model not in PRESETS:
        raise ValueError(
            f"Expected a model with a preset, one of {sorted(PRESETS)}. "
            f"Received: model={model!r}"
        )
    return PRESETS[model]


def resolve(model, batch_size=None, epochs=None, learning_rate=None, optimizer=None):
    """Return the Preset of `model` with the given fields overridden.

    `learning_rate`, when given, is the peak rate at the final batch size and is used
    unchanged. Otherwise the preset rate is scaled linearly with the batch size for SGD.
    """
    preset = get_preset(model)
    changes = {}
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if epochs is not None:
        changes["epochs"] = epochs
    if optimizer is not None:
        changes["optimizer"] = optimizer
    final_batch = changes.get("batch_size", preset.batch_size)
    if learning_rate is not None:
        changes["learning_rate"] = learning_rate
        changes["reference_batch_size"] = final_batch
    elif changes.get("optimizer", preset.optimizer) == "sgd":
        changes["learning_rate"] = (
            preset.learning_rate * final_batch / preset.reference_batch_size
        )
        changes["reference_batch_size"] = final_batch
    return dataclasses.replace(preset, **changes)


def make_schedule(preset, steps_per_epoch):
    """Return the Keras learning-rate schedule of `preset` for `steps_per_epoch` steps."""
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(
            f"Expected steps_per_epoch >= 1. Received: steps_per_epoch={steps_per_epoch!r}"
        )
    if preset.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            preset.learning_rate, decay_steps=steps_per_epoch * preset.epochs
        )
    if preset.schedule == "step":
        boundaries = [
            epoch * steps_per_epoch for epoch in preset.boundaries if epoch < preset.epochs
        ]
        values = [
            preset.learning_rate * preset.decay_factor**index
            for index in range(len(boundaries) + 1)
        ]
        if not boundaries:
            return preset.learning_rate
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    raise ValueError(
        f"Expected schedule 'cosine' or 'step'. Received: schedule={preset.schedule!r}"
    )


def make_optimizer(preset, steps_per_epoch):
    """Return the Keras optimizer of `preset`, with its learning-rate schedule."""
    schedule = make_schedule(preset, steps_per_epoch)
    weight_decay = preset.weight_decay or None
    if preset.optimizer == "adam":
        return keras.optimizers.Adam(schedule, weight_decay=weight_decay)
    if preset.optimizer == "sgd":
        return keras.optimizers.SGD(
            schedule, momentum=preset.momentum, weight_decay=weight_decay
        )
    raise ValueError(
        f"Expected optimizer 'adam' or 'sgd'. Received: optimizer={preset.optimizer!r}"
    )


def describe(preset):
    """Return a one-line description of `preset` for logs."""
    text = f"{preset.optimizer} lr={preset.learning_rate:g} batch={preset.batch_size} " \
           f"epochs={preset.epochs} schedule={preset.schedule}"
    if preset.schedule == "step":
        text += f" x{preset.decay_factor:g} at epochs {list(preset.boundaries)}"
    if preset.optimizer == "sgd":
        text += f" momentum={preset.momentum:g}"
    if preset.weight_decay:
        text += f" weight_decay={preset.weight_decay:g}"
    return text

