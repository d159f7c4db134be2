"""Local MLflow servers and `mlflow run` commands, shared by the benchmarks and the tests.

A tracking server (`mlflow server`, SQLite + local artifacts), a model server (`mlflow models serve`),
each in its own process group on a loopback port, up when started and stopped with its workers;
and the environment and command line of `mlflow run` against a given tracking URI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


_handed_out: set[int] = set()  # the ports `free_port` gave this process


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, and none this process was given before: the OS may give a port it has just
    freed again, and two calls in a row gave the two hosts of one test cluster one address (CI, 2026-12-08)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def tracking_env(uri: str, **extra: str) -> dict[str, str]:
    """This process's environment pointed at the tracking store `uri`, with no run or experiment inherited
    from a caller (a step started under `mlflow run` would otherwise log into the caller's run)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **extra}
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    return env


def server_run_command(url: str, experiment: str, entry: str, params: dict, **env_extra: str) -> tuple[list, dict]:
    """(command, environment) of `mlflow run <project> -e ENTRY --env-manager local --experiment-name
    EXPERIMENT -P k=v ...` against the tracking server (or store) at `url`."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
           "--experiment-name", experiment]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    return cmd, tracking_env(url, **env_extra)


def wait_until_up(url: str, process: subprocess.Popen, *, timeout: float = 180, log: Path | None = None) -> None:
    """Poll `url` until it answers 200; RuntimeError (with the log's tail) if `process` exits or time runs out."""
    tail = (lambda: log.read_text(errors="replace")[-3000:]) if log else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    stop_group(process)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{tail()}")


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
    # ~8 CPU-s, 14 s here to answer (MLflow imported twice, the store made): a loaded machine takes several times that
    wait_until_up(f"http://127.0.0.1:{port}/health", process, timeout=300, log=log)
    return process


def start_model_server(model_uri: str, port: int, log: Path, *, timeout: float = 180,
                       env: dict[str, str] | None = None) -> subprocess.Popen:
    """`mlflow models serve` of `model_uri` (one worker, this Python environment) on loopback, in its own
    process group (uvicorn is a grandchild); up when this returns."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-p", str(port), "-h", "127.0.0.1", "-w", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until_up(f"http://127.0.0.1:{port}/ping", process, timeout=timeout, log=log)
    return process
