"""Parameters: YAML under params/ loaded into frozen dataclasses, validated strictly.

`params/default.yaml` is the single source of every default. Any other params file is
layered on top of it and holds only what differs; `key=value` overrides (dotted keys, YAML
values) are applied last. An unknown key, a wrong type or an out-of-range value raises
`ConfigError` naming the key, before any data is read or any model is built.

`read_yaml` is the one YAML file reader (params and sweep files). `entry_point_parser` builds the
entry points' command lines from MLproject, where alone their parameters are written. `resnet_depth` is the
depth formula behind every model name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import fractions
import functools
import math
import os
import re
import shlex
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import yaml

from pipeline.data import CIFAR10_TEST_IMAGES, CIFAR10_TRAIN_IMAGES, IMAGE_SIZE, URI, shells_folder_hint

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = PROJECT_ROOT / "params" / "default.yaml"
MLPROJECT = PROJECT_ROOT / "MLproject"


# evaluate.tta: the test-time augmentations of the served model (see pipeline.augment.tta_views)
TTA_MODES = ("none", "flip", "flip_shift")
# model.conv_init: Keras initialisers by name, and pytorch (see pipeline.model.conv_initializer)
# resnet9's residual branch ends in BN-ReLU: a zero-initialised end of it (gamma or kernel) feeds that ReLU exactly 0,
# whose gradient is 0, so the branch would never learn (measured: its weights stayed where they started).
RESNET9_ZERO_INIT = ("must be false for model.arch resnet9: its residual branches end in a ReLU, which passes no "
                     "gradient to a branch that starts at zero, so they would never train")
CONV_INITS = ("he_normal", "he_uniform", "lecun_normal", "lecun_uniform", "glorot_uniform", "pytorch")
# train.shift_fill: what a shifted image shows where it moved off the edge (see pipeline.augment.shift_flip)
SHIFT_FILLS = ("nearest", "constant", "reflect")
# The names Keras's backend module loads (keras.src.backend): the training commands refuse others before Keras loads
# (`inputs.check_configured_backend`), the served model as it loads (`serve.check_backend`).
KERAS_BACKENDS = ("jax", "numpy", "openvino", "tensorflow", "torch")
# data.synthetic_train and synthetic_test: make_synthetic holds each split as float64 while it makes it, 25 KB an image
SYNTHETIC_MAX = 100_000
# the longest param value MLflow keeps whole (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH): a longer one is logged cut
MLFLOW_PARAM_MAX = 6000
TOO_LONG = f"characters, more than the {MLFLOW_PARAM_MAX} MLflow keeps of a param value (it would be logged cut short)"
# train.jit_compile: true, false or auto, as Keras's compile() takes it
Auto = typing.Literal["auto"]
# train.lr_scaling linear scales train.lr by train.batch_size / this (the seed's batch)
LR_REFERENCE_BATCH = 128


def round_half_up(x: float) -> int:
    """`x` to the nearest whole number, halves up (2.5 -> 3, 3.5 -> 4; Python's round() takes halves to even, 2.5 -> 2),
    a float product's error forgiven (3/22 * 55 is 7.499999999999999: 8). The rule for every fraction of the run
    (train.lr_boundaries' epochs, train.warmup's steps)."""
    return math.floor(round(x, 9) + 0.5)


class ConfigError(ValueError):
    """A parameter is unknown, mistyped or out of range; the message names the key."""


def _check(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    source: str
    max_train: int
    max_test: int
    synthetic_train: int
    synthetic_test: int
    seed: int

    def __post_init__(self):
        object.__setattr__(self, "source", normal_source(self.source))

    def validate(self) -> None:
        _check(bool(self.source.strip()), "data.source", "must not be empty", self.source)
        for name in ("max_train", "max_test"):
            _check(getattr(self, name) >= 0, f"data.{name}", "must be >= 0 (0 = all)", getattr(self, name))
        for name in ("synthetic_train", "synthetic_test"):
            _check(getattr(self, name) >= 10, f"data.{name}", "must be >= 10", getattr(self, name))
            _check(getattr(self, name) <= SYNTHETIC_MAX, f"data.{name}",
                   f"must be at most {SYNTHETIC_MAX} (twice CIFAR-10's 50,000 training images: a generated dataset "
                   f"is made in memory, about 25 KB an image)", getattr(self, name))
        _check_seed("data.seed", self.seed)


BUILT_IN_SOURCES = ("cifar10", "synthetic")


def normal_source(source: str) -> str:
    """`data.source` spelled one way for one path: without `./`, doubled or trailing slashes (`-P data=images/`, as a
    shell completes a folder, and `images` were two params, so a second prepare and a compare column for identical
    runs). `..` stays (through a link it leads elsewhere), and so does a path's absolute or relative form; a folder
    named like a built-in source keeps a leading `./` (`./cifar10/` -> `./cifar10`)."""
    if not source.strip() or source in BUILT_IN_SOURCES or URI.match(source):  # `s3://b/x` is no path `s3:/b/x`
        return source
    normal = str(PurePath(source))
    return f"./{normal}" if normal in BUILT_IN_SOURCES else normal


def source_identity(source: str) -> str:
    """What `data.source` names, however it is spelled, for the keys that find a prepare run to reuse and a train run
    to resume: an existing path as the file or folder it leads to (absolute, links followed: `../shared/x.tar.gz` from
    the project and its absolute path are one source); else as it is (a built-in source, or a missing path, which
    prepare refuses). Two spellings were two prepare runs, and a killed run was not resumed by a rerun spelling its
    data otherwise. The logged param keeps the spelling given (`normal_source`)."""
    if source in BUILT_IN_SOURCES or not os.path.exists(source):
        return source
    return os.path.realpath(source)


def _check_seed(key: str, seed: int) -> None:
    """NumPy's and Keras's generators take seeds in [0, 2**32)."""
    _check(0 <= seed < 2**32, key, "must be in [0, 2**32)", seed)


def resnet_depth(*, arch: str, block: str, units_per_stage: int, stages: int) -> int:
    """Weighted layers, the number in a ResNet's name: resnet9 has 8 convs + the classifier; preact has the
    stem, 3 (bottleneck) or 2 (basic) convs per unit and the classifier (bottleneck 9n + 2 and basic
    6n + 2 over 3 stages). Projection shortcuts are not counted, by convention."""
    if arch == "resnet9":
        return 9
    per_unit = 3 if block == "bottleneck" else 2
    return per_unit * units_per_stage * stages + 2


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    block: str
    units_per_stage: int
    widths: tuple[int, ...]
    strides: tuple[int, ...]
    stem_filters: int
    l2: float
    l2_norm_and_bias: bool
    bn_momentum: float
    ghost_batch: int
    zero_init_residual: bool
    stem: str
    conv_init: str
    pool_before_bn: bool

    def validate(self) -> None:
        _check(self.arch in ("preact", "resnet9"), "model.arch", "must be 'preact' or 'resnet9'", self.arch)
        _check(self.stem in ("conv", "whiten"), "model.stem", "must be 'conv' or 'whiten'", self.stem)
        _check(self.stem == "conv" or self.arch == "resnet9", "model.stem", "'whiten' is for model.arch resnet9",
               self.stem)
        _check(not self.pool_before_bn or self.arch == "resnet9", "model.pool_before_bn", "is for model.arch resnet9",
               self.pool_before_bn)
        _check(self.conv_init in CONV_INITS, "model.conv_init", f"must be one of {', '.join(CONV_INITS)}",
               self.conv_init)
        _check(all(w >= 1 for w in self.widths), "model.widths", "must all be >= 1", self.widths)
        _check(0 <= self.l2 < 1, "model.l2", "must be in [0, 1)", self.l2)
        _check(0 <= self.bn_momentum < 1, "model.bn_momentum", "must be in [0, 1)", self.bn_momentum)
        _check(self.ghost_batch >= 0, "model.ghost_batch", "must be >= 0 (0 = BN over the whole batch)",
               self.ghost_batch)
        # block, units_per_stage, strides and stem_filters describe preact only, but are values of their kind for
        # resnet9 too: a misspelt one was accepted there and logged, and refused only once the arch changed
        _check(self.block in ("bottleneck", "basic"), "model.block", "must be 'bottleneck' or 'basic'", self.block)
        _check(self.units_per_stage >= 1, "model.units_per_stage", "must be >= 1", self.units_per_stage)
        _check(all(s in (1, 2) for s in self.strides), "model.strides", "must each be 1 or 2", self.strides)
        _check(self.stem_filters >= 1, "model.stem_filters", "must be >= 1", self.stem_filters)
        if self.arch == "resnet9":
            _check(not self.zero_init_residual, "model.zero_init_residual", RESNET9_ZERO_INIT, self.zero_init_residual)
            _check(len(self.widths) == 4, "model.widths",
                   "must list 4 widths for resnet9 (prep, layer1, layer2, layer3), e.g. [64, 128, 256, 512]",
                   self.widths)
            return
        _check(len(self.widths) >= 1, "model.widths", "must list at least one stage", self.widths)
        if self.block == "bottleneck":
            _check(all(w % 4 == 0 for w in self.widths), "model.widths",
                   "must be multiples of 4 for bottleneck blocks", self.widths)
        _check(len(self.strides) == len(self.widths), "model.strides",
               f"must have one entry per stage ({len(self.widths)})", self.strides)

    @property
    def depth(self) -> int:
        return resnet_depth(arch=self.arch, block=self.block, units_per_stage=self.units_per_stage,
                            stages=len(self.widths))


def _distinct_inside(boundaries: tuple[float, ...], epochs: int) -> bool:
    """Whether `boundaries` (fractions of the run) round to distinct epochs after the first and before the last of
    `epochs`: a decay after epoch 0 or the last one, or two on one epoch, would not happen as written."""
    rounded = [round_half_up(b * epochs) for b in boundaries]
    return all(1 <= e < epochs for e in rounded) and len(set(rounded)) == len(rounded)


def _fewest_epochs(boundaries: tuple[float, ...], most: int = 100_000) -> int | None:
    """The fewest epochs from which on every run length holds `boundaries` (`_distinct_inside`), or None past `most`
    (boundaries too close together). Not always the fewest that fit one: [0.3, 0.45] fit 4 epochs, not 5, from 6 on
    all. Past the lengths that round them one epoch or more apart and inside the run, every length fits."""
    gaps = [b - a for a, b in zip((0.0, *boundaries), (*boundaries, 1.0), strict=True)]
    surely = math.ceil(max(1 / min(gaps[1:-1], default=1), 0.5 / gaps[0], 0.5 / gaps[-1])) + 1
    if surely > most or not _distinct_inside(boundaries, surely):
        return None
    fewest = surely
    while fewest > 1 and _distinct_inside(boundaries, fewest - 1):
        fewest -= 1
    return fewest


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    drop_remainder: bool
    lr: float
    lr_scaling: str
    schedule: str
    lr_boundaries: tuple[float, ...]
    lr_decay: float
    warmup: float
    momentum: float
    nesterov: bool
    ema: bool
    ema_momentum: float
    ema_bn_batches: int
    label_smoothing: float
    shift: float
    shift_fill: str
    flip: bool
    alternate_flip: bool
    cutout: int
    validation_fraction: float
    precision: str
    jit_compile: bool | Auto
    steps_per_execution: int
    checkpoint_every: int
    feed: str
    distribute: str
    seed: int
    validation_seed: int | None
    verbose: str

    def validate(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        _check(self.lr > 0, "train.lr", "must be > 0", self.lr)
        _check_seed("train.seed", self.seed)
        if self.validation_seed is not None:
            _check_seed("train.validation_seed", self.validation_seed)
        _check(self.lr_scaling in ("none", "linear"), "train.lr_scaling", "must be 'none' or 'linear'", self.lr_scaling)
        self._check_float32_lr()
        _check(self.schedule in ("step", "cosine", "onecycle"), "train.schedule",
               "must be step, cosine or onecycle", self.schedule)
        self._check_boundaries()
        _check(0 < self.lr_decay <= 1, "train.lr_decay", "must be in (0, 1]", self.lr_decay)
        _check(0 <= self.warmup < 1, "train.warmup", "must be a fraction of train.epochs in [0, 1)", self.warmup)
        # the warm-up ramps the step schedule's lr: one still ramping at a decay would never reach the peak lr
        if self.schedule == "step" and self.boundary_epochs:
            first = self.boundary_epochs[0]
            ends = self.warmup * self.epochs  # at the decay itself too: 0.28 * 25 is 7.000000000000001 in floats
            _check(ends <= first or math.isclose(ends, first), "train.warmup",
                   f"must end by the step schedule's first decay, after epoch {first} of {self.epochs} "
                   f"(train.lr_boundaries), else the lr never reaches train.lr", self.warmup)
        _check(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)", self.momentum)
        _check(0 < self.ema_momentum < 1, "train.ema_momentum", "must be in (0, 1)", self.ema_momentum)
        _check(self.ema_bn_batches >= 0, "train.ema_bn_batches", "must be >= 0 (0: keep the raw weights' statistics)",
               self.ema_bn_batches)
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)", self.label_smoothing)
        _check(0 <= self.shift < 0.5, "train.shift", "must be a fraction of the image size in [0, 0.5)", self.shift)
        # shifts are whole pixels (`shift_pixels`): a shift under half a pixel would silently be none at all
        _check(self.shift == 0 or self.shift_pixels >= 1, "train.shift",
               f"rounds to 0 of {IMAGE_SIZE} pixels (no shift); use 0 for none or at least 1/{IMAGE_SIZE}", self.shift)
        _check(self.shift_fill in SHIFT_FILLS, "train.shift_fill", f"must be one of {', '.join(SHIFT_FILLS)}",
               self.shift_fill)
        _check(self.flip or not self.alternate_flip, "train.alternate_flip",
               "needs train.flip: true (it orders the flips)", self.alternate_flip)
        _check(0 <= self.cutout < IMAGE_SIZE, "train.cutout",
               f"must be a square's side in pixels in [0, {IMAGE_SIZE}) (0: off)", self.cutout)
        _check(0 <= self.validation_fraction < 1, "train.validation_fraction", "must be in [0, 1)",
               self.validation_fraction)
        _check(self.validation_seed is None or self.validation_fraction > 0, "train.validation_seed",
               "draws the held-out images, and train.validation_fraction 0 holds none out (val_acc is on the test "
               "split): set train.validation_fraction > 0, or leave train.validation_seed null", self.validation_seed)
        _check(self.precision in ("auto", "float32", "mixed_float16", "mixed_bfloat16"), "train.precision",
               "must be auto, float32, mixed_float16 or mixed_bfloat16", self.precision)
        _check(self.feed in ("host", "device"), "train.feed", "must be host or device", self.feed)
        # Keras on TensorFlow compares a call's step count with a 32-bit one: from 2**31 on it ran no step at all
        _check(1 <= self.steps_per_execution < 2**31, "train.steps_per_execution", "must be in [1, 2**31)",
               self.steps_per_execution)
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 = no checkpoints)",
               self.checkpoint_every)
        _check(self.distribute in ("auto", "none", "mirrored", "data_parallel", "multi_worker"), "train.distribute",
               "must be auto, none, mirrored, data_parallel or multi_worker", self.distribute)
        _check(self.verbose in ("auto", "0", "1", "2"), "train.verbose", "must be auto, 0, 1 or 2", self.verbose)

    def _check_float32_lr(self) -> None:
        """The optimizer keeps the lr in float32: one past its largest trained at infinity (and the epoch logger
        failed reading it back), one that rounds to 0 trained nothing, and either passed `lr > 0`."""
        lr, f32 = self.scaled_lr, np.finfo(np.float32)
        most, least = float(f32.max), float(f32.smallest_subnormal)
        name = f"{lr:g}" + (f" ({self.lr:g} scaled by train.lr_scaling linear at train.batch_size {self.batch_size})"
                            if lr != self.lr else "")
        _check(lr <= most, "train.lr", f"{name} is more than float32, in which the optimizer keeps the lr, holds "
               f"({most:g}): it would train at infinity; lower it", self.lr)
        _check(lr > least / 2, "train.lr", f"{name} rounds to 0 in float32, in which the optimizer keeps the lr "
               f"(the least it holds above 0 is {least:g}): the weights would never change; raise it",
               self.lr)

    def _check_boundaries(self) -> None:
        """Boundaries are fractions of `epochs`, so `-P epochs=N` moves them with the run's length. Only the step
        schedule reads them: cosine's and onecycle's (an old params file's [80, 120] with cosine set by override) are
        not checked, as they change nothing."""
        key, values = "train.lr_boundaries", self.lr_boundaries
        if self.schedule != "step":
            return
        if any(b >= 1 for b in values) and all(float(b).is_integer() for b in values):
            given = f"got epochs [{', '.join(f'{b:g}' for b in values)}]"
            if all(b < self.epochs for b in values):
                hint = f"{given}; write them as e.g. [{', '.join(f'{b:g}/{self.epochs}' for b in values)}]"
            else:  # epochs past a shorter run (`-P epochs=30` on a file's [80, 120]) make no fractions of it
                hint = (f"{given}, not all within the run's {self.epochs}; write each as the fraction of train.epochs "
                        f"after which the lr decays")
            raise ConfigError(f"{key}: are now fractions of train.epochs in (0, 1), {hint} "
                              f"(the seed's 80 and 120 of 150 epochs are [80/150, 120/150])")
        _check(all(0 < b < 1 for b in values), key, "must be fractions of train.epochs in (0, 1)", values)
        _check(list(values) == sorted(set(values)), key, "must be strictly increasing", values)
        if not _distinct_inside(values, self.epochs):
            n, fewest = self.epochs, _fewest_epochs(values)
            need = f"these need train.epochs >= {fewest}; " if fewest else ""
            fit = min(len(values), n - 1)  # boundaries a run of n epochs holds, each on its own epoch
            some = [f"{round_half_up(i * n / (fit + 1))}/{n}" for i in range(1, fit + 1)]
            given = ", ".join(f"{b:g}" for b in values)
            raise ConfigError(f"{key}: must fall on distinct epochs between the first and the last of {n} (they "
                              f"round to epochs {list(self.boundary_epochs)}), got [{given}]; "
                              f"{need}for a run of {n} set train.schedule=cosine (no boundaries) or "
                              f"train.lr_boundaries=[{', '.join(some)}]")

    @property
    def boundary_epochs(self) -> tuple[int, ...]:
        """The epochs after which the step schedule multiplies the lr by lr_decay."""
        return tuple(round_half_up(b * self.epochs) for b in self.lr_boundaries)

    @property
    def shift_pixels(self) -> int:
        """The largest shift in pixels: `shift` is a fraction of the image size."""
        return round(self.shift * IMAGE_SIZE)

    @property
    def held_out_seed(self) -> int:
        """The seed that draws the training images held out for val_acc (`fitting.held_out_split`):
        `validation_seed`, or `seed` where that is null (so a run without it holds out what it always did)."""
        return self.seed if self.validation_seed is None else self.validation_seed

    @property
    def scaled_lr(self) -> float:
        """Peak learning rate after the optional linear scaling rule (reference batch LR_REFERENCE_BATCH)."""
        return self.lr * self.batch_size / LR_REFERENCE_BATCH if self.lr_scaling == "linear" else self.lr


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int
    samples: int
    tta: str

    def validate(self) -> None:
        _check(self.tta in TTA_MODES, "evaluate.tta", f"must be one of {', '.join(TTA_MODES)}", self.tta)
        _check(self.batch_size >= 1, "evaluate.batch_size", "must be >= 1", self.batch_size)
        _check(1 <= self.samples <= 100, "evaluate.samples", "must be in [1, 100]", self.samples)


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str
    alias: str

    def validate(self) -> None:
        _check(bool(self.model_name.strip()), "register.model_name", "must not be empty", self.model_name)
        _check(bool(re.fullmatch(r"\w[\w .-]*", self.model_name)), "register.model_name",
               "must start with a letter, digit or '_' and hold only those, '-', '.' and spaces (MLflow refuses "
               "'/' and ':' in names; quotes break its search filters)", self.model_name)
        # "my model " is another registered model than "my model", and the UI shows the two alike
        _check(self.model_name == self.model_name.rstrip(), "register.model_name", "must not end with a space",
               self.model_name)
        # MLflow keeps it in 256-character columns, which PostgreSQL (a team's store) enforces: when register ran,
        # after training, not now
        _check(len(self.model_name) <= 256, "register.model_name", "must be at most 256 characters (MLflow's "
               "column for it)", self.model_name)
        # MLflow's rules for aliases, checked before training rather than when registering after it
        _check(bool(re.fullmatch(r"[\w-]{1,255}", self.alias)), "register.alias",
               "must be 1-255 letters, digits, '_' or '-'", self.alias)
        _check(self.alias.lower() != "latest" and not re.fullmatch(r"[vV]\d+", self.alias), "register.alias",
               "must not be 'latest' or v<N>: MLflow reserves them", self.alias)


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str
    system_metrics: bool

    def validate(self) -> None:
        _check(bool(self.experiment.strip()), "tracking.experiment", "must not be empty", self.experiment)
        # as register.model_name: MLflow refuses a longer name (a traceback as the first run opened), and keeps it in a
        # 256-character column, which PostgreSQL (a team's store) enforces
        _check(len(self.experiment) <= 256, "tracking.experiment", "must be at most 256 characters (MLflow's column "
               "for it)", self.experiment)


@dataclass(frozen=True)
class Config:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    register: RegisterConfig
    tracking: TrackingConfig

    def flat(self, *sections: str) -> dict[str, str]:
        """Every parameter (of `sections` if given) as `section.key -> str`, the form MLflow stores and compares."""
        return {f"{section}.{key}": _to_param_string(value)
                for section, values in dataclasses.asdict(self).items() if not sections or section in sections
                for key, value in values.items()}

    def run_name(self) -> str:
        """A readable name for the MLflow UI, e.g. `resnet164-e150-b128-lr0.1`."""
        return f"resnet{self.model.depth}-e{self.train.epochs}-b{self.train.batch_size}-lr{self.train.scaled_lr:g}"


def _to_param_string(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_to_param_string(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"  # as YAML writes it, and `_read` reads it back (a run's logged params)
    return str(value)


class _Text(str):
    """An override's value as typed (`-P overrides`, the entry points' shortcuts): a YAML quoted string (`'my runs'`, a
    sweep's JSON `"0755"`) is unquoted once, and the rest kept as typed (YAML would cut `run #2` at its comment);
    `_coerce` then reads it by its key's type, as it reads a params file's text. Not a run's logged params, logged
    without quotes (`from_run_params`)."""


# booleans as YAML 1.1 spells them, in any case: `ema: yes` has always loaded (PyYAML), in params and overrides alike
BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
BOOLEAN_SPELLINGS = "true or false (or yes/no, on/off)"
NULLS = ("null", "Null", "NULL", "~", "")  # null as YAML spells it, for a key that may be null (`int | None`)


def _spelling(annotation: Any) -> str:
    """What a value of this type is written as, for the messages."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return ", or ".join(_spelling(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(typing.get_args(annotation))
    return {bool: BOOLEAN_SPELLINGS, int: "an integer", float: "a number", str: "a string",
            type(None): "null"}[annotation]


def _read(text: str, annotation: Any) -> Any:
    """`text` as a value of `annotation`; ValueError if it spells none. Written as Python reads them, not as YAML 1.1
    does: an integer in base 10 (YAML read `010` as 8, `1:30` as 90, `0x10` as 16), a str as written (YAML read
    `2026.12` as a float, `True` as a bool, `2026-12-01` as a date)."""
    raw = text.strip()
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # the first type that reads it
        for member in typing.get_args(annotation):
            with contextlib.suppress(ValueError):
                return _read(text, member)
        raise ValueError
    if typing.get_origin(annotation) is typing.Literal:
        if raw in typing.get_args(annotation):
            return raw
        raise ValueError
    if annotation is type(None):  # YAML's spellings of null (an empty value among them): `validation_seed: null`
        if raw in NULLS:
            return None
        raise ValueError
    if annotation is str:
        return str(text) if raw else ""
    if annotation is bool and raw.lower() in BOOLEANS:
        return BOOLEANS[raw.lower()]
    if annotation is int and re.fullmatch(r"[+-]?[0-9]+(_[0-9]+)*", raw):  # 1_000 as float's Fraction reads it
        return int(raw, 10)
    if annotation is float:
        return float(fractions.Fraction(raw))  # 0.1, 1e-4, 80/150, 010: decimal, as written
    if annotation in (bool, int):
        raise ValueError
    raise TypeError(f"unsupported field type {annotation!r}")  # programming error


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """`value` read by its key's type `annotation`, the one reader of every value: a params file's scalars come as
    the text written (`_ParamsLoader`), an override's as typed (`_Text`); a list's items by the item's type."""
    if isinstance(value, _Text) and value.strip()[:1] in ("'", '"'):
        with contextlib.suppress(yaml.YAMLError):
            if isinstance(quoted := yaml.safe_load(value), str):
                value = quoted
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, str):  # `[16, 32]` in overrides, or quoted in a params file
            try:
                value = yaml.load(value, Loader=_ParamsLoader)
            except yaml.YAMLError:
                raise ConfigError(f"{key}: cannot parse value {str(value)!r}") from None
        _check(isinstance(value, list), key, "must be a list", value)
        return tuple(_coerce(key, v, typing.get_args(annotation)[0]) for v in value)
    if value is None or isinstance(value, (bool, int, float)):  # an explicit YAML tag, `!!int 5`, `!!null`
        value = _to_param_string(value)
    _check(isinstance(value, str), key, f"must be {_spelling(annotation)}", value)
    try:
        result = _read(value, annotation)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{key}: must be {_spelling(annotation)}, got {str(value)!r}") from None
    except OverflowError:
        raise ConfigError(f"{key}: must be a finite number, got {str(value)!r}") from None
    # NumPy and TensorFlow hold integers in 64 bits: a larger train.batch_size failed the train step (OverflowError)
    _check(type(result) is not int or -2**63 <= result < 2**63, key, "must be an integer in [-2**63, 2**63) (64 bits)",
           str(value))
    return result


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last one silently, so a
    second `train:` section appended to a params file dropped every key of the first (tiny.yaml trained 150 epochs)."""

    def flatten_mapping(self, node):
        # Checked here, before the merge keys' pairs join node.value, and once per node: a mapping merged into a
        # later one may be flattened before it is constructed (`- &b {<<: *a, lr: 0.2}` then `<<: *b`), and
        # its own override of a merged key then read as a key given twice
        checked = self.__dict__.setdefault("_checked", set())
        if node not in checked:
            checked.add(node)
            self._refuse_duplicates(node)
        super().flatten_mapping(node)

    def _refuse_duplicates(self, node):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key: an override, as YAML means it
                continue
            name, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            with contextlib.suppress(TypeError):  # an unhashable key: the constructor's own error says so
                if name in seen:
                    raise _DuplicateKey(f"gives {name!r} twice (lines {seen[name]} and {line}): YAML would silently "
                                        f"keep only the last; give it once")
                seen[name] = line

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        if re.fullmatch(r"[-+]?0[0-7_]+|[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+", text):  # YAML 1.1's octal and base 60
            return text  # read by its key's type (`_coerce`), as an override is: `epochs: 010` was 8, `0755` a name 493
        return super().construct_yaml_int(node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


class _ParamsLoader(_UniqueKeyLoader):
    """A params file's loader: each scalar is its text, read by its key's type (`_coerce`) as an override's is.
    YAML 1.1 read it by its look whatever the key: `experiment: 2026.12` was refused as a float, `True` stored as
    'true', `0x10` as '16', while `jit_compile: yes` was read as true where `train.jit_compile=yes` was refused."""

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag != "tag:yaml.org,2002:merge":  # a plain scalar
            return "tag:yaml.org,2002:str"
        return tag


def _yaml_text(raw: bytes) -> str:
    """A YAML file's bytes as text, as YAML reads them: UTF-8, not the locale's encoding (Latin-1 read `café` as
    `cafÃ©`), or UTF-16 where a byte order mark says so (Windows PowerShell's `>` writes it: refused as "not UTF-8
    text"); the mark taken off (Notepad's UTF-8 one too, which read the first section as an unknown one)."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig")


def read_yaml(path: str | Path, *, key: str = "params", text: bool = False) -> dict[str, Any]:
    """The mapping a YAML file holds ({} if empty); a relative path not found here is taken from the
    project root. ConfigError naming `key` if the file is missing or unreadable, not YAML, not a mapping, or gives a
    key twice in one mapping. `text`: every scalar as the text written (`_ParamsLoader`: a params file)."""
    if not str(path).strip():  # `-P params=" "` was "file not found: " and `-P spec=` the project root, "a folder"
        unset = ", or leave it empty for params/default.yaml alone" if key == "params" else ""
        raise ConfigError(f"{key}: {str(path)!r} is blank; give a {key} file{unset}")
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = PROJECT_ROOT / candidate
    try:
        data = yaml.load(_yaml_text(candidate.read_bytes()), Loader=_ParamsLoader if text else _UniqueKeyLoader)
    except IsADirectoryError:  # `-P params=params/`: "file not found" misled, as there is one
        raise ConfigError(f"{key}: {path} is a folder, not a {key} file") from None
    except (FileNotFoundError, NotADirectoryError):  # the last: a path through a file
        beside = PROJECT_ROOT / "params" / Path(path).name  # `-P params=quick.yaml` for params/quick.yaml
        hint = f" (did you mean params/{beside.name}?)" if not Path(path).is_absolute() and beside.is_file() else ""
        hint = shells_folder_hint(str(path)) or hint  # `mlflow run` runs the step in the project's folder
        if str(path) != str(path).strip():  # part of the path, but unseen at the line's end
            path, hint = repr(str(path)), " (it begins or ends with spaces)"
        raise ConfigError(f"{key}: file not found: {path}{hint}") from None
    except OSError as exc:  # another user's file (EACCES), a name too long: was a traceback
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not a YAML text file (not UTF-8 text)") from None
    except _DuplicateKey as exc:
        raise ConfigError(f"{key}: {path} {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if data is None or data == "":  # no document, or an empty one (`---` alone)
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path} must hold a mapping, got {type(data).__name__}")
    return data


def _did_you_mean(name: str, known: list[str], prefix: str = "") -> str:
    """'; did you mean train.epochs?' for the closest known name, or '' when none is close."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _merge(base: dict[str, Any], layer: dict[str, Any], origin: str) -> None:
    for section, values in layer.items():
        section = str(section)  # a YAML key may be a number, null or a boolean
        if section not in base:
            head, _, name = section.partition(".")
            if name in base.get(head, {}):  # `train.epochs: 3`, as an override spells it
                raise ConfigError(f"{section}: unknown section in {origin}; a params file nests each key under its "
                                  f"section: `{head}:`, then `{name}: ...` indented on the line below it (dotted keys "
                                  "are the overrides' spelling)")
            raise ConfigError(f"{section}: unknown section in {origin}{_did_you_mean(section, list(base))} "
                              f"(known: {', '.join(base)})")
        if isinstance(values, str) and values.strip() in NULLS:  # `train:` with each key under it commented out
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: must be a mapping in {origin}, got {values!r}")
        for key, value in values.items():
            key = str(key)
            if key not in base[section]:
                hint = _did_you_mean(key, list(base[section]), f"{section}.")
                raise ConfigError(f"{section}.{key}: unknown key in {origin}{hint} (known: {', '.join(base[section])})")
            base[section][key] = value


def split_overrides(overrides: str | None) -> list[str]:
    """`"train.lr=0.05 tracking.experiment='my runs' model.widths=[16, 32]"` -> its items, split as a shell does, a
    list's pieces joined again; ConfigError on an unbalanced quote or a key given twice in the one string."""
    if overrides and len(overrides) > MLFLOW_PARAM_MAX:  # logged whole as a param too (-P overrides)
        raise ConfigError(f"overrides: {len(overrides)} {TOO_LONG}; shorten them")
    try:
        items = _join_lists(shlex.split(overrides) if overrides else [])
    except ValueError as exc:  # No closing quotation, No escaped character
        raise ConfigError(f"overrides: {exc} in {overrides!r}") from None
    seen: dict[str, str] = {}
    for item in items:  # as a params file's (`_UniqueKeyLoader`): the last would win unseen
        key, sep, value = item.partition("=")
        if sep and key.strip() in seen:
            raise ConfigError(f"{key.strip()}: given twice in overrides ({seen[key.strip()]!r} and {value!r}): only "
                              f"the last would count; give it once")
        if sep:
            seen[key.strip()] = value
    return items


def _open_list(value: str) -> bool:
    return value.count("[") > value.count("]")


def _join_lists(words: list[str]) -> list[str]:
    items: list[str] = []
    for item in words:
        if items and "=" not in item and _open_list(items[-1].partition("=")[2]):
            items[-1] += " " + item  # the rest of a list written as YAML writes it, `model.widths=[16, 32, 64]`
        else:
            items.append(item)
    return items


def parse_overrides(overrides: str | list[str] | None) -> dict[str, dict[str, Any]]:
    """`"train.lr=0.05 model.widths=[32,64,128]"` -> {"train": {"lr": _Text("0.05")}, "model": {...}}: each value
    as typed, read by its field's type when the params are checked (`_coerce`). A list's items are layers (the
    last of a key wins: a sweep's trial over its spec's overrides); one string gives each key once."""
    items = split_overrides(overrides) if isinstance(overrides, str) else _join_lists(list(overrides or []))
    layer: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            hint = " (a value with spaces needs quotes: key='a b')" if items[0] is not item and not sep else ""
            raise ConfigError(f"overrides: expected section.key=value, got {item!r}{hint}")
        layer.setdefault(section, {})[name] = _Text(raw)
    return layer


SWEEP_SPACES = ("grid", "space", "random")  # the keys one of which a sweep's spec holds (pipeline.sweep reads them)


def load(path: str | Path | None = None, overrides: str | list[str] | None = None) -> Config:
    """Load default.yaml, layer the params file at `path` and then `overrides` on top, validate."""
    return load_layered(read_layers(path), overrides)


def read_layers(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """default.yaml with the params file at `path` layered on top, as text: what `load_layered` layers overrides on
    (read once where many sets of overrides are checked over the same file: a sweep's space)."""
    merged = read_yaml(DEFAULT_PARAMS, text=True)
    if path and Path(path).resolve() != DEFAULT_PARAMS:
        layer = read_yaml(path, text=True)
        if spaces := [key for key in SWEEP_SPACES if key in layer]:  # was "base: unknown section in ..."
            raise ConfigError(f"params: {path} is a sweep's spec (it has {spaces[0]}:), not a params file: run it "
                              f"with -e sweep -P spec={path}")
        _merge(merged, layer, str(path))
        if not any(isinstance(values, dict) and values for values in layer.values()):
            # a file saved empty, or every line commented out: the seed recipe ran (150 epochs of ResNet-164) where
            # the user expected the file's settings
            raise ConfigError(f"params: {path} sets no params (it is empty, or holds only comments or empty "
                              "sections): give the settings it should hold, or leave -P params out to run "
                              "params/default.yaml as it is")
    return merged


def load_layered(layers: dict[str, dict[str, Any]], overrides: str | list[str] | None = None) -> Config:
    """`overrides` layered on `layers` (`read_layers`, left as it is), validated."""
    merged = {section: dict(values) for section, values in layers.items()}
    _merge(merged, parse_overrides(overrides), "overrides")

    sections = {}
    for name, (cls, hints) in _sections().items():
        values = merged[name]
        for key in hints:
            if key not in values:
                raise ConfigError(f"{name}.{key}: missing from params")
        sections[name] = cls(**{key: _coerce(f"{name}.{key}", values[key], hints[key]) for key in hints})
        sections[name].validate()
    _check_ghost_batch(sections["model"], sections["train"])
    cfg = Config(**sections)
    for key, value in cfg.flat().items():
        if len(value) > MLFLOW_PARAM_MAX:
            raise ConfigError(f"{key}: {len(value)} {TOO_LONG}; shorten it")
    return cfg


@functools.cache
def _sections() -> dict[str, tuple[type, dict[str, Any]]]:
    """Each params section's dataclass and its keys' types (read once: a sweep checks thousands of params)."""
    result = {}
    for field in dataclasses.fields(Config):
        cls = field.type if isinstance(field.type, type) else globals()[field.type]
        result[field.name] = cls, typing.get_type_hints(cls, globalns=globals(), localns={"types": types})
    return result


def read_key(key: str, value: Any, where: str) -> Any:
    """`value` (a scalar's text as `read_yaml(..., text=True)` gives it, or a list of them) read by the type of the
    dotted params key `key`, as `load` reads a params file: a sweep spec's values (its `where`, e.g. spec.grid), so that
    they reach the params as a params file's would. A list key's value is a list. ConfigError naming `where` and the
    key if it is unknown or `value` is not of its type."""
    section, _, name = key.partition(".")
    hints = _sections().get(section, (None, {}))[1]
    if name not in hints:
        known = [f"{s}.{k}" for s, (_, keys) in _sections().items() for k in keys]
        raise ConfigError(f"{where}.{key}: unknown params key{_did_you_mean(key, known)}")
    try:
        value = _coerce(key, value, hints[name])
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}") from None
    return list(value) if isinstance(value, tuple) else value


def _check_ghost_batch(model: ModelConfig, train: TrainConfig) -> None:
    """Ghost batch norm cuts every training batch into ghost batches: each batch must be a whole number of them."""
    ghost = model.ghost_batch
    if not ghost:
        return
    _check(train.batch_size % ghost == 0, "model.ghost_batch",
           f"must divide train.batch_size ({train.batch_size}): each batch is cut into ghost batches", ghost)
    _check(train.drop_remainder, "model.ghost_batch",
           "needs train.drop_remainder=true: an epoch's last, partial batch is no whole number of ghost batches", ghost)


def inert_params(cfg: Config) -> dict[str, str]:
    """The params that have no effect given the others: any other value they accept would train and serve the same
    model. -> {key: the params that make it so, `key value`, comma-separated}, in key order, e.g.
    {"train.nesterov": "train.momentum 0.0"}. A function of the params alone (not of the data: `train.drop_remainder`
    on a training split of whole batches is not listed). Keys the checks hold to one value given the others are not
    listed (`model.stem` under preact, `train.alternate_flip` without `train.flip`): no other value is accepted, so the
    one they hold says what the run did. Table and reasons: docs/params.md#params-without-effect."""
    d, m, t = cfg.data, cfg.model, cfg.train
    rules = (
        # prepare draws its subsets (data.max_train, max_test) and the synthetic dataset from data.seed
        (("data.synthetic_train", "data.synthetic_test"), d.source != "synthetic", ("data.source",)),
        (("data.seed",), d.source != "synthetic" and not d.max_train and not d.max_test,
         ("data.source", "data.max_train", "data.max_test")),
        (("model.block", "model.units_per_stage", "model.strides", "model.stem_filters"), m.arch == "resnet9",
         ("model.arch",)),
        (("model.l2_norm_and_bias",), m.l2 == 0, ("model.l2",)),
        (("train.lr_boundaries", "train.lr_decay"), t.schedule != "step", ("train.schedule",)),
        (("train.lr_decay",), not t.lr_boundaries, ("train.lr_boundaries",)),
        # without a warm-up, boundaries that multiply the lr by 1 change nothing (a warm-up ends by the first one)
        (("train.lr_boundaries",), t.lr_decay == 1 and not t.warmup, ("train.lr_decay", "train.warmup")),
        (("train.nesterov",), t.momentum == 0, ("train.momentum",)),  # Keras's SGD reads nesterov only with momentum
        (("train.ema_momentum", "train.ema_bn_batches"), not t.ema, ("train.ema",)),
        # the border a shift uncovers, in training and in flip_shift's test-time views (`augment.tta_views`)
        (("train.shift_fill",), t.shift == 0 and cfg.evaluate.tta != "flip_shift", ("train.shift", "evaluate.tta")),
    )
    flat = cfg.flat()
    inert: dict[str, str] = {}
    for keys, applies, by in rules:
        for key in keys if applies else ():
            inert.setdefault(key, ", ".join(f"{k} {flat[k]}" for k in by))
    return dict(sorted(inert.items()))


def source_images(d: DataConfig) -> tuple[int | None, int | None]:
    """The (training, test) images `d.source` holds where the params tell (cifar10, synthetic); None for a path, whose
    counts only reading it tells."""
    return {"cifar10": (CIFAR10_TRAIN_IMAGES, CIFAR10_TEST_IMAGES),
            "synthetic": (d.synthetic_train, d.synthetic_test)}.get(d.source, (None, None))


def whole_splits(cfg: Config) -> Config:
    """`cfg` with data.max_train and data.max_test at or above the images its source holds (`source_images`) as 0: all
    of them, as the subset takes. Keyed as written, max_train=60000 and 0 prepared CIFAR-10's identical arrays twice."""
    counts = source_images(cfg.data)
    sizes = {name: 0 for name, count in zip(("max_train", "max_test"), counts, strict=True)
             if count is not None and getattr(cfg.data, name) >= count}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **sizes)) if sizes else cfg


