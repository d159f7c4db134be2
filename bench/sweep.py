"""Sweep benchmark; writes bench/results/sweep.json and bench/results/sweep.md.

Three sweeps of the same 8 tiny trials (params/tiny.yaml, synthetic data) through
`python -m pipeline.sweep`, one after another in one run, each in a fresh SQLite tracking store and
Optuna storage under a temporary folder:
1. no pruning, 1 worker;
2. no pruning, `--workers 2` (two worker processes sharing the study);
3. median pruning, 1 worker.
1 vs 2 is the worker speed-up; 1 vs 3 what pruning saves. Half of the learning rates are far too
small to learn (1e-6 ... 1e-5), as in a search whose range is too wide. Epochs are counted from
the val_acc curves of the trials' train runs in MLflow. A sweep that failed a trial (`pipeline.sweep` goes on past
it and exits 0) ends the benchmark with one line naming the trial, and no results are written.

Usage: python -m bench.sweep [--epochs 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
from mlflow import MlflowClient

from bench.machine import check_results_folder, machine, write_text_whole
from bench.servers import ROOT, tracking_env
from pipeline import config, sweep

RESULTS = ROOT / "bench" / "results"
LRS = [0.1, 0.000001, 0.05, 0.000002, 0.03, 0.000005, 0.02, 0.00001]  # learns, cannot learn, alternately
RUNS = [("no pruning, 1 worker", "none", 1), ("no pruning, 2 workers", "none", 2), ("median pruning, 1 worker",
                                                                                      "median", 1)]


def describe_machine() -> dict:
    """The machine as detected (cores, CPU model, GPUs or none) and library versions."""
    return {"machine": machine(), "platform": platform.platform(), "python": platform.python_version(),
            "optuna": optuna.__version__, "mlflow": mlflow.__version__}


def check(proc: subprocess.CompletedProcess, what: str) -> None:
    """A failed command ends the benchmark with one line (its last line of output); no results are written."""
    if proc.returncode != 0:
        last = next((line.strip() for line in reversed((proc.stderr + proc.stdout).splitlines()) if line.strip()),
                    "no output")
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {last}; no results written")


def run_sweep(folder: Path, pruner: str, workers: int, epochs: int) -> dict:
    """One sweep in its own store; wall time of the command and epochs/states read back."""
    folder.mkdir(parents=True)
    spec = folder / "sweep-bench.yaml"
    pruning = "none" if pruner == "none" else "{type: median, n_startup_trials: 2}"
    spec.write_text(f"base: params/tiny.yaml\noverrides: {{train.epochs: {epochs}, evaluate.samples: 1, "
                    f"train.validation_fraction: 0.1}}\n"
                    f"grid:\n  train.lr: {json.dumps(LRS)}\npruner: {pruning}\n")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = tracking_env(uri, PIPELINE_CHECKPOINT_DIR=str(folder / "checkpoints"))
    # The data is prepared once, outside the timing, so that every sweep starts from the same point.
    prepared = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", "params/tiny.yaml"], cwd=ROOT,
                              env=env, capture_output=True, text=True)
    check(prepared, "pipeline.prepare")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.sweep", "--spec", str(spec), "--study", "bench",
                           "--workers", str(workers)], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    what = f"pipeline.sweep ({pruner} pruning, {workers} worker{'s' if workers > 1 else ''})"
    check(done, what)
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{folder / 'optuna.db'}")
    return {"wall_s": wall, **read_back(MlflowClient(uri), study, what)}


def read_back(client: MlflowClient, study: optuna.Study, what: str) -> dict:
    """Epochs trained (the val_acc points of the trials' train runs), trials, their states and the best trial of a
    sweep that ended. A trial that failed, or is not over, ends the benchmark with one line (`pipeline.sweep` goes on
    past a failed trial and exits 0): its wall time is not that of the 8 trials, and it trained no curve to count."""
    ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    bad = [t for t in study.trials if t.state not in ended]
    if bad:
        said = "; ".join(f"trial {t.number} {t.state.name}"
                         + (f": {t.user_attrs['failure_reason']}" if "failure_reason" in t.user_attrs else "")
                         for t in bad)
        raise SystemExit(f"{what}: {said}; no results written")
    epochs_run = 0
    for trial in study.trials:
        train_id = client.get_run(trial.user_attrs["mlflow_run_id"]).data.tags["train_run_id"]
        epochs_run += len(client.get_metric_history(train_id, "val_acc"))
    states = pd.Series([t.state.name for t in study.trials]).value_counts().to_dict()
    best = sweep.best_of(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))  # the trial registered
    return {"epochs": epochs_run, "trials": len(study.trials), "states": states,
            "best_lr": best.params["train.lr"], "best_val_acc": best.value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs: must be >= 1, got {args.epochs}")
    check_results_folder(RESULTS)
    info = describe_machine()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, pruner, workers) in enumerate(RUNS):
            print(f"{name} ...", flush=True)
            results[name] = run_sweep(Path(tmp) / str(index), pruner, workers, args.epochs)
            print(f"  {results[name]}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    write_text_whole(RESULTS / "sweep.json", json.dumps({"machine": info, "epochs_per_trial": args.epochs, "lrs": LRS,
                                                         "results": results}, indent=2) + "\n")
    base, two, pruned = (results[name] for name, _, _ in RUNS)
    table = pd.DataFrame([{"sweep": name, "workers": workers, "pruner": pruner, "trials": r["trials"],
                           "complete / pruned": f"{r['states'].get('COMPLETE', 0)} / {r['states'].get('PRUNED', 0)}",
                           "epochs trained": r["epochs"], "wall time (s)": round(r["wall_s"], 1),
                           "best lr": r["best_lr"], "best val_acc": round(r["best_val_acc"], 4)}
                          for (name, pruner, workers), r in ((run, results[run[0]]) for run in RUNS)])
    ratios = pd.DataFrame([
        {"comparison": "2 workers vs 1 (no pruning)", "wall time": f"{two['wall_s'] / base['wall_s']:.2f}x",
         "speed-up": f"{base['wall_s'] / two['wall_s']:.2f}x", "epochs": f"{two['epochs']} vs {base['epochs']}"},
        {"comparison": "median pruning vs none (1 worker)", "wall time": f"{pruned['wall_s'] / base['wall_s']:.2f}x",
         "speed-up": f"{base['wall_s'] / pruned['wall_s']:.2f}x",
         "epochs": f"{pruned['epochs']} vs {base['epochs']} ({pruned['epochs'] / base['epochs']:.0%})"},
    ])
    tiny_images = config.load(ROOT / "params" / "tiny.yaml").data.synthetic_train
    text = f"""# Sweep benchmark

Machine: {info['machine']} ({info['platform']}). Optuna {info['optuna']}, MLflow \
{info['mlflow']}. Date: {datetime.date.today()}. All numbers from one run of `python -m bench.sweep`.

The same 8 trials each time: a grid of `train.lr` over {', '.join(f'{lr:g}' for lr in LRS)} (half of them too \
small to learn) on the tiny profile (ResNet-11, {tiny_images:,} synthetic images, {args.epochs} epochs per trial), \
every trial trained, evaluated and logged to MLflow as in a real sweep (SQLite tracking store and Optuna storage). \
Wall time is the whole `python -m pipeline.sweep` command, data already prepared. Median pruning: \
`{{type: median, n_startup_trials: 2}}`, val_acc reported after every epoch.

{table.to_markdown(index=False)}

{ratios.to_markdown(index=False)}

Each trial also pays fixed costs that pruning does not remove (starting the trial's runs, building and \
compiling the model, and for finished trials logging and evaluating the model). Two workers on one machine \
share its cores; TensorFlow in one process already uses every core for the training steps themselves.
"""
    write_text_whole(RESULTS / "sweep.md", text)
    print(text)


if __name__ == "__main__":
    main()
