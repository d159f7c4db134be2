"""Fault tolerance: resume after a kill or Ctrl-C, never take over a live run, fail loudly (with the README's
exit code) on a dead server and resume once it is back. Divergence, bad params, concurrent starts and
registers: test_failures.py (a file of its own, so that pytest-xdist runs the two side by side)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import h5py
import keras
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from bench.servers import free_port, start_tracking_server, stop_group
from pipeline import config
from pipeline.fitting import Checkpoint, learning_rate
from tests.conftest import ROOT, Host, Launcher, copy_store, eventually, http_stub, module_code, stopping_signals_raise

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


def start_main(launcher: Launcher, env: dict, *args: str) -> Host:
    """`python -m pipeline.main --params TINY ARGS...` in the background (no `mlflow run` around it: a process
    fewer, where what `mlflow run` adds is not what a test is about), started by conftest's `launcher`."""
    return launcher.start(env, module_code("pipeline.main", ["--params", TINY, *args]))


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send `sig` (SIGKILL: like a machine dying) to a process and all its descendants; their ids. (`mlflow run`
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
    return victims


def wait_until_stopped(pids: list[int], timeout: float = 5) -> None:
    """Block until every thread of `pids` is stopped (or gone): `kill` returns before a SIGSTOP has stopped a thread
    running on another core, which may still begin a transaction meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for pid in pids:
            for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
                with contextlib.suppress(OSError):
                    states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        if all(state in ("T", "t", "Z", "X") for state in states):
            return
        time.sleep(0.01)


def wait_for_checkpoint(root: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until some train run has checkpointed its first completed epoch, then SIGSTOP the process tree (within
    a poll of it): the next epoch cannot end before what the test does next, however loaded the machine is (a second's
    sleep instead let a process that a loaded machine ran while this one waited to wake train on); SIGCONT it after."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(root.glob("*/training_metadata.json")):  # (written last, by a rename: the checkpoint is whole)
            wait_until_stopped(kill_tree(proc.pid, signal.SIGSTOP))
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before a checkpoint: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("no checkpoint within the timeout")


def experiment_runs(client: MlflowClient, filter_string: str = "") -> list:
    return client.search_runs([client.get_experiment_by_name("e2e").experiment_id], filter_string)


def sigterm_while_ending(monkeypatch, picks) -> list[str]:
    """Make MLflow's end of the first run `picks(client, run_id, status)` selects send this process SIGTERM, whose
    handler raises there, before the status is written; returns the list that run's id is put in."""
    set_terminated, signalled = MlflowClient.set_terminated, []

    def ended(self, run_id, status=None, *args, **kwargs):
        if not signalled and picks(self, run_id, status):
            signalled.append(run_id)
            os.kill(os.getpid(), signal.SIGTERM)
        return set_terminated(self, run_id, status, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_terminated", ended)
    return signalled


def stale_locks_removed_beside(holder: subprocess.Popen, experiment_id: str):
    """A main's `resume.remove_stale_locks()` run once `holder` (a process printing "held" once it holds its locks)
    holds them; `holder` killed after. Returns that main's run."""
    from pipeline.tracking import resume

    try:
        assert holder.stdout.readline() == "held\n"
        with mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}) as rerun:
            resume.remove_stale_locks()
    finally:
        holder.kill()
        holder.wait()
    return rerun


def metric_steps(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    history = client.get_metric_history(run_id, key)
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), (key, sorted(steps))  # no epoch logged twice
    return {m.step: m.value for m in history}


# A step schedule that decays after epoch 2 of 3, so the resumed run (killed after epoch 1) crosses it. The experiment
# is a param too, so that `mlflow run --experiment-name e2e` and `python -m pipeline.main` in this process (its
# runs in `tracking.experiment`) are one command: the same job (resume.train_key), runs in one experiment.
STEP_SCHEDULE = "train.schedule=step train.lr_boundaries=[0.5] tracking.experiment=e2e"
# Fewer images than tiny's, for commands run in this process that nothing interrupts in an epoch, and a smaller model:
# one stage of basic blocks (what a resume, a failure or a checkpoint does is the same for any model; each training,
# scoring and loading of it traces fewer layers: ~2 CPU-s less a training here).
SMALL_MODEL = "model.block=basic model.widths=[16] model.strides=[1]"
FEWER = f"data.synthetic_train=256 data.synthetic_test=64 evaluate.samples=1 {SMALL_MODEL}"
# Tiny's own images (and SMALL_MODEL), for a command stopped as epoch 1's checkpoint lands and the reruns that must be
# the same command: `wait_for_checkpoint` stops its tree within a poll of that, however short the
# epochs (2,048 images were for a signal sent a second later). The experiment: see STEP_SCHEDULE.
IN_E2E = f"tracking.experiment=e2e {SMALL_MODEL}"


def stop_holding_no_store_lock(pid: int, db: Path, tries: int = 50) -> None:
    """SIGSTOP the process tree at a moment it holds no lock on the SQLite store: stopped inside a transaction (its
    system metrics are written every second) it would lock the store for every other process, which is SQLite's
    nature and not what a test of the training lock is about."""
    for _ in range(tries):
        wait_until_stopped(kill_tree(pid, signal.SIGSTOP))
        probe = sqlite3.connect(db, timeout=0.2)
        try:
            probe.execute("BEGIN EXCLUSIVE")
            probe.rollback()
            return
        except sqlite3.OperationalError:  # locked: let it finish that transaction, then stop it again
            kill_tree(pid, signal.SIGCONT)
            time.sleep(0.3)
        finally:
            probe.close()
    raise AssertionError(f"the store stayed locked at {tries} tries to stop process {pid}")


def test_a_live_run_is_never_taken_over_and_a_killed_one_resumes(store, tmp_path, in_process, launcher):
    store = {**store, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}  # system metrics every second, not 10
    overrides = f"{STEP_SCHEDULE} {SMALL_MODEL}"
    live = start_main(launcher, store, "--epochs", "3", "--overrides", overrides)
    wait_for_checkpoint(tmp_path / "checkpoints", live)
    stop_holding_no_store_lock(live.pid, tmp_path / "mlflow.db")  # alive, holding its training lock, no progress
    # The identical command, while the first one trains (`python -m pipeline.main`, run in this process: another
    # process than the first's all the same)
    command = ("--params", TINY, "--epochs", "3", "--overrides", overrides)
    try:
        second = in_process("main", *command, env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    finally:
        kill_tree(live.pid)  # now the first one dies without a word, like a machine going down
        live.wait(timeout=30)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming train run" not in second.stdout

    client = MlflowClient()
    runs = {r.info.status: r for r in experiment_runs(client, "tags.step = 'train'")}
    assert sorted(runs) == ["FINISHED", "RUNNING"]  # two runs; nobody was left to mark the killed one
    killed, uninterrupted = runs["RUNNING"], runs["FINISHED"]
    # it said why it trained afresh, the identical run there to resume being live (it started from scratch unsaid)
    assert (f"note: train run {killed.info.run_id}, of the same params and data, is being trained by another process "
            f"now; this command trains a run of its own") in second.stderr, second.stderr[-3000:]
    done = in_process("main", *command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming train run {killed.info.run_id}" in done.stdout
    assert "Epoch 1/3" not in done.stdout + done.stderr and "Epoch 3/3" in done.stdout  # from the checkpoint on

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
    # System metrics were sampled before and after the kill, their steps going on (metric_steps: none twice).
    cpu = metric_steps(client, resumed.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and all(0 <= value <= 100 for value in cpu.values()), cpu
    parents = experiment_runs(client, "tags.step = 'main'")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED", "KILLED"]  # rerun marks it KILLED
    assert not (tmp_path / "checkpoints" / killed.info.run_id).exists()  # a finished run drops its checkpoint
    assert len(client.search_model_versions("name = 'cifar10-resnet'")) == 2


def test_a_killed_run_resumes_after_an_identical_prepare_run_on_its_own(store, tmp_path, in_process, launcher):
    """A rerun found the newest identical prepare run: one run on its own after the kill (`-e prepare`) gave the rerun
    another dataset URI, so another `train_key`, and it trained afresh, the killed run left RUNNING. Every command
    now reuses the first, whose dataset the killed run trained on."""
    # killed after the first of two epochs, frozen as its checkpoint lands (the experiment: see STEP_SCHEDULE)
    killed = start_main(launcher, store, "--epochs", "2", "--overrides", IN_E2E)
    wait_for_checkpoint(tmp_path / "checkpoints", killed)
    kill_tree(killed.pid)
    killed.wait(timeout=30)
    prepared = in_process("prepare", "--params", TINY, "--overrides", IN_E2E)  # `python -m pipeline.prepare`
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert len(client.search_runs(experiments, "tags.step = 'prepare'")) == 2  # two identical prepare runs
    done = in_process("main", "--params", TINY, "--epochs", "2", "--overrides", IN_E2E)  # the same command
    assert done.returncode == 0, done.stderr[-3000:]
    train = client.search_runs(experiments, "tags.step = 'train'")
    assert len(train) == 1 and train[0].info.status == "FINISHED"  # the killed run, resumed
    assert f"resuming train run {train[0].info.run_id}" in done.stdout
    assert "Epoch 1/2" not in done.stdout + done.stderr and "Epoch 2/2" in done.stdout


@pytest.mark.parametrize("ends", ["before", "after"])
def test_identical_prepares_started_together_give_every_command_one_dataset(store, monkeypatch, ends):
    """Two identical commands started together each prepare. One trained on its own dataset URI while every later
    command found the other's (the first to start): killed, its rerun trained afresh. Here the other prepare starts
    first and ends `ends` this one: this command trains on the dataset later ones find."""
    from pipeline import prepare

    cfg = config.load(ROOT / TINY, "data.synthetic_train=64 data.synthetic_test=32 tracking.experiment=e2e")
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    real_run, others = prepare.run, []

    def beside(cfg, *, key):  # noqa: ANN001, ANN202 - prepare.run's signature
        others.append(client.create_run(experiment_id, start_time=int(time.time() * 1000) - 60_000,
                                        tags={"prepare_key": key}).info.run_id)
        if ends == "before":
            client.set_terminated(others[0], "FINISHED")
        return real_run(cfg, key=key)

    monkeypatch.setattr(prepare, "run", beside)
    trained_on, key = prepare.ensure_prepared(cfg), prepare.prepare_key(cfg)
    if ends == "after":
        client.set_terminated(others[0], "FINISHED")
    finished = client.search_runs([experiment_id], f"tags.prepare_key = '{key}' and attributes.status = 'FINISHED'")
    assert len(finished) == 2
    assert prepare.find_prepared(key) == trained_on


class Killed(BaseException):
    """Stands for SIGKILL in the middle of a checkpoint: nothing after it runs, no handler, no cleanup."""


def test_a_prepared_dataset_gone_from_the_artifact_store_is_prepared_anew(store, tmp_path, in_process):
    """The dataset file of the prepare run every identical command reuses, gone from the artifact store (its folder
    removed to free the disk, a copy of the store without its artifacts): every command was refused with exit 2,
    "dataset_uri: cannot read runs:/.../dataset.npz (Failed to download artifacts ...)", for good. Now that run is
    passed over, with a note, and the data prepared anew."""
    command = ["--params", TINY, "--epochs", "1", "--overrides", f"tracking.experiment=e2e {FEWER}"]
    assert in_process("prepare", *command[:2], *command[4:]).returncode == 0
    (gone,) = experiment_runs(MlflowClient(), "tags.step = 'prepare'")
    (tmp_path / "artifacts" / gone.info.run_id / "artifacts" / "dataset" / "dataset.npz").unlink()

    done = in_process("main", *command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"note: prepare run {gone.info.run_id} holds no dataset/dataset.npz any more (its artifacts removed?): "
            f"not reused") in done.stderr
    (train,) = experiment_runs(MlflowClient(), "tags.step = 'train'")
    prepared = train.data.tags["dataset_uri"]
    assert prepared.startswith("runs:/") and gone.info.run_id not in prepared


@pytest.mark.parametrize("dies", ["writing the weights", "before the metadata is replaced"])
def test_a_checkpoint_killed_while_written_restores_the_epoch_before_whole(tmp_path, monkeypatch, dies):
    """Keras's own BackupAndRestore overwrites one weights file in place: killed during that write, its resume
    fails on a torn HDF5 file; killed after it, it restores the new weights under the old epoch."""
    import numpy as np

    def model():
        keras.utils.set_random_seed(0)
        net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        net.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
        return net

    x, y = np.random.default_rng(0).normal(size=(64, 4)), np.random.default_rng(1).normal(size=(64, 3))
    trained, saved = model(), []
    save_weights = trained.save_weights

    def save_or_die(filepath, overwrite=True):
        if saved and dies == "writing the weights":
            Path(filepath).write_bytes(Path(filepath.replace("0002", "0001")).read_bytes()[:500])  # half written
            raise Killed
        save_weights(filepath, overwrite=overwrite)
        saved.append([w.copy() for w in trained.get_weights()])

    def replace_or_die(src, dst):
        if len(saved) == 2:
            raise Killed
        os.rename(src, dst)

    monkeypatch.setattr(trained, "save_weights", save_or_die)
    monkeypatch.setattr("pipeline.fitting.os.replace", replace_or_die)
    with pytest.raises(Killed):
        trained.fit(x, y, epochs=3, verbose=0, callbacks=[Checkpoint(tmp_path / "checkpoint")])
    monkeypatch.undo()

    restored = model()
    callback = Checkpoint(tmp_path / "checkpoint")
    callback.set_model(restored)
    callback.on_train_begin()
    assert restored._initial_epoch == 1  # the last epoch whose checkpoint was complete
    for got, want in zip(restored.get_weights(), saved[0], strict=True):
        np.testing.assert_array_equal(got, want)  # its weights, not the next epoch's or a torn file's
    assert restored.optimizer.iterations.numpy() == 2  # 64 images in batches of 32: one epoch's steps
    history = restored.fit(x, y, epochs=3, verbose=0, callbacks=[callback])
    assert history.epoch == [1, 2] and not (tmp_path / "checkpoint").exists()  # it went on, then dropped the checkpoint


@pytest.mark.parametrize(("every", "held"), [(2, [0, 2, 2, 4, 4]), (0, [0, 0, 0, 0, 0])])
def test_checkpoints_every_n_epochs_or_none(tmp_path, every, held):
    """train.checkpoint_every: the epoch the checkpoint holds after each of 5 epochs; the folder goes at the end."""
    import numpy as np

    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    net.compile("sgd", "mse")
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda *_: seen.append(Checkpoint.completed_epochs(tmp_path / "c")))
    net.fit(np.zeros((8, 4)), np.zeros((8, 3)), epochs=5, verbose=0,
            callbacks=[Checkpoint(tmp_path / "c", every), record])
    assert seen == held
    assert not (tmp_path / "c").exists()


def test_a_resume_with_long_changed_values_keeps_tag_resumed_with_under_mlflows_limit(store, monkeypatch):
    """A rerun resuming a run with other params that leave what is trained as it is (`resumed_with`) and long values
    (data.source spelled otherwise: a long path, relative to the folder it ran in, then absolute; a long
    register.model_name) made a tag past MLflow's 8,000 characters: cut mid-value with a warning, or refused
    (MLFLOW_TRUNCATE_LONG_VALUES=false, a store that enforces its column), and the resume failed. The tag now says
    how many changed, each value shortened with an ellipsis, and artifact resumed_with.txt holds them whole."""
    import dataclasses

    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    from pipeline.tracking.resume import RESUMED_WITH, log_train_params

    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")  # refused past the limit, not cut
    cfg = config.load(TINY)
    folder = "a-long-folder-name/" * 200 + "cifar.npz"  # 3,809 characters
    first = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=folder),
                                register=dataclasses.replace(cfg.register, model_name="m" * 250))
    rerun = dataclasses.replace(first, data=dataclasses.replace(first.data, source="/data/" + folder),
                                register=dataclasses.replace(first.register, model_name="n" * 250))
    dataset_uri = "runs:/0123456789abcdef/dataset/dataset.npz"
    with mlflow.start_run(experiment_id=MlflowClient().get_experiment_by_name("e2e").experiment_id) as run:
        log_train_params(first, dataset_uri)
        log_train_params(rerun, dataset_uri)  # as a resumed session logs them
    tag = MlflowClient().get_run(run.info.run_id).data.tags["resumed_with"]
    assert len(tag) <= MAX_TAG_VAL_LENGTH
    assert tag.startswith(f"2 params changed (whole values in artifact {RESUMED_WITH}): data.source=/data/a-long")
    assert f"(logged {folder[:100]}" in tag
    assert "…" in tag and "register.model_name=nnnn" in tag and "(logged mmmm" in tag
    whole = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{RESUMED_WITH}")
    assert whole == (f"data.source=/data/{folder} (logged {folder}), "
                     f"register.model_name={'n' * 250} (logged {'m' * 250})\n")


