"""The Keras side of training, with no tracking: build, compile and fit the model for a config.

`pipeline.train` wraps it with MLflow logging, checkpoints and the served model; a non-chief host
of a cluster and the GPU benchmark call it directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from pipeline import config, interrupts
from pipeline.data import IMAGE_SIZE, Dataset
from pipeline.distribute import Distribution
from pipeline.model import build_resnet, whitening_kernel


@keras.saving.register_keras_serializable(package="pipeline")
class LinearWarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then linear decay to 0 at `total_steps`
    (the one-cycle shape; Keras's schedules offer warm-up only in front of a cosine)."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int):
        self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, total_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        up = step / self.warmup_steps if self.warmup_steps else 1.0  # no warm-up: the peak from the first step
        down = (self.total_steps - step) / max(self.total_steps - self.warmup_steps, 1)
        return self.peak * keras.ops.clip(keras.ops.minimum(up, down), 0.0, 1.0)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


@keras.saving.register_keras_serializable(package="pipeline")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """`after`'s lr scaled by a linear ramp from 0 to 1 over the first `warmup_steps` (Goyal et al.'s gradual
    warm-up in front of a step schedule; Keras's schedules offer warm-up only in front of a cosine)."""

    def __init__(self, after: keras.optimizers.schedules.LearningRateSchedule, warmup_steps: int):
        self.after, self.warmup_steps = after, warmup_steps

    def __call__(self, step):
        ramp = keras.ops.clip(keras.ops.cast(step, "float32") / self.warmup_steps, 0.0, 1.0)
        return self.after(step) * ramp

    def get_config(self):
        return {"after": keras.optimizers.schedules.serialize(self.after), "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config):
        return cls(keras.optimizers.schedules.deserialize(config["after"]), config["warmup_steps"])


def schedule_steps(cfg: config.TrainConfig, steps_per_epoch: int) -> tuple[int, list[int], int]:
    """(optimizer steps of the whole run, the 0-based steps after which the step schedule decays, warm-up steps):
    what `learning_rate` builds its schedule from, and what a train run records of it (`schedule_tags`)."""
    total = cfg.epochs * steps_per_epoch
    # ending by the run's last step: a warm-up rounding to the whole run (0.8 of 2 steps) never reached the peak
    warmup = min(config.round_half_up(cfg.warmup * total), total - 1)
    # PiecewiseConstantDecay keeps a value up to and including its boundary step: the last step of epoch e
    # (0-based step e * steps - 1) still has the old lr, the first step of epoch e + 1 the new one.
    boundaries = [e * steps_per_epoch - 1 for e in cfg.boundary_epochs] if cfg.schedule == "step" else []
    if boundaries and warmup > boundaries[0]:
        # a warm-up ending at the first decay (`train.warmup` * epochs its epoch, which config allows) reaches the peak
        # at step `warmup`, the first decayed one: it ended a step earlier, the lr never got past (n - 1)/n of train.lr
        warmup = boundaries[0]
    return total, boundaries, warmup


def schedule_tags(cfg: config.TrainConfig, train_images: int) -> dict[str, str]:
    """What the params resolve to on a run of `train_images` training images, as a train run's tags: `effective_lr`
    (train.lr after train.lr_scaling: the peak lr trained with), `steps_per_epoch`, `warmup_steps` (train.warmup's
    fraction of the run in optimizer steps) and, for the step schedule, `lr_decay_epochs` (the epochs
    train.lr_boundaries round to, after which the lr decays)."""
    steps = steps_per_epoch(cfg, train_images)
    _, _, warmup = schedule_steps(cfg, steps)
    tags = {"effective_lr": f"{cfg.scaled_lr:g}", "steps_per_epoch": str(steps), "warmup_steps": str(warmup)}
    if cfg.schedule == "step":
        tags["lr_decay_epochs"] = json.dumps(list(cfg.boundary_epochs))
    return tags


def learning_rate(cfg: config.TrainConfig,
                  steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The lr as a function of the optimizer step, for `train.schedule`; it depends only on the step,
    so a run resumed from a checkpoint (which restores the step) continues it exactly.

    step: the scaled lr, multiplied by lr_decay after each boundary epoch (fractions of `epochs`), ramped up
    linearly over `warmup` of the run if that is > 0; cosine: linear warm-up over `warmup` of the run, then
    cosine to 0; onecycle: warm-up, then linear to 0.
    """
    total, boundaries, warmup = schedule_steps(cfg, steps_per_epoch)
    if boundaries and warmup < min(config.round_half_up(cfg.warmup * total), total - 1):  # cut at the first decay
        if not warmup:
            print(f"warning: train.warmup {cfg.warmup:g} ends at the step schedule's first decay, after the run's "
                  f"first optimizer step: no warm-up, the lr starts at its peak", file=sys.stderr, flush=True)
    elif cfg.warmup and not warmup:  # it was silently none: a short run (toy data, few epochs) of a recipe's warm-up
        print(f"warning: train.warmup {cfg.warmup:g} rounds to 0 of the run's {total} optimizer steps: no warm-up, "
              f"the lr starts at its peak ("
              + (f"at least 1/{total} warms up over one step)" if total > 1 else "one step has no room for one)"),
              file=sys.stderr, flush=True)
    if cfg.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(total - warmup, 1), alpha=0.0,
                                                      warmup_target=cfg.scaled_lr, warmup_steps=warmup)
    if cfg.schedule == "onecycle":
        return LinearWarmupDecay(cfg.scaled_lr, warmup, total)
    if not cfg.lr_boundaries and not warmup:
        return cfg.scaled_lr
    values = [cfg.scaled_lr * cfg.lr_decay ** i for i in range(len(boundaries) + 1)]
    if not boundaries:  # warm-up, then a constant lr (PiecewiseConstantDecay needs a boundary)
        boundaries, values = [total], [cfg.scaled_lr] * 2
    steps = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    return LinearWarmup(steps, warmup) if warmup else steps


def held_out_split(dataset: Dataset, train: config.TrainConfig):
    """`split_validation` as a run of `train` params draws it, on every host of a cluster, in every trial of a sweep:
    `train.validation_fraction` held out, drawn by `train.held_out_seed` (train.validation_seed, or train.seed where
    that is null: then the images it always drew)."""
    return split_validation(dataset, train.validation_fraction, train.held_out_seed)


def split_validation(dataset: Dataset, fraction: float, seed: int):
    """(x_train, y_train, x_val, y_val): a slice drawn by `seed` alone held out, or the test split if fraction = 0.
    ConfigError if holding out leaves no image to train on (a model trained on none would score as one)."""
    if fraction == 0:
        return dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test
    order = np.random.default_rng(seed).permutation(len(dataset.x_train))
    n_val = config.held_out_images(fraction, len(order))
    val, train = order[:n_val], order[n_val:]
    return dataset.x_train[train], dataset.y_train[train], dataset.x_train[val], dataset.y_train[val]


def check_replica_batches(cfg: config.Config, dist: Distribution, splits: tuple) -> None:
    """ConfigError, before anything trains, for batches `dist`'s replicas cannot share (`Distribution.check_batches`:
    an empty slice on a replica gives NaN BatchNormalization statistics or a failed conv)."""
    t = cfg.train
    dist.check_batches(t.batch_size, t.drop_remainder, cfg.model.ghost_batch, len(splits[0]), len(splits[2]))


def training_part(dataset: Dataset, splits: tuple) -> Dataset:
    """`dataset` with the training images of `split_validation`'s `splits` alone, for the statistics the model
    is built from (normalisation, the whitening stem): the held-out images val_acc scores (and a sweep
    selects and prunes on) then take no part in the model at all."""
    return dataclasses.replace(dataset, x_train=splits[0], y_train=splits[1])


WHITENING_IMAGES = 2000  # the whitening stem's patch covariance is estimated on this many training images


def whitening_images(images: np.ndarray) -> np.ndarray:
    """The training images `model.stem: whiten` is fitted on: WHITENING_IMAGES of them drawn at random (seed 0, in
    their order) from all of `images`, or all of them where there are no more. Not the first ones: image folders and
    archives list their images class by class, and with train.validation_fraction 0 the training split keeps that
    order (the first 2,000 of CIFAR-10's JPEG archive are airplanes)."""
    if len(images) <= WHITENING_IMAGES:
        return images
    return images[np.sort(np.random.default_rng(0).permutation(len(images))[:WHITENING_IMAGES])]


def make_model(cfg: config.Config, dataset: Dataset, *, augment: bool = True) -> keras.Model:
    """The model `cfg` describes, normalised by `dataset`'s statistics. augment=False: the inference copy, without
    the training-only parts (augmentation layers; stock BN in place of ghost BN, whose inference is the same)."""
    mean, std = dataset.channel_stats()
    m, t = cfg.model, cfg.train
    whiten = None
    if m.stem == "whiten":  # fitted on normalised training images; the served copy gets the weights themselves
        whiten = whitening_kernel((whitening_images(dataset.x_train) - mean) / std)
    return build_resnet(num_classes=len(dataset.class_names), arch=m.arch, block=m.block,
                        units_per_stage=m.units_per_stage, widths=m.widths, strides=m.strides,
                        stem_filters=m.stem_filters, l2=m.l2, l2_norm_and_bias=m.l2_norm_and_bias,
                        bn_momentum=m.bn_momentum, ghost_batch=m.ghost_batch if augment else 0,
                        zero_init_residual=m.zero_init_residual, conv_init=m.conv_init, pool_before_bn=m.pool_before_bn,
                        mean=mean.tolist(), std=std.tolist(), image_size=IMAGE_SIZE,
                        max_shift=t.shift_pixels if augment else 0, shift_fill=t.shift_fill,
                        flip=t.flip and not t.alternate_flip and augment,  # alternate: the feed mirrors them
                        cutout=t.cutout if augment else 0, seed=t.seed, whiten=whiten)


def inference_copy(cfg: config.Config, dataset: Dataset, model: keras.Model) -> keras.Model:
    """The trained model without the augmentation layer and with stock BN for ghost BN: only stock Keras layers,
    so the logged model loads anywhere without this project's code. Built under the global dtype policy (float32:
    `compile_model` sets `train.precision` only while it builds), so it is the model served and scored whatever
    precision trained it."""
    served = make_model(cfg, dataset, augment=False)
    for layer in served.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return served


def steps_per_epoch(cfg: config.TrainConfig, train_images: int) -> int:
    """Optimizer steps in one epoch over `train_images`: every batch, or with `train.drop_remainder` the whole
    ones only (the images left over differ each epoch). ConfigError if that leaves no step at all."""
    if not cfg.drop_remainder:
        return math.ceil(train_images / cfg.batch_size)
    config.check_whole_batch(cfg, train_images)
    return train_images // cfg.batch_size


def images_per_epoch(cfg: config.TrainConfig, train_images: int) -> int:
    """Images trained on in one epoch (`train.drop_remainder` leaves out the rest of the last batch)."""
    return train_images - train_images % cfg.batch_size if cfg.drop_remainder else train_images


def cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 arithmetic (AMX or AVX512-BF16); without it bfloat16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


@functools.cache
def jax_cpu_bf16_xla_wrong() -> bool:
    """Whether JAX's XLA on the CPU computes a bfloat16 max-pool, ReLU, 3x3 conv (64 channels), ReLU wrongly.
    jaxlib 0.11.2 and 0.12.0.1 hand it to one YNNPACK fusion that returns NaN and wrong values for about half the
    outputs (a different share each call), 2026-12-05 on an AMD EPYC with AVX512-BF16; jaxlib 0.10.2, float32, the
    same ops unjitted and TensorFlow 2.21's XLA are right, and `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`
    mends it. Every ResNet here was hit in inference mode (Keras's validation: val_loss NaN, val_acc of garbage
    predictions); its training steps were right. Its float32 served copy is not touched."""
    import jax
    from jax import lax

    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(16, 6, 6, 64)).astype(jax.numpy.bfloat16), jax.devices("cpu")[0])
    w = jax.device_put((rng.normal(size=(3, 3, 64, 64)) * 0.05).astype(jax.numpy.bfloat16), jax.devices("cpu")[0])

    def f(x, w):
        h = jax.nn.relu(lax.reduce_window(x, -np.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"))
        return jax.nn.relu(lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))

    eager, jitted = (np.asarray(g(x, w), np.float32) for g in (f, jax.jit(f)))
    return not np.allclose(jitted, eager, rtol=0.02, atol=0.05)  # bfloat16 rounding alone stays well inside


def on_gpu(devices) -> bool:
    """Whether the training devices (`Distribution.devices`) are GPUs."""
    return any("gpu" in d.lower() or "cuda" in d.lower() for d in devices)


def jax_cpu_bf16_xla_fallback(precision: str, cfg: config.TrainConfig, gpu: bool) -> tuple[str, bool | str] | None:
    """(precision, jit_compile) instead of bfloat16 + XLA on a JAX CPU that computes it wrongly
    (`jax_cpu_bf16_xla_wrong`): float32 for precision auto, else no XLA; None where nothing needs to change."""
    if (keras.backend.backend() != "jax" or precision != "mixed_bfloat16" or cfg.jit_compile is False
            or gpu or not jax_cpu_bf16_xla_wrong()):
        return None
    return ("float32", cfg.jit_compile) if cfg.precision == "auto" else (precision, False)


PROBED: dict = {}  # the last CPU probe fast_path consulted: pipeline.train records it on the run


def fast_path(cfg: config.TrainConfig, dist: Distribution, probe: Callable[[], tuple] | None = None, *,
              measure: bool = True) -> tuple[str, bool | str] | None:
    """(dtype policy, jit_compile) for `train.precision` and `train.jit_compile`, "auto" resolved. `probe()`:
    (job, build, x, y) for `cpu_probe.fastest`; without it a CPU's `auto` follows the flag rule below.

    On GPUs: precision auto is mixed_bfloat16, jit_compile auto Keras's rule (XLA on, off under tf.distribute).
    On a CPU with TensorFlow on one device, each `auto` is measured (`pipeline.cpu_probe`): float32 or bfloat16
    (where the CPU has bf16 units: AMX or AVX512-BF16), with or without XLA, whichever trains fastest here.
    Elsewhere (JAX, or several CPU devices) precision auto is bfloat16 where the CPU has bf16 units, else float32,
    and jit_compile auto Keras's rule; where that is bfloat16 + XLA on a JAX CPU that computes it wrongly
    (`jax_cpu_bf16_xla_wrong`), float32 for precision auto, else no XLA (both given: `check_backend` refuses).
    `measure` False: what this machine takes without measuring anything, quietly (None where only the probe would
    tell: its cache holds no answer for this model); `PROBED` is left as it was.
    """
    gpu = on_gpu(dist.devices)
    jit: bool | str = cfg.jit_compile
    if measure:
        PROBED.clear()
    if probe and not gpu and dist.mode == "none" and keras.backend.backend() == "tensorflow" and "auto" in (
            cfg.precision, cfg.jit_compile):
        from pipeline import cpu_probe

        precisions = ((["float32", "mixed_bfloat16"] if cpu_has_bf16() else ["float32"]) if cfg.precision == "auto"
                      else [cfg.precision])
        candidates = [(p, j) for p in precisions for j in ([False, True] if jit == "auto" else [jit])]
        if not measure:
            return cpu_probe.cached_fastest(candidates, probe()[0])
        (precision, jit), speeds, cached = cpu_probe.fastest(candidates, *probe())
        if speeds:
            PROBED.update(choice=cpu_probe.label((precision, jit)), images_per_second=speeds, cached=cached)
            print(f"CPU fast path: {cpu_probe.label((precision, jit))}, the fastest train step here "
                  f"({', '.join(f'{k} {v:g}' for k, v in speeds.items())} images/s, a few steps of this model each"
                  f"{', measured earlier: ' + str(cpu_probe.cache_file()) if cached else ''})", flush=True)
        return precision, jit
    precision = cfg.precision
    if precision == "auto":
        precision = "mixed_bfloat16" if gpu or cpu_has_bf16() else "float32"
    fallback = jax_cpu_bf16_xla_fallback(precision, cfg, gpu)
    if fallback:
        chosen = "train.precision auto: float32" if fallback[0] == "float32" else "train.jit_compile auto: no XLA"
        if measure:
            print(f"{chosen}, as this JAX's XLA computes bfloat16 convolutions wrongly on a CPU (NaN val_loss; "
                  f"XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= mends it)", flush=True)
        return fallback
    return precision, jit


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What a resumed train run trained its epochs with (its tags `dtype_policy`, `jit_compile`), for the rest of it
    to go on with (`compile_model`) whatever `auto` resolves to here; `source`: which run, in words."""

    precision: str
    jit_compile: bool
    source: str

    def described(self) -> str:
        return f"{self.precision} {'with' if self.jit_compile else 'without'} XLA"


def described(precision: str, jit: bool | str) -> str:
    """A (dtype policy, jit_compile) choice in words: "mixed_bfloat16 with XLA"."""
    return f"{precision} " + {True: "with XLA", False: "without XLA"}.get(jit, f"with jit_compile {jit}")


def planned_fast_path(cfg: config.TrainConfig, dist: Distribution,
                      recorded: Recorded | None = None) -> tuple[str, bool | str]:
    """The (dtype policy, jit_compile) `compile_model` takes on this host, told before anything is built, for a
    cluster's hosts to agree on (`Distribution.agree`): `recorded`'s for each `auto` of a resumed run, else
    `fast_path`'s (no CPU probe: it measures on one device only). jit_compile may stay "auto": Keras's rule, which
    leaves XLA off under any tf.distribute strategy, so on every host of a cluster."""
    if recorded is not None:
        return (recorded.precision if cfg.precision == "auto" else cfg.precision,
                recorded.jit_compile if cfg.jit_compile == "auto" else cfg.jit_compile)
    return fast_path(cfg, dist, measure=False)


def bf16_xla_wrong_here(precision: str, jit: bool | str) -> bool:
    """Whether `precision` with `jit` true computes wrong results here: bfloat16 + XLA on a JAX CPU that computes it
    wrongly (`jax_cpu_bf16_xla_wrong`)."""
    if precision != "mixed_bfloat16" or jit is not True or keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu" and jax_cpu_bf16_xla_wrong()


def hardware() -> str:
    """What this host's epochs are timed on (`epoch_seconds`, `images_per_second`, compare's wall_s): its CPU's model
    and cores, and its GPUs' models (e.g. "AMD EPYC 7B13, 2 cores; 1 x NVIDIA H100 80GB HBM3")."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpus = []
    with contextlib.suppress(Exception):  # a backend that cannot say: the CPU alone
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            gpus = [tf.config.experimental.get_device_details(d).get("device_name", "GPU")
                    for d in tf.config.list_physical_devices("GPU")]
        elif keras.backend.backend() == "jax":
            import jax

            gpus = [d.device_kind for d in jax.devices() if d.platform != "cpu"]
        elif keras.backend.backend() == "torch":
            import torch

            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    counted = [f"{gpus.count(name)} x {name}" for name in dict.fromkeys(gpus)]
    return f"{cpu}, {os.cpu_count()} cores" + (f"; {', '.join(counted)}" if counted else "")


