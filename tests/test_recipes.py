"""Recipes: lr schedules that follow `epochs`, the ResNet-9, and each training trick as a param."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline import augment, config, data, fitting, model, serve, train


def trainable(m: keras.Model) -> int:
    return sum(int(np.prod(w.shape)) for w in m.trainable_weights)


def lr_at(schedule, step: int) -> float:
    return float(keras.ops.convert_to_numpy(schedule(step))) if callable(schedule) else float(schedule)


def test_step_schedule_decays_at_the_fractions_of_any_length():
    for epochs, boundaries in ((150, (80, 120)), (30, (16, 24))):
        t = config.load(None, f"train.epochs={epochs}").train
        schedule = fitting.learning_rate(t, steps_per_epoch=10)
        # the lr of epoch e (1-based) is the value at its first step, (e - 1) * 10
        per_epoch = [lr_at(schedule, (e - 1) * 10) for e in range(1, epochs + 1)]
        first_low = [e for e in range(1, epochs + 1) if per_epoch[e - 1] < 0.1 - 1e-9][0]
        assert first_low == boundaries[0] + 1
        assert per_epoch[boundaries[1] - 1] == pytest.approx(0.01)
        assert per_epoch[boundaries[1]] == pytest.approx(0.001)


def test_constant_lr_is_a_plain_number():
    assert fitting.learning_rate(config.load(None, "train.lr_boundaries=[]").train, 10) == 0.1


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_warmup_then_decay_to_zero(schedule):
    t = config.load(None, f"train.schedule={schedule} train.warmup=0.2 train.epochs=10 train.lr=0.4").train
    lr = fitting.learning_rate(t, steps_per_epoch=100)  # 1000 steps, 200 of warm-up
    assert lr_at(lr, 0) == pytest.approx(0.0, abs=1e-6)
    assert lr_at(lr, 100) == pytest.approx(0.2, rel=1e-3)  # half-way up, linearly
    assert lr_at(lr, 200) == pytest.approx(0.4, rel=1e-3)  # the peak
    middle = lr_at(lr, 600)  # half-way down: cosine and linear both give half the peak
    assert middle == pytest.approx(0.2, rel=1e-2)
    assert lr_at(lr, 400) > (0.3 if schedule == "cosine" else 0.29)  # cosine stays high longer
    assert lr_at(lr, 1000) == pytest.approx(0.0, abs=1e-6)
    values = [lr_at(lr, s) for s in range(200, 1001, 50)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("boundaries", ["[0.5]", "[]"])
def test_step_schedule_warms_up_when_asked(boundaries):
    """Goyal et al.'s gradual warm-up in front of the step schedule (it used to be ignored without a word)."""
    t = config.load(None, f"train.warmup=0.1 train.epochs=10 train.lr_boundaries={boundaries}").train
    lr = fitting.learning_rate(t, steps_per_epoch=100)  # 1000 steps, 100 of warm-up
    assert [lr_at(lr, s) for s in (0, 50, 100, 499)] == pytest.approx([0.0, 0.05, 0.1, 0.1], abs=1e-6)
    assert lr_at(lr, 500) == pytest.approx(0.01 if boundaries != "[]" else 0.1)  # the decay where it was
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(lr))
    assert [lr_at(again, s) for s in (50, 500)] == [lr_at(lr, s) for s in (50, 500)]


@pytest.mark.parametrize("schedule", ["step", "cosine", "onecycle"])
def test_a_warmup_rounding_to_the_whole_run_still_reaches_the_peak(schedule):
    """train.warmup 0.8 of a 2-step run rounded to 2 steps of warm-up: the lr went 0, then half of train.lr, and
    the run never trained at its peak. The warm-up now ends by the run's last step."""
    t = config.load(None, f"train.schedule={schedule} train.warmup=0.8 train.epochs=2 train.lr=0.4 "
                          f"train.lr_boundaries=[]").train
    lr = fitting.learning_rate(t, steps_per_epoch=1)
    assert [lr_at(lr, s) for s in (0, 1)] == pytest.approx([0.0, 0.4])
    longer = fitting.learning_rate(t, steps_per_epoch=10)  # 16 of 20 steps: as it was
    assert [lr_at(longer, s) for s in (8, 16)] == pytest.approx([0.2, 0.4])


@pytest.mark.parametrize(("epochs", "steps"), [(10, 10), (150, 391), (10, 7)])
def test_a_step_schedules_warmup_ending_at_its_first_decay_reaches_the_peak_before_it(epochs, steps):
    """train.warmup ending at the first decay (warmup * epochs = its epoch: allowed, as the lr reaches train.lr) ramped
    up to (n - 1)/n of the peak and decayed at the next step: 10 steps an epoch never got past 0.098 of 0.1."""
    t = config.load(None, f"train.epochs={epochs} train.lr_boundaries=[0.5] train.warmup=0.5").train
    lr = fitting.learning_rate(t, steps_per_epoch=steps)
    last = epochs // 2 * steps - 1  # the first decay's step: its epoch's last step, at the undecayed lr
    assert lr_at(lr, last) == pytest.approx(0.1)
    assert lr_at(lr, last + 1) == pytest.approx(0.01)
    assert 0 < lr_at(lr, last - 1) < 0.1 and lr_at(lr, 0) == 0.0  # still a linear ramp from 0