@pytest.mark.parametrize("uploaded", [False, True], ids=["upload-fails", "fails-after-upload"])
def test_a_failure_after_training_keeps_the_trained_weights_and_the_rerun_logs_them_without_training(
        store, tmp_path, monkeypatch, in_process, uploaded):
    """Logging the model (the largest upload) comes after `fit`: the checkpoint outlives `fit` until the model is
    logged, its last epoch saved even between `train.checkpoint_every` saves, so a rerun trains nothing again.
    A failure after the model is logged whole (before the step ends): the rerun keeps that model, no second one. An
    upload cut short (a kill, Ctrl-C, which MLflow's own clean-up does not catch) left its model PENDING beside the
    rerun's for good; the rerun marks it FAILED, as MLflow marks an upload that raised."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    from pipeline import train
    from pipeline.tracking.training import log_model

    command = ["--params", TINY, "--epochs", "3", "--overrides",
               f"tracking.experiment=e2e {FEWER} train.checkpoint_every=2"]
    log_trained_model = train.log_trained_model

    def upload_fails(run_id, *args, **kwargs):
        if uploaded:
            log_model(*args, **kwargs)
        else:  # cut short: its model made, PENDING, its files not all there
            mlflow.initialize_logged_model(name="model", source_run_id=run_id)
        raise MlflowException("the artifact store went away")

    monkeypatch.setattr(train, "log_trained_model", upload_fails)
    with pytest.raises(MlflowException, match="went away"):  # a traceback on a local store (exit 4 from a server)
        in_process("train", *command)
    (folder,) = (tmp_path / "checkpoints").iterdir()
    assert Checkpoint.completed_epochs(folder) == 3  # the last epoch, though checkpoints come every 2

    monkeypatch.setattr(train, "log_trained_model", log_trained_model)
    # with settings that leave what is trained as it is: the run goes on all the same, and records them
    command[-1] = f"tracking.experiment=e2e {FEWER} train.checkpoint_every=1 register.alias=best"
    done = in_process("train", *command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming train run" in done.stdout and "Epoch " not in done.stdout  # not one epoch trained again
    run = MlflowClient().get_run(folder.name)
    assert run.data.params["train.checkpoint_every"] == "2"  # as logged: MLflow params are immutable
    assert run.data.tags["resumed_with"] == ("register.alias=best (logged champion), "
                                             "train.checkpoint_every=1 (logged 2)")
    assert run.info.status == "FINISHED" and "logged model" in done.stdout
    assert sorted(m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_acc")) == [1, 2, 3]
    for key in ("train_images", "val_images", "val_images_in_train"):  # once, though each session logs them
        assert list(metric_steps(MlflowClient(), run.info.run_id, key)) == [0], key
    assert not folder.exists()  # gone once the model is logged
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    ready = [m.model_uri for m in models if m.status == LoggedModelStatus.READY]
    assert ready == [run.data.tags["model_uri"]]  # one model, the first if it was whole
    assert [m.status for m in models if m.model_uri not in ready] == ([] if uploaded else [LoggedModelStatus.FAILED])


@pytest.mark.parametrize("again", [[], ["--resume"]], ids=["first-command", "resume-by-id"])
def test_an_extension_stopped_before_it_trained_leaves_a_rerun_of_the_first_command_its_own_epochs(
        store, tmp_path, monkeypatch, in_process, again):
    """`resume=<id>` with more epochs, stopped (Ctrl-C) while its data loaded or its model was built: the run's tag
    `extended_epochs`, run name and description kept the longer count, though a rerun of the first command, which
    resumes it (its `train_key` is still that command's), trained it to the first count: `2 -> 3`, `-e3-`, "3
    epochs" on a model of 2. The first command with `resume=<id>` was refused ("can only keep or extend its 3
    epochs, got 2") though the run had trained on the 2 epochs' schedule alone: it goes on as the plain rerun does."""
    from mlflow.exceptions import MlflowException

    from pipeline import train

    command = ["--params", TINY, "--epochs", "2", "--overrides", f"tracking.experiment=e2e {FEWER}"]
    log_trained_model, compile_model = train.log_trained_model, train.compile_model

    def upload_fails(*args, **kwargs):
        raise MlflowException("the artifact store went away")

    monkeypatch.setattr(train, "log_trained_model", upload_fails)  # trained, not finished: a checkpoint is left
    with pytest.raises(MlflowException, match="went away"):
        in_process("train", *command)
    monkeypatch.setattr(train, "log_trained_model", log_trained_model)
    (folder,) = (tmp_path / "checkpoints").iterdir()
    run_id = folder.name

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "compile_model", ctrl_c)
    stopped = in_process("train", *command[:3], "3", *command[4:], "--resume", run_id)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    monkeypatch.setattr(train, "compile_model", compile_model)

    done = in_process("train", *command, *(again and [*again, run_id]))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming train run {run_id}" in done.stdout and "Epoch " not in done.stdout
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and not {"extended_epochs", "extended_after_epoch"} & {*run.data.tags}
    assert "-e2-" in run.info.run_name and ", 2 epochs," in run.data.tags["mlflow.note.content"]


def test_an_extension_that_trained_is_not_shrunk_back_and_says_why(store, tmp_path, monkeypatch, in_process):
    """An extension from 1 epoch to 2 that trained on their schedule (its model's upload failed after): `resume=<id>`
    with the first command's 1 epoch is refused, one line naming the extension and the counts that go on with it."""
    from mlflow.exceptions import MlflowException

    from pipeline import train

    command = ["--params", TINY, "--epochs", "1", "--overrides", f"tracking.experiment=e2e {FEWER}"]

    def upload_fails(*args, **kwargs):
        raise MlflowException("the artifact store went away")

    monkeypatch.setattr(train, "log_trained_model", upload_fails)  # trained, not finished: a checkpoint is left
    with pytest.raises(MlflowException, match="went away"):
        in_process("train", *command)
    (folder,) = (tmp_path / "checkpoints").iterdir()
    run_id = folder.name
    with pytest.raises(MlflowException, match="went away"):
        in_process("train", *command[:3], "2", *command[4:], "--resume", run_id)
    assert Checkpoint.completed_epochs(folder) == 2
    refused = in_process("train", *command, "--resume", run_id)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: train.epochs: run {run_id} was extended from 1 to 2 epochs and trained on their schedule since: "
        f"resuming it can only keep or extend its 2 epochs, got 1 (resume=never starts afresh)")


def test_the_model_kept_on_a_rerun_is_one_logged_whole_after_the_last_epoch(store):
    """What `log_trained_model` reuses: a READY model of the run, newer than its last logged epoch. A run resumed
    for more epochs after its model was logged (extended) logs a new one, with the new weights."""
    from pipeline.tracking.training import logged_model_of

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    mlflow.set_experiment("e2e")
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        assert logged_model_of(run_id) is None  # nothing logged yet
        mlflow.log_metric("loss", 1.0, step=1)
        first = mlflow.pyfunc.log_model(name="model", python_model=Echo()).model_uri
        assert logged_model_of(run_id) == first  # logged after epoch 1: kept
        time.sleep(0.01)
        mlflow.log_metric("loss", 0.5, step=2)  # the run went on for another epoch
        assert logged_model_of(run_id) is None
        second = mlflow.pyfunc.log_model(name="model", python_model=Echo()).model_uri
        assert logged_model_of(run_id) == second != first


def test_a_pipeline_that_failed_after_training_goes_on_from_the_trained_model(store, monkeypatch, in_process):
    """The tracking server lost in evaluate or register (exit 4: "rerun the same command to resume"): the rerun
    evaluates and registers the model already trained, it does not train the recipe again."""
    from mlflow.exceptions import MlflowException

    from pipeline import register
    from pipeline.tracking import resume

    command = ["--params", TINY, "--epochs", "2", "--overrides", f"tracking.experiment=e2e {FEWER}"]
    register_run = register.run

    def registry_fails(*args, **kwargs):
        raise MlflowException("the registry went away")

    monkeypatch.setattr(register, "run", registry_fails)
    with pytest.raises(MlflowException, match="went away"):
        in_process("main", *command)
    client = MlflowClient()
    (failed,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "tags.step = 'main'")
    assert failed.info.status == "FAILED"
    (trained,) = client.search_runs([failed.info.experiment_id], "tags.step = 'train'")
    # what the command's main asks before it trains: the model trained before the failure
    cfg, dataset_uri = config.load(ROOT / TINY, f"train.epochs=2 {command[-1]}"), trained.data.tags["dataset_uri"]
    assert resume.trained_before_a_failure(cfg, dataset_uri) == (trained.info.run_id, trained.data.tags["model_uri"])

    monkeypatch.setattr(register, "run", register_run)
    done = in_process("main", *command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reusing train run" in done.stdout and "Epoch " not in done.stdout
    assert len(client.search_runs([failed.info.experiment_id], "tags.step = 'train'")) == 1  # one training, not two
    version = client.get_model_version_by_alias("cifar10-resnet", "champion")
    assert version.tags["run_id"] == trained.info.run_id
    assert client.get_run(trained.info.run_id).data.tags["pipeline_done"] != failed.info.run_id  # the rerun's main
    # a finished pipeline is not reused: an identical command trains anew (main.run trains where this is None)
    assert resume.trained_before_a_failure(cfg, dataset_uri) is None


def test_a_main_that_lost_its_store_leaves_its_lock_for_the_next_main(store, in_process):
    """The tracking server lost (exit 4) in evaluate or register: the main could not end its runs, left RUNNING,
    and it removed its lock folder all the same: no later main told it from a live one (another host's), its runs
    stayed RUNNING for good and a rerun trained again instead of going on from its model. Its lock file goes only
    once its run has ended: the next main finds it dead and ends it KILLED."""
    from mlflow.exceptions import MlflowException

    from pipeline import main
    from pipeline.tracking import resume

    def lost(*args, **kwargs):
        raise MlflowException("the tracking server went away")

    def server_lost(*args, **kwargs):  # nothing reaches the store any more, ending a run neither
        patch.setattr(MlflowClient, "set_terminated", lost)
        lost()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(main, "run", server_lost)
        with pytest.raises(MlflowException, match="went away"):  # a traceback on a local store (exit 4 from a server)
            in_process("main", "--params", TINY, "--overrides", "tracking.experiment=e2e")
    experiment_id = mlflow.get_experiment_by_name("e2e").experiment_id
    (lost_main,) = experiment_runs(MlflowClient())
    assert lost_main.info.status == "RUNNING"
    assert [p.name for p in resume.checkpoint_dir(lost_main.info.run_id).iterdir()] == [resume.LOCK_FILE]
    assert lost_main.info.run_id not in resume._claimed  # released: the next main takes it for a dead main's
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}) as rerun:
        resume.remove_stale_locks()
    run = MlflowClient().get_run(lost_main.info.run_id)
    assert (run.info.status, run.data.tags.get("ended_by")) == ("KILLED", rerun.info.run_id)
    assert not resume.checkpoint_dir(lost_main.info.run_id).exists()


def test_an_empty_checkpoint_dir_variable_is_the_default_folder_not_the_working_directory(store, tmp_path,
                                                                                          monkeypatch):
    """`PIPELINE_CHECKPOINT_DIR=` (set, but empty: a CI file's blank value) made the working directory the checkpoint
    root: a main removed every empty folder older than 10 s in it (`remove_stale_locks`, a user's own folders too)
    and trained runs' checkpoints into it. An empty value is unset: the project's `checkpoints/`."""
    import pipeline.tracking
    from pipeline.tracking import resume

    monkeypatch.setattr(pipeline.tracking, "PROJECT_ROOT", tmp_path / "project")
    work = tmp_path / "work"
    (work / "photos").mkdir(parents=True)
    os.utime(work / "photos", (time.time() - 3600, time.time() - 3600))  # an hour old: no new run's folder
    monkeypatch.chdir(work)
    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", "")
    resume.remove_stale_locks()  # as every main does first
    assert (work / "photos").is_dir()
    assert resume.checkpoint_dir("0" * 32) == tmp_path / "project" / "checkpoints" / ("0" * 32)


def test_a_checkpoint_root_of_other_uses_keeps_its_empty_folders(store, tmp_path, monkeypatch):
    """`PIPELINE_CHECKPOINT_DIR=$HOME` (a folder of other uses): every main removed each empty folder older than 10 s
    in it (`remove_stale_locks`), a user's own too. Only those named as a run's or another host's are removed."""
    from pipeline.tracking import resume

    home = tmp_path / "home"
    old = time.time() - 3600  # an hour old: no new run's folder
    for name in ("photos", "a" * 32, "worker1-" + "b" * 16, "A" * 32):
        (home / name).mkdir(parents=True)
        os.utime(home / name, (old, old))
    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(home))
    resume.remove_stale_locks()  # as every main does first
    assert sorted(p.name for p in home.iterdir()) == ["A" * 32, "photos"]


def test_prune_checkpoints_removes_those_of_deleted_runs_alone(store, tmp_path, monkeypatch, capsys):
    """A run killed after a checkpoint keeps its folder for a rerun to resume; deleted in MLflow (`mlflow runs delete`,
    its experiment deleted, `mlflow gc`), nothing ever removed that folder. `python -m pipeline.tracking
    --prune-checkpoints` removes those, naming each, and never the folder of a run present (ended or live), of a
    deleted run a live process holds, of another store's run, nor a host's folder."""
    import runpy
    import uuid

    from pipeline.tracking import resume

    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    elsewhere = client.create_experiment("elsewhere")
    root = tmp_path / "checkpoints"

    def checkpointed(run_id: str, store: str | None = None) -> Path:
        (root / run_id).mkdir(parents=True)
        (root / run_id / resume.LOCK_FILE).write_text(store or resume._store())
        (root / run_id / resume.CHECKPOINT_METADATA).write_text("{}")
        return root / run_id

    def run(experiment_id: str = experiment, status: str = "KILLED") -> str:
        run_id = client.create_run(experiment_id, tags={"step": "train"}).info.run_id
        client.set_terminated(run_id, status)
        return run_id

    binned, held, kept, in_binned = run(), run(), run(), run(elsewhere)
    live = client.create_run(experiment, tags={"step": "train"}).info.run_id  # RUNNING, its process holds the lock
    gone, others = uuid.uuid4().hex, uuid.uuid4().hex  # no run of this store: as after `mlflow gc`
    for run_id in (binned, held, kept, in_binned, live, gone):
        checkpointed(run_id)
    checkpointed(others, store="http://other-host:5000")
    (root / f"worker1-{'c' * 16}").mkdir()
    client.delete_run(binned)
    client.delete_run(held)
    client.delete_experiment(elsewhere)
    holders = [subprocess.Popen(["flock", str(root / r / resume.LOCK_FILE), "sh", "-c", "echo held; sleep 60"],
                                stdout=subprocess.PIPE, text=True) for r in (held, live)]
    try:
        assert [holder.stdout.readline() for holder in holders] == ["held\n"] * 2  # as a training process holds it
        monkeypatch.setattr(sys, "argv", ["pipeline.tracking", "--prune-checkpoints"])
        runpy.run_module("pipeline.tracking", run_name="__main__")  # exits only on a failure
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
            holder.stdout.close()
    out = capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == sorted([held, kept, live, others, f"worker1-{'c' * 16}"])
    for run_id in (binned, in_binned):
        assert f"removed {root / run_id} (its run is in MLflow's trash)" in out
    assert f"removed {root / gone} (no such run in this store (mlflow gc))" in out
    assert out.endswith(f"3 checkpoint folders of deleted runs removed from {root}\n"), out


