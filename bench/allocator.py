"""TensorFlow's CPU allocator: the quick profile's train step with the default allocator vs the pooling BFC one.

`pipeline` sets `TF_CPU_ALLOCATOR_USE_BFC=true` when it is imported (see pipeline/__init__.py). TensorFlow reads
the variable once per process, so each side runs in its own child process; the two alternate, round after
round, so that a busy spell of a shared machine hits both. Each child times `train_on_batch` (XLA, as
`fit` runs it here) on real images after warm-up steps and counts the minor page faults and kernel time of
the timed steps. Writes bench/results/allocator.json and bench/results/allocator.md.

Usage: python -m bench.allocator [--rounds 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from bench.machine import machine

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]
PROFILE = "params/quick.yaml"
SIDES = {"default allocator (TF_CPU_ALLOCATOR_USE_BFC=false)": "false",
         "BFC allocator (TF_CPU_ALLOCATOR_USE_BFC=true, as pipeline sets it)": "true"}


def _proc_counters() -> tuple[int, float]:
    """(minor page faults, kernel CPU seconds) of this process so far."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def child(steps: int) -> dict:
    """Time the quick profile's train step in this process (its allocator chosen by the environment)."""
    import keras

    from bench.benchmark import load_images
    from pipeline import config, fitting
    from pipeline.distribute import distribution

    cfg = config.load(PROFILE)
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
            "dtype_policy": model.dtype_policy.name, "allocator_env": os.environ.get("TF_CPU_ALLOCATOR_USE_BFC")}


def run_child(value: str, steps: int) -> dict:
    env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": value}
    out = subprocess.run([sys.executable, "-m", "bench.allocator", "--child", "--steps", str(steps)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=900, check=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:])
    if result["allocator_env"] != value:
        raise RuntimeError(f"the child ran with TF_CPU_ALLOCATOR_USE_BFC={result['allocator_env']}, not {value}")
    return result


def write_markdown(results: dict, path: Path) -> None:
    rows = []
    for name, runs in results["sides"].items():
        rows.append([name, statistics.median(r["images_per_second"] for r in runs),
                     ", ".join(f"{r['images_per_second']:.0f}" for r in runs),
                     statistics.median(r["page_faults_per_step"] for r in runs),
                     statistics.median(r["kernel_share_of_cpu_percent"] for r in runs)])
    table = pd.DataFrame(rows, columns=["allocator", "images/s (median)", "images/s per round",
                                        "page faults per step", "kernel share of CPU time (%)"])
    first = next(iter(results["sides"].values()))[0]
    path.write_text("\n".join([
        "# CPU allocator", "",
        f"Machine: {results['machine']}. Date: {results['date']}. `python -m bench.allocator --rounds "
        f"{results['rounds']} --steps {results['steps']}`.", "",
        f"Train step of the quick profile ({PROFILE}: {first['dtype_policy']}, XLA {first['jit_compile']}), "
        f"batch {results['batch']}, {results['steps']} timed steps per child process after 5 warm-up steps; "
        "the sides alternate in separate processes.", "",
        table.to_markdown(index=False), "",
        f"Speed-up of the BFC allocator: **{results['speedup']:.2f}x** (ratio of the medians).", ""]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", action="store_true", help="internal: time one side, print RESULT <json>")
    args = parser.parse_args()
    if args.child:
        print("RESULT", json.dumps(child(args.steps)), flush=True)
        return
    sides: dict[str, list[dict]] = {name: [] for name in SIDES}
    for round_ in range(args.rounds):
        for name, value in SIDES.items():
            sides[name].append(run_child(value, args.steps))
            print(f"round {round_ + 1}: {name}: {json.dumps(sides[name][-1])}", flush=True)
    medians = [statistics.median(r["images_per_second"] for r in runs) for runs in sides.values()]
    from pipeline import config

    results = {"machine": f"{machine()} ({platform.platform()})", "date": datetime.date.today().isoformat(),
               "rounds": args.rounds, "steps": args.steps, "batch": config.load(PROFILE).train.batch_size,
               "sides": sides, "speedup": round(medians[1] / medians[0], 3)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "allocator.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, RESULTS / "allocator.md")
    print((RESULTS / "allocator.md").read_text())


if __name__ == "__main__":
    main()