def effective_params(cfg: Config, *sections: str) -> dict[str, str]:
    """`cfg.flat(*sections)` less the params without effect (`inert_params`), a subset of all the images as 0
    (`whole_splits`): what the keys that find a prepare run to reuse and a train run to resume compare. With them, a
    rerun that set one otherwise prepared the same arrays again, or trained afresh instead of resuming the run it
    killed."""
    cfg = whole_splits(cfg)
    inert = inert_params(cfg)
    return {key: value for key, value in cfg.flat(*sections).items() if key not in inert}


@functools.cache
def default_params() -> dict[str, str]:
    """default.yaml's params as `Config.flat` gives them: the values no params file or override has changed."""
    return load(None).flat()


def inert_warnings(cfg: Config) -> list[str]:
    """One line per inert param (`inert_params`) set to another value than default.yaml's (a default that does nothing
    is none anyone chose), naming it, its value and what makes it inert."""
    flat, defaults = cfg.flat(), default_params()
    return [f"warning: {key} {flat[key]} has no effect with {by}" for key, by in inert_params(cfg).items()
            if flat[key] != defaults[key]]


def needs_backend_check(train: TrainConfig) -> bool:
    """Whether `train` sets a param that only some backends (or machines) run, which `fitting.check_backend` checks
    (and which needs Keras loaded): the callers that check inputs before any run opens load Keras for these alone."""
    return train.feed == "device" or (train.precision == "mixed_bfloat16" and train.jit_compile is True)