def test_another_dataset_written_to_a_local_dataset_uri_is_another_job(tmp_path):
    """`-e train -P dataset_uri=PATH` (a local prepared file) was known by its path alone: killed, then rerun after
    another dataset was written to that path, it resumed the old data's weights and trained them on the new data."""
    from pipeline import data
    from pipeline.tracking import json_digest, resume

    cfg, path = config.load(ROOT / TINY), tmp_path / "dataset.npz"
    data.make_synthetic(n_train=20, n_test=10, seed=0).save(path)
    first = resume.train_key(cfg, str(path))
    assert resume.train_key(cfg, str(path)) == first  # the same file: the same job, which a rerun goes on with
    data.make_synthetic(n_train=20, n_test=10, seed=1).save(path)
    assert resume.train_key(cfg, str(path)) != first
    assert resume.train_key(cfg, f"file://{path}") != first
    uri = "runs:/0123/dataset/dataset.npz"  # an artifact, which never changes: the key runs were tagged with
    assert resume.train_key(cfg, uri) == json_digest({**resume.training_params(cfg), "dataset_uri": uri})
    with pytest.raises(data.DataError, match=r"^dataset_uri: .*gone.npz: cannot be read \(No such file"):
        resume.train_key(cfg, str(tmp_path / "gone.npz"))


def test_one_data_file_however_spelled_is_one_prepare_and_one_training_job(store, tmp_path, monkeypatch):
    """`-P data=../shared/x` and its absolute path (or a link to it) named one file but were two `data.source`
    values: a second prepare, and a killed run not resumed by a rerun spelling its data the other way (another
    train_key). The keys take the file the path leads to; the logged param keeps the spelling given."""
    from pipeline import data, prepare
    from pipeline.tracking import resume

    (tmp_path / "d").mkdir()
    data.make_synthetic(n_train=64, n_test=32, seed=0).save(tmp_path / "d" / "x.npz")
    (tmp_path / "link.npz").symlink_to(tmp_path / "d" / "x.npz")
    monkeypatch.chdir(tmp_path / "d")  # relative spellings from here, as `mlflow run` runs from the project
    spellings = ["x.npz", str(tmp_path / "d" / "x.npz"), "../d/x.npz", str(tmp_path / "link.npz")]
    cfgs = [config.load(ROOT / TINY, f"data.source={s} tracking.experiment=e2e") for s in spellings]
    assert [c.data.source for c in cfgs] == spellings  # as given, in the logged params
    assert len({prepare.prepare_key(c) for c in cfgs}) == 1
    first = prepare.ensure_prepared(cfgs[0])
    assert all(prepare.ensure_prepared(c) == first for c in cfgs[1:])  # prepared once, reused by every spelling
    assert len({resume.train_key(c, first) for c in cfgs}) == 1  # one job: a rerun spelled otherwise resumes it
    data.make_synthetic(n_train=64, n_test=32, seed=1).save(tmp_path / "d" / "y.npz")  # another file: another job
    other = config.load(ROOT / TINY, "data.source=y.npz tracking.experiment=e2e")
    assert prepare.prepare_key(other) != prepare.prepare_key(cfgs[0])
    assert resume.train_key(other, first) != resume.train_key(cfgs[0], first)


def test_a_model_trained_by_other_code_is_not_gone_on_from(store, monkeypatch):
    """The same params and data, but the code that trains and serves a model changed since the failed pipeline
    trained one (an edit, a pull): the rerun trains anew instead of registering the old code's model."""
    from pipeline.tracking import resume

    cfg, dataset_uri = config.load(ROOT / TINY), "runs:/0123/dataset/dataset.npz"
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    train_tags = {"step": "train", "model_uri": "models:/m-0123", "train_key": resume.train_key(cfg, dataset_uri),
                  "train_code": resume.train_code()}
    # a main that ended without tagging its train run pipeline_done, as one that failed after training
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}), \
            mlflow.start_run(nested=True, tags=train_tags) as trained:
        pass
    assert resume.trained_before_a_failure(cfg, dataset_uri) == (trained.info.run_id, "models:/m-0123")
    monkeypatch.setattr(resume, "TRAIN_CODE", (*resume.TRAIN_CODE, "evaluate"))  # other code, the same command
    assert resume.trained_before_a_failure(cfg, dataset_uri) is None


def test_a_model_whose_main_was_deleted_for_good_is_not_gone_on_from_and_the_rerun_trains(store):
    """A main that failed after training, then deleted and purged (`mlflow runs delete`, `mlflow gc`): every rerun of
    the command died on MLflow's "Run with id=... not found" traceback (exit 1), each leaving a FAILED main, as it
    looked that main up to see whether it was live. A train run whose main is gone is not known as a main's: the
    rerun trains anew."""
    from mlflow.tracking._tracking_service.utils import _get_store

    from pipeline.tracking import resume

    cfg, dataset_uri = config.load(ROOT / TINY), "runs:/0123/dataset/dataset.npz"
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    train_tags = {"step": "train", "model_uri": "models:/m-0123", "train_key": resume.train_key(cfg, dataset_uri),
                  "train_code": resume.train_code()}
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}) as main, \
            mlflow.start_run(nested=True, tags=train_tags) as trained:
        pass
    assert resume.trained_before_a_failure(cfg, dataset_uri) == (trained.info.run_id, "models:/m-0123")
    MlflowClient().delete_run(main.info.run_id)
    _get_store()._hard_delete_run(main.info.run_id)  # what `mlflow gc` does to a run in the trash
    assert resume.trained_before_a_failure(cfg, dataset_uri) is None
    assert MlflowClient().get_run(trained.info.run_id).info.status == "FINISHED"  # left as it was


def test_a_pipeline_killed_after_training_is_gone_on_from_and_its_runs_end_killed(store):
    """A main killed by SIGKILL in evaluate or register leaves itself and that step RUNNING: the rerun tells it
    from a live main by the main's claim (free once its process is gone), ends both KILLED and goes on from its
    model, instead of training the recipe again and leaving them RUNNING forever. A live main's model is not taken."""
    from pipeline.tracking import resume

    cfg, dataset_uri = config.load(ROOT / TINY), "runs:/0123/dataset/dataset.npz"
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    train_tags = {"step": "train", "model_uri": "models:/m-0123", "train_key": resume.train_key(cfg, dataset_uri),
                  "train_code": resume.train_code()}
    killed = mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"})  # never ended, as after SIGKILL
    with mlflow.start_run(nested=True, experiment_id=experiment_id, tags=train_tags) as trained:
        pass
    evaluating = mlflow.start_run(nested=True, experiment_id=experiment_id, tags={"step": "evaluate"})
    mlflow.end_run("RUNNING")  # leaves it RUNNING, as a killed process does
    mlflow.end_run("RUNNING")
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}):  # its lock is not here: another host's
        assert resume.trained_before_a_failure(cfg, dataset_uri) is None
    lock = resume.checkpoint_dir(killed.info.run_id) / resume.LOCK_FILE
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}):  # the rerun, main still live
            assert resume.trained_before_a_failure(cfg, dataset_uri) is None
        assert client.get_run(killed.info.run_id).info.status == "RUNNING"
    finally:
        holder.kill()
        holder.wait()
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}) as rerun:  # main's process gone
        assert resume.trained_before_a_failure(cfg, dataset_uri) == (trained.info.run_id, "models:/m-0123")
    for run_id in (killed.info.run_id, evaluating.info.run_id):
        run = client.get_run(run_id)
        assert (run.info.status, run.data.tags.get("resumed_by")) == ("KILLED", rerun.info.run_id)
    assert not lock.parent.exists()


def test_a_step_run_on_its_own_and_killed_is_ended_by_the_next_main(store):
    """A step run on its own (`mlflow run . -e register`, `python -m pipeline.evaluate`) killed by SIGKILL left its run,
    and a register's evaluation of its champion nested in it, RUNNING for good: no main was there to end them. Such a
    step holds its run as a main does (`step_lock`), so the next main ends both KILLED; a live one is left alone, and
    one that ends removes its lock folder."""
    from pipeline.tracking import resume

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    script = ("import sys, time, mlflow\n"
              "from pipeline.tracking.resume import step_lock\n"
              f"with step_lock() as hold, mlflow.start_run(experiment_id='{experiment_id}', "
              "tags={'step': 'register'}) as step:\n"
              "    hold(step)\n"
              f"    nested = mlflow.start_run(nested=True, experiment_id='{experiment_id}',\n"
              "                              tags={'step': 'evaluate'})\n"
              "    print(step.info.run_id, nested.info.run_id, flush=True)\n"
              "    time.sleep(float(sys.argv[1]))\n"
              "    mlflow.end_run()\n")
    steps = {}
    for name, seconds in (("killed", 120), ("live", 120), ("ended", 0)):
        steps[name] = subprocess.Popen([sys.executable, "-c", script, str(seconds)], cwd=ROOT, env=store,
                                       stdout=subprocess.PIPE, text=True)
        steps[name].ids = steps[name].stdout.readline().split()
    try:
        assert steps["ended"].wait(timeout=60) == 0
        assert not resume.checkpoint_dir(steps["ended"].ids[0]).exists()  # a step that ends leaves no lock
        assert (resume.checkpoint_dir(steps["killed"].ids[0]) / resume.LOCK_FILE).exists()
        steps["killed"].kill()
        steps["killed"].wait()
        with mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}) as rerun:
            resume.remove_stale_locks()
        status = {r.info.run_id: (r.info.status, r.data.tags.get("ended_by")) for r in experiment_runs(client)}
        assert [status[r] for r in steps["killed"].ids] == [("KILLED", rerun.info.run_id)] * 2
        assert [status[r] for r in steps["live"].ids] == [("RUNNING", None)] * 2
        assert not resume.checkpoint_dir(steps["killed"].ids[0]).exists()
    finally:
        for process in steps.values():
            process.kill()
            process.wait()


def test_a_main_killed_in_any_step_has_its_runs_ended_killed_by_the_next_main(store, monkeypatch):
    """A main killed (SIGKILL, the OOM killer) in prepare, or in train before its first checkpoint, left itself and
    that step RUNNING for good: only a rerun going on from a trained model or a checkpoint ended them. The next main
    on the machine finds each dead main by its free lock and ends its RUNNING steps and itself KILLED (a main `mlflow
    run` marked FAILED keeps that), as it ends a train run alone killed before its first checkpoint; a live main,
    and a train run a live process resumed, are left alone. Every
    folder's run is read in one search, not one store call per folder."""
    from pipeline.tracking import resume

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id

    def dead(status: str, step: str) -> tuple[str, str]:  # a main and its step as a kill leaves them
        main = mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"})
        child = mlflow.start_run(nested=True, experiment_id=experiment_id, tags={"step": step})
        mlflow.end_run("RUNNING")
        mlflow.end_run(status)
        return main.info.run_id, child.info.run_id

    def lock(run_id: str) -> Path:
        path = resume.checkpoint_dir(run_id) / resume.LOCK_FILE
        path.parent.mkdir(parents=True)
        path.touch()
        return path.parent

    in_prepare, preparing = dead("RUNNING", "prepare")
    failed, training = dead("FAILED", "train")  # the step killed alone: `mlflow run` marked its run FAILED
    live, live_prepare = dead("RUNNING", "prepare")
    resumed_from, resumed = dead("KILLED", "train")  # its train run resumed by a live main (find_resumable)
    alone = mlflow.start_run(experiment_id=experiment_id, tags={"step": "train"}).info.run_id  # pipeline.train alone
    mlflow.end_run("RUNNING")
    for run_id in (in_prepare, failed, training, resumed_from, alone, "0123abcd",
                   *(f"{i:032x}" for i in range(30))):
        lock(run_id)  # the 31 last: lock-only folders of no run here
    (resume.checkpoint_root() / ".DS_Store").touch()  # a stray file, no folder: it failed every main (a traceback)
    held = [str(lock(r) / resume.LOCK_FILE) for r in (live, resumed)]
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; held = [open(p) for p in sys.argv[1:]]; "
                               "[fcntl.flock(f, fcntl.LOCK_EX) for f in held]; print('held', flush=True); "
                               "time.sleep(120)", *held], stdout=subprocess.PIPE, text=True)
    calls = []
    originals = {name: getattr(MlflowClient, name) for name in ("get_run", "search_runs")}
    for name in originals:
        def counted(self, *args, name=name, **kwargs):
            calls.append(name)
            return originals[name](self, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, name, counted)
    rerun = stale_locks_removed_beside(holder, experiment_id)
    assert calls == ["search_runs"] * 4  # the folders' runs, then each of the 3 dead mains' RUNNING steps
    status = {r.info.run_id: (r.info.status, r.data.tags.get("ended_by")) for r in experiment_runs(client)}
    ended = ("KILLED", rerun.info.run_id)
    assert [status[r] for r in (in_prepare, preparing, failed, training, alone)] == [
        ended, ended, ("FAILED", None), ended, ended]
    assert [status[r] for r in (live, live_prepare, resumed_from, resumed)] == [
        ("RUNNING", None), ("RUNNING", None), ("KILLED", None), ("RUNNING", None)]
    assert sorted(p.name for p in resume.checkpoint_root().iterdir()) == sorted([".DS_Store", live, resumed])


def test_a_train_run_alone_killed_after_a_checkpoint_is_ended_killed_by_the_next_main_and_keeps_it(store):
    """`python -m pipeline.train` killed (SIGKILL, the OOM killer) after its first checkpoint left its run RUNNING for
    good: the next mains took only lock-only folders for dead, and a run left so is resumed only by the same command.
    The next main ends it KILLED (a rerun still resumes it: its checkpoint stays); a live one, and a checkpoint of no
    run in this store, are left as they are."""
    from pipeline.tracking import resume

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id

    def train_run(status: str) -> str:
        run_id = mlflow.start_run(experiment_id=experiment_id, tags={"step": "train"}).info.run_id
        mlflow.end_run(status)
        return run_id

    def checkpointed(run_id: str) -> Path:
        folder = resume.checkpoint_dir(run_id)
        folder.mkdir(parents=True)
        (folder / resume.LOCK_FILE).write_text(resume._store())
        (folder / "training_metadata.json").write_text('{"epoch": 1, "weights": "epoch-0001.weights.h5"}')
        (folder / "epoch-0001.weights.h5").touch()
        return folder

    killed, live, interrupted = train_run("RUNNING"), train_run("RUNNING"), train_run("KILLED")
    elsewhere = f"{7:032x}"  # no run of this store's
    folders = [checkpointed(r) for r in (killed, live, interrupted, elsewhere)]
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
                               str(folders[1] / resume.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    rerun = stale_locks_removed_beside(holder, experiment_id)
    status = {r.info.run_id: (r.info.status, r.data.tags.get("ended_by")) for r in experiment_runs(client)}
    assert [status[r] for r in (killed, live, interrupted)] == [
        ("KILLED", rerun.info.run_id), ("RUNNING", None), ("KILLED", None)]
    assert all(resume.has_checkpoint(f.name) and (f / resume.LOCK_FILE).exists() for f in folders)
    assert not resume._claimed  # every folder released: a rerun claims the run it resumes


def test_a_main_ends_only_its_own_stores_dead_runs(store, tmp_path, empty_store_db, monkeypatch):
    """Two tracking stores (two MLFLOW_TRACKING_URI) sharing one checkpoint folder: a main of one removed the lock
    folder of the other's dead main, whose runs then stayed RUNNING for good (only a main of their store can see
    them). A lock file names its store: another store's folder is left to that store's next main. A store is its
    file, however its URI spells it (relative to the working directory, through a symlink), and a lock file made
    before stores were recorded is taken as before."""
    from pipeline.tracking import resume

    copy_store(empty_store_db, tmp_path / "b.db")
    (tmp_path / "link").symlink_to(tmp_path)
    monkeypatch.chdir(tmp_path)
    store_a, store_b = mlflow.get_tracking_uri(), f"sqlite:///{tmp_path / 'b.db'}"
    experiment_a = mlflow.get_experiment_by_name("e2e").experiment_id

    def dead_main(uri: str, experiment_id: str) -> str:  # a main killed (SIGKILL) once it held its lock
        mlflow.set_tracking_uri(uri)
        run_id = mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}).info.run_id
        mlflow.end_run("RUNNING")
        assert resume.claim(run_id)
        resume._claimed.pop(run_id).close()  # its process gone
        return run_id

    of_b = dead_main(store_b, "0")
    spelled = [dead_main(uri, experiment_a) for uri in ("sqlite:///mlflow.db", f"sqlite:///{tmp_path}/link/mlflow.db")]
    (resume.checkpoint_root() / "0123abcd").mkdir()
    (resume.checkpoint_root() / "0123abcd" / resume.LOCK_FILE).touch()  # a lock file naming no store: no run here
    mlflow.set_tracking_uri(store_a)
    with mlflow.start_run(experiment_id=experiment_a, tags={"step": "main"}):
        resume.remove_stale_locks()
    assert [MlflowClient().get_run(r).info.status for r in spelled] == ["KILLED", "KILLED"]
    assert [p.name for p in resume.checkpoint_root().iterdir()] == [of_b]
    mlflow.set_tracking_uri(store_b)
    with mlflow.start_run(experiment_id="0", tags={"step": "main"}) as main_b:
        resume.remove_stale_locks()
    run = MlflowClient().get_run(of_b)
    assert (run.info.status, run.data.tags.get("ended_by")) == ("KILLED", main_b.info.run_id)
    assert not resume.checkpoint_root().exists() or not list(resume.checkpoint_root().iterdir())


