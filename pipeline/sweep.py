"""The `sweep` entry point: a hyperparameter search on Optuna, one nested MLflow run per trial, the best registered.

Reads:  a sweep file (see params/sweep-example.yaml, params/sweep-tpe.yaml):
            base: params/tiny.yaml                 # params file every trial starts from
            overrides: {train.validation_fraction: 0.1}   # optional, the same for every trial
            grid: {train.lr: [0.05, 0.1], model.units_per_stage: [1, 2]}   # every combination once; a
                                                   # {min, max, step} range lists every step
        or  space: {train.lr: {min: 0.01, max: 0.2, log: true}, train.batch_size: [32, 64]}
            sampler: tpe                           # the default; or random (the default of `random:`,
                                                   # the older key for `space:`)
            trials: 8                              # a list is a choice, {min, max, log} a range,
                                                   # {min, max, step} one in steps from min
            seed: 0
            pruner: median                         # none (default), median, hyperband
        `sampler` and `pruner` also take {type: <name>, <argument>: <value>, ...}: the arguments of
        Optuna's TPESampler / RandomSampler / MedianPruner / HyperbandPruner.
        Every trial's params (a grid: every combination; a space: every combination of its choices
        and range ends, then what its ranges draw between their ends: `Plan.check_inside`) are validated (with
        cifar10 or synthetic data, also whether they leave images to train on, and a whole batch), the storage
        opened and the study checked before any run opens.
Storage: an Optuna study (`--study`, default: named after the spec, its overrides and the tracking
        store) in an Optuna storage (`--storage`: an SQLAlchemy URL; default `optuna.db` beside
        the SQLite tracking store, else in the working directory). The same command started again,
        on this host or another one that reaches the storage and the tracking server, joins the
        study: every trial waits in the study and is claimed by exactly one worker. `--workers N`
        starts N worker processes here.
Writes: one sweep parent run (tag step = 'sweep'; its id is kept in the study's user attrs, so every
        worker's trials nest under it) with one child run per trial (tag step = 'trial', the
        trial's params, metrics val_acc, best_val_acc, test_acc, test_loss), each holding its own
        train and evaluate runs. After every epoch the trial reports val_acc to Optuna; a trial the
        pruner stops ends KILLED with tag `pruned_at_epoch` (its curve stays on its train run). A
        trial that raises or diverges ends FAILED with tag `failure_reason`; the sweep goes on.
        A trial stopped by Ctrl-C or SIGTERM ends KILLED (tag `interrupted_by`) and is queued again at
        once, to run afresh when the sweep goes on. A worker that dies stops its trial's heartbeat:
        another worker (or the rerun command) marks that trial FAILED, its runs FAILED, and queues it
        again (at most MAX_RETRY times). Optuna is told how a trial ended before its run ends: a run FINISHED is
        a trial COMPLETE in the study (a tell that fails ends the run FAILED, and the trial is queued again
        once stale; one that raised once the storage had recorded it, read again, ends the run as told, and where
        no read answered, the study's end reads it again: `confirm_late_tells`). The runs
        of a trial queued again are tagged `superseded_by_retry`: its retry counts instead.
        Once every trial has ended, one worker (exactly one: it creates the study's lock study
        `<study>.register`) registers the best finished trial (by its final val_acc, the first of equals, on
        training images held out: `train.validation_fraction` > 0 is required, so no trial is chosen on the test images
        whose test_acc it reports, and the same for every trial, so none is ranked on a share of other size;
        register's own rule then applies) and compares the finished trials. Where none finished, the command exits 1
        (2 where each failed on its params, 3 where each diverged) with one line (`nothing_finished`), which is also
        tag `failure_reason` of the sweep run, ended FAILED, and of the run `mlflow run` opened for a command that
        joined the study or reran it once done.
The MLflow side of trials (creating, entering, failing and reading their runs) is `pipeline.tracking.trials`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import decimal
import difflib
import inspect
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from pipeline import compare, config, data, inputs, interrupts, prepare
from pipeline.tracking import (
    Interrupted,
    StepFailed,
    cli,
    describe_train_run,
    fit_note,
    json_digest,
    log_dict,
    log_metrics,
    log_params,
    log_text,
    markdown_table,
    open_run,
    prepare_run_id,
    set_tags,
    step_run,
    tag_failure,
    tracking_uri,
    trials,
    unexpected,
    unexpected_reason,
)
from pipeline.tracking.resume import check_checkpoint_root, checkpoint_dir

# A spec's keys besides its search space, one of config.SWEEP_SPACES (the one list of them: a params file holding one is
# refused as a spec, and a spec holds exactly one).
SPEC_SETTINGS = ("base", "overrides", "sampler", "trials", "seed", "pruner")
# A grid queues each combination as a fixed trial (Optuna's enqueue_trial), so that each runs exactly once
# however many workers start together (GridSampler may hand one point to two workers that start at once);
# its sampler is never asked for a value.
SAMPLERS = {"grid": optuna.samplers.RandomSampler, "random": optuna.samplers.RandomSampler,
            "tpe": optuna.samplers.TPESampler}
PRUNERS = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
           "hyperband": optuna.pruners.HyperbandPruner}
OBJECTIVE = "val_acc"  # what the study maximises: a trial's last, on held-out training images; the best is registered
# Params that change which images a trial holds out besides train.validation_fraction (train.validation_seed, or
# train.seed where it is null, draws them: `held_out_varies`; data.* says which there are): trials differing in one
# are ranked by val_acc on different images, which a sweep warns of.
HELD_OUT_KEYS = ("train.seed", "train.validation_seed", "data.source", "data.max_train", "data.seed",
                 "data.synthetic_train")
# Params a sweep does not search (`Plan.check_ranked`) besides evaluate.*: they change neither what is trained nor
# val_acc (docs/params.md#params-without-effect: "the params that never change what is trained").
UNRANKED = ("train.verbose", "train.checkpoint_every", "register.alias", "tracking.system_metrics")
# A trial's worker proves it is alive this often (set empty: unset).
HEARTBEAT_S = int(os.environ.get("SWEEP_HEARTBEAT_SECONDS") or "20")
# A trial whose heartbeat is older is marked FAILED and queued again. Generous: a busy host can starve the
# heartbeat thread for a while (model compilation holds the interpreter), and a live worker must not be
# mistaken for a dead one.
GRACE_S = 6 * HEARTBEAT_S
MAX_RETRY = 2  # queue a trial whose worker died at most this many times
# The most trials a sweep runs: `lead` queues every one in the study before the first runs (`queue_trials`: seconds
# for 10,000 into SQLite), and a grid's every combination is checked first.
MAX_TRIALS = 10_000
SEEDS = 2**32  # Optuna's samplers take a seed in [0, 2**32 - 1]; trial n draws with (seed + n) modulo this
POLL_S = 2.0  # an idle worker looks for new or stale trials this often until the study is done
TELL_READS = 3  # reads of a trial whose tell raised (`stored_as_told`), TELL_BACKOFF_S, then twice that, apart
TELL_BACKOFF_S = 0.5
# A space's ranges are checked inside too (`Plan.check_inside`): an integer range at every value, or at RANGE_VALUES
# spread evenly where it has more, a float range at FLOAT_POINTS evenly between its ends (on a log scale: log), each
# with the others' ends and choices, then with each other: about CHECKS combinations besides each value's first
# (a seeded sample of them where there are more).
RANGE_VALUES = 1000
FLOAT_POINTS = 5
CHECKS = 2000
# A space of choices and integer ranges runs no combination twice (`Plan.draw_unrun`): a draw that repeats a trial's is
# drawn again REDRAWS times (the sampler seeded REDRAW_STRIDE further on each time: past any trial's own seed), then
# taken at random among the combinations not run, where there are at most MAX_UNRUN to list.
REDRAWS = 10
REDRAW_STRIDE = 1_000_003
MAX_UNRUN = 100_000
SAY_CHECKS = 1000  # a grid of this many trials or more says it checks them first (`Plan`): seconds, silent before

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# Each trial builds its own model, whose predict function TensorFlow traces afresh: from a process's third trial on, it
# counted those traces together and printed its advice against "creating @tf.function repeatedly in a loop" (six lines
# on stderr), which a sweep does by design. Its other warnings are kept.
logging.getLogger("tensorflow").addFilter(lambda record: "triggered tf.function retracing" not in record.getMessage())


# ---------------------------------------------------------------- the spec, checked before anything opens

def read_spec(path: str | Path) -> dict[str, Any]:
    """The sweep file as a dict; ConfigError on unknown keys, no or several search spaces."""
    spec = config.read_yaml(path, key="spec")
    # The values of params keys are read by their key's type, as the params file's are (YAML 1.1 read them by their
    # look: `tracking.experiment: True` was 'true', `0x10` 16): from the text written, the rest of the spec as YAML.
    written = config.read_yaml(path, key="spec", text=True)
    known = {*SPEC_SETTINGS, *config.SWEEP_SPACES}
    unknown = sorted(map(str, set(written) - known))  # as written: YAML 1.1 reads `on:` as True (unsortable)
    if unknown and set(unknown) <= set(config.Config.__dataclass_fields__) and not known & set(map(str, written)):
        raise config.ConfigError(f"spec: {path} is a params file (it has {unknown[0]}:), not a sweep's spec: name it "
                                 f"as the spec's base: (see params/sweep-example.yaml), or run it with -e main -P "
                                 f"params={path}")
    if unknown:  # a slip such as `trails:` was told the list of keys alone
        close = [f"{key}{f' for {name}' if len(unknown) > 1 else ''}" for name in unknown
                 if (key := next(iter(difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.7)), None))]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise config.ConfigError(f"spec: unknown keys {unknown}{hint} (known: {', '.join(sorted(known))})")
    spaces = [key for key in config.SWEEP_SPACES if key in spec]
    if len(spaces) != 1:
        raise config.ConfigError("spec: give exactly one search space: grid, or space (random is its older name)")
    for key in ("overrides", spaces[0]):
        if key in spec and not isinstance(spec[key], dict):
            raise config.ConfigError(f"spec.{key}: must map dotted keys to values, got {spec[key]!r}")
    if not spec[spaces[0]]:
        raise config.ConfigError(f"spec.{spaces[0]}: the search space is empty")
    for key in ("overrides", spaces[0]):
        if key in spec:
            spec[key] = {name: params_values(f"spec.{key}", name, text, value)  # the same document: the same order
                         for (name, text), value in zip(written[key].items(), spec[key].values(), strict=True)}
    if "grid" in spec:
        spec["grid"] = {name: grid_values(name, domain) for name, domain in spec["grid"].items()}
    return spec


def params_values(where: str, key: str, text: Any, value: Any) -> Any:
    """A spec value of params key `key` (`text` as written, `value` as YAML read it) read by the key's type: an
    override, each choice of a list, or the ends and step of a {min, max, log} or {min, max, step} range (`log` is
    Optuna's, as YAML reads it)."""
    if where == "spec.overrides":
        return config.read_key(key, text, where)
    if isinstance(text, list):
        return [config.read_key(key, v, where) for v in text]
    if isinstance(text, dict) and {"min", "max"} <= set(text):
        ends = {end: config.read_key(key, text[end], where) for end in ("min", "max")}
        if "step" in text:  # an integer key's step a whole number, as its ends
            try:
                ends["step"] = config.read_key(key, text["step"], where)
            except config.ConfigError as exc:
                raise config.ConfigError(f"{where}.{key}: step {str(exc).removeprefix(f'{where}.{key}: ')}") from None
        return {**value, **ends}
    return value  # refused by `distributions`


def space_key(spec: dict) -> str:
    return next(key for key in config.SWEEP_SPACES if key in spec)


EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e0, 2E-3, .5e1


def named_type(spec: dict, key: str, default: str, known: dict) -> tuple[str, dict[str, Any]]:
    """`sampler: tpe` or `sampler: {type: tpe, n_startup_trials: 3}` -> ("tpe", {"n_startup_trials": 3})."""
    value = spec.get(key, default)
    kwargs: dict[str, Any] = {}
    if isinstance(value, dict):
        # numbers YAML 1.1 reads as text (`prior_weight: 1e0`, `1e-3`: no dot) as the numbers they are: Optuna
        # refused the text with a TypeError naming no number
        kwargs = {k: float(v) if isinstance(v, str) and EXPONENT_NUMBER.fullmatch(v) else v
                  for k, v in value.items() if k != "type"}
        value = value.get("type")
        if not all(isinstance(k, str) for k in kwargs):
            raise config.ConfigError(f"spec.{key}: argument names must be text, got {sorted(map(str, kwargs))}")
    if not isinstance(value, str) or value not in known:
        raise config.ConfigError(f"spec.{key}: must be one of {', '.join(known)}, got {value!r}")
    return value, kwargs


def sampler_of(spec: dict) -> tuple[str, dict[str, Any]]:
    """The sampler's name and Optuna arguments; a grid space takes the grid sampler, the others random or tpe."""
    grid = space_key(spec) == "grid"
    name, kwargs = named_type(spec, "sampler", "grid" if grid else "random" if "random" in spec else "tpe", SAMPLERS)
    if grid != (name == "grid"):
        raise config.ConfigError(f"spec.sampler: {name!r} does not go with a {space_key(spec)}: space; "
                                 f"a grid: space takes sampler grid, a space: random or tpe")
    return name, kwargs


def encode(value: Any) -> Any:
    """Optuna's categorical choices are scalars; other YAML values (lists) travel as JSON text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def decode(choices: list, value: Any) -> Any:
    return next(c for c in choices if encode(c) == value)


def distributions(spec: dict) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space as Optuna distributions: a list is a categorical choice, {min, max[, log]} or {min, max, step}
    a range of the key's type (an integer key's draws integers, a number key's floats; with a step, min plus whole
    steps only, Optuna's `step`). ConfigError naming the key for anything else: a step <= 0, one that does not reach
    max in whole steps (Optuna would move max to its last step, with a warning), or one with log: true (which Optuna
    refuses)."""
    where = space_key(spec)
    result: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, domain in spec[where].items():
        if isinstance(domain, list) and domain:
            # a space's too: `trials` is checked against its count of distinct combinations
            if len({json.dumps(encode(v)) for v in domain}) != len(domain):
                raise config.ConfigError(f"spec.{where}.{key}: values repeat, so some trials would run twice: "
                                         f"{domain!r}")
            result[key] = optuna.distributions.CategoricalDistribution([encode(v) for v in domain])
            continue
        if where == "grid":  # its {min, max, step} ranges are listed by `read_spec` (`grid_values`)
            raise config.ConfigError(f"spec.grid.{key}: must be a non-empty list or {{min, max, step}}, got "
                                     f"{domain!r}")
        result[key] = range_distribution(where, key, domain)
    return result


def range_distribution(where: str, key: str, domain: Any) -> optuna.distributions.BaseDistribution:
    """Optuna's distribution of a {min, max[, log]} or {min, max, step} range of spec.`where`.`key`, of the key's type
    (`distributions`); ConfigError naming the key where it is none, or its step is bad."""
    if not (isinstance(domain, dict) and {"min", "max"} <= set(domain) <= {"min", "max", "log", "step"}):
        raise config.ConfigError(f"spec.{where}.{key}: must be a non-empty list or {{min, max, log}} or "
                                 f"{{min, max, step}}, got {domain!r}")
    low, high, log, step = domain["min"], domain["max"], domain.get("log", False), domain.get("step")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) \
            or not isinstance(log, bool):
        raise config.ConfigError(f"spec.{where}.{key}: min and max must be numbers and log true or false, "
                                 f"got {domain!r}")
    if step is not None and step <= 0:
        raise config.ConfigError(f"spec.{where}.{key}: step must be > 0, got {step}")
    if step is not None and log:
        raise config.ConfigError(f"spec.{where}.{key}: step and log: true do not go together (Optuna draws a "
                                 f"stepped range on a linear scale only); drop one")
    kind = optuna.distributions.IntDistribution if isinstance(low, int) and isinstance(high, int) \
        else optuna.distributions.FloatDistribution
    try:
        with warnings.catch_warnings():  # a step that does not reach max: Optuna moves max, warning; refused below
            warnings.simplefilter("ignore")
            dist = kind(low, high, log=log, **({} if step is None else {"step": step}))
    except ValueError as exc:
        raise config.ConfigError(f"spec.{where}.{key}: {exc} (got {domain!r})") from None
    if dist.high != high:
        raise config.ConfigError(f"spec.{where}.{key}: step {step} does not fit the range from {low} to {high} "
                                 f"(its last step is {dist.high}); give a max that is min plus a whole number of "
                                 f"steps")
    return dist


