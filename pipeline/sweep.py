"""The `sweep` entry point: a grid or random search, one nested run per trial, the best registered.

Reads:  a sweep file (see params/sweep-example.yaml):
            base: params/tiny.yaml                 # params file every trial starts from
            overrides: {train.epochs: 2}           # optional, the same for every trial
            grid: {train.lr: [0.05, 0.1], model.units_per_stage: [1, 2]}   # every combination
        or  random: {train.lr: {min: 0.01, max: 0.2, log: true}, train.batch_size: [32, 64]}
            trials: 8                              # draws: a list is a choice, min/max a range
            seed: 0
        Every trial's params are loaded and validated (pipeline.config.load) before any run opens.
Writes: a parent run (tag step = 'sweep') with one child run per trial (tag step = 'trial',
        params = the trial's resolved params, metrics val_acc, best_val_acc, test_acc,
        test_loss), each holding its own train and evaluate runs. A trial that raises, or whose
        loss ends NaN/inf (diverged), ends FAILED with tag `failure_reason`, and the sweep goes on.
        The best finished trial by test_acc goes through register (same rule as `main`), and a
        compare run over the finished trials closes the sweep.
Returns a dict: trials (overrides, status, run ids, metrics, reason), the best trial, the
register decision, the comparison run id.

Trials run one after another in this process, or `--parallel N` at a time, each in its own
`python -m pipeline.sweep --trial-run-id ...` subprocess (several Keras models in one process
would share its global state).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow import MlflowClient

from pipeline import compare, config, prepare
from pipeline.tracking import cli, open_run, step_run

SPEC_KEYS = {"base", "overrides", "grid", "random", "trials", "seed"}


def read_spec(path: str | Path) -> dict[str, Any]:
    """The sweep file as a dict; ConfigError on unknown keys, neither or both of grid/random."""
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = config.PROJECT_ROOT / candidate
    try:
        spec = yaml.safe_load(candidate.read_text())
    except FileNotFoundError:
        raise config.ConfigError(f"spec: file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise config.ConfigError(f"spec: {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(spec, dict):
        raise config.ConfigError(f"spec: {path} must hold a mapping")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise config.ConfigError(f"spec: unknown keys {sorted(unknown)} (known: {', '.join(sorted(SPEC_KEYS))})")
    if ("grid" in spec) == ("random" in spec):
        raise config.ConfigError("spec: give exactly one of grid or random")
    for key in ("grid", "random", "overrides"):
        if key in spec and not isinstance(spec[key], dict):
            raise config.ConfigError(f"spec.{key}: must map dotted keys to values, got {spec[key]!r}")
    return spec


def grid_trials(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the listed values, in the order written (last key fastest)."""
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise config.ConfigError(f"spec.grid.{key}: must be a non-empty list, got {values!r}")
    return [dict(zip(grid, combination, strict=True)) for combination in itertools.product(*grid.values())]


def draw(key: str, domain: Any, rng: np.random.Generator) -> Any:
    """One value: a list is a uniform choice; {min, max[, log]} a uniform (log-uniform) number,
    an integer if both bounds are integers."""
    if isinstance(domain, list) and domain:
        return domain[rng.integers(len(domain))]
    if isinstance(domain, dict) and {"min", "max"} <= set(domain) <= {"min", "max", "log"}:
        low, high, log = domain["min"], domain["max"], bool(domain.get("log", False))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise config.ConfigError(f"spec.random.{key}: min and max must be numbers, min <= max, got {domain!r}")
        if log and low <= 0:
            raise config.ConfigError(f"spec.random.{key}: log ranges need min > 0, got {domain!r}")
        if isinstance(low, int) and isinstance(high, int) and not log:
            return int(rng.integers(low, high + 1))
        value = math.exp(rng.uniform(math.log(low), math.log(high))) if log else rng.uniform(low, high)
        return float(f"{value:.3g}")  # 3 significant digits read well in run names and params
    raise config.ConfigError(f"spec.random.{key}: must be a non-empty list or {{min, max, log}}, got {domain!r}")