@pytest.mark.parametrize("left", ["killed in _new_lock", "an old temporary file", "a live process's new one",
                                  "an NFS client's"])
def test_a_dead_main_is_found_dead_whatever_its_folder_has_left_over(store, left):
    """A main killed (SIGKILL) in `_new_lock`, once it linked its temporary file to the lock file, left that file
    beside the lock file, and a lock file removed while open stays on NFS as a `.nfs*` file: the folder was no longer
    lock-only, and its main stayed RUNNING for good. A temporary file of a dead process, or an old one, is ignored
    (a live one's, young, is not: its lock may be on its way), as are `.nfs*` files."""
    from pipeline.tracking import resume

    experiment_id = mlflow.get_experiment_by_name("e2e").experiment_id
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    name = {"killed in _new_lock": f".{resume.LOCK_FILE}.{dead.stdout.strip()}",
            "an old temporary file": f".{resume.LOCK_FILE}.{os.getpid()}",
            "a live process's new one": f".{resume.LOCK_FILE}.{os.getpid()}",
            "an NFS client's": ".nfs0000000000abcd0001"}[left]
    killed = mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}).info.run_id
    mlflow.end_run("RUNNING")
    assert resume.claim(killed)
    resume._claimed.pop(killed).close()  # its process gone
    (resume.checkpoint_dir(killed) / name).touch()
    if left == "an old temporary file":
        os.utime(resume.checkpoint_dir(killed) / name, (time.time() - 60, time.time() - 60))
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}):
        resume.remove_stale_locks()
    ended = left != "a live process's new one"
    assert MlflowClient().get_run(killed).info.status == ("KILLED" if ended else "RUNNING")
    assert resume.checkpoint_dir(killed).exists() is not ended


@pytest.mark.parametrize("left", ["written", "empty", "another store's", "another store's, empty", "held"])
def test_a_main_killed_before_its_lock_file_bore_its_name_is_found_dead(store, tmp_path, empty_store_db, left):
    """A main killed (SIGKILL, or SIGTERM while in `_new_lock`) once it made its temporary file and before it linked
    it to the lock file's name left that file alone in its folder (empty if killed before writing it): its folder
    held no lock file, was never lock-only, and stayed for good, its main RUNNING. The temporary file of a dead
    process stands for its lock now: its run ends KILLED and its folder goes, by a main of the store it records,
    or, empty, of the store that has its run (another store's is left to that store's next main); one a live
    process holds locked is not taken."""
    from pipeline.tracking import resume

    copy_store(empty_store_db, tmp_path / "b.db")
    store_a, store_b = mlflow.get_tracking_uri(), f"sqlite:///{tmp_path / 'b.db'}"
    theirs = left.startswith("another store's")
    mlflow.set_tracking_uri(store_b if theirs else store_a)
    killed = mlflow.start_run(experiment_id="0", tags={"step": "main"}).info.run_id
    mlflow.end_run("RUNNING")
    written = resume._store()
    mlflow.set_tracking_uri(store_a)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = resume.checkpoint_dir(killed)
    folder.mkdir(parents=True)
    temporary = folder / f".{resume.LOCK_FILE}.{dead.stdout.strip()}"
    temporary.write_text("" if left.endswith("empty") else written)
    holder = None
    if left == "held":  # a live process stopped in `_new_lock` past `LEFT_S`, its temporary file locked
        temporary = temporary.rename(folder / f".{resume.LOCK_FILE}.{os.getpid()}")
        os.utime(temporary, (time.time() - 60, time.time() - 60))
        holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                                   "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
                                   str(temporary)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "held\n"
    try:
        with mlflow.start_run(experiment_id="0", tags={"step": "main"}) as main_a:
            resume.remove_stale_locks()
    finally:
        if holder:
            holder.kill()
            holder.wait()
    if left == "held":
        assert MlflowClient().get_run(killed).info.status == "RUNNING"
        assert [p.name for p in folder.iterdir()] == [temporary.name]
        return
    if theirs:  # not this store's to end: its folder is left as it was, for that store's next main
        assert [p.name for p in folder.iterdir()] == [temporary.name]
        mlflow.set_tracking_uri(store_b)
        with mlflow.start_run(experiment_id="0", tags={"step": "main"}) as main_b:
            resume.remove_stale_locks()
    run = MlflowClient().get_run(killed)
    assert (run.info.status, run.data.tags.get("ended_by")) == ("KILLED", (main_b if theirs else main_a).info.run_id)
    assert not folder.exists()
    assert not resume._claimed


def test_the_folders_runs_that_ended_on_nfs_leave_are_removed(store):
    """On NFS a run that ends removes its folder while it holds its lock file open: the file stays as a `.nfs*` file
    until the lock is released, and so does the folder, emptied after: one empty folder was left per run. The next
    main removes the empty ones, not a new one (whose lock file may be on its way), nor one whose `.nfs*` file is
    still there (removing it breaks the process that holds it)."""
    from pipeline.tracking import resume

    root = resume.checkpoint_root()
    emptied, new, closing = ("a" * 32, "b" * 32, "c" * 32)  # run ids' folders
    for name in (emptied, new, closing):
        (root / name).mkdir(parents=True)
    (root / closing / ".nfs0000000000abcd0001").touch()
    for name in (emptied, closing):
        os.utime(root / name, (time.time() - 60, time.time() - 60))
    resume.remove_stale_locks()
    assert sorted(p.name for p in root.iterdir()) == [new, closing]


def test_a_new_lock_file_appears_already_locked(tmp_path, monkeypatch):
    """`claim` makes a run's lock file locked before it bears its name: made and then locked, it stood unlocked
    for an instant, in which another main's `remove_stale_locks` could take it for a dead main's and end the live
    main KILLED. Two processes making the same lock at once: one holds it, the other is told it is held."""
    import fcntl

    from pipeline.tracking import resume

    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path))
    seen = []
    link = os.link

    def looked_at(source, target):  # what another process sees just before the lock file bears its name
        seen.append(sorted(p.name for p in Path(target).parent.iterdir()))
        with open(source) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # already locked
        link(source, target)

    monkeypatch.setattr(resume.os, "link", looked_at)
    assert resume.claim("abc")
    assert seen == [[f".{resume.LOCK_FILE}.{os.getpid()}"]]  # no lock-only folder for remove_stale_locks to take
    assert [p.name for p in (tmp_path / "abc").iterdir()] == [resume.LOCK_FILE]
    with open(tmp_path / "abc" / resume.LOCK_FILE) as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the file under the name is the one held

    def beaten(source, target):  # another process made and locked it first
        other = open(target, "w")  # noqa: SIM115 - held past this function, as the other process holds it
        fcntl.flock(other, fcntl.LOCK_EX)
        seen.append(other)
        link(source, target)

    monkeypatch.setattr(resume.os, "link", beaten)
    assert not resume.claim("def")
    assert [p.name for p in (tmp_path / "def").iterdir()] == [resume.LOCK_FILE]
    seen[-1].close()
    resume.release("abc")


def test_a_lock_is_claimed_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    """A checkpoint folder on FAT or a bucket mounted with FUSE: `_new_lock`'s link failed (EPERM, ENOSYS) with a
    traceback, every train and main with it; the lock file is made as before hard links were used."""
    import errno
    import fcntl

    from pipeline.tracking import resume

    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path))

    def no_links(source, target):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(resume.os, "link", no_links)
    assert resume.claim("abc")
    assert [p.name for p in (tmp_path / "abc").iterdir()] == [resume.LOCK_FILE]
    with open(tmp_path / "abc" / resume.LOCK_FILE) as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held
    resume.release("abc")


@pytest.mark.parametrize("at", ["flock", "_store"])
def test_a_lock_interrupted_while_it_is_made_leaves_no_temporary_file(tmp_path, monkeypatch, at):
    """SIGTERM (Ctrl-C on `mlflow run`: `Interrupted`, raised wherever the process is) in `_new_lock` before its
    temporary file bore the lock file's name left that file in the folder while the process went on to end its
    runs KILLED and exit; the file is removed however `_new_lock` ends."""
    from pipeline import tracking
    from pipeline.tracking import resume

    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path))

    def interrupted(*args):
        raise tracking.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(resume.fcntl if at == "flock" else resume, at, interrupted)
    with pytest.raises(tracking.Interrupted):
        resume.claim("abc")
    assert list((tmp_path / "abc").iterdir()) == []
    assert "abc" not in resume._claimed


def test_a_run_its_live_process_ends_meanwhile_is_not_ended_killed_by_another_main(store):
    """A train run whose folder holds its lock alone (checkpoint_every 0, or before its first checkpoint) that ends
    while another main's `remove_stale_locks` runs: read RUNNING before its lock was tried, then ended FINISHED and
    its folder removed, the other main made the lock anew, took it and ended the finished run KILLED. Its lock is
    tried first now, and only a lock file left there is taken."""
    from pipeline.tracking import resume

    experiment_id = mlflow.get_experiment_by_name("e2e").experiment_id
    # ends as train.run does: its folder removed, then its lock released, then its run ended
    owner = subprocess.Popen([sys.executable, "-c", "import shutil, sys, mlflow; from pipeline.tracking import resume; "
                              "run = mlflow.start_run(experiment_id=sys.argv[1], tags={'step': 'train'}); "
                              "resume.claim(run.info.run_id); print(run.info.run_id, flush=True); "
                              "sys.stdin.readline(); shutil.rmtree(resume.checkpoint_dir(run.info.run_id)); "
                              "resume.release(run.info.run_id); mlflow.end_run(); print('ended', flush=True)",
                              experiment_id],
                             env=store, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    claim = resume.claim

    def owner_ends_meanwhile(*args, **kwargs):  # just before its lock is tried
        if owner.stdin:
            owner.stdin.write("\n")
            owner.stdin.close()
            owner.stdin = None
            assert owner.stdout.readline() == "ended\n"
        return claim(*args, **kwargs)

    try:
        live = owner.stdout.readline().strip()
        with mlflow.start_run(experiment_id=experiment_id), pytest.MonkeyPatch.context() as patch:
            patch.setattr(resume, "claim", owner_ends_meanwhile)
            resume.remove_stale_locks()
    finally:
        owner.kill()
        owner.wait()
    run = MlflowClient().get_run(live)
    assert (run.info.status, run.data.tags.get("ended_by")) == ("FINISHED", None)
    assert not resume.checkpoint_dir(live).exists()


def test_a_step_its_live_process_ends_meanwhile_is_not_ended_killed_with_its_dead_main(store, monkeypatch):
    """A dead main's train run resumed by a live main (`find_resumable`) that ends it as the dead main's steps are
    ended: read RUNNING, its lock file there, then removed by its process as it ended, `_held` made the folder and
    its lock file anew, took it for a dead process's lock and ended the run KILLED, and left that lock-only folder
    behind. Only a lock file left there is taken."""
    from pipeline.tracking import resume

    experiment_id = mlflow.get_experiment_by_name("e2e").experiment_id
    dead = mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}).info.run_id
    trained = mlflow.start_run(nested=True, experiment_id=experiment_id, tags={"step": "train"}).info.run_id
    mlflow.end_run("RUNNING")
    mlflow.end_run("RUNNING")
    assert resume.claim(trained)
    owner = resume._claimed.pop(trained)  # as the live main that resumed it holds it
    claim = resume.claim

    def owner_ends_meanwhile(run_id, **kwargs):  # as train.run ends: its folder removed, then its lock released
        if run_id == trained:
            shutil.rmtree(resume.checkpoint_dir(trained))
            owner.close()
        return claim(run_id, **kwargs)

    monkeypatch.setattr(resume, "claim", owner_ends_meanwhile)
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}) as rerun:
        resume.end_dead_main(MlflowClient(), dead, tag="ended_by")
    status = {r: (run.info.status, run.data.tags.get("ended_by"))
              for r in (dead, trained) if (run := MlflowClient().get_run(r))}
    assert status == {dead: ("KILLED", rerun.info.run_id), trained: ("RUNNING", None)}  # its process ends it
    assert not resume.checkpoint_dir(trained).exists()


def test_a_lock_file_removed_while_it_is_locked_is_not_claimed(tmp_path, monkeypatch):
    """A run that ends removes its folder, then releases its lock (`main` as `train`): a lock taken between the two
    is on a file no longer named, no dead process's."""
    import fcntl

    from pipeline.tracking import resume

    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path))
    assert resume.claim("abc")
    owner = resume._claimed.pop("abc")  # as another live process holds it
    flock = fcntl.flock

    def owner_ends_meanwhile(handle, operation):
        shutil.rmtree(tmp_path / "abc")
        owner.close()
        flock(handle, operation)

    monkeypatch.setattr(resume.fcntl, "flock", owner_ends_meanwhile)
    assert not resume.claim("abc", left=True)
    assert "abc" not in resume._claimed and not (tmp_path / "abc").exists()


def test_a_checkpoint_of_other_code_is_resumed_only_by_id_and_the_run_says_so(store, tmp_path, monkeypatch,
                                                                               in_process):
    """An interrupted training, then the code that trains changed (an edit, a pull): rerunning the command is
    refused, naming both digests, before any run opens (it would go on from the old code's weights with the new
    code, and look like a clean run); resume=<id> goes on all the same, with a warning and tag resumed_across_code."""
    from mlflow.exceptions import MlflowException

    from pipeline import train
    from pipeline.tracking import resume

    command = ["--params", TINY, "--epochs", "2", "--overrides", f"tracking.experiment=e2e {FEWER}"]
    log_trained_model = train.log_trained_model

    def upload_fails(*args, **kwargs):
        raise MlflowException("gone")

    monkeypatch.setattr(train, "log_trained_model", upload_fails)
    with pytest.raises(MlflowException, match="gone"):  # interrupted after its epochs: the checkpoint stays
        in_process("main", *command)
    monkeypatch.setattr(train, "log_trained_model", log_trained_model)
    # the train run's checkpoint (main's lock file stays too: a store lost, for the next main to end its runs)
    (folder,) = [f for f in (tmp_path / "checkpoints").iterdir() if {p.name for p in f.iterdir()} - {resume.LOCK_FILE}]
    run_id, old_code = folder.name, resume.train_code()
    client = MlflowClient()
    runs_before = len(experiment_runs(client))

    monkeypatch.setattr(resume, "TRAIN_CODE", (*resume.TRAIN_CODE, "evaluate"))  # other code, the same command
    refused = in_process("main", *command)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: resume: train run {run_id} was checkpointed by other code (train_code {old_code[:12]}, here "
        f"{resume.train_code()[:12]}: pipeline/{{augment,data,fitting,model,serve,train,evaluate}}.py changed "
        f"since); resume={run_id} goes on from its weights with the code here (tagged resumed_across_code), "
        f"resume=never starts afresh")
    assert len(experiment_runs(client)) == runs_before and Checkpoint.completed_epochs(folder) == 2  # untouched

    command[command.index("2")] = "3"  # one more epoch, trained by the new code
    done = in_process("main", *command, "--resume", run_id)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"warning: train run {run_id} was checkpointed by other code (train_code {old_code[:12]}" in done.stderr
    tags = client.get_run(run_id).data.tags
    assert tags["resumed_across_code"] == f"{old_code[:12]} -> {resume.train_code()[:12]} after epoch 2"
    assert tags["train_code"] == resume.train_code()




