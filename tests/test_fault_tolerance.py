"""Fault tolerance: resume after a kill, fail loudly on divergence or a dead server, refuse bad params."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline import evaluate, main, prepare, register, train
from pipeline.tracking import cli
from tests.conftest import ROOT, free_port, start_tracking_server, stop_group

TINY = "params/tiny.yaml"


def main_command(*params: str) -> list[str]:
    """`mlflow run` of `main` on the tiny profile with extra `-P` params."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", "e2e",
           "-P", f"params={TINY}"]
    for p in params:
        cmd += ["-P", p]
    return cmd


def start_mlflow_run(env: dict, *params: str) -> subprocess.Popen:
    return subprocess.Popen(main_command(*params), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def run_to_end(env: dict, *params: str) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(*params), env=env, capture_output=True, text=True, timeout=600)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, like a machine dying. (`mlflow run` starts the
    training command in a session of its own, so killing its process group is not enough.)"""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, victims = [pid], []
    while todo:
        victims.append(todo.pop())
        todo += children.get(victims[-1], [])
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def wait_for_checkpoint(root: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until some train run has checkpointed its first completed epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(root.glob("*/training_metadata.json")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before a checkpoint: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("no checkpoint within the timeout")


def experiment_runs(client: MlflowClient, filter_string: str = "") -> list:
    return client.search_runs([client.get_experiment_by_name("e2e").experiment_id], filter_string)


def test_sigkill_then_rerun_resumes_the_same_run(store, tmp_path):
    proc = start_mlflow_run(store, "epochs=4")
    wait_for_checkpoint(tmp_path / "checkpoints", proc)
    kill_tree(proc.pid)
    proc.wait(timeout=30)

    client = MlflowClient()
    (killed,) = experiment_runs(client, "tags.step = 'train'")
    assert killed.info.status == "RUNNING"  # nobody was left to mark it
    done = run_to_end(store, "epochs=4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming train run {killed.info.run_id}" in done.stdout
    assert "Epoch 1/4" not in done.stdout + done.stderr  # continued from the checkpoint, not from scratch

    train_runs = experiment_runs(client, "tags.step = 'train'")
    assert [r.info.run_id for r in train_runs] == [killed.info.run_id]
    resumed = client.get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED"
    for key in ("val_acc", "acc", "loss", "lr"):
        steps = [m.step for m in client.get_metric_history(resumed.info.run_id, key)]
        assert sorted(steps) == [1, 2, 3, 4], (key, steps)  # no gap, no duplicate
    parents = {r.info.run_id: r for r in experiment_runs(client, "tags.step = 'main'")}
    assert sorted(r.info.status for r in parents.values()) == ["FINISHED", "KILLED"]
    assert not (tmp_path / "checkpoints" / killed.info.run_id).exists()  # a finished run drops its checkpoint
    assert len(client.search_model_versions("name = 'cifar10-resnet'")) == 1


def test_divergence_fails_the_run_and_registers_nothing(store):
    result = run_to_end(store, "epochs=2", "overrides=train.lr=1e12")
    assert result.returncode != 0
    assert "error: training diverged: loss became nan" in result.stderr
    client = MlflowClient()
    (run,) = experiment_runs(client, "tags.step = 'train'")
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["failure_reason"]
    statuses = {r.data.tags.get("step"): r.info.status for r in experiment_runs(client)}
    assert statuses == {"prepare": "FINISHED", "train": "FAILED", "main": "FAILED"}, statuses
    assert client.search_registered_models() == []


BAD = [  # (module, argv, key named by the one-line error)
    (main, ["--epochs", "0"], "train.epochs"),
    (main, ["--epochs", "ten"], "train.epochs"),
    (main, ["--overrides", "train.lr=-1"], "train.lr"),
    (main, ["--overrides", "train.momentum=1.5"], "train.momentum"),
    (main, ["--overrides", "model.block=dense"], "model.block"),
    (main, ["--overrides", "train.foo=1"], "train.foo"),
    (main, ["--overrides", "bogus"], "overrides"),
    (main, ["--data", "/no/such/cifar.tar.gz"], "data.source"),
    (main, ["--params", "params/no-such.yaml"], "params"),
    (main, ["--resume", "0123456789abcdef"], "resume"),
    (prepare, ["--overrides", "data.max_train=-5"], "data.max_train"),
    (prepare, ["--data", "/nowhere"], "data.source"),
    (train, ["--overrides", "train.batch_size=0"], "train.batch_size"),
    (train, ["--overrides", "train.precision=float8"], "train.precision"),
    (train, ["--overrides", "train.feed=device"], "train.feed"),  # the test process runs TensorFlow
    (main, ["--overrides", "train.feed=device"], "train.feed"),
    (train, ["--resume", "0123456789abcdef"], "resume"),
    (train, ["--dataset-uri", "runs:/0123456789abcdef/dataset/dataset.npz"], "dataset_uri"),
    (evaluate, ["--model-uri", "models:/m-0123", "--dataset-uri", "runs:/0123/x.npz"], "dataset_uri"),
    (evaluate, ["--overrides", "evaluate.batch_size=0", "--model-uri", "x", "--dataset-uri", "y"],
     "evaluate.batch_size"),
    (register, ["--model-uri", "not-a-model-uri"], "model_uri"),
    (register, ["--model-uri", "models:/m-0123456789"], "model_uri"),
    (register, ["--overrides", "register.alias=v2", "--model-uri", "models:/m-1"], "register.alias"),
]


@pytest.mark.parametrize(("module", "argv", "key"), BAD, ids=[f"{m.__name__.split('.')[-1]}:{k}" for m, _, k in BAD])
def test_bad_input_is_one_line_naming_the_key(store, capsys, monkeypatch, module, argv, key):
    monkeypatch.setattr(sys, "argv", [module.__name__, "--params", TINY, *argv] if "--params" not in argv
                        else [module.__name__, *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli(module.main)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {key}"), lines[-3:]
    client = MlflowClient()
    assert all(r.info.status != "RUNNING" for r in experiment_runs(client))
    assert client.search_registered_models() == []
    assert client.search_model_versions() == []


def test_four_concurrent_runs_share_one_sqlite_store(store):
    lrs = ["0.02", "0.05", "0.1", "0.2"]
    procs = [start_mlflow_run(store, "epochs=2", f"overrides=train.lr={lr} train.seed={i}")
             for i, lr in enumerate(lrs)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    client = MlflowClient()
    train_runs = experiment_runs(client, "tags.step = 'train'")
    assert len(train_runs) == 4 and all(r.info.status == "FINISHED" for r in train_runs)
    for run in train_runs:
        for key in ("val_acc", "loss", "lr", "epoch_seconds"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2]
    versions = client.search_model_versions("name = 'cifar10-resnet'")
    assert len(versions) == 4
    best = max(versions, key=lambda v: float(v.tags["test_acc"]))
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == str(best.version)


def test_dead_tracking_server_fails_fast_and_the_rerun_resumes(tmp_path, monkeypatch):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_tracking_server(tmp_path, port)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PIPELINE_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    try:
        MlflowClient(uri).create_experiment("e2e")
        proc = start_mlflow_run(env, "epochs=4")
        wait_for_checkpoint(tmp_path / "checkpoints", proc)
        kill_tree(server.pid)
        server.wait(timeout=30)
        start = time.monotonic()
        _, err = proc.communicate(timeout=300)  # bounded retries: it must give up, not hang
        assert proc.returncode != 0
        assert time.monotonic() - start < 240
        assert f"error: tracking server {uri} failed" in err and "rerun the same command to resume" in err

        server = start_tracking_server(tmp_path, port)
        done = run_to_end(env, "epochs=4")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resuming train run" in done.stdout
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("e2e").experiment_id
        (run,) = client.search_runs([experiment], "tags.step = 'train'")
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc")) == [1, 2, 3, 4]
        assert client.get_model_version_by_alias("cifar10-resnet", "champion") is not None
    finally:
        stop_group(server)
