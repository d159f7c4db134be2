"""Pre-activation ResNets for 32x32 images as pure Keras 3 functional models (no I/O).

The model takes raw uint8 RGB pixels, the same thing a served model receives:
uint8 -> per-channel normalisation (statistics fitted on the training images)
-> random shift/flip (training only) -> ResNet -> float32 softmax.

Named depths are parameters, not copies: bottleneck depth = 9n + 2 (n = 18: ResNet-164,
n = 111: ResNet-1001), basic depth = 6n + 2 (n = 3, 9, 18: ResNet-20, 56, 110).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import keras
from keras import layers

from pipeline.augment import RandomShiftFlip


def _conv(filters: int, kernel_size: int, strides: int, l2: float, name: str) -> layers.Conv2D:
    return layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                         kernel_initializer="he_normal", kernel_regularizer=keras.regularizers.l2(l2), name=name)


def _bn_relu(x, name: str):
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _unit(x, *, block: str, width: int, strides: int, l2: float, name: str):
    """One pre-activation unit. When the shape changes, the shortcut is a 1x1 projection taken
    after the unit's first BN-ReLU (as in the seed and He et al. 2016); otherwise identity."""
    preact = _bn_relu(x, f"{name}_pre")
    project = strides != 1 or x.shape[-1] != width
    shortcut = _conv(width, 1, strides, l2, f"{name}_proj")(preact) if project else x
    if block == "bottleneck":
        y = _conv(width // 4, 1, strides, l2, f"{name}_conv1")(preact)
        y = _conv(width // 4, 3, 1, l2, f"{name}_conv2")(_bn_relu(y, f"{name}_mid1"))
        y = _conv(width, 1, 1, l2, f"{name}_conv3")(_bn_relu(y, f"{name}_mid2"))
    else:
        y = _conv(width, 3, strides, l2, f"{name}_conv1")(preact)
        y = _conv(width, 3, 1, l2, f"{name}_conv2")(_bn_relu(y, f"{name}_mid1"))
    return layers.Add(name=f"{name}_add")([y, shortcut])


def build_resnet(
    *,
    num_classes: int,
    block: str,
    units_per_stage: int,
    widths: Sequence[int],
    strides: Sequence[int],
    stem_filters: int,
    l2: float,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    max_shift: int = 0,
    shift_fill: str = "nearest",
    flip: bool = False,
    seed: int | None = None,
    image_size: int = 32,
    name: str | None = None,
) -> keras.Model:
    """Build a pre-activation ResNet classifier.

    mean/std: per-channel statistics in 0-255 pixel units. max_shift (pixels), shift_fill and
    flip configure the training-time augmentation. Output: float32 class probabilities, even
    under a mixed-precision policy.
    """
    if block not in ("bottleneck", "basic"):
        raise ValueError(f"block must be 'bottleneck' or 'basic', got {block!r}")
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="uint8", name="pixels")
    x = layers.Normalization(mean=list(mean), variance=[s * s for s in std], dtype="float32",
                             name="normalize")(inputs)
    if max_shift or flip:  # without augmentation the model holds stock Keras layers only
        x = RandomShiftFlip(max_shift, fill=shift_fill, flip=flip, seed=seed, name="augment")(x)
    x = _conv(stem_filters, 3, 1, l2, "stem_conv")(x)
    for stage, (width, stage_strides) in enumerate(zip(widths, strides, strict=True), start=1):
        for unit in range(1, units_per_stage + 1):
            x = _unit(x, block=block, width=width, strides=stage_strides if unit == 1 else 1, l2=l2,
                      name=f"stage{stage}_unit{unit}")
    x = _bn_relu(x, "final")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(num_classes, kernel_regularizer=keras.regularizers.l2(l2), name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probs")(x)
    depth = (3 if block == "bottleneck" else 2) * units_per_stage * len(widths) + 2
    return keras.Model(inputs, outputs, name=name or f"preact_resnet{depth}")


# The seed's network and the usual relatives; widths for basic blocks follow He et al. 2016.
_CIFAR = dict(num_classes=10, strides=(1, 2, 2), stem_filters=16, l2=1e-4)
resnet164 = partial(build_resnet, block="bottleneck", units_per_stage=18, widths=(64, 128, 256), **_CIFAR)
resnet1001 = partial(build_resnet, block="bottleneck", units_per_stage=111, widths=(64, 128, 256), **_CIFAR)
resnet20 = partial(build_resnet, block="basic", units_per_stage=3, widths=(16, 32, 64), **_CIFAR)
resnet56 = partial(build_resnet, block="basic", units_per_stage=9, widths=(16, 32, 64), **_CIFAR)
resnet110 = partial(build_resnet, block="basic", units_per_stage=18, widths=(16, 32, 64), **_CIFAR)
