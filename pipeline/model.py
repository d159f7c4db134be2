"""ResNets for 32x32 images (pre-activation, and the conv-BN-ReLU ResNet-9) as pure Keras 3 models (no I/O).

The model takes raw uint8 RGB pixels, the same thing a served model receives:
uint8 -> per-channel normalisation (statistics fitted on the training images)
-> random shift/flip and cutout (training only) -> ResNet -> float32 softmax.

Named depths are parameters, not copies (see `config.resnet_depth`): bottleneck depth = 9n + 2
(n = 18: ResNet-164, n = 111: ResNet-1001), basic depth = 6n + 2 (n = 3, 9, 18: ResNet-20, 56, 110);
each is a params file (params/default.yaml, params/resnet*.yaml). ResNet-9 is fixed in depth, its
widths are the parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import keras
from keras import layers, ops

from pipeline.augment import RandomCutout, RandomShiftFlip
from pipeline.config import CONV_INITS, RESNET9_ZERO_INIT, resnet_depth


@keras.saving.register_keras_serializable(package="pipeline")
class GhostBatchNormalization(layers.BatchNormalization):
    """BatchNormalization whose training batches are normalised in ghost batches of `virtual_batch_size` images
    each (Hoffer et al. 2017; Page's ResNet-9 used 32 at batch 512): each ghost batch by its own mean and
    variance, a noisier normalisation that regularises like a small batch while the optimizer steps on the whole
    one. The moving statistics follow the mean of the ghost batches' moments; inference is stock BN.
    Channels last; a training batch must be a whole number of ghost batches (`train.drop_remainder`)."""

    def __init__(self, virtual_batch_size: int, **kwargs):
        super().__init__(**kwargs)
        if virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size}")
        if self.axis != -1:
            raise ValueError(f"GhostBatchNormalization normalises channels last (axis=-1), got axis={self.axis}")
        self.virtual_batch_size = int(virtual_batch_size)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        size = self.virtual_batch_size
        if inputs.shape[0] is not None and inputs.shape[0] % size:
            raise ValueError(f"{self.name}: a training batch of {inputs.shape[0]} is not a whole number of ghost "
                             f"batches of {size} (model.ghost_batch); train with whole batches "
                             f"(train.drop_remainder=true) whose size is a multiple of it")
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        channels = x.shape[-1]
        ghosts = ops.reshape(x, (-1, size, *x.shape[1:]))
        mean, variance = ops.moments(ghosts, axes=list(range(1, len(ghosts.shape) - 1)), keepdims=True)
        y = (ghosts - mean) * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            y = y * ops.cast(self.gamma, y.dtype)
        if self.center:
            y = y + ops.cast(self.beta, y.dtype)
        for moving, moment in ((self.moving_mean, mean), (self.moving_variance, variance)):
            moving.assign(moving * self.momentum
                          + ops.mean(ops.reshape(moment, (-1, channels)), axis=0) * (1.0 - self.momentum))
        return ops.cast(ops.reshape(y, ops.shape(x)), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "virtual_batch_size": self.virtual_batch_size}


def conv_initializer(name: str) -> keras.initializers.Initializer:
    """A conv kernel initialiser by name: Keras's own, or pytorch (uniform in +-1/sqrt(fan_in), the default of
    PyTorch's Conv2d; its variance is a sixth of he_normal's)."""
    if name not in CONV_INITS:
        raise ValueError(f"conv_init must be one of {', '.join(CONV_INITS)}, got {name!r}")
    if name == "pytorch":
        return keras.initializers.VarianceScaling(scale=1 / 3, mode="fan_in", distribution="uniform")
    return keras.initializers.get(name)


def _conv(filters: int, kernel_size: int, strides: int, name: str, *, l2: float, init: str,
          zero: bool = False) -> layers.Conv2D:
    """A bias-free conv; `zero` starts its kernel at 0 (the last conv of a zero-initialised residual branch)."""
    return layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                         kernel_initializer="zeros" if zero else conv_initializer(init),
                         kernel_regularizer=keras.regularizers.l2(l2), name=name)


def _bn(x, name: str, *, momentum: float, l2: float | None, ghost: int = 0):
    """BatchNormalization; `l2` also regularises gamma and beta; `ghost` > 0: in ghost batches of that many."""
    reg = keras.regularizers.l2(l2) if l2 else None
    kwargs = dict(momentum=momentum, gamma_regularizer=reg, beta_regularizer=reg, name=f"{name}_bn")
    return (GhostBatchNormalization(ghost, **kwargs) if ghost else layers.BatchNormalization(**kwargs))(x)


def _bn_relu(x, name: str, *, bn):
    return layers.Activation("relu", name=f"{name}_relu")(bn(x, name))


def _unit(x, *, block: str, width: int, strides: int, conv, bn, zero_init: bool, name: str):
    """One pre-activation unit. When the shape changes, the shortcut is a 1x1 projection taken
    after the unit's first BN-ReLU (as in the seed and He et al. 2016); otherwise identity.
    zero_init: the branch's last conv starts with a zero kernel, so the unit starts as the identity (timm's
    zero_init_last for pre-activation blocks). Not the BN gamma before that conv: a zero gamma feeds its ReLU
    exactly 0, whose gradient is 0, so gamma, beta and everything before them in the branch would never learn."""
    preact = _bn_relu(x, f"{name}_pre", bn=bn)
    project = strides != 1 or x.shape[-1] != width
    shortcut = conv(width, 1, strides, f"{name}_proj")(preact) if project else x
    if block == "bottleneck":
        y = conv(width // 4, 1, strides, f"{name}_conv1")(preact)
        y = conv(width // 4, 3, 1, f"{name}_conv2")(_bn_relu(y, f"{name}_mid1", bn=bn))
        y = conv(width, 1, 1, f"{name}_conv3", zero=zero_init)(_bn_relu(y, f"{name}_mid2", bn=bn))
    else:
        y = conv(width, 3, strides, f"{name}_conv1")(preact)
        y = conv(width, 3, 1, f"{name}_conv2", zero=zero_init)(_bn_relu(y, f"{name}_mid1", bn=bn))
    return layers.Add(name=f"{name}_add")([y, shortcut])


def _preact_body(x, *, block: str, units_per_stage: int, widths, strides, stem_filters: int, conv, bn,
                 zero_init: bool):
    x = conv(stem_filters, 3, 1, "stem_conv")(x)
    for stage, (width, stage_strides) in enumerate(zip(widths, strides, strict=True), start=1):
        for unit in range(1, units_per_stage + 1):
            x = _unit(x, block=block, width=width, strides=stage_strides if unit == 1 else 1, conv=conv, bn=bn,
                      zero_init=zero_init, name=f"stage{stage}_unit{unit}")
    x = _bn_relu(x, "final", bn=bn)
    return layers.GlobalAveragePooling2D(name="pool")(x)


def whitening_kernel(images, size: int = 2, eps: float = 5e-4):
    """A frozen patch-whitening stem's kernel (as in Keller Jordan's airbench): the eigenvectors of the
    covariance of `size`x`size` patches of (normalised, float) `images`, scaled by 1/sqrt(eigenvalue),
    each with its negation, so that after a ReLU no direction is lost. Shape (size, size, C, 2*size*size*C)."""
    import numpy as np

    x = np.asarray(images, dtype=np.float32)
    h, w, c = x.shape[1:]
    patches = np.stack([x[:, i:h - size + 1 + i, j:w - size + 1 + j] for i in range(size) for j in range(size)],
                       axis=-2).reshape(-1, size * size * c)
    values, vectors = np.linalg.eigh(np.cov(patches, rowvar=False, dtype=np.float64))
    kernel = (vectors / np.sqrt(values + eps)).reshape(size, size, c, -1)
    return np.concatenate([kernel, -kernel], axis=-1).astype("float32")


def _resnet9_body(x, *, widths, conv, bn, whiten=None, pool_before_bn: bool = False):
    """The conv-BN-ReLU ResNet-9 of the DAWNBench winners (Page's "How to train your ResNet"):
    prep conv, then three layers of conv-BN-ReLU + 2x2 max-pool, the first and last followed by a
    residual pair of conv-BN-ReLU; global max-pool; the classifier's logits are scaled by 1/8.
    widths = (prep, layer1, layer2, layer3). pool_before_bn: each layer is conv, max-pool, BN-ReLU instead
    (as airbench orders it): the max commutes with ReLU, and BN and ReLU run on a quarter of the pixels."""
    def conv_bn_relu(x, filters, name, pool=False):
        x = conv(filters, 3, 1, f"{name}_conv")(x)
        if pool and pool_before_bn:
            x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
        x = _bn_relu(x, name, bn=bn)
        if pool and not pool_before_bn:
            x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
        return x

    if whiten is None:
        x = conv_bn_relu(x, widths[0], "prep")
    else:
        stem = layers.Conv2D(whiten.shape[-1], whiten.shape[0], padding="valid", use_bias=True, trainable=False,
                             kernel_initializer=keras.initializers.Constant(0.0), name="whiten")
        x = layers.Activation("relu", name="whiten_relu")(stem(x))
        stem.kernel.assign(whiten)
    for i, (width, residual) in enumerate(zip(widths[1:], (True, False, True), strict=True), start=1):
        x = conv_bn_relu(x, width, f"layer{i}", pool=True)
        if residual:
            y = conv_bn_relu(conv_bn_relu(x, width, f"layer{i}_res1"), width, f"layer{i}_res2")
            x = layers.Add(name=f"layer{i}_add")([x, y])
    return layers.GlobalMaxPooling2D(name="pool")(x)


def build_resnet(
    *,
    num_classes: int,
    block: str = "bottleneck",
    units_per_stage: int = 18,
    widths: Sequence[int],
    strides: Sequence[int] = (1, 2, 2),
    stem_filters: int = 16,
    l2: float,
    arch: str = "preact",
    l2_norm_and_bias: bool = False,
    bn_momentum: float = 0.99,
    ghost_batch: int = 0,
    zero_init_residual: bool = False,
    conv_init: str = "he_normal",
    pool_before_bn: bool = False,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    max_shift: int = 0,
    shift_fill: str = "nearest",
    cutout: int = 0,
    whiten=None,
    flip: bool = False,
    seed: int | None = None,
    image_size: int = 32,
    name: str | None = None,
) -> keras.Model:
    """Build a ResNet classifier: `arch` preact (pre-activation, `block`/`units_per_stage`/`strides`/
    `stem_filters`) or resnet9 (4 `widths`).

    mean/std: per-channel statistics in 0-255 pixel units. max_shift (pixels), shift_fill, flip and
    cutout (the side in pixels of a square set to the mean, 0: none) configure the training-time
    augmentation. l2_norm_and_bias: l2 on BN parameters and biases too (else kernels only).
    conv_init: the conv kernels' initialiser (`conv_initializer`).
    whiten: a `whitening_kernel` for resnet9's frozen stem in place of its prep conv, or None.
    pool_before_bn: resnet9's layers pool straight after their conv, before BN-ReLU (`_resnet9_body`).
    ghost_batch: > 0, every BN normalises training batches in ghost batches of this many images
    (`GhostBatchNormalization`); 0: over the whole batch.
    Output: float32 class probabilities, even under a mixed-precision policy.
    """
    if arch not in ("preact", "resnet9"):
        raise ValueError(f"arch must be 'preact' or 'resnet9', got {arch!r}")
    if arch == "preact" and block not in ("bottleneck", "basic"):
        raise ValueError(f"block must be 'bottleneck' or 'basic', got {block!r}")
    if arch == "resnet9" and zero_init_residual:
        raise ValueError(f"zero_init_residual: {RESNET9_ZERO_INIT}")
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="uint8", name="pixels")
    x = layers.Normalization(mean=list(mean), variance=[s * s for s in std], dtype="float32",
                             name="normalize")(inputs)
    if max_shift or flip:  # without augmentation the model holds stock Keras layers only
        x = RandomShiftFlip(max_shift, fill=shift_fill, flip=flip, seed=seed, name="augment")(x)
    if cutout:  # one square per image, wholly inside it, at 0 (the mean after normalize)
        x = RandomCutout(cutout, seed=seed, name="cutout")(x)
    bn = partial(_bn, momentum=bn_momentum, l2=l2 if l2_norm_and_bias else None, ghost=ghost_batch)
    conv = partial(_conv, l2=l2, init=conv_init)
    if arch == "resnet9":
        x = _resnet9_body(x, widths=widths, conv=conv, bn=bn, whiten=whiten, pool_before_bn=pool_before_bn)
    else:
        x = _preact_body(x, block=block, units_per_stage=units_per_stage, widths=widths, strides=strides,
                         stem_filters=stem_filters, conv=conv, bn=bn, zero_init=zero_init_residual)
    depth = resnet_depth(arch=arch, block=block, units_per_stage=units_per_stage, stages=len(widths))
    bias_reg = keras.regularizers.l2(l2) if l2_norm_and_bias else None
    x = layers.Dense(num_classes, kernel_regularizer=keras.regularizers.l2(l2), bias_regularizer=bias_reg,
                     name="logits")(x)
    if arch == "resnet9":  # Page's fixed 1/8 on the logits: tames the max-pooled features early in training
        x = layers.Rescaling(0.125, name="logit_scale")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name=name or (f"resnet{depth}" if arch == "resnet9"
                                                      else f"preact_resnet{depth}"))

