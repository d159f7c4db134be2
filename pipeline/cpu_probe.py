"""Which precision and XLA setting trains fastest on this CPU, measured rather than guessed.

No rule from CPU flags holds across CPUs. Measured with the quick model's train step (images/s, 2-core machines):
bfloat16 without XLA was 1.4x float32 on an AMX Xeon, but 0.7x float32 on an Intel Xeon with AVX512-BF16 and no
AMX exposed (family 6, model 207, 2026-12-04, this probe: float32 183, float32 + XLA 144, bfloat16 129, bfloat16 +
XLA 149); XLA lifted float32 on a Zen 3 EPYC (790 vs 628) and slowed it on that Xeon. So where `train.precision` or
`train.jit_compile` is `auto` on a CPU (TensorFlow, one device), the run's own model is built under each
candidate and a few of its train steps timed on a batch of its own images; the fastest is taken, and the result
is kept in `cpu-fast-path.json` under `$PIPELINE_CACHE_DIR` (default `~/.cache/cifar10-resnet`), keyed by the CPU,
its core count, the library versions and what the step's speed depends on (the model params, batch size,
augmentation). A small stand-in net ranked them otherwise on that Xeon (bfloat16 first), hence the real model.
The first run of a model on a machine spends its compiles and a few steps per candidate on it; later runs read
the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

Candidate = tuple[str, bool]  # (dtype policy, jit_compile)
STEPS, ROUNDS = 3, 2


def cache_file() -> Path:
    folder = os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "cifar10-resnet"  # set empty: unset
    return Path(folder) / "cpu-fast-path.json"


def machine_key(candidates: list[Candidate], job: str) -> str:
    """The CPU (model name and flags), its cores, the libraries, the candidates and `job` (what else the step's
    speed depends on): what the ranking depends on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = "|".join(next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(k)), "")
                       for k in ("model name", "flags"))
    except OSError:
        cpu = platform.processor()
    import tensorflow as tf

    described = [cpu, os.cpu_count(), tf.__version__, keras.__version__, sorted(map(list, candidates)), job]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def measure(candidates: list[Candidate], build: Callable[[str, bool], keras.Model], x: np.ndarray,
            y: np.ndarray) -> dict[str, float]:
    """Images/s of a train step of `build(precision, jit)` on (x, y) under each candidate: the best of ROUNDS
    interleaved rounds of STEPS steps, after one step that compiles. The global dtype policy is restored."""
    models = {}
    previous = keras.mixed_precision.global_policy()
    try:
        for precision, jit in candidates:
            keras.mixed_precision.set_global_policy(precision)
            models[label((precision, jit))] = build(precision, jit)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    for model in models.values():
        model.train_on_batch(x, y)
    speed = dict.fromkeys(models, 0.0)
    for _ in range(ROUNDS):
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(STEPS):
                model.train_on_batch(x, y)
            speed[name] = max(speed[name], len(x) * STEPS / (time.perf_counter() - start))
    return {name: round(s, 1) for name, s in speed.items()}


def label(candidate: Candidate) -> str:
    return f"{candidate[0]}{' + XLA' if candidate[1] else ''}"


def fastest(candidates: list[Candidate], job: str, build: Callable[[str, bool], keras.Model], x: np.ndarray,
            y: np.ndarray) -> tuple[Candidate, dict[str, float], bool]:
    """(the fastest candidate, images/s of each, whether it came from the cache). One candidate: itself, unmeasured.
    `job`: a digest of what else the step's speed depends on; `build`, `x`, `y`: see `measure`."""
    if len(candidates) == 1:
        return candidates[0], {}, False
    path, key = cache_file(), machine_key(candidates, job)
    cached, speeds = _cached(path, key, candidates)
    hit = speeds is not None
    if not hit:
        speeds = measure(candidates, build, x, y)
        cached[key] = {"images_per_second": speeds, "date": time.strftime("%Y-%m-%d"), "host": platform.node()}
        try:  # a read-only home leaves the choice measured, just not kept
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(f".{path.name}.{os.getpid()}")
            part.write_text(json.dumps(cached, indent=1))
            part.replace(path)
        except OSError:
            pass
    best = max(candidates, key=lambda c: speeds[label(c)])
    return best, speeds, hit


def _cached(path: Path, key: str, candidates: list[Candidate]) -> tuple[dict, dict[str, float] | None]:
    """(the cache file's entries, {} if it is unreadable; the images/s of each candidate kept under `key`, or None)."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    cached = cached if isinstance(cached, dict) else {}
    speeds = cached.get(key, {}).get("images_per_second") if isinstance(cached.get(key), dict) else None
    hit = isinstance(speeds, dict) and set(speeds) == {label(c) for c in candidates}
    return cached, speeds if hit else None


def cached_fastest(candidates: list[Candidate], job: str) -> Candidate | None:
    """The candidate `fastest` would take, where that needs no measuring (one candidate, or the cache holds them);
    None where only measuring would tell."""
    if len(candidates) == 1:
        return candidates[0]
    speeds = _cached(cache_file(), machine_key(candidates, job), candidates)[1]
    return max(candidates, key=lambda c: speeds[label(c)]) if speeds else None