def grid_values(key: str, domain: Any) -> Any:
    """A grid's values of `key`: a {min, max, step} range listed, min to max in steps (Optuna's, as a space's range
    with that step draws them: `range_distribution`); a list (or anything else, refused by `distributions`) as it is.
    ConfigError naming the key for a range without a step (a grid lists every value it runs), or one of more values
    than a sweep runs trials."""
    if not isinstance(domain, dict):
        return domain
    if "step" not in domain:
        raise config.ConfigError(f"spec.grid.{key}: a grid runs each value it lists: give a list, or {{min, max, "
                                 f"step}}, got {domain!r}")
    dist = range_distribution("grid", key, domain)
    if range_size(dist) > MAX_TRIALS:  # listed before the grid's combinations are counted
        raise config.ConfigError(f"spec.grid.{key}: its {range_size(dist)} steps are more than the {MAX_TRIALS} "
                                 f"trials a sweep runs; give a larger step")
    if isinstance(dist, optuna.distributions.IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    return [on_step(dist, v) for v in steps_of(dist)]


def range_size(dist: optuna.distributions.BaseDistribution) -> float:
    """How many values a range draws from: an integer range's, or a float range's with a step; a float range without
    one, math.inf (1 where min is max)."""
    if isinstance(dist, optuna.distributions.IntDistribution):
        return (dist.high - dist.low) // dist.step + 1
    if dist.step is not None:
        return round((dist.high - dist.low) / dist.step) + 1
    return 1 if dist.low == dist.high else math.inf


def steps_of(dist: optuna.distributions.FloatDistribution) -> list[float]:
    """Every value of a float range with a step, as Optuna's samplers draw them (min + k * step, within max)."""
    return [min(k * dist.step + dist.low, dist.high) for k in range(int(range_size(dist)))]


def on_step(dist: optuna.distributions.BaseDistribution, value: Any) -> Any:
    """A value a float range with a step drew, as the number of whole steps from min it is: 0.3, where Optuna draws
    0.30000000000000004 (0.1 + 2 * 0.1 in floats), which named the trial and reached its params. Any other value as
    it is."""
    if not isinstance(dist, optuna.distributions.FloatDistribution) or dist.step is None:
        return value
    steps = round((value - dist.low) / dist.step)
    return float(decimal.Decimal(repr(dist.low)) + steps * decimal.Decimal(repr(dist.step)))


def spread(low: float, high: float, count: int, log: bool) -> list[float]:
    """`count` points from `low` to `high`, both included, evenly apart (on a log scale where `log`)."""
    if count < 2 or low == high:
        return [low]
    a, b = (math.log(low), math.log(high)) if log else (low, high)
    points = [a + (b - a) * i / (count - 1) for i in range(count)]
    return [low, *(math.exp(p) if log else p for p in points[1:-1]), high]


def range_values(dist: optuna.distributions.BaseDistribution) -> list:
    """The values of a {min, max, log} or {min, max, step} range that a space is checked at: an integer range's every
    value (RANGE_VALUES spread as it draws where it has more), a float range's ends and FLOAT_POINTS evenly between
    them (to six digits); with a step, on its steps (a float range's every step where it has FLOAT_POINTS inside or
    fewer)."""
    if isinstance(dist, optuna.distributions.IntDistribution):
        if range_size(dist) <= RANGE_VALUES:
            return list(range(dist.low, dist.high + 1, dist.step))
        return sorted({dist.low + round((v - dist.low) / dist.step) * dist.step
                       for v in spread(dist.low, dist.high, RANGE_VALUES, dist.log)})
    if dist.step is not None:
        if range_size(dist) <= FLOAT_POINTS + 2:
            return [on_step(dist, v) for v in steps_of(dist)]
        return sorted({on_step(dist, v) for v in spread(dist.low, dist.high, FLOAT_POINTS + 2, False)})
    inside = spread(dist.low, dist.high, FLOAT_POINTS + 2, dist.log)[1:-1]
    return sorted({dist.low, dist.high} | {float(f"{v:.6g}") for v in inside})  # as a message shows them


def held_out_varies(configs: list[config.Config]) -> list[str]:
    """The `HELD_OUT_KEYS` in which `configs` differ so that their held-out images do: a data.* key that differs;
    train.seed and train.validation_seed where the seed drawing the images (`TrainConfig.held_out_seed`) differs,
    each that differs (train.seed among the trials whose validation_seed is null, the only ones it draws for). Trials
    of other train.seed and the same validation_seed hold out the same images: none is named."""
    seeds_differ = len({c.train.held_out_seed for c in configs}) > 1
    flats = [c.flat() for c in configs]  # once each: a grid's 10,000

    def varies(key: str) -> bool:
        among = flats
        if key == "train.seed":
            among = [f for f, c in zip(flats, configs, strict=True) if c.train.validation_seed is None]
        if key in ("train.seed", "train.validation_seed") and not seeds_differ:
            return False
        return len({f[key] for f in among}) > 1

    return [k for k in HELD_OUT_KEYS if varies(k)]


def override_items(values: dict[str, Any]) -> list[str]:
    """{"train.lr": 0.1, "model.widths": [16, 32]} -> ["train.lr=0.1", "model.widths=[16, 32]"] (JSON is YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def label(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items())


def default_startup(cls: type) -> int:
    """The `n_startup_trials` an Optuna sampler or pruner class takes when not given (0 if it has none)."""
    parameter = inspect.signature(cls).parameters.get("n_startup_trials")
    return parameter.default if parameter is not None and isinstance(parameter.default, int) else 0


def spec_base(base: str, spec_path: str | Path) -> str:
    """The params file a spec's relative `base` names: beside the spec where it has one there, else from the current
    folder (as it was read before), else from the project (the shipped specs' `params/tiny.yaml`, wherever the
    command runs); as written where none of them has it, to be refused as not found."""
    beside = Path(spec_path).parent / base
    if Path(base).is_absolute() or not beside.is_file() and Path(base).is_file():
        return base
    if beside.is_file():
        return str(beside)
    project = config.PROJECT_ROOT / base
    return str(project) if project.is_file() else base


class Plan:
    """A checked sweep: its spec, Optuna distributions, sampler and pruner, and a config per trial.

    Overrides layer as: spec `overrides`, the trial's values, `extra_overrides` (the command line).
    Building it validates the grid's every combination, or every combination of a space's choices
    and range ends and then what its ranges draw between them (`check_inside`); ConfigError names the first that is
    invalid.
    """

    def __init__(self, spec_path: str, extra_overrides: str = "", say=None):
        """`say`: where a grid of SAY_CHECKS trials or more says it checks them (print, for the command's own
        process: a few milliseconds a trial, 14 s for 10,000 said nothing before its first line)."""
        self.spec_path, self.extra_overrides = spec_path, extra_overrides or ""
        self._layers: dict[str, dict[str, Any]] | None = None  # `layers`
        self.spec = read_spec(spec_path)
        base = self.spec.get("base")
        if base is not None and not (isinstance(base, str) and base.strip()):
            raise config.ConfigError(f"spec.base: must be a params file path such as params/tiny.yaml, got {base!r}")
        self.base = spec_base(base, spec_path) if base else None
        self.space = distributions(self.spec)
        self.sampler_name, self.sampler_kwargs = sampler_of(self.spec)
        self.pruner_name, self.pruner_kwargs = named_type(self.spec, "pruner", "none", PRUNERS)
        startup = self.sampler_kwargs.get("n_startup_trials")
        if isinstance(startup, int) and not isinstance(startup, bool) and startup < 0:  # TPE took it for 0, unsaid
            raise config.ConfigError(f"spec.sampler.n_startup_trials: must be an integer >= 0, got {startup}")
        self.seed = self.seed_of()
        self.common = override_items(self.spec.get("overrides") or {})
        self.extra = config.split_overrides(self.extra_overrides)
        config.parse_overrides(self.extra_overrides)  # an item without `=`: said so, before it is taken for a swept key
        raw = self.spec[space_key(self.spec)]
        swept = sorted({item.partition("=")[0].strip() for item in self.extra} & set(raw))
        if swept:  # applied after the trial's values, it would replace them, while the runs' names said otherwise
            raise config.ConfigError(f"overrides: {', '.join(swept)} is swept by spec.{space_key(self.spec)}; "
                                     f"drop it from overrides or from the search space")
        swept = sorted(set(self.spec.get("overrides") or {}) & set(raw))
        if swept:  # applied before the trial's values, it was replaced by them unseen
            raise config.ConfigError(f"spec.overrides: {', '.join(swept)} is swept by spec.{space_key(self.spec)}; "
                                     f"drop it from spec.overrides or from the search space")
        if self.sampler_name == "grid":
            combinations = math.prod(map(len, raw.values()))
            if combinations > MAX_TRIALS:  # checked before the combinations are listed, each loaded
                raise config.ConfigError(f"spec.grid: its {combinations} combinations are more than the {MAX_TRIALS} "
                                         f"trials a sweep runs (it queues every trial in its study before the first "
                                         f"runs); list fewer values")
            self.grid = [dict(zip(raw, combo, strict=True)) for combo in itertools.product(*raw.values())]
            trials = self.spec.get("trials", len(self.grid))
            if trials != len(self.grid) or not isinstance(trials, int) or isinstance(trials, bool):  # 4.0, true
                raise config.ConfigError(f"spec.trials: a grid runs each of its {len(self.grid)} combinations once, "
                                         f"got trials {trials!r}; leave trials out")
            checked = self.grid
        else:
            self.grid = None
            trials = self.spec.get("trials")
            if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
                raise config.ConfigError(f"spec.trials: must be an integer >= 1 with a {space_key(self.spec)}: "
                                         f"space, got {trials!r}")
            if trials > MAX_TRIALS:  # a MemoryError once the sweep run had opened, or hours of queueing
                raise config.ConfigError(f"spec.trials: must be at most {MAX_TRIALS} (a sweep queues every trial in "
                                         f"its study before the first runs), got {trials}")
            ends = {k: v if isinstance(v, list) else [self.space[k].low, self.space[k].high] for k, v in raw.items()}
            checked = [dict(zip(ends, combo, strict=True)) for combo in itertools.product(*ends.values())]
            sizes = [len(d.choices) if isinstance(d, optuna.distributions.CategoricalDistribution)
                     else range_size(d)  # {min: 0.1, max: 0.1} draws 0.1 only, {min: 0.1, max: 0.2} without end
                     for d in self.space.values()]
            self.combinations = math.prod(sizes)  # inf with a float range: `draw_unrun` has none to count
            if trials > math.prod(sizes):  # the samplers would draw the same params again (and leave others out)
                raise config.ConfigError(f"spec.trials: {trials} trials over the {math.prod(sizes)} combinations of "
                                         f"spec.{space_key(self.spec)} would run some twice; give trials <= "
                                         f"{math.prod(sizes)}, or a grid: to run each once")
        self.trials = trials
        self.checked = checked  # a grid's combinations, or a space's ends
        self.prepare_keys: dict[str, str] = {}  # `prepared_dataset`'s, by data params: a path's digest read once
        self.dists: dict[str, Any] = {}  # `check_batches`': this host's distribution of each train.distribute
        self.known_images: dict[str, tuple[int | None, int | None]] = {}  # `check_batches`', by data params
        if self.grid:
            self.combinations = len(self.grid)
            if say is not None and len(self.grid) >= SAY_CHECKS:
                say(f"checking the params of the grid's {len(self.grid)} trials before any run opens")
        self.configs = [self.load(values, f"trial {i}" if self.grid else "space")
                        for i, values in enumerate(checked)]
        if self.grid:
            self.check_repeats(raw)
        if any(c.train.validation_fraction == 0 for c in self.configs):
            raise config.ConfigError(
                "train.validation_fraction: a sweep chooses its best trial by val_acc, which must come from "
                "training images held out: set it > 0 (the spec's overrides or its base; 0 validates on the test "
                "split, and the best trial's test_acc would be chosen on the very images it is measured on)")
        fractions = sorted({c.train.validation_fraction for c in self.configs})
        if len(fractions) > 1:  # each trial scored on other images, and the one that trained on most favoured
            raise config.ConfigError(
                f"train.validation_fraction: a sweep ranks its trials by val_acc on the images they hold out, so it "
                f"must be the same for every trial, got {', '.join(map(str, fractions))}: set it in the spec's "
                "overrides or its base, not its search space")
        self.check_ranked(raw)
        experiments = sorted({c.tracking.experiment for c in self.configs})
        if len(experiments) > 1:  # each trial's runs are created in the sweep run's, whatever its params say
            raise config.ConfigError(
                f"tracking.experiment: a sweep's runs all go in its sweep run's experiment, so it must be the same for "
                f"every trial, got {', '.join(experiments)}: set it in the spec's overrides or its base, not its "
                "search space")
        for i, (values, cfg) in enumerate(zip(checked, self.configs, strict=True)):
            self.check_images(cfg, f"trial {i}" if self.grid else "space", values)
            check_trains_here(cfg)
        if not self.grid:
            self.check_inside(checked)
        self.held_out_varies = held_out_varies(self.configs)
        for cfg in {c.data.source: c for c in self.configs}.values():
            prepare.prepare_key(cfg)  # DataError for a data.source that names nothing
        self.rehearse()  # wrong sampler or pruner arguments fail here, before any run

    def check_ranked(self, raw: dict[str, Any]) -> None:
        """ConfigError for a swept key that cannot change val_acc, which the trials are ranked by: a later step's
        setting (evaluate.*, which sets how test_acc is measured), how a run is shown or kept (`UNRANKED`), or a param
        without effect in every trial (`config.inert_params`: train.nesterov at train.momentum 0). Its trials trained
        the same model again, and the first of equals won: the sweep seemed to choose a value it never compared."""
        where = space_key(self.spec)
        for key in raw:
            if key.startswith("evaluate.") or key in UNRANKED:
                what = "a setting of evaluate, which measures test_acc" if key.startswith("evaluate.") else \
                    "a setting of how a run is shown or kept"
                raise config.ConfigError(
                    f"spec.{where}.{key}: a sweep ranks its trials by val_acc, which {key} ({what}) does not change: "
                    f"its trials would train the same model and the first of equals win; set it in spec.overrides"
                    + (", and compare its values on one model with -e evaluate" if key.startswith("evaluate.") else ""))
            if all(key in config.inert_params(c) for c in self.configs):
                given = config.inert_params(self.configs[0])[key]
                raise config.ConfigError(
                    f"spec.{where}.{key}: has no effect in any trial (given {given}; "
                    f"docs/params.md#params-without-effect): its trials would train the same model; sweep what it "
                    f"needs as well, or drop it")

    def seed_of(self) -> int | None:
        """The spec's `seed`, or the sampler's own `seed` argument (the same thing: both may be given only if
        equal); ConfigError unless an integer in [0, 2**32 - 1]."""
        seeds = {key: value for key, value in (("spec.seed", self.spec.get("seed")),
                                               ("spec.sampler.seed", self.sampler_kwargs.pop("seed", None)))
                 if value is not None}
        for key, seed in seeds.items():
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEEDS:
                raise config.ConfigError(f"{key}: must be an integer from 0 to {SEEDS - 1}, got {seed!r}")
        if len(set(seeds.values())) > 1:
            raise config.ConfigError(f"spec.seed: {seeds['spec.seed']} and spec.sampler.seed: "
                                     f"{seeds['spec.sampler.seed']} differ; give one seed")
        if seeds and self.sampler_name == "grid":  # it named another study, and drew nothing
            raise config.ConfigError(f"{next(iter(seeds))}: a grid queues each of its combinations and draws none, so "
                                     f"a seed changes nothing; leave it out")
        return next(iter(seeds.values()), None)

    def check_repeats(self, raw: dict[str, list]) -> None:
        """Refuse grid combinations that load to the same params (`1` and `1.0`, `0.1` and `1e-1`): their
        trials would be the same, run twice."""
        seen: dict[str, int] = {}
        for i, cfg in enumerate(self.configs):
            j = seen.setdefault(json.dumps(cfg.flat(), sort_keys=True, default=str), i)
            if j != i:
                text = [{k: json.dumps(encode(v)) for k, v in self.grid[n].items()} for n in (i, j)]
                key = next((k for k in raw if text[0][k] != text[1][k]), next(iter(raw)))
                raise config.ConfigError(f"spec.grid.{key}: values repeat, so some trials would run twice: "
                                         f"{raw[key]!r}")

    def rehearse(self, n: int | None = None) -> None:
        """Run `n` trials of an in-memory study as workers do (a fresh sampler per trial, each param drawn, a
        value reported at step 1, should_prune asked): Optuna checks most sampler and pruner arguments only
        then, so a bad one fails here, as a ConfigError naming spec.sampler or spec.pruner, before any run.
        By default 3, past the sampler's and the pruner's startup trials (up to `trials`): TPE draws at random for
        its first `n_startup_trials` (10 unless given) and uses its other arguments only after them; the median
        pruner prunes nothing in its first 5."""
        if n is None:
            startups = [kwargs.get("n_startup_trials", default_startup(cls))
                        for cls, kwargs in ((SAMPLERS[self.sampler_name], self.sampler_kwargs),
                                            (PRUNERS[self.pruner_name], self.pruner_kwargs))]
            startup = max([s for s in startups if isinstance(s, int) and not isinstance(s, bool)], default=0)
            n = 3 + min(max(startup, 0), self.trials)
        study = optuna.create_study(storage=None, direction="maximize", sampler=self.make_sampler(0),
                                    pruner=self.make_pruner())
        for number in range(n):
            what = "spec.sampler"
            try:
                study.sampler = self.make_sampler(number)
                trial = study.ask()
                self.values(trial)
                what = "spec.pruner"
                trial.report(0.5, step=1)
                trial.should_prune()
                what = "spec.sampler"
                study.tell(trial, 0.5)
            except config.ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever Optuna raises means a bad argument
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                raise config.ConfigError(f"{what}: {reason} (with the arguments {self.kwargs_of(what)!r})") from None

    def check_inside(self, ends: list[dict[str, Any]], check=inputs.check_known_training_images) -> None:
        """ConfigError naming a range of the space that can draw a value its ends do not show the params refuse (a
        train.batch_size that model.ghost_batch does not divide), and the value: every trial drawing it would fail.
        Checked at `range_values`: each value inside a range with the others' ends and choices (`ends`, already
        checked; at most CHECKS combinations, else each value with one of them in turn), then values inside two
        ranges or more together (every combination, fewest values inside first, where there are at most CHECKS, else
        a seeded sample making up CHECKS, at least a quarter of it). `check`: what refuses a combination's params (a
        ConfigError), by default too few training images."""
        where, raw = space_key(self.spec), self.spec[space_key(self.spec)]
        values = {k: raw[k] if isinstance(raw[k], list) else range_values(d) for k, d in self.space.items()}
        inside = {k: set(values[k]) - {d.low, d.high} for k, d in self.space.items() if not isinstance(raw[k], list)}
        inside = {k: v for k, v in inside.items() if v}
        if not inside:
            return
        if sum(map(len, inside.values())) * len(ends) <= CHECKS:
            single = [{**end, key: v} for key, vs in inside.items() for v in sorted(vs) for end in ends]
        else:
            single = [{**ends[i % len(ends)], key: v} for key, vs in inside.items() for i, v in enumerate(sorted(vs))]
        if math.prod(map(len, values.values())) <= CHECKS:
            combos = (dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values()))
            several = sorted((c for c in combos if sum(c[k] in vs for k, vs in inside.items()) > 1),
                             key=lambda c: sum(c[k] in vs for k, vs in inside.items()))
        else:
            draw = random.Random(0)
            several = [{k: draw.choice(v) for k, v in values.items()}
                       for _ in range(max(CHECKS - len(single), CHECKS // 4))]
        layers = self.layers()
        for combo in single + several:
            try:
                check(config.load_layered(layers, self.common + override_items(combo) + self.extra))
            except config.ConfigError as exc:
                drawn = [k for k, vs in inside.items() if combo[k] in vs]
                others = {k: v for k, v in combo.items() if k not in drawn}
                raise config.ConfigError(
                    f"spec.{where}.{' and '.join(drawn)}: can draw "
                    f"{' and '.join(json.dumps(combo[k]) for k in drawn)}{' together' if len(drawn) > 1 else ''}"
                    f"{f' (with {label(others)})' if others else ''}, which the params refuse: {exc}; narrow the "
                    f"range, or list the values that pass") from None

    @staticmethod
    def check_images(cfg: config.Config, what: str, values: dict[str, Any], dataset_uri: str | None = None) -> None:
        """ConfigError naming the trial where its cifar10 or synthetic data (whose counts follow from the params), or
        the path a dataset was prepared from (`dataset_uri`, whose prepare run counted them), hold too few training
        images to hold out train.validation_fraction or, with train.drop_remainder, to make a whole batch: refused
        before any run, as main and train refuse them (`config.check_training_images`)."""
        try:
            inputs.check_known_training_images(cfg, dataset_uri)
        except config.ConfigError as exc:
            raise config.ConfigError(f"{what} ({label(values)}): {exc}") from None

    def check_prepared_images(self) -> None:
        """`check_images` for each trial (a grid's) or the space's ends whose data is a path already prepared (a rerun,
        or a dataset a main or train command prepared): its count is known before any run, as cifar10's is. Before
        any run opens, as main and train refuse them where they reuse a prepared dataset."""
        found: dict[str, str | None] = {}
        for i, (values, cfg) in enumerate(zip(self.checked, self.configs, strict=True)):
            data_params = json.dumps(cfg.flat("data"), sort_keys=True)
            if data_params not in found:
                found[data_params] = self.prepared_dataset(cfg)
            if found[data_params] is not None:
                self.check_images(cfg, f"trial {i}" if self.grid else "space", values, found[data_params])

    def prepared_dataset(self, cfg: config.Config) -> str | None:
        """The dataset prepared from `cfg`'s data path (the URI of the prepare run's artifact, which logged its count),
        or None: none prepared yet, or cifar10 or synthetic data, whose counts the params give."""
        if inputs.known_training_images(cfg) is not None:
            return None
        data_params = json.dumps(cfg.flat("data"), sort_keys=True)
        if data_params not in self.prepare_keys:  # a digest of the whole file or folder
            self.prepare_keys[data_params] = prepare.prepare_key(cfg)
        return prepare.find_prepared(self.prepare_keys[data_params])

    def refused_images(self, values: dict[str, Any], number: int) -> str | None:
        """Why trial `number` (its `values`) cannot train on the training images its data path's prepare run counted
        (too few to hold out or to batch: `check_images`), or None. Asked before the trial's run opens: a dataset
        prepared by the sweep itself is counted only then, and each such trial opened a run and left it FAILED."""
        try:
            cfg = self.load(values, f"trial {number}")
            uri = self.prepared_dataset(cfg)
        except (config.ConfigError, data.DataError):  # a space's bad draw, a path gone since: its run says so
            return None
        if uri is None:
            return None
        try:
            inputs.check_known_training_images(cfg, uri)
        except config.ConfigError as exc:
            return f"ConfigError: {exc}"
        return None

    def check_replicas(self) -> None:
        """ConfigError, before the study starts, naming the trial (a grid's), the space's choice or range end, or the
        value inside a range whose train.batch_size the devices its train.distribute spreads each batch over on this
        host cannot share (`check_batches`), as main and train refuse it before any run. It loads the backend (and
        takes the GPUs): for a command whose own process trains the trials."""
        from pipeline import distribute

        try:
            for mode in {c.train.distribute for c in self.configs} - set(self.dists):
                self.dists[mode] = distribute.distribution(mode)
            if all(dist.replicas < 2 for dist in self.dists.values()):  # one device takes any batch: nothing to load
                return
            for i, (values, cfg) in enumerate(zip(self.checked, self.configs, strict=True)):
                try:
                    self.check_batches(cfg)
                except config.ConfigError as exc:
                    raise config.ConfigError(f"{f'trial {i}' if self.grid else 'space'} ({label(values)}): "
                                             f"{exc}") from None
            if not self.grid:
                self.check_inside(self.checked, self.check_batches)
        finally:
            for dist in self.dists.values():
                dist.end()  # JAX's DataParallel is process-wide: each trial's train step sets its own

    def check_batches(self, cfg: config.Config) -> None:
        """ConfigError where `cfg`'s batch is one the replicas of its train.distribute on this host cannot share
        (`inputs.check_known_batches`, with the images known before the trial runs: cifar10's and synthetic's, or a
        path's a prepare run counted)."""
        from pipeline import distribute

        mode = cfg.train.distribute
        if mode not in self.dists:
            self.dists[mode] = distribute.distribution(mode)
        if self.dists[mode].replicas < 2:
            return
        key = json.dumps(cfg.flat("data"), sort_keys=True)
        if key not in self.known_images:  # a path's count is a store query: once per dataset
            uri = self.prepared_dataset(cfg)
            self.known_images[key] = inputs.known_split_images(cfg, uri) if uri or \
                inputs.known_training_images(cfg) is not None else (None, None)
        t = cfg.train
        self.dists[mode].check_batches(t.batch_size, t.drop_remainder, cfg.model.ghost_batch,
                                       *self.known_images[key])

    def refused_batches(self, values: dict[str, Any], number: int) -> str | None:
        """Why trial `number` (its `values`) cannot train on the replicas of this host (`check_batches`), or None.
        Asked before the trial's run opens, by a process that trains it (a worker of `workers N`, whose parent checks
        nothing that would load the backend; a host joining the study)."""
        try:
            cfg = self.load(values, f"trial {number}")
            self.check_batches(cfg)
        except config.ConfigError as exc:
            return f"ConfigError: {exc}"
        except data.DataError:  # a path gone since: its run says so
            return None
        return None

    def layers(self) -> dict[str, dict[str, Any]]:
        """default.yaml with the spec's base layered on it, as text (`config.read_layers`), read once."""
        if self._layers is None:
            self._layers = config.read_layers(self.base)
        return self._layers

    def kwargs_of(self, what: str) -> dict[str, Any]:
        return self.sampler_kwargs if what == "spec.sampler" else self.pruner_kwargs

    def load(self, values: dict[str, Any], what: str) -> config.Config:
        """The params of a trial of `values`, layered on the base read once (`layers`): read again for each, a grid of
        10,000 combinations spent minutes parsing YAML before its first line, and a base edited mid-sweep changed
        the trials still to run unseen."""
        base = self.base
        try:
            return config.load_layered(self.layers(), self.common + override_items(values) + self.extra)
        except config.ConfigError as exc:
            if values and self.refused_without(base, self.common + self.extra, str(exc)):
                # refused whatever the trial's values: said as the first layer refused so, not the trial's
                what = (f"spec.base ({base})" if self.refused_without(base, [], str(exc)) else "spec.overrides"
                        if self.refused_without(base, self.common, str(exc)) else f"overrides ({self.extra_overrides})")
                raise config.ConfigError(f"{what}: {exc}") from None
            raise config.ConfigError(f"{what} ({label(values)}): {exc}") from None

    @staticmethod
    def refused_without(base: str | None, overrides: list[str], message: str) -> bool:
        """Whether the params `overrides` layer on `base` are refused with `message`."""
        try:
            config.load(base, overrides)
        except config.ConfigError as exc:
            return str(exc) == message
        return False

    def make_sampler(self, offset: int) -> optuna.samplers.BaseSampler:
        """A fresh sampler; seeded `seed + offset` (the trial number; modulo 2**32) so that trials, and
        parallel workers, draw apart and a one-worker sweep repeats exactly."""
        kwargs = dict(self.sampler_kwargs)
        if self.seed is not None:
            kwargs["seed"] = (self.seed + offset) % SEEDS
        try:
            return SAMPLERS[self.sampler_name](**kwargs)
        except (TypeError, ValueError) as exc:
            raise config.ConfigError(f"spec.sampler: {exc}") from None

    def make_pruner(self) -> optuna.pruners.BasePruner:
        try:
            return PRUNERS[self.pruner_name](**self.pruner_kwargs)
        except (TypeError, ValueError) as exc:
            raise config.ConfigError(f"spec.pruner: {exc}") from None

    def draw_unrun(self, study: optuna.Study, storage: optuna.storages.BaseStorage, trial_id: int,
                   number: int) -> None:
        """Draw the params of claimed trial `number` of a space of choices and integer ranges (`combinations`
        countable) that it queued empty, as Optuna would (the sampler seeded `seed + number`), but none that a trial of
        the study holds already: a repeat is drawn again, REDRAWS times at most (another seed each), then taken at
        random among the combinations no trial holds. The draw is fixed on the trial (Optuna's `fixed_params`), which
        its `values` then read, and claimed in the study (`claim_combination`): workers drawing at the same moment each
        read the others' trials before any had fixed its draw, and ran one combination twice and another never; the
        one whose claim the storage refuses draws again. Optuna's samplers draw with repeats: 4 trials over 2 x 2
        choices ran one twice and another never."""
        frozen = storage.get_trial(trial_id)
        if self.grid or not math.isfinite(self.combinations) or frozen.params or \
                frozen.system_attrs.get("fixed_params"):  # a grid's combination, or a trial queued again: its own
            return

        def combination(params: dict[str, Any]) -> tuple:
            return tuple(dist.to_internal_repr(params[key]) for key, dist in self.space.items())

        def fixed(drawn: dict[str, Any]) -> bool:
            """Fix `drawn` on the trial, then claim it: fixed first, so that a worker that dies between the two leaves
            a retry that holds it (a claim no trial held would keep the combination from ever running)."""
            drawn = {key: int(v) if isinstance(dist, optuna.distributions.IntDistribution) else v
                     for (key, v), dist in zip(drawn.items(), self.space.values(), strict=True)}
            storage.set_trial_system_attr(trial_id, "fixed_params", drawn)
            if claim_combination(storage, study_id, combination(drawn), number):
                return True
            run.add(combination(drawn))  # another worker's, drawn at the same moment
            return False

        study_id = storage.get_study_id_from_name(study.study_name)
        held = [{**t.system_attrs.get("fixed_params", {}), **t.params}
                for t in study.get_trials(deepcopy=False) if t.number != number]
        run = {combination(p) for p in held if set(self.space) <= set(p)}
        view = optuna.pruners._filter_study(study, frozen)  # as Trial draws: a Hyperband bracket's trials
        drawn = {}
        for attempt in range(REDRAWS):
            sampler = self.make_sampler(number + attempt * REDRAW_STRIDE)
            sampler.before_trial(view, frozen)
            relative = sampler.sample_relative(view, frozen, sampler.infer_relative_search_space(view, frozen))
            drawn = {key: (dist.choices[0] if isinstance(dist, optuna.distributions.CategoricalDistribution)
                           else dist.low) if dist.single()  # as Trial draws: no sampler for a single value
                     else relative[key] if key in relative else sampler.sample_independent(view, frozen, key, dist)
                     for key, dist in self.space.items()}
            if combination(drawn) not in run and fixed(drawn):
                return
        if self.combinations <= MAX_UNRUN:
            choices = [dist.choices if isinstance(dist, optuna.distributions.CategoricalDistribution)
                       else range(dist.low, dist.high + 1, dist.step)
                       if isinstance(dist, optuna.distributions.IntDistribution)
                       else steps_of(dist) if dist.step is not None
                       else [dist.low] for dist in self.space.values()]  # {min: 0.1, max: 0.1}: one number
            unrun = [dict(zip(self.space, combo, strict=True)) for combo in itertools.product(*choices)]
            random.Random(None if self.seed is None else f"{self.seed}:{number}").shuffle(unrun)
            for pick in unrun:
                if combination(pick) not in run and fixed(pick):
                    return
        fixed(drawn)  # every combination held (none is, while trials <= combinations): a repeat, as Optuna draws

    def fingerprint(self) -> dict[str, Any]:
        """What makes two commands the same sweep: the spec's content, the command-line overrides and every
        param the trials share (so an edited `base` params file, which the spec names only, makes another)."""
        swept = self.spec[space_key(self.spec)]
        shared = {k: v for k, v in self.configs[0].flat().items() if k not in swept}
        return {"spec": self.spec, "overrides": self.extra_overrides, "params": shared}

    def values(self, trial: optuna.Trial | optuna.trial.FrozenTrial) -> dict[str, Any]:
        """The trial's params as YAML values: its queued fixed values, or drawn by the sampler."""
        raw, result = self.spec[space_key(self.spec)], {}
        for key, dist in self.space.items():
            if isinstance(trial, optuna.trial.FrozenTrial):
                value = trial.params[key]
            elif isinstance(dist, optuna.distributions.CategoricalDistribution):
                value = trial.suggest_categorical(key, dist.choices)
            elif isinstance(dist, optuna.distributions.IntDistribution):
                value = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
            else:
                value = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
            result[key] = decode(raw[key], value) if isinstance(dist, optuna.distributions.CategoricalDistribution) \
                else on_step(dist, value)
        return result


# ---------------------------------------------------------------- the study

CLAIMS_LOCK = threading.Lock()  # an in-memory storage's claims (`claim_combination`): one process's threads


def claim_combination(storage: optuna.storages.BaseStorage, study_id: int, combination: tuple, number: int) -> bool:
    """Claim a space's `combination` (its values in Optuna's internal form) for trial `number`: True for the first
    claim of it in the study, False for any later one. An RDB storage's claim is a row of the study's system attrs,
    inserted (`insert_study_system_attr`): one insert of two at once wins, on SQLite and PostgreSQL alike."""
    key = f"sweep:claimed:{json_digest(list(combination))[:16]}"
    if isinstance(storage, optuna.storages.RDBStorage):
        return insert_study_system_attr(storage, study_id, key, number)
    with CLAIMS_LOCK:
        if key in storage.get_study_system_attrs(study_id):
            return False
        storage.set_study_system_attr(study_id, key, number)
        return True


def insert_study_system_attr(storage: optuna.storages.RDBStorage, study_id: int, key: str, value: Any) -> bool:
    """Add system attr `key` (JSON `value`) to study `study_id` unless it holds one: True where this call added it,
    False where the study held it already. The table's unique (study, key) lets one of two inserts at once through.
    No public Optuna call inserts only (`set_study_system_attr` overwrites a key, so a claim it wrote could not fail):
    written through Optuna's private `optuna.storages._rdb.models`, as only `insert_waiting_trials` also writes
    (`test_sweep.py::test_a_claim_is_a_study_system_attr_the_storage_inserts_once_through_optunas_private_models`
    fails where an Optuna release changes it)."""
    import sqlalchemy
    from optuna.storages._rdb import models

    session = storage.scoped_session()
    try:
        session.add(models.StudySystemAttributeModel(study_id=study_id, key=key, value_json=json.dumps(value)))
        session.commit()
        return True
    except sqlalchemy.exc.IntegrityError:
        session.rollback()
        return False
    except Exception:
        session.rollback()
        raise
    finally:
        session.close()


def default_storage() -> str:
    """`optuna.db` beside a SQLite tracking store's file, else in the working directory."""
    uri = tracking_uri()
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path.cwd()
    return f"sqlite:///{folder.resolve() / 'optuna.db'}"


def default_study(plan: Plan) -> str:
    """The spec's name and a digest of its content, the overrides and the tracking store (`canonical_tracking_uri`):
    rerunning the same command continues the same study, a changed spec starts another."""
    digest = json_digest({**plan.fingerprint(), "tracking": canonical_tracking_uri(tracking_uri())})[:8]
    return f"{Path(plan.spec_path).stem}-{digest}"


DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_tracking_uri(uri: str) -> str:
    """One spelling of the tracking store `uri`, for the study's digest: a relative SQLite file made absolute (from
    the working directory, as MLflow opens it), http(s) with scheme and host in lower case, no default port and no
    trailing slash, any other scheme in lower case. A URI spelled so already is returned as it is (the digest of a
    study named before stays), as is one that does not parse."""
    scheme, sep, rest = uri.partition("://")
    if not sep:  # a path, or a URI such as file:./mlruns: as typed
        return uri
    scheme = scheme.lower()
    if scheme == "sqlite":
        path, mark, query = rest.removeprefix("/").partition("?")
        if not rest.startswith("/") or path in ("", ":memory:") or os.path.isabs(path):
            return f"{scheme}://{rest}"
        return f"{scheme}:///{os.path.abspath(path)}{mark}{query}"
    if scheme not in DEFAULT_PORTS:
        return f"{scheme}://{rest}"
    parts = urllib.parse.urlsplit(f"{scheme}://{rest}")
    try:
        port = parts.port
    except ValueError:  # not a number: MLflow refuses it anyway
        return f"{scheme}://{rest}"
    host = parts.hostname or ""
    netloc = (parts.netloc.rpartition("@")[0] + "@" if "@" in parts.netloc else "") + \
        (f"[{host}]" if ":" in host else host) + (f":{port}" if port not in (None, DEFAULT_PORTS[scheme]) else "")
    return urllib.parse.urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, parts.fragment))