def test_a_warmup_ending_at_a_decay_after_the_first_step_says_it_is_none(capsys):
    """A 2-step run decaying after its first step: that warm-up's ramp never left 0, and the lr went 0, then 0.01."""
    t = config.load(None, "train.epochs=2 train.lr_boundaries=[0.5] train.warmup=0.5").train
    lr = fitting.learning_rate(t, steps_per_epoch=1)
    assert [lr_at(lr, s) for s in (0, 1)] == pytest.approx([0.1, 0.01])
    assert capsys.readouterr().err == ("warning: train.warmup 0.5 ends at the step schedule's first decay, after the "
                                       "run's first optimizer step: no warm-up, the lr starts at its peak\n")


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_no_warmup_starts_at_the_peak(schedule):
    t = config.load(None, f"train.schedule={schedule} train.warmup=0 train.epochs=10 train.lr=0.4").train
    assert lr_at(fitting.learning_rate(t, steps_per_epoch=100), 0) == pytest.approx(0.4)  # not a first step at 0


@pytest.mark.parametrize("steps_per_epoch", [5, 7])
def test_a_warmup_of_a_half_step_rounds_up_at_any_length(steps_per_epoch):
    """train.warmup 0.5 of a run of an odd number of steps (2.5 of 5, 3.5 of 7) warmed up over 2 and 4 steps:
    Python's round() takes halves to even. Halves round up, as the step schedule's boundaries do."""
    t = config.load(None, "train.schedule=cosine train.warmup=0.5 train.epochs=1 train.lr=0.4").train
    warmup = (steps_per_epoch + 1) // 2
    lr = fitting.learning_rate(t, steps_per_epoch=steps_per_epoch)
    assert lr.warmup_steps == warmup
    assert lr_at(lr, warmup - 1) < 0.4 and lr_at(lr, warmup) == pytest.approx(0.4)


@pytest.mark.parametrize("schedule", ["step", "cosine", "onecycle"])
def test_a_warmup_too_short_for_one_step_says_it_is_none(schedule, capsys):
    """fast.yaml's warm-up of 0.2 over a toy run's 2 steps (bench/gpu.sh's smoke: 512 images, 2 epochs at batch 512)
    rounded to 0 steps: the lr started at its peak, as with no warm-up, and nothing said so."""
    t = config.load(None, f"train.schedule={schedule} train.warmup=0.2 train.epochs=2 train.lr=0.4 "
                          f"train.lr_boundaries=[]").train
    lr = fitting.learning_rate(t, steps_per_epoch=1)
    assert lr_at(lr, 0) == pytest.approx(0.4)  # at the peak from the first step
    assert capsys.readouterr().err == ("warning: train.warmup 0.2 rounds to 0 of the run's 2 optimizer steps: no "
                                       "warm-up, the lr starts at its peak (at least 1/2 warms up over one step)\n")
    assert lr_at(fitting.learning_rate(t, steps_per_epoch=3), 0) == 0.0  # 6 steps: 1 of warm-up, starting at 0
    assert capsys.readouterr().err == ""
    one = config.load(None, f"train.schedule={schedule} train.warmup=0.2 train.epochs=1 train.lr=0.4 "
                            f"train.lr_boundaries=[]").train
    fitting.learning_rate(one, steps_per_epoch=1)  # a one-step run: no warm-up a train.warmup < 1 could give
    assert capsys.readouterr().err == ("warning: train.warmup 0.2 rounds to 0 of the run's 1 optimizer steps: no "
                                       "warm-up, the lr starts at its peak (one step has no room for one)\n")


def test_a_warmup_too_short_for_one_step_is_said_once_whatever_the_cpu_probe_builds(capsys, monkeypatch, tmp_path):
    """`train.precision: auto` on a CPU builds the run's model once per candidate to time it (`pipeline.cpu_probe`):
    each build printed the warm-up's warning again, five lines for one run."""
    from pipeline import cpu_probe
    from pipeline.distribute import distribution

    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    built = []

    def measure(candidates, build, x, y):  # what cpu_probe.measure builds, without timing its steps
        built.extend(build(*c) for c in candidates)
        return {cpu_probe.label(c): 1.0 for c in candidates}

    monkeypatch.setattr(cpu_probe, "measure", measure)
    cfg = config.load("params/tiny.yaml", "train.epochs=1 train.batch_size=64 train.warmup=0.2 "
                                          "train.precision=auto train.jit_compile=auto")
    fitting.compile_model(cfg, data.make_synthetic(n_train=64, n_test=10), distribution("none"), 64)
    assert len(built) >= 2  # the probe built its candidates
    assert capsys.readouterr().err.count("warning: train.warmup 0.2 rounds to 0") == 1


@pytest.mark.parametrize(("overrides", "warned"), [
    ("train.batch_size=256 train.lr_scaling=linear", True),
    ("train.batch_size=256", False),  # no scaling: the batch is the training images, and the lr is train.lr
    ("train.batch_size=64 train.lr_scaling=linear", False),  # a whole batch of 64
])
def test_linear_lr_scaling_for_a_batch_larger_than_the_training_images_says_so(capsys, overrides, warned):
    """`train.lr_scaling: linear` scales train.lr by train.batch_size / 128, but no batch is larger than the training
    images: 64 of them at batch 256 trained each step on 64 at the lr of 256, 4x what the rule gives, unsaid."""
    from pipeline.distribute import distribution

    cfg = config.load("params/tiny.yaml", f"train.epochs=1 {overrides}")
    fitting.compile_model(cfg, data.make_synthetic(n_train=64, n_test=10), distribution("none"), 64)
    expected = ("warning: train.lr_scaling linear scales train.lr 0.05 to 0.1 for batches of train.batch_size 256, "
                "but the 64 training images make one batch of 64 (0.025 by the rule): lower train.batch_size to at "
                "most 64, or train on more images\n")
    assert capsys.readouterr().err == (expected if warned else "")


