"""Batched random shift + horizontal flip written with `keras.ops`.

It runs inside the compiled train step on whatever device holds the batch. Keras's own
RandomTranslation/RandomCrop layers set `supports_jit=False`, which silently turns XLA off
for the whole train step, so the shift is written here as two one-hot matmuls: exact
integer-pixel translations, no interpolation, any backend, jit-compatible.
"""

from __future__ import annotations

import keras
from keras import ops


def shift_flip(images, *, max_shift: int, fill: str = "nearest", flip: bool = True, seed=None):
    """Translate each image by integer (dy, dx) in [-max_shift, max_shift] and flip half of them.

    images: float (B, H, W, C). fill: "nearest" repeats the edge pixel (the seed's
    ImageDataGenerator default), "constant" fills with zeros (the paper's zero padding).
    seed: a `keras.random.SeedGenerator` (inside compiled steps) or an int, for reproducible draws.
    Returns a tensor of the same shape and dtype.
    """
    if not isinstance(seed, keras.random.SeedGenerator):
        seed = keras.random.SeedGenerator(seed)  # an int seed would give every draw the same numbers
    batch = ops.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    dy = keras.random.randint((batch,), -max_shift, max_shift + 1, seed=seed)
    dx = keras.random.randint((batch,), -max_shift, max_shift + 1, seed=seed)
    # Output row i reads source row i + dy; output column k reads (flipped) column k + dx.
    rows = ops.arange(height)[None, :] + dy[:, None]
    cols = ops.arange(width)[None, :]
    if flip:
        flipped = keras.random.uniform((batch,), seed=seed) < 0.5
        cols = ops.where(flipped[:, None], width - 1 - cols, cols)
    cols = cols + dx[:, None]
    if fill == "nearest":
        rows, cols = ops.clip(rows, 0, height - 1), ops.clip(cols, 0, width - 1)
    elif fill != "constant":
        raise ValueError(f"fill must be 'nearest' or 'constant', got {fill!r}")
    # one_hot of an out-of-range index is an all-zero row: that is the constant (zero) fill.
    select_rows = ops.one_hot(rows, height, dtype=images.dtype)  # (B, H_out, H_in)
    select_cols = ops.one_hot(cols, width, dtype=images.dtype)  # (B, W_out, W_in)
    shifted = ops.einsum("bij,bjwc->biwc", select_rows, images)
    return ops.einsum("bkw,biwc->bikc", select_cols, shifted)


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
