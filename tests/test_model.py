"""Model structure: the seed's ResNet-164 exactly, named depths as parameters, raw-pixel input."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest

from pipeline import config, data, fitting, model
from tests.conftest import ROOT


def variant(params: str) -> keras.Model:
    """The model a params file describes, built as train builds it (without the augmentation layer)."""
    return fitting.make_model(config.load(params), data.make_synthetic(n_train=16, n_test=16), augment=False)


def trainable(m: keras.Model) -> int:
    return sum(int(np.prod(w.shape)) for w in m.trainable_weights)


def bottleneck_params(n: int, widths=(64, 128, 256), stem=16, classes=10) -> int:
    """Trainable parameters of the seed's pre-activation bottleneck ResNet (no conv biases).

    stem 3x3x3x16; per unit: BN(in) (gamma+beta), 1x1 in->w/4, BN, 3x3 w/4->w/4, BN,
    1x1 w/4->w; the first unit of each stage adds a 1x1 in->w projection; then a final
    BN(256) and Dense(256 -> 10) with bias. For n = 18:
      432 + 81,952 + 326,272 + 1,291,520 + 512 + 2,570 = 1,703,258.
    """
    total, c_in = 3 * 3 * 3 * stem, stem
    for w in widths:
        b = w // 4
        for unit in range(n):
            c = c_in if unit == 0 else w
            total += 2 * c + c * b + 2 * b + 9 * b * b + 2 * b + b * w
            if unit == 0:
                total += c * w
        c_in = w
    return total + 2 * c_in + c_in * classes + classes


def test_seed_resnet164_has_1703258_params_and_166_convs():
    m = variant("params/default.yaml")
    assert bottleneck_params(18) == 1_703_258
    assert trainable(m) == 1_703_258
    convs = [layer for layer in m.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 166  # stem + 3 stages x (18 units x 3 convs + 1 projection)
    assert all(not c.use_bias and c.kernel_regularizer is not None for c in convs)
    assert m.get_layer("logits").kernel_regularizer is not None
    assert m.name == "preact_resnet164"


@pytest.mark.parametrize(("n", "expected"), [(1, bottleneck_params(1)), (2, bottleneck_params(2))])
def test_depth_is_a_parameter(n, expected):
    m = model.build_resnet(num_classes=10, block="bottleneck", units_per_stage=n, widths=(64, 128, 256),
                           strides=(1, 2, 2), stem_filters=16, l2=1e-4)
    assert trainable(m) == expected
    assert m.name == f"preact_resnet{9 * n + 2}"


def test_basic_block_resnet20():
    m = variant("params/resnet20.yaml")
    # He et al. 2016 give 0.27M for ResNet-20. Here: stem 432; stage 1, 3 units of
    # BN(16) + 3x3 16->16 + BN(16) + 3x3 16->16 = 4,672 each -> 14,016; stage 2 (first unit
    # with a 1x1 16->32 projection) 14,432 + 2 x 18,560 = 51,552; stage 3, 57,536 + 2 x 73,984
    # = 205,504; final BN(64) 128 and Dense(64 -> 10) 650: 272,282 in all.
    assert trainable(m) == 272_282
    assert sum(isinstance(layer, keras.layers.Conv2D) for layer in m.layers) == 1 + 3 * 3 * 2 + 2


def test_takes_uint8_pixels_and_normalises_inside():
    mean, std = [120.0, 115.0, 100.0], [60.0, 62.0, 65.0]
    m = model.build_resnet(num_classes=4, block="basic", units_per_stage=1, widths=(8, 16), strides=(1, 2),
                           stem_filters=8, l2=0.0, mean=mean, std=std)
    assert m.inputs[0].dtype == "uint8"
    x = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    normalised = keras.Model(m.inputs, m.get_layer("normalize").output).predict(x, verbose=0)
    np.testing.assert_allclose(normalised, (x - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)
    probs = m.predict(x, verbose=0)
    assert probs.shape == (3, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_mixed_precision_outputs_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        m = model.build_resnet(num_classes=10, block="bottleneck", units_per_stage=1, widths=(16, 32),
                               strides=(1, 2), stem_filters=8, l2=1e-4)
        assert m.get_layer("stem_conv").compute_dtype == "float16"
        out = m(np.zeros((2, 32, 32, 3), np.uint8), training=True)
        assert out.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_resnet1001_builds_in_a_fresh_process():
    """Keras walks a functional graph recursively: ResNet-1001's ~3,400 layers overflowed Python's default recursion
    limit (RecursionError), so params/resnet1001.yaml never trained. Importing the package raises the limit."""
    code = ("from pipeline import config, data, fitting; "
            "m = fitting.make_model(config.load('params/resnet1001.yaml'), "
            "data.make_synthetic(n_train=16, n_test=16), augment=False); print(m.count_params())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-400:]
    assert int(out.stdout.split()[-1]) == 10_476_922  # 10.33M trainable; He et al.: 10.2M


@pytest.mark.parametrize(("base", "other", "key"), [
    ("train.schedule=cosine", "train.schedule=cosine train.lr_boundaries=[0.25] train.lr_decay=0.5",
     "train.lr_boundaries"),
    ("train.schedule=step train.lr_boundaries=[]", "train.schedule=step train.lr_boundaries=[] train.lr_decay=0.5",
     "train.lr_decay"),
    ("train.schedule=step train.lr_boundaries=[] train.lr_decay=1",
     "train.schedule=step train.lr_boundaries=[0.25, 0.5] train.lr_decay=1", "train.lr_boundaries"),
])
def test_a_schedule_param_listed_without_effect_leaves_the_lr_as_it_was(base, other, key):
    """config.inert_params lists what the train step warns of and compare hides: the lr at every step of the run must
    be the same for another value of it, or the list misleads."""
    lrs = []
    for overrides in (base, other):
        t = config.load("params/tiny.yaml", f"train.epochs=4 {overrides}").train
        schedule = fitting.learning_rate(t, steps_per_epoch=5)
        # as the optimizer holds it: float32 (a constant lr is a Python float until then)
        lrs.append([np.float32(schedule(step) if callable(schedule) else schedule) for step in range(20)])
    assert key in config.inert_params(config.load("params/tiny.yaml", f"train.epochs=4 {other}"))
    assert lrs[0] == lrs[1]


def test_the_model_and_optimizer_params_listed_without_effect_change_nothing_trained():
    """Preact's shape keys under resnet9, train.nesterov without momentum and train.shift_fill without shifts, which
    config.inert_params lists: the model and its weights, an SGD step and the augmentation are the same for another
    value of each."""
    from pipeline import augment

    dataset = data.make_synthetic(n_train=16, n_test=16)
    quick = "model.widths=[8, 8, 16, 16]"
    built = []
    for overrides in (quick, f"{quick} model.block=basic model.units_per_stage=2 model.strides=[2, 2] "
                             "model.stem_filters=8"):
        cfg = config.load("params/quick.yaml", overrides)
        keras.utils.set_random_seed(0)
        m = fitting.make_model(cfg, dataset)
        built.append((m.to_json(), m.get_weights()))
    assert {"model.block", "model.units_per_stage", "model.strides", "model.stem_filters"} <= set(
        config.inert_params(cfg))
    assert built[0][0] == built[1][0] and all(np.array_equal(a, b) for a, b in zip(*(w for _, w in built), strict=True))

    steps = []
    for nesterov in (False, True):
        variable = keras.Variable([1.0, -2.0])
        optimizer = keras.optimizers.SGD(0.1, momentum=0.0, nesterov=nesterov)
        for _ in range(3):
            optimizer.apply_gradients([(keras.ops.convert_to_tensor([0.5, 0.25]), variable)])
        steps.append(keras.ops.convert_to_numpy(variable))
    assert "train.nesterov" in config.inert_params(config.load(None, "train.momentum=0 train.nesterov=true"))
    np.testing.assert_array_equal(*steps)

    images = np.random.default_rng(0).random((4, 32, 32, 3)).astype("float32")
    views = [keras.ops.convert_to_numpy(augment.shift_flip(images, max_shift=0, fill=fill, seed=3))
             for fill in config.SHIFT_FILLS]
    assert "train.shift_fill" in config.inert_params(config.load(None, "train.shift=0 train.shift_fill=reflect"))
    assert all(np.array_equal(views[0], v) for v in views[1:])