def test_resnet9_is_the_dawnbench_network_at_any_width():
    m = model.build_resnet(num_classes=10, arch="resnet9", widths=(16, 32, 64, 128), l2=5e-4)
    # prep 3x3 3->16 + BN; layer1 3x3 16->32 + BN, two residual 3x3 32->32 + BN; layer2 3x3 32->64 + BN;
    # layer3 3x3 64->128 + BN, two residual 3x3 128->128 + BN; Dense 128->10 with bias:
    # 464 + 4,672 + 2 x 9,280 + 18,560 + 73,984 + 2 x 147,712 + 1,290 = 412,954
    assert trainable(m) == 412_954
    assert m.name == "resnet9"
    convs = [layer for layer in m.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 8 and all(c.kernel_regularizer is not None for c in convs)
    wide = model.build_resnet(num_classes=10, arch="resnet9", widths=(64, 128, 256, 512), l2=5e-4)
    assert 6_500_000 < trainable(wide) < 6_600_000  # Page's ResNet-9: 6.57M
    assert config.load(None, "model.arch=resnet9 model.widths=[64,128,256,512]").run_name().startswith("resnet9-")


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_zero_init_residual_starts_each_residual_branch_at_identity(block):
    kwargs = dict(num_classes=10, arch="preact", block=block, units_per_stage=2, widths=(16, 32), strides=(1, 2),
                  l2=0.0)
    on, off = model.build_resnet(zero_init_residual=True, **kwargs), model.build_resnet(**kwargs)
    last = "conv2" if block == "basic" else "conv3"
    zero = sorted(layer.name for layer in on.layers if isinstance(layer, keras.layers.Conv2D)
                  and not np.any(layer.kernel.numpy()))
    assert zero == [f"stage{s}_unit{u}_{last}" for s in (1, 2) for u in (1, 2)]  # each branch's last conv
    assert not any(isinstance(layer, keras.layers.Conv2D) and not np.any(layer.kernel.numpy()) for layer in off.layers)
    # a unit with an identity shortcut starts as the identity: its output is its input
    unit = keras.Model(on.get_layer("stage1_unit1_add").output, on.get_layer("stage1_unit2_add").output)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 16)).astype("float32")
    assert np.array_equal(keras.ops.convert_to_numpy(unit(x, training=True)), x)


def test_resnet9_refuses_zero_init_residual_whose_branch_could_never_learn():
    with pytest.raises(config.ConfigError, match="model.zero_init_residual: must be false for model.arch resnet9"):
        config.load("params/fast.yaml", "model.zero_init_residual=true")
    with pytest.raises(ValueError, match="zero_init_residual"):
        model.build_resnet(num_classes=10, arch="resnet9", widths=(8, 16, 32, 64), l2=0.0, zero_init_residual=True)


# Each profile at a tiny size (the same layers and tricks), l2 off so that only the loss moves a weight.
TINY = {"resnet9": "model.widths=[8,16,32,64]", "basic": "model.units_per_stage=2 model.widths=[8,16,32]",
        "bottleneck": "model.units_per_stage=2 model.widths=[16,32,64]"}
NEVER_MOVED: dict[str, list[str]] = {}  # a tiny model's digest -> its weights that a few steps left unmoved


@pytest.mark.parametrize("profile", sorted(p.stem for p in Path("params").glob("*.yaml")
                                           if not p.stem.startswith("sweep")))
def test_every_trainable_weight_of_every_profile_learns(profile):
    """A few SGD steps move every trainable weight of each profile's model. A weight the loss cannot reach is a
    layer the profile pays for and never trains: zero-initialised BN gammas in front of a ReLU were such weights
    (the ReLU's gradient at 0 is 0), and they left quick and fast training without their residual branches."""
    base = config.load(f"params/{profile}.yaml")
    shape = "resnet9" if base.model.arch == "resnet9" else base.model.block
    cfg = config.load(f"params/{profile}.yaml", f"{TINY[shape]} model.l2=0")
    dataset = data.make_synthetic(n_train=256, n_test=16, seed=0)
    keras.utils.set_random_seed(0)
    m = fitting.make_model(cfg, dataset)
    # Profiles whose tiny models are the same model (every layer's config, initialisers included, and the same seed:
    # default and resnet1001; resnet20, 56 and 110) train the same way: the first one's steps answer for the others
    same = hashlib.sha256(m.to_json().encode()).hexdigest()
    if same not in NEVER_MOVED:
        m.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="sparse_categorical_crossentropy")
        before = [w.numpy().copy() for w in m.trainable_weights]
        m.fit(dataset.x_train, dataset.y_train, batch_size=64, epochs=2, verbose=0)
        NEVER_MOVED[same] = [w.path for w, b in zip(m.trainable_weights, before, strict=True)
                             if np.array_equal(w.numpy(), b)]
    assert not NEVER_MOVED[same], f"{profile}: never moved: {NEVER_MOVED[same]}"


