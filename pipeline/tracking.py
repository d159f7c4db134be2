"""The one tracking layer: how every step opens its MLflow run and reports a bad input.

Tracking store: whatever `MLFLOW_TRACKING_URI` names, else MLflow's default, the embedded
SQLite store `sqlite:///mlflow.db` in the working directory (the project root under
`mlflow run .`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow

from pipeline.config import PROJECT_ROOT, Config, ConfigError
from pipeline.data import DataError

PIPELINE_DIR = Path(__file__).resolve().parent


def code_digest(*modules: str) -> str:
    """sha256 of the named pipeline modules' source: a cache key that changes with the code."""
    h = hashlib.sha256()
    for module in sorted(modules):
        h.update(module.encode())
        h.update((PIPELINE_DIR / f"{module}.py").read_bytes())
    return h.hexdigest()


def _git_commit() -> str | None:
    head = PROJECT_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (PROJECT_ROOT / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


@contextlib.contextmanager
def step_run(cfg: Config, step: str, *, run_name: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one pipeline step.

    Under `mlflow run` the run already exists (MLFLOW_RUN_ID) and is reused. Inside another
    active run (the `main` driver) a nested child run is opened in the parent's experiment.
    Otherwise a new run is opened in `tracking.experiment`. A step that raises ends FAILED.
    """
    parent = mlflow.active_run()
    tags = {"step": step, "model_depth": str(cfg.model.depth)}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    if parent is not None:
        ctx = mlflow.start_run(run_name=run_name or step, nested=True,
                               experiment_id=parent.info.experiment_id, tags=tags)
    elif os.environ.get("MLFLOW_RUN_ID"):
        ctx = mlflow.start_run(tags=tags)
    else:
        mlflow.set_experiment(cfg.tracking.experiment)
        ctx = mlflow.start_run(run_name=run_name or step, tags=tags)
    with ctx as run:
        if run_name:  # `mlflow run` names its run at random; a descriptive name reads better in the UI
            mlflow.set_tag("mlflow.runName", run_name)
        yield run


def cli(main: Callable[[], object]) -> None:
    """Run an entry point's `main`; a bad param or data file is one line on stderr, exit 2."""
    try:
        main()
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