def safe_url(url: str) -> str:
    """The storage URL without its password, for logs and params."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported by open_storage
        return url


def dashboard_hint(url: str) -> str:
    """The optuna-dashboard command for storage `url`, without its password: a log keeps no secret, and a masked
    `***` copied from it would not log in, so the hint says where the password goes instead."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported by open_storage
        return f"optuna-dashboard {url}"
    if parsed.password is None:
        return f"optuna-dashboard {url}"
    where = ("its password in PGPASSWORD or ~/.pgpass" if parsed.get_backend_name() == "postgresql"
             else "its password added to the URL")
    bare = sqlalchemy.engine.URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port,
                                        parsed.database, parsed.query)  # URL.set(password=None) keeps it
    return f"optuna-dashboard {bare.render_as_string(hide_password=False)} (with {where})"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna storage at `url` (tables created if new), with heartbeats; ConfigError if it cannot be opened.
    `postgresql://` URLs use psycopg2."""
    if "://" not in url:
        raise config.ConfigError(f"storage: expected an SQLAlchemy URL such as sqlite:///optuna.db or "
                                 f"postgresql://user@host/db, got {url!r}")
    if in_memory(url):  # each process's own, gone when it ends: workers found no study, a rerun began again
        raise config.ConfigError(f"storage: {url} is an in-memory database, which neither other worker processes nor "
                                 f"a rerun can reach; give a file such as sqlite:///optuna.db, or leave it empty")
    make_sqlite_folder(url)
    if url.startswith("postgresql://"):  # SQLAlchemy 2.1's default driver is psycopg 3; this project ships psycopg2
        url = "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    if holds_mlflow_store(url):  # both record their schema in alembic_version: Optuna's "no longer compatible", after
        raise config.ConfigError(  # it had written its tables into the tracking store
            f"storage: {safe_url(url)} holds an MLflow tracking store; Optuna needs a database of its own, "
            "e.g. sqlite:///optuna.db (leave storage empty for optuna.db beside mlflow.db)")
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                              heartbeat_stale_trial_callback=on_stale_trial,
                                              engine_kwargs={"pool_pre_ping": True})
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy, driver and Optuna errors alike mean a bad storage
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
            # Workers starting together on a new PostgreSQL database race to create Optuna's tables; the
            # loser sees the winner's tables half made. They exist a moment later: open them then.
            if attempt < 2 and ("already exists" in reason or "duplicate key" in reason):
                time.sleep(1 + attempt)
                continue
            raise config.ConfigError(f"storage: cannot open {safe_url(url)}: {type(exc).__name__}: {reason}") from None


def check_storage_not_gone(url: str, name: str) -> None:
    """ConfigError, before the storage is opened (which makes a missing SQLite file), where `url` names a SQLite file
    that does not exist but this tracking store holds a sweep run of study `name` in it (`trials.sweep_runs`): the
    file was deleted or moved, or, named by a relative path, the command runs from another folder. A new file was
    made and the study begun again under a new sweep run, every trial run and registered again, the first sweep run
    left as it was."""
    path = sqlite_file(url)
    if path is None or path.exists():
        return
    earlier = trials.sweep_runs(name, safe_url(url))
    if earlier:
        raise config.ConfigError(f"study: {name} is not in {safe_url(url)}, which does not exist, though sweep run "
                                 f"{earlier[0]} ran it there (the file deleted or moved, or a relative path run from "
                                 f"another folder?): put it back to go on with the study, or pass another -P study= to "
                                 f"start afresh")


def sqlite_file(url: str) -> Path | None:
    """The file a `sqlite:///` storage URL names (absolute, from the working directory); None for another database,
    an in-memory one or a `file:` URI."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported by open_storage
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database.startswith("file:") or \
            parsed.database == ":memory:":
        return None
    return Path(parsed.database).absolute()