def test_ctrl_c_ends_every_run_killed_and_resume_by_id_extends_the_run(store, tmp_path, in_process):
    interrupted = start_mlflow_run(store, "epochs=2", f"overrides={IN_E2E}")  # in epoch 2, past epoch 1's checkpoint
    wait_for_checkpoint(tmp_path / "checkpoints", interrupted)  # frozen as epoch 2 begins
    # Ctrl-C in a terminal: SIGINT to the foreground process group, `mlflow run` and its step alike
    # (`mlflow run` then also sends the step SIGTERM); delivered as the tree goes on.
    os.killpg(interrupted.pid, signal.SIGINT)
    kill_tree(interrupted.pid, signal.SIGCONT)
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
    other = in_process("main", *args, "--overrides", f"{IN_E2E} train.lr=0.1 train.seed=7", "--epochs", "3")
    assert other.returncode == 2, other.stderr[-2000:]
    line = other.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: resume: run {run_id} was started with other params: train.lr=0.1 (run has ")
    assert "train.seed=7 (run has " in line
    shorter = in_process("main", *args, "--overrides", IN_E2E, "--epochs", "1")
    assert shorter.returncode == 2 and shorter.stderr.strip().splitlines()[-1].startswith("error: train.epochs: ")

    # resume=never starts afresh and leaves the interrupted run as it was (the same command, in this process).
    fresh = in_process("main", "--params", TINY, "--epochs", "2", "--overrides", IN_E2E, "--resume", "never")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming train run" not in fresh.stdout and "Epoch 1/2" in fresh.stdout
    assert client.get_run(run_id).info.status == "KILLED"
    assert (tmp_path / "checkpoints" / run_id / "training_metadata.json").exists()

    # resume=<id> with more epochs extends the interrupted run (`python -m pipeline.main`, in this process).
    extended = in_process("main", "--params", TINY, "--epochs", "3", "--overrides", IN_E2E, "--resume", run_id)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert f"resuming train run {run_id}" in extended.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["extended_epochs"] == "2 -> 3"
    assert "-e3-" in run.info.run_name and ", 3 epochs," in run.data.tags["mlflow.note.content"]  # not the 2 logged
    assert sorted(metric_steps(client, run_id, "val_acc")) == [1, 2, 3]
    iterations = metric_steps(client, run_id, "iterations")
    assert iterations == {e: e * iterations[1] for e in (1, 2, 3)}
    trains = experiment_runs(client, "tags.step = 'train'")
    assert len(trains) == 2 and all(r.info.status == "FINISHED" for r in trains)
    assert not any(r.info.status == "RUNNING" for r in experiment_runs(client))


def test_an_interrupted_train_run_is_claimed_until_it_has_ended(store, in_process, monkeypatch):
    """SIGTERM in training (Ctrl-C on `mlflow run`): the process released its train run's claim, then ended the run
    KILLED; an identical command started in between resumed the run and trained it, marked KILLED under it. The
    claim goes once the run has ended."""
    import fcntl

    from pipeline import tracking, train
    from pipeline.tracking import resume

    def interrupted(*args, **kwargs):
        raise tracking.Interrupted(signal.SIGTERM)

    held_at_end = {}
    set_terminated = MlflowClient.set_terminated

    def ended(self, run_id, *args, **kwargs):  # could another command claim the run as it ends?
        lock = resume.checkpoint_dir(run_id) / resume.LOCK_FILE
        if lock.exists():
            with lock.open() as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held_at_end[run_id] = False
                except BlockingIOError:
                    held_at_end[run_id] = True
        return set_terminated(self, run_id, *args, **kwargs)

    monkeypatch.setattr(train, "fit", interrupted)
    monkeypatch.setattr(MlflowClient, "set_terminated", ended)
    done = in_process("train", "--params", TINY, "--overrides", "tracking.experiment=e2e")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    (run,) = experiment_runs(MlflowClient(), "tags.step = 'train'")
    assert run.info.status == "KILLED" and held_at_end == {run.info.run_id: True}
    assert run.info.run_id not in resume._claimed  # released once ended: a rerun resumes it
    assert resume.claim(run.info.run_id)
    resume.release(run.info.run_id)


RESUMED = ["--params", TINY, "--overrides", "tracking.experiment=e2e"]


def interrupted_train_run(in_process, monkeypatch, command: list[str] = RESUMED):
    """A train run of `command` interrupted in training (SIGTERM), as if it left a checkpoint: a stand-in, for
    commands refused before any run opens; the run and its checkpoint folder. Training stays interrupted for the rest
    of the test."""
    from pipeline import tracking, train

    def interrupted(*args, **kwargs):
        raise tracking.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(train, "fit", interrupted)
    assert in_process("train", *command).returncode == 128 + signal.SIGTERM
    (run,) = experiment_runs(MlflowClient(), "tags.step = 'train'")
    return run, stand_in_checkpoint(run.info.run_id)


def stand_in_checkpoint(run_id: str) -> Path:
    """Train run `run_id`'s checkpoint folder, holding a checkpoint of its first epoch: whole, never loaded (training
    stays interrupted)."""
    from pipeline.tracking import resume

    folder = resume.checkpoint_dir(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "epoch-0001.weights.h5", "w") as weights:
        weights["weights"] = np.zeros(4096)
    (folder / "training_metadata.json").write_text(json.dumps({"epoch": 1, "weights": "epoch-0001.weights.h5"}))
    return folder


@pytest.mark.parametrize("damage", ["weights cut short", "weights gone", "metadata torn"])
def test_a_checkpoint_that_cannot_be_read_back_is_refused_before_any_run_opens(store, in_process, monkeypatch,
                                                                                damage):
    """A checkpoint damaged on disk (a disk that failed, a copy cut short): the rerun, or resume=<id>, died in `fit` on
    h5py's traceback ("truncated file: eof = ..."), its main and the run ended FAILED, and every rerun died so again.
    Now one line naming the file and the way on, exit 2, before any run opens."""
    run, folder = interrupted_train_run(in_process, monkeypatch)
    run_id, client = run.info.run_id, MlflowClient()
    damaged = folder / ("training_metadata.json" if damage == "metadata torn" else "epoch-0001.weights.h5")
    if damage == "weights cut short":
        os.truncate(damaged, damaged.stat().st_size // 2)
    elif damage == "weights gone":
        damaged.unlink()
    else:
        damaged.write_text('{"epoch": 1, "wei')

    def state():
        return sorted((r.info.run_id, r.info.status, sorted(r.data.tags.items())) for r in experiment_runs(client))

    before = state()
    for args in ((), ("--resume", run_id)):
        refused = in_process("main", *RESUMED, *args)
        assert refused.returncode == 2, refused.stderr[-3000:]
        line = refused.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: resume: train run {run_id}'s checkpoint cannot be read ({damaged}: "), line
        assert line.endswith(f"); restore the file to go on with the run, or remove {folder} (or give resume=never) "
                             f"to start afresh"), line
    assert state() == before  # no run opened or ended


def test_resuming_a_live_run_by_id_is_refused_before_any_run_opens(store, in_process, monkeypatch):
    """resume=<id> of a run another live process trains was refused only once main had opened its run (and prepared
    or reused the data): a FAILED main run was left behind, where every other resume refused opens none."""
    from pipeline.tracking import resume

    run, folder = interrupted_train_run(in_process, monkeypatch)
    command = RESUMED
    holder = subprocess.Popen(  # the live process training it: holds its lock, as `resume.claim` does
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
                               "print('held', flush=True); time.sleep(120)", str(folder / resume.LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        runs_before = len(experiment_runs(MlflowClient()))
        refused = in_process("main", *command, "--resume", run.info.run_id)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: resume: run {run.info.run_id} is being trained by another process right now")
    assert len(experiment_runs(MlflowClient())) == runs_before  # no main run, FAILED or otherwise


def test_a_second_resume_by_id_started_beside_the_first_is_refused_before_any_run_opens(store, in_process,
                                                                                         monkeypatch):
    """Two `resume=<id>` of one run started together: each found the run free when its inputs were checked (the first
    claimed it only once Keras had loaded and its main run was open, ~10 s later), and the second was refused inside
    its main run, left FAILED. The first holds the run from its check on."""
    from pipeline import inputs
    from pipeline.tracking import resume

    run, _ = interrupted_train_run(in_process, monkeypatch)
    cfg = config.load_from_cli(TINY, "tracking.experiment=e2e")
    inputs.check_inputs(cfg, resume=run.info.run_id)  # the first command, its inputs checked: Keras loads next
    try:
        second = subprocess.run([sys.executable, "-m", "pipeline.main", *RESUMED, "--resume", run.info.run_id],
                                cwd=ROOT, env=store, capture_output=True, text=True, timeout=300)
    finally:
        resume.release(run.info.run_id)
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: resume: run {run.info.run_id} is being trained by another process right now")
    assert experiment_runs(MlflowClient(), "tags.step = 'main'") == []


def test_resuming_a_main_or_other_step_by_id_names_the_train_run_to_give(store, in_process):
    """resume=<id> of the run the UI lists for a pipeline, its main run, or of another step's: refused as 'not a train
    run' alone, the id to give nowhere said. A main's line names its train run (tag train_run_id, else its nested
    train run), or says it trained none."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    main, stopped, prepared = (client.create_run(experiment, tags={"step": step}).info.run_id
                               for step in ("main", "main", "prepare"))
    trained = client.create_run(experiment, tags={"step": "train", "mlflow.parentRunId": main}).info.run_id
    expected = {
        main: f"error: resume: run {main} is a main run, not a train run; resume={trained} goes on with its train run",
        stopped: f"error: resume: run {stopped} is a main run, not a train run, and trained nothing (it stopped "
                 f"before)",
        prepared: f"error: resume: run {prepared} is a prepare run, not a train run",
    }
    for run_id, line in expected.items():
        refused = in_process("main", *RESUMED, "--resume", run_id)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines()[-1] == line
    assert len(experiment_runs(client)) == 4  # no main run opened


@pytest.mark.parametrize(("value", "line"), [
    ("NEVER", "error: resume: no run 'NEVER' in the tracking store; did you mean resume=never?"),
    (" never", "error: resume: no run ' never' in the tracking store; did you mean resume=never?"),
    ("runs:/0123/model", "error: resume: no run 'runs:/0123/model' in the tracking store (resume takes '' to continue "
                         "an interrupted identical run, never to start afresh, or a train run's id)"),
])
def test_a_resume_value_that_names_no_run_says_what_resume_takes(store, in_process, value, line):
    """-P resume=NEVER, or a model URI: 'no run ... in the tracking store' alone, as if a run were missing."""
    refused = in_process("main", *RESUMED, "--resume", value)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == line
    assert experiment_runs(MlflowClient()) == []


def test_resuming_a_run_in_mlflows_trash_is_refused_before_any_run_opens(store, in_process, monkeypatch):
    """resume=<id> of a deleted run: MLflow refused to reopen it once main had opened its own run, a traceback, exit 1,
    a FAILED main run left behind."""
    run, _ = interrupted_train_run(in_process, monkeypatch)
    client = MlflowClient()
    client.delete_run(run.info.run_id)
    def runs():
        return sorted((r.info.run_id, r.info.status, r.info.lifecycle_stage)
                      for r in client.search_runs([run.info.experiment_id], run_view_type=ViewType.ALL))

    runs_before = runs()
    refused = in_process("main", *RESUMED, "--resume", run.info.run_id)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: resume: run {run.info.run_id} is in MLflow's trash; restore it (mlflow runs restore --run-id "
        f"{run.info.run_id}) to go on with it, or resume=never to start afresh")
    assert runs() == runs_before  # no main run, FAILED or otherwise


def test_a_train_run_of_another_experiment_is_resumed_where_it_is(store, in_process, monkeypatch, tmp_path):
    """A train run that `mlflow run` started in its own experiment (`--experiment-name`, or MLflow's Default) and that
    was interrupted, rerun as `python -m pipeline.main` (its runs in tracking.experiment), plainly or with
    resume=<id>: MLflow refused to reopen a run of another experiment than the active one, a traceback once main's run
    was open, main's run left FAILED. The run goes on where it is, and the line resuming it says so."""
    from pipeline import tracking, train

    def interrupted(*args, **kwargs):
        raise tracking.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(train, "fit", interrupted)
    client = MlflowClient()
    other = client.create_experiment("other", artifact_location=str(tmp_path / "other"))
    wrapper = client.create_run(other).info.run_id  # what `mlflow run --experiment-name other -e train` opens
    assert in_process("train", *RESUMED, env={"MLFLOW_RUN_ID": wrapper}).returncode == 128 + signal.SIGTERM
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # a shell of its own, later
    stand_in_checkpoint(wrapper)
    for by_id in ([], ["--resume", wrapper]):
        resumed = in_process("main", *RESUMED, *by_id)
        assert resumed.returncode == 128 + signal.SIGTERM, resumed.stderr[-3000:]  # the run reopened, then stopped
        assert (f"resuming train run {wrapper} after epoch 1 of 3, its last checkpoint (in experiment 'other', where "
                f"it stays)"
                in resumed.stdout), resumed.stdout[-3000:]
        run = client.get_run(wrapper)
        assert run.info.experiment_id == other and run.info.status == "KILLED"
    mains = experiment_runs(client, "tags.step = 'main'")
    assert sorted(r.info.status for r in mains) == ["KILLED", "KILLED"]
    # each names the run it went on with, stopped before that run finished: it is nested in no main of theirs
    assert [r.data.tags.get("train_run_id") for r in mains] == [wrapper, wrapper]
    refused = in_process("main", *RESUMED, "--resume", mains[0].info.run_id)
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: resume: run {mains[0].info.run_id} is a main run, not a train run; resume={wrapper} goes on with its "
        f"train run")


def test_resuming_by_id_on_a_local_dataset_file_overwritten_since_is_refused_before_any_run_opens(
        store, tmp_path, in_process, monkeypatch):
    """resume=<id> of a train run on a local dataset file (`-P dataset_uri=PATH`) compared the path alone: another
    dataset written to that path since, the run went on training the old data's weights on the other data (a plain
    rerun did not: `train_key` holds the file's sha256). With the original bytes back it goes on, extended too."""
    import hashlib

    from pipeline import data
    from pipeline.tracking import resume

    overrides = "tracking.experiment=e2e data.synthetic_train=256 data.synthetic_test=64"
    path = tmp_path / "local" / "dataset.npz"
    path.parent.mkdir()
    data.make_synthetic(n_train=256, n_test=64, seed=0).save(path)  # as prepare writes it: the file, dataset.json
    (path.parent / "dataset.json").write_text(json.dumps({"params": config.load(ROOT / TINY, overrides).flat("data")}))
    original = path.read_bytes()
    trained_on = hashlib.sha256(original).hexdigest()
    command = ["--params", TINY, "--overrides", overrides, "--dataset-uri", str(path)]
    run, folder = interrupted_train_run(in_process, monkeypatch, command)
    run_id, client = run.info.run_id, MlflowClient()
    assert (run.data.tags["dataset_uri"], run.data.tags["dataset_sha256"]) == (str(path), trained_on)

    data.make_synthetic(n_train=256, n_test=64, seed=1).save(path)  # another dataset, written to the same path
    def state():
        return sorted((r.info.run_id, r.info.status, r.info.lifecycle_stage, sorted(r.data.tags.items()),
                       sorted(r.data.params.items()))
                      for r in client.search_runs([run.info.experiment_id], run_view_type=ViewType.ALL))

    before, checkpoint = state(), sorted(p.name for p in folder.iterdir())
    for module, args in (("main", command[:4]), ("train", command)):  # the run's dataset_uri; the same path, given
        refused = in_process(module, *args, "--resume", run_id)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines()[-1] == (
            f"error: dataset_uri: {path} holds other bytes than train run {run_id} trained on (sha256 "
            f"{hashlib.sha256(path.read_bytes()).hexdigest()[:12]} here, {trained_on[:12]} in the run: another "
            f"dataset was written there since); put the original file back to go on with the run, or resume=never "
            f"to start afresh")
    assert state() == before and sorted(p.name for p in folder.iterdir()) == checkpoint  # no run opened or changed

    client.delete_tag(run_id, "dataset_sha256")  # a run started before train runs recorded it: its path alone, as then
    assert resume.config_to_resume(run_id, config.load(ROOT / TINY, overrides)) == str(path)
    client.set_tag(run_id, "dataset_sha256", trained_on)

    path.write_bytes(original)  # the original file put back: the run goes on (its training still interrupted here)
    resumed = in_process("train", *command, "--epochs", "4", "--resume", run_id)
    assert resumed.returncode == 128 + signal.SIGTERM, resumed.stderr[-3000:]
    assert f"resuming train run {run_id}" in resumed.stdout
    tags = client.get_run(run_id).data.tags
    assert (tags["extended_epochs"], tags["dataset_sha256"]) == ("3 -> 4", trained_on)


def test_ctrl_c_stops_a_host_whose_peers_never_start_and_leaves_no_run(store):
    """A cluster host started alone waited for its peers inside TensorFlow's collective setup, which blocks in C++
    holding the GIL: Ctrl-C did nothing, for good (the README said `kill -9`). The hosts now meet first, in Python,
    before any run opens: Ctrl-C ends the wait at once, exit 130, and no run is left behind."""
    peer = f"localhost:{free_port()}"  # nobody starts there
    tf_config = {"cluster": {"worker": [f"localhost:{free_port()}", peer]}, "task": {"type": "worker", "index": 0}}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.main", "--params", TINY], cwd=ROOT, text=True,
                            env={**store, "TF_CONFIG": json.dumps(tf_config)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        # TensorFlow imported (~10 s here idle, 16 s loaded; more on CI), the wait for worker 1 begun
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        first = proc.stdout.readline() if ready else ""
        assert first.startswith(f"worker 0: waiting for worker 1 ({peer}) to start (at most 600 s"), first
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)  # 0.5 s here under load; deaf to Ctrl-C, it waited 600 s
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 130 and "error: interrupted by SIGINT" in err.strip().splitlines()[-1], err[-3000:]
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_dead_tracking_server_fails_within_a_minute_exit_4_and_the_rerun_resumes(tmp_path, in_process):
    """The project's own HTTP retry defaults (no MLFLOW_HTTP_REQUEST_* set), through the module entry point."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_tracking_server(tmp_path, port)
    settings = {"MLFLOW_TRACKING_URI": uri, "PIPELINE_CHECKPOINT_DIR": str(tmp_path / "checkpoints")}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **settings,
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "pipeline.main", "--params", TINY, "--epochs", "4",
               "--overrides", f"tracking.experiment=e2e {SMALL_MODEL}"]
    try:
        MlflowClient(uri).create_experiment("e2e")
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_checkpoint(tmp_path / "checkpoints", proc)
        kill_tree(server.pid)
        server.wait(timeout=30)
        kill_tree(proc.pid, signal.SIGCONT)  # the server gone before its next epoch ends
        start = time.monotonic()
        _, err = proc.communicate(timeout=300)  # bounded retries: it must give up, not hang
        assert proc.returncode == 4, err[-3000:]
        assert time.monotonic() - start < 75  # README: "fails within about a minute" (MLflow's defaults: minutes)
        assert f"error: tracking server {uri} failed" in err and "rerun the same command to resume" in err

        server = start_tracking_server(tmp_path, port)
        done = in_process("main", *command[3:], env=settings)  # the same command, in this process
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


def test_a_server_gone_mid_run_is_one_line_that_says_why(monkeypatch):
    """The step's last line cut MLflow's message at 300 characters, before its reason: `... (Caused by
    NewConnectionError(.` instead of Connection refused."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import _server_failure

    dead = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as failed:
        MlflowClient().get_run("0" * 32)
    assert _server_failure(failed.value) == (f"tracking server {dead.replace('s3cret', '***')} failed: "
                                             "no answer (Connection refused)")


def test_creating_the_store_checks_that_a_server_or_other_store_answers(monkeypatch, capsys):
    """`python -m pipeline.tracking` (the README's first command) said "tracking store ... ready" for a server
    that was down, a mistyped scheme or a driver this project lacks, and `mlflow run` then retried for minutes;
    a step given such a URI died on a traceback. Now: one line naming the URI (never its password), non-zero, at
    once for a dead server (MLflow's client would retry it for minutes: past this test's 120 s per command).
    The first URI through the command itself, with no MLFLOW_* set (the project's own HTTP retry defaults); the
    others through what it runs, in this process (no Python and MLflow start-up per URI)."""
    from pipeline.tracking import cli, store_ready

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for key in [k for k in os.environ if k.startswith("MLFLOW_") and not k.startswith("MLFLOW_HTTP_REQUEST_")]:
        monkeypatch.delenv(key)
    mlflow.set_tracking_uri(None)  # MLFLOW_TRACKING_URI decides

    def in_this_process(uri: str) -> subprocess.CompletedProcess:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        capsys.readouterr()
        code = 0
        try:
            cli(lambda: print(store_ready()))  # `python -m pipeline.tracking`
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([uri], code, out, err)

    dead = f"http://127.0.0.1:{free_port()}"
    for uri, code, error in [
        (dead, 4, f"error: tracking server {dead} failed: "),
        ("htp://team-host:5000", 2,
         "error: MLFLOW_TRACKING_URI: cannot open the tracking store htp://team-host:5000: "),
        ("postgresql://mlflow:s3cret@127.0.0.1:1/mlflow", 2,  # SQLAlchemy's default driver (psycopg 3) is not shipped
         "error: MLFLOW_TRACKING_URI: cannot open the tracking store postgresql://mlflow:***@127.0.0.1:1/mlflow: "
         "ModuleNotFoundError"),
        # a password holding "/" (as generated ones do), and MLflow's own message quoting the URI (a `postgres://`
        # typo, a server's request URL), printed it
        ("postgresql://mlflow:s3/cret@127.0.0.1:1/mlflow", 2,
         "error: MLFLOW_TRACKING_URI: cannot open the tracking store postgresql://mlflow:***@127.0.0.1:1/mlflow: "),
        ("postgres://mlflow:s3cret@127.0.0.1:1/mlflow", 2,
         "error: MLFLOW_TRACKING_URI: cannot open the tracking store postgres://mlflow:***@127.0.0.1:1/mlflow: "),
        (dead.replace("//", "//alice:s3cret@"), 4, f"error: tracking server {dead.replace('//', '//alice:***@')} "),
        # MLflow 3 refuses a file store, and ends its long sentence with the way out: kept whole
        ("file:///tmp/no-file-store", 2, "error: MLFLOW_TRACKING_URI: cannot open the tracking store file:///tmp/"),
    ]:
        start = time.monotonic()
        if uri == dead:
            done = subprocess.run([sys.executable, "-m", "pipeline.tracking"], cwd=ROOT, capture_output=True,
                                  text=True, env={**env, "MLFLOW_TRACKING_URI": uri}, timeout=120)
        else:
            done = in_this_process(uri)
        assert time.monotonic() - start < 120, uri
        lines = done.stderr.strip().splitlines()
        assert done.returncode == code and len(lines) == 1 and lines[0].startswith(error), (uri, done.stderr[-2000:])
        assert "ready" not in done.stdout and "s3cret" not in done.stderr and "s3/cret" not in done.stderr
        assert not uri.startswith("file:") or lines[0].endswith("set `MLFLOW_ALLOW_FILE_STORE=true` to opt out of "
                                                                  "this exception.")


def test_a_postgresql_store_named_without_its_driver_says_how_to_name_it(monkeypatch, capsys):
    """`MLFLOW_TRACKING_URI=postgresql://...`, as a PostgreSQL store is usually written, reaches SQLAlchemy's default
    driver, psycopg 3, which this project does not install (it installs psycopg2, as team-server.sh's store names):
    the line said only "No module named 'psycopg'". Now it also says to name the store postgresql+psycopg2://."""
    from pipeline.tracking import cli, store_ready

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:s3cret@127.0.0.1:1/mlflow")
    mlflow.set_tracking_uri(None)
    with pytest.raises(SystemExit) as exited:
        cli(lambda: print(store_ready()))
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1 and "ready" not in out, err
    assert err.startswith("error: MLFLOW_TRACKING_URI: cannot open the tracking store "
                          "postgresql://mlflow:***@127.0.0.1:1/mlflow: ModuleNotFoundError"), err
    assert "postgresql+psycopg2://mlflow:***@127.0.0.1:1/mlflow" in err and "s3cret" not in err, err


@pytest.mark.parametrize("where", ["folder", "other file", "below a file"])
def test_a_sqlite_uri_that_names_no_database_file_is_one_line_at_once(monkeypatch, capsys, tmp_path, where):
    """`sqlite:///` naming a folder (`sqlite:////data/mlruns`) had MLflow retry "unable to open database file" for
    ~100 s before its traceback; naming another file (a dataset, a typo's config file) or a path below a file, a
    traceback at once (sqlalchemy's DatabaseError, FileExistsError), exit 1. Now one line naming the path, exit 2,
    and nothing written where it points."""
    from pipeline.tracking import cli, store_ready

    (tmp_path / "data.npz").write_bytes(b"PK\x03\x04 not a database" * 10)
    path = {"folder": tmp_path, "other file": tmp_path / "data.npz",
            "below a file": tmp_path / "data.npz" / "mlflow.db"}[where]
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    mlflow.set_tracking_uri(None)  # MLFLOW_TRACKING_URI decides
    capsys.readouterr()
    start = time.monotonic()
    with pytest.raises(SystemExit) as exited:
        cli(lambda: print(store_ready()))  # `python -m pipeline.tracking`
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exited.value.code == 2 and time.monotonic() - start < 10, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: MLFLOW_TRACKING_URI: cannot open the tracking store sqlite:///{path}: "), err[-2000:]
    assert "ready" not in out and sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("where", ["file", "folder", "new file"])
def test_a_sqlite_store_this_user_may_not_write_is_one_line_at_once(empty_store_db, where):
    """A read-only store file, or one in a read-only folder (SQLite writes its journal beside it), or a new one in a
    folder this user may not write: every step died on MLflow's "attempt to write a readonly database" traceback
    (exit 1) once its first run opened, prepare's data loaded. Now one line naming the path and the user, exit 2,
    and the store as it was. As root, who may write anything, the command runs in a child that has become
    `nobody`."""
    import tempfile

    from pipeline.tracking import cli, store_ready

    folder = Path(tempfile.mkdtemp())  # not under tmp_path: `nobody` may not enter pytest's folders
    try:
        path = folder / ("new" if where == "new file" else "") / "mlflow.db"
        if where != "new file":
            shutil.copyfile(empty_store_db, path)
            path.chmod(0o444 if where == "file" else 0o666)
        folder.chmod(0o777 if where == "file" else 0o555)
        before = {p: p.read_bytes() for p in folder.iterdir()}
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(read)
                sys.stderr = sys.stdout = os.fdopen(write, "w")
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path}"
                mlflow.set_tracking_uri(None)  # MLFLOW_TRACKING_URI decides
                try:
                    cli(lambda: print(store_ready()))  # `python -m pipeline.tracking`
                    code = 0
                except SystemExit as exc:
                    code = exc.code
                sys.stderr.flush()
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read) as said:
            err = said.read()
        _, status = os.waitpid(pid, 0)
        lines = err.strip().splitlines()
        assert os.waitstatus_to_exitcode(status) == 2, err[-2000:]
        assert len(lines) == 1 and lines[0].startswith(
            f"error: MLFLOW_TRACKING_URI: cannot write the tracking store sqlite:///{path}: "), err[-2000:]
        assert str(path if where != "folder" else folder) in lines[0] and "ready" not in err
        assert {p: p.read_bytes() for p in folder.iterdir()} == before
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


@pytest.mark.parametrize(("status", "answers"), [(502, False), (503, False), (200, True)])
def test_a_proxys_gateway_error_is_no_answer_but_any_other_http_answer_is(monkeypatch, status, answers):
    """A proxy in front of a tracking server that is down answers 502/503/504: that server does not answer. The
    server's own 200 is an answer: MLflow's own requests go on from there. (A login's 401: test_team_server.)"""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import ensure_store

    def answer(request):
        request.send_response(status)
        request.end_headers()

    with http_stub(answer) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        if answers:
            assert ensure_store() == uri
        else:
            with pytest.raises(MlflowException, match=f"no answer \\(HTTP {status} "):
                ensure_store()


def test_the_ready_line_and_the_runs_console_link_never_print_the_stores_password(monkeypatch):
    """`python -m pipeline.tracking` said `tracking store http://alice:s3cret@host ready`, and every step's last line
    (`ui_hint`) named the store whole: a team's PostgreSQL or server password in the console and its logs."""
    from pipeline.tracking import store_ready, ui_hint

    def answer(request):
        request.send_response(200)
        request.end_headers()

    with http_stub(answer) as address:
        port = int(address.rpartition(":")[2])
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{port}")
        assert store_ready() == f"tracking store http://alice:***@127.0.0.1:{port} ready"
    run = mlflow.entities.Run(mlflow.entities.RunInfo("r1", "7", "", 0, 0, "FINISHED", "", ""), None)
    assert ui_hint(run) == f"run r1: http://alice:***@127.0.0.1:{port}/#/experiments/7/runs/r1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:s3/cret@db-host:5432/mlflow")
    assert ui_hint(run) == ("run r1: see it with `mlflow ui --backend-store-uri 'postgresql://mlflow:***@db-host:5432/"
                            "mlflow'`, then http://127.0.0.1:5000/#/experiments/7/runs/r1")


@pytest.mark.parametrize("store_path", ["/data/my runs/mlflow.db", "/data/runs (2)/mlflow.db", "/data/it's/mlflow.db"])
def test_the_runs_console_link_is_a_command_that_runs_as_pasted(monkeypatch, store_path):
    """Every main's last line named a store in a folder with a space unquoted, `mlflow ui --backend-store-uri
    sqlite:////data/my runs/mlflow.db`: pasted, `mlflow ui` got a stray argument `runs/mlflow.db` and refused it (or
    the shell refused the parenthesis). Now shell-quoted where it needs to be."""
    import shlex

    from pipeline.tracking import ui_hint

    uri = f"sqlite:///{store_path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run = mlflow.entities.Run(mlflow.entities.RunInfo("r1", "7", "", 0, 0, "FINISHED", "", ""), None)
    hint = ui_hint(run)
    command = hint.partition("see it with `")[2].rpartition("`, then")[0]
    assert shlex.split(command) == ["mlflow", "ui", "--backend-store-uri", uri], hint
    assert hint.endswith(", then http://127.0.0.1:5000/#/experiments/7/runs/r1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert "`mlflow ui --backend-store-uri sqlite:///mlflow.db`" in ui_hint(run)  # nothing to quote: as it was


def test_the_store_command_refuses_a_store_whose_new_experiments_cannot_keep_artifacts(tmp_path):
    """`python -m pipeline.tracking` in a folder where `mlruns` (where a local store's new experiments keep their
    artifacts, MLflow's default) is a file said "ready"; every step then died on MLflow's NotADirectoryError traceback
    as it logged its first artifact, its run FAILED. Now one line naming the folder, exit 2."""
    (tmp_path / "mlruns").write_text("not a folder")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    refused = subprocess.run([sys.executable, "-m", "pipeline.tracking"], cwd=tmp_path, capture_output=True,
                             text=True, env=env, timeout=120)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode == 2 and "ready" not in refused.stdout, refused.stdout + refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and len(errors) == 1, refused.stderr[-3000:]
    assert f"{tmp_path / 'mlruns'} is a file, not a folder" in errors[0], errors[0]


def test_a_resumed_fit_draws_the_augmentations_an_uninterrupted_one_draws(tmp_path):
    """The shifts, flips and cutout draw from SeedGenerators whose state `save_weights` leaves out: the checkpoint
    holds it, so the epochs after a resume have the losses of the uninterrupted run (they differed from the first
    epoch after it; without augmentation they matched). With weight EMA the last epoch, saved when training ends,
    holds the trained weights, not the averages `fit` ends with (a resume from those lost 0.845 -> 1.050).
    One fit, stopped and resumed twice: after epoch 2 (without EMA at a checkpoint, one every epoch; with EMA between
    checkpoints, one every 5 epochs, stopped before the checkpoint callback sees the epoch, as bench.gpu_epoch
    --stop-after stops params/improved.yaml), then after epoch 3 between checkpoints (one every 2 epochs), then to
    its end; each resumed epoch's loss is the uninterrupted fit's. EMA trains on the raw weights (it averages them
    beside, and validates on the averages): one uninterrupted fit without it is the reference of both."""
    import numpy as np

    from pipeline import data, fitting
    from pipeline.distribute import distribution

    dataset = data.make_synthetic(n_train=128, n_test=32, seed=0)
    splits = fitting.split_validation(dataset, 0.0, 0)
    models = []

    def fit(cfg, folder, every, stop=None, stop_first=False):
        models.append(fitting.compile_model(cfg, dataset, distribution("none"), len(splits[0])))
        callbacks = [Checkpoint(folder, every, keep=True), keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: setattr(models[-1], "stop_training", epoch + 1 == stop))]
        return fitting.fit(models[-1], cfg, splits, 10, callbacks[::-1] if stop_first else callbacks).history["loss"]

    def params(ema: bool) -> config.Config:
        return config.load(TINY, f"train.epochs=4 train.cutout=4 train.verbose=0 train.ema={str(ema).lower()} "
                           f"train.ema_momentum=0.9 {SMALL_MODEL}")

    uninterrupted = fit(params(False), tmp_path / "a", 1)
    assert len(uninterrupted) == 4
    for ema in (False, True):
        cfg, folder = params(ema), tmp_path / f"b-{ema}"
        # as a kill after epoch 2 would leave it, the last epoch saved (keep)
        first = fit(cfg, folder, 5, stop=2, stop_first=True) if ema else fit(cfg, folder, 1, stop=2)
        assert len(first) == 2 and Checkpoint.completed_epochs(folder) == 2
        if ema:  # trained on the raw weights: the same losses as without EMA
            np.testing.assert_allclose(first, uninterrupted[:2], rtol=1e-5)
        second = fit(cfg, folder, 2, stop=3)
        assert len(second) == 1 and Checkpoint.completed_epochs(folder) == 3
        np.testing.assert_allclose(second, uninterrupted[2:3], rtol=1e-5, err_msg=f"ema={ema}")
        if ema:  # the model fit leaves (validated, served) still holds the averages
            assert all(np.array_equal(v.numpy(), a.numpy()) for v, a in zip(
                models[-1].trainable_variables, models[-1].optimizer._model_variables_moving_average, strict=True))
        resumed = fit(cfg, folder, 2)
        assert len(resumed) == 1
        np.testing.assert_allclose(resumed, uninterrupted[3:], rtol=1e-5, err_msg=f"ema={ema}")


def test_a_stopping_signal_that_keras_swallows_after_a_batch_still_stops_the_training(monkeypatch):
    """Keras 3.15's `pythonify_logs`, run after every batch, converts the batch's logs inside a bare `except: pass`:
    a signal whose handler raised there was swallowed, training went on, and with the handler's ignore already
    in place no further SIGTERM or SIGINT could stop the step (on JAX, whose main thread waits for each step in
    that conversion, most signals landed there). pipeline.interrupts keeps it; fit raises it again."""
    import keras.src.backend

    from pipeline import data, fitting, tracking
    from pipeline.distribute import distribution

    cfg = config.load("params/tiny.yaml", ["train.epochs=3", "train.validation_fraction=0"])
    dataset = data.make_synthetic(n_train=256, n_test=64, seed=0)
    splits = fitting.split_validation(dataset, 0, cfg.train.seed)
    model = fitting.compile_model(cfg, dataset, distribution(cfg.train.distribute), len(splits[0]))
    real, signalled = keras.src.backend.convert_to_numpy, []

    def convert(value):  # SIGTERM (what `mlflow run` sends its step) while the logs' conversion waits
        if not signalled and sys._getframe(1).f_code.co_name == "pythonify_logs":
            signalled.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, inside that bare except
        return real(value)

    monkeypatch.setattr(keras.src.backend, "convert_to_numpy", convert)
    timer = fitting.EpochTimer()
    with stopping_signals_raise(), pytest.raises(tracking.Interrupted, match="SIGTERM"):
        fitting.fit(model, cfg, splits, len(dataset.class_names), [timer])
    assert signalled and timer.seconds == []  # stopped in the first epoch, at the batch it arrived in


def test_the_stopping_signals_after_the_first_are_handled_by_a_handler_that_does_nothing():
    """Ctrl-C reaches a step, and `mlflow run` then sends SIGTERM: one that arrives while the first's handler sets the
    others aside (inside its `signal.signal` call) is tripped in C and handled by CPython after that call returns,
    with the handler set by then. SIG_IGN there made CPython raise `OSError: Signal 15 ignored due to race
    condition`, a stray traceback in the step's clean-up; a Python handler that does nothing takes it quietly. (The
    window is inside one C call: this checks what CPython would find there, as it would call it.)"""
    from pipeline import tracking

    for signum in (signal.SIGTERM, signal.SIGINT):
        with stopping_signals_raise():
            with pytest.raises(tracking.Interrupted):
                os.kill(os.getpid(), signum)
            for other in (signal.SIGTERM, signal.SIGINT):
                handler = signal.getsignal(other)
                assert callable(handler), f"{signal.Signals(other).name}: {handler}"  # SIG_IGN: CPython's OSError
                assert handler(other, None) is None
                os.kill(os.getpid(), other)  # and one sent now goes by without a word


def test_a_stopping_signal_swallowed_before_fit_stops_it_before_its_first_batch():
    """A SIGTERM whose exception Python swallowed before `fit` (a weakref callback's "Exception ignored", while the data
    loaded or the model was built) was cleared when training began: every epoch trained with the handlers ignoring
    any further signal, and the train step ended FINISHED, evaluate and register after it."""
    import weakref

    from pipeline import data, fitting, tracking
    from pipeline.distribute import distribution

    cfg = config.load("params/tiny.yaml", ["train.epochs=2", "train.validation_fraction=0"])
    dataset = data.make_synthetic(n_train=256, n_test=64, seed=0)
    splits = fitting.split_validation(dataset, 0, cfg.train.seed)
    model = fitting.compile_model(cfg, dataset, distribution(cfg.train.distribute), len(splits[0]))

    class Built:
        pass

    timer = fitting.EpochTimer()
    with stopping_signals_raise():
        built = Built()
        weakref.finalize(built, os.kill, os.getpid(), signal.SIGTERM)  # the handler runs in the finalizer
        del built  # its "Exception ignored" goes to stderr; the code goes on, to fit
        time.sleep(0.1)
        assert signal.getsignal(signal.SIGTERM) == tracking._ignore_further  # the handler ran: no signal stops fit now
        with pytest.raises(tracking.Interrupted, match="SIGTERM"):
            fitting.fit(model, cfg, splits, len(dataset.class_names), [timer])
    assert timer.seconds == []  # not one epoch trained


def test_a_stopping_signal_swallowed_in_a_step_still_ends_the_step_killed_with_143(store):
    """A SIGTERM whose exception Python itself swallows (it landed in a weakref callback, as after a model was
    logged: "Exception ignored in: <function WeakKeyDictionary...remove>") let evaluate and register run on, the
    handler's ignore already in place, and the step exit 0 with a model registered. The step ends KILLED, 143."""
    import weakref

    from pipeline import tracking

    cfg = config.load(ROOT / TINY, ["tracking.experiment=e2e"])

    class Model:
        pass

    def main():
        with tracking.step_run(cfg, "evaluate"):
            model = Model()
            weakref.finalize(model, os.kill, os.getpid(), signal.SIGTERM)  # the handler runs in the finalizer
            del model  # its "Exception ignored" goes to stderr; the step goes on
            time.sleep(0.1)

    with pytest.raises(SystemExit) as stopped:
        tracking.cli(main)
    assert stopped.value.code == 143
    (run,) = experiment_runs(MlflowClient())
    assert (run.info.status, run.data.tags.get("interrupted_by")) == ("KILLED", "SIGTERM")


@pytest.mark.parametrize("ending", ["prepare", "main"])
def test_a_stopping_signal_while_mlflow_ends_a_finished_step_leaves_no_run_running(store, monkeypatch, ending):
    """SIGTERM (Ctrl-C) arriving while MLflow wrote a step's end (`end_run`: the run already off its stack, its status
    not yet written): the exception left the step's run RUNNING for good, the main above it ended KILLED, and no later
    command ends it (a main that ended leaves no lock behind). The step's work was done: it ends FINISHED; the
    pipeline stops, 143."""
    from pipeline import tracking

    cfg = config.load(ROOT / TINY, ["tracking.experiment=e2e"])
    signalled = sigterm_while_ending(monkeypatch, lambda client, run_id, status:
                                     client.get_run(run_id).data.tags.get("step") == ending)

    def main():
        with tracking.step_run(cfg, "main"), tracking.step_run(cfg, "prepare"):
            pass

    with pytest.raises(SystemExit) as stopped:
        tracking.cli(main)
    assert stopped.value.code == 143 and signalled
    statuses = {r.data.tags["step"]: r.info.status for r in experiment_runs(MlflowClient())}
    assert statuses == {"prepare": "FINISHED", "main": "KILLED" if ending == "prepare" else "FINISHED"}


def test_a_stopping_signal_while_mlflow_ends_a_failed_step_leaves_no_run_running(store, monkeypatch):
    """SIGTERM (Ctrl-C) arriving while MLflow wrote the end of a step that had failed (`end_run`: the run already off
    its stack, FAILED not yet written): the step's run stayed RUNNING for good, its failure_reason on it. It ends
    FAILED as the step did; the pipeline stops, 143."""
    from pipeline import tracking

    cfg = config.load(ROOT / TINY, ["tracking.experiment=e2e"])
    signalled = sigterm_while_ending(monkeypatch, lambda client, run_id, status: status == "FAILED")

    def main():
        with tracking.step_run(cfg, "main"), tracking.step_run(cfg, "prepare"):
            raise tracking.StepFailed("the data went missing")

    with pytest.raises(SystemExit) as stopped:
        tracking.cli(main)
    assert stopped.value.code == 143 and signalled
    runs = {r.data.tags["step"]: r for r in experiment_runs(MlflowClient())}
    assert {step: r.info.status for step, r in runs.items()} == {"prepare": "FAILED", "main": "KILLED"}
    assert runs["prepare"].data.tags["failure_reason"] == "the data went missing"


@pytest.mark.parametrize("under_nohup", [False, True])
def test_a_terminal_that_hangs_up_ends_the_runs_killed_unless_under_nohup(store, under_nohup):
    """A step run in a terminal that hung up (an ssh connection lost, the window closed) died on SIGHUP at once, its
    runs left RUNNING until a next `main` on the same machine ended them. It stops as on SIGTERM: runs KILLED, tag
    `interrupted_by` SIGHUP, exit 129. Under `nohup` (SIGHUP ignored) it goes on to the end, as asked."""
    script = f"""
import os, signal, time
from pipeline import config, tracking
signal.signal(signal.SIGHUP, signal.{"SIG_IGN" if under_nohup else "SIG_DFL"})  # whatever this test runs under
cfg = config.load({str(ROOT / TINY)!r}, ["tracking.experiment=e2e"])
def main():
    with tracking.step_run(cfg, "main"), tracking.step_run(cfg, "prepare"):
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.5)
tracking.cli(main)
"""
    done = subprocess.run([sys.executable, "-c", script], env=store, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    runs = experiment_runs(MlflowClient())
    if under_nohup:
        assert done.returncode == 0, done.stderr[-3000:]
        assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 2
        return
    assert done.returncode == 128 + signal.SIGHUP, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "error: interrupted by SIGHUP; open runs ended KILLED."
    assert {(r.info.status, r.data.tags.get("interrupted_by")) for r in runs} == {("KILLED", "SIGHUP")}
    assert len(runs) == 2


@pytest.mark.parametrize("opening", ["prepare", "main", "train"])
def test_a_stopping_signal_while_mlflow_opens_a_step_leaves_no_run_running(store, monkeypatch, opening):
    """SIGTERM (Ctrl-C) arriving while MLflow opened a step's run (`start_run`: the run written, not yet on MLflow's
    active-run list): the exception left that run RUNNING for good, though the step said "open runs ended KILLED".
    It waits until the run is open: the run ends KILLED, tagged `interrupted_by`, with the runs around it, and a
    train run's system-metrics monitor (started as the run opens) stops with it; 143."""
    import mlflow.tracking.fluent

    from pipeline import tracking

    cfg = config.load(ROOT / TINY, ["tracking.experiment=e2e", "tracking.system_metrics=true"])
    create_run, signalled = MlflowClient.create_run, []

    def created(self, *args, **kwargs):
        run = create_run(self, *args, **kwargs)
        if not signalled and (kwargs.get("tags") or {}).get("step") == opening:
            signalled.append(run.info.run_id)
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, the run written but not yet active
        return run

    monkeypatch.setattr(MlflowClient, "create_run", created)

    def main():
        with tracking.step_run(cfg, "main" if opening == "prepare" else opening), tracking.step_run(cfg, "prepare"):
            pass

    with pytest.raises(SystemExit) as stopped:
        tracking.cli(main)
    assert stopped.value.code == 143 and signalled
    runs = {r.info.run_id: r for r in experiment_runs(MlflowClient())}
    assert {r.info.status for r in runs.values()} == {"KILLED"} and len(runs) == 1 + (opening == "prepare")
    assert runs[signalled[0]].data.tags.get("interrupted_by") == "SIGTERM"
    assert mlflow.active_run() is None and not mlflow.tracking.fluent.run_id_to_system_metrics_monitor


@pytest.mark.parametrize(("argv", "error"), [
    (["--settle"], "the following arguments are required: run_id, status, pid"),
    (["--settle", "abc", "FINISHED", "12x"], "argument pid: invalid int value: '12x'"),
    (["--settle", "abc", "DONE", "1"], "argument status: invalid choice: 'DONE'"),
    (["--settle", "abc", "FAILED", "1", "--delte"], "unrecognized arguments: --delte"),
])
def test_the_store_commands_internal_settle_refuses_wrong_arguments_in_one_line(tmp_path, monkeypatch, capsys, argv,
                                                                               error):
    """`python -m pipeline.tracking --settle` (the detached process that ends the run `mlflow run` opened) with an
    argument missing or wrong died on an IndexError or ValueError traceback; an unknown status reached MLflow. Its
    usage and one error line, exit 2, no store touched; given right, it settles the run it names."""
    import runpy

    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    settled = []
    monkeypatch.setattr(tracking, "_settle", lambda *args: settled.append(args))
    monkeypatch.setattr(sys, "argv", ["pipeline.tracking", *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("pipeline.tracking", run_name="__main__")
    assert exited.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"python -m pipeline.tracking --settle: error: {error}")
    assert not settled and not (tmp_path / "mlflow.db").exists()
    monkeypatch.setattr(sys, "argv", ["pipeline.tracking", "--settle", "abc", "KILLED", "12", "--delete"])
    runpy.run_module("pipeline.tracking", run_name="__main__")
    assert settled == [("abc", "KILLED", 12, True)]


def test_the_store_command_answers_help_and_refuses_other_arguments_without_touching_a_store(tmp_path):
    """`python -m pipeline.tracking --help` (or a typo's argument) created the store, or probed a server, and
    printed "ready": the help was never shown, the argument never read. Now the usage, or one line and exit 2, and
    no store made."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    shown = subprocess.run([sys.executable, "-m", "pipeline.tracking", "--help"], cwd=ROOT, capture_output=True,
                           text=True, env=env, timeout=120)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python -m pipeline.tracking"), shown.stdout
    assert "MLFLOW_TRACKING_URI" in shown.stdout and str(tmp_path) not in shown.stdout  # no store named ready
    refused = subprocess.run([sys.executable, "-m", "pipeline.tracking", "--store", "x"], cwd=ROOT,
                             capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "unrecognized arguments: --store x" in refused.stderr, refused.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_resuming_a_run_without_a_checkpoint_says_why_it_has_none(store):
    """`-P resume=<id>` of a run without a checkpoint here said "(finished runs delete theirs)" of every run: of one
    killed before its first checkpoint, or trained on another machine, too. A finished run is said to have finished;
    any other is said why it may have none, and where it was looked for."""
    from pipeline import config
    from pipeline.tracking import resume

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    ids = {}
    for status in ("FINISHED", "KILLED"):
        ids[status] = client.create_run(experiment_id, tags={"step": "train"}).info.run_id
        client.set_terminated(ids[status], status)
    for status, said in (("FINISHED", "finished (FINISHED), and a run deletes its checkpoint as it finishes: nothing "
                                      "to go on from; resume=never trains a new run"),
                         ("KILLED", f"(KILLED) has no checkpoint in {resume.checkpoint_dir(ids['KILLED'])}: it stopped "
                                    f"before its first checkpoint, or trained on another machine or under another "
                                    f"PIPELINE_CHECKPOINT_DIR (set that one to resume it there)")):
        with pytest.raises(config.ConfigError) as refused:
            resume.find_resumable(config.load(TINY), "", resume=ids[status])
        assert str(refused.value) == f"resume: run {ids[status]} {said}"


@pytest.mark.parametrize(("checkpointed", "logged", "said"), [
    (2, 3, "after epoch 2 of 5, its last checkpoint; epoch 3, logged since, trains again"),
    (2, 2, "after epoch 2 of 5, its last checkpoint"),
    (5, 5, "after epoch 5 of 5, its last: its model is left to log"),
], ids=["an-epoch-trained-since", "at-its-checkpoint", "every-epoch-trained"])
def test_the_line_resuming_a_run_names_the_epoch_it_goes_on_after(store, capsys, checkpointed, logged, said):
    """`resuming train run ... from its last completed epoch`, of a run that logged epoch 3 and checkpointed epoch 2
    (train.checkpoint_every 2), then was killed: it went on after epoch 2, training epoch 3 again. The line names the
    epoch it goes on after, of how many, and the epochs trained since that train again."""
    from pipeline import config
    from pipeline.tracking import resume

    client = MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name("e2e").experiment_id,
                               tags={"step": "train"}).info.run_id
    for epoch in range(1, logged + 1):
        client.log_metric(run_id, "val_acc", 0.1, step=epoch)
    stand_in_checkpoint(run_id)
    metadata = resume.checkpoint_dir(run_id) / resume.CHECKPOINT_METADATA
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "epoch": checkpointed}))
    cfg = config.load(TINY, ["train.epochs=5", "train.checkpoint_every=2"])
    capsys.readouterr()
    try:
        assert resume.find_resumable(cfg, "", resume=run_id) == run_id
    finally:
        resume.release(run_id)
    assert capsys.readouterr().out == f"resuming train run {run_id} {said}\n"


def test_resuming_a_diverged_run_says_it_diverged(store):
    """`-P resume=<id>` of a run that diverged (FAILED, its checkpoint removed as it failed: going on from it would
    diverge again) said it "stopped before its first checkpoint, or trained on another machine": the user looked for a
    checkpoint that never was to be. The line says the run diverged, why, and that its checkpoint went for that."""
    from pipeline import config
    from pipeline.tracking import resume

    client = MlflowClient()
    reason = ("training diverged: loss became nan in epoch 2; nothing was registered. Lower train.lr (now 0.4) or "
              "check the data")
    run_id = client.create_run(client.get_experiment_by_name("e2e").experiment_id,
                               tags={"step": "train", "failure_reason": reason}).info.run_id
    client.set_terminated(run_id, "FAILED")
    with pytest.raises(config.ConfigError) as refused:
        resume.find_resumable(config.load(TINY), "", resume=run_id)
    assert str(refused.value) == (f"resume: run {run_id} failed (FAILED) as training diverged: loss became nan in "
                                  f"epoch 2, and a run that diverges deletes its checkpoint, as going on from it would "
                                  f"diverge again: nothing to go on from; lower train.lr (now 0.4) and resume=never "
                                  f"trains a new run")


@pytest.mark.parametrize(("epochs", "said"), [
    (6, "; this command trains a run of its own from epoch 1 (-P resume={run} extends that run to 6 epochs instead)"),
    (2, "; this command trains a run of its own from epoch 1 (a run is resumed with its epochs or more)"),
])
def test_a_rerun_with_other_epochs_names_the_run_it_does_not_resume(store, capsys, epochs, said):
    """A run of 3 epochs stopped after a checkpoint, rerun with -P epochs=6 to train it longer: a run of its own
    trained from epoch 1, not a word of the stopped run (`train.epochs` is in the key a rerun resumes by). A note names
    that run and how to extend it; a run of other params than the epochs gets none."""
    from pipeline import config
    from pipeline.tracking import resume

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    dataset_uri = "runs:/0123456789abcdef0123456789abcdef/dataset/dataset.npz"
    runs = {}
    for lr in ("0.1", "0.2"):
        cfg = config.load(TINY, [f"train.lr={lr}"])
        runs[lr] = client.create_run(experiment_id, tags={"step": "train", "dataset_uri": dataset_uri}).info.run_id
        for key, value in {**cfg.flat(), "dataset_uri": dataset_uri}.items():
            client.log_param(runs[lr], key, value)
        client.set_terminated(runs[lr], "KILLED")
        stand_in_checkpoint(runs[lr])
    capsys.readouterr()
    rerun = config.load(TINY, ["train.lr=0.1", f"train.epochs={epochs}"])
    assert resume.find_resumable(rerun, dataset_uri) is None
    assert capsys.readouterr().err == (f"note: train run {runs['0.1']} (KILLED), of the same params and data but "
                                       f"train.epochs 3, left a checkpoint after epoch 1"
                                       f"{said.format(run=runs['0.1'])}\n")


def test_a_run_name_given_as_resume_names_the_run_id_to_give(store, in_process):
    """The UI shows a run by its name (`resnet20-e3-b128-lr0.1`), which a user gives as resume=: 'no run ... in the
    tracking store', as if no such run were there. The line names the id of the run so named that can go on (the one
    with a checkpoint here), or says that none of them can."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    name = "resnet20-e3-b128-lr0.1"
    ids = {}
    for status in ("FINISHED", "KILLED"):
        ids[status] = client.create_run(experiment_id, run_name=name, tags={"step": "train"}).info.run_id
        client.set_terminated(ids[status], status)
    refused = in_process("main", *RESUMED, "--resume", name)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: resume: {name!r} is the name of 2 train runs, none of which left a checkpoint here to go on from; "
        f"resume takes a train run's id")
    stand_in_checkpoint(ids["KILLED"])
    refused = in_process("main", *RESUMED, "--resume", name)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: resume: {name!r} is the name of 2 train runs, not a run id; resume={ids['KILLED']} goes on with the "
        f"one of them that left a checkpoint here (KILLED, after epoch 1)")
    assert len(experiment_runs(client)) == 2  # no main run opened