def held_out_images(fraction: float, images: int) -> int:
    """How many of `images` training images `train.validation_fraction` holds out (0: validation on the test split).
    ConfigError if that leaves none to train on (a model trained on none would score as one), or if a fraction above 0
    rounds to no image (one was held out all the same: a val_acc of 0 or 1)."""
    n_val = round(fraction * images) if fraction else 0
    least = max(n_val, 1) if fraction else n_val  # with one image, holding out any (one at least) leaves none
    if least >= images:
        raise ConfigError(f"train.validation_fraction: holding out {least} of the {images} training "
                          f"images leaves none to train on; lower it, or train on more (data.max_train)")
    if fraction and not n_val:
        raise ConfigError(f"train.validation_fraction: {fraction:g} of the {images} training images rounds to no "
                          f"image held out; give at least 1/{images} ({1 / images:g}) to hold one out (more for a "
                          f"val_acc worth reading), or 0 to validate on the test split")
    return n_val


def check_whole_batch(train: TrainConfig, images: int) -> None:
    """ConfigError if with `train.drop_remainder` the `images` trained on make no whole batch: no step at all."""
    if train.drop_remainder and images < train.batch_size:
        raise ConfigError(f"train.drop_remainder: the {images} training images make no whole batch of "
                          f"train.batch_size {train.batch_size}; lower the batch size or set "
                          f"train.drop_remainder=false")