def make_sqlite_folder(url: str) -> None:
    """Make the missing folders of a `sqlite:///` storage's file, as a tracking store's are made: SQLite's "unable to
    open database file" named neither the folder nor what was wrong. ConfigError naming the path where the file is a
    folder, or below a file, or its folder cannot be made."""
    path = sqlite_file(url)
    if path is None:
        return
    reason = None
    if path.is_dir():
        reason = f"{path} is a folder, not a SQLite database file"
    elif not (above := next(p for p in path.parents if p.exists())).is_dir():
        reason = f"{above} is a file, not a folder"
    elif not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = f"cannot make its folder {path.parent}: {exc.strerror}"
    if reason:
        raise config.ConfigError(f"storage: cannot open {url}: {reason}; name a SQLite file (a new one is made)")


def holds_mlflow_store(url: str) -> bool:
    """Whether the database at `url` holds MLflow's tracking tables."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url)
        try:
            tables = set(sqlalchemy.inspect(engine).get_table_names())
        finally:
            engine.dispose()
    except Exception:  # noqa: BLE001 - a database that cannot be read is reported as it is
        return False
    return {"experiments", "runs", "registered_models"} <= tables


def in_memory(url: str) -> bool:
    """Whether `url` is an in-memory SQLite database (sqlite://, sqlite:///:memory:, a file: URI of mode=memory)."""
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported by open_storage
        return False
    database = parsed.database or ""
    return parsed.get_backend_name() == "sqlite" and (
        database in ("", ":memory:") or database.startswith("file::memory:") or "mode=memory" in url)


def storage_failure(exc: BaseException) -> str | None:
    """The driver's one line where `exc` is the storage's database failing (its server down, the connection lost,
    SQLite's file locked), whether raised by SQLAlchemy or wrapped by Optuna; None for any other exception."""
    import sqlalchemy

    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    if not isinstance(cause, sqlalchemy.exc.OperationalError):
        return None
    return str(cause.orig or cause).strip().splitlines()[0][:300]


@contextlib.contextmanager
def storage_failures(url: str) -> Iterator[None]:
    """A storage that fails mid-sweep is StepFailed (exit 3), one line naming it: it was Optuna's traceback, whose
    message blames the data ("invalid data in the commit, e.g. exceeding max length"), in the sweep run's reason too."""
    try:
        yield
    except Exception as exc:
        if (reason := storage_failure(exc)) is None:
            raise
        raise StepFailed(f"storage {safe_url(url)} failed: {reason}; rerun the same command to go on with the "
                         "study") from None


def on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A worker stopped (killed, host lost) mid-trial, or took too long to beat, or its tell failed; Optuna has marked
    its trial FAILED. Fail the trial's MLflow run and the runs still open under it, then queue the trial again
    (at most MAX_RETRY times) and tag its runs `superseded_by_retry`."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    tries = [*trial.system_attrs.get("retry_history", []), trial.number]  # what the retry callback counts
    then = f"trial {trial.number} queued again" if len(tries) <= MAX_RETRY else \
        f"not queued again: the worker of each of trials {', '.join(map(str, tries))} (its tries) stopped"
    reason = f"worker stopped: no heartbeat for over {GRACE_S} s; {then}"
    if run_id and trials.run_status(run_id) == "RUNNING":  # an interrupted trial's runs ended KILLED: kept so, and
        trials.fail_trial_runs(run_id, reason)               # a run ended when its tell failed (FAILED) too
    print(f"trial {trial.number}: {reason}", file=sys.stderr)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)
    if run_id and len(tries) <= MAX_RETRY:  # its retry's runs count instead: the comparisons leave these out
        trials.supersede_trial_runs(run_id)