def test_a_resumed_run_says_how_its_last_session_ended_and_keeps_the_earlier_ones_apart(store):
    """A train run stopped by Ctrl-C, then resumed and failed on another error, kept tag `failure_reason` of neither
    (the first failure's is kept, 'unless it has one') and its `interrupted_by`; resumed again and FINISHED, it still
    bore both, a finished run that reads as failed and interrupted. Each session's end is its own: the tags of how the
    run ended are the last session's, the earlier ends listed in tag `earlier_sessions_ended`."""
    from pipeline import tracking

    client = MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name("e2e").experiment_id,
                               tags={"step": "train", "interrupted_by": "SIGINT"}).info.run_id
    client.set_terminated(run_id, "KILLED")
    with pytest.raises(RuntimeError), tracking.open_run("train", resume_run_id=run_id):
        raise RuntimeError("the disk is full")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "the disk is full" in run.data.tags["failure_reason"]
    assert "interrupted_by" not in run.data.tags
    assert run.data.tags["earlier_sessions_ended"] == "KILLED (interrupted_by SIGINT)"
    with tracking.open_run("train", resume_run_id=run_id):
        pass
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    assert run.data.tags["earlier_sessions_ended"] == (
        "KILLED (interrupted_by SIGINT) | FAILED (failure_reason unexpected RuntimeError: the disk is full; full "
        "traceback on the step's stderr (the console it ran in; `mlflow run` keeps no copy))")


