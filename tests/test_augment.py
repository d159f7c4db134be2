"""Augmentation: integer-pixel shifts with the chosen fill, fair flips, none at evaluation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.augment import RandomShiftFlip, shift_flip
from pipeline.model import build_resnet


def distinct_images(n: int, size: int = 8) -> np.ndarray:
    """Images whose pixels are all different, so any shift/flip can be identified exactly."""
    return np.arange(n * size * size * 3, dtype=np.float32).reshape(n, size, size, 3) + 1.0


def find_transform(original: np.ndarray, out: np.ndarray, max_shift: int, fill: str):
    """The (dy, dx, flipped) that maps original to out, by brute force with numpy."""
    h, w = original.shape[:2]
    for flipped in (False, True):
        src = original[:, ::-1] if flipped else original
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                rows, cols = np.arange(h) + dy, np.arange(w) + dx
                if fill == "nearest":
                    expected = src[np.clip(rows, 0, h - 1)][:, np.clip(cols, 0, w - 1)]
                else:
                    expected = np.zeros_like(src)
                    ok_r, ok_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
                    expected[np.ix_(ok_r, ok_c)] = src[np.ix_(rows[ok_r], cols[ok_c])]
                if np.array_equal(expected, out):
                    return dy, dx, flipped
    return None


@pytest.mark.parametrize("fill", ["nearest", "constant"])
def test_every_output_is_an_integer_shift_with_the_chosen_fill(fill):
    x = distinct_images(64)
    out = keras.ops.convert_to_numpy(shift_flip(x, max_shift=2, fill=fill, seed=7))
    assert out.shape == x.shape and out.dtype == np.float32
    transforms = [find_transform(x[i], out[i], 2, fill) for i in range(len(x))]
    assert all(t is not None for t in transforms)
    assert len({(dy, dx) for dy, dx, _ in transforms}) > 10  # shifts are actually drawn at random
    values = set(np.unique(out))
    assert values <= set(np.unique(x)) | ({0.0} if fill == "constant" else set())


def test_flips_happen_about_half_the_time():
    x = distinct_images(400, size=6)
    out = keras.ops.convert_to_numpy(shift_flip(x, max_shift=0, flip=True, seed=3))
    flipped = [bool(np.array_equal(out[i], x[i, :, ::-1])) for i in range(len(x))]
    assert all(f or np.array_equal(out[i], x[i]) for i, f in enumerate(flipped))
    assert 160 <= sum(flipped) <= 240  # Binomial(400, 0.5): mean 200, sd 10


def test_no_flip_and_no_shift_is_identity():
    x = distinct_images(4)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(shift_flip(x, max_shift=0, flip=False, seed=1)), x)


def test_layer_acts_only_in_training():
    layer = RandomShiftFlip(4, seed=0)
    x = distinct_images(8, size=32)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    assert not np.array_equal(keras.ops.convert_to_numpy(layer(x, training=True)), x)


def test_evaluation_applies_no_augmentation():
    kwargs = dict(num_classes=10, block="basic", units_per_stage=1, widths=(8, 16), strides=(1, 2),
                  stem_filters=8, l2=0.0)
    augmented = build_resnet(**kwargs, max_shift=4, flip=True, seed=0)
    plain = build_resnet(**kwargs)
    for layer in plain.layers:
        if layer.weights:
            layer.set_weights(augmented.get_layer(layer.name).get_weights())
    x = np.random.default_rng(0).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(augmented.predict(x, verbose=0), plain.predict(x, verbose=0), rtol=1e-6)
    np.testing.assert_allclose(augmented.predict(x, verbose=0), augmented.predict(x, verbose=0), rtol=1e-6)