@pytest.mark.parametrize("arch", ["preact", "resnet9"])
def test_conv_init_pytorch_draws_every_conv_kernel_uniformly_within_one_over_sqrt_fan_in(arch):
    widths = (16, 32, 64, 128) if arch == "resnet9" else (16, 32)
    kwargs = dict(num_classes=10, arch=arch, block="basic", units_per_stage=2, widths=widths, strides=(1, 2), l2=0.0)
    he, torch = model.build_resnet(**kwargs), model.build_resnet(conv_init="pytorch", **kwargs)
    convs = [layer.name for layer in he.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) >= 8
    for name in convs:
        k_he, k_torch = he.get_layer(name).kernel.numpy(), torch.get_layer(name).kernel.numpy()
        bound = np.float32(1 / np.sqrt(np.prod(k_torch.shape[:-1])))  # fan_in = kh * kw * in_channels, as drawn
        assert np.abs(k_torch).max() <= bound and np.abs(k_torch).max() > 0.9 * bound
        if k_he.size >= 2000:  # he_normal's variance (2 / fan_in) is six times pytorch's (1 / (3 fan_in))
            assert np.var(k_he) / np.var(k_torch) == pytest.approx(6, rel=0.25)
    with pytest.raises(ValueError, match="conv_init"):
        model.build_resnet(conv_init="xavier", **kwargs)


def test_pool_before_bn_moves_each_pool_between_its_conv_and_bn_and_keeps_the_function():
    # Normalised inputs and seeded weights: raw 0-255 pixels would saturate the softmax, and two saturated models
    # could agree by chance.
    kwargs = dict(num_classes=10, arch="resnet9", widths=(8, 16, 16, 32), l2=0.0, mean=(128.0,) * 3, std=(64.0,) * 3)
    keras.utils.set_random_seed(0)
    late, early = model.build_resnet(**kwargs), model.build_resnet(pool_before_bn=True, **kwargs)

    def inbound(m, name):  # the layer feeding `name`
        return m.get_layer(name).input._keras_history.operation.name

    for i in (1, 2, 3):
        pool, bn = f"layer{i}_pool", f"layer{i}_bn"
        assert (inbound(early, pool), inbound(early, bn)) == (f"layer{i}_conv", pool)
        assert (inbound(late, pool), inbound(late, bn)) == (f"layer{i}_relu", f"layer{i}_conv")
    assert early.count_params() == late.count_params()
    # With BN's gammas > 0, BN-ReLU is increasing per channel, so the max-pool commutes with it: the same
    # weights and BN statistics give the same predictions, whichever order.
    rng = np.random.default_rng(0)
    for layer in late.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # gamma and moving variance positive, beta and moving mean any sign
            layer.set_weights([(rng.uniform(0.5, 2, w.shape) if j in (0, 3) else rng.normal(0, 0.5, w.shape))
                               .astype("float32") for j, w in enumerate(layer.get_weights())])
    early.set_weights(late.get_weights())
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(early.predict(x, verbose=0), late.predict(x, verbose=0), rtol=1e-4, atol=1e-6)
    assert not np.allclose(model.build_resnet(**kwargs).predict(x, verbose=0), late.predict(x, verbose=0), atol=1e-3)
    with pytest.raises(config.ConfigError, match="model.pool_before_bn"):
        config.load(None, "model.pool_before_bn=true")  # preact has no max-pools