def study_name_in(storage: optuna.storages.RDBStorage, name: str) -> bool:
    return any(s.study_name == name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


def join_study(plan: Plan, storage: optuna.storages.RDBStorage, name: str) -> tuple[optuna.Study, bool]:
    """Create the study (this process leads: it queues the trials) or load it (it follows).

    The storage's unique study names decide who leads when several workers start at once. A
    follower must come with the same spec and overrides. Returns (study, leads).
    """
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    sampler=plan.make_sampler(0), pruner=plan.make_pruner())
        # The lock of a study of this name that was deleted (optuna delete-study, the dashboard) would tell
        # `finish` that another worker registers this one: its trials would run and nothing be registered, unsaid.
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=f"{name}.register", storage=storage)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=plan.make_sampler(0),
                                  pruner=plan.make_pruner())
    if "fingerprint" not in study.user_attrs and not in_setup(study):
        raise config.ConfigError(f"study: {name} in {safe_url(storage.url)} holds {len(study.trials)} trials that no "
                                 f"sweep set up (it keeps none of a sweep's records); pass another -P study= for this "
                                 f"sweep")
    deadline = time.monotonic() + 60
    while "fingerprint" not in study.user_attrs:  # the leader writes it a moment after creating the study
        if time.monotonic() > deadline:
            raise config.ConfigError(f"study: {name} exists but its first worker never finished setting it up; "
                                     f"remove it (optuna delete-study --study-name {name} --storage ...) or "
                                     f"pass another -P study=")
        time.sleep(0.5)
    check_fingerprint(plan, study)
    check_parent_run(study)
    return study, False


def in_setup(study: optuna.Study) -> bool:
    """Whether `study`, without a fingerprint yet, may be a sweep's that its leader is setting up (`lead`): maximised,
    its trials all queued, only the user attrs `lead` writes before the fingerprint. Else it is no sweep's (a user's
    own Optuna study of that name), and waiting a minute for its fingerprint, then saying to delete it, was wrong."""
    return study.directions == [optuna.study.StudyDirection.MAXIMIZE] and \
        set(study.user_attrs) <= {"mlflow_parent_run_id", "mlflow_experiment_id", "mlflow_tracking_uri"} and \
        all(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))


def left_behind(plan: Plan, storage: optuna.storages.RDBStorage, name: str) -> list[str]:
    """Where a command is about to start study `name` under its default name (`default_study`): one line for each study
    of the same spec file (`<spec's name>-<digest>`) and tracking store in `storage` that is not done, saying what
    differs from it (`fingerprint_changes`). The spec, its base params file or the overrides edited between a Ctrl-C and
    the rerun made a study of another name, whose trials all ran afresh, the first one left half done, unsaid."""
    stem, here = Path(plan.spec_path).stem, canonical_tracking_uri(tracking_uri())
    now = json.loads(json.dumps(plan.fingerprint(), default=str))
    lines = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        other, attrs = summary.study_name, summary.user_attrs
        if other == name or not re.fullmatch(rf"{re.escape(stem)}-[0-9a-f]{{8}}", other) or \
                not isinstance(attrs.get("fingerprint"), dict) or \
                canonical_tracking_uri(str(attrs.get("mlflow_tracking_uri", ""))) != here or registered(storage, other):
            continue
        left = unfinished(optuna.load_study(study_name=other, storage=storage))
        shown = said_changes(fingerprint_changes(attrs["fingerprint"], now))
        lines.append(f"study {other} of this spec is not done ({left} trial{'' if left == 1 else 's'} left to run), "
                     f"but was started from another spec, base params or overrides ({shown}): this command starts "
                     f"study {name} afresh; to go on with {other}, rerun the command it was started with")
    return lines


def check_parent_run(study: optuna.Study) -> None:
    """ConfigError unless the study's sweep run is in this command's tracking store, and not deleted: a command
    tracking elsewhere (a host without the team's MLFLOW_TRACKING_URI) ran the study's trials into its own store,
    then failed to register them, and left the study unable to register anywhere."""
    parent_id, name = study.user_attrs["mlflow_parent_run_id"], study.study_name
    stage = trials.run_stage(parent_id)
    if stage is None:
        raise config.ConfigError(
            f"study: {name} tracks its runs in {safe_url(study.user_attrs.get('mlflow_tracking_uri', '?'))}, whose "
            f"sweep run {parent_id} is not in this command's tracking store {safe_url(tracking_uri())}; set "
            f"MLFLOW_TRACKING_URI to the study's, or pass another -P study= for a new sweep")
    if stage == "deleted":
        raise config.ConfigError(
            f"study: {name}'s sweep run {parent_id} is deleted; restore it (mlflow runs restore --run-id "
            f"{parent_id}) to go on with the study, or pass another -P study= for a new sweep")


def check_fingerprint(plan: Plan, study: optuna.Study) -> None:
    """ConfigError unless `study` was started from the same spec, base params and overrides as `plan`, naming what
    differs (`fingerprint_changes`): "another spec or other overrides" alone left the user to guess what."""
    then, now = study.user_attrs.get("fingerprint"), json.loads(json.dumps(plan.fingerprint(), default=str))
    if then != now:
        shown = said_changes(fingerprint_changes(then if isinstance(then, dict) else {}, now))
        raise config.ConfigError(f"study: {study.study_name} was started from another spec, base params or overrides "
                                 f"({shown}); rerun it as it was, or pass another -P study= for this one")


SHOWN_CHANGES = 4  # the differences a refused study's line names (`check_fingerprint`), then how many more


def said_changes(changes: list[str]) -> str:
    return "; ".join(changes[:SHOWN_CHANGES]) + (f"; and {len(changes) - SHOWN_CHANGES} more"
                                                 if len(changes) > SHOWN_CHANGES else "")


def fingerprint_changes(then: dict, now: dict) -> list[str]:
    """What differs between two `Plan.fingerprint`s (as JSON read them back), one "key: X then, Y now" each: a spec's
    keys (spec.grid.train.lr), -P overrides, and the params the trials share from spec.base where neither the spec
    nor -P overrides set them (an edited base file)."""
    def flat(fingerprint: dict) -> dict[str, Any]:
        items: dict[str, Any] = {}
        for key, value in (fingerprint.get("spec") or {}).items():
            if isinstance(value, dict) and key in ("overrides", *config.SWEEP_SPACES):
                items.update({f"spec.{key}.{name}": v for name, v in value.items()})
            else:
                items[f"spec.{key}"] = value
        items["-P overrides"] = fingerprint.get("overrides") or ""
        return items

    def differ(a: dict, b: dict) -> list[str]:
        return [key for key in dict.fromkeys([*a, *b]) if a.get(key, differ) != b.get(key, differ)]

    def shown(items: dict[str, Any], key: str) -> str:
        return json.dumps(items[key]) if key in items else "none"

    specs = flat(then), flat(now)
    changes = [f"{key}: {shown(specs[0], key)} then, {shown(specs[1], key)} now" for key in differ(*specs)]
    set_there = {key.partition(".")[2].partition(".")[2] for key in [*specs[0], *specs[1]] if key.startswith("spec.")}
    for text in (specs[0]["-P overrides"], specs[1]["-P overrides"]):
        with contextlib.suppress(config.ConfigError, ValueError, AttributeError):  # as the study stored it: any text
            set_there |= {item.partition("=")[0].strip() for item in config.split_overrides(text)}
    params = then.get("params") or {}, now.get("params") or {}
    def param(values: dict[str, Any], key: str) -> str:
        return "none" if key not in values else label({key: values[key]}).partition("=")[2]

    changes += [f"{key} (spec.base's): {param(params[0], key)} then, {param(params[1], key)} now"
                for key in differ(*params) if key not in set_there]
    return changes


def lead(plan: Plan, study: optuna.Study, parent_id: str, experiment_id: str) -> None:
    """Queue every trial (a grid: each combination; a space: `trials` empty ones the sampler fills
    when a worker claims them; `queue_trials`), then publish the spec and the parent run: followers wait for that."""
    queue_trials(study, [{k: encode(v) for k, v in values.items()} for values in plan.grid or [{}] * plan.trials])
    study.set_user_attr("mlflow_parent_run_id", parent_id)
    study.set_user_attr("mlflow_experiment_id", experiment_id)
    study.set_user_attr("mlflow_tracking_uri", tracking_uri())
    study.set_user_attr("fingerprint", json.loads(json.dumps(plan.fingerprint(), default=str)))


# `queue_trials` commits this many trials at a time, and says how far it is every QUEUE_SAY_S (a slow storage's first
# line), then when done.
QUEUE_CHUNK = 1000
QUEUE_SAY_S = 5.0


def queue_trials(study: optuna.Study, fixed: list[dict[str, Any]]) -> None:
    """Queue one WAITING trial per dict of `fixed` params in `study`, as `study.enqueue_trial` would, and print a line
    when done ("queued 10000 trials in 1.2 s"), and one every QUEUE_SAY_S before. An RDB storage takes them QUEUE_CHUNK
    to a transaction (`insert_waiting_trials`): one enqueue_trial per trial is a transaction each, and a grid of 10,000
    spent a minute queueing in silence after its "started" line (about 6 ms each into SQLite, a commit's sync)."""
    started = said = time.monotonic()
    backend = getattr(study._storage, "_backend", study._storage)  # under Optuna's cache, where the study has one
    study_id = backend.get_study_id_from_name(study.study_name)
    for start in range(0, len(fixed), QUEUE_CHUNK):
        chunk = fixed[start:start + QUEUE_CHUNK]
        if isinstance(backend, optuna.storages.RDBStorage):
            insert_waiting_trials(backend, study_id, chunk)
        else:
            for params in chunk:
                study.enqueue_trial(params)
        if start + len(chunk) < len(fixed) and time.monotonic() - said >= QUEUE_SAY_S:
            said = time.monotonic()
            print(f"queued {start + len(chunk)} of {len(fixed)} trials", flush=True)
    print(f"queued {len(fixed)} trial{'' if len(fixed) == 1 else 's'} in {time.monotonic() - started:.1f} s",
          flush=True)


def insert_waiting_trials(storage: optuna.storages.RDBStorage, study_id: int, fixed: list[dict[str, Any]]) -> None:
    """Insert one WAITING trial per dict of `fixed` params into study `study_id`, numbered on from its trials, in one
    transaction: the rows `Study.enqueue_trial` writes one transaction each (a trial, its system attr
    `fixed_params`). The study's row is locked first, as Optuna locks it to number a new trial. No public Optuna call
    adds several trials at once (`Study.add_trials` adds each in its own): written through Optuna's private
    `optuna.storages._rdb.models`, as `insert_study_system_attr` is
    (`test_sweep.py::test_trials_queued_at_once_are_the_trials_optunas_enqueue_trial_makes` fails where an Optuna
    release changes what an enqueued trial is)."""
    from optuna.storages._rdb import models

    session = storage.scoped_session()
    try:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        first = session.query(models.TrialModel).filter(models.TrialModel.study_id == study_id).count()
        session.add_all([models.TrialModel(study_id=study_id, number=first + i, state=TrialState.WAITING,
                                           system_attributes=[models.TrialSystemAttributeModel(
                                               key="fixed_params", value_json=json.dumps(params))])
                         for i, params in enumerate(fixed)])
        session.commit()
    except Exception:
        session.rollback()
        raise
    finally:
        session.close()