def test_a_run_killed_while_its_first_checkpoint_was_written_leaves_no_folder_for_good(store):
    """A train run killed (SIGKILL, the OOM killer) while its first checkpoint was written left its lock beside a torn
    weights file (or the metadata not yet renamed), no checkpoint to resume: no main took the folder for a dead run's
    (it held more than a lock), so the file, as large as the model, stayed for good, and the run RUNNING. The next
    main removes it, as a folder that holds only a lock, and ends the run KILLED."""
    from pipeline.tracking import resume

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    runs = {}
    for torn in ("epoch-0001.weights.h5", "training_metadata.json.partial"):
        runs[torn] = mlflow.start_run(experiment_id=experiment_id, tags={"step": "train"}).info.run_id
        mlflow.end_run("RUNNING")
        folder = resume.checkpoint_dir(runs[torn])
        folder.mkdir(parents=True)
        (folder / resume.LOCK_FILE).write_text(resume._store())
        (folder / "epoch-0001.weights.h5").write_bytes(b"\x89HDF\r\n")
        if torn.endswith(".partial"):
            (folder / torn).write_text('{"epoch": 1, "weights": "epoch-0001.weights.h5"}')
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}) as rerun:
        resume.remove_stale_locks()
    for run_id in runs.values():
        run = client.get_run(run_id)
        assert (run.info.status, run.data.tags.get("ended_by")) == ("KILLED", rerun.info.run_id)
        assert not resume.checkpoint_dir(run_id).exists()
    assert not resume._claimed


