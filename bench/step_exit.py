"""What a step's process costs after its work is done: `main` on the tiny profile, with and without the
freeze at exit that `pipeline.tracking.cli` registers (gc.freeze, so that the interpreter's final collections
skip the objects alive then: TensorFlow's, Keras's and MLflow's).

Sides: "freeze" runs `python -m pipeline.main` as `mlflow run` does; "collect" runs the same module from a
wrapper whose first exit handler (so the last to run) calls gc.unfreeze, which gives the interpreter back its
final collections over every object. The sides alternate, round after round, each child on its own new SQLite
store. Each child's time from its last line of output to its exit, its wall time and its CPU time (user +
system) are measured here. Writes bench/results/step_exit.json and bench/results/step_exit.md.

Usage: python -m bench.step_exit [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench.machine import check_results_folder, save_results, stamp

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]
ARGS = ["--params", "params/tiny.yaml", "--epochs", "1", "--data", "", "--resume", "never",
        "--overrides", "data.synthetic_train=512 data.synthetic_test=128"]
WRAPPER = ("import atexit, gc, runpy, sys\n"
           "atexit.register(gc.unfreeze)  # registered first, so it runs after every other exit handler\n"
           "sys.argv = ['pipeline.main', *sys.argv[1:]]\n"
           "runpy.run_module('pipeline.main', run_name='__main__', alter_sys=True)\n")
SIDES = {"freeze": "as shipped: `python -m pipeline.main`",
         "collect": "final collections over every object (gc.unfreeze as the last exit handler)"}


def run_child(side: str) -> dict:
    """One `main` on the tiny profile in a child process: seconds from its last line to its exit, wall, CPU."""
    command = [sys.executable, "-m", "pipeline.main"] if side == "freeze" else [sys.executable, "-c", WRAPPER]
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db", "TF_CPP_MIN_LOG_LEVEL": "2",
               "PYTHONPATH": str(ROOT), "MLFLOW_EXPERIMENT_NAME": "step-exit"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        process = subprocess.Popen([*command, *ARGS], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        lines, last_line = [], start
        for line in process.stdout:
            lines.append(line)
            last_line = time.perf_counter()
        process.wait()
        end = time.perf_counter()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0 or not any(line.startswith("run ") for line in lines):
        last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
        raise SystemExit(f"{side}: `python -m pipeline.main` failed (exit {process.returncode}): {last}; "
                         "no results written")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"after_last_line_s": round(end - last_line, 2), "wall_s": round(end - start, 2), "cpu_s": round(cpu, 2)}


def write_markdown(results: dict, path: Path) -> None:
    rows = []
    for side, runs in results["sides"].items():
        rows.append([f"{side}: {SIDES[side]}",
                     statistics.median(r["after_last_line_s"] for r in runs),
                     ", ".join(f"{r['after_last_line_s']:.1f}" for r in runs),
                     statistics.median(r["wall_s"] for r in runs), statistics.median(r["cpu_s"] for r in runs)])
    table = pd.DataFrame(rows, columns=["side", "s from last line to exit (median)", "per round",
                                        "wall s (median)", "CPU s (median)"])
    saved = results["saved"]
    path.write_text("\n".join([
        "# A step's exit", "",
        f"Machine: {results['machine']}. Date: {results['date']}. `python -m bench.step_exit --rounds "
        f"{results['rounds']}`.", "",
        f"`python -m pipeline.main {' '.join(repr(a) if not a or ' ' in a else a for a in ARGS)}` (tiny profile, "
        "synthetic data, one epoch) in a child process per side and round, each on a new SQLite store; the "
        "sides alternate.", "",
        table.to_markdown(index=False), "",
        f"- The freeze at exit saves **{saved['after_last_line_s']:.1f} s** of the time after the last line and "
        f"**{saved['cpu_s']:.1f} s of CPU** per step (differences of the medians; shorter exit in "
        f"{saved['wins']} of {results['rounds']} rounds).", ""]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds: must be >= 1, got {args.rounds}")
    check_results_folder(RESULTS)
    sides: dict[str, list[dict]] = {side: [] for side in ("collect", "freeze")}
    for round_ in range(args.rounds):
        for side in sides:
            sides[side].append(run_child(side))
            print(f"round {round_ + 1}: {side}: {json.dumps(sides[side][-1])}", flush=True)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in sides[side])

    saved = {key: round(median("collect", key) - median("freeze", key), 2)
             for key in ("after_last_line_s", "wall_s", "cpu_s")}
    saved["wins"] = sum(f["after_last_line_s"] < c["after_last_line_s"]
                        for c, f in zip(sides["collect"], sides["freeze"], strict=True))
    results = {**stamp(), "rounds": args.rounds, "args": ARGS, "sides": sides, "saved": saved}
    save_results(RESULTS, "step_exit", results, write_markdown)


if __name__ == "__main__":
    main()
