"""CPU runtime settings: the quick profile's train step under each of them, side by side.

Sides: TensorFlow's defaults; its pooling BFC allocator (`TF_CPU_ALLOCATOR_USE_BFC=true`); that allocator
with XLA's CPU convolutions and matmuls handed to XNNPACK (`XLA_FLAGS=--xla_cpu_use_xnnpack=true`); Keras on
JAX instead of TensorFlow (`KERAS_BACKEND=jax`, XLA as well).
Importing `pipeline` sets `TF_CPU_ALLOCATOR_USE_BFC=true` and leaves `XLA_FLAGS` alone (see pipeline/__init__.py;
XNNPACK measured no faster on a 2-core EPYC, bench/results/cpu_runtime.md). TensorFlow reads
both variables once per process, so each side runs in its own child process; the sides alternate, round
after round, so that a busy spell of a shared machine hits them all. Each child times `train_on_batch` on real
images after warm-up steps and counts the minor page faults and kernel time of the timed steps. Every side times
the same step, float32 + XLA (`OVERRIDES`), whatever the profile's `auto` picks for training on the machine.
Writes bench/results/cpu_runtime.json and bench/results/cpu_runtime.md.

Usage: python -m bench.cpu_runtime [--rounds 3] [--steps 40] [--sides default,bfc,bfc+xnnpack,jax]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import pandas as pd

from bench.machine import check_results_folder, child_result, save_results, stamp

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = "params/quick.yaml"
# The step every side times, pinned: the profile's `auto` is measured per machine, on TensorFlow only
# (pipeline/cpu_probe.py), and can pick a step without XLA, where XNNPACK (XLA's) changes nothing and JAX (always
# XLA) would time another program than the TensorFlow sides.
OVERRIDES = ["train.precision=float32", "train.jit_compile=true"]
# key: (label, environment of the child)
SIDES = {
    "default": ("TensorFlow's defaults", {"KERAS_BACKEND": "tensorflow", "TF_CPU_ALLOCATOR_USE_BFC": "false",
                                          "XLA_FLAGS": "--xla_cpu_use_xnnpack=false"}),
    "bfc": ("BFC allocator", {"KERAS_BACKEND": "tensorflow", "TF_CPU_ALLOCATOR_USE_BFC": "true",
                              "XLA_FLAGS": "--xla_cpu_use_xnnpack=false"}),
    "bfc+xnnpack": ("BFC allocator + XNNPACK", {"KERAS_BACKEND": "tensorflow", "TF_CPU_ALLOCATOR_USE_BFC": "true",
                                                "XLA_FLAGS": "--xla_cpu_use_xnnpack=true"}),
    "jax": ("Keras on JAX", {"KERAS_BACKEND": "jax", "TF_CPU_ALLOCATOR_USE_BFC": "true",
                             "XLA_FLAGS": "--xla_cpu_use_xnnpack=false"}),
}
ENV_KEYS = ("KERAS_BACKEND", "TF_CPU_ALLOCATOR_USE_BFC", "XLA_FLAGS")


def describe(side: str) -> str:
    """A side's label with the environment it runs under."""
    label, env = SIDES[side]
    return f"{label} ({', '.join(f'{key}={value}' for key, value in env.items())})"


def _proc_counters() -> tuple[int, float]:
    """(minor page faults, kernel CPU seconds) of this process so far."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def child(steps: int) -> dict:
    """Time the quick profile's train step in this process (its settings chosen by the environment)."""
    import keras

    from bench.benchmark import load_images
    from pipeline import config, fitting
    from pipeline.distribute import distribution

    cfg = config.load(PROFILE, OVERRIDES)
    dataset = load_images(5000)
    batch = cfg.train.batch_size
    model = fitting.compile_model(cfg, dataset, distribution("none"), 45000)
    x, y = dataset.x_train, keras.utils.to_categorical(dataset.y_train, len(dataset.class_names))
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x) - batch + 1, batch)]
    for xb, yb in batches[:5]:  # compile and warm up
        model.train_on_batch(xb, yb)
    faults, kernel = _proc_counters()
    cpu, start = time.process_time(), time.perf_counter()
    for i in range(steps):
        model.train_on_batch(*batches[i % len(batches)])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    faults, kernel = (a - b for a, b in zip(_proc_counters(), (faults, kernel), strict=True))
    return {"images_per_second": round(steps * batch / wall, 1), "page_faults_per_step": round(faults / steps),
            "kernel_share_of_cpu_percent": round(100 * kernel / cpu, 1), "jit_compile": bool(model.jit_compile),
            "dtype_policy": model.dtype_policy.name, "backend": keras.backend.backend(),
            "env": {key: os.environ.get(key, "") for key in ENV_KEYS}}


