"""Shared fixtures: a throwaway MLflow store per test, quiet TensorFlow."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def empty_store_db(tmp_path_factory) -> Path:
    """A freshly created SQLite store file: MLflow's schema migrations take ~4 s, a copy ~0.1 s."""
    import mlflow

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates the tables
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store_db):
    """An empty SQLite tracking store + registry with artifacts under tmp_path.

    Yields the environment for subprocesses (MLFLOW_TRACKING_URI set) with an experiment
    `e2e` whose artifacts live in tmp_path too.
    """
    import mlflow

    shutil.copyfile(empty_store_db, tmp_path / "mlflow.db")
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


def server_run_command(url: str, experiment: str, entry: str, params: dict, **env_extra: str) -> tuple[list, dict]:
    """(command, environment) of `mlflow run <project> -e ENTRY --env-manager local --experiment-name
    EXPERIMENT -P k=v ...` against the tracking server at `url`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "TF_CPP_MIN_LOG_LEVEL": "2", **env_extra}
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
           "--experiment-name", experiment]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    return cmd, env


def run_module(env: dict, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def eventually(check, timeout: float = 60):
    """Poll `check()` until it returns something truthy (returned) or `timeout` s pass (AssertionError).

    For what `mlflow run` settles after it exits: a step's final status on its run is written by a
    detached process once `mlflow run` is gone (see pipeline.tracking._settle_wrapper_run)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check.__doc__ or check}")
        time.sleep(0.5)
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, *, timeout: float = 180, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail (with the log's tail) if `process` exits or time runs out."""
    tail = (lambda: log.read_text(errors="replace")[-3000:]) if log else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    stop_group(process)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{tail()}")


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM a server started with start_new_session=True and its workers; SIGKILL what outlives it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def start_tracking_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on loopback (SQLite + local artifacts in `folder`), up when this returns."""
    log = folder / f"server-{port}.log"
    # No GenAI job runner: it starts several busy consumer processes that these tests never use.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
             "--artifacts-destination", str(folder / "server-artifacts")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_until_up(f"http://127.0.0.1:{port}/health", process, timeout=120, log=log)
    return process