def check_training_images(train: TrainConfig, images: int) -> None:
    """ConfigError if `images` training images (before the held-out split) leave none to train on, or with
    `train.drop_remainder` no whole batch: the train step's checks (`fitting.split_validation`,
    `fitting.steps_per_epoch`), before any data is read."""
    check_whole_batch(train, images - held_out_images(train.validation_fraction, images))


def from_run_params(params: dict[str, str]) -> Config:
    """Rebuild a Config from the `section.key` params a run logged (other params are ignored). Each is read as logged
    (`Config.flat`), by its key's type: no quotes are taken off, as an override's are (`_Text`), since none were added:
    `tracking.experiment: "'baseline'"` comes back with its quotes."""
    sections = {f.name for f in dataclasses.fields(Config)}  # not `data`, `epochs`: `mlflow run` logs its -P too
    layer: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        section, dot, name = key.partition(".")
        if dot and section in sections:
            layer.setdefault(section, {})[name] = str(value)
    layers = {section: dict(values) for section, values in _default_layers(DEFAULT_PARAMS).items()}
    _merge(layers, layer, "overrides")
    return load_layered(layers)


@functools.cache
def _default_layers(path: Path) -> dict[str, dict[str, Any]]:
    """default.yaml at `path` as `read_layers(None)` reads it, parsed once per process: compare rebuilds the Config of
    each run from before tag inert_params, and parsing it for each took 37 of 46 s for 400 runs. Copy to change."""
    return read_yaml(path, text=True)