def run_child(side: str, steps: int) -> dict:
    wanted = SIDES[side][1]
    result = child_result("bench.cpu_runtime", "--child", "--steps", str(steps), env=wanted, timeout=900)
    # importing pipeline must not override what the environment sets
    if result["env"] != wanted or result["backend"] != wanted["KERAS_BACKEND"]:
        raise RuntimeError(f"the child ran with {result['env']}, not {wanted}")
    if (result["dtype_policy"], result["jit_compile"]) != ("float32", True):  # every side the same step
        raise SystemExit(f"{side}: the child timed a {result['dtype_policy']} step with jit_compile "
                         f"{result['jit_compile']}, not float32 + XLA ({' '.join(OVERRIDES)}); no results written")
    return result


def write_markdown(results: dict, path: Path) -> None:
    rows = []
    for side, runs in results["sides"].items():
        rows.append([describe(side), statistics.median(r["images_per_second"] for r in runs),
                     ", ".join(f"{r['images_per_second']:.0f}" for r in runs),
                     statistics.median(r["page_faults_per_step"] for r in runs),
                     statistics.median(r["kernel_share_of_cpu_percent"] for r in runs)])
    table = pd.DataFrame(rows, columns=["settings", "images/s (median)", "images/s per round",
                                        "page faults per step", "kernel share of CPU time (%)"])
    first = next(iter(results["sides"].values()))[0]
    path.write_text("\n".join([
        "# CPU runtime settings", "",
        f"Machine: {results['machine']}. Date: {results['date']}. `python -m bench.cpu_runtime --rounds "
        f"{results['rounds']} --steps {results['steps']} --sides {','.join(results['sides'])}`.", "",
        f"Train step of the quick profile ({PROFILE} with {' '.join(OVERRIDES)}: {first['dtype_policy']}, XLA "
        f"{first['jit_compile']}, on every side), "
        f"batch {results['batch']}, {results['steps']} timed steps per child process after 5 warm-up steps; "
        "the sides alternate in separate processes.", "",
        table.to_markdown(index=False), "",
        *(f"- {SIDES[b][0]} over {SIDES[a][0]}: **{ratio:.2f}x** (ratio of the medians; "
          f"faster in {wins} of {results['rounds']} rounds)" for a, b, ratio, wins in results["speedups"]), ""]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--child", action="store_true", help="internal: time one side, print RESULT <json>")
    args = parser.parse_args()
    if args.child:
        print("RESULT", json.dumps(child(args.steps)), flush=True)
        return
    check_results_folder(RESULTS)
    if args.rounds < 1 or args.steps < 1:
        parser.error(f"--rounds and --steps: must be >= 1, got {args.rounds} and {args.steps}")
    chosen = args.sides.split(",")
    unknown = [s for s in chosen if s not in SIDES]
    if unknown or len(chosen) < 2 or len(set(chosen)) < len(chosen):  # a repeated side is its own "baseline"
        parser.error(f"--sides: two or more different ones of {', '.join(SIDES)}, got {args.sides!r}")
    sides: dict[str, list[dict]] = {side: [] for side in chosen}
    for round_ in range(args.rounds):
        for side in chosen:
            sides[side].append(run_child(side, args.steps))
            print(f"round {round_ + 1}: {side}: {json.dumps(sides[side][-1])}", flush=True)
    speedups = []
    for a, b in zip(chosen, chosen[1:], strict=False):  # each side against the one before it
        ratio = (statistics.median(r["images_per_second"] for r in sides[b])
                 / statistics.median(r["images_per_second"] for r in sides[a]))
        wins = sum(rb["images_per_second"] > ra["images_per_second"]
                   for ra, rb in zip(sides[a], sides[b], strict=True))
        speedups.append((a, b, round(ratio, 3), wins))
    from pipeline import config

    results = {**stamp(), "rounds": args.rounds, "steps": args.steps, "batch": config.load(PROFILE).train.batch_size,
               "sides": sides, "speedups": speedups}
    save_results(RESULTS, "cpu_runtime", results, write_markdown)


if __name__ == "__main__":
    main()