def cpu_allocator() -> str:
    """Which allocator TensorFlow's CPU memory comes from: "bfc" (pooled; `pipeline` sets
    TF_CPU_ALLOCATOR_USE_BFC) or "default"; "n/a" on another backend. Only the BFC one keeps statistics."""
    if keras.backend.backend() != "tensorflow":
        return "n/a"
    import tensorflow as tf

    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except ValueError:
        return "default"
    return "bfc"


_LOADED = {"programs": 0, "seconds_saved": 0.0}  # what JAX's persistent compilation cache spared the training


def _count_loaded(event: str, duration_secs: float = 0.0, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _LOADED["programs"] += 1
    elif event == "/jax/compilation_cache/compile_time_saved_sec":
        _LOADED["seconds_saved"] += duration_secs


def compile_cache() -> str:
    """Where Keras on JAX keeps its compiled programs across runs (JAX's persistent compilation cache, which `pipeline`
    turns on): the folder, "off" (`JAX_COMPILATION_CACHE_DIR` set empty), "n/a" on another backend. Counts from here on
    what it spares (`compile_cache_loaded`; from zero again at each `count_compile_cache_loads`)."""
    if keras.backend.backend() != "jax":
        return "n/a"
    import jax

    _listen_for_loads()
    return jax.config.jax_compilation_cache_dir or "off"


@functools.cache
def _listen_for_loads() -> None:
    import jax

    jax.monitoring.register_event_listener(_count_loaded)
    jax.monitoring.register_event_duration_secs_listener(_count_loaded)


def count_compile_cache_loads() -> None:
    """Count what JAX's persistent compilation cache spares from zero, from here on: `compile_model` calls it, so that
    each training counts its own loads (a sweep worker trains its trials one after another in one process, each
    followed by programs of its served copy), not the process's."""
    compile_cache()
    _LOADED.update(programs=0, seconds_saved=0.0)


def compile_cache_loaded() -> tuple[int, float]:
    """How many compiled programs JAX's persistent compilation cache gave this process since the last
    `count_compile_cache_loads` (the last `compile_model`: the training's), and the seconds of compiling they spared
    it (JAX's figure: their compile time then, less the time to read them)."""
    return _LOADED["programs"], _LOADED["seconds_saved"]


def check_backend(cfg: config.Config) -> None:
    """Params that only one backend supports; entry points call this before opening any run."""
    if cfg.train.feed == "device" and keras.backend.backend() != "jax":
        raise config.ConfigError(f"train.feed: 'device' needs the JAX backend, not {keras.backend.backend()}")
    t = cfg.train
    if bf16_xla_wrong_here(t.precision, t.jit_compile):
        raise config.ConfigError("train.precision: mixed_bfloat16 with train.jit_compile true computes wrong "
                                 "results on this JAX's CPU (its XLA miscompiles bfloat16 convolutions: NaN "
                                 "val_loss); use train.jit_compile auto or false, float32, or set "
                                 "XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=")


def compile_model(cfg: config.Config, dataset: Dataset, dist: Distribution, train_images: int,
                  recorded: Recorded | None = None, chief: tuple[str, bool | str] | None = None) -> keras.Model:
    """The training model (with augmentation), compiled for `dist`. Seeds the run; `train.precision`
    is the global dtype policy only while the model is built (its layers keep it), so it does not
    leak into models built later in the process, such as the float32 served copy. `recorded`: a resumed run's
    precision and XLA choice, taken for each `auto` unmeasured (`fast_path` is for its first epochs only); a line
    says so where this machine would take another, or cannot tell without measuring. `chief`: in a cluster, the
    (dtype policy, jit_compile) the hosts agreed on (`Distribution.agree`: the chief's), taken as it is; a line
    says so where this host would take another."""
    t = cfg.train
    check_backend(cfg)
    count_compile_cache_loads()  # what the cache spares this training, from its first program on
    if t.lr_scaling == "linear" and train_images < t.batch_size:  # every batch is the training images, all of them
        print(f"warning: train.lr_scaling linear scales train.lr {t.lr:g} to {t.scaled_lr:g} for batches of "
              f"train.batch_size {t.batch_size}, but the {train_images} training images make one batch of "
              f"{train_images} ({t.lr * train_images / 128:g} by the rule): lower train.batch_size to at most "
              f"{train_images}, or train on more images", file=sys.stderr, flush=True)
    # once, not per build: the CPU probe builds the model once per candidate, and each said a warning again
    schedule = learning_rate(t, steps_per_epoch(t, train_images))

    def build(precision: str, jit: bool | str) -> keras.Model:
        with dist.scope():
            model = make_model(cfg, dataset)
            optimizer = keras.optimizers.SGD(learning_rate=schedule,
                                             momentum=t.momentum, nesterov=t.nesterov, use_ema=t.ema,
                                             ema_momentum=t.ema_momentum)
            model.compile(optimizer=optimizer,
                          loss=keras.losses.CategoricalCrossentropy(label_smoothing=t.label_smoothing),
                          metrics=[keras.metrics.CategoricalAccuracy(name="acc")],
                          jit_compile=jit,
                          steps_per_execution=t.steps_per_execution)
            # Its variables now, not in the first training step: Keras on TensorFlow without a distribution strategy
            # builds it there, and TensorFlow traces a step that creates variables twice (~3 CPU-s per training)
            model.optimizer.build(model.trainable_variables)  # (a LossScaleOptimizer builds the one it wraps)
        return model

    def probe() -> tuple:  # what pipeline.cpu_probe times: this model, on a batch of these images
        n = min(t.batch_size, len(dataset.x_train))
        speed_keys = ("batch_size", "shift", "shift_fill", "flip", "cutout", "ema", "steps_per_execution")
        job = json.dumps([dataclasses.asdict(cfg.model), {k: getattr(t, k) for k in speed_keys},
                          len(dataset.class_names)], sort_keys=True, default=str)
        return job, build, dataset.x_train[:n], keras.utils.to_categorical(dataset.y_train[:n],
                                                                         len(dataset.class_names))

    here = None
    if recorded is None and chief is not None:
        PROBED.clear()
        here = fast_path(t, dist, measure=False)
        precision, jit = chief
        if here != chief:  # explicit values are the chief's: the hosts agreed on their params
            auto = [f"train.{k} auto" for k in ("precision", "jit_compile") if getattr(t, k) == "auto"]
            print(f"{' and '.join(auto)}: {described(*chief)}, as the chief "
                  f"({dist.cluster.tasks[0] if dist.cluster else 'chief'}) trains; this host would take "
                  f"{described(*here)}", flush=True)
    elif recorded is None:  # before the seed: the probe's models leave the run's draws as they were
        precision, jit = fast_path(t, dist, probe)
    else:
        PROBED.clear()
        here = fast_path(t, dist, probe, measure=False)
        precision = recorded.precision if t.precision == "auto" else t.precision
        jit = recorded.jit_compile if t.jit_compile == "auto" else t.jit_compile
        check_recorded(recorded, t)
    keras.utils.set_random_seed(t.seed)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        with dist.before_training():  # in a cluster, a host that ends meanwhile is named in one line on the others
            model = build(precision, jit)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    if recorded is not None:
        _say_recorded(t, recorded, here, model)
    dist.adapt(model)
    return model


def check_recorded(recorded: Recorded, t: config.TrainConfig) -> None:
    """ConfigError where this machine cannot go on with a resumed run's precision and XLA choice (`t`: the run's
    params): bfloat16 + XLA on a JAX CPU that computes it wrongly (`bf16_xla_wrong_here`)."""
    if bf16_xla_wrong_here(recorded.precision, recorded.jit_compile):
        mine = Recorded(*(jax_cpu_bf16_xla_fallback(recorded.precision, t, False) or ("float32", False)), "")
        raise config.ConfigError(
            f"train.precision: {recorded.source} in {recorded.described()}, which this JAX computes wrongly on its "
            f"CPU (its XLA miscompiles bfloat16 convolutions: NaN val_loss; a fresh run here takes "
            f"{mine.described()}); set XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= to go on with it, or "
            f"resume=never to start afresh")


def _say_recorded(t: config.TrainConfig, recorded: Recorded, here: tuple[str, bool | str] | None,
                  model: keras.Model) -> None:
    """The line `compile_model` prints where a resumed run's `auto` goes on as recorded, not as this machine (`here`:
    its choice, None where only measuring would tell) would take it."""
    auto = [f"train.{k} auto" for k in ("precision", "jit_compile") if getattr(t, k) == "auto"]
    if not auto:
        return
    if here is not None:
        jit = model._resolve_auto_jit_compile() if here[1] == "auto" else here[1]  # Keras's rule, for this model here
        mine = Recorded(here[0] if t.precision == "auto" else recorded.precision,
                        jit if t.jit_compile == "auto" else recorded.jit_compile, "")
        if (mine.precision, mine.jit_compile) == (recorded.precision, recorded.jit_compile):
            return
    print(f"{' and '.join(auto)}: {recorded.described()}, as {recorded.source}; "
          + (f"this machine would take {mine.described()}" if here is not None else "not measured on this machine"),
          flush=True)


def progress_verbosity(setting: str) -> int:
    """auto: a live progress bar on a terminal, one line per epoch in logs and under `mlflow run`."""
    return (1 if sys.stdout.isatty() else 2) if setting == "auto" else int(setting)


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of every epoch of one `fit`: in `seconds` the whole epoch (validation, and EMA's BN
    recalibration, included), in `train_seconds` its training steps alone (from the epoch's start to its last train
    step's end), which images trained per second are counted over."""

    def on_train_begin(self, logs=None):
        self.seconds, self.train_seconds = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._trained = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):  # fit's Interruptible has this hook too: no new per-step cost
        self._trained = time.perf_counter()  # the step is done: Keras has read its logs

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        self.train_seconds.append(self._trained - self._start)


def seconds_left(seconds: list[float], done: int, total: int) -> float | None:
    """Seconds the epochs after epoch `done` of `total` should take, at the median of `seconds`, the epochs of this
    `fit` so far, its first left out once there is another (it compiled the train step); None before any epoch ended.
    Validation is in each epoch's seconds, so in the estimate too."""
    if not seconds:
        return None
    return float(np.median(seconds[1:] or seconds)) * max(total - done, 0)


def duration(seconds: float) -> str:
    """`42 s`, `17 min`, `3 h 05 min`: a remaining time as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


class EpochLine(EpochTimer):
    """Verbosity 2: one console line per epoch, `Epoch 3/10 - 41.2s - acc: 0.7012 - loss: ... - val_acc: ... -
    ~5 min left, ends ~14:07 UTC` (Keras's own verbose=2 prints two: the epoch header, then the metrics; the time
    left: `seconds_left`, high after a fit's first epoch, which compiles, until the second). `bar`: under Keras's
    progress bar (verbosity 1, placed before this callback), the time left alone, on a line of its own."""

    def __init__(self, bar: bool = False):
        super().__init__()
        self.bar = bar

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        metrics = " - ".join(f"{name}: {value:.4f}" for name, value in (logs or {}).items())
        parts = [] if self.bar else [f"Epoch {epoch + 1}/{self.params['epochs']}", f"{self.seconds[-1]:.1f}s", metrics]
        left = seconds_left(self.seconds, epoch + 1, self.params["epochs"])
        if left:
            ends = time.strftime("%H:%M", time.gmtime(time.time() + left))
            parts.append(f"~{duration(left)} left, ends ~{ends} UTC")
        if parts:
            print(" - ".join(parts), flush=True)


def first_flips(images: int, seed: int) -> np.ndarray:
    """`train.alternate_flip`: which of `images` training images are mirrored in the first epoch (each with
    probability 1/2, drawn from `seed` alone). In epoch e those are mirrored when e is even, the others when it is
    odd, so any two consecutive epochs show every image once each way (airbench's alternating flip)."""
    return np.random.default_rng([seed, 0xF1]).random(images) < 0.5


def flipped_in(first: np.ndarray, epoch: int) -> np.ndarray:
    """Which images `first_flips`' alternating flips mirror in `epoch` (0-based)."""
    return first ^ bool(epoch % 2)


@functools.cache
def _device_gather(mirroring: bool, batch_shardings: tuple | None = None):
    """One jitted gather of (images, labels) rows for every DeviceBatches, so it compiles once per shape;
    mirroring: it takes `mirror` too (one bool per row) and flips those images left-right. `batch_shardings`: the
    layouts its (images, labels) batches come out in (each device gathering its own slice), else the images'
    device's."""
    import jax
    import jax.numpy as jnp

    def gather(images, labels, idx, mirror=None):
        batch = jnp.take(images, idx, axis=0)
        if mirroring:
            batch = jnp.where(mirror[:, None, None, None], batch[:, :, ::-1], batch)
        return batch, jnp.take(labels, idx, axis=0)

    return jax.jit(gather, out_shardings=batch_shardings)


def _data_parallel_shardings():
    """(everywhere, batches): under JAX's data_parallel (Keras's `DataParallel`), an array whole on every device of
    its mesh, and the layouts Keras cuts batches of images and of one-hot labels into over them (its own, so that it
    leaves the batches as they are); else (None, None)."""
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.DataParallel):
        return None, None
    from jax.sharding import NamedSharding, PartitionSpec

    everywhere = NamedSharding(distribution.device_mesh.backend_mesh, PartitionSpec())
    return everywhere, tuple(distribution.get_data_layout((None,) * rank).backend_layout for rank in (4, 2))


class ArrayBatches(keras.utils.PyDataset):
    """Batches of (images, labels) cut from arrays in host memory, for backends other than TensorFlow: what Keras's own
    array feed lacks (it always ends an epoch with the partial batch, knows nothing of epochs, and a resumed run's
    order is not the uninterrupted one's). `shuffle`: a seeded new order every epoch;
    `drop_remainder`: each epoch is `len(images) // batch_size` whole batches, and the images left over are different
    ones each epoch; `alternate_flip`: images mirrored as `first_flips` says (training only). `first_epoch`: a
    resumed run's, which starts in the order and with the mirroring the uninterrupted run had there."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                 drop_remainder: bool = False, alternate_flip: bool = False, first_epoch: int = 0):
        super().__init__()
        self.images, self.labels = self.place(images), self.place(labels)
        self.batch_size, self.shuffle, self.drop_remainder = batch_size, shuffle, drop_remainder
        self.rng = np.random.default_rng(seed)
        self.order = np.arange(len(images))
        if shuffle:
            for _ in range(first_epoch + 1):  # epoch e's order is the generator's (e + 1)-th permutation
                self.order = self.rng.permutation(len(images))
        self.first = first_flips(len(images), seed) if alternate_flip else None
        self.epoch = first_epoch

    def place(self, array: np.ndarray):
        return array

    def take(self, rows: np.ndarray, mirror: np.ndarray | None):
        images = self.images[rows]
        if mirror is not None:
            images = np.where(mirror[:, None, None, None], images[:, :, ::-1], images)
        return images, self.labels[rows]

    def __len__(self) -> int:
        return (len(self.order) // self.batch_size if self.drop_remainder
                else math.ceil(len(self.order) / self.batch_size))

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.take(rows, None if self.first is None else flipped_in(self.first, self.epoch)[rows])

    def on_epoch_end(self) -> None:
        self.epoch += 1
        if self.shuffle:
            self.order = self.rng.permutation(len(self.order))


class DeviceBatches(ArrayBatches):
    """Batches cut on the accelerator from images copied there once (JAX backend, `train.feed=device`).

    The uint8 images and one-hot labels go to the default device when this is made; each batch is a
    jitted gather there, so per step only the batch's indices leave the host. Keras's own array feed
    instead slices on the host and copies every batch.

    Under data_parallel every device of the mesh holds the images, and each gathers its own slice of every batch:
    the batch comes out in the layout Keras's `DataParallel` trains on, which it then leaves as it is. Before
    2026-12-06 the images were on the first device alone, which gathered every whole batch, and each step copied the
    other devices' slices from it.
    """

    def place(self, array: np.ndarray):
        import jax

        return jax.device_put(array, _data_parallel_shardings()[0])

    def take(self, rows: np.ndarray, mirror: np.ndarray | None):
        gather = _device_gather(mirror is not None, _data_parallel_shardings()[1])
        if mirror is None:
            return gather(self.images, self.labels, rows)
        return gather(self.images, self.labels, rows, mirror)


class EpochClock(keras.callbacks.Callback):
    """The epoch whose order `host_batches` draws a pass in, read as the pass starts: `fit` sets it as each epoch
    begins (a resumed run's first is the epoch it resumes at), before Keras starts that epoch's pass."""

    def __init__(self, epoch: int = 0):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


def host_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                 clock: EpochClock | None = None, drop_remainder: bool = False, alternate_flip: bool = False):
    """A tf.data pipeline of (images, labels) batches cut from arrays held in host memory (TensorFlow backend).

    shuffle: each pass over it is one epoch, `clock.epoch`'s, in an order drawn from (seed, epoch) alone, so that a
    run resumed at an epoch sees the batches the uninterrupted run saw there; each epoch ends with its partial batch,
    as Keras's array feed does, or with `drop_remainder` has whole batches only; `alternate_flip`: the images
    `first_flips` and the epoch say are mirrored (a resumed run mirrors the same ones). Else: one pass in order
    (validation). Either way its length is known, so Keras ends an epoch where the pass ends: with
    `train.steps_per_execution` k, an endless stream (this feed before 2026-12-04) ran each epoch's steps up to a
    multiple of k, into the next epoch's batches, and the lr schedule, laid out over the epoch's own count, ended early.

    It differs from Keras's own array feed in one setting: tf.data's autotuning is off (the buffers are fixed).
    With it on, destroying an iterator waits for the autotuner's thread to wake from a sleep that grows to a
    minute, and Keras destroys one after every validation, every epoch (its array feed makes one per epoch)
    and `fit`: on a 2-core Xeon that stalled training for up to ~20 s at random epoch ends and 26-42 s after the
    last; `fit` took 1.24x as long over 3 short epochs (bench/results/feed.md), and the quick command's
    median fell from 623 to 539 s.
    """
    import tensorflow as tf

    n = len(images)
    images, labels = tf.constant(images), tf.constant(labels)

    alternate = shuffle and alternate_flip
    if alternate:  # rows n..2n-1 hold the mirror images: mirroring is then part of the one gather, at no cost
        first = tf.constant(first_flips(n, seed))
        images = tf.concat([images, tf.reverse(images, axis=[2])], axis=0)

    def epoch_batches(epoch):
        order = tf.range(n, dtype=tf.int64)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(order, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        rows = tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=shuffle and drop_remainder)
        if not alternate:
            return rows
        mirrored = tf.math.logical_xor(first, tf.equal(epoch % 2, 1))  # flipped_in, as a tensor
        return rows.map(lambda i: (i + n * tf.cast(tf.gather(mirrored, i), tf.int64), i))

    def gather(image_rows, label_rows=None):  # the same rows of both unless alternate flips chose mirror images
        return tf.gather(images, image_rows), tf.gather(labels, image_rows if label_rows is None else label_rows)

    if shuffle:
        clock = clock or EpochClock()

        def epoch_now():  # run as each pass starts (Keras starts one per epoch, after the epoch's callbacks began)
            yield clock.epoch

        epochs = tf.data.Dataset.from_generator(epoch_now, output_signature=tf.TensorSpec((), tf.int64))
    else:
        epochs = tf.data.Dataset.range(1)
    steps = n // batch_size if shuffle and drop_remainder else math.ceil(n / batch_size)
    # the length known up front: else Keras learns it by running out on the first pass and warns "ran out of data"
    batches = epochs.flat_map(epoch_batches).map(gather).apply(tf.data.experimental.assert_cardinality(steps))
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False  # as Keras's array feed
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA  # as Keras's
    return batches.prefetch(2).with_options(options)


class EMABatchNorm(keras.callbacks.Callback):
    """With weight EMA, BatchNormalization's moving statistics recomputed under the averaged weights, before each
    validation (after `SwapEMAWeights` has put them in the model) and when training ends (after `fit` has).

    Keras's `use_ema` averages the trainable weights only: the moving mean and variance stay those gathered under
    the raw weights, which the averaged ones do not produce, and the model validated, evaluated and served pairs
    the two (as `torch.optim.swa_utils.update_bn` fixes for SWA). Here each BN layer's statistics become the plain
    mean of its batch moments over `batches` training batches, augmented as in training: one compiled forward pass
    in training mode per batch (`stateless_call`, traced with every BN momentum at 0, so each pass returns that
    batch's moments as the moving statistics), averaged, then assigned. Training reads batch moments, never the
    moving ones, so it is unaffected. The batches are the same at every call (`seed`), whole ones of `batch_size`
    (fewer if the images make fewer; all of them in one if they make none), each a random draw from all of `images`
    as a training batch is: image folders list their images class by class, and batches of neighbours (one class
    each) averaged within-class variances, far under those BN normalises with in training. `flip`: mirror each
    image at random, for a model whose flips the feed does (`train.alternate_flip`).

    `replicas`: the copies of the model a `tf.distribute` strategy trains, each normalising its own slice of every
    batch, never the whole (`batch_norm_replicas`): the moments are then each slice's, and the statistics their mean, as
    training's are (`ReplicaMeanBatchNorm`). They were the whole global batch's, a larger sample than any replica
    normalised with in training. The same images either way."""

    def __init__(self, images: np.ndarray, batches: int, batch_size: int, *, seed: int = 0, flip: bool = False,
                 replicas: int = 1):
        super().__init__()
        rng = np.random.default_rng([seed, 0xB7])
        count = min(len(images), max(1, min(batches, len(images) // batch_size)) * batch_size)
        width = max(1, min(batch_size, len(images)) // replicas)  # a replica's slice of a batch
        drawn = rng.permutation(len(images))[:count - count % width].reshape(-1, width)
        self.rows = np.sort(drawn, axis=1)  # each batch's rows in order: one gather, front to back
        self.images, self.flips = images, (rng.random(len(images)) < 0.5) if flip else None
        self._forward = None

    def batch(self, k: int) -> np.ndarray:
        x = self.images[self.rows[k]]
        if self.flips is not None:
            mirror = self.flips[self.rows[k]]
            x = np.where(mirror[:, None, None, None], x[:, :, ::-1], x)
        return x

    def _compiled_forward(self):
        """The model's training-mode pass as a function of its variables' values, returning the new values of its
        non-trainable ones; compiled on TensorFlow and JAX (an eager pass of ResNet-164 is many times slower)."""
        model = self.model

        def forward(trainable, non_trainable, x):
            return model.stateless_call(trainable, non_trainable, x, training=True)[1]

        backend = keras.backend.backend()
        if backend == "jax":
            import jax

            return jax.jit(forward)
        if backend == "tensorflow":
            import tensorflow as tf

            return tf.function(forward)
        return forward

    def recalibrate(self) -> None:
        norms = [layer for layer in self.model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
        moving = {id(v) for layer in norms for v in (layer.moving_mean, layer.moving_variance)}
        variables = self.model.non_trainable_variables
        slots = [i for i, v in enumerate(variables) if id(v) in moving]
        momenta = [layer.momentum for layer in norms]
        try:
            for layer in norms:
                layer.momentum = 0.0  # read when the pass is traced: each pass returns its batch's moments
            if self._forward is None:
                self._forward = self._compiled_forward()
            trainable = [v.value for v in self.model.trainable_variables]
            state = [v.value for v in variables]
            sums = [np.zeros(variables[i].shape, np.float64) for i in slots]
            for k in range(len(self.rows)):
                state = list(self._forward(trainable, state, self.batch(k)))  # carries the augmentation's seeds
                for total, i in zip(sums, slots, strict=True):
                    total += keras.ops.convert_to_numpy(state[i])
        finally:
            for layer, momentum in zip(norms, momenta, strict=True):
                layer.momentum = momentum
        for total, i in zip(sums, slots, strict=True):
            variables[i].assign(total / len(self.rows))

    def on_test_begin(self, logs=None):
        self.recalibrate()

    def on_train_end(self, logs=None):
        self.recalibrate()


class ReplicaMeanBatchNorm(keras.callbacks.Callback):
    """Under a `tf.distribute` strategy of several replicas (mirrored, multi_worker), BatchNormalization's moving
    statistics made the mean of every replica's, of every host's, before each validation and when training ends.

    Keras 3 makes them mirrored variables that each replica updates from its own slice of the batch and that are never
    synchronised (tf.keras read them as the mean of the replicas'): the copies drifted apart, validation scored each
    replica's slice of the images with that replica's statistics, while the checkpoint, the served model and evaluate
    read the first replica's alone, and a resumed run gave every replica the first's, validating otherwise than the
    uninterrupted run. The moving average is linear, so their mean is the moving average of the slices' mean moments,
    whenever it is taken: every replica then holds the statistics that are validated, checkpointed and served."""

    def __init__(self, strategy):
        super().__init__()
        self.strategy, self._average = strategy, None

    def average(self) -> None:
        import tensorflow as tf

        if self._average is None:
            norms = [layer for layer in self.model._flatten_layers()
                     if isinstance(layer, keras.layers.BatchNormalization)]
            moving = [v.value for layer in norms for v in (layer.moving_mean, layer.moving_variance)]

            def replica_mean():  # each replica's copy: the mean of every replica's
                means = tf.distribute.get_replica_context().all_reduce("MEAN", [v.read_value() for v in moving])
                for variable, mean in zip(moving, means, strict=True):
                    variable.assign(mean)

            self._average = tf.function(lambda: self.strategy.run(replica_mean))
        self._average()

    def on_test_begin(self, logs=None):
        self.average()

    def on_train_end(self, logs=None):
        self.average()


def batch_norm_replicas(model: keras.Model) -> int:
    """Into how many slices training cuts each batch for BatchNormalization: the replicas of a `tf.distribute`
    strategy, which normalise theirs apart; 1 otherwise (JAX's data_parallel normalises the whole sharded batch)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    return int(model.distribute_strategy.num_replicas_in_sync)


def replica_mean_batch_norm(model: keras.Model) -> list:
    """[`ReplicaMeanBatchNorm`] where `model` trains under a `tf.distribute` strategy of several replicas, else []."""
    if batch_norm_replicas(model) < 2:
        return []
    return [ReplicaMeanBatchNorm(model.distribute_strategy)]


class Interruptible(keras.callbacks.Callback):
    """Raises again a stopping signal's exception that Keras swallowed (`pipeline.interrupts`): after each batch,
    right after the conversion of the batch's logs that swallows it, and after each epoch; and, before the first
    batch, one swallowed before this fit (a weakref callback's "Exception ignored" while the data loaded or the model
    was built): cleared there, training ran to its end with the handlers ignoring every further signal, and the
    step's end (`tracking._ended_with_reason`) no longer saw it. (The entry points' `cli` clears one it handled.)"""

    def _raise_pending(self, *args, **kwargs):
        if (exc := interrupts.take()) is not None:
            raise exc

    on_train_begin = on_train_batch_end = on_test_batch_end = on_predict_batch_end = on_epoch_end = _raise_pending


def fit(model: keras.Model, cfg: config.Config, splits: tuple, num_classes: int,
        callbacks: list) -> keras.callbacks.History:
    """`model.fit` on `split_validation`'s splits, validating every epoch; the same on every host of a cluster.

    train.feed host: uint8 arrays in host memory, a batch copied per step (`host_batches` on TensorFlow,
    `ArrayBatches` on other backends); device: `DeviceBatches` (JAX only). Either way the training order is drawn
    from (train.seed, epoch) alone: a `Checkpoint` among `callbacks` tells which epoch training resumes at, and a
    resumed run sees the batches (and draws the augmentations) the uninterrupted one did there. Keras's own array
    feed shuffles from NumPy's global generator, which `compile_model` seeds: a run resumed at epoch e drew epoch 0's
    order again.
    """
    t = cfg.train
    x_train, y_train, x_val, y_val = splits
    y_train, y_val = keras.utils.to_categorical(y_train, num_classes), keras.utils.to_categorical(y_val, num_classes)
    if t.ema:  # validate on the averaged weights (the ones evaluated and served), train on the raw ones
        bn = [EMABatchNorm(x_train, t.ema_bn_batches, t.batch_size, seed=t.seed, flip=t.alternate_flip,
                           replicas=batch_norm_replicas(model))] if t.ema_bn_batches else []
        callbacks = [keras.callbacks.SwapEMAWeights(), *bn, *callbacks]
    verbose = progress_verbosity(t.verbose)
    if verbose == 2:
        callbacks, verbose = [*callbacks, EpochLine()], 0
    elif verbose == 1:  # Keras adds its bar after every callback given: placed here, the time left follows it
        callbacks = [*callbacks, keras.callbacks.ProgbarLogger(), EpochLine(bar=True)]
    # the replicas' statistics averaged first: before EMA's recomputation, the validation, the checkpoint at the end
    callbacks = [*replica_mean_batch_norm(model), *callbacks]
    options = dict(epochs=t.epochs, callbacks=[TerminateOnNaN(), NoScoreWhereDiverged(), *callbacks,
                                               Interruptible()], verbose=verbose)
    first_epoch = max((Checkpoint.completed_epochs(c.backup_dir) for c in callbacks if isinstance(c, Checkpoint)),
                      default=0)
    if keras.backend.backend() != "tensorflow":
        feed = DeviceBatches if t.feed == "device" else ArrayBatches
        return model.fit(feed(x_train, y_train, t.batch_size, shuffle=True, seed=t.seed, first_epoch=first_epoch,
                              drop_remainder=t.drop_remainder, alternate_flip=t.alternate_flip),
                         validation_data=feed(x_val, y_val, t.batch_size, shuffle=False),
                         shuffle=False, **options)  # the feed's own order: Keras would reorder its batches at random
    clock = EpochClock(first_epoch)
    options["callbacks"].append(clock)
    return model.fit(host_batches(x_train, y_train, t.batch_size, shuffle=True, seed=t.seed, clock=clock,
                                  drop_remainder=t.drop_remainder, alternate_flip=t.alternate_flip),
                     validation_data=host_batches(x_val, y_val, t.batch_size, shuffle=False),
                     shuffle=False, **options)  # the order is host_batches' own (Keras warns that it ignores shuffle)


class TerminateOnNaN(keras.callbacks.TerminateOnNaN):
    """Keras's, stopping training (`model.stop_training`) after a batch whose loss is NaN or infinite without printing
    its "Batch N: Invalid loss, terminating training": train's one-line error says so (`diverged`)."""

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.model.stop_training = True


class NoScoreWhereDiverged(keras.callbacks.Callback):
    """An epoch whose loss (val_loss) is NaN or infinite has its acc (val_acc) set to NaN for every callback after this
    one, History included: it is that of a model whose outputs are not numbers, argmax reading each NaN row as class
    0, and a val_acc of that class's share was logged and printed as a real accuracy."""

    def on_epoch_end(self, epoch, logs=None):
        for prefix in ("", "val_"):
            loss = (logs or {}).get(f"{prefix}loss")
            if loss is not None and not np.isfinite(loss) and f"{prefix}acc" in logs:  # compile_model's one metric
                logs[f"{prefix}acc"] = math.nan


class Checkpoint(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore (every epoch), with a checkpoint that survives its process being killed at
    any instant. Keras overwrites `latest.weights.h5` in place, then the metadata: a kill during the first
    write leaves a torn file (h5py's "bad object header" on resume), between the two the weights of one
    epoch under the metadata of the one before. Here each epoch's weights go to a file of their own, then
    `training_metadata.json`, naming them (and holding the augmentation's random state, `seed_states`), replaces
    the previous one in one rename, and only then is the previous epoch's file deleted: the metadata always
    names complete weights of the epoch it states.
    Both are flushed to disk before the rename, for a machine that loses power. `every`: epochs between
    checkpoints (0: none). `keep`: the folder outlives `fit`, its last epoch saved when training ends, for the
    caller to remove once the model is safe; else `fit` removes it when training ends."""

    METADATA = "training_metadata.json"

    def __init__(self, backup_dir: str | Path, every: int = 1, *, keep: bool = False):
        super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=not keep)
        self.every, self.keep = every, keep
        self._trained, self._diverged = None, False

    def on_train_end(self, logs=None):
        if self.keep and self.every and self._current_epoch % self.every and not self._diverged:  # fell between saves
            if self._trained is None:
                self._save_model()
            else:  # the trained weights, not the averages `fit` has put in their place (see on_epoch_end)
                averaged = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_variables]
                self._assign(self._trained)
                self._save_model()
                self._assign(averaged)
        super().on_train_end(logs)

    def _assign(self, values: list) -> None:
        for variable, value in zip(self.model.trainable_variables, values, strict=True):
            variable.assign(value)

    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch, self._last_batch_seen = epoch + 1, 0
        self._trained = None
        # an epoch that diverged (`diverged`) is never saved: a stop before the run failed and removed the folder left
        # NaN weights there as a completed epoch, and a rerun resumed them (the last epoch's: it logged their model)
        self._diverged = not all(np.isfinite(logs[key]) for key in ("loss", "val_loss") if key in (logs or {}))
        if self._diverged:
            return
        if self.every and self._current_epoch % self.every == 0:
            self._save_model()
        elif self.keep and self.every and getattr(getattr(self.model.optimizer, "inner_optimizer",
                                                          self.model.optimizer), "use_ema", False):
            # on_train_end saves this epoch if training ends here: by then `fit` has replaced the weights by their
            # EMA, and a run going on from the averages (bench.gpu_epoch --stop-after, an extended run) would
            # train on from weights epochs behind the uninterrupted run's. Keep the trained ones for it.
            self._trained = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_variables]

    def _save_model(self):
        folder = Path(self.backup_dir)
        folder.mkdir(parents=True, exist_ok=True)
        weights = f"epoch-{self._current_epoch:04d}.weights.h5"
        self.model.save_weights(str(folder / weights), overwrite=True)
        staged = folder / f"{self.METADATA}.partial"
        staged.write_text(json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen,
                                      "weights": weights, "seed_states": [
                                          keras.ops.convert_to_numpy(v).tolist() for v in seed_states(self.model)]}))
        for path in (folder / weights, staged):
            _flush_to_disk(path)
        os.replace(staged, folder / self.METADATA)
        _flush_to_disk(folder)
        for old in folder.glob("epoch-*.weights.h5"):
            if old.name != weights:
                old.unlink()

    @classmethod
    def completed_epochs(cls, folder: str | Path) -> int:
        """How many epochs the checkpoint in `folder` holds (0 if none)."""
        metadata = Path(folder) / cls.METADATA
        return int(json.loads(metadata.read_text())["epoch"]) if metadata.exists() else 0

    def _load_model(self):
        metadata = Path(self.backup_dir) / self.METADATA
        if not metadata.exists():
            return
        saved = json.loads(metadata.read_text())
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)  # its variables are in the file too
        weights = Path(self.backup_dir) / saved.get("weights", "latest.weights.h5")
        try:
            self.model.load_weights(str(weights))
        except ValueError as exc:  # Keras's "A total of N objects could not be loaded", a traceback, the run FAILED
            raise config.ConfigError(f"resume: the checkpoint {weights} does not fit the model built here "
                                     f"({self._first_mismatch(str(exc))}): its weights are of another model, trained "
                                     f"by other code or params; restore that code to go on with the run, or "
                                     f"resume=never to start afresh") from None
        states = seed_states(self.model)
        if len(states) == len(saved.get("seed_states", [])):  # (checkpoints written before they were saved: none)
            for variable, value in zip(states, saved["seed_states"], strict=True):
                variable.assign(np.asarray(value, dtype=variable.dtype))
        self.model._initial_epoch = saved["epoch"]

    def _first_mismatch(self, message: str) -> str:
        """The variable whose shape differs, from Keras's message on weights that do not fit: `path: (4, 5) here, (4,
        2) in the checkpoint` (less the model's name); its first line where it names none."""
        shapes = re.search(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))", message)
        path = re.search(r"Target variable: <Variable path=([^,]+),", message)
        if not (shapes and path):
            return message.strip().splitlines()[0]
        name = path[1].removeprefix(f"{self.model.name}/")
        return f"{name}: {shapes[1]} here, {shapes[2]} in the checkpoint"


def seed_states(model: keras.Model) -> list:
    """The state variables of the model's `keras.random.SeedGenerator`s (the augmentation's shifts, flips and
    cutout draw from them), in the model's order. `save_weights` leaves them out, so a checkpoint holds them
    apart: without them a resumed run drew the augmentations of its first epoch again and trained differently."""
    return [v for v in model.variables if v.name == "seed_generator_state"]


def _flush_to_disk(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    """The lr of the optimizer's last step (`optimizer.learning_rate` is the one of its next step)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # mixed_float16 wraps it in a LossScaleOptimizer
    lr = optimizer._learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(keras.ops.maximum(optimizer.iterations - 1, 0))
    return float(keras.ops.convert_to_numpy(lr))


def diverged(history: keras.callbacks.History) -> str | None:
    """Why training diverged ("training diverged: ...", the start `tracking.steps.run_status` reads on a run's
    failure_reason), or None if the last epoch's loss and val_loss are finite. A NaN val_loss with a finite
    loss is a model whose predictions are not numbers for some validation images (with train.ema, the averaged weights
    validated, evaluated and served, while the raw ones trained on)."""
    for key in ("loss", "val_loss"):
        values = history.history.get(key, [])
        if values and not np.isfinite(values[-1]):
            return (f"training diverged: {key} became {values[-1]} in epoch "
                    f"{len(history.epoch) and history.epoch[-1] + 1}")
    return None