def random_trials(space: dict[str, Any], trials: Any, seed: Any) -> list[dict[str, Any]]:
    """`trials` seeded draws from `space`."""
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise config.ConfigError(f"spec.trials: must be an integer >= 1 with random, got {trials!r}")
    rng = np.random.default_rng(seed if isinstance(seed, int) else 0)
    return [{key: draw(key, domain, rng) for key, domain in space.items()} for _ in range(trials)]


def override_items(values: dict[str, Any]) -> list[str]:
    """{"train.lr": 0.1, "model.widths": [16, 32]} -> ["train.lr=0.1", "model.widths=[16, 32]"] (JSON is YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def plan(spec: dict[str, Any], extra_overrides: str = "") -> list[dict[str, Any]]:
    """The trials of a sweep, each validated: [{"index", "values", "overrides", "label", "cfg"}].

    Inputs: the sweep spec and `key=value` overrides for every trial, applied last (e.g. from the
    command line). Overrides layer as: spec `overrides`, the trial's values, `extra_overrides`.
    Raises ConfigError naming the first trial whose params are invalid.
    """
    values_per_trial = grid_trials(spec["grid"]) if "grid" in spec else \
        random_trials(spec["random"], spec.get("trials"), spec.get("seed", 0))
    common, extra = override_items(spec.get("overrides") or {}), shlex.split(extra_overrides or "")
    trials = []
    for index, values in enumerate(values_per_trial, start=1):
        items = override_items(values)
        label = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items())
        try:
            cfg = config.load(spec.get("base") or None, common + items + extra)
        except config.ConfigError as exc:
            raise config.ConfigError(f"trial {index} ({label}): {exc}") from None
        trials.append({"index": index, "values": values, "overrides": common + items + extra, "label": label,
                       "cfg": cfg})
    return trials


def train_and_evaluate(cfg: config.Config, dataset_uri: str) -> None:
    """Inside the active trial run: train, refuse a diverged model, evaluate; log the results to the trial run."""
    from pipeline import evaluate, train  # Keras loads only once every trial is known to be valid

    client = MlflowClient()
    with step_run(cfg, "train", run_name=cfg.run_name()) as train_run:
        model_uri = train.run(cfg, dataset_uri)
    train_id = train_run.info.run_id
    compare.describe_train_run(client, train_id)
    mlflow.set_tags({"train_run_id": train_id, "model_uri": model_uri})
    history = compare.val_acc_history(client, train_id)
    if len(history):
        mlflow.log_metrics({"val_acc": float(history.iloc[-1]), "best_val_acc": float(history.max())})
    loss = client.get_run(train_id).data.metrics.get("loss", math.nan)
    if not math.isfinite(loss):
        raise FloatingPointError(f"diverged: training loss is {loss} after {len(history)} epochs")
    with step_run(cfg, "evaluate"):
        metrics = evaluate.run(cfg, model_uri, dataset_uri)
    mlflow.log_metrics({"test_acc": metrics["test_acc"], "test_loss": metrics["test_loss"]})


def execute_trial(cfg: config.Config, trial_run_id: str, dataset_uri: str) -> None:
    """Run one trial in its (already created) run; any error ends that run FAILED with its reason, not the sweep."""
    import keras

    failed = False
    with mlflow.start_run(run_id=trial_run_id, nested=True):
        mlflow.log_params(cfg.flat())
        try:
            train_and_evaluate(cfg, dataset_uri)
        except Exception as exc:  # noqa: BLE001 - whatever stops one trial must not stop the others
            failed = True
            reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:2000]
            mlflow.set_tags({"failure_reason": reason, "mlflow.note.content": f"**FAILED**: {reason}"})
            print(f"trial failed: {reason}", file=sys.stderr)
        finally:
            keras.backend.clear_session()  # the next trial in this process starts from a clean graph
    if failed:
        MlflowClient().set_terminated(trial_run_id, "FAILED")


def create_trial_run(client: MlflowClient, parent: mlflow.ActiveRun, trial: dict) -> str:
    """A child run of the sweep for one trial, named after its values; returns its id."""
    created = client.create_run(parent.info.experiment_id, run_name=f"trial-{trial['index']} {trial['label']}",
                                tags={"mlflow.parentRunId": parent.info.run_id, "step": "trial",
                                      "trial_index": str(trial["index"]), "trial_overrides": trial["label"],
                                      "model_depth": str(trial["cfg"].model.depth)})
    return created.info.run_id


def run_in_subprocess(spec_path: str, extra_overrides: str, trial: dict, trial_run_id: str, dataset_uri: str) -> None:
    """Run one trial as `python -m pipeline.sweep --trial-index ...`; a crashed process fails its trial run."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}  # the child attaches to its trial run
    cmd = [sys.executable, "-m", "pipeline.sweep", "--spec", spec_path, "--overrides", extra_overrides,
           "--trial-index", str(trial["index"]), "--trial-run-id", trial_run_id, "--dataset-uri", dataset_uri]
    done = subprocess.run(cmd, env=env, cwd=config.PROJECT_ROOT, capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    client = MlflowClient()
    if done.returncode != 0 and client.get_run(trial_run_id).info.status == "RUNNING":
        reason = f"trial process exited with status {done.returncode}: {done.stderr.strip()[-1500:]}"
        client.set_tag(trial_run_id, "failure_reason", reason)
        client.set_terminated(trial_run_id, "FAILED")


def prepare_datasets(trials: list[dict]) -> dict[str, str]:
    """Prepare (or reuse) each distinct dataset once, before any trial: prepare key -> dataset URI."""
    uris: dict[str, str] = {}
    for trial in trials:
        key = prepare.prepare_key(trial["cfg"])
        if key not in uris:
            uris[key] = prepare.ensure_prepared(trial["cfg"])
        trial["dataset_uri"] = uris[key]
    return uris


def collect(client: MlflowClient, trials: list[dict]) -> pd.DataFrame:
    """One row per trial, read back from its run: index, overrides, status, test_acc, val_acc, run ids, reason."""
    rows = []
    for trial in trials:
        found = client.get_run(trial["run_id"])
        metrics, tags = found.data.metrics, found.data.tags
        rows.append({"trial": trial["index"], "overrides": trial["label"], "status": found.info.status,
                     "test_acc": metrics.get("test_acc", math.nan), "val_acc": metrics.get("val_acc", math.nan),
                     "best_val_acc": metrics.get("best_val_acc", math.nan), "run_id": trial["run_id"],
                     "train_run_id": tags.get("train_run_id", ""), "model_uri": tags.get("model_uri", ""),
                     "failure_reason": tags.get("failure_reason", "")})
    return pd.DataFrame(rows)


def best_trial(results: pd.DataFrame) -> pd.Series | None:
    """The finished trial with the highest test_acc (the first of equals), or None."""
    finished = results[(results["status"] == "FINISHED") & results["test_acc"].notna()]
    return None if finished.empty else finished.loc[finished["test_acc"].idxmax()]


def run(spec_path: str, extra_overrides: str = "", parallel: int = 1) -> dict:
    """Validate every trial, then run the sweep under a new parent run; register the best; compare.

    Inputs: the sweep file, overrides for every trial, how many trials run at once (> 1: in
    subprocesses). Output: {"run_id", "trials" (DataFrame), "best" (row or None), "decision",
    "comparison_run_id"}. ConfigError before any run opens if the spec or any trial is invalid.
    """
    from pipeline import register

    if parallel < 1:
        raise config.ConfigError(f"parallel: must be >= 1, got {parallel}")
    spec = read_spec(spec_path)
    trials = plan(spec, extra_overrides)
    base_cfg = trials[0]["cfg"]
    client = MlflowClient()
    name = f"sweep-{Path(spec_path).stem.removeprefix('sweep-')}-{len(trials)}trials"
    with open_run("sweep", experiment=base_cfg.tracking.experiment, run_name=name) as parent:
        mlflow.log_params({"sweep.spec": spec_path, "sweep.kind": "grid" if "grid" in spec else "random",
                           "sweep.trials": len(trials), "sweep.parallel": parallel,
                           "sweep.overrides": extra_overrides or ""})
        mlflow.log_dict(spec, "sweep.yaml")
        prepare_datasets(trials)
        for trial in trials:  # all trial runs exist, and show in the UI, once the sweep starts
            trial["run_id"] = create_trial_run(client, parent, trial)
        if parallel == 1:
            for trial in trials:
                print(f"trial {trial['index']}/{len(trials)}: {trial['label']}")
                execute_trial(trial["cfg"], trial["run_id"], trial["dataset_uri"])
        else:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                list(pool.map(lambda t: run_in_subprocess(spec_path, extra_overrides, t, t["run_id"],
                                                          t["dataset_uri"]), trials))
        results = collect(client, trials)
        best = best_trial(results)
        decision, comparison = None, None
        if best is not None:
            best_cfg = trials[int(best["trial"]) - 1]["cfg"]
            with step_run(best_cfg, "register"):
                decision = register.run(best_cfg, best["model_uri"])
            finished = results[results["status"] == "FINISHED"]["train_run_id"].tolist()
            comparison = compare.run(run_ids=finished, metric="test_acc")["run_id"]
            mlflow.log_metric("best_test_acc", float(best["test_acc"]))
            mlflow.set_tags({"best_trial_run_id": best["run_id"], "registered_version": str(decision["version"]),
                             "alias_moved": str(decision["alias_moved"]).lower()})
        summary = results.drop(columns=["run_id", "train_run_id", "model_uri"])
        mlflow.log_text(results.to_csv(index=False), "trials.csv")
        mlflow.set_tag("mlflow.note.content", f"{len(trials)} trials of `{spec_path}`, "
                       f"{int((results['status'] == 'FAILED').sum())} failed; best: "
                       f"{'none' if best is None else 'trial ' + str(best['trial'])}.\n\n"
                       + compare.to_markdown(summary))
        print(compare.to_markdown(summary), end="")
        run_id = parent.info.run_id
    return {"run_id": run_id, "trials": results, "best": best, "decision": decision, "comparison_run_id": comparison}


def run_one(spec_path: str, extra_overrides: str, index: int, trial_run_id: str, dataset_uri: str) -> None:
    """The body of a `--parallel` subprocess: re-plan the sweep (it is deterministic) and run trial `index`."""
    trials = plan(read_spec(spec_path), extra_overrides)
    execute_trial(trials[index - 1]["cfg"], trial_run_id, dataset_uri)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="sweep file, e.g. params/sweep-example.yaml")
    parser.add_argument("--overrides", default="", help="key=value pairs applied to every trial, last")
    parser.add_argument("--parallel", default="1", help="trials at a time; > 1 runs each in a subprocess")
    parser.add_argument("--trial-index", type=int, help=argparse.SUPPRESS)  # set by the parent of a subprocess
    parser.add_argument("--trial-run-id", help=argparse.SUPPRESS)
    parser.add_argument("--dataset-uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial_index:
        run_one(args.spec, args.overrides, args.trial_index, args.trial_run_id, args.dataset_uri)
        return
    try:
        parallel = int(args.parallel or 1)
    except ValueError:
        raise config.ConfigError(f"parallel: must be an integer, got {args.parallel!r}") from None
    result = run(args.spec, args.overrides, parallel)
    if result["best"] is None:
        print(f"error: every trial of {args.spec} failed; nothing registered", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli(main)