def test_the_line_of_a_stopped_training_names_its_run_and_what_a_rerun_does(store, in_process, monkeypatch):
    """Ctrl-C in training said "Completed epochs, if any, are checkpointed under checkpoints/: rerun the same command
    to resume", of a run that left a checkpoint or none alike (a rerun of one that left none trains a run of its own
    from epoch 1). The line names the train run, and the epoch its checkpoint holds or that it left none."""
    from pipeline import tracking, train
    from pipeline.tracking import active_run_id, resume

    checkpointed = []

    def interrupted(*args, **kwargs):
        if checkpointed:
            stand_in_checkpoint(active_run_id())
        raise tracking.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(train, "fit", interrupted)
    lines = []
    for _ in range(2):
        stopped = in_process("train", *RESUMED)
        assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
        lines.append(stopped.stderr.strip().splitlines()[-1])
        checkpointed.append(True)
    first, second = sorted(experiment_runs(MlflowClient(), "tags.step = 'train'"), key=lambda r: r.info.start_time)
    assert lines == [
        f"error: interrupted by SIGTERM; open runs ended KILLED. Train run {first.info.run_id} left no checkpoint in "
        f"{resume.checkpoint_dir(first.info.run_id)} (stopped before its first): a rerun of the same command trains a "
        f"run of its own from epoch 1.",
        f"error: interrupted by SIGTERM; open runs ended KILLED. Train run {second.info.run_id} keeps its checkpoint "
        f"after epoch 1 in {resume.checkpoint_dir(second.info.run_id)}: rerun the same command to resume (or -P "
        f"resume={second.info.run_id})."]


def test_resuming_a_live_run_before_its_first_checkpoint_says_it_is_being_trained(store):
    """`-P resume=<id>` of a run another process trains now, in its first epoch (its lock held, no checkpoint yet),
    was refused as having no checkpoint: "it stopped before its first checkpoint, or trained on another machine", of a
    run that had not stopped. It is refused as a live run is."""
    from pipeline import config
    from pipeline.tracking import resume

    client = MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name("e2e").experiment_id, tags={"step": "train"}).info.run_id
    folder = resume.checkpoint_dir(run_id)
    folder.mkdir(parents=True)
    (folder / resume.LOCK_FILE).write_text(resume._store())
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
                               str(folder / resume.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(config.ConfigError) as refused:
            resume.find_resumable(config.load(TINY), "", resume=run_id)
    finally:
        holder.kill()
        holder.wait()
    assert str(refused.value) == (f"resume: run {run_id} is being trained by another process right now (before its "
                                  f"first checkpoint)")
    assert not resume._claimed


def test_an_extended_run_says_after_which_epoch_and_which_logged_points_are_of_the_shorter_schedule(store):
    """A run of 3 epochs (checkpoint every 2) stopped in epoch 3, after logging it, extended to 6 by resume=<id>: it
    went on from epoch 2's checkpoint on the 6-epoch schedule, and epoch 3 trained again, while the points logged for
    it (its loss, its lr) stay those of the 3-epoch schedule, weights the run no longer descends from: nothing said so.
    Tag `extended_after_epoch` says from which epoch the longer schedule trained, and which epochs' points are the
    shorter one's; a later resume of the extended run, on its schedule, keeps it."""
    from pipeline import config
    from pipeline.tracking import resume

    client = MlflowClient()
    dataset_uri = "runs:/0123456789abcdef0123456789abcdef/dataset/dataset.npz"
    first = config.load(TINY, ["train.checkpoint_every=2"])
    run_id = client.create_run(client.get_experiment_by_name("e2e").experiment_id, tags={"step": "train"}).info.run_id
    for key, value in {**first.flat(), "dataset_uri": dataset_uri}.items():
        client.log_param(run_id, key, value)
    for epoch in (1, 2, 3):
        client.log_metric(run_id, "val_acc", 0.1, step=epoch)
    stand_in_checkpoint(run_id)
    metadata = resume.checkpoint_dir(run_id) / resume.CHECKPOINT_METADATA
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "epoch": 2}))
    extended = config.load(TINY, ["train.checkpoint_every=2", "train.epochs=6"])
    with mlflow.start_run(run_id=run_id):
        resume.log_train_params(extended, dataset_uri)
    tags = client.get_run(run_id).data.tags
    assert (tags["extended_epochs"], tags["extended_after_epoch"]) == (
        "3 -> 6", "2; epoch 3 keeps the points logged on the 3-epoch schedule before")
    for epoch in (4, 5):  # the extended run stopped in epoch 5, after its checkpoint of epoch 4, and resumed
        client.log_metric(run_id, "val_acc", 0.1, step=epoch)
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "epoch": 4}))
    with mlflow.start_run(run_id=run_id):
        resume.log_train_params(extended, dataset_uri)
    assert client.get_run(run_id).data.tags["extended_after_epoch"] == tags["extended_after_epoch"]


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    """A checkpoint resumed into a model of other shapes (resume=<id> across a code change that altered the model,
    which the refusal of other code offers): Keras's "A total of 2 objects could not be loaded" traceback, exit 1. One
    line naming the checkpoint, a variable whose shape differs, and the way on."""
    import numpy as np

    def net(width: int) -> keras.Model:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(width, name="hidden"),
                                  keras.layers.Dense(3, name="out")])
        model.compile("sgd", "mse")
        return model

    net(2).fit(np.zeros((8, 4)), np.zeros((8, 3)), epochs=1, verbose=0,
               callbacks=[Checkpoint(tmp_path / "c", 1, keep=True)])
    with pytest.raises(config.ConfigError) as refused:
        net(5).fit(np.zeros((8, 4)), np.zeros((8, 3)), epochs=2, verbose=0, callbacks=[Checkpoint(tmp_path / "c", 1)])
    assert str(refused.value) == (
        f"resume: the checkpoint {tmp_path / 'c' / 'epoch-0001.weights.h5'} does not fit the model built here "
        f"(hidden/kernel: (4, 5) here, (4, 2) in the checkpoint): its weights are of another model, trained by other "
        f"code or params; restore that code to go on with the run, or resume=never to start afresh")