def load_from_cli(params: str | None, overrides: str | None, **shortcuts: str | None) -> Config:
    """Entry-point helper: `--epochs 150 --data PATH` are shortcuts for their dotted keys.

    Empty strings mean "not given": `params` "" is default.yaml alone, an empty shortcut leaves its key as
    the params say (MLproject's defaults for these are "").
    """
    keys = {"epochs": "train.epochs", "data": "data.source"}
    given = {name: value for name, value in shortcuts.items() if value not in (None, "")}
    for name, value in given.items():  # `-P data=" "` read as a data.source of '': "must not be empty"
        if not value.strip():
            raise ConfigError(f"{name}: {value!r} is blank; give a value, or leave it empty for the params' "
                              f"{keys[name]}")
    typed = split_overrides(overrides)
    cfg = load(params or None, typed + [f"{keys[name]}={value}" for name, value in given.items()])
    layered = parse_overrides(typed)
    for name in given:  # `-P epochs=30 -P overrides="train.epochs=10"`: one of them would be dropped unseen
        section, key = keys[name].split(".")
        if key in layered.get(section, {}):
            # the overrides' value read by the key's type: loading them alone would check them against the rest of
            # the params (`train.epochs=3` refused by the default's lr_boundaries, not said to disagree with -P epochs)
            theirs = _coerce(keys[name], layered[section][key], type(getattr(getattr(cfg, section), key)))
            theirs = normal_source(theirs) if keys[name] == "data.source" else theirs  # `d/` is `d`, as loaded
            if theirs != getattr(getattr(cfg, section), key):
                raise ConfigError(f"{keys[name]}: -P {name}={given[name]} and overrides' {keys[name]}="
                                  f"{layered[section][key]} disagree; give one")
    return cfg


