"""Fault tolerance: resume after a kill or Ctrl-C, never take over a live run, fail loudly (with the README's
exit codes) on divergence or a dead server, refuse bad params, survive concurrent starts and registers."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from bench.servers import free_port, start_tracking_server, stop_group
from pipeline import config, evaluate, main, prepare, register, train
from pipeline.fitting import learning_rate
from pipeline.tracking import cli, registry
from tests.conftest import ROOT, eventually, run_module

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


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send `sig` (SIGKILL: like a machine dying) to a process and all its descendants. (`mlflow run`
    starts the training command in a session of its own, so signalling its process group is not enough.)"""
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
            os.kill(victim, sig)


def wait_for_checkpoint(root: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until some train run has checkpointed its first completed epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(root.glob("*/training_metadata.json")):
            time.sleep(1)  # past the checkpoint's last write, well before the next epoch ends
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before a checkpoint: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("no checkpoint within the timeout")


def experiment_runs(client: MlflowClient, filter_string: str = "") -> list:
    return client.search_runs([client.get_experiment_by_name("e2e").experiment_id], filter_string)


def metric_steps(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    history = client.get_metric_history(run_id, key)
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), (key, sorted(steps))  # no epoch logged twice
    return {m.step: m.value for m in history}


# A step schedule that decays after epoch 2 of 3, so the resumed run (killed after epoch 1) crosses it.
STEP_SCHEDULE = "overrides=train.schedule=step train.lr_boundaries=[0.5]"


def test_a_live_run_is_never_taken_over_and_a_killed_one_resumes(store, tmp_path):
    live = start_mlflow_run(store, "epochs=3", STEP_SCHEDULE)
    wait_for_checkpoint(tmp_path / "checkpoints", live)
    kill_tree(live.pid, signal.SIGSTOP)  # still alive, holding its lock, but making no progress
    try:
        second = run_to_end(store, "epochs=3", STEP_SCHEDULE)  # the identical command, while the first one trains
    finally:
        kill_tree(live.pid)  # now the first one dies without a word, like a machine going down
        live.wait(timeout=30)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming train run" not in second.stdout

    client = MlflowClient()
    runs = {r.info.status: r for r in experiment_runs(client, "tags.step = 'train'")}
    assert sorted(runs) == ["FINISHED", "RUNNING"]  # two runs; nobody was left to mark the killed one
    killed, uninterrupted = runs["RUNNING"], runs["FINISHED"]
    done = run_to_end(store, "epochs=3", STEP_SCHEDULE)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming train run {killed.info.run_id}" in done.stdout
    assert "Epoch 1/3" not in done.stdout + done.stderr  # continued from the checkpoint, not from scratch

    assert len(experiment_runs(client, "tags.step = 'train'")) == 2
    resumed = client.get_run(killed.info.run_id)
    assert resumed.info.status == "FINISHED"
    for key in ("val_acc", "acc", "loss"):
        assert sorted(metric_steps(client, resumed.info.run_id, key)) == [1, 2, 3], key  # no gap
    # The optimizer state came back: its step count goes on across the resume, and so does the lr schedule.
    iterations = metric_steps(client, resumed.info.run_id, "iterations")
    steps_per_epoch = int(iterations[1])
    assert steps_per_epoch > 0 and iterations == {e: e * steps_per_epoch for e in (1, 2, 3)}
    schedule = learning_rate(config.load(TINY, "train.epochs=3 train.schedule=step train.lr_boundaries=[0.5]").train,
                             steps_per_epoch)
    lrs = metric_steps(client, resumed.info.run_id, "lr")  # the lr of each epoch's last step
    for epoch, lr in lrs.items():
        assert lr == pytest.approx(float(keras.ops.convert_to_numpy(schedule(epoch * steps_per_epoch - 1)))), lrs
    assert lrs == pytest.approx({1: 0.05, 2: 0.05, 3: 0.005})  # it decayed after epoch 2, in the resumed part
    assert lrs == metric_steps(client, uninterrupted.info.run_id, "lr")  # exactly as without the kill
    assert iterations == metric_steps(client, uninterrupted.info.run_id, "iterations")
    parents = experiment_runs(client, "tags.step = 'main'")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED", "KILLED"]  # rerun marks it KILLED
    assert not (tmp_path / "checkpoints" / killed.info.run_id).exists()  # a finished run drops its checkpoint
    assert len(client.search_model_versions("name = 'cifar10-resnet'")) == 2


def test_ctrl_c_ends_every_run_killed_and_resume_by_id_extends_the_run(store, tmp_path):
    interrupted = start_mlflow_run(store, "epochs=3")
    wait_for_checkpoint(tmp_path / "checkpoints", interrupted)
    # Ctrl-C in a terminal: SIGINT to the foreground process group, `mlflow run` and its step alike
    # (`mlflow run` then also sends the step SIGTERM).
    os.killpg(interrupted.pid, signal.SIGINT)
    _, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode != 0
    assert "error: interrupted by SIGINT; open runs ended KILLED" in err, err[-3000:]

    client = MlflowClient()
    expected = {"prepare": "FINISHED", "train": "KILLED", "main": "KILLED"}
    eventually(lambda: {r.data.tags["step"]: r.info.status for r in experiment_runs(client)} == expected)
    (train_run,) = experiment_runs(client, "tags.step = 'train'")
    run_id = train_run.info.run_id
    assert train_run.data.tags["interrupted_by"] == "SIGINT"
    assert (tmp_path / "checkpoints" / run_id / "training_metadata.json").exists()

    # resume=<id> with other params is refused, naming them; so is shrinking the run.
    args = ("--params", TINY, "--resume", run_id)
    other = run_module(store, "pipeline.main", *args, "--overrides", "train.lr=0.1 train.seed=7", "--epochs", "3")
    assert other.returncode == 2, other.stderr[-2000:]
    line = other.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: resume: run {run_id} was started with other params: train.lr=0.1 (run has ")
    assert "train.seed=7 (run has " in line
    shorter = run_module(store, "pipeline.main", *args, "--epochs", "1")
    assert shorter.returncode == 2 and shorter.stderr.strip().splitlines()[-1].startswith("error: train.epochs: ")

    # resume=never starts afresh and leaves the interrupted run as it was.
    fresh = run_to_end(store, "epochs=3", "resume=never")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming train run" not in fresh.stdout
    assert client.get_run(run_id).info.status == "KILLED"
    assert (tmp_path / "checkpoints" / run_id / "training_metadata.json").exists()

    # resume=<id> with more epochs extends the interrupted run.
    extended = run_to_end(store, "epochs=4", f"resume={run_id}")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert f"resuming train run {run_id}" in extended.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["extended_epochs"] == "3 -> 4"
    assert sorted(metric_steps(client, run_id, "val_acc")) == [1, 2, 3, 4]
    iterations = metric_steps(client, run_id, "iterations")
    assert iterations == {e: e * iterations[1] for e in (1, 2, 3, 4)}
    trains = experiment_runs(client, "tags.step = 'train'")
    assert len(trains) == 2 and all(r.info.status == "FINISHED" for r in trains)
    assert not any(r.info.status == "RUNNING" for r in experiment_runs(client))


def test_divergence_fails_the_run_exits_3_and_registers_nothing(store):
    result = run_module(store, "pipeline.main", "--params", TINY, "--epochs", "2",
                        "--overrides", "train.lr=1e12 tracking.experiment=e2e")
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: training diverged: loss became nan")
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
    assert client.search_runs([e.experiment_id for e in client.search_experiments()],
                              run_view_type=ViewType.ALL) == []  # refused before any run was opened
    assert client.search_registered_models() == []
    assert client.search_model_versions() == []


def test_three_runs_started_together_on_a_fresh_store_all_finish(tmp_path):
    """As the README's first command does it: `python -m pipeline.tracking && mlflow run ...`, three at once,
    on a store that does not exist yet; the runs land in MLflow's Default experiment."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PIPELINE_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
           "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}  # the README runs it from the project folder; this test from another
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    lrs = ["0.02", "0.05", "0.1"]
    procs = [subprocess.Popen(["bash", "-c", f"python -m pipeline.tracking && mlflow run {ROOT} --env-manager local "
                               f"-P params={TINY} -P epochs=1 -P 'overrides=train.lr={lr} train.seed={i}'"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, lr in enumerate(lrs)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    client = MlflowClient(uri)
    train_runs = client.search_runs(["0"], "tags.step = 'train'")
    assert len(train_runs) == 3 and all(r.info.status == "FINISHED" for r in train_runs)
    assert sorted(r.data.params["train.lr"] for r in train_runs) == sorted(lrs)
    versions = client.search_model_versions("name = 'cifar10-resnet'")
    assert len(versions) == 3
    best = max(versions, key=lambda v: float(v.tags["test_acc"]))
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == str(best.version)


class Echo(mlflow.pyfunc.PythonModel):
    """A stand-in model: register only needs a logged model with a test_acc on it."""

    def predict(self, context, model_input, params=None):
        return model_input


def register_after_barrier(uri: str, experiment_id: str, model_uri: str, barrier, delay: float, decisions) -> None:
    """Register `model_uri` in a process of its own; read the champion, wait for the other register to have
    read it too, sleep `delay`, then go on."""
    os.environ["MLFLOW_TRACKING_URI"] = uri
    read = registry.current_champion
    first = [True]

    def read_then_wait(name, alias):
        champion = read(name, alias)
        if first:
            first.clear()
            barrier.wait(timeout=120)
            time.sleep(delay)
        return champion

    registry.current_champion = read_then_wait
    with mlflow.start_run(experiment_id=experiment_id):
        decisions.put(register.run(config.load(TINY), model_uri))


def test_racing_registers_leave_the_alias_on_the_best_version(store):
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    models = {}
    for acc in (0.9, 0.6):
        with mlflow.start_run(experiment_id=experiment_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
            mlflow.log_metric("test_acc", acc, model_id=info.model_id)
        models[acc] = info.model_uri
    spawn = multiprocessing.get_context("spawn")
    barrier, decisions = spawn.Barrier(2), spawn.Queue()
    # Both read "no champion" before either registers; the worse one then writes its alias last.
    procs = [spawn.Process(target=register_after_barrier,
                           args=(store["MLFLOW_TRACKING_URI"], experiment_id, models[acc], barrier, delay, decisions))
             for acc, delay in ((0.9, 0.0), (0.6, 3.0))]
    for proc in procs:
        proc.start()
    results = [decisions.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert all(d["alias_moved"] and d["champion_version"] is None for d in results), results  # they did overlap
    champion = MlflowClient().get_model_version_by_alias("cifar10-resnet", "champion")
    assert float(champion.tags["test_acc"]) == pytest.approx(0.9)


def test_dead_tracking_server_fails_within_a_minute_exit_4_and_the_rerun_resumes(tmp_path):
    """The project's own HTTP retry defaults (no MLFLOW_HTTP_REQUEST_* set), through the module entry point."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_tracking_server(tmp_path, port)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_TRACKING_URI": uri, "PIPELINE_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "pipeline.main", "--params", TINY, "--epochs", "4",
               "--overrides", "tracking.experiment=e2e"]
    try:
        MlflowClient(uri).create_experiment("e2e")
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_checkpoint(tmp_path / "checkpoints", proc)
        kill_tree(server.pid)
        server.wait(timeout=30)
        start = time.monotonic()
        _, err = proc.communicate(timeout=300)  # bounded retries: it must give up, not hang
        assert proc.returncode == 4, err[-3000:]
        assert time.monotonic() - start < 75  # README: "fails within about a minute" (MLflow's defaults: minutes)
        assert f"error: tracking server {uri} failed" in err and "rerun the same command to resume" in err

        server = start_tracking_server(tmp_path, port)
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
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