def claim(study: optuna.Study, storage: optuna.storages.RDBStorage, plan: Plan,
          waiting: collections.deque[int] | None = None) -> tuple[optuna.Trial, int] | None:
    """Take one waiting trial for this worker: (trial, its storage id), or None. The storage moves a
    trial from WAITING to RUNNING for exactly one caller, so no two workers (or hosts) run the same
    trial (Study.ask would create a new trial when another worker took the last waiting one). Its first heartbeat is
    recorded at once; a Ctrl-C or SIGTERM while its params are drawn queues it again (`requeue_interrupted`).
    `waiting`: the numbers of the trials this worker last read waiting, kept by the caller across claims and taken
    lowest first, read again only once used up (or taken by other workers): each claim read every waiting trial, 1.4 s
    per trial of a grid of 10,000. A trial queued again is a new one, numbered after them all, so the lowest waiting is
    taken first as before. None: read for this claim alone."""
    study_id = storage.get_study_id_from_name(study.study_name)
    kept = bool(waiting)
    waiting = collections.deque() if waiting is None else waiting
    for _ in range(2 if kept else 1):  # those read before, then (all taken by others) those waiting now
        if not waiting:
            waiting.extend(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        while waiting:
            if (claimed := claim_number(study, storage, plan, study_id, waiting.popleft())) is not None:
                return claimed
    return None


def claim_number(study: optuna.Study, storage: optuna.storages.RDBStorage, plan: Plan, study_id: int,
                 number: int) -> tuple[optuna.Trial, int] | None:
    """`claim` trial `number` of the study, read waiting: (trial, its storage id), or None where another worker took
    it first."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    try:
        if not storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    # Beaten from the claim on: a trial RUNNING with no heartbeat is never stale to Optuna, and one whose worker
    # died while drawing its params (before `heartbeat` began) was waited for by every worker, for good.
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.record_heartbeat(trial_id)
        # Optuna reads the trial's state, then writes RUNNING: on SQLite, which ignores its SELECT ... FOR UPDATE,
        # two workers at once both took one trial (each ran it, the next trial waited unrun). A trial goes from
        # WAITING to RUNNING once in its life (one queued again is a new trial): the first insert of its claim
        # takes it, on SQLite and PostgreSQL alike.
        if not insert_study_system_attr(storage, study_id, f"sweep:running:{trial_id}", worker_name()):
            return None
    try:
        study.sampler = plan.make_sampler(number)
        plan.draw_unrun(study, storage, trial_id, number)
    except (Interrupted, KeyboardInterrupt):  # queued again at once, as a trial stopped while it trains
        requeue_interrupted(study, storage, trial_id)
        raise
    return optuna.Trial(study, trial_id), trial_id


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial_id: int):
    """Record the trial's heartbeat every HEARTBEAT_S while it runs (what Study.optimize does for its trials)."""
    stop = threading.Event()

    def beat():
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; only a dead process goes stale
                reason = storage_failure(exc) or f"{type(exc).__name__}: {exc}"  # Optuna's own message blames the data
                print(f"warning: heartbeat of trial {trial_id} failed: {reason}".splitlines()[0],
                      file=sys.stderr, flush=True)
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------- one trial

def pruning_callback(trial: optuna.Trial):
    """A Keras callback: report val_acc to the trial after each epoch; stop the fit if the pruner says so."""
    import keras

    class ReportValAcc(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get("val_acc")
            if value is None or not math.isfinite(value):
                return
            trial.report(float(value), step=epoch + 1)
            if epoch + 1 < self.params.get("epochs", 0) and trial.should_prune():  # the last epoch is done anyway
                raise optuna.TrialPruned(f"val_acc {value:.4f} after epoch {epoch + 1}")

    return ReportValAcc()


def train_and_evaluate(cfg: config.Config, trial: optuna.Trial) -> float:
    """Inside the active trial run: train (pruned by Optuna), refuse a diverged model, evaluate; log the
    results to the trial run; return the last val_acc (`OBJECTIVE`). A pruned fit leaves its train run KILLED,
    tagged."""
    from pipeline import evaluate, train  # Keras loads only once every trial is known to be valid

    dataset_uri = prepare.ensure_prepared(cfg)
    train_run = None
    try:
        with step_run(cfg, "train", run_name=cfg.run_name(), not_failures=(optuna.TrialPruned,)) as train_run:
            model_uri = train.run(cfg, dataset_uri, extra_callbacks=[pruning_callback(trial)])
    except optuna.TrialPruned:
        train_id = train_run.info.run_id
        epochs = len(compare.val_acc_history(train_id))
        shutil.rmtree(checkpoint_dir(train_id), ignore_errors=True)  # nothing will resume a pruned fit
        trials.end_pruned_train(train_id, epochs)
        set_tags({"train_run_id": train_id, "pruned_at_epoch": str(epochs)})
        log_history(train_id)
        raise
    except BaseException:  # a failed trial is queued again as a new run, never resumed: its checkpoint goes
        if train_run is not None:
            shutil.rmtree(checkpoint_dir(train_run.info.run_id), ignore_errors=True)
        raise
    train_id = train_run.info.run_id
    describe_train_run(train_id)
    set_tags({"train_run_id": train_id, "model_uri": model_uri})
    history = log_history(train_id)
    loss = trials.final_metric(train_id, "loss")
    if not math.isfinite(loss):
        raise FloatingPointError(f"diverged: training loss is {loss} after {len(history)} epochs")
    with step_run(cfg, "evaluate"):
        metrics = evaluate.run(cfg, model_uri, dataset_uri)
    log_metrics({"test_acc": metrics["test_acc"], "test_loss": metrics["test_loss"]})
    return float(history.iloc[-1])


def log_history(train_id: str) -> pd.Series:
    """Log the train run's final and best val_acc on the active (trial) run; its val_acc per epoch."""
    history = compare.val_acc_history(train_id)
    if len(history):
        log_metrics({"val_acc": float(history.iloc[-1]), "best_val_acc": float(history.max())})
    return history


def run_trial(plan: Plan, study: optuna.Study, trial: optuna.Trial, parent_id: str, experiment_id: str) -> None:
    """Run one claimed trial in its own MLflow child run of the sweep; tell Optuna how it ended, then end the run.

    COMPLETE (value: the last val_acc) -> FINISHED; pruned -> PRUNED and KILLED with `pruned_at_epoch`;
    anything raised (diverged included) -> FAIL and FAILED with `failure_reason` (an unexpected exception's: its
    type and message, `tracking.unexpected_reason`, its traceback printed); SIGTERM/SIGINT -> KILLED with
    `interrupted_by` and raised on (Optuna's trial stays RUNNING: `work` queues it again).
    Optuna is told first, so that a run ends FINISHED only once its trial is COMPLETE in the study: a tell that fails
    (the storage's database gone or locked) ends the run FAILED with `failure_reason` "the Optuna storage failed: ..."
    (a failed trial's run keeps its own) and is raised on, the trial left RUNNING to be queued again once its
    heartbeat is stale; a tell that raised once its commit had landed (the storage, read again, holds the trial as
    told: `stored_as_told`) ends the run as told, with a warning; a trial another worker failed meanwhile (its
    heartbeat late: `on_stale_trial`) ends FAILED with `failure_reason`, and tag `superseded_by_retry` on its runs
    where it was queued again (`superseded`).
    """
    import keras

    values = plan.values(trial)
    refused = plan.refused_images(values, trial.number) or plan.refused_batches(values, trial.number)
    if refused is not None:  # known impossible: no run to leave FAILED (a grid's every such trial left one)
        trial.set_user_attr("failure_reason", refused[:500])
        study.tell(trial, None, state=TrialState.FAIL, skip_if_finished=True)
        print(f"trial {trial.number} refused before its run opened: {refused}", file=sys.stderr, flush=True)
        return
    run_id, value, state, status = None, None, TrialState.FAIL, "FAILED"
    try:  # from the run's creation on: a signal before it is entered ends it KILLED too, never left RUNNING
        with interrupts.deferred():  # one while MLflow creates it is raised once its id is known
            run_id = trials.create_trial_run(experiment_id, parent_id, f"trial-{trial.number} {label(values)}",
                                             {"step": "trial", "optuna_study": study.study_name,
                                              "optuna_trial": str(trial.number), "trial_overrides": label(values),
                                              "worker": worker_name()})
        try:
            trial.set_user_attr("mlflow_run_id", run_id)
            print(f"trial {trial.number} ({worker_name()}): {label(values)}", flush=True)
            trials.enter_run(run_id)
            cfg = plan.load(values, f"trial {trial.number}")
            log_params(cfg.flat())
            set_tags({"model_depth": str(cfg.model.depth)})
            value = train_and_evaluate(cfg, trial)
            state, status = TrialState.COMPLETE, "FINISHED"
        except optuna.TrialPruned as exc:
            state, status = TrialState.PRUNED, "KILLED"
            set_tags({"mlflow.note.content": f"**Pruned** by the {plan.pruner_name} pruner: {exc}"})
            print(f"trial {trial.number} pruned: {exc}", flush=True)
        except Exception as exc:  # noqa: BLE001 - whatever stops one trial must not stop the others
            if (failed := storage_failure(exc)) is not None:  # no bug, and Optuna's own message blames the data
                reason = f"the Optuna storage failed: {failed}"
            elif isinstance(exc, FloatingPointError) or not unexpected(exc):  # FloatingPointError: train_and_evaluate's
                reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:2000]
            else:  # a bug stays debuggable: its traceback where the reason says it is
                traceback.print_exception(exc)
                reason = unexpected_reason(exc)
            tag_failed(run_id, reason)
            trial.set_user_attr("failure_reason", reason[:500])
            print(f"trial {trial.number} failed: {reason}", file=sys.stderr, flush=True)
        try:  # Optuna 5 raises ValueError ("Cannot tell a FAIL trial") where it reads the trial finished already
            told = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state,
                              skip_if_finished=True).state
        except optuna.exceptions.UpdateFinishedTrialError:  # finished between tell's read and its write
            told = TrialState.FAIL
        except Exception as exc:  # the study holds the trial RUNNING (a worker queues it again, stale), unless the
            failed = storage_failure(exc)  # tell committed before it raised (the connection lost before the answer)
            if not stored_as_told(study, trial, state, value):
                if status != "FAILED":  # a failed trial's run keeps its own reason; this one's tell may have landed
                    tag_failed(run_id, unexpected_reason(exc) if failed is None else
                               f"the Optuna storage failed: {failed}")
                    trials.set_run_tags(run_id, {TELL_UNCONFIRMED: f"{state.name} {status}"})  # `confirm_late_tells`
                status = "FAILED"
                raise
            told = state
            why = f"the Optuna storage failed: {failed}" if failed is not None else \
                f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"warning: trial {trial.number}: telling Optuna raised ({why}), but the storage holds the trial "
                  f"{state.name} as told: its run ends as told", file=sys.stderr, flush=True)
        if told != state:  # another worker took this one for dead and failed it (a failed one keeps its own reason)
            status = "FAILED"
            superseded(study, trial, run_id)
    except (Interrupted, KeyboardInterrupt) as exc:  # in the trial or its tell: the trial stays RUNNING in the
        status = "KILLED"                            # study, and `work` queues it again
        if run_id is not None:
            tag_interrupted(run_id, exc)
        raise
    finally:
        if run_id is not None:
            trials.end_run(status, run_id)
        keras.backend.clear_session()  # the next trial in this process starts from a clean graph


# Tag on a trial's run ended FAILED because its tell raised and the storage could not be read back: "STATE STATUS",
# the trial's state as told and the run's status had the tell been confirmed (`confirm_late_tells`)
TELL_UNCONFIRMED = "tell_unconfirmed"


def confirm_late_tells(study: optuna.Study) -> list[int]:
    """When the study ends: each trial whose run ended FAILED on a tell it could not confirm (`TELL_UNCONFIRMED`) and
    that the study holds as that tell said (its commit landed before the connection was lost, and no read answered
    then), its run ended as told after all (FINISHED, or KILLED for a pruned one), its `failure_reason` gone and a
    note saying so: else a trial COMPLETE in the study kept a FAILED run, which the sweep could register as its best.
    Where the study holds it otherwise (RUNNING, failed since, queued again) the run stays FAILED. The trials
    confirmed, by number."""
    confirmed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):  # as told
        run_id = trial.user_attrs.get("mlflow_run_id")
        told = trials.run_tags(run_id).get(TELL_UNCONFIRMED, "").split() if isinstance(run_id, str) else []
        if len(told) != 2 or trial.state.name != told[0] or trials.run_status(run_id) != "FAILED":
            continue
        trials.amend_ended_run(run_id, told[1], drop=(TELL_UNCONFIRMED, "failure_reason"),
                               note=f"Its tell's answer was lost and the storage could not be read then; when the "
                                    f"sweep ended the study held the trial {trial.state.name} as told: {told[1]}.")
        confirmed.append(trial.number)
        print(f"warning: trial {trial.number}: its run had ended FAILED on a tell it could not confirm; the study "
              f"holds it {trial.state.name} as told: its run ends {told[1]}", file=sys.stderr, flush=True)
    return confirmed


def stored_as_told(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None) -> bool:
    """Whether the storage holds `trial` finished as it was told: `state`, and `value` where COMPLETE (a pruned
    trial's is Optuna's, its last reported). A tell may commit and then raise (the connection lost between the commit
    and its answer). Read afresh (not Optuna's cache), up to TELL_READS times with a growing pause; False where the
    storage cannot be read, or holds the trial otherwise (RUNNING: the tell never landed)."""
    storage = getattr(study._storage, "_backend", study._storage)  # under Optuna's cache, where the study has one
    for attempt in range(TELL_READS):
        try:
            stored = storage.get_trial(trial._trial_id)
        except Exception:  # noqa: BLE001 - the storage still failing: read again, then take the tell as failed
            if attempt + 1 < TELL_READS:
                time.sleep(TELL_BACKOFF_S * 2**attempt)
            continue
        return stored.state == state and (state != TrialState.COMPLETE or stored.values == [float(value)])
    return False


def tag_interrupted(run_id: str, exc: BaseException) -> None:
    trials.set_run_tags(run_id, {"interrupted_by": signal.Signals(getattr(exc, "signum", signal.SIGINT)).name})


def tag_failed(run_id: str, reason: str) -> None:
    trials.set_run_tags(run_id, {"failure_reason": reason, "mlflow.note.content": f"**FAILED**: {reason}"})


def retried(study: optuna.Study, number: int) -> bool:
    """Whether trial `number` was queued again after its worker was taken for stopped (Optuna's retry callback
    appends the number to the copy's `retry_history`)."""
    return any(number in t.system_attrs.get("retry_history", ()) for t in study.get_trials(deepcopy=False))


def superseded(study: optuna.Study, trial: optuna.Trial, run_id: str) -> None:
    """Tag the run of a trial that another worker failed while it ran (its heartbeat late, `on_stale_trial`):
    `failure_reason`, and where that worker queued it again, `superseded_by_retry` on it and its runs (the evaluate
    run started since, too): the retry's runs count instead, in the study, the register and the comparisons."""
    again = retried(study, trial.number)
    reason = ("failed in the study while it ran: its heartbeat was late, and another worker took its worker for "
              "stopped; " + ("its retry counts instead" if again else "not queued again (its tries are used up)"))
    tag_failed(run_id, reason)
    if again:
        trials.supersede_trial_runs(run_id)
    print(f"warning: trial {trial.number} {reason}", file=sys.stderr, flush=True)


