"""Batched random shift + horizontal flip, and cutout, written with `keras.ops`.

It runs inside the compiled train step on whatever device holds the batch. Keras's own
RandomTranslation/RandomCrop layers set `supports_jit=False`, which silently turns XLA off
for the whole train step, so the shift is written here as one batched gather: exact
integer-pixel translations, no interpolation, any backend, jit-compatible.

Below them, the test-time views (`tta_views`): plain numpy on the host, for evaluate, the served model and
bench.gpu_epoch (which runs where MLflow is absent).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from pipeline.config import SHIFT_FILLS, TTA_MODES


def _reflect(index, size: int):
    """Mirror integer indices about the first and last pixel: -1 -> 1, size -> size - 2."""
    return (size - 1) - ops.abs((size - 1) - ops.abs(index))


def replica_draws(batch):
    """(rows to draw, the function that keeps this replica's own) for a random draw of one row per image of `batch`.

    Under a `tf.distribute` strategy each replica runs the augmentation on its slice of the global batch from the same
    seed state (a `SeedGenerator`'s state is one mirrored variable), so every replica drew the same numbers: with R
    replicas, image k of each slice got the same shift, flip and cutout square, R times fewer draws per step than on
    one device. There each replica draws for all R slices and keeps the rows of its own (an epoch's last batch, split
    unevenly, may repeat a row between neighbours). Elsewhere (one device, JAX's DataParallel: one program over the
    whole batch): `batch` rows, all kept."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            first = context.replica_id_in_sync_group * batch
            return batch * context.num_replicas_in_sync, lambda drawn: drawn[first:first + batch]
    return batch, lambda drawn: drawn


def shift_flip(images, *, max_shift: int, fill: str = "nearest", flip: bool = True, seed=None):
    """Translate each image by integer (dy, dx) in [-max_shift, max_shift] and flip half of them.

    images: float (B, H, W, C). fill: "nearest" repeats the edge pixel (the seed's
    ImageDataGenerator default), "constant" fills with zeros (the paper's zero padding), "reflect"
    mirrors the image about its edge pixel (numpy's and PyTorch's "reflect" padding).
    seed: a `keras.random.SeedGenerator` (inside compiled steps) or an int, for reproducible draws.
    Returns a tensor of the same shape and dtype.
    """
    if fill not in SHIFT_FILLS:
        raise ValueError(f"fill must be one of {', '.join(SHIFT_FILLS)}, got {fill!r}")
    if not isinstance(seed, keras.random.SeedGenerator):
        seed = keras.random.SeedGenerator(seed)  # an int seed would give every draw the same numbers
    batch = ops.shape(images)[0]
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    draws, mine = replica_draws(batch)
    dy = mine(keras.random.randint((draws,), -max_shift, max_shift + 1, seed=seed))
    dx = mine(keras.random.randint((draws,), -max_shift, max_shift + 1, seed=seed))
    # Output row i reads source row i + dy; output column k reads (flipped) column k + dx.
    rows = ops.arange(height)[None, :] + dy[:, None]
    cols = ops.arange(width)[None, :]
    if flip:
        flipped = mine(keras.random.uniform((draws,), seed=seed)) < 0.5
        cols = ops.where(flipped[:, None], width - 1 - cols, cols)
    cols = cols + dx[:, None]
    # One gather of every output pixel from its source, clipped ("nearest", "constant") or mirrored
    # ("reflect") into the image. It is ~4x faster on CPU than two one-hot matmuls and exact.
    if fill == "reflect":  # i -> -i below 0, 2(n-1) - i above n-1 (shifts are < n, so one bounce)
        src_rows, src_cols = _reflect(rows, height), _reflect(cols, width)
    else:
        src_rows, src_cols = ops.clip(rows, 0, height - 1), ops.clip(cols, 0, width - 1)
    source = src_rows[:, :, None] * width + src_cols[:, None, :]
    flat = ops.reshape(images, (batch, height * width, channels))
    out = ops.reshape(ops.take_along_axis(flat, ops.reshape(source, (batch, height * width, 1)), axis=1),
                      (batch, height, width, channels))
    if fill == "constant":  # zero where the source pixel lies outside the image
        inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        out = out * ops.cast(inside[..., None], out.dtype)
    return out


@keras.saving.register_keras_serializable(package="pipeline")
class RandomShiftFlip(keras.layers.Layer):
    """`shift_flip` as a layer that acts only in training; inference passes images through."""

    def __init__(self, max_shift: int, fill: str = "nearest", flip: bool = True, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_shift, self.fill, self.flip, self.seed = max_shift, fill, flip, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training or (self.max_shift == 0 and not self.flip):
            return inputs
        return shift_flip(inputs, max_shift=self.max_shift, fill=self.fill, flip=self.flip, seed=self.seed_generator)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_shift": self.max_shift, "fill": self.fill, "flip": self.flip,
                "seed": self.seed}


def cutout(images, *, side: int, seed=None):
    """Set one `side` x `side` square of each image to 0 (the mean after normalisation), wholly inside the image:
    its top-left corner uniform over all (H - side + 1) x (W - side + 1) places (Page's and airbench's cutout;
    DeVries & Taylor's centre falls anywhere and the square is clipped at the border). Integer corners: Keras's
    `RandomErasing` draws its start as a float and erases from the next whole pixel, so it never reached row 0
    or column 0. images: float (B, H, W, C); seed: a `keras.random.SeedGenerator` or an int, as `shift_flip`'s."""
    if not isinstance(seed, keras.random.SeedGenerator):
        seed = keras.random.SeedGenerator(seed)
    batch = ops.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    draws, mine = replica_draws(batch)
    top = mine(keras.random.randint((draws, 1), 0, height - side + 1, seed=seed))
    left = mine(keras.random.randint((draws, 1), 0, width - side + 1, seed=seed))
    rows, cols = ops.arange(height)[None, :] - top, ops.arange(width)[None, :] - left
    square = ((rows >= 0) & (rows < side))[:, :, None] & ((cols >= 0) & (cols < side))[:, None, :]
    return ops.where(square[..., None], ops.zeros_like(images), images)


@keras.saving.register_keras_serializable(package="pipeline")
class RandomCutout(keras.layers.Layer):
    """`cutout` as a layer that acts only in training; inference passes images through. Its draws come from
    seed + 1: from `seed` itself they would repeat `RandomShiftFlip`'s, the corners tied to the shifts."""

    def __init__(self, side: int, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.side, self.seed = side, seed
        self.seed_generator = keras.random.SeedGenerator(None if seed is None else seed + 1)

    def call(self, inputs, training=False):
        if not training or self.side == 0:
            return inputs
        return cutout(inputs, side=self.side, seed=self.seed_generator)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "side": self.side, "seed": self.seed}


def shift_diagonal(pixels: np.ndarray, step: int, fill: str = "nearest", zero=None) -> np.ndarray:
    """Images (n, h, w, c) moved `step` pixels down and right (negative: up and left), the uncovered border
    filled as the training shifts' `fill` fills it (`shift_flip`), so a test view shows the model no border it
    never trained on: "nearest" repeats the edge pixels, "reflect" mirrors the image about them, "constant" is
    `zero`, the per-channel pixel the model normalises to 0 (`normalized_zero`): the training shift writes its
    zeros after normalisation, so they are the mean, not black. uint8 pixels get `zero` rounded."""
    if fill not in SHIFT_FILLS:
        raise ValueError(f"fill must be one of {', '.join(SHIFT_FILLS)}, got {fill!r}")
    pad = abs(step)
    padded = np.pad(pixels, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect" if fill == "reflect" else "edge")
    if fill == "constant":
        if zero is None:
            raise ValueError("fill 'constant' needs `zero`, the pixel the model normalises to 0")
        zero = np.asarray(zero)
        if np.issubdtype(pixels.dtype, np.integer):  # numpy would truncate 125.9 to 125
            zero = np.rint(zero)
        zero = zero.astype(pixels.dtype)
        padded[:, :pad] = padded[:, -pad:] = zero
        padded[:, :, :pad] = padded[:, :, -pad:] = zero
    h, w = pixels.shape[1:3]
    return padded[:, pad - step:pad - step + h, pad - step:pad - step + w]


def normalized_zero(model: keras.Model) -> np.ndarray:
    """The per-channel pixel that `model`'s input normalisation (its `normalize` layer, `build_resnet`) maps to 0:
    its mean, what a "constant" training shift fills with."""
    return np.ravel(keras.ops.convert_to_numpy(model.get_layer("normalize").mean))


def tta_views(pixels: np.ndarray, tta: str, fill: str = "nearest", zero=None) -> list[np.ndarray]:
    """The views of a batch that `tta` averages: none [images]; flip + their mirror images;
    flip_shift + both of those shifted one pixel down-right and one up-left (6 views), their uncovered border
    filled as the model's training shifts filled it (`fill`, `zero`: see `shift_diagonal`)."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    if tta == "none":
        return [pixels]
    mirror = pixels[:, :, ::-1]
    if tta == "flip":
        return [pixels, mirror]
    return [pixels, mirror, *(shift_diagonal(v, step, fill, zero) for step in (1, -1) for v in (pixels, mirror))]