def test_bn_momentum_and_l2_on_norm_and_bias_are_params():
    cfg = config.load("params/tiny.yaml", "model.bn_momentum=0.9 model.l2_norm_and_bias=true")
    kwargs = dict(num_classes=10, block="basic", units_per_stage=1, widths=(8, 16), strides=(1, 2), l2=1e-4)
    m = model.build_resnet(bn_momentum=cfg.model.bn_momentum, l2_norm_and_bias=cfg.model.l2_norm_and_bias, **kwargs)
    bns = [layer for layer in m.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(b.momentum == 0.9 and b.gamma_regularizer is not None and b.beta_regularizer is not None
                       for b in bns)
    assert m.get_layer("logits").bias_regularizer is not None
    seed = model.build_resnet(**kwargs)  # the seed: kernels only, Keras's BN momentum
    bns = [layer for layer in seed.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert all(b.momentum == 0.99 and b.gamma_regularizer is None and b.beta_regularizer is None for b in bns)
    assert seed.get_layer("logits").bias_regularizer is None
    # the penalty grows by the BN and bias terms only
    x = np.zeros((1, 32, 32, 3), np.uint8)
    m(x), seed(x)
    assert len(m.losses) == len(seed.losses) + 2 * len(bns) + 1


def test_ghost_batch_norm_normalises_each_ghost_batch_by_its_own_moments():
    # two ghost batches of 4 far apart: each is normalised by its own moments, not the batch's
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (8, 3, 3, 2)).astype("float32")
    x[:4] += 10.0
    ghost = model.GhostBatchNormalization(4, momentum=0.5)
    stock = keras.layers.BatchNormalization(momentum=0.5)
    y, y_stock = (keras.ops.convert_to_numpy(layer(x, training=True)) for layer in (ghost, stock))
    for part in (y[:4], y[4:]):
        np.testing.assert_allclose(part.mean(axis=(0, 1, 2)), 0, atol=1e-5)
        np.testing.assert_allclose(part.var(axis=(0, 1, 2)), 1, atol=1e-2)
    assert abs(y_stock[:4].mean()) > 0.9  # the whole batch's moments leave the two halves apart
    # the moving statistics follow the mean of the ghost batches' moments
    halves = x.reshape(2, 4, 3, 3, 2)
    np.testing.assert_allclose(ghost.moving_mean.numpy(), 0.5 * x.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(ghost.moving_variance.numpy(), 0.5 + 0.5 * halves.var(axis=(1, 2, 3)).mean(axis=0),
                               rtol=1e-4)
    assert np.all(stock.moving_variance.numpy() > ghost.moving_variance.numpy() + 10)
    # inference is stock BN's; one ghost batch per batch is stock BN
    stock.set_weights(ghost.get_weights())
    np.testing.assert_allclose(ghost(x, training=False), stock(x, training=False), rtol=1e-5, atol=1e-5)
    whole = model.GhostBatchNormalization(8, momentum=0.5)
    np.testing.assert_allclose(whole(x, training=True), keras.layers.BatchNormalization(momentum=0.5)(x, training=True),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="model.ghost_batch"):
        ghost(x[:6], training=True)
    again = model.GhostBatchNormalization.from_config(ghost.get_config())
    assert (again.virtual_batch_size, again.momentum) == (4, 0.5)


def test_ghost_batch_is_a_param_off_in_the_seed_and_trains_with_stock_bn_served():
    from pipeline.data import make_synthetic
    from pipeline.distribute import distribution

    assert config.load(None).model.ghost_batch == 0
    for overrides in ("model.ghost_batch=-1", "train.drop_remainder=true model.ghost_batch=48",
                      "model.ghost_batch=32"):  # 48 does not divide 128; without drop_remainder a batch is partial
        with pytest.raises(config.ConfigError, match="model.ghost_batch"):
            config.load(None, overrides)
    cfg = config.load("params/tiny.yaml", "model.ghost_batch=8 train.drop_remainder=true train.epochs=1 "
                                          "train.verbose=0")
    data = make_synthetic(n_train=100, n_test=64)  # 3 whole batches of 32, 4 images left out
    m = fitting.compile_model(cfg, data, distribution("none"), 100)
    bns = [layer for layer in m.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(isinstance(b, model.GhostBatchNormalization) and b.virtual_batch_size == 8 for b in bns)
    history = fitting.fit(m, cfg, fitting.split_validation(data, 0, 0), 10, [])
    assert np.isfinite(history.history["loss"][-1])
    served = train.inference_copy(cfg, data, m)
    assert not any(isinstance(layer, model.GhostBatchNormalization) for layer in served.layers)
    np.testing.assert_allclose(served.predict(data.x_test, verbose=0), m.predict(data.x_test, verbose=0),
                               rtol=1e-4, atol=1e-5)


def test_alternate_flip_is_a_param_off_in_the_seed_that_moves_the_flips_from_the_model_to_the_feed():
    from pipeline.data import make_synthetic
    from pipeline.distribute import distribution

    seed = config.load(None).train
    assert seed.flip and not seed.alternate_flip
    with pytest.raises(config.ConfigError, match=r"^train.alternate_flip: needs train.flip: true"):
        config.load(None, "train.flip=false train.alternate_flip=true")
    cfg = config.load("params/tiny.yaml", "train.alternate_flip=true train.epochs=2 train.verbose=0")
    data = make_synthetic(n_train=100, n_test=64)
    m = fitting.compile_model(cfg, data, distribution("none"), 100)
    augment = m.get_layer("augment").get_config()
    assert augment["flip"] is False and augment["max_shift"] == round(cfg.train.shift * 32)  # shifts stay in it
    plain = fitting.make_model(config.load("params/tiny.yaml"), data)
    assert plain.get_layer("augment").get_config()["flip"] is True
    history = fitting.fit(m, cfg, fitting.split_validation(data, 0, 0), 10, [])
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"][-1])


def test_ema_is_the_optimizers_and_validates_on_the_averaged_weights():
    from pipeline.data import make_synthetic
    from pipeline.distribute import distribution

    cfg = config.load("params/tiny.yaml", "train.ema=true train.ema_momentum=0.9 train.epochs=1 train.verbose=0")
    data = make_synthetic(n_train=128, n_test=64)
    m = fitting.compile_model(cfg, data, distribution("none"), 128)
    assert m.optimizer.use_ema and m.optimizer.ema_momentum == 0.9
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            seen["validated"] = [w.numpy().copy() for w in self.model.trainable_weights]

        def on_epoch_end(self, epoch, logs=None):  # validation is over: the raw weights are back
            seen["raw"] = [w.numpy().copy() for w in self.model.trainable_weights]
            seen["average"] = [v.numpy().copy() for v in self.model.optimizer._model_variables_moving_average]

    fitting.fit(m, cfg, fitting.split_validation(data, 0, 0), 10, [Probe()])
    assert all(np.allclose(v, a) for v, a in zip(seen["validated"], seen["average"], strict=True))
    assert not all(np.allclose(v, r) for v, r in zip(seen["validated"], seen["raw"], strict=True))


def test_ema_bn_makes_each_bn_statistic_the_mean_of_its_batch_moments_under_the_model_weights():
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    norm = keras.layers.BatchNormalization(momentum=0.9, name="bn")
    m = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(norm(conv))))
    images = np.random.default_rng(0).normal(2.0, 3.0, (100, 8, 8, 3)).astype("float32")
    bn = fitting.EMABatchNorm(images, batches=3, batch_size=16, seed=5)
    bn.set_model(m)
    weights = [w.numpy().copy() for w in m.trainable_weights]
    bn.recalibrate()
    assert bn.rows.shape == (3, 16) and len(np.unique(bn.rows)) == 48  # 3 whole batches of distinct images
    features = keras.Model(inputs, conv)
    moments = [(f.mean(axis=(0, 1, 2)), f.var(axis=(0, 1, 2)))
               for f in (features.predict(images[rows], verbose=0) for rows in bn.rows)]
    np.testing.assert_allclose(norm.moving_mean.numpy(), np.mean([m for m, _ in moments], axis=0), rtol=1e-5)
    np.testing.assert_allclose(norm.moving_variance.numpy(), np.mean([v for _, v in moments], axis=0), rtol=1e-4)
    assert norm.momentum == 0.9  # restored
    assert all(np.array_equal(w, v.numpy()) for w, v in zip(weights, m.trainable_weights, strict=True))
    few = fitting.EMABatchNorm(images[:10], batches=3, batch_size=16)  # fewer images than a batch: all in one
    assert few.rows.shape == (1, 10)


def test_ema_bn_under_several_replicas_averages_the_moments_of_each_replicas_slice():
    """Under a tf.distribute strategy each replica normalises its own slice of a batch in training: the recalibrated
    statistics are the mean of the slices' moments, over the same images as one replica's whole batches. The whole
    batch's variance is a larger sample's (and, by the slices' spread of means, larger): it was used before."""
    inputs = keras.Input((4, 4, 1))
    norm = keras.layers.BatchNormalization(momentum=0.9, name="bn")
    m = keras.Model(inputs, norm(inputs))
    rng = np.random.default_rng(1)  # each image about its own level: a slice of 2 sees less of their spread than 8
    images = (rng.normal(0.0, 1.0, (40, 4, 4, 1)) + rng.normal(0.0, 2.0, (40, 1, 1, 1))).astype("float32")
    whole, sliced = (fitting.EMABatchNorm(images, batches=2, batch_size=8, seed=3, replicas=r) for r in (1, 4))
    assert whole.rows.shape == (2, 8) and sliced.rows.shape == (8, 2)
    assert set(whole.rows.ravel()) == set(sliced.rows.ravel())  # the same 16 images
    sliced.set_model(m)
    sliced.recalibrate()
    slices = [images[rows] for rows in sliced.rows]
    np.testing.assert_allclose(norm.moving_mean.numpy(), np.mean([s.mean() for s in slices]), rtol=1e-5)
    np.testing.assert_allclose(norm.moving_variance.numpy(), np.mean([s.var() for s in slices]), rtol=1e-4)
    assert norm.moving_variance.numpy() < 0.9 * np.mean([images[r].var() for r in whole.rows])
    few = fitting.EMABatchNorm(images[:5], batches=2, batch_size=8, replicas=2)  # fewer images than a batch
    assert few.rows.shape == (2, 2)  # as the replicas share it: 2 and 3 (the fifth image left out)


def test_ema_bn_batches_are_random_draws_whatever_the_order_of_the_training_images():
    """Image folders and archives list their training images class by class, and with train.validation_fraction 0
    the training split keeps that order. The recalibration's batches are random draws, as the training batches
    are: batches of neighbouring images (one class each) averaged their within-class variances, far under the
    variance BN normalises in training, so the validated and served model scaled its features up."""
    inputs = keras.Input((8, 8, 3))
    norm = keras.layers.BatchNormalization(momentum=0.9, name="bn")
    m = keras.Model(inputs, norm(inputs))
    rng = np.random.default_rng(0)
    images = np.concatenate([rng.normal(-5.0, 1.0, (100, 8, 8, 3)),  # two "classes", one after the other
                             rng.normal(5.0, 1.0, (100, 8, 8, 3))]).astype("float32")
    bn = fitting.EMABatchNorm(images, batches=4, batch_size=32, seed=0)
    bn.set_model(m)
    bn.recalibrate()
    assert all(0.2 < np.mean(rows >= 100) < 0.8 for rows in bn.rows)  # each batch holds both halves
    assert (np.diff(bn.rows, axis=1) > 0).all()  # each batch's rows in order (one gather, front to back)
    # a random batch's variance is ~25 (1 within a class, 25 between the two); one class's alone ~1
    assert (norm.moving_variance.numpy() > 20).all(), norm.moving_variance.numpy()


@pytest.mark.parametrize("batches", [0, 2])
def test_ema_training_ends_with_bn_statistics_of_the_averaged_weights(batches):
    from pipeline.data import make_synthetic
    from pipeline.distribute import distribution

    cfg = config.load("params/tiny.yaml", "train.ema=true train.ema_momentum=0.9 train.epochs=1 train.verbose=0 "
                      f"train.shift=0 train.flip=false train.ema_bn_batches={batches}")
    data = make_synthetic(n_train=256, n_test=64)
    m = fitting.compile_model(cfg, data, distribution("none"), 256)
    before_validation = []

    class Probe(keras.callbacks.Callback):  # runs after EMABatchNorm: what validation sees
        def on_test_begin(self, logs=None):
            before_validation.append(statistics(self.model))

    def statistics(model_):
        return [v.numpy().copy() for v in model_.non_trainable_weights if "moving" in v.path]

    fitting.fit(m, cfg, fitting.split_validation(data, 0, 0), 10, [Probe()])
    end = statistics(m)
    again = fitting.EMABatchNorm(data.x_train, 2, cfg.train.batch_size, seed=cfg.train.seed)
    again.set_model(m)
    again.recalibrate()  # under the final (averaged) weights, with no augmentation left to vary: a fixed point
    recomputed = statistics(m)
    same = all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(end, recomputed, strict=True))
    assert same == bool(batches)  # without it the statistics are the raw weights', not the averaged ones'
    assert len(before_validation) == 1 and before_validation[0]