def check_trains_here(cfg: config.Config) -> None:
    """ConfigError, before any run opens, for a trial's params its train step would refuse before training (as the
    train entry point does before its run opens): the backend's (`check_backend`, `train.distribute`'s modes), and
    multi_worker, which trains over several hosts where a sweep trains each trial on one. Each trial failed on them in
    turn, and the study was spent. Keras is loaded for it only where such a param is set."""
    inputs.check_configured_backend()  # each trial's train step loads Keras
    t = cfg.train
    if t.distribute == "multi_worker":
        raise config.ConfigError("train.distribute: 'multi_worker' trains over several hosts, but a sweep trains each "
                                 "trial on one: use auto (every GPU of this host), mirrored, data_parallel or none")
    if t.distribute in ("mirrored", "data_parallel") or config.needs_backend_check(t):
        import keras

        from pipeline.distribute import check_mode
        from pipeline.fitting import check_backend

        check_backend(cfg)
        check_mode(t.distribute, keras.backend.backend(), None)


def check_no_cluster() -> None:
    """ConfigError, before any run opens, where TF_CONFIG names several hosts: a sweep trains each trial on this host
    (its `workers` are processes here, or sweep commands on other hosts sharing the storage), and the other hosts of
    a cluster, started with one trial's params, could follow no other. Each trial waited for them
    ($PIPELINE_HOSTS_TIMEOUT, 10 minutes by default) and failed, one after another."""
    from pipeline.distribute import TF_CONFIG, cluster_from_env

    cluster = cluster_from_env(any_task=True)
    if cluster is not None:
        raise config.ConfigError(f"{TF_CONFIG}: names {cluster.workers} hosts, but a sweep trains each trial on one "
                                 f"host: unset {TF_CONFIG}; to share a sweep between hosts, start the same sweep "
                                 f"command on each (docs/sweeps.md#several-processes-and-hosts)")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- workers and the end of the study

def unfinished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)))


def work(plan: Plan, study: optuna.Study, storage: optuna.storages.RDBStorage) -> None:
    """Claim and run waiting trials until none is left waiting or running (a stale running trial is
    failed and queued again meanwhile), then finish the study if no other worker has."""
    parent_id, experiment_id = study.user_attrs["mlflow_parent_run_id"], study.user_attrs["mlflow_experiment_id"]
    waiting_for: set[int] = set()
    waiting: collections.deque[int] = collections.deque()  # `claim`'s, across claims
    while True:
        optuna.storages.fail_stale_trials(study)
        claimed = claim(study, storage, plan, waiting)
        if claimed is not None:
            with heartbeat(storage, claimed[1]):
                try:
                    run_trial(plan, study, claimed[0], parent_id, experiment_id)
                except (Interrupted, KeyboardInterrupt):
                    requeue_interrupted(study, storage, claimed[1])
                    raise
        elif unfinished(study):
            running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
            if running - waiting_for:  # say why this worker idles: a rerun after a kill waits up to GRACE_S here
                print(f"waiting for trial(s) {', '.join(map(str, sorted(running)))}: running in another worker, or "
                      f"stopped (a killed worker's trial is queued again {GRACE_S} s after its last heartbeat)",
                      flush=True)
            waiting_for = running
            time.sleep(POLL_S)
        else:
            break
    finish(plan, study, storage)


def requeue_interrupted(study: optuna.Study, storage: optuna.storages.RDBStorage, trial_id: int) -> None:
    """End a trial stopped by Ctrl-C or SIGTERM FAIL and queue a copy (its params, its retry history as it was) at
    once: a rerun starts it without waiting GRACE_S for its heartbeat to go stale, and a stop asked for uses none
    of the MAX_RETRY retries meant for dying workers (a trial interrupted three times was lost). Its runs (KILLED, a
    train run that had finished: FINISHED) are tagged `superseded_by_retry`."""
    frozen = storage.get_trial(trial_id)
    try:
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return
    except optuna.exceptions.UpdateFinishedTrialError:  # taken for dead, and queued again, already
        return
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=frozen.params,
                                              distributions=frozen.distributions, system_attrs=frozen.system_attrs))
    if run_id := frozen.user_attrs.get("mlflow_run_id"):  # a tag, not worth losing the signal's exit status over
        with contextlib.suppress(Exception):
            trials.supersede_trial_runs(run_id)
    print(f"trial {frozen.number}: interrupted; queued again, to run afresh when the sweep goes on", file=sys.stderr,
          flush=True)


def finish(plan: Plan, study: optuna.Study, storage: optuna.storages.RDBStorage) -> dict | None:
    """Register the best finished trial and compare the finished ones, once per study: the worker that
    creates the lock study `<study>.register` does it; the others return None. The lock records who took it and
    when, and at the end the registered version: a lock without one is a register running, or a killed one."""
    try:
        lock = optuna.create_study(storage=storage, study_name=f"{study.study_name}.register")
    except optuna.exceptions.DuplicatedStudyError:
        return None
    lock.set_user_attr("worker", worker_name())
    lock.set_user_attr("started", time.time())
    try:
        result = register_best(plan, study)
    except BaseException:
        optuna.delete_study(study_name=lock.study_name, storage=storage)  # let a rerun try again
        raise
    if result["decision"]:  # before the version, whose presence says the study is done (`registered`)
        lock.set_user_attr("registered_model", result["decision"].get("model_name"))
    lock.set_user_attr("registered_version", result["decision"]["version"] if result["decision"] else None)
    return result


# A register of the best trial takes seconds; one on another host silent this long is taken for dead.
REGISTER_STALE_S = 600


def registering_worker_gone(lock: optuna.Study) -> bool:
    """Whether the worker holding `<study>.register` without a registered version died (SIGKILL, a lost host)
    between taking it and recording what it registered. On this host its process is looked up; a worker on
    another host counts as gone REGISTER_STALE_S after it took the lock."""
    host, _, pid = str(lock.user_attrs.get("worker", "")).rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's live process
            return False
        return False
    return time.time() - float(lock.user_attrs.get("started", 0)) > REGISTER_STALE_S


def registered(storage: optuna.storages.RDBStorage, name: str) -> bool:
    """Whether study `name` is done: its lock study records what was registered (None where no trial finished)."""
    lock = f"{name}.register"
    return study_name_in(storage, lock) and "registered_version" in optuna.load_study(
        storage=storage, study_name=lock).user_attrs


def trial_table(study: optuna.Study) -> pd.DataFrame:
    """Optuna's trials table with each trial's MLflow runs: number, params, state, value, epochs, runs."""
    table = study.trials_dataframe(attrs=("number", "params", "state", "value", "user_attrs"))
    rows = []
    for row in table.to_dict("records"):
        run_id = row.get("user_attrs_mlflow_run_id")
        tags = trials.run_tags(run_id) if isinstance(run_id, str) else {}
        # a trial refused before its run opened (`Plan.refused_images`) has its reason in the study alone
        refused = row.get("user_attrs_failure_reason") if not isinstance(run_id, str) else None
        rows.append({"trial": row["number"], "state": row["state"],
                     **{k.removeprefix("params_"): v for k, v in row.items() if k.startswith("params_")},
                     OBJECTIVE: row["value"], "pruned_at_epoch": tags.get("pruned_at_epoch", ""),
                     "failure_reason": tags.get("failure_reason") or stopped(row["state"], tags) or (
                         refused if isinstance(refused, str) else ""),
                     "superseded_by_retry": tags.get("superseded_by_retry", ""), "run_id": run_id or "",
                     "train_run_id": tags.get("train_run_id", ""), "model_uri": tags.get("model_uri", ""),
                     "train_status": trials.run_status(tags["train_run_id"]) if tags.get("train_run_id") else ""})
    return pd.DataFrame(rows)


def stopped(state: str, tags: dict[str, str]) -> str:
    """What a trial's row in `trial_table` says of a trial stopped by a signal (Optuna holds it FAIL, its run KILLED
    with tag `interrupted_by`: `requeue_interrupted`), in place of a failure_reason: its row read as a trial that
    failed, unsaid; "" for any other."""
    if state != "FAIL" or "interrupted_by" not in tags:
        return ""
    return f"interrupted by {tags['interrupted_by']}" + ("; queued again" if tags.get("superseded_by_retry") == "true"
                                                         else "")


