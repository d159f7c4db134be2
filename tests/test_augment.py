"""Augmentation: integer-pixel shifts with the chosen fill, fair flips, cutout squares, none at evaluation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.augment import RandomCutout, RandomShiftFlip, shift_flip
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
                elif fill == "reflect":  # numpy's own reflect padding, then the window
                    padded = np.pad(src, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="reflect")
                    expected = padded[max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]
                else:
                    expected = np.zeros_like(src)
                    ok_r, ok_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
                    expected[np.ix_(ok_r, ok_c)] = src[np.ix_(rows[ok_r], cols[ok_c])]
                if np.array_equal(expected, out):
                    return dy, dx, flipped
    return None


@pytest.mark.parametrize("fill", ["nearest", "constant", "reflect"])
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


def test_reflect_mirrors_about_the_edge_pixel():
    row = np.arange(1, 9, dtype=np.float32)  # one 1x8 image, one channel: 1 2 ... 8
    x = np.tile(row[None, None, :, None], (64, 8, 1, 1))
    out = keras.ops.convert_to_numpy(shift_flip(x, max_shift=2, fill="reflect", flip=False, seed=5))
    rows = {tuple(o[0, :, 0]) for o in out}
    assert (3, 2, 1, 2, 3, 4, 5, 6) in rows or (2, 1, 2, 3, 4, 5, 6, 7) in rows  # shifted right: 2, 1 mirrored in
    assert all(set(r) <= set(row) for r in rows) and len(rows) == 5  # dx in -2..2, nothing but image pixels


def test_cutout_sets_one_square_of_the_given_side_to_the_mean_in_training_only():
    kwargs = dict(num_classes=10, arch="resnet9", widths=(8, 8, 8, 8), l2=0.0)
    model = build_resnet(**kwargs, cutout=8, seed=0)
    layer = model.get_layer("cutout")
    x = np.ones((200, 32, 32, 3), dtype=np.float32)  # normalised images; cutout writes 0, the mean
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    corners = set()
    for image in out:
        zero = (image == 0).all(-1)
        assert (image == 0).any(-1).sum() == zero.sum() == 64  # all channels, 8 x 8 pixels, nothing else
        rows, cols = np.nonzero(zero.any(1))[0], np.nonzero(zero.any(0))[0]
        assert len(rows) == len(cols) == 8 and rows[-1] - rows[0] == cols[-1] - cols[0] == 7  # one square
        corners.add((rows[0], cols[0]))
    assert len(corners) > 50 and len({r for r, _ in corners}) > 15  # at random among the 25 x 25 inside
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    assert "cutout" not in {layer.name for layer in build_resnet(**kwargs).layers}


def test_cutout_squares_are_placed_uniformly_over_every_place_inside_the_image():
    """Keras's RandomErasing (the cutout before) drew its start as a float and erased from the next whole pixel:
    corners 1..24 only, so row 0 and column 0 were never erased."""
    side, n = 8, 8000
    out = keras.ops.convert_to_numpy(RandomCutout(side, seed=0)(np.ones((n, 32, 32, 1), np.float32), training=True))
    zero = out[..., 0] == 0
    assert (zero.sum((1, 2)) == side * side).all()  # exactly side x side pixels in every image
    rows, cols = zero.any(2), zero.any(1)
    assert (rows.sum(1) == side).all() and (cols.sum(1) == side).all()
    places = 32 - side + 1
    for axis in (rows, cols):
        first = np.bincount(axis.argmax(1), minlength=32)
        assert (first[:places] > 0.7 * n / places).all() and first[places:].sum() == 0  # corners 0..24, uniform
        covered = np.array([min(i, places - 1) - max(0, i - side + 1) + 1 for i in range(32)]) / places
        np.testing.assert_allclose(axis.mean(0), covered, atol=0.025)  # row 0: 1/25, middle rows 8/25
    assert zero[:, 0, 0].any() and zero[:, -1, -1].any() and zero[:, 0, -1].any() and zero[:, -1, 0].any()


def test_cutout_is_seeded_and_draws_apart_from_the_shifts():
    """Same seed, same squares; but not the shifts' own numbers: from one seed both layers drew the same keys, and
    every square's row was then a function of its image's vertical shift."""
    x = distinct_images(2000, size=32)
    a, b = (keras.ops.convert_to_numpy(RandomCutout(8, seed=3)(x, training=True)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    shifted = keras.ops.convert_to_numpy(RandomShiftFlip(2, flip=False, seed=3)(x, training=True))
    dy = np.round((shifted[:, 16, 16, 0] - x[:, 16, 16, 0]) / 96)  # distinct_images: a row is 96, a column 3
    top = (a == 0).all(-1).any(2).argmax(1)
    assert set(np.unique(dy)) == {-2, -1, 0, 1, 2}
    assert np.mean(top % 5 == dy + 2) < 0.3  # independent draws: 1/5 (from the shifts' keys: always)


def test_a_model_with_cutout_and_reflect_shifts_saves_and_loads(tmp_path):
    """A killed run resumes from a saved model: the augmentation layers must come back as they were."""
    model = build_resnet(num_classes=10, arch="resnet9", widths=(8, 8, 8, 8), l2=0.0, cutout=12, max_shift=2,
                         shift_fill="reflect", flip=True, seed=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("cutout").side == 12
    assert (loaded.get_layer("augment").fill, loaded.get_layer("augment").max_shift) == ("reflect", 2)
    x = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