# The params sections each step run on its own reads (`note_unread`); main and train read them all
STEP_READS = {"prepare": ("data", "tracking"), "evaluate": ("evaluate", "tracking"),
              "register": ("register", "evaluate", "tracking")}


def note_unread(step: str, overrides: str | None) -> None:
    """A line on stderr naming the keys of `overrides` that `step`, run on its own, never reads (STEP_READS):
    `-e evaluate -P overrides=train.epochs=7` left the key unused without a word. No error: `main` passes its one
    overrides line to every step, and a user's overrides line may serve several commands."""
    unread = [f"{section}.{key}" for section, keys in parse_overrides(overrides).items() for key in keys
              if section not in STEP_READS[step]]
    if unread:
        print(f"note: {step} reads no {', '.join(unread)} (given in overrides): left unused; it reads "
              f"{', '.join(f'{section}.*' for section in STEP_READS[step])}", file=sys.stderr)


RESUME_HELP = "'' (continue an interrupted identical run), 'never', or a run id"


class _Parser(argparse.ArgumentParser):
    """An unknown `-P name` (mlflow run passes it on as `--name`) or a missing one is a ConfigError: one line,
    exit 2, and the run `mlflow run` opened goes to the trash, as for any bad param (argparse printed its usage
    and left that run FAILED). A name that begins another's is unknown too: argparse took `-P epoch=30` for
    `--epochs`, over the `-P epochs` given before it."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)
        self.given: dict[str, str] = {}

    def parse_known_args(self, args=None, namespace=None):
        self.given = {}  # the options of this command line (`_Once`)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):  # `-P metrc=x`: the closest name and every name the step takes
            # not a hidden option (sweep's `--join`, how it starts its own workers): no name a user gives
            known = sorted(option[2:] for action in self._actions if action.help != argparse.SUPPRESS
                           for option in action.option_strings if option.startswith("--") and option != "--help")
            first = next((word for word in message[len(prefix):].split() if word.startswith("--")), "--")
            name = first[2:].split("=", 1)[0]
            hint = _did_you_mean(name, [*known, "help"], "--") or self._other_entry_points(name.replace("-", "_"))
            message += f"{hint} (known: {', '.join('--' + name for name in known)})"
        raise ConfigError(f"arguments: {message}")

    def _other_entry_points(self, key: str) -> str:
        """"; KEY is a parameter of the E1 and E2 entry points (...), not this one's" where other entry points take
        `key` (`-P model_uri=...` given to main, meant for evaluate or register), else ""."""
        entry_point = getattr(self, "entry_point", "")
        others = [name for name, spec in read_yaml(MLPROJECT, key="MLproject")["entry_points"].items()
                  if name != entry_point and key in (spec.get("parameters") or {})]
        if not entry_point or not others:
            return ""
        listed = " and ".join([", ".join(others[:-1]), others[-1]] if len(others) > 1 else others)
        return (f"; {key} is a parameter of the {listed} entry point{'s' if len(others) > 1 else ''} (mlflow run . "
                f"-e {others[0]} -P {key}=...), not {entry_point}'s")


class _Once(argparse.Action):
    """An option given twice is refused, as `mlflow run` refuses a -P name given twice: argparse kept the last, so
    `--overrides A ... --overrides B` dropped A's params unseen."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in parser.given:
            # `mlflow run -P dataset-uri=X` (MLFLOW_RUN_ID: a step it started) passes a name MLproject lacks on as
            # `--dataset-uri X`, after MLproject's own `--dataset-uri=...`: given once by the user, twice here
            dashed = (f" (to mlflow run as -P {self.dest}=..., MLproject's name: -P {option_string[2:]} reaches the "
                      f"step as a second {option_string})" if "_" in self.dest and os.environ.get("MLFLOW_RUN_ID")
                      else "")
            parser.error(f"{option_string} given twice ({parser.given[option_string]!r} and {values!r}): only the "
                         f"last would count; give it once{dashed}")
        parser.given[option_string] = values
        setattr(namespace, self.dest, values)


def entry_point_parser(entry_point: str, description: str, **helps: str) -> argparse.ArgumentParser:
    """The command line of `python -m pipeline.<entry_point>`: one `--name` option (underscores as dashes) per
    parameter MLproject gives the entry point, with MLproject's default, required where it has none.
    MLproject is the one place the entry points' parameters are written, so `mlflow run` and the module
    accept the same ones. `helps`: help text by parameter name."""
    parameters = read_yaml(MLPROJECT, key="MLproject")["entry_points"][entry_point]["parameters"]
    parser = _Parser(description=description)
    parser.entry_point = entry_point
    for name, spec in parameters.items():
        default = spec.get("default") if isinstance(spec, dict) else None
        parser.add_argument(f"--{name.replace('_', '-')}", action=_Once, required=default is None,
                            default=None if default is None else str(default), help=helps.get(name))
    return parser
