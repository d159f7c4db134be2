"""Shared fixtures: a throwaway MLflow store per test, quiet TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty SQLite tracking store + registry with artifacts under tmp_path.

    Yields the environment for subprocesses (MLFLOW_TRACKING_URI set) with an experiment
    `e2e` whose artifacts live in tmp_path too.
    """
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("e2e", artifact_location=str(tmp_path / "artifacts"))
    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env.pop("MLFLOW_RUN_ID", None)
    yield env
    mlflow.set_tracking_uri(None)


def mlflow_run(env: dict, entry_point: str = "main", **params: str) -> subprocess.CompletedProcess:
    """`mlflow run <project> -e ENTRY --env-manager local --experiment-name e2e -P k=v ...`."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry_point, "--env-manager", "local",
           "--experiment-name", "e2e"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def run_module(env: dict, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