def test_flip_tta_averages_each_image_and_its_mirror():
    m = model.build_resnet(num_classes=10, block="basic", units_per_stage=1, widths=(8, 16), strides=(1, 2), l2=0.0,
                           mean=(128.0,) * 3, std=(64.0,) * 3)
    x = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    plain, tta = serve.ImageClassifier("none"), serve.ImageClassifier("flip")
    plain.model = tta.model = m
    expected = (m.predict(x, verbose=0) + m.predict(x[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(tta.predict_proba(x, batch_size=2), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain.predict_proba(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="tta"):
        serve.ImageClassifier("crop")


def test_shift_diagonal_moves_content_and_repeats_the_edge():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    down = augment.shift_diagonal(x, 1)
    np.testing.assert_array_equal(down[:, 1:, 1:], x[:, :-1, :-1])  # pixel (i, j) lands on (i + 1, j + 1)
    np.testing.assert_array_equal(down[:, 0, 1:], x[:, 0, :-1])  # the uncovered top row repeats the edge
    up = augment.shift_diagonal(x, -1)
    np.testing.assert_array_equal(up[:, :-1, :-1], x[:, 1:, 1:])
    np.testing.assert_array_equal(up[:, -1, :-1], x[:, -1, 1:])
    assert down.shape == up.shape == x.shape and down.dtype == np.uint8


def test_flip_shift_tta_averages_six_views():
    m = model.build_resnet(num_classes=10, block="basic", units_per_stage=1, widths=(8, 16), strides=(1, 2), l2=0.0,
                           mean=(128.0,) * 3, std=(64.0,) * 3)
    x = np.random.default_rng(1).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    views = augment.tta_views(x, "flip_shift")
    assert len(views) == 6 and len({v.tobytes() for v in views}) == 6
    mirror = x[:, :, ::-1]
    expected_views = [x, mirror, augment.shift_diagonal(x, 1), augment.shift_diagonal(mirror, 1),
                      augment.shift_diagonal(x, -1), augment.shift_diagonal(mirror, -1)]
    expected = np.mean([m.predict(v, verbose=0) for v in expected_views], axis=0)
    tta = serve.ImageClassifier("flip_shift")
    tta.model = m
    np.testing.assert_allclose(tta.predict_proba(x, batch_size=2), expected, rtol=1e-5, atol=1e-6)
    flip = serve.ImageClassifier("flip")
    flip.model = m
    assert not np.allclose(flip.predict_proba(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="tta"):
        augment.tta_views(x, "shift")


@pytest.mark.parametrize("fill", ["nearest", "reflect", "constant"])
def test_flip_shift_views_fill_their_border_as_the_training_shifts_did(fill):
    """The shifted test views of a model trained with reflect or constant fills repeated the edge pixels: a border
    it never saw in training. Each view must be one of the training augmentation's (1-pixel shift, flip or not),
    compared after the model's normalisation, where the training shifts run ("constant": zeros there, the mean)."""
    mean, std = np.array([128.0, 100.0, 61.0], np.float32), np.array([64.0, 32.0, 16.0], np.float32)
    m = model.build_resnet(num_classes=10, block="basic", units_per_stage=1, widths=(8, 16), strides=(1, 2), l2=0.0,
                           mean=mean, std=std)
    x = np.random.default_rng(2).integers(0, 256, size=(2, 6, 6, 3), dtype=np.uint8)
    normalize = lambda pixels: (pixels.astype(np.float32) - mean) / std  # noqa: E731
    draws = keras.ops.convert_to_numpy(augment.shift_flip(np.repeat(normalize(x), 300, axis=0), max_shift=1,
                                                          fill=fill, flip=True, seed=0)).reshape(2, 300, 6, 6, 3)
    views = augment.tta_views(x, "flip_shift", fill, augment.normalized_zero(m))
    for view in views[2:]:  # moved down-right and up-left, each plain and mirrored
        assert not np.array_equal(view, x) and not np.array_equal(view, x[:, :, ::-1])
        for image, trained in zip(normalize(view), draws, strict=True):
            assert any(np.array_equal(image, t) for t in trained)


def test_served_flip_shift_fills_as_its_model_trained_and_older_models_repeat_the_edge():
    m = model.build_resnet(num_classes=10, block="basic", units_per_stage=1, widths=(8, 16), strides=(1, 2), l2=0.0,
                           mean=(128.0,) * 3, std=(64.0,) * 3)
    x = np.random.default_rng(1).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)

    def expected(mode):  # numpy's own padding, then the window moved (1, 1) and (-1, -1)
        views = [x, x[:, :, ::-1]]
        for step in (1, -1):
            for v in (x, x[:, :, ::-1]):
                padded = np.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=mode)
                views.append(padded[:, 1 - step:33 - step, 1 - step:33 - step])
        return np.mean([m.predict(v, verbose=0) for v in views], axis=0)

    reflect = serve.ImageClassifier("flip_shift", "reflect")
    reflect.model = m
    np.testing.assert_allclose(reflect.predict_proba(x, batch_size=2), expected("reflect"), rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected("reflect"), expected("edge"), atol=1e-6)
    old = serve.ImageClassifier("flip_shift")
    del old.shift_fill  # as unpickled from a model logged before shift_fill was recorded
    old.model = m
    np.testing.assert_allclose(old.predict_proba(x, batch_size=2), expected("edge"), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shift_fill"):
        serve.ImageClassifier("flip_shift", "wrap")


def test_whiten_stem_is_a_frozen_patch_whitening_fitted_on_the_training_images():
    from pipeline.data import make_synthetic
    from pipeline.distribute import distribution

    rng = np.random.default_rng(0)
    images = 10 * rng.normal(size=(200, 8, 8, 3)) @ rng.normal(size=(3, 3))  # correlated channels, var >> eps
    kernel = model.whitening_kernel(images)
    assert kernel.shape == (2, 2, 3, 24)
    outputs = keras.ops.convert_to_numpy(keras.ops.conv(images.astype("float32"), kernel[..., :12]))
    np.testing.assert_allclose(np.cov(outputs.reshape(-1, 12), rowvar=False), np.eye(12), atol=0.02)
    np.testing.assert_allclose(kernel[..., 12:], -kernel[..., :12])  # each direction and its negation

    cfg = config.load("params/quick.yaml", "model.stem=whiten train.epochs=1 train.batch_size=32 train.verbose=0 "
                      "train.jit_compile=false")  # an XLA compile here costs more than the two steps it runs
    data = make_synthetic(n_train=64, n_test=32)
    m = fitting.compile_model(cfg, data, distribution("none"), 64)
    stem = m.get_layer("whiten")
    assert not stem.trainable and "prep_conv" not in [layer.name for layer in m.layers]
    mean, std = data.channel_stats()
    np.testing.assert_allclose(stem.get_weights()[0], model.whitening_kernel((data.x_train[:2000] - mean) / std),
                               rtol=1e-5, atol=1e-6)
    before = stem.get_weights()[0].copy()
    fitting.fit(m, cfg, fitting.split_validation(data, 0, 0), 10, [])
    np.testing.assert_array_equal(stem.get_weights()[0], before)  # frozen: training leaves it as fitted
    assert not any(w is stem.kernel for w in m.trainable_weights)
    with pytest.raises(config.ConfigError, match="model.stem"):
        config.load(None, "model.stem=whiten")  # preact has no whitening stem


def test_the_whitening_stem_is_fitted_on_images_drawn_from_the_whole_training_split():
    """Image folders and archives list their training images class by class, and with train.validation_fraction 0
    the training split keeps that order: the stem was fitted on the first 2,000 images, all of the first class
    (CIFAR-10's JPEG archive: 2,000 airplanes), and whitened other images' patches far from unit variance."""
    dataset = data.make_synthetic(n_train=4000, n_test=20)  # each class its own colour
    order = np.argsort(dataset.y_train, kind="stable")  # class by class, as an image folder lists them
    ordered = dataclasses.replace(dataset, x_train=dataset.x_train[order], y_train=dataset.y_train[order])
    assert (ordered.y_train[:2000] < 6).all()  # the first 2,000 hold 5 or 6 of the 10 classes only
    kernel = fitting.make_model(config.load("params/quick.yaml"), ordered, augment=False).get_layer(
        "whiten").get_weights()[0]
    mean, std = ordered.channel_stats()
    outputs = keras.ops.convert_to_numpy(keras.ops.conv(((ordered.x_train - mean) / std).astype("float32"),
                                                        kernel[..., :12]))
    np.testing.assert_allclose(np.cov(outputs.reshape(-1, 12), rowvar=False), np.eye(12), atol=0.1)


def test_the_held_out_images_are_drawn_by_validation_seed_else_by_seed():
    """What every host and every sweep trial holds out (`fitting.held_out_split`): with train.validation_seed null,
    the images train.seed drew before the key; set, it alone draws them, whatever train.seed."""
    dataset = data.make_synthetic(n_train=200, n_test=20)

    def held_out(overrides: str) -> np.ndarray:
        x_train, _, x_val, _ = fitting.held_out_split(dataset, config.load(None, f"{overrides} "
                                                                             "train.validation_fraction=0.25").train)
        assert len(x_train) == 150
        return x_val

    for seed in (0, 3):  # null: as split_validation drew with train.seed, the first quarter of its permutation
        expected = dataset.x_train[np.random.default_rng(seed).permutation(200)[:50]]
        np.testing.assert_array_equal(held_out(f"train.seed={seed}"), expected)
        np.testing.assert_array_equal(held_out(f"train.seed={seed} train.validation_seed=null"), expected)
        np.testing.assert_array_equal(held_out(f"train.seed=7 train.validation_seed={seed}"), expected)
    np.testing.assert_array_equal(held_out("train.seed=0 train.validation_seed=5"),
                                  held_out("train.seed=1 train.validation_seed=5"))
    assert not np.array_equal(held_out("train.seed=0 train.validation_seed=5"),
                              held_out("train.seed=0 train.validation_seed=6"))


def test_the_model_is_built_from_the_training_split_alone():
    """Held-out images (val_acc, which sweeps select and prune on) take no part in the normalisation or the
    whitening stem: the model `train` builds sees `training_part` of the dataset."""
    dataset = data.make_synthetic(n_train=200, n_test=20)
    held_out = np.random.default_rng(0).permutation(200)[:100]  # split_validation's held-out half at seed 0
    dataset.x_train[held_out] = 255  # white images, held out: they would lift the mean a lot
    splits = fitting.split_validation(dataset, 0.5, 0)
    assert (splits[2] == 255).all()
    part = fitting.training_part(dataset, splits)
    assert len(part.x_train) == 100 and part.x_test is dataset.x_test
    mean, std = part.channel_stats()
    np.testing.assert_allclose(mean, splits[0].reshape(-1, 3).mean(axis=0))
    assert (dataset.channel_stats()[0] > mean + 50).all()
    m = fitting.make_model(config.load("params/quick.yaml"), part, augment=False)
    np.testing.assert_allclose(m.get_layer("whiten").get_weights()[0],
                               model.whitening_kernel((splits[0][:2000] - mean) / std), rtol=1e-5, atol=1e-6)