def best_of(done: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial:
    """The best of finished trials as register_best picks it: the highest value, the lowest-numbered of equals
    (ties are common on small validation sets; Optuna's study.best_trial takes whichever its storage's SQL
    returns first, as its ORDER BY has no tie-break)."""
    return max(done, key=lambda t: (t.value, -t.number))


STATE_WORDS = {"COMPLETE": "finished", "FAIL": "failed", "PRUNED": "pruned", "RUNNING": "running", "WAITING": "waiting",
               "INTERRUPTED": "interrupted", "DIVERGED": "diverged"}
DIVERGED_REASON = "TrainingDiverged: "  # the start of the failure_reason of a trial whose training diverged


def outcomes(table: pd.DataFrame) -> pd.Series:
    """How each trial of a `trial_table` ended: its state in the study, but INTERRUPTED for one stopped by a signal
    and DIVERGED for one whose training diverged (a NaN loss), which Optuna holds FAIL (`stopped`): counted with the
    trials that failed, a Ctrl-C read as a failure, and an lr range too high as broken trials."""
    if table.empty:
        return pd.Series(dtype=object)
    failed = table["state"] == "FAIL"
    interrupted = failed & table["failure_reason"].str.startswith("interrupted by ")
    diverged = failed & table["failure_reason"].str.startswith(DIVERGED_REASON)
    return table["state"].where(~interrupted, "INTERRUPTED").where(~diverged, "DIVERGED")


class NoTrialFinished(StepFailed):
    """No trial of the study finished: nothing to register. The command exits `status` (`run`): 1, 2 where every
    trial failed on its params (`refused_params`), as a command refused on bad input does, or 3 where every trial
    diverged (`every_trial_diverged`), as a train step that diverges does."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def refused_params(table: pd.DataFrame) -> str | None:
    """Where every trial of a `trial_table` failed on its params (a ConfigError: too few images for a data path that
    only a trial's prepare counted, say), the first one's reason, "trial 0: ConfigError: ..."; else None."""
    return every_trial_failed(table, "ConfigError: ")


def every_trial_diverged(table: pd.DataFrame) -> str | None:
    """Where every trial of a `trial_table` diverged (train's TrainingDiverged: a NaN loss, an lr range too high), the
    first one's reason, "trial 0: TrainingDiverged: training diverged: ... Lower train.lr ..."; else None."""
    return every_trial_failed(table, DIVERGED_REASON)


def every_trial_failed(table: pd.DataFrame, reason: str) -> str | None:
    """Where every trial of a `trial_table` failed with a failure_reason starting `reason`, the first one's, "trial 0:
    <its reason>"; else None."""
    if table.empty or not (table["state"] == "FAIL").all() or \
            not table["failure_reason"].str.startswith(reason).all():
        return None
    return f"trial {table['trial'].iloc[0]}: {table['failure_reason'].iloc[0]}"


def nothing_finished(study: optuna.Study, table: pd.DataFrame | None = None) -> str:
    """The one line of a study none of whose trials finished: the command's `error:` line and tag `failure_reason` of
    its sweep run, e.g. "no trial of study s-1a2b3c4d finished (2 failed, 1 pruned); nothing registered ...", or,
    where every trial failed on its params, "... nothing registered: every trial's params were refused, as trial 0:
    ConfigError: ...", or diverged, "... every trial diverged, as trial 0: TrainingDiverged: ...". `table`: its
    `trial_table`, where read already."""
    table = trial_table(study) if table is None else table
    counts = collections.Counter(outcomes(table))
    outcome = ", ".join(f"{n} {STATE_WORDS.get(state, state.lower())}" for state, n in counts.items())
    if refused := refused_params(table):
        return (f"no trial of study {study.study_name} finished ({outcome}); nothing registered: every trial's params "
                f"were refused, as {refused}")
    if diverged := every_trial_diverged(table):
        return (f"no trial of study {study.study_name} finished ({outcome}); nothing registered: every trial "
                f"diverged, as {diverged}")
    return (f"no trial of study {study.study_name} finished ({outcome or 'no trials'}); nothing registered: the "
            f"trials table (trials.csv) says why: each trial's failure_reason (its run's tag), or pruned_at_epoch")


def no_trial_finished_error(study: optuna.Study) -> NoTrialFinished:
    table = trial_table(study)
    status = 2 if refused_params(table) else 3 if every_trial_diverged(table) else 1
    return NoTrialFinished(nothing_finished(study, table), status)


def register_best(plan: Plan, study: optuna.Study) -> dict:
    """Inside the sweep's parent run: register the best COMPLETE trial, compare the COMPLETE ones (never a try
    superseded by its retry),
    record the trials table; end the parent run FINISHED, or, where no trial finished, FAILED with tag
    `failure_reason` (`nothing_finished`; the command that opened it, if still on, ends it so itself: `run`)."""
    from pipeline import register

    confirm_late_tells(study)
    results = trial_table(study)
    done = results[(results["state"] == "COMPLETE") & (results["train_status"] == "FINISHED")
                   & (results["superseded_by_retry"] != "true")]  # Optuna holds a superseded try FAIL: never so
    with trials.parent_run(study.user_attrs["mlflow_parent_run_id"], "FINISHED" if len(done) else "FAILED"):
        best = None if done.empty else done.loc[done[OBJECTIVE].idxmax()]  # rows in trial order: as best_of
        decision, comparison = None, None
        if best is None:
            set_tags({"failure_reason": nothing_finished(study, results)})
        else:
            best_cfg = plan.load(plan.values(study.trials[int(best["trial"])]), f"trial {best['trial']}")
            with step_run(best_cfg, "register"):
                decision = register.run(best_cfg, best["model_uri"])
            # its equals in trial order, as `best` is chosen: the top row is the trial registered
            comparison = compare.run(run_ids=done["train_run_id"].tolist(), metric=OBJECTIVE,
                                     in_given_order=True)["run_id"]
            log_metrics({"best_trial_val_acc": float(best[OBJECTIVE]),
                         "best_trial_test_acc": trials.final_metric(best["run_id"], "test_acc")})
            set_tags({"best_trial_run_id": best["run_id"], "best_trial": str(best["trial"]),
                      "registered_model": best_cfg.register.model_name,  # its own: register.model_name may be swept
                      "registered_version": str(decision["version"]),
                      "alias_moved": str(decision["alias_moved"]).lower()})
        counts = outcomes(results).value_counts().to_dict()
        summary = results.drop(columns=["run_id", "train_run_id", "model_uri", "train_status", "superseded_by_retry"])
        shown = [key for key in plan.space if key in summary]
        summary[shown] = summary[shown].astype(str)  # 1e-06, not 0.0000
        log_text(results.to_csv(index=False), "trials.csv")
        set_tags({"trials_" + state.lower(): str(n) for state, n in counts.items()})
        outcome = ", ".join(f"{n} {state.lower()}" for state, n in counts.items())
        winner = "none" if best is None else f"trial {best['trial']}"
        set_tags({"mlflow.note.content": fit_note(f"Optuna study `{study.study_name}`: {len(results)} trials of "
                  f"`{plan.spec_path}` ({outcome}); best: {winner}.\n\n" + markdown_table(summary), "trials.csv")})
        print(markdown_table(summary), end="")
    return {"trials": results, "best": best, "decision": decision, "comparison_run_id": comparison}


# ---------------------------------------------------------------- the command

def adopt_own_run(study: optuna.Study) -> None:
    """Under `mlflow run`, a command that joins a study already has a run of its own: make it a child
    of the sweep run (tag step = 'sweep-worker'), so that it does not stand alone in the experiment."""
    if "mlflow_parent_run_id" in study.user_attrs:
        trials.adopt_wrapper_run({"mlflow.parentRunId": study.user_attrs["mlflow_parent_run_id"],
                                  "step": "sweep-worker", "optuna_study": study.study_name,
                                  "mlflow.runName": f"sweep-worker {worker_name()}"})


STOP_S = 10  # how long the workers of an interrupted command have to stop on a Ctrl-C that reached them too


def stop_workers(procs: list[subprocess.Popen], signum: int | None) -> None:
    """Stop the worker processes of a command stopped by signal `signum` (None: by an error) and wait for them.
    A Ctrl-C in a terminal reaches them too: they have STOP_S to end on it (a second signal while Python still
    holds the first prints a traceback), then those still running get `signum` (SIGTERM after an error)."""
    deadline = time.monotonic() + (STOP_S if signum else 0)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum or signal.SIGTERM)
    for p in procs:
        p.wait()


def worker_command(args: argparse.Namespace, storage: str, study: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.sweep", f"--spec={args.spec}", f"--overrides={args.overrides or ''}",
            f"--storage={storage}", f"--study={study}", "--workers=1", "--join"]  # a value may begin with a dash


def run(args: argparse.Namespace) -> int:
    """Check everything, join (or start) the study, run its trials here with `workers` processes.
    Returns the exit status: 0, or 1 if no trial of the study finished, 2 if each failed on its params (said in one
    line: `no_trial_finished`)."""
    try:
        workers = int(args.workers)
    except ValueError:
        raise config.ConfigError(f"workers: must be an integer, got {args.workers!r}") from None
    if workers < 1:
        raise config.ConfigError(f"workers: must be >= 1, got {workers}")
    if args.study and args.study != args.study.strip():  # " " named a study of a space; "s " another than "s"
        raise config.ConfigError(f"study: {args.study!r} " + (
            "is blank; give a name, or leave it empty for the spec's name and digest" if not args.study.strip()
            else "begins or ends with spaces; give the name without them"))
    if args.storage and not args.storage.strip():  # as study: " " is a slip, not the default an empty one gives
        raise config.ConfigError(f"storage: {args.storage!r} is blank; give an SQLAlchemy URL, or leave it empty for "
                                 f"optuna.db beside the tracking store")
    if args.study and args.study.endswith(".register"):  # study X's lock (`finish`), which starting X deletes
        study = args.study.removesuffix(".register")
        raise config.ConfigError(f"study: {args.study} is the record of who registers study {study}, not a study; "
                                 f"pass -P study={study}, or another name")
    plan = Plan(args.spec, args.overrides, say=None if args.join else lambda line: print(line, flush=True))
    plan.check_prepared_images()  # a path's count, where a prepare run logged it
    check_no_cluster()
    check_checkpoint_root()  # each trial's train run locks its folder there
    if plan.held_out_varies and not args.join:  # once, not in every worker process
        hint = ("; set train.validation_seed (in the spec's overrides) to validate every trial on the same images"
                if "train.seed" in plan.held_out_varies else "")
        print(f"warning: the trials differ in {', '.join(plan.held_out_varies)}, and so do the held-out images "
              "their val_acc is measured on: the best trial is chosen on different images (the comparison's "
              f"val_data column shows each trial's){hint}", file=sys.stderr, flush=True)
    if not args.join and any(c.data.source == "cifar10" for c in plan.configs):
        data.fetch_cifar10()  # found (verified) or downloaded once, before any run: offline, one line here, not
        #                       every trial failing on the download in turn
    storage_url = args.storage or default_storage()
    name = args.study or default_study(plan)
    if not args.join:
        check_storage_not_gone(storage_url, name)
    storage = open_storage(storage_url)
    if args.join:  # a worker process of a `--workers N` command: the study is set up
        with storage_failures(storage_url):
            study, _ = join_study(plan, storage, name)
            work(plan, study, storage)
        return 0
    existed = study_name_in(storage, name)
    if not existed and not args.study:
        for line in left_behind(plan, storage, name):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    lock = optuna.load_study(storage=storage, study_name=f"{name}.register") if existed and study_name_in(
        storage, f"{name}.register") else None
    if lock:
        study = optuna.load_study(storage=storage, study_name=name)
        check_fingerprint(plan, study)
    if lock and "registered_version" not in lock.user_attrs:  # its register runs now, or its worker was killed
        worker = lock.user_attrs.get("worker", "a worker")
        if not registering_worker_gone(lock):
            raise config.ConfigError(f"study: {name} is being registered by {worker} right now; rerun once it "
                                     "has finished")
        print(f"the worker registering study {name} ({worker}) stopped before it finished; registering again",
              flush=True)
        with contextlib.suppress(KeyError):  # a rerun alongside removed it first
            optuna.delete_study(study_name=lock.study_name, storage=storage)
        lock = None  # on as a rerun of a study not done: finish() registers
    if lock:
        adopt_own_run(study)
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):  # as the run that ended it said
            n = len(study.trials)
            outcome = "its 1 trial did not finish" if n == 1 else f"none of its {n} trials finished"
            return no_trial_finished(NoTrialFinished(
                f"study {name} in {safe_url(storage_url)} is done, but {outcome}; nothing registered. Pass another "
                "-P study= for a new sweep",
                no_trial_finished_error(study).status))
        model = lock.user_attrs.get("registered_model")  # studies done before it was recorded have none
        version = f"{f'{model} v' if model else 'version '}{lock.user_attrs.get('registered_version')}"
        print(f"study {name} in {safe_url(storage_url)} is done: {trials_said(len(study.trials))}; "
              f"{best_said(plan, study, version)}; pass another -P study= for a new sweep")
        return 0
    if workers == 1:  # this process trains the trials: its backend and devices are the trials'
        plan.check_replicas()
    base = plan.configs[0]
    made = [] if existed else prepare_shared_data(plan)  # its first command: refused now where its data is too few
    study, leads = join_study(plan, storage, name)
    print(f"{'started' if leads else 'joined'} Optuna study {name} in {safe_url(storage_url)} "
          f"({plan.sampler_name} sampler, {'no' if plan.pruner_name == 'none' else plan.pruner_name} pruner, "
          f"{trials_said(plan.trials)}"
          f"{'' if leads else f', {unfinished(study)} left to run'}); "  # a rerun after a Ctrl-C: what it goes on with
          f"{dashboard_hint(storage.url)}", flush=True)  # the driver it opened
    try:
        with contextlib.ExitStack() as stack:
            if leads:
                try:
                    parent = stack.enter_context(open_run("sweep", experiment=base.tracking.experiment,
                                                          run_name=f"sweep-{name}"))
                    stack.enter_context(storage_failures(storage_url))  # inside the run: its reason is the line
                    log_params({"sweep.spec": args.spec, "sweep.study": name, "sweep.storage": safe_url(storage_url),
                                "sweep.sampler": plan.sampler_name, "sweep.pruner": plan.pruner_name,
                                "sweep.trials": plan.trials, "sweep.overrides": plan.extra_overrides})
                    log_dict(plan.spec, "sweep.yaml")
                    set_tags({"optuna_study": name, "optuna_storage": safe_url(storage_url)})
                    lead(plan, study, parent.info.run_id, parent.info.experiment_id)
                    for run_id in made:  # made for this sweep: shown under its run, as ever
                        trials.set_run_tags(run_id, {"mlflow.parentRunId": parent.info.run_id})
                except BaseException:  # (a trashed tracking.experiment, Ctrl-C) a study left without its fingerprint
                    #                    would hold up every rerun of this command for a minute, then refuse it
                    with contextlib.suppress(Exception):  # the original error is the one to report
                        if "fingerprint" not in study.user_attrs:
                            optuna.delete_study(study_name=name, storage=storage)
                    raise
            else:
                stack.enter_context(storage_failures(storage_url))
                adopt_own_run(study)
            # a worker with no trial to claim only waits for the others (its TensorFlow start-up and storage polls
            # for nothing): at most one per trial left, waiting or running (a killed worker's is queued again)
            if workers > max(left := unfinished(study), 1):
                asked, workers = workers, max(left, 1)
                print(f"workers: starting {workers}, not {asked}: study {name} has {left} trial"
                      f"{'' if left == 1 else 's'} left to run (waiting or running)", flush=True)
            if workers == 1:
                work(plan, study, storage)
            else:
                env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
                # The workers run in this command's folder, so that relative paths (the spec, its base, a data.source)
                # name the same files as here (from the project root a spec beside the user was "file not found"),
                # importing this project's pipeline wherever that folder is.
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(config.PROJECT_ROOT), env.get("PYTHONPATH")]))
                procs: list[subprocess.Popen] = []
                try:
                    for _ in range(workers):
                        procs.append(subprocess.Popen(worker_command(args, storage_url, name), env=env))
                    codes = [p.wait() for p in procs]
                except BaseException as exc:  # SIGTERM to this process alone (kill, timeout), Ctrl-C: stop the workers
                    #                               too, or they go on with the sweep, and register its best, after it
                    #                               said it stopped
                    stop_workers(procs, getattr(exc, "signum", signal.SIGINT)
                                 if isinstance(exc, (Interrupted, KeyboardInterrupt)) else None)
                    raise
                if any(codes):  # one killed (out of memory, say): the others retry its trial and finish the study
                    if not registered(storage, name):
                        raise StepFailed(f"sweep workers exited with {codes} before study {name} was done; rerun the "
                                         f"same command to go on with it")
                    print(f"warning: sweep workers exited with {codes}; the others finished study {name}",
                          file=sys.stderr, flush=True)
                finish(plan, study, storage)  # a no-op: one of the workers has finished the study
            if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                raise no_trial_finished_error(study)
    except NoTrialFinished as exc:  # raised inside the sweep run, where this command leads: it ended FAILED with it
        return no_trial_finished(exc)
    print(f"study {name}: {best_said(plan, study)}")
    return 0


def trials_said(n: int) -> str:
    """ "1 trial", "4 trials": a one-trial sweep's lines said "1 trials"."""
    return f"{n} trial{'' if n == 1 else 's'}"


def best_said(plan: Plan, study: optuna.Study, registered: str = "") -> str:
    """Where a done study's best trial is, for the command's last line: "best trial 1 (train.lr=0.1) val_acc 0.4902,
    run <id>, registered cifar10-resnet v1 (@champion moved to it); its sweep run <id> holds trials.csv and the
    comparison" (the trial's number and val_acc alone left the user to search the store for the rest). The best by
    registration's rule (`best_of`), not study.best_trial's (no tie-break); the rest read from the sweep run's tags,
    which the worker that finished the study wrote (another process, under `workers N`), or, where this tracking store
    has no such run, `registered` ("cifar10-resnet v1", the study's own record) alone."""
    best = best_of(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    parent = study.user_attrs["mlflow_parent_run_id"]
    tags = trials.run_tags(parent) if trials.run_stage(parent) is not None else {}
    said = f"best trial {best.number} ({label(plan.values(best))}) {OBJECTIVE} {best.value:.4f}"
    if tags.get("best_trial_run_id"):
        said += f", run {tags['best_trial_run_id']}"
    if tags.get("registered_version"):
        alias = plan.load(plan.values(best), f"trial {best.number}").register.alias
        said += (f", registered {tags.get('registered_model', '')} v{tags['registered_version']} (@{alias} "
                 f"{'moved to it' if tags.get('alias_moved') == 'true' else 'stays off it'})")
    elif registered:
        said += f", registered {registered}"
    return f"{said}; its sweep run {parent} holds trials.csv and the comparison" if tags else said


def prepare_shared_data(plan: Plan) -> list[str]:
    """Prepare each distinct dataset of the trials once, before the study and its sweep run are made: a grid's, or the
    one every trial of a space shares (its first trials each prepared it, side by side under `workers`); a space
    drawing among several datasets has each prepared by the first trial that draws it. A path's count is then known:
    trials too many for it are refused (`Plan.check_prepared_images`, ConfigError) before any study or sweep run, as a
    rerun refuses them (each failed in the study, and the sweep run ended FAILED, exit 1). The ids of the prepare runs
    made here (a finished one reused is not), to be nested under the sweep run once it opens."""
    # keyed once per data params (its key digests a path's whole file or folder), not once per trial
    shared = {json.dumps(c.flat("data"), sort_keys=True): c for c in plan.configs}
    datasets = {prepare.prepare_key(c): c for c in shared.values()}
    made = []
    for key, cfg in datasets.items() if plan.grid or len(datasets) == 1 else []:
        if prepare.find_prepared(key) is None:
            made.append(prepare_run_id(prepare.ensure_prepared(cfg)))
        else:
            prepare.ensure_prepared(cfg)  # says it reuses it
    plan.check_prepared_images()
    return [run_id for run_id in made if run_id]


def no_trial_finished(exc: NoTrialFinished) -> int:
    """Say `exc` (no trial of the study finished) on the console, and in tag `failure_reason` of the run `mlflow run`
    opened for this command (unless it has one: the sweep run's own, as `_ended_with_reason` ended it); its exit
    status, 1, or 2 where every trial failed on its params."""
    print(f"error: {exc}", file=sys.stderr)
    if wrapper := os.environ.get("MLFLOW_RUN_ID"):
        tag_failure(wrapper, str(exc), exc)
    return exc.status


def main() -> None:
    parser = config.entry_point_parser(
        "sweep", __doc__.split("\n")[0], spec="sweep file (default: %(default)s); docs/sweeps.md#the-spec-file",
        overrides="key=value pairs applied to every trial, last",
        storage="Optuna storage URL; empty: optuna.db beside mlflow.db",
        study="Optuna study name; empty: the spec's name and a digest of it, its base params and the overrides (a "
              "rerun of the same command goes on with its study)",
        workers="worker processes on this host (default: %(default)s; no more than the study's trials left)")
    # a worker of --workers N; a value (`-P join=1`, passed on as `--join 1`) is taken, to be refused naming --join
    parser.add_argument("--join", nargs="?", const=True, default=False, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.join is not True and args.join is not False:
        parser.error(f"--join takes no value, got {args.join!r}: it is how a sweep starts the worker processes of "
                     "--workers N, no parameter a user gives")
    sys.exit(run(args))


if __name__ == "__main__":
    cli(main)
