"""Sweeps on Optuna with a real SQLite tracking store and Optuna storage: pruning, parallel workers,
and specs refused before any run opens."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from mlflow import MlflowClient
from mlflow.entities import ViewType

from pipeline import config, sweep
from pipeline.tracking import Interrupted, StepFailed, steps
from tests.conftest import ROOT, run_module, stopping_signals_raise
from tests.test_fault_tolerance import sigterm_while_ending

TINY = "params/tiny.yaml"
# A learning rate that learns and one far too small to (1e-6: val_acc stays near chance).
GRID = "grid:\n  train.lr: [0.1, 0.000001]\n"
SMALL = {"train.epochs": 3, "train.batch_size": 16, "data.synthetic_train": 1024, "data.synthetic_test": 128,
         "evaluate.samples": 1, "train.validation_fraction": 0.125}


# For trials whose learning no test here measures: one epoch on fewer images.
QUICK = {"train.epochs": 1, "data.synthetic_train": 512}


def write_spec(folder, name: str, body: str, changes: dict | None = None) -> str:
    """A spec over params/tiny.yaml with SMALL (and `changes` to it; None leaves a key out, as one the body sweeps)
    as its overrides."""
    path = folder / f"{name}.yaml"
    overrides = ", ".join(f"{k}: {v}" for k, v in {**SMALL, **(changes or {})}.items() if v is not None)
    path.write_text(f"base: {TINY}\noverrides: {{{overrides}}}\n{body}")
    return str(path)


def sweep_runs(client: MlflowClient, study: str) -> tuple:
    """(parent run, {trial number: trial run}, {trial number: train run}) of one study."""
    experiment = client.get_experiment_by_name("cifar10-resnet")
    parent, = client.search_runs([experiment.experiment_id], f"tags.step = 'sweep' and tags.optuna_study = '{study}'")
    trials = {int(r.data.tags["optuna_trial"]): r for r in client.search_runs(
        [experiment.experiment_id], f"tags.step = 'trial' and tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    trains = {number: client.get_run(r.data.tags["train_run_id"]) for number, r in trials.items()
              if "train_run_id" in r.data.tags}  # a killed trial's fit never finished
    return parent, trials, trains


def epochs_of(client: MlflowClient, run) -> int:
    return len(client.get_metric_history(run.info.run_id, "val_acc"))


def test_pruning_runs_fewer_epochs_and_finds_the_same_best_trial(store, tmp_path, in_process):
    # 14 steps an epoch: lr 0.1 learns in the first, on one stage of basic blocks (the model is not what it is about)
    fewer = {"data.synthetic_train": 512, "train.batch_size": 32, "model.block": "basic", "model.widths": "[16]",
             "model.strides": "[1]"}
    pruned_spec = write_spec(tmp_path, "sweep-pruned", GRID + "pruner: {type: median, n_startup_trials: 1}\n", fewer)
    plain_spec = write_spec(tmp_path, "sweep-plain", GRID + "pruner: none\n", fewer)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"  # the default: beside the store's mlflow.db

    done = in_process("sweep", "--spec", pruned_spec, "--study", "pruned")
    assert done.returncode == 0, done.stderr[-3000:]
    done = in_process("sweep", "--spec", plain_spec, "--study", "plain")
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient()
    pruned_parent, pruned_trials, pruned_trains = sweep_runs(client, "pruned")
    plain_parent, plain_trials, plain_trains = sweep_runs(client, "plain")
    assert sorted(pruned_trials) == sorted(plain_trials) == [0, 1]

    # One worker claims the queued grid in order: lr 0.1 finishes, then lr 1e-6 falls below it and is
    # pruned before its last epoch, its runs KILLED with the curve up to there kept.
    studies = {name: optuna.load_study(study_name=name, storage=storage) for name in ("pruned", "plain")}
    assert [t.state.name for t in studies["pruned"].trials] == ["COMPLETE", "PRUNED"]
    assert pruned_trials[1].info.status == "KILLED" and pruned_trains[1].info.status == "KILLED"
    stopped = int(pruned_trials[1].data.tags["pruned_at_epoch"])
    assert 1 <= stopped < 3 and pruned_trains[1].data.tags["pruned_at_epoch"] == str(stopped)
    assert "failure_reason" not in pruned_trains[1].data.tags  # pruned, not failed
    assert epochs_of(client, pruned_trains[1]) == stopped
    assert sorted(studies["pruned"].trials[1].intermediate_values) == list(range(1, stopped + 1))
    assert [t.state.name for t in studies["plain"].trials] == ["COMPLETE"] * 2
    assert all(r.info.status == "FINISHED" for r in plain_trials.values())

    pruned_epochs = sum(epochs_of(client, r) for r in pruned_trains.values())
    plain_epochs = sum(epochs_of(client, r) for r in plain_trains.values())
    assert (pruned_epochs, plain_epochs) == (3 + stopped, 2 * 3)

    # The same best trial, registered once per sweep.
    best = {name: sweep.best_of(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
            for name, study in studies.items()}
    assert best["pruned"].number == best["plain"].number and best["pruned"].params == best["plain"].params
    assert best["pruned"].value == pytest.approx(best["plain"].value, abs=0.02)
    assert pruned_parent.data.tags["best_trial"] == str(best["pruned"].number)
    versions = client.search_model_versions("name = 'cifar10-resnet'")
    assert sorted(v.tags["run_id"] for v in versions) == sorted(
        [pruned_trains[best["pruned"].number].info.run_id, plain_trains[best["plain"].number].info.run_id])
    for parent in (pruned_parent, plain_parent):
        assert parent.info.status == "FINISHED"
        children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(r.data.tags["step"] for r in children if r.data.tags["step"] != "trial") in (
            ["compare", "register"], ["compare", "prepare", "register"])


@pytest.mark.parametrize(("body", "args", "message"), [
    (GRID + "sampler: annealing\n", [], "error: spec.sampler: must be one of grid, random, tpe, got 'annealing'"),
    ("grid: {}\n", [], "error: spec.grid: the search space is empty"),
    ("space:\n  train.lr: {min: 0.1, max: 0.01}\ntrials: 3\n", [],
     "error: spec.space.train.lr: `low <= high` must hold, but got (low=0.1, high=0.01). "
     "(got {'min': 0.1, 'max': 0.01})"),
    ("grid:\n  train.lr: [0.1, -1]\n", [], "error: trial 1 (train.lr=-1.0): train.lr: must be > 0, got -1.0"),
    (GRID, ["--storage", "nosuchdb://x/y"],
     "error: storage: cannot open nosuchdb://x/y: NoSuchModuleError: Can't load plugin: sqlalchemy.dialects:nosuchdb"),
    (GRID, ["--storage", "postgresql://nobody@127.0.0.1:1/x"], "error: storage: cannot open "
     'postgresql+psycopg2://nobody@127.0.0.1:1/x: OperationalError: connection to server at "127.0.0.1", port 1 '
     "failed: Connection refused"),
    (GRID, ["--workers", "0"], "error: workers: must be >= 1, got 0"),
    # an in-memory study is each process's own: a --workers N command's workers found no study set up (a KeyError
    # traceback in each), and a rerun could not go on with it but ran every trial again
    (GRID, ["--storage", "sqlite://", "--workers", "2"], "error: storage: sqlite:// is an in-memory database, which "
     "neither other worker processes nor a rerun can reach; give a file such as sqlite:///optuna.db, or leave it "
     "empty"),
    (GRID, ["--storage", "sqlite:///:memory:"], "error: storage: sqlite:///:memory: is an in-memory database, which "
     "neither other worker processes nor a rerun can reach; give a file such as sqlite:///optuna.db, or leave it "
     "empty"),
    # the name of the record a study's registering worker keeps, listed beside the study by Optuna's tools: taken for
    # a study where it exists, it was waited on for a minute, then refused with advice to delete it (its study would
    # then register again); where it did not, the study ran, and starting study sweep-bad-1a2b3c4d would delete it
    (GRID, ["--study", "sweep-bad-1a2b3c4d.register"], "error: study: sweep-bad-1a2b3c4d.register is the record of "
     "who registers study sweep-bad-1a2b3c4d, not a study; pass -P study=sweep-bad-1a2b3c4d, or another name"),
    # a blank name made a study named " " (and a run "sweep- "); spaces around a name made another study than it
    (GRID, ["--study", " "], "error: study: ' ' is blank; give a name, or leave it empty for the spec's name and "
     "digest"),
    (GRID, ["--study", "mine "], "error: study: 'mine ' begins or ends with spaces; give the name without them"),
    # a blank storage was told "expected an SQLAlchemy URL such as sqlite:///optuna.db ..., got ' '"
    (GRID, ["--storage", " "], "error: storage: ' ' is blank; give an SQLAlchemy URL, or leave it empty for "
     "optuna.db beside the tracking store"),
    (GRID, ["--overrides", "train.lr=0.3"], "error: overrides: train.lr is swept by spec.grid; drop it from "
     "overrides or from the search space"),  # it would train every trial at 0.3 under the names of the grid's lrs
    ("space:\n  train.lr: {min: 0.01, max: 0.1}\ntrials: 1000000000000\n", [], "error: spec.trials: must be at "
     "most 10000 (a sweep queues every trial in its study before the first runs), got 1000000000000"),
    (GRID, ["--overrides", "train.validation_fraction=0"], "error: train.validation_fraction: a sweep chooses its "
     "best trial by val_acc, which must come from training images held out: set it > 0 (the spec's overrides or its "
     "base; 0 validates on the test split, and the best trial's test_acc would be chosen on the very images it is "
     "measured on)"),
    (GRID, ["--overrides", "data.source=/nonexistent/x.npz"],
     "error: data.source: '/nonexistent/x.npz' is neither 'cifar10', 'synthetic' nor an existing path"),
    ("space:\n  train.lr: {min: 0.01, max: 0.1}\ntrials: 2\nsampler: {type: tpe, n_startup_trials: abc}\n", [],
     "error: spec.sampler: TypeError: '<' not supported between instances of 'int' and 'str' "
     "(with the arguments {'n_startup_trials': 'abc'})"),  # Optuna checks it only when the first trial draws
    # what the train step refuses before training: every trial failed on it in turn, the study spent
    (GRID, ["--overrides", "train.feed=device"], "error: train.feed: 'device' needs the JAX backend, not tensorflow"),
    ("grid:\n  train.distribute: [none, data_parallel]\n", [],
     "error: train.distribute: 'data_parallel' needs the JAX backend, not tensorflow"),
    (GRID, ["--overrides", "train.distribute=multi_worker"], "error: train.distribute: 'multi_worker' trains over "
     "several hosts, but a sweep trains each trial on one: use auto (every GPU of this host), mirrored, data_parallel "
     "or none"),
], ids=["unknown-sampler", "empty-space", "bad-range", "bad-trial", "bad-storage", "no-database", "no-workers",
        "in-memory-storage-workers", "in-memory-storage", "register-record-as-study", "blank-study",
        "study-with-spaces", "blank-storage", "override-of-a-swept-key",
        "more-trials-than-can-run", "selecting-on-the-test-split", "no-data-source", "bad-sampler-argument",
        "wrong-backend-feed", "wrong-backend-mode", "several-hosts-mode"])
def test_bad_specs_exit_2_with_one_line_before_any_run(store, tmp_path, in_process, body, args, message):
    spec = write_spec(tmp_path, "sweep-bad", body)
    real = "workers:" in message or "psycopg2" in message  # two as real commands, the others in this process
    done = (run_module(store, "pipeline.sweep", "--spec", spec, *args) if real
            else in_process("sweep", "--spec", spec, *args))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [message]
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert not (tmp_path / "optuna.db").exists() or "storage" in message


def test_a_storage_file_in_missing_folders_is_made_and_a_folder_or_a_path_below_a_file_is_one_line(tmp_path,
                                                                                                     monkeypatch):
    """`-P storage=sqlite:///sweeps/optuna.db` with no folder `sweeps` was refused as "unable to open database file",
    which named neither the folder nor what was wrong, though a tracking store there is made with its folders; so were
    a folder and a path below a file."""
    monkeypatch.chdir(tmp_path)
    sweep.open_storage("sqlite:///sweeps/2026/optuna.db")
    sweep.open_storage(f"sqlite:///{tmp_path / 'abs' / 'optuna.db'}")
    assert (tmp_path / "sweeps" / "2026" / "optuna.db").is_file() and (tmp_path / "abs" / "optuna.db").is_file()
    (tmp_path / "notes.txt").write_text("not a folder")
    for url, message in [
            (f"sqlite:///{tmp_path / 'sweeps'}", f"{tmp_path / 'sweeps'} is a folder, not a SQLite database file"),
            ("sqlite:///notes.txt/optuna.db", f"{tmp_path / 'notes.txt'} is a file, not a folder")]:
        with pytest.raises(config.ConfigError) as refused:
            sweep.open_storage(url)
        assert str(refused.value) == f"storage: cannot open {url}: {message}; name a SQLite file (a new one is made)"


def test_a_storage_naming_the_tracking_stores_database_is_one_line_saying_so(store, tmp_path, in_process):
    """`-P storage=` the tracking store's own database: MLflow and Optuna both record their schema in
    alembic_version, and the sweep was refused as "The runtime optuna version 5.0.0 is no longer compatible with the
    table schema ... pip install -U optuna", which sends the user to upgrade a package that is not at fault."""
    spec = write_spec(tmp_path, "sweep-bad", GRID)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    MlflowClient().search_experiments()  # the tracking store's tables exist
    done = in_process("sweep", "--spec", spec, "--storage", uri)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: storage: {uri} holds an MLflow tracking store; Optuna needs a database of its own, e.g. "
        "sqlite:///optuna.db (leave storage empty for optuna.db beside mlflow.db)"]
    tables = sqlalchemy.inspect(sqlalchemy.create_engine(uri)).get_table_names()
    assert "experiments" in tables and "studies" not in tables  # Optuna wrote none of its tables there
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_trials_too_many_for_a_paths_counted_images_open_no_run(store, tmp_path, in_process):
    """A path's count is known once the sweep has prepared it: each trial whose batch it could not fill (with
    train.drop_remainder) opened a trial run and a train run and left them FAILED; then each failed in the study, and
    the first command ended its sweep run FAILED, exit 1, where a rerun refused the spec, exit 2. The first command now
    prepares the path before its study and sweep run are made and refuses the spec as the rerun does: exit 2, one
    line, no study, no sweep run (the prepare run kept, which the rerun reuses)."""
    from pipeline import data

    path = tmp_path / "d.npz"
    data.make_synthetic(n_train=100, n_test=20, seed=0).save(path)
    spec = write_spec(tmp_path, "sweep-few", "grid:\n  train.batch_size: [128, 256]\n",
                      {"data.source": path, "train.drop_remainder": "true", "train.batch_size": None})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    refused = ("error: trial 0 (train.batch_size=128): train.drop_remainder: the 88 training images make no whole "
               "batch of train.batch_size 128; lower the batch size or set train.drop_remainder=false")
    done = in_process("sweep", "--spec", spec, "--study", "few")
    assert (done.returncode, done.stderr.strip().splitlines()[-1]) == (2, refused), done.stderr[-3000:]
    assert [line for line in done.stderr.splitlines() if line.startswith("error: ")] == [refused]
    assert optuna.get_all_study_summaries(storage, include_best_trial=False) == []
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, run_view_type=ViewType.ALL)
    assert [(r.data.tags["step"], r.info.status) for r in runs] == [("prepare", "FINISHED")]
    done = in_process("sweep", "--spec", spec, "--study", "few")
    assert (done.returncode, done.stderr.strip().splitlines()[-1]) == (2, refused)
    assert len(client.search_runs(experiments, run_view_type=ViewType.ALL)) == len(runs)

    # a trial such a path refuses once it is counted (a space drawing among several datasets prepares each in its
    # first trial) fails in the study with the reason, no run opened; the trials table says why
    plan = sweep.Plan(spec)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
    sweep.lead(plan, study, runs[0].info.run_id, runs[0].info.experiment_id)
    trial, _ = sweep.claim(study, study._storage, plan)
    sweep.run_trial(plan, study, trial, runs[0].info.run_id, runs[0].info.experiment_id)
    reason = "ConfigError: " + refused.partition("128): ")[2]
    assert [(t.state.name, t.user_attrs.get("failure_reason")) for t in study.trials] == [
        ("FAIL", reason), ("WAITING", None)]
    assert sweep.trial_table(study)["failure_reason"].tolist()[0] == reason
    assert len(client.search_runs(experiments, run_view_type=ViewType.ALL)) == len(runs)


TWO_REPLICAS = ("train.batch_size: 33, which keras.distribution.DataParallel cannot split evenly over 2 replicas "
                "(data_parallel over cpu:0, cpu:1): use a multiple of 2")


def two_replicas(monkeypatch):
    """This host's train.distribute spreads every batch over two devices (JAX's DataParallel over two CPUs)."""
    from pipeline import distribute

    two = distribute.Distribution("data_parallel", ["cpu:0", "cpu:1"])
    monkeypatch.setattr(distribute, "distribution", lambda mode, job=None: two)


@pytest.mark.parametrize(("body", "refused"), [
    ("grid:\n  train.batch_size: [32, 33]\n", f"trial 1 (train.batch_size=33): {TWO_REPLICAS}"),
    ("space:\n  train.batch_size: [32, 33]\n  train.lr: {min: 0.01, max: 0.1}\ntrials: 2\n",
     f"space (train.batch_size=33 train.lr=0.01): {TWO_REPLICAS}"),
    ("space:\n  train.batch_size: {min: 32, max: 34}\ntrials: 2\n",  # its ends pass, 33 between them does not
     f"spec.space.train.batch_size: can draw 33, which the params refuse: {TWO_REPLICAS}; narrow the range, or list "
     "the values that pass"),
], ids=["grid", "space-choice", "space-range"])
def test_a_batch_this_hosts_replicas_cannot_share_is_refused_before_the_study(store, tmp_path, in_process, monkeypatch,
                                                                             body, refused):
    """Main and train refuse such a batch before any run (`inputs.check_known_batches`); a sweep's trial drawing it
    opened its trial and train runs and failed in them, each in turn. A sweep whose process trains its trials
    (one worker) now refuses the spec before its study or any run is made, naming the trial or the space's value."""
    two_replicas(monkeypatch)
    spec = write_spec(tmp_path, "sweep-replicas", body, {"train.batch_size": None})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    done = in_process("sweep", "--spec", spec, "--storage", storage)
    assert (done.returncode, done.stderr.strip().splitlines()) == (2, [f"error: {refused}"]), done.stderr[-3000:]
    assert optuna.get_all_study_summaries(storage, include_best_trial=False) == []
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()], run_view_type=ViewType.ALL) == []


def test_a_trial_whose_batch_this_hosts_replicas_cannot_share_fails_before_its_run_opens(store, tmp_path,
                                                                                          monkeypatch):
    """A worker process of `workers N` (its parent does not load the backend, which would take the GPUs' memory) or a
    host joining the study checks each trial it claims: refused, it fails in the study with the reason and opens no
    run."""
    plan = sweep.Plan(write_spec(tmp_path, "sweep-replicas", "grid:\n  train.batch_size: [33]\n",
                                 {"train.batch_size": None}))
    two_replicas(monkeypatch)
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    parent = client.create_run(experiment_id).info.run_id
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")
    sweep.lead(plan, study, parent, experiment_id)
    trial, _ = sweep.claim(study, study._storage, plan)
    sweep.run_trial(plan, study, trial, parent, experiment_id)
    assert [(t.state.name, t.user_attrs.get("failure_reason")) for t in study.trials] == [
        ("FAIL", f"ConfigError: {TWO_REPLICAS}")]
    assert [r.info.run_id for r in client.search_runs([experiment_id], run_view_type=ViewType.ALL)] == [parent]


@pytest.mark.parametrize("task", ["worker", "chief"])
def test_a_sweep_on_a_cluster_is_one_line_before_any_run(store, tmp_path, in_process, monkeypatch, task):
    """With TF_CONFIG naming several hosts, each trial of a sweep waited for the other hosts (10 minutes by default)
    and failed, one after another: hosts started with one trial's params can follow no other. Refused before any
    run opens, on any task of the cluster (under `mlflow run`, too: MLFLOW_RUN_ID set)."""
    hosts = {"chief": ["localhost:23456"], "worker": ["localhost:23457"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": hosts, "task": {"type": task, "index": 0}}))
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)  # as `mlflow run` sets it: a worker is refused all the same
    spec = write_spec(tmp_path, "sweep-cluster", GRID)
    done = in_process("sweep", "--spec", spec, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "error: TF_CONFIG: names 2 hosts, but a sweep trains each trial on one host: unset TF_CONFIG; to share a sweep "
        "between hosts, start the same sweep command on each (docs/sweeps.md#several-processes-and-hosts)"]
    monkeypatch.delenv("MLFLOW_RUN_ID")
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert not (tmp_path / "optuna.db").exists()


def test_official_cifar10_out_of_reach_is_one_line_before_any_trial(store, tmp_path, in_process, monkeypatch):
    """Offline, every trial of a cifar10 sweep failed on the download in turn (16 failed trials, a spent study)."""
    from pipeline import data

    def offline():
        raise data.DataError("data.source: cannot download CIFAR-10 (Name or service not known)")

    monkeypatch.setattr(data, "fetch_cifar10", offline)
    spec = write_spec(tmp_path, "sweep-offline", GRID)
    done = in_process("sweep", "--spec", spec, "--overrides", "data.source=cifar10",
                      "--storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "error: data.source: cannot download CIFAR-10 (Name or service not known)"]
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert not (tmp_path / "optuna.db").exists()


def test_a_space_whose_trials_share_their_data_prepares_it_once_before_any_trial(store, tmp_path, in_process,
                                                                                monkeypatch):
    """A space's data was prepared by its first trials: `-P workers=2` (the README's sweep-tpe.yaml command) ran two
    prepare runs side by side, one under each worker's first trial, as a grid's data is prepared once by the sweep."""
    from pipeline import prepare

    spec = write_spec(tmp_path, "sweep-space-data", "space:\n  train.lr: {min: 0.01, max: 0.1}\ntrials: 2\n")
    key = prepare.prepare_key(sweep.Plan(spec, "tracking.experiment=e2e").configs[0])
    found = []
    monkeypatch.setattr(sweep, "work", lambda plan, study, storage: found.append(prepare.find_prepared(key)))
    in_process("sweep", "--spec", spec, "--overrides", "tracking.experiment=e2e")  # trials left waiting: exit 1
    assert found != [None]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    (sweep_run,) = [r for r in runs if r.data.tags["step"] == "sweep"]
    assert [r.data.tags.get("mlflow.parentRunId") for r in runs if r.data.tags["step"] == "prepare"] == [
        sweep_run.info.run_id]


@pytest.mark.parametrize(("body", "said"), [
    ("grid:\n  train.lr: [0.1]\n", "(grid sampler, no pruner, 1 trial)"),
    ("space:\n  train.lr: {min: 0.01, max: 0.1}\ntrials: 2\npruner: median\n",
     "(tpe sampler, median pruner, 2 trials)"),
], ids=["one-trial-no-pruner", "median"])
def test_the_started_line_says_its_pruner_and_trials_in_words(store, tmp_path, in_process, monkeypatch, body, said):
    """A plain sweep began "started Optuna study ... (grid sampler, none pruner, 1 trials)"."""
    spec = write_spec(tmp_path, "sweep-said", body)
    monkeypatch.setattr(sweep, "work", lambda plan, study, storage: None)  # its trials left waiting: exit 1
    done = in_process("sweep", "--spec", spec, "--study", "said")
    started = [line for line in done.stdout.splitlines() if line.startswith("started Optuna study said")]
    assert len(started) == 1 and f" {said}; optuna-dashboard " in started[0], done.stdout[-2000:]


@pytest.mark.parametrize(("grid", "datasets"), [
    ("  train.lr: [0.05, 0.1]\n  train.momentum: [0.8, 0.9]\n", 1),
    ("  train.lr: [0.05, 0.1]\n  data.synthetic_train: [512, 1024]\n", 2)])
def test_a_grids_datasets_are_keyed_once_each_not_once_per_trial(tmp_path, monkeypatch, grid, datasets):
    """The datasets a grid prepares were found by each trial's prepare key, which digests the data source (a path's
    whole file or folder): a grid of 10,000 over a data path read its file 10,000 times before its first line, and
    one over synthetic data spent about 20 s on the keys alone. Trials of the same data params share one key."""
    from pipeline import prepare

    plan = sweep.Plan(write_spec(tmp_path, "sweep-keys", f"grid:\n{grid}", {"data.synthetic_train": None}))
    keyed, key = [], prepare.prepare_key
    monkeypatch.setattr(prepare, "prepare_key", lambda cfg: keyed.append(cfg) or key(cfg))
    monkeypatch.setattr(prepare, "find_prepared", lambda key: "runs:/found/dataset")  # prepared already: reused
    monkeypatch.setattr(prepare, "ensure_prepared", lambda cfg: "runs:/found/dataset")
    monkeypatch.setattr(plan, "check_prepared_images", lambda: None)
    assert sweep.prepare_shared_data(plan) == []
    assert len(keyed) == datasets


def test_a_leader_refused_before_its_study_is_set_up_leaves_no_study(store, tmp_path, in_process):
    """Its study stayed without a fingerprint: every rerun of the command waited a minute, then was refused."""
    client = MlflowClient()
    client.delete_experiment(client.create_experiment("trashed"))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = write_spec(tmp_path, "sweep-trashed", GRID)
    done = in_process("sweep", "--spec", spec, "--overrides", "tracking.experiment=trashed", "--storage", storage)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: tracking.experiment: 'trashed' is in MLflow's trash"), line
    assert optuna.get_all_study_summaries(storage, include_best_trial=False) == []


SPACE = "space:\n  train.lr: {min: 0.01, max: 0.1}\ntrials: 2\n"


@pytest.mark.parametrize(("body", "message"), [
    ("base: 5\ngrid: {train.lr: [0.1]}\n", "spec.base: must be a params file path such as params/tiny.yaml, got 5"),
    (f"base: [{TINY}]\ngrid: {{train.lr: [0.1]}}\n",
     f"spec.base: must be a params file path such as params/tiny.yaml, got ['{TINY}']"),
    ("grid: {train.lr: [0.1]}\nsampler: [grid]\n", "spec.sampler: must be one of grid, random, tpe, got ['grid']"),
    ("grid: {train.lr: [0.1]}\npruner: [median]\n", "spec.pruner: must be one of none, median, hyperband, "
     "got ['median']"),
    (SPACE + "pruner: {type: hyperband, min_resource: abc}\n", "spec.pruner: TypeError: unsupported operand "
     "type(s) for /: 'int' and 'str' (with the arguments {'min_resource': 'abc'})"),
    ("space:\n  train.lr: {min: 0.01, max: 0.1}\ntrials: 8\nsampler: {type: tpe, n_startup_trials: 6, "
     "n_ei_candidates: 0}\n", "spec.sampler: ValueError: The size of `samples` must be positive, but got 0. (with the "
     "arguments {'n_startup_trials': 6, 'n_ei_candidates': 0})"),  # TPE uses it only after its 6 random trials
    (SPACE + "seed: 4294967296\n", "spec.seed: must be an integer from 0 to 4294967295, got 4294967296"),
    (SPACE + "sampler: {type: random, seed: -1}\n",
     "spec.sampler.seed: must be an integer from 0 to 4294967295, got -1"),
    (SPACE + "seed: 3\nsampler: {type: tpe, seed: 4}\n", "spec.seed: 3 and spec.sampler.seed: 4 differ; give one seed"),
    ("grid: {train.lr: [1, 1.0]}\n", "spec.grid.train.lr: values repeat, so some trials would run twice: [1.0, 1.0]"),
    ("grid:\n  train.lr: [0.1, 1e-1, '0.1', 1/10]\n  train.momentum: [0.9]\n",
     "spec.grid.train.lr: values repeat, so some trials would run twice: [0.1, 0.1, 0.1, 0.1]"),
    # read by the key's type as in a params file, not by YAML 1.1 (which read 0x10 as 16 and 1:30 as 90)
    ("grid: {train.epochs: [2, 0x10]}\n", "spec.grid.train.epochs: must be an integer, got '0x10'"),
    ("space:\n  train.batch_size: {min: 16, max: 64.5}\ntrials: 2\n",
     "spec.space.train.batch_size: must be an integer, got '64.5'"),
    ("grid: {train.lrr: [0.1]}\n", "spec.grid.train.lrr: unknown params key; did you mean train.lr?"),
    # each trial would be ranked by val_acc on other images, the one that trained on most favoured
    ("overrides: {}\ngrid: {train.validation_fraction: [0.1, 0.2]}\n", "train.validation_fraction: a sweep ranks "
     "its trials by val_acc on the images they hold out, so it must be the same for every trial, got 0.1, 0.2: set it "
     "in the spec's overrides or its base, not its search space"),
    ("overrides: {}\nspace:\n  train.validation_fraction: {min: 0.05, max: 0.3}\ntrials: 2\n",
     "train.validation_fraction: a sweep "
     "ranks its trials by val_acc on the images they hold out, so it must be the same for every trial, got 0.05, "
     "0.3: set it in the spec's overrides or its base, not its search space"),
    # every trial's runs went in the sweep run's experiment, their params naming another
    ("grid:\n  tracking.experiment: [sweep-a, sweep-b]\n", "tracking.experiment: a sweep's runs all go in its sweep "
     "run's experiment, so it must be the same for every trial, got sweep-a, sweep-b: set it in the spec's overrides "
     "or its base, not its search space"),
    # TPE ran (0.1, 1) once, (0.1, 2) four times, (0.05, 2) never
    ("space:\n  train.lr: [0.05, 0.1]\n  model.units_per_stage: [1, 2]\nsampler: tpe\ntrials: 8\nseed: 0\n",
     "spec.trials: 8 trials over the 4 combinations of spec.space would run some twice; give trials <= 4, or a grid: "
     "to run each once"),
    ("space:\n  train.epochs: {min: 1, max: 2}\n  train.lr: [0.1]\ntrials: 3\n",
     "spec.trials: 3 trials over the 2 combinations of spec.space would run some twice; give trials <= 2, or a grid: "
     "to run each once"),
    # too few training images to hold out or to batch, as main and train refuse them (tiny: 1,024 synthetic images,
    # 102 held out): every such trial failed in its train run, the study spent
    ("grid:\n  train.batch_size: [32, 1024]\n  train.drop_remainder: [true]\n",
     "trial 1 (train.batch_size=1024 train.drop_remainder=true): train.drop_remainder: the 922 training images make "
     "no whole batch of train.batch_size 1024; lower the batch size or set train.drop_remainder=false"),
    ("space:\n  data.max_train: {min: 1, max: 512}\ntrials: 2\n",
     "space (data.max_train=1): train.validation_fraction: holding out 1 of the 1 training images leaves none to "
     "train on; lower it, or train on more (data.max_train)"),
    # a value inside a range that its ends do not show the params refuse: each trial drawing it failed, its slot spent
    ("space:\n  model.ghost_batch: [16]\n  train.drop_remainder: [true]\n  train.batch_size: {min: 16, max: 64}\n"
     "  model.widths: [[16, 32, 64], [8, 16, 32]]\ntrials: 4\n",
     "spec.space.train.batch_size: can draw 17 (with model.ghost_batch=16 train.drop_remainder=true "
     "model.widths=[16, 32, 64]), which the params refuse: model.ghost_batch: must divide train.batch_size (17): "
     "each batch is cut into ghost batches, got 16; narrow the range, or list the values that pass"),
    ("space:\n  train.schedule: [step]\n  train.lr_boundaries: [[0.3, 0.45]]\n  train.lr: {min: 0.01, max: 0.1, log: "
     "true}\n  train.epochs: {min: 4, max: 6}\ntrials: 4\n",
     "spec.space.train.epochs: can draw 5 (with train.schedule=step train.lr_boundaries=[0.3, 0.45] train.lr=0.01), "
     "which the params refuse: train.lr_boundaries: must fall on distinct epochs between the first and the last of 5 "
     "(they round to epochs [2, 2]), got [0.3, 0.45]; these need train.epochs >= 6; for a run of 5 set "
     "train.schedule=cosine (no boundaries) or train.lr_boundaries=[2/5, 3/5]; narrow the range, or list the values "
     "that pass"),
    # a traceback (TypeError from range(2.0) in the rehearsal) where a pruner took startup trials, else accepted
    ("grid: {train.lr: [0.1, 0.2]}\ntrials: 2.0\npruner: median\n",
     "spec.trials: a grid runs each of its 2 combinations once, got trials 2.0; leave trials out"),
    ("grid: {train.lr: [0.1]}\ntrials: true\n",
     "spec.trials: a grid runs each of its 1 combinations once, got trials True; leave trials out"),
    # a space's repeated choice, or a range of one number, ran the same params again within `trials`
    ("space:\n  train.lr: [0.1, 1e-1]\n  model.units_per_stage: [1, 2]\ntrials: 4\n",
     "spec.space.train.lr: values repeat, so some trials would run twice: [0.1, 0.1]"),
    ("space:\n  train.lr: {min: 0.1, max: 0.1}\ntrials: 3\n",
     "spec.trials: 3 trials over the 1 combinations of spec.space would run some twice; give trials <= 1, or a grid: "
     "to run each once"),
    # YAML 1.1 read `on:` as True: sorting it with 'trails' was a TypeError traceback
    ("on: 1\ntrails: 4\ngrid: {train.lr: [0.1]}\n",
     "spec: unknown keys ['on', 'trails'] (did you mean trials for trails?) (known: base, grid, overrides, pruner, "
     "random, sampler, seed, space, trials)"),
    # a slip was told the list of keys alone
    ("overides: {train.validation_fraction: 0.1}\ngrid: {train.lr: [0.1]}\n",
     "spec: unknown keys ['overides'] (did you mean overrides?) (known: base, grid, overrides, pruner, random, "
     "sampler, seed, space, trials)"),
    # a count no sweep can run: every trial is queued in the study before the first runs (a MemoryError traceback
    # once the sweep run had opened, or hours of queueing), and a grid's combinations are each checked first
    ("space:\n  train.lr: {min: 0.01, max: 0.1}\ntrials: 1000000000000\n",
     "spec.trials: must be at most 10000 (a sweep queues every trial in its study before the first runs), "
     "got 1000000000000"),
    ("grid:\n" + "".join(f"  {key}: {list(range(1, 17))}\n" for key in (
        "train.seed", "data.seed", "train.epochs", "evaluate.samples", "evaluate.batch_size")),
     "spec.grid: its 1048576 combinations are more than the 10000 trials a sweep runs (it queues every trial in its "
     "study before the first runs); list fewer values"),
    # TPE took a negative count of random startup trials for none, silently
    (SPACE + "sampler: {type: tpe, n_startup_trials: -3}\n",
     "spec.sampler.n_startup_trials: must be an integer >= 0, got -3"),
    # a grid queues its combinations and draws none: a seed changed nothing but the study's name
    ("grid: {train.lr: [0.1, 0.2]}\nseed: 3\n",
     "spec.seed: a grid queues each of its combinations and draws none, so a seed changes nothing; leave it out"),
    ("grid: {train.lr: [0.1, 0.2]}\nsampler: {type: grid, seed: 3}\n",
     "spec.sampler.seed: a grid queues each of its combinations and draws none, so a seed changes nothing; leave "
     "it out"),
    # what val_acc, which ranks the trials, never measures: each trial trained the same model, the first of equals won
    ("grid: {evaluate.tta: [none, flip]}\n", "spec.grid.evaluate.tta: a sweep ranks its trials by val_acc, which "
     "evaluate.tta (a setting of evaluate, which measures test_acc) does not change: its trials would train the same "
     "model and the first of equals win; set it in spec.overrides, and compare its values on one model with -e "
     "evaluate"),
    (SPACE.replace("trials: 2", "  train.checkpoint_every: [0, 1]\ntrials: 2"), "spec.space.train.checkpoint_every: a "
     "sweep ranks its trials by val_acc, which train.checkpoint_every (a setting of how a run is shown or kept) does "
     "not change: its trials would train the same model and the first of equals win; set it in spec.overrides"),
    ("overrides: {train.momentum: 0, train.validation_fraction: 0.1}\ngrid: {train.nesterov: [true, false]}\n",
     "spec.grid.train.nesterov: has no effect in any trial (given train.momentum 0.0; "
     "docs/params.md#params-without-effect): its trials would train the same model; sweep what it needs as well, or "
     "drop it"),
], ids=["base-number", "base-list", "sampler-list", "pruner-list", "bad-pruner-argument", "tpe-argument-after-startup",
        "seed-too-big", "negative-sampler-seed", "two-seeds", "int-and-float", "one-number-four-ways", "hex-in-grid",
        "float-end-of-an-int-range", "unknown-key", "validation-fraction-grid", "validation-fraction-range",
        "experiment-grid", "more-trials-than-choices", "more-trials-than-integers", "no-whole-batch",
        "none-left-to-train-on", "ghost-batch-inside-a-range", "boundaries-inside-a-range",
        "grid-trials-float", "grid-trials-bool", "repeated-choice-in-a-space", "range-of-one-number",
        "unknown-keys-of-other-types", "misspelt-key", "more-trials-than-can-run", "grid-larger-than-can-run",
        "negative-startup-trials", "seed-of-a-grid", "sampler-seed-of-a-grid", "evaluate-setting",
        "checkpoint-setting", "inert-in-every-trial"])
def test_a_plan_refuses_bad_values_with_the_key(tmp_path, body, message):
    spec = tmp_path / "sweep-bad.yaml"
    has_base = body.startswith("base:")
    overrides = "" if "overrides:" in body else "overrides: {train.validation_fraction: 0.1}\n"  # else the body's
    spec.write_text(("" if has_base else f"base: {TINY}\n") + overrides + body)
    with pytest.raises(config.ConfigError) as raised:
        sweep.Plan(str(spec))
    assert str(raised.value) == message


def test_a_key_inert_in_some_trials_only_is_swept(tmp_path):
    """train.nesterov acts where train.momentum, swept too, is not 0: not refused as inert in every trial."""
    plan = sweep.Plan(write_spec(tmp_path, "sweep-nesterov",
                                 "grid: {train.nesterov: [true, false], train.momentum: [0, 0.9]}\n"))
    assert len(plan.configs) == 4


@pytest.mark.parametrize("body", [GRID, "space:\n  train.lr: {min: 0.01, max: 0.1}\ntrials: 2\n"])
@pytest.mark.parametrize(("overrides", "message"), [
    ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
    ("train.epochs=abc", "train.epochs: must be an integer, got 'abc'"),
    ("train.bogus=1", "train.bogus: unknown key in overrides"),
], ids=["out-of-range", "wrong-type", "unknown-key"])
def test_a_bad_command_line_override_is_blamed_on_the_overrides_not_a_trial(tmp_path, body, overrides, message):
    """-P overrides at fault were reported as "trial 0 (train.lr=0.1): ...", as if the trial's values were."""
    spec = write_spec(tmp_path, "sweep-overrides", body)
    with pytest.raises(config.ConfigError) as raised:
        sweep.Plan(spec, f"evaluate.samples=1 {overrides}")
    assert str(raised.value).startswith(f"overrides (evaluate.samples=1 {overrides}): {message}")


@pytest.mark.parametrize("overrides", ["train.lr", "train.epochs"])
def test_a_command_line_override_without_a_value_is_one_line_saying_so(tmp_path, overrides):
    """-P overrides=train.lr (no `=`) was "train.lr is swept by spec.grid", and train.epochs "overrides
    (train.epochs): overrides: expected section.key=value, got 'train.epochs' (a value with spaces needs quotes ...)",
    as main says neither."""
    with pytest.raises(config.ConfigError) as raised:
        sweep.Plan(write_spec(tmp_path, "sweep-bare", GRID), overrides)
    assert str(raised.value) == f"overrides: expected section.key=value, got '{overrides}'"


def test_a_bad_value_of_the_specs_overrides_or_base_is_blamed_on_them_not_a_trial(tmp_path):
    """Refused whatever the trials' values, they were reported as "trial 0 (train.lr=0.1): ..."."""
    spec = write_spec(tmp_path, "sweep-spec-overrides", GRID, {"train.epochs": 0})
    with pytest.raises(config.ConfigError) as raised:
        sweep.Plan(spec, "evaluate.samples=1")
    assert str(raised.value) == "spec.overrides: train.epochs: must be >= 1, got 0"
    base = tmp_path / "base.yaml"
    base.write_text("train: {epochs: 0, validation_fraction: 0.1}\n")
    spec = tmp_path / "sweep-base.yaml"
    spec.write_text(f"base: {base}\n{GRID}")
    with pytest.raises(config.ConfigError) as raised:
        sweep.Plan(str(spec))
    assert str(raised.value) == f"spec.base ({base}): train.epochs: must be >= 1, got 0"


def test_a_specs_search_space_keys_are_the_ones_a_params_file_is_refused_for(tmp_path, monkeypatch):
    """The sweep kept its own list of search space keys beside config.SWEEP_SPACES, the keys for which a params file
    is refused as a spec: a key added to one list only was a spec's "unknown key", or a params file's section."""
    monkeypatch.setattr(config, "SWEEP_SPACES", (*config.SWEEP_SPACES, "lattice"))
    for key in config.SWEEP_SPACES:
        spec = tmp_path / f"sweep-{key}.yaml"
        spec.write_text(f"base: {TINY}\n{key}: {{train.lr: [0.1]}}\n" + ("trials: 1\n" if key != "grid" else ""))
        assert sweep.space_key(sweep.read_spec(spec)) == key
        with pytest.raises(config.ConfigError, match=rf"is a sweep's spec \(it has {key}:\)"):
            config.load(spec)
    spec.write_text("grid: {train.lr: [0.1]}\nlattice: {train.lr: [0.1]}\n")
    with pytest.raises(config.ConfigError, match="give exactly one search space"):
        sweep.read_spec(spec)


def test_a_params_file_given_as_a_spec_is_refused_saying_so(tmp_path):
    """`-P spec=params/tiny.yaml` was "spec: unknown keys ['data', 'evaluate', 'model', 'train']", as if a spec's keys
    were misspelt: the reverse of a spec given as -P params, which says what it is."""
    with pytest.raises(config.ConfigError) as refused:
        sweep.read_spec(TINY)
    assert str(refused.value) == (f"spec: {TINY} is a params file (it has data:), not a sweep's spec: name it as the "
                                  f"spec's base: (see params/sweep-example.yaml), or run it with -e main -P "
                                  f"params={TINY}")


def test_a_plan_reads_its_base_once_however_many_trials(tmp_path, monkeypatch):
    """default.yaml and the base were parsed again for every trial: a grid of 10,000 combinations spent over two
    CPU-minutes in YAML before its first line, in the command and again in each of its workers."""
    reads = []
    read_layers = config.read_layers
    monkeypatch.setattr(config, "read_layers", lambda path=None: reads.append(path) or read_layers(path))
    spec = write_spec(tmp_path, "sweep-many", "grid:\n  train.seed: [0, 1, 2, 3, 4]\n  data.seed: [0, 1, 2, 3]\n")
    plan = sweep.Plan(spec)
    assert len(plan.configs) == 20 and reads == [plan.base]
    assert plan.load({"train.seed": 9}, "trial 20").train.seed == 9 and reads == [plan.base]  # a trial's, later
    space = sweep.Plan(write_spec(tmp_path, "sweep-range", "space:\n  train.epochs: {min: 1, max: 4}\ntrials: 4\n",
                                  {"train.epochs": None}))
    assert len(reads) == 2 and space.configs  # its ends and inside its range too


def test_a_large_grid_says_it_checks_its_trials_before_it_does(store, tmp_path, in_process, monkeypatch):
    """A grid of 10,000 said nothing while its every trial's params were checked (14 s here, before its first line);
    the command now says so first. A small one says nothing of it, nor does a worker of `workers N`."""
    monkeypatch.setattr(sweep, "SAY_CHECKS", 4)
    monkeypatch.setattr(sweep, "work", lambda plan, study, storage: None)  # its trials left waiting: exit 1
    lines = []
    sweep.Plan(write_spec(tmp_path, "sweep-large", "grid:\n  train.lr: [0.01, 0.02]\n  train.momentum: [0.8, 0.9]\n"),
               say=lines.append)
    assert lines == ["checking the params of the grid's 4 trials before any run opens"]
    sweep.Plan(write_spec(tmp_path, "sweep-small", "grid:\n  train.lr: [0.01, 0.02, 0.03]\n"), say=lines.append)
    assert len(lines) == 1
    done = in_process("sweep", "--spec", str(tmp_path / "sweep-large.yaml"))
    assert done.stdout.startswith("checking the params of the grid's 4 trials before any run opens\n"), done.stdout
    assert "checking the params" not in in_process("sweep", "--spec", str(tmp_path / "sweep-large.yaml"),
                                                   "--join").stdout


def test_a_relative_base_is_read_beside_the_spec_else_from_the_project(tmp_path, monkeypatch):
    """A spec beside its base (`base: mybase.yaml`) was refused "spec.base (mybase.yaml): params: file not found"
    unless the command ran in the spec's folder; the shipped specs' `base: params/tiny.yaml` still works from
    anywhere, and a base beside the spec wins over one of the same name in the project."""
    (tmp_path / "mybase.yaml").write_text("train: {epochs: 2, validation_fraction: 0.1, schedule: cosine}\n")
    (tmp_path / "sweep-mine.yaml").write_text(f"base: mybase.yaml\n{GRID}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert sweep.Plan(str(tmp_path / "sweep-mine.yaml")).configs[0].train.epochs == 2
    shipped = sweep.Plan(str(ROOT / "params" / "sweep-example.yaml"))
    assert shipped.configs[0].model.widths == (16, 32, 64)  # params/tiny.yaml's, from the project
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "tiny.yaml").write_text("train: {epochs: 4, validation_fraction: 0.1, schedule: cosine}\n")
    (tmp_path / "sweep-tiny.yaml").write_text(f"base: params/tiny.yaml\n{GRID}")
    assert sweep.Plan(str(tmp_path / "sweep-tiny.yaml")).configs[0].train.epochs == 4


def test_a_trials_own_bad_value_is_still_blamed_on_the_trial_under_command_line_overrides(tmp_path):
    spec = write_spec(tmp_path, "sweep-trial", "grid:\n  train.lr: [0.1, -1]\n")
    with pytest.raises(config.ConfigError) as raised:
        sweep.Plan(spec, "evaluate.samples=1")
    assert str(raised.value) == "trial 1 (train.lr=-1.0): train.lr: must be > 0, got -1.0"


@pytest.mark.parametrize("body", [GRID, "space:\n  train.lr: {min: 0.01, max: 0.1}\ntrials: 2\n"])
def test_a_specs_override_of_a_swept_key_is_refused(tmp_path, body):
    """The trial's value replaced the spec's override unseen: every trial trained at its own train.lr, while the
    spec said one for all."""
    spec = write_spec(tmp_path, "sweep-both", body, {"train.lr": 0.5})
    with pytest.raises(config.ConfigError) as raised:
        sweep.Plan(spec)
    where = "grid" if body == GRID else "space"
    assert str(raised.value) == (f"spec.overrides: train.lr is swept by spec.{where}; drop it from spec.overrides or "
                                 "from the search space")


def test_a_spaces_ranges_are_checked_inside_within_bounds(tmp_path, monkeypatch):
    """A range is checked between its ends: an integer range at each value (at most sweep.RANGE_VALUES, spread as
    it draws), a float range at sweep.FLOAT_POINTS points (on a log scale where log), together within sweep.CHECKS."""
    wide = sweep.range_values(optuna.distributions.IntDistribution(16, 100_000))
    assert len(wide) <= sweep.RANGE_VALUES and wide[0] == 16 and wide[-1] == 100_000
    assert sweep.range_values(optuna.distributions.IntDistribution(1, 100_000, log=True))[:10] == list(range(1, 11))
    assert sweep.range_values(optuna.distributions.IntDistribution(16, 64)) == list(range(16, 65))
    assert sweep.range_values(optuna.distributions.FloatDistribution(0.001, 0.1, log=True)) == pytest.approx(
        [0.001, 0.001 * 10 ** (1 / 3), 0.001 * 10 ** (2 / 3), 0.01, 0.01 * 10 ** (1 / 3), 0.01 * 10 ** (2 / 3), 0.1],
        rel=1e-5)  # six digits, as a message shows them
    loaded = []
    load_layered = config.load_layered

    def stand_in(layers, overrides):  # no params rule refuses a float inside its range and not at its ends: a stand-in
        cfg = load_layered(layers, overrides)
        loaded.append(cfg)
        if 0.002 < cfg.train.lr < 0.05 and 20_000 < cfg.train.batch_size < 90_000:
            raise config.ConfigError(f"train.lr: a stand-in rule refuses {cfg.train.lr:.4f}")
        return cfg

    monkeypatch.setattr(config, "load_layered", stand_in)
    spec = write_spec(tmp_path, "sweep-inside", "space:\n  train.lr: {min: 0.001, max: 0.1, log: true}\n"
                      "  train.batch_size: {min: 16, max: 100000}\n  model.units_per_stage: [1, 2]\ntrials: 4\n",
                      {"train.batch_size": None})
    with pytest.raises(config.ConfigError) as raised:
        sweep.Plan(spec)
    found = re.fullmatch(r"spec\.space\.train\.lr and train\.batch_size: can draw (\S+) and (\d+) together \(with "
                         r"model\.units_per_stage=[12]\), which the params refuse: train\.lr: a stand-in rule refuses "
                         r"\S+; narrow the range, or list the values that pass", str(raised.value))
    assert found, str(raised.value)  # neither alone: only together, among a seeded sample of the combinations
    assert 0.002 < float(found[1]) < 0.05 and 20_000 < int(found[2]) < 90_000
    loaded.clear()
    monkeypatch.setattr(sweep, "CHECKS", 40)
    with contextlib.suppress(config.ConfigError):  # a sample of 10 may miss it: the price of the bound
        sweep.Plan(spec)
    # the 8 ends and choices, each value inside once (with those of the other keys in turn), 10 drawn together
    assert len(loaded) <= 8 + len(wide) - 2 + sweep.FLOAT_POINTS + 40 // 4


def test_trials_validated_on_different_held_out_images_are_warned_of(store, tmp_path, in_process, monkeypatch):
    """train.seed also draws the images a trial holds out: a sweep over it chose its best trial by val_acc on
    different images each, unsaid."""
    spec = write_spec(tmp_path, "sweep-seeds", "grid:\n  train.seed: [0, 1]\n")
    assert sweep.Plan(write_spec(tmp_path, "sweep-lrs", GRID)).held_out_varies == []

    def stop(url):
        raise config.ConfigError("storage: stopped here")

    monkeypatch.setattr(sweep, "open_storage", stop)  # after the checks, before any trial
    done = in_process("sweep", "--spec", spec)
    assert done.stderr.strip().splitlines() == [
        "warning: the trials differ in train.seed, and so do the held-out images their val_acc is measured on: the "
        "best trial is chosen on different images (the comparison's val_data column shows each trial's); set "
        "train.validation_seed (in the spec's overrides) to validate every trial on the same images",
        "error: storage: stopped here"]
    # with train.validation_seed set, the seeds draw no held-out images: the trials are ranked on the same ones
    done = in_process("sweep", "--spec", spec, "--overrides", "train.validation_seed=0")
    assert done.stderr.strip().splitlines() == ["error: storage: stopped here"]


def test_a_seed_sweep_with_one_validation_seed_ranks_its_trials_on_the_same_images(store, tmp_path, in_process):
    """Trials of other train.seed and one train.validation_seed: each trial's train run holds out the same images
    (tag val_data_sha256), logs the key, and the sweep warns of nothing."""
    spec = write_spec(tmp_path, "sweep-seeds", "grid:\n  train.seed: [0, 1]\n", QUICK)
    done = in_process("sweep", "--spec", spec, "--study", "seeds", "--overrides", "train.validation_seed=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: the trials differ" not in done.stderr
    _, _, trains = sweep_runs(MlflowClient(), "seeds")
    assert sorted(r.data.params["train.seed"] for r in trains.values()) == ["0", "1"]
    assert {r.data.params["train.validation_seed"] for r in trains.values()} == {"3"}
    assert len({r.data.tags["val_data_sha256"] for r in trains.values()}) == 1


@pytest.mark.parametrize(("body", "overrides", "varies"), [
    ("grid:\n  train.seed: [0, 1]\n", "", ["train.seed"]),
    ("grid:\n  train.seed: [0, 1]\n", "train.validation_seed=0", []),
    ("grid:\n  train.seed: [0, 1]\n", "train.validation_seed=7", []),
    ("space:\n  train.seed: {min: 0, max: 9}\ntrials: 3\n", "train.validation_seed=0", []),
    ("grid:\n  train.validation_seed: [0, 1]\n", "", ["train.validation_seed"]),
    ("grid:\n  train.validation_seed: [null, 0]\n", "", []),  # null at train.seed 0: the images of 0
    ("grid:\n  train.validation_seed: [null, 5]\n", "", ["train.validation_seed"]),
    ("grid:\n  train.seed: [0, 1]\n  train.validation_seed: [null, 1]\n", "", ["train.seed", "train.validation_seed"]),
    ("grid:\n  train.seed: [0, 1]\n  data.seed: [0, 1]\n", "train.validation_seed=0", ["data.seed"]),
    ("grid:\n  data.max_train: [512, 1024]\n", "", ["data.max_train"]),
], ids=["seeds", "seeds-one-validation-seed", "seeds-another-validation-seed", "seed-range-one-validation-seed",
        "validation-seeds", "null-and-the-seed", "null-and-another", "seeds-and-null", "data-seeds", "max-train"])
def test_trials_hold_out_other_images_where_the_seed_drawing_them_or_the_data_differ(tmp_path, body, overrides,
                                                                                      varies):
    """The held-out images are drawn by train.validation_seed, or train.seed where it is null: trials of other
    train.seed and one validation_seed hold out the same images, and only what changes them is named."""
    assert sweep.Plan(write_spec(tmp_path, "sweep-held-out", body), overrides).held_out_varies == varies


def test_the_best_trial_named_is_the_first_of_equals_as_registered():
    """Ties are common on small validation sets: the sweep's last line names the trial registration picks (the
    lowest-numbered of equals, register_best's rows being in trial order), not Optuna's study.best_trial, whose
    SQL has no tie-break and whose in-memory storage keeps the first of equals to finish."""
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    first = study.ask(dist)  # trial 0 starts first and ends last (another worker finishes trial 1 meanwhile)
    study.add_trial(optuna.trial.create_trial(value=0.9902, params={"x": 0.5}, distributions=dist))
    study.add_trial(optuna.trial.create_trial(value=0.5, params={"x": 0.1}, distributions=dist))
    study.tell(first, 0.9902)
    assert study.best_trial.number == 1  # the case: Optuna names another trial than the first of equals
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sweep.best_of(done).number == 0
    assert sweep.trial_table(study)["trial"].tolist() == [0, 1, 2]  # register_best's idxmax: the first row of equals


def test_a_sweeps_comparison_lists_its_registered_trial_first_of_its_equals(store, tmp_path, monkeypatch):
    """The comparison listed equal val_accs oldest first, while the sweep registers the lowest-numbered of them: where
    two workers claimed trials 0 and 1 together and trial 1's train run started first, the comparison's top row was
    trial 1, not the trial registered."""
    from pipeline import register

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    plan = sweep.Plan(write_spec(tmp_path, "sweep-ties", GRID))
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("mlflow_parent_run_id", client.create_run(experiment_id).info.run_id)
    trains = []
    for lr, start in ((0.1, 2_000), (0.000001, 1_000)):  # trial 1's train run started first
        train = client.create_run(experiment_id, start_time=start, tags={"step": "train"}).info.run_id
        client.log_param(train, "train.epochs", "2")  # a training run logs its params
        client.log_metric(train, "val_acc", 0.99, step=1)
        client.set_terminated(train, end_time=start + 5_000)
        trial = client.create_run(experiment_id, tags={"step": "trial", "train_run_id": train,
                                                       "model_uri": f"runs:/{train}/model"}).info.run_id
        client.set_terminated(trial)
        study.add_trial(optuna.trial.create_trial(value=0.99, params={"train.lr": lr}, distributions=plan.space,
                                                  user_attrs={"mlflow_run_id": trial}))
        trains.append(train)
    registered = []
    monkeypatch.setattr(register, "run", lambda cfg, model_uri: registered.append(model_uri) or
                        {"version": 1, "alias_moved": True})
    result = sweep.register_best(plan, study)
    assert int(result["best"]["trial"]) == 0 and registered == [f"runs:/{trains[0]}/model"]
    comparison = client.get_run(result["comparison_run_id"])
    assert comparison.data.tags["compared_runs"] == f"{trains[0]},{trains[1]}"


def finished_trials(client: MlflowClient, experiment_id: str, study: optuna.Study, plan, params: list[dict],
                    values: list[float]) -> None:
    """Finished trials of `params` and `values` in `study`, each with its trial and train runs."""
    for trial_params, value in zip(params, values, strict=True):
        train = client.create_run(experiment_id, tags={"step": "train"}).info.run_id
        client.log_param(train, "train.epochs", "2")  # a training run logs its params
        client.log_metric(train, "val_acc", value, step=1)
        client.set_terminated(train)
        trial = client.create_run(experiment_id, tags={"step": "trial", "train_run_id": train,
                                                       "model_uri": f"runs:/{train}/model"}).info.run_id
        client.set_terminated(trial)
        study.add_trial(optuna.trial.create_trial(value=value, params=trial_params, distributions=plan.space,
                                                  user_attrs={"mlflow_run_id": trial}))


def test_a_sweep_over_model_names_says_which_model_its_registered_version_is_of(store, tmp_path, monkeypatch):
    """Sweeping register.model_name registers the best under its own name: the sweep run's registered_version said a
    version number of no model it named."""
    from pipeline import register

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    plan = sweep.Plan(write_spec(tmp_path, "sweep-names", "grid:\n  register.model_name: [model-a, model-b]\n"))
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("mlflow_parent_run_id", client.create_run(experiment_id).info.run_id)
    finished_trials(client, experiment_id, study, plan, [{"register.model_name": "model-a"},
                                                         {"register.model_name": "model-b"}], [0.5, 0.9])
    monkeypatch.setattr(register, "run", lambda cfg, model_uri: {"model_name": cfg.register.model_name,
                                                                 "version": 3, "alias_moved": True})
    storage = study._storage
    sweep.finish(plan, study, storage)
    tags = client.get_run(study.user_attrs["mlflow_parent_run_id"]).data.tags
    assert (tags["registered_model"], tags["registered_version"]) == ("model-b", "3")
    lock = optuna.load_study(storage=storage, study_name=f"{study.study_name}.register")  # what a rerun says
    assert (lock.user_attrs["registered_model"], lock.user_attrs["registered_version"]) == ("model-b", 3)


def test_interrupted_trials_are_counted_apart_from_failed_ones(store, tmp_path):
    """Optuna holds a trial stopped by Ctrl-C FAIL: tag trials_fail and the "N failed" of the error line counted it
    as a trial that failed."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    plan = sweep.Plan(write_spec(tmp_path, "sweep-stopped", GRID))
    study = optuna.create_study(direction="maximize", study_name="stopped")
    study.set_user_attr("mlflow_parent_run_id", client.create_run(experiment_id).info.run_id)
    for lr, tags, status in ((0.1, {"interrupted_by": "SIGINT", "superseded_by_retry": "true"}, "KILLED"),
                             (0.000001, {"failure_reason": "diverged"}, "FAILED"),
                             (0.1, {"interrupted_by": "SIGTERM"}, "KILLED")):
        run = client.create_run(experiment_id, tags={"step": "trial", **tags}).info.run_id
        client.set_terminated(run, status)
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={"train.lr": lr},
                                                  distributions=plan.space, user_attrs={"mlflow_run_id": run}))
    reason = ("no trial of study stopped finished (2 interrupted, 1 failed); nothing registered: the trials table "
              "(trials.csv) says why: each trial's failure_reason (its run's tag), or pruned_at_epoch")
    assert sweep.nothing_finished(study) == reason
    sweep.register_best(plan, study)
    tags = client.get_run(study.user_attrs["mlflow_parent_run_id"]).data.tags
    assert (tags["trials_interrupted"], tags["trials_fail"], tags["failure_reason"]) == ("2", "1", reason)
    assert "(2 interrupted, 1 fail)" in tags["mlflow.note.content"]


def test_diverged_trials_are_counted_apart_from_failed_ones(store, tmp_path):
    """A trial that diverged was counted with those that failed ("2 failed", tag trials_fail): a sweep whose lr range
    reached too high read as one with broken trials. Counted apart: tag trials_diverged, "N diverged" in the note and
    in the line of a study none of whose trials finished."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    plan = sweep.Plan(write_spec(tmp_path, "sweep-mixed", GRID))
    study = optuna.create_study(direction="maximize", study_name="mixed")
    study.set_user_attr("mlflow_parent_run_id", client.create_run(experiment_id).info.run_id)
    for lr, reason in ((0.1, "TrainingDiverged: training diverged: loss became nan in epoch 1; ..."),
                       (0.000001, "DataError: data.source: unreadable")):
        run = client.create_run(experiment_id, tags={"step": "trial", "failure_reason": reason}).info.run_id
        client.set_terminated(run, "FAILED")
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={"train.lr": lr},
                                                  distributions=plan.space, user_attrs={"mlflow_run_id": run}))
    reason = ("no trial of study mixed finished (1 diverged, 1 failed); nothing registered: the trials table "
              "(trials.csv) says why: each trial's failure_reason (its run's tag), or pruned_at_epoch")
    assert sweep.nothing_finished(study) == reason
    assert sweep.no_trial_finished_error(study).status == 1
    sweep.register_best(plan, study)
    tags = client.get_run(study.user_attrs["mlflow_parent_run_id"]).data.tags
    assert (tags["trials_diverged"], tags["trials_fail"], tags["failure_reason"]) == ("1", "1", reason)
    assert "(1 diverged, 1 fail)" in tags["mlflow.note.content"]


def test_a_sweep_every_trial_of_which_diverged_says_so_and_exits_3(store):
    """A sweep whose every trial diverged (an lr range too high) ended as any whose trials failed: exit 1, the line
    pointing at trials.csv, the divergence and its hint (lower train.lr) one file away. It exits 3, as a train step
    that diverged does, and the line ends with the first trial's reason."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    study = optuna.create_study(direction="maximize", study_name="diverged")
    for lr in (1e12, 1e13):
        reason = (f"TrainingDiverged: training diverged: loss became nan in epoch 1; nothing was registered. Lower "
                  f"train.lr (now {lr:g}) or check the data")
        run = client.create_run(experiment_id, tags={"step": "trial", "failure_reason": reason}).info.run_id
        client.set_terminated(run, "FAILED")
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={"train.lr": lr},
                                                  distributions={"train.lr": optuna.distributions.FloatDistribution(
                                                      1e-6, 1e14)}, user_attrs={"mlflow_run_id": run}))
    error = sweep.no_trial_finished_error(study)
    assert error.status == 3
    assert str(error) == sweep.nothing_finished(study) == (
        "no trial of study diverged finished (2 diverged); nothing registered: every trial diverged, as trial 0: "
        "TrainingDiverged: training diverged: loss became nan in epoch 1; nothing was registered. Lower train.lr "
        "(now 1e+12) or check the data")


@pytest.mark.parametrize(("typed", "canonical"), [
    ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
    ("sqlite:///./runs/../mlflow.db?timeout=20", "sqlite:///{cwd}/mlflow.db?timeout=20"),
    ("http://Team-Host:5000/", "http://team-host:5000"),
    ("HTTPS://mlflow:s3cret@Team-Host:443/mlflow/", "https://mlflow:s3cret@team-host/mlflow"),
    ("POSTGRESQL://mlflow@Team-Host/mlflow", "postgresql://mlflow@Team-Host/mlflow"),
], ids=["sqlite-relative", "sqlite-dot-dot", "http-slash", "https-default-port", "postgresql-scheme"])
def test_one_tracking_store_spelled_two_ways_names_one_study_and_a_canonical_spelling_keeps_its_name(
        tmp_path, monkeypatch, typed, canonical):
    """The default study name digested the tracking URI as typed: the same store spelled two ways (a relative SQLite
    file and its absolute path, a trailing slash) named two studies, and a rerun started the sweep over."""
    canonical = canonical.format(cwd=Path.cwd())
    plan = sweep.Plan(write_spec(tmp_path, "sweep-named", GRID))

    def named(uri: str) -> str:
        monkeypatch.setattr(sweep, "tracking_uri", lambda: uri)
        return sweep.default_study(plan)

    def named_as_typed(uri: str) -> str:  # the name the spelling had before: its text digested as it is
        return f"sweep-named-{sweep.json_digest({**plan.fingerprint(), 'tracking': uri})[:8]}"

    assert named(typed) == named(canonical)
    assert named(canonical) == named_as_typed(canonical)  # a study named from the canonical spelling is found again
    assert named_as_typed(typed) != named_as_typed(canonical)  # what two studies came from


@pytest.mark.parametrize(("url", "hint"), [
    ("postgresql+psycopg2://mlflow:s3cr%40t@team-host:5432/optuna",
     "optuna-dashboard postgresql+psycopg2://mlflow@team-host:5432/optuna (with its password in PGPASSWORD or "
     "~/.pgpass)"),
    ("postgresql+psycopg2://mlflow@team-host/optuna", "optuna-dashboard postgresql+psycopg2://mlflow@team-host/optuna"),
    ("mysql+pymysql://user:s3cr%40t@db/optuna",
     "optuna-dashboard mysql+pymysql://user@db/optuna (with its password added to the URL)"),
    ("sqlite:////tmp/optuna.db", "optuna-dashboard sqlite:////tmp/optuna.db"),
], ids=["postgresql-password", "postgresql-pgpassword", "mysql-password", "sqlite"])
def test_the_dashboard_hint_leaves_the_password_out_and_says_where_it_goes(url, hint):
    """A masked `***` copied from the hint would not log in, and a log keeps no secret: the hint drops the password
    and says where it goes."""
    assert sweep.dashboard_hint(url) == hint


@pytest.mark.parametrize(("body", "rehearsed"), [
    ("sampler: random\npruner: median\ntrials: 20\n", 3 + 5),  # the median pruner's default startup: 5 trials
    ("sampler: {type: tpe, n_startup_trials: 4}\ntrials: 20\n", 3 + 4),
    ("sampler: tpe\ntrials: 6\n", 3 + 6),  # TPE's 10 startup trials, but no more than the sweep runs
])
def test_the_rehearsal_runs_past_the_samplers_and_pruners_startup_trials(tmp_path, monkeypatch, body, rehearsed):
    """Optuna uses some sampler and pruner arguments only after their startup trials: the spec check runs past
    them, or a bad one crashes the sweep trials later."""
    spec = write_spec(tmp_path, "sweep-startup", "space:\n  train.lr: {min: 0.01, max: 0.3}\n" + body)
    studies = []
    create = sweep.optuna.create_study
    monkeypatch.setattr(sweep.optuna, "create_study", lambda **kw: studies.append(create(**kw)) or studies[-1])
    sweep.Plan(spec)
    assert [len(s.trials) for s in studies if s._storage.__class__.__name__ == "InMemoryStorage"] == [rehearsed]


def test_sampler_and_pruner_numbers_in_exponent_form_reach_optuna_as_numbers(tmp_path):
    """YAML 1.1 reads `1e0` and `5e-1` (no dot) as text: TPE's `prior_weight: 5E-1` was refused with Optuna's
    TypeError, naming no number."""
    spec = write_spec(tmp_path, "sweep-exponent", "space:\n  train.lr: {min: 0.01, max: 0.3}\n"
                      "sampler: {type: tpe, prior_weight: 5E-1, n_startup_trials: 2}\ntrials: 4\n")
    assert sweep.Plan(spec).sampler_kwargs == {"prior_weight": 0.5, "n_startup_trials": 2}


SAME_TEXT = [("tracking.experiment", v) for v in ("True", "yes", "0x10", "2026.10", "2026-12-01", "010", "1e3")] + [
    ("train.epochs", "010"), ("train.ema", "On"), ("train.lr", "1e-1"), ("model.widths", "[16, 0032, 64]")]


@pytest.mark.parametrize("where", ["overrides", "grid"])
@pytest.mark.parametrize(("key", "text"), SAME_TEXT)
def test_a_specs_values_reach_the_params_as_a_params_files_do(tmp_path, where, key, text):
    """YAML 1.1 read a spec's values by their look: `tracking.experiment: True` ran as 'true', `yes` as 'true',
    `0x10` as '16', `2026.10` as '2026.1', and a date crashed the sweep with a traceback."""
    section, name = key.split(".")
    params = tmp_path / "params.yaml"
    params.write_text(f"{section}:\n  {name}: {text}\n")
    expected = config.load(params).flat()[key]
    body = f"  {key}: {text}\n" if where == "overrides" else f"  {key}: [{text}]\n"
    spec = tmp_path / "sweep-text.yaml"
    spec.write_text("overrides:\n  train.validation_fraction: 0.1\n" + (body + "grid:\n  train.momentum: [0.9]\n"
                                                                         if where == "overrides" else "grid:\n" + body))
    assert [c.flat()[key] for c in sweep.Plan(str(spec)).configs] == [expected]


def test_a_range_draws_its_keys_type(tmp_path):
    """A number key's range with integer ends drew integers only (`train.lr: {min: 1, max: 3}`: 1, 2 or 3)."""
    spec = write_spec(tmp_path, "sweep-range", "space:\n  train.momentum: {min: 0, max: 0.9}\n"
                      "  train.lr: {min: 1, max: 3}\nsampler: random\ntrials: 6\nseed: 0\n")
    assert isinstance(sweep.Plan(spec).space["train.lr"], optuna.distributions.FloatDistribution)
    lrs = [d["train.lr"] for d in draw_all(spec)]
    assert len(set(lrs)) == 6 and not all(lr.is_integer() for lr in lrs)


def test_range_ends_in_scientific_notation_are_numbers(tmp_path):
    spec = write_spec(tmp_path, "sweep-sci", "space:\n  train.lr: {min: 1e-3, max: 1e-1, log: true}\n"
                      "  train.batch_size: {min: 16, max: 32}\ntrials: 2\n", {"train.batch_size": None})
    plan = sweep.Plan(spec)
    lr, batch = plan.space["train.lr"], plan.space["train.batch_size"]
    assert isinstance(lr, optuna.distributions.FloatDistribution) and (lr.low, lr.high, lr.log) == (0.001, 0.1, True)
    assert isinstance(batch, optuna.distributions.IntDistribution) and (batch.low, batch.high) == (16, 32)
    assert sorted({c.train.lr for c in plan.configs}) == [0.001, 0.1]  # both ends checked as numbers


def test_a_range_with_a_step_draws_on_its_steps_only(tmp_path):
    """A range took no step (`train.lr: {min: 0.1, max: 0.5, step: 0.1}`, epochs in steps of 2): refused as an unknown
    form. It is Optuna's step: drawn by suggest_float / suggest_int with it, counted as that many values (trials
    beyond them run some twice: refused), and checked at its steps."""
    body = ("space:\n  train.lr: {min: 0.1, max: 0.5, step: 0.1}\n  train.epochs: {min: 1, max: 5, step: 2}\n"
            "sampler: random\nseed: 0\ntrials: 15\n")
    spec = write_spec(tmp_path, "sweep-step", body, {"train.epochs": None})
    plan = sweep.Plan(spec)
    lr, epochs = plan.space["train.lr"], plan.space["train.epochs"]
    assert isinstance(lr, optuna.distributions.FloatDistribution) and (lr.low, lr.high, lr.step) == (0.1, 0.5, 0.1)
    assert isinstance(epochs, optuna.distributions.IntDistribution) and epochs.step == 2
    assert plan.combinations == 5 * 3
    drawn = draw_all(spec)
    assert sorted((d["train.lr"], d["train.epochs"]) for d in drawn) == [  # each once; 0.3, not 0.30000000000000004
        (lr, e) for lr in (0.1, 0.2, 0.3, 0.4, 0.5) for e in (1, 3, 5)]
    with pytest.raises(config.ConfigError, match=r"spec.trials: 16 trials over the 15 combinations"):
        sweep.Plan(write_spec(tmp_path, "sweep-step-over", body.replace("trials: 15", "trials: 16"),
                              {"train.epochs": None}))
    checked = []
    plan.check_inside(plan.checked, lambda cfg: checked.append((cfg.train.lr, cfg.train.epochs)))
    assert {e for _, e in checked} == {1, 3, 5} and {lr for lr, _ in checked} == {0.1, 0.2, 0.3, 0.4, 0.5}


def test_a_grids_range_with_a_step_is_every_step_of_it(tmp_path):
    """A grid took lists only: `train.lr: {min: 0.1, max: 0.3, step: 0.1}` was refused. It runs each step, listed as a
    space's range with that step draws them (0.3, not 0.30000000000000004); a range without a step is refused, as a
    grid runs only what it lists."""
    plan = sweep.Plan(write_spec(tmp_path, "sweep-grid-step", "grid:\n  train.lr: {min: 0.1, max: 0.3, step: 0.1}\n"
                                 "  train.epochs: {min: 1, max: 3, step: 2}\n", {"train.epochs": None}))
    assert [(g["train.lr"], g["train.epochs"]) for g in plan.grid] == [
        (0.1, 1), (0.1, 3), (0.2, 1), (0.2, 3), (0.3, 1), (0.3, 3)]
    assert [(c.train.lr, c.train.epochs) for c in plan.configs] == [(g["train.lr"], g["train.epochs"])
                                                                     for g in plan.grid]
    for body, message in [
        ("grid:\n  train.lr: {min: 0.1, max: 0.3}\n", "spec.grid.train.lr: a grid runs each value it lists: give a "
         "list, or {min, max, step}, got {'min': 0.1, 'max': 0.3}"),
        ("grid:\n  train.lr: {min: 0.1, max: 0.3, step: 0.15}\n", "spec.grid.train.lr: step 0.15 does not fit the "
         "range from 0.1 to 0.3 (its last step is 0.25); give a max that is min plus a whole number of steps"),
        ("grid:\n  train.lr: {min: 0.1, max: 0.3, step: 0.00001}\n", "spec.grid.train.lr: its 20001 steps are more "
         "than the 10000 trials a sweep runs; give a larger step")]:
        with pytest.raises(config.ConfigError) as raised:
            sweep.Plan(write_spec(tmp_path, "sweep-grid-bad", body))
        assert str(raised.value) == message


@pytest.mark.parametrize(("domain", "message"), [
    ("train.lr: {min: 0.1, max: 0.5, step: 0}", "spec.space.train.lr: step must be > 0, got 0.0"),
    ("train.epochs: {min: 1, max: 9, step: -2}", "spec.space.train.epochs: step must be > 0, got -2"),
    ("train.lr: {min: 0.1, max: 0.5, step: 0.3}", "spec.space.train.lr: step 0.3 does not fit the range from 0.1 to "
     "0.5 (its last step is 0.4); give a max that is min plus a whole number of steps"),
    ("train.epochs: {min: 2, max: 10, step: 3}", "spec.space.train.epochs: step 3 does not fit the range from 2 to 10 "
     "(its last step is 8); give a max that is min plus a whole number of steps"),
    ("train.lr: {min: 0.01, max: 0.1, step: 0.01, log: true}", "spec.space.train.lr: step and log: true do not go "
     "together (Optuna draws a stepped range on a linear scale only); drop one"),
    ("train.epochs: {min: 1, max: 9, step: 2, log: true}", "spec.space.train.epochs: step and log: true do not go "
     "together (Optuna draws a stepped range on a linear scale only); drop one"),
    ("train.epochs: {min: 1, max: 9, step: 0.5}", "spec.space.train.epochs: step must be an integer, got '0.5'"),
    ("train.lr: {min: 0.1, max: 0.5, step: true}", "spec.space.train.lr: step must be a number, got 'true'"),
    ("train.lr: {min: 0.1, max: 0.5, stride: 0.1}", "spec.space.train.lr: must be a non-empty list or {min, max, log} "
     "or {min, max, step}, got {'min': 0.1, 'max': 0.5, 'stride': 0.1}"),
], ids=["zero", "negative", "float-not-fitting", "int-not-fitting", "float-log", "int-log", "int-key-float-step",
        "bool", "unknown-range-key"])
def test_a_bad_step_is_one_line_naming_the_key_before_any_run(store, tmp_path, in_process, domain, message):
    spec = write_spec(tmp_path, "sweep-bad-step", f"space:\n  {domain}\ntrials: 2\n", {"train.epochs": None})
    done = in_process("sweep", "--spec", spec)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: {message}"], done.stderr[-2000:]
    assert not (tmp_path / "optuna.db").exists()  # before the storage, and so before any run
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


def draw_all(spec: str) -> list[dict]:
    """Claim and finish every queued trial of a fresh in-memory study, as a worker does; their values."""
    plan = sweep.Plan(spec)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction="maximize", sampler=plan.make_sampler(0))
    sweep.lead(plan, study, "parent-run-id", "0")
    values = []
    while (claimed := sweep.claim(study, storage, plan)) is not None:
        values.append(plan.values(claimed[0]))
        study.tell(claimed[0], 0.5)
    return values


@pytest.mark.parametrize("sampler", ["{type: random, seed: 0}", "{type: tpe, seed: 7}", "random\nseed: 4294967295"])
def test_a_seeded_sampler_draws_apart_per_trial_and_repeats(tmp_path, sampler):
    spec = write_spec(tmp_path, "sweep-seeded", f"space:\n  train.lr: {{min: 0.01, max: 0.3}}\ntrials: 4\n"
                      f"sampler: {sampler}\n")
    first = draw_all(spec)
    assert len({d["train.lr"] for d in first}) == 4  # every trial its own draw (its seed + its number)
    assert draw_all(spec) == first


@pytest.mark.parametrize("sampler", ["random\nseed: 0", "tpe\nseed: 0", "{type: tpe, multivariate: true, seed: 1}",
                                     "random"])
def test_a_space_of_choices_and_integers_runs_no_combination_twice(tmp_path, sampler):
    """Trials as many as its combinations (or fewer) were drawn with repeats: 2 x 2 choices in 4 trials ran
    (0.1, 2) twice and (0.05, 2) never, though a spec over more trials than its combinations is refused as running
    some twice."""
    spec = write_spec(tmp_path, "sweep-countable", "space:\n  train.lr: [0.05, 0.1]\n"
                      f"  train.epochs: {{min: 1, max: 2}}\ntrials: 4\nsampler: {sampler}\n", {"train.epochs": None})
    first = draw_all(spec)
    assert sorted((d["train.lr"], d["train.epochs"]) for d in first) == [(0.05, 1), (0.05, 2), (0.1, 1), (0.1, 2)]
    if "seed" in sampler:
        assert draw_all(spec) == first  # seeded: the same draws again


def test_workers_drawing_at_the_same_moment_run_no_combination_twice(tmp_path):
    """Two workers (each its own storage connection, as two processes) claimed trials 0 and 1 and drew at the same
    moment: each read the other's trial before it had fixed its draw, so both ran the combination their seeds drew
    alike (seed 0's trials 0 and 1 both draw 0.1 first) and the other was never run. Each draw is now claimed in
    the storage; the worker whose claim comes second draws again."""
    import threading

    spec = write_spec(tmp_path, "sweep-race", "space:\n  train.lr: [0.05, 0.1]\ntrials: 2\nsampler: random\nseed: 0\n")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    plan = sweep.Plan(spec)
    study = optuna.create_study(storage=sweep.open_storage(url), study_name="race", direction="maximize")
    sweep.lead(plan, study, "parent-run-id", "0")
    together = threading.Barrier(2, timeout=30)
    drawn, errors = {}, []

    def worker(name: str) -> None:
        storage = sweep.open_storage(url)
        fix = storage.set_trial_system_attr
        waited = []

        def set_trial_system_attr(trial_id, key, value):
            if key == "fixed_params" and not waited:  # both have read the study before either fixes its first draw
                waited.append(together.wait())
            fix(trial_id, key, value)

        storage.set_trial_system_attr = set_trial_system_attr
        try:
            own = optuna.load_study(study_name="race", storage=storage)
            trial, _ = sweep.claim(own, storage, plan)
            drawn[name] = plan.values(trial)["train.lr"]
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(drawn.values()) == [0.05, 0.1]
    held = optuna.load_study(study_name="race", storage=url).trials
    assert sorted(t.system_attrs["fixed_params"]["train.lr"] for t in held) == [0.05, 0.1]  # as the study holds them


def test_two_workers_whose_moves_to_running_both_pass_take_two_trials(tmp_path, monkeypatch):
    """Optuna moves a trial from WAITING to RUNNING by reading its state, then writing it: on SQLite, which ignores
    the read's FOR UPDATE, two workers at once both saw trial 0 WAITING and both took it (each ran it; trial 1
    waited unrun), as a loaded CI machine showed. Here the second worker's move passes as that race let it: it still
    takes trial 1, the first worker's claim of trial 0 held in the study."""
    spec = write_spec(tmp_path, "sweep-claims",
                      "space:\n  train.lr: [0.05, 0.1]\ntrials: 2\nsampler: random\nseed: 0\n")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    plan = sweep.Plan(spec)
    study = optuna.create_study(storage=sweep.open_storage(url), study_name="claims", direction="maximize")
    sweep.lead(plan, study, "parent-run-id", "0")
    first, second = sweep.open_storage(url), sweep.open_storage(url)
    late = optuna.load_study(study_name="claims", storage=second)
    seen = late.get_trials(deepcopy=False)  # both WAITING, as the second worker read them
    taken = sweep.claim(optuna.load_study(study_name="claims", storage=first), first, plan)[0].number
    monkeypatch.setattr(late, "get_trials", lambda deepcopy=True, states=None: [
        t for t in seen if states is None or t.state in states])
    monkeypatch.setattr(second, "set_trial_state_values", lambda trial_id, state, values=None: True)  # the lost race
    other = sweep.claim(late, second, plan)[0].number
    assert (taken, other) == (0, 1)
    assert sweep.claim(optuna.load_study(study_name="claims", storage=first), first, plan) is None  # none left


def test_a_worker_reads_the_waiting_trials_once_not_once_per_trial_it_claims(tmp_path, monkeypatch):
    """Each claim read every waiting trial of the study (1.4 s per claim in a grid of 10,000, the whole study while it
    waits). A worker now takes the waiting trials it read in turn, lowest number first as before (a trial queued again
    is a new, higher one), and reads them again only once they are used up, or taken by other workers."""
    spec = write_spec(tmp_path, "sweep-reads", "grid:\n  train.lr: [0.01, 0.02, 0.03, 0.04, 0.05]\n")
    plan = sweep.Plan(spec)
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name="reads", direction="maximize")
    sweep.lead(plan, study, "parent-run-id", "0")
    reads, get_trials = [], study.get_trials
    monkeypatch.setattr(study, "get_trials", lambda deepcopy=True, states=None: (
        reads.append(states) if states == (optuna.trial.TrialState.WAITING,) else None) or get_trials(deepcopy, states))
    ran = []

    def run_trial(plan, study, trial, parent_id, experiment_id):
        ran.append(trial.number)
        if trial.number == 1:  # another worker takes trial 2 meanwhile: this one goes on with 3
            own = sweep.open_storage(storage.url)
            other = optuna.load_study(study_name="reads", storage=own)
            assert sweep.claim(other, own, plan)[0].number == 2
            other.tell(2, 0.5)
        study.tell(trial, 0.5)

    monkeypatch.setattr(sweep, "run_trial", run_trial)
    monkeypatch.setattr(sweep, "finish", lambda plan, study, storage: None)
    sweep.work(plan, study, storage)
    assert ran == [0, 1, 3, 4]
    assert len(reads) == 2, reads  # the first claim's, and the one finding none left


def test_a_claim_is_a_study_system_attr_the_storage_inserts_once_through_optunas_private_models(tmp_path):
    """A claim inserts a row of the study's system attrs that the database lets one insert only: no public Optuna call
    does (`set_study_system_attr` overwrites), so `insert_study_system_attr` writes through Optuna's private
    `optuna.storages._rdb.models`, and it alone. This fails where an Optuna release moves or renames that model, or
    drops the unique (study, key) a claim relies on."""
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    ids = [storage.get_study_id_from_name(optuna.create_study(storage=storage, study_name=n).study_name)
           for n in ("a", "b")]
    assert sweep.insert_study_system_attr(storage, ids[0], "sweep:claimed:x", 3) is True
    assert sweep.insert_study_system_attr(storage, ids[0], "sweep:claimed:x", 4) is False  # the first stays
    assert sweep.insert_study_system_attr(storage, ids[1], "sweep:claimed:x", 5) is True  # another study's own
    assert [storage.get_study_system_attrs(i)["sweep:claimed:x"] for i in ids] == [3, 5]  # read by the public API
    source = Path(sweep.__file__).read_text()
    assert source.count("from optuna.storages._rdb import") == 2  # its two uses: this, and `insert_waiting_trials`
    for writer in (sweep.insert_study_system_attr, sweep.insert_waiting_trials):
        assert "from optuna.storages._rdb import" in inspect.getsource(writer)


def test_trials_queued_at_once_are_the_trials_optunas_enqueue_trial_makes(tmp_path, monkeypatch):
    """`queue_trials` writes a study's queued trials a chunk to a transaction through Optuna's private models (one
    `enqueue_trial` per trial was a transaction each: a grid of 10,000 queued for a minute in silence). The trials it
    makes are the ones enqueue_trial makes, as the public API reads them back, numbered on from the study's own, and a
    worker claims and draws them as ever; this fails where an Optuna release changes what an enqueued trial is."""
    import sqlalchemy

    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    fixed = [{}, {"train.lr": 0.1}, {"train.lr": 0.05, "model.widths": "[16, 32]"}] * 9  # 27 trials
    studies = {name: optuna.create_study(storage=storage, study_name=name) for name in ("optunas", "ours")}
    for study in studies.values():
        study.enqueue_trial({"train.lr": 0.2})  # a trial before them: numbers go on from it
    for params in fixed:
        studies["optunas"].enqueue_trial(params)
    commits = []
    sqlalchemy.event.listen(storage.engine, "commit", lambda connection: commits.append(1))
    monkeypatch.setattr(sweep, "QUEUE_CHUNK", 10)
    sweep.queue_trials(studies["ours"], fixed)
    assert len(commits) <= 4  # a transaction per chunk (10 + 10 + 7) and the study's id read, not one per trial

    def read(name: str) -> list[tuple]:
        return [(t.number, t.state, t.params, t.distributions, t.user_attrs, t.system_attrs, t.datetime_start,
                 t.values, t.intermediate_values) for t in optuna.load_study(study_name=name, storage=storage).trials]

    assert read("ours") == read("optunas")
    assert [t.system_attrs["fixed_params"] for t in studies["ours"].trials[1:]] == fixed  # read through the cache too
    asked = [studies["ours"].ask() for _ in range(3)]  # Optuna takes the waiting trials in turn, with their params
    assert [t.number for t in asked] == [0, 1, 2]
    assert [asked[n].suggest_float("train.lr", 0.01, 1.0) for n in (0, 2)] == [0.2, 0.1]


def test_queueing_trials_says_how_far_it_is_and_how_long_it_took(tmp_path, monkeypatch, capsys):
    """A grid of 10,000 said nothing while it queued its trials (a minute, before they were queued at once): a line
    every QUEUE_SAY_S while it queues, and one when done."""
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    sweep.queue_trials(optuna.create_study(storage=storage, study_name="few"), [{}] * 25)
    assert re.fullmatch(r"queued 25 trials in \d+\.\d s\n", capsys.readouterr().out)  # quick: the last line only
    monkeypatch.setattr(sweep, "QUEUE_CHUNK", 10)
    monkeypatch.setattr(sweep, "QUEUE_SAY_S", 0)
    sweep.queue_trials(optuna.create_study(storage=storage, study_name="slow"), [{}] * 25)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["queued 10 of 25 trials", "queued 20 of 25 trials"], lines
    assert re.fullmatch(r"queued 25 trials in \d+\.\d s", lines[2]) and len(lines) == 3, lines
    sweep.queue_trials(optuna.create_study(study_name="one"), [{}])  # an in-memory storage: Optuna's enqueue_trial
    assert capsys.readouterr().out.startswith("queued 1 trial in ")


def one_trial(tmp_path, name: str):
    """A one-trial grid sweep led in store "e2e", its trial claimed: (plan, study, trial, parent run id, experiment)."""
    plan = sweep.Plan(write_spec(tmp_path, name, "grid:\n  train.lr: [0.1]\n"))
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    parent = client.create_run(experiment_id).info.run_id
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction="maximize", sampler=plan.make_sampler(0))
    sweep.lead(plan, study, parent, experiment_id)
    trial, _ = sweep.claim(study, storage, plan)
    return plan, study, trial, parent, experiment_id


@pytest.mark.parametrize("during", ["training", "entering its run", "creating its run"])
def test_an_interrupted_trial_ends_killed_with_interrupted_by(store, tmp_path, monkeypatch, during):
    """Wherever the signal lands after the trial's run is created: entering it (left RUNNING, it was), or training.
    Or while MLflow creates it (SIGTERM's handler ran once the run was written, before its id came back): it was left
    RUNNING for good; now the signal waits until the run is created."""
    import mlflow


    plan, study, trial, parent, experiment_id = one_trial(tmp_path, "sweep-interrupted")
    client = MlflowClient()

    def interrupted(*args):
        raise Interrupted(signal.SIGTERM)

    create_run = MlflowClient.create_run

    def created(self, *args, **kwargs):
        run = create_run(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, as the run is written
        return run

    if during == "training":
        monkeypatch.setattr(sweep, "train_and_evaluate", interrupted)
    elif during == "entering its run":
        monkeypatch.setattr(sweep.trials, "enter_run", interrupted)
    else:
        monkeypatch.setattr(MlflowClient, "create_run", created)
    with stopping_signals_raise(), pytest.raises(Interrupted):
        sweep.run_trial(plan, study, trial, parent, experiment_id)
    assert mlflow.active_run() is None
    (run,) = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert run.info.status == "KILLED" and run.data.tags["interrupted_by"] == "SIGTERM"
    assert "failure_reason" not in run.data.tags
    assert "interrupted_by" not in client.get_run(parent).data.tags  # the trial's run tagged, not the sweep's
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING  # stale once its heartbeat stops: queued again


def test_a_signal_while_mlflow_ends_a_finished_trials_run_ends_it_as_told(store, tmp_path, monkeypatch):
    """SIGTERM (Ctrl-C) arriving while MLflow ended the run of a trial Optuna was told COMPLETE (`end_run`: the run
    off its stack, its status not yet written): the run stayed RUNNING for good. It ends FINISHED, as the study holds
    the trial; the signal then goes on."""

    plan, study, trial, parent, experiment_id = one_trial(tmp_path, "sweep-ended")
    client = MlflowClient()
    monkeypatch.setattr(sweep, "train_and_evaluate", trains([0.5]))
    signalled = sigterm_while_ending(monkeypatch, lambda client, run_id, status:
                                     client.get_run(run_id).data.tags.get("step") == "trial")
    with stopping_signals_raise(), pytest.raises(Interrupted):
        sweep.run_trial(plan, study, trial, parent, experiment_id)
    assert signalled and study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert client.get_run(signalled[0]).info.status == "FINISHED"


@pytest.mark.parametrize("during", ["reopening it", "registering"])
def test_a_signal_in_a_sweep_run_another_worker_reopened_ends_it_killed(store, monkeypatch, during):
    """The worker that finishes a study reopens the sweep run its leader opened (and ended, the leader gone) to
    register the best trial. SIGTERM (Ctrl-C) while it registered ended the sweep run FAILED with no reason, as if the
    sweep had failed; while MLflow reopened it (RUNNING written, not yet the active run), it stayed RUNNING for good.
    It ends KILLED, tagged `interrupted_by`, as the leader's own would."""
    import mlflow

    from pipeline import interrupts
    from pipeline.tracking import trials

    client = MlflowClient()
    sweep_run = client.create_run(client.get_experiment_by_name("e2e").experiment_id).info.run_id
    client.set_terminated(sweep_run, "FINISHED")  # its leader's command ended
    get_run, reads = MlflowClient.get_run, []

    def read(self, run_id):
        reads.append(run_id)
        if during == "reopening it" and len(reads) == 2:  # MLflow's read after it wrote RUNNING
            os.kill(os.getpid(), signal.SIGTERM)
        return get_run(self, run_id)

    monkeypatch.setattr(MlflowClient, "get_run", read)
    with stopping_signals_raise():
        with pytest.raises(Interrupted), trials.parent_run(sweep_run):
            os.kill(os.getpid(), signal.SIGTERM)
        interrupts.take()  # handled: as the command's `cli` clears it
    ended = client.get_run(sweep_run)
    assert mlflow.active_run() is None
    assert (ended.info.status, ended.data.tags.get("interrupted_by")) == ("KILLED", "SIGTERM")


def test_a_trial_that_fails_unexpectedly_prints_its_traceback_and_says_why_in_its_reason(store, tmp_path,
                                                                                          monkeypatch, capsys):
    """A trial ending on an unexpected exception (a bug, a full disk) printed one line, its reason the whole message
    flattened (a TensorFlow error's file list, cut before the error itself), and no traceback: the sweep goes on,
    its traceback is printed and its reason is the step's (`tracking.unexpected_reason`)."""
    plan, study, trial, parent, experiment_id = one_trial(tmp_path, "sweep-bug")
    client = MlflowClient()

    def bug(cfg, trial):
        raise RuntimeError("Graph execution error:\n\nDetected at node x defined at (most recent call last):\n  File "
                           "\"a.py\", line 1\n\nindices[3] = 12 is not in [0, 10)\n\t [[{{node x}}]] [Op:f]")

    monkeypatch.setattr(sweep, "train_and_evaluate", bug)
    capsys.readouterr()
    sweep.run_trial(plan, study, trial, parent, experiment_id)
    reason = ("unexpected RuntimeError: indices[3] = 12 is not in [0, 10); full traceback on the step's stderr (the "
              "console it ran in; `mlflow run` keeps no copy)")
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and ", in bug" in err
    assert err.strip().splitlines()[-1] == f"trial 0 failed: {reason}"
    run = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == reason
    assert study.trials[0].state == optuna.trial.TrialState.FAIL


def test_an_interrupted_trial_is_queued_again_at_once_however_often(store, tmp_path, monkeypatch):
    """A Ctrl-C'd trial stayed RUNNING: the rerun idled 120 s until its heartbeat went stale, and each Ctrl-C used
    one of the MAX_RETRY retries meant for dying workers, so the third one lost the trial from the sweep."""
    spec = write_spec(tmp_path, "sweep-ctrl-c", "space:\n  train.lr: {min: 0.01, max: 0.3}\ntrials: 1\n"
                      "sampler: random\nseed: 0\n")
    plan = sweep.Plan(spec)
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name="ctrl-c", direction="maximize")
    sweep.lead(plan, study, client.create_run(experiment_id).info.run_id, experiment_id)

    def interrupted(cfg, trial):
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(sweep, "train_and_evaluate", interrupted)
    for _ in range(sweep.MAX_RETRY + 1):
        with pytest.raises(Interrupted):
            sweep.work(plan, study, storage)
        assert study.trials[-1].state.name == "WAITING"  # not left RUNNING, for a rerun to wait out
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL"] * (sweep.MAX_RETRY + 1) + ["WAITING"]
    assert len({t.params["train.lr"] for t in study.trials}) == 1  # the same draw, to run afresh
    assert all(client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "KILLED" for t in study.trials[:-1])

    monkeypatch.setattr(sweep, "train_and_evaluate", lambda cfg, trial: 0.5)
    monkeypatch.setattr(sweep, "finish", lambda *args: None)
    sweep.work(plan, study, storage)  # at once: no trial left RUNNING to wait out
    assert [t.state.name for t in study.trials][-1] == "COMPLETE"
    # the sweep's trials.csv and note: each stop said, where its row read FAIL with no reason, as a trial that failed
    table = sweep.trial_table(study)
    assert table["failure_reason"].tolist() == ["interrupted by SIGINT; queued again"] * (sweep.MAX_RETRY + 1) + [""]


@pytest.mark.parametrize("stopped", ["by Ctrl-C", "killed"])
def test_a_worker_stopped_while_drawing_its_trials_params_leaves_it_to_run_again(tmp_path, monkeypatch, stopped):
    """A worker stopped between claiming a trial and its first heartbeat (drawing its params: TPE over a long study
    takes a while) left it RUNNING with no heartbeat, which Optuna never takes for stale: every worker and rerun
    waited for it for good ("waiting for trial(s) 0"), the study never done. A Ctrl-C now queues it again at once;
    a worker killed has left a heartbeat, stale after GRACE_S, so its trial is queued again as any dead worker's."""
    monkeypatch.setattr(sweep, "GRACE_S", 1)  # read by open_storage
    spec = write_spec(tmp_path, "sweep-drawing", "space:\n  train.lr: [0.05, 0.1]\ntrials: 1\nsampler: random\n")
    plan = sweep.Plan(spec)
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name="drawing", direction="maximize")
    sweep.lead(plan, study, "parent-run-id", "0")

    class Killed(BaseException):  # the process gone: nothing more of it runs
        pass

    def stop(*args):
        raise Interrupted(signal.SIGINT) if stopped == "by Ctrl-C" else Killed()

    monkeypatch.setattr(plan, "draw_unrun", stop)
    with pytest.raises(Interrupted if stopped == "by Ctrl-C" else Killed):
        sweep.claim(study, storage, plan)
    if stopped == "killed":
        time.sleep(2.5)  # past the grace period, whole seconds in the storage
        optuna.storages.fail_stale_trials(study)  # as every worker does before it claims
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]


def retried_sweep(tmp_path, monkeypatch, name: str):
    """A one-trial sweep led in store "e2e" on an SQLite storage whose heartbeats go stale after 1 s, its register
    stubbed: (plan, study, storage, parent run id, the model URIs registered)."""
    from pipeline import register

    monkeypatch.setattr(sweep, "GRACE_S", 1)  # read by open_storage
    plan = sweep.Plan(write_spec(tmp_path, name, "grid:\n  train.lr: [0.1]\n"))
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    parent = client.create_run(experiment_id).info.run_id
    sweep.lead(plan, study, parent, experiment_id)
    registered = []
    monkeypatch.setattr(register, "run", lambda cfg, model_uri: registered.append(model_uri) or
                        {"version": 1, "alias_moved": True})
    return plan, study, storage, parent, registered


def trains(values: list[float], during=lambda trial: None):
    """A `train_and_evaluate` whose n-th call logs a finished train run (tag step = 'train') of val_acc values[n] under
    the trial's run, calling `during(trial)` while that run is open, and returns the value."""
    import mlflow

    calls = iter(values)

    def train_and_evaluate(cfg, trial):
        value = next(calls)
        experiment_id = mlflow.active_run().info.experiment_id
        with mlflow.start_run(experiment_id=experiment_id, nested=True, tags={"step": "train"}) as train:
            mlflow.log_param("train.epochs", "2")  # a training run logs its params
            mlflow.log_metric("val_acc", value, step=1)
            during(trial)
        mlflow.set_tags({"train_run_id": train.info.run_id, "model_uri": f"runs:/{train.info.run_id}/model"})
        return value

    return train_and_evaluate


def trial_runs_of(client: MlflowClient, parent: str) -> list:
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    return client.search_runs([experiment_id], f"tags.step = 'trial' and tags.mlflow.parentRunId = '{parent}'")


def test_a_trial_whose_tell_fails_ends_failed_and_only_its_retry_finishes(store, tmp_path, monkeypatch):
    """The trial's run ended FINISHED before Optuna was told: a tell the storage failed left the run FINISHED and the
    trial RUNNING, queued again once stale, so the sweep ended with two FINISHED runs for the one trial."""
    import sqlite3

    import sqlalchemy

    plan, study, storage, parent, registered = retried_sweep(tmp_path, monkeypatch, "sweep-tell-fails")
    client = MlflowClient()

    def storage_fails(self, *args, **kwargs):  # as RDBStorage raises a failed commit
        try:
            raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, sqlite3.OperationalError("database is locked"))
        except sqlalchemy.exc.OperationalError as exc:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc

    tell = optuna.Study.tell
    monkeypatch.setattr(optuna.Study, "tell", storage_fails)
    monkeypatch.setattr(sweep, "train_and_evaluate", trains([0.9, 0.5]))
    with pytest.raises(optuna.exceptions.StorageInternalError):  # the worker stops: `storage_failures`' one line
        sweep.work(plan, study, storage)
    assert [t.state.name for t in study.trials] == ["RUNNING"]
    first = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert first.info.status == "FAILED"
    assert first.data.tags["failure_reason"] == "the Optuna storage failed: database is locked"

    monkeypatch.setattr(optuna.Study, "tell", tell)
    time.sleep(2.5)  # its heartbeat stale, whole seconds in the storage: the rerun queues it again and runs it
    sweep.work(plan, study, storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].system_attrs["retry_history"] == [0]
    retry = client.get_run(study.trials[1].user_attrs["mlflow_run_id"])
    runs = trial_runs_of(client, parent)
    assert [r.info.run_id for r in runs if r.info.status == "FINISHED"] == [retry.info.run_id]
    first = client.get_run(first.info.run_id)
    assert first.info.status == "FAILED" and first.data.tags["superseded_by_retry"] == "true"
    assert first.data.tags["failure_reason"] == "the Optuna storage failed: database is locked"  # kept
    first_train = first.data.tags["train_run_id"]
    assert client.get_run(first_train).data.tags["superseded_by_retry"] == "true"
    assert "superseded_by_retry" not in retry.data.tags
    # registered and compared: the retry alone, though the first try's val_acc was higher
    assert registered == [retry.data.tags["model_uri"]]
    assert client.get_run(parent).data.tags["best_trial"] == "1"
    # the comparison of an experiment's runs lists the retry's train run only; one named is compared as asked
    assert steps.search_train_runs("e2e", [])["run_id"].tolist() == [retry.data.tags["train_run_id"]]
    assert steps.search_train_runs("e2e", [first_train])["run_id"].tolist() == [first_train]


def connection_lost() -> optuna.exceptions.StorageInternalError:
    """What RDBStorage raises where the database's connection dropped after a commit, before its answer."""
    import sqlalchemy

    try:
        raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, Exception("server closed the connection"))
    except sqlalchemy.exc.OperationalError as exc:
        try:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc
        except optuna.exceptions.StorageInternalError as wrapped:
            return wrapped


def test_a_trial_whose_tell_committed_and_then_raised_ends_finished_as_the_study_holds_it(store, tmp_path,
                                                                                         monkeypatch, capsys):
    """A tell that committed and then raised in the worker (the connection lost before the commit's answer) ended the
    run FAILED ("the Optuna storage failed: ...") while the study held the trial COMPLETE: the worker stopped, and the
    sweep registered a trial whose run had failed. The storage, read again, holds it as told: the run ends FINISHED."""
    plan, study, storage, parent, registered = retried_sweep(tmp_path, monkeypatch, "sweep-tell-answer-lost")
    client = MlflowClient()
    tell = optuna.Study.tell
    told = []

    def committed_then_lost(self, *args, **kwargs):
        told.append(tell(self, *args, **kwargs))
        raise connection_lost()

    monkeypatch.setattr(optuna.Study, "tell", committed_then_lost)
    monkeypatch.setattr(sweep, "train_and_evaluate", trains([0.9]))
    capsys.readouterr()
    sweep.work(plan, study, storage)  # no StorageInternalError: the worker goes on, and registers
    assert len(told) == 1  # the tell did raise, once its commit had landed
    assert [(t.state.name, t.value) for t in study.trials] == [("COMPLETE", 0.9)]
    run = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags  # the run agrees with the study
    assert ("warning: trial 0: telling Optuna raised (the Optuna storage failed: server closed the connection), but "
            "the storage holds the trial COMPLETE as told: its run ends as told") in capsys.readouterr().err
    assert [r.info.run_id for r in trial_runs_of(client, parent) if r.info.status == "FINISHED"] == [run.info.run_id]
    assert registered == [run.data.tags["model_uri"]]
    assert client.get_run(parent).data.tags["best_trial"] == "0"


@pytest.mark.parametrize("last_read", ["answers", "fails"])
def test_a_tell_that_raised_is_read_again_a_few_times_before_its_run_fails(store, tmp_path, monkeypatch, last_read):
    """The storage, still failing after the tell raised, is read again TELL_READS times: where every read fails, the
    tell is taken as failed (the run FAILED, raised on), whatever it had committed."""
    plan, study, trial, parent, experiment_id = one_trial(tmp_path, "sweep-tell-reread")
    unreadable = sweep.TELL_READS - (last_read == "answers")  # reads that fail
    client = MlflowClient()
    monkeypatch.setattr(sweep, "TELL_BACKOFF_S", 0.01)
    tell, get_trial, reads = optuna.Study.tell, study._storage.get_trial, []

    def still_failing(trial_id):
        reads.append(trial_id)
        if len(reads) <= unreadable:
            raise connection_lost()
        return get_trial(trial_id)

    def committed_then_lost(self, *args, **kwargs):
        tell(self, *args, **kwargs)
        monkeypatch.setattr(study._storage, "get_trial", still_failing)
        raise connection_lost()

    monkeypatch.setattr(optuna.Study, "tell", committed_then_lost)
    monkeypatch.setattr(sweep, "train_and_evaluate", trains([0.9]))
    with contextlib.nullcontext() if unreadable < sweep.TELL_READS else pytest.raises(
            optuna.exceptions.StorageInternalError):
        sweep.run_trial(plan, study, trial, parent, experiment_id)
    assert reads == [trial._trial_id] * min(unreadable + 1, sweep.TELL_READS)
    monkeypatch.setattr(study._storage, "get_trial", get_trial)
    assert study.trials[0].state.name == "COMPLETE"  # committed, either way
    run = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    if unreadable < sweep.TELL_READS:
        assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    else:
        assert run.info.status == "FAILED"
        assert run.data.tags["failure_reason"] == "the Optuna storage failed: server closed the connection"


@pytest.mark.parametrize("landed", [True, False])
def test_a_tell_that_landed_unseen_is_confirmed_when_the_sweep_ends(store, tmp_path, monkeypatch, capsys, landed):
    """A tell that committed and raised, every read back failing too: the run ended FAILED ("the Optuna storage
    failed") while the study held the trial COMPLETE, and the sweep registered that trial, its run FAILED. When the
    sweep ends the study is read again: the run ends FINISHED as told, its failure_reason gone. A tell that never
    landed (the trial still RUNNING in the study) leaves the run FAILED."""
    plan, study, storage, parent, registered = retried_sweep(tmp_path, monkeypatch, f"sweep-tell-unseen-{landed}")
    client = MlflowClient()
    monkeypatch.setattr(sweep, "TELL_BACKOFF_S", 0.01)
    backend = getattr(study._storage, "_backend", study._storage)  # what `stored_as_told` reads, under the cache
    tell, get_trial = optuna.Study.tell, backend.get_trial

    def unreadable(trial_id):
        raise connection_lost()

    def lost(self, *args, **kwargs):
        if landed:
            tell(self, *args, **kwargs)
        monkeypatch.setattr(backend, "get_trial", unreadable)
        raise connection_lost()

    monkeypatch.setattr(optuna.Study, "tell", lost)
    monkeypatch.setattr(sweep, "train_and_evaluate", trains([0.9]))
    with pytest.raises(optuna.exceptions.StorageInternalError):
        sweep.work(plan, study, storage)
    monkeypatch.setattr(backend, "get_trial", get_trial)  # the storage answers again
    run_id = study.trials[0].user_attrs["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.get_run(run_id).data.tags[sweep.TELL_UNCONFIRMED] == "COMPLETE FINISHED"
    capsys.readouterr()
    if not landed:
        assert sweep.confirm_late_tells(study) == []
        run = client.get_run(run_id)
        assert study.trials[0].state.name == "RUNNING"  # queued again once its heartbeat is stale
        assert run.info.status == "FAILED" and run.data.tags["failure_reason"].startswith("the Optuna storage failed")
        return
    sweep.finish(plan, study, storage)  # registers the best: confirms the late tells first
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    assert sweep.TELL_UNCONFIRMED not in run.data.tags and "held the trial COMPLETE" in run.data.tags[
        "mlflow.note.content"]
    assert "trial 0: its run had ended FAILED on a tell it could not confirm" in capsys.readouterr().err
    assert sweep.confirm_late_tells(study) == []  # once
    assert registered == [run.data.tags["model_uri"]]
    assert client.get_run(parent).data.tags["best_trial"] == "0"


def test_a_trial_failed_for_a_late_heartbeat_while_it_ran_is_superseded_by_its_retry(store, tmp_path, monkeypatch,
                                                                                    capsys):
    """A live worker whose heartbeat came late (a busy host) finds its trial failed and queued again by another when it
    tells Optuna: Optuna 5 raised "Cannot tell a FAIL trial" (not the UpdateFinishedTrialError caught) once the run had
    ended FINISHED, so the worker stopped on a traceback, a FINISHED run beside the retry's."""
    plan, study, storage, parent, registered = retried_sweep(tmp_path, monkeypatch, "sweep-late-beat")
    client = MlflowClient()

    def taken_for_stopped(trial):  # another worker (or the rerun command) finds its heartbeat stale meanwhile
        if trial.number == 0:
            time.sleep(2.5)
            optuna.storages.fail_stale_trials(study)

    monkeypatch.setattr(sweep, "train_and_evaluate", trains([0.9, 0.5], taken_for_stopped))
    sweep.work(plan, study, storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    first = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    retry = client.get_run(study.trials[1].user_attrs["mlflow_run_id"])
    assert first.info.status == "FAILED" and first.data.tags["superseded_by_retry"] == "true"
    reason = ("failed in the study while it ran: its heartbeat was late, and another worker took its worker for "
              "stopped; its retry counts instead")
    assert first.data.tags["failure_reason"] == reason
    assert f"warning: trial 0 {reason}" in capsys.readouterr().err
    assert client.get_run(first.data.tags["train_run_id"]).data.tags["superseded_by_retry"] == "true"
    assert [r.info.run_id for r in trial_runs_of(client, parent) if r.info.status == "FINISHED"] == [
        retry.info.run_id]
    assert registered == [retry.data.tags["model_uri"]]
    sweep_run = client.get_run(parent)
    assert sweep_run.data.tags["best_trial"] == "1" and sweep_run.data.tags["best_trial_run_id"] == retry.info.run_id
    compared = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.step = 'compare'")
    assert [r.data.tags["compared_runs"] for r in compared] == [retry.data.tags["train_run_id"]]


def test_workers_tagging_a_stopped_trials_runs_at_once_both_go_on(store):
    """A worker whose heartbeat came late tells its trial just as the worker that took it for stopped fails and
    supersedes its runs: both tag them (`failure_reason`, `superseded_by_retry`), MLflow's `set_tag` looks for the
    tag, then inserts it, and the other worker's insert landing in between stopped this worker on the table's unique
    key (a traceback). Now the tag is written once more, over the other's."""
    from mlflow.store.tracking.dbmodels.models import SqlTag
    from sqlalchemy.orm import Session

    from pipeline.tracking import trials

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    trial = client.create_run(experiment_id).info.run_id
    train = client.create_run(experiment_id, tags={"mlflow.parentRunId": trial}).info.run_id
    real, raced = Session.merge, set()

    def racing(self, instance, **kwargs):
        merged = real(self, instance, **kwargs)  # looked for, none found: inserted as this session commits
        if isinstance(instance, SqlTag) and (instance.run_uuid, instance.key) not in raced:
            raced.add((instance.run_uuid, instance.key))
            client.set_tag(instance.run_uuid, instance.key, "the other worker's")  # committed in between
        return merged

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Session, "merge", racing)
        trials.fail_trial_runs(trial, "worker stopped")
        trials.supersede_trial_runs(trial)
    assert raced == {(run, key) for run in (trial, train) for key in ("failure_reason", "superseded_by_retry")}
    for run in (trial, train):
        found = client.get_run(run)
        assert found.info.status == "FAILED"
        assert (found.data.tags["failure_reason"], found.data.tags["superseded_by_retry"]) == ("worker stopped", "true")


def test_a_study_deleted_and_started_again_under_its_name_registers_its_best(store, tmp_path, monkeypatch):
    """A done study deleted with Optuna's tools (optuna delete-study, the dashboard) left its lock study
    `<name>.register` behind: the same command then ran every trial again, printed the best and exited 0, but
    registered and compared nothing (`finish` took the old lock for another worker registering)."""
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    plan = sweep.Plan(write_spec(tmp_path, "sweep-again", GRID))
    optuna.create_study(storage=storage, study_name="again")
    optuna.create_study(storage=storage, study_name="again.register").set_user_attr("registered_version", 1)
    optuna.delete_study(study_name="again", storage=storage)
    study, leads = sweep.join_study(plan, storage, "again")
    assert leads and not sweep.registered(storage, "again")
    monkeypatch.setattr(sweep, "register_best", lambda plan, study: {"decision": {"version": 2}})
    assert sweep.finish(plan, study, storage) == {"decision": {"version": 2}}
    assert sweep.registered(storage, "again")


@pytest.mark.parametrize("storage", ["absolute", "relative"])
def test_a_study_whose_storage_file_is_gone_is_refused_before_anything_is_made(store, tmp_path, in_process,
                                                                                monkeypatch, storage):
    """The same command rerun after its Optuna storage's file was deleted or moved (or, named by a relative path,
    from another folder) found no study, made a new file, a new sweep run and study under the same name, and ran
    every trial again (and registered again), the first sweep run left as it was. The tracking store says where the
    study was: refused, one line, no file, study or run made."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e") or client.get_experiment(client.create_experiment("e2e"))
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if storage == "absolute" else "sqlite:///optuna.db"
    spec = write_spec(tmp_path, "sweep-gone", GRID, {"tracking.experiment": "e2e"})
    earlier = client.create_run(experiment.experiment_id, tags={
        "step": "sweep", "optuna_study": "gone", "optuna_storage": sweep.safe_url(url)}).info.run_id
    client.set_terminated(earlier, "KILLED")
    done = in_process("sweep", "--spec", spec, "--study", "gone", "--storage", url)
    assert (done.returncode, done.stderr.strip().splitlines()) == (2, [
        f"error: study: gone is not in {url}, which does not exist, though sweep run {earlier} ran it there (the "
        f"file deleted or moved, or a relative path run from another folder?): put it back to go on with the study, "
        f"or pass another -P study= to start afresh"]), done.stderr[-3000:]
    assert not (tmp_path / "optuna.db").exists()
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)] == [
        earlier]


def test_a_done_study_of_another_spec_is_refused(store, tmp_path, in_process):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    other = optuna.create_study(storage=storage, study_name="taken", direction="maximize")
    other.set_user_attr("fingerprint", {"spec": {"grid": {"train.lr": [0.5]}}})
    optuna.create_study(storage=storage, study_name="taken.register")
    done = in_process("sweep", "--spec", write_spec(tmp_path, "sweep-mine", GRID), "--study", "taken")
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: study: taken was started from another spec, base params or overrides "
                           "(spec.grid.train.lr: [0.5] then, [0.1, 1e-06] now; "), line
    assert line.endswith("; rerun it as it was, or pass another -P study= for this one"), line
    assert "is done" not in done.stdout


def test_a_study_of_another_spec_base_or_overrides_is_refused_naming_what_differs(tmp_path):
    """"was started from another spec or other overrides" named neither what differed nor, for an edited base file,
    the right culprit."""
    spec = write_spec(tmp_path, "sweep-then", GRID)
    study = optuna.create_study(study_name="then", direction="maximize")
    study.set_user_attr("fingerprint", json.loads(json.dumps(sweep.Plan(spec).fingerprint(), default=str)))
    sweep.check_fingerprint(sweep.Plan(spec), study)  # the same: accepted

    def refusal(plan: sweep.Plan) -> str:
        with pytest.raises(config.ConfigError) as refused:
            sweep.check_fingerprint(plan, study)
        text = str(refused.value)
        head, tail = "study: then was started from another spec, base params or overrides (", \
            "); rerun it as it was, or pass another -P study= for this one"
        assert text.startswith(head) and text.endswith(tail), text
        return text.removeprefix(head).removesuffix(tail)

    assert refusal(sweep.Plan(write_spec(tmp_path, "sweep-then", "grid:\n  train.lr: [0.1, 0.2]\n"))) == \
        "spec.grid.train.lr: [0.1, 1e-06] then, [0.1, 0.2] now"
    write_spec(tmp_path, "sweep-then", GRID)
    assert refusal(sweep.Plan(spec, "train.epochs=2")) == \
        '-P overrides: "" then, "train.epochs=2" now'  # not also train.epochs as the base's: the overrides set it
    base = tmp_path / "tiny.yaml"
    base.write_text((ROOT / TINY).read_text().replace("bn_momentum: 0.9", "bn_momentum: 0.8"))
    Path(spec).write_text(Path(spec).read_text().replace(f"base: {TINY}", f"base: {base}"))
    assert refusal(sweep.Plan(spec)) == (f'spec.base: "{TINY}" then, "{base}" now; model.bn_momentum (spec.base\'s): '
                                         '0.9 then, 0.8 now')


def test_a_rerun_whose_spec_or_base_changed_since_says_which_study_it_leaves_behind(store, tmp_path):
    """Under the default study name, a spec, base params file or -P overrides edited between a Ctrl-C and the rerun
    made a study of another name: every trial ran afresh and the first study stayed half done, unsaid."""
    spec = write_spec(tmp_path, "sweep-edited", GRID)
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    then = sweep.Plan(spec)
    for name, tracking in ((sweep.default_study(then), sweep.tracking_uri()), ("sweep-edited-0123abcd", "sqlite:///x")):
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
        sweep.lead(then, study, "parent", "0")
        study.set_user_attr("mlflow_tracking_uri", tracking)  # the second: a study of another tracking store
    old = sweep.default_study(then)
    now = sweep.Plan(spec, "train.epochs=2")
    assert sweep.left_behind(now, storage, sweep.default_study(now)) == [
        f"study {old} of this spec is not done (2 trials left to run), but was started from another spec, base params "
        f'or overrides (-P overrides: "" then, "train.epochs=2" now): this command starts study '
        f"{sweep.default_study(now)} afresh; to go on with {old}, rerun the command it was started with"]
    assert sweep.left_behind(then, storage, old) == []  # the same command goes on with it
    optuna.create_study(storage=storage, study_name=f"{old}.register").set_user_attr("registered_version", 1)
    assert sweep.left_behind(now, storage, sweep.default_study(now)) == []  # done: nothing left behind


def test_a_study_of_the_name_that_is_no_sweeps_is_refused_at_once_and_not_said_to_be_removed(store, tmp_path,
                                                                                            in_process):
    """`-P study=` naming a study of the storage that no sweep made (a user's own Optuna study, its trials done) was
    waited on for a minute as a sweep's leader still setting it up, then refused with advice to delete it."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    theirs = optuna.create_study(storage=storage, study_name="theirs", direction="maximize")
    theirs.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    started = time.monotonic()
    done = in_process("sweep", "--spec", write_spec(tmp_path, "sweep-mine", GRID), "--study", "theirs",
                      "--storage", storage)
    assert time.monotonic() - started < 30
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: study: theirs in {storage} holds 2 trials that no sweep set up (it keeps none of a sweep's records); "
        "pass another -P study= for this sweep"]
    assert len(optuna.load_study(study_name="theirs", storage=storage).trials) == 2
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_study_whose_sweep_run_is_not_in_this_store_or_deleted_is_refused_before_any_trial(store, tmp_path,
                                                                                             in_process):
    """A host without the team's MLFLOW_TRACKING_URI joined the study: it ran its trials into its own store (under a
    sweep run that store lacks), marked them COMPLETE, then died in a traceback registering them. A sweep run deleted
    in the UI: the trials ran, then the traceback."""
    spec = write_spec(tmp_path, "sweep-elsewhere", GRID)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    deleted = client.create_run(experiment_id).info.run_id
    client.delete_run(deleted)
    for name, parent in (("elsewhere", "0" * 32), ("deleted", deleted)):
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
        sweep.lead(sweep.Plan(spec), study, parent, experiment_id)
        study.set_user_attr("mlflow_tracking_uri", "http://mlflow:secret@team-host:5000")
    done = in_process("sweep", "--spec", spec, "--study", "elsewhere", "--storage", storage)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: study: elsewhere tracks its runs in http://mlflow:***@team-host:5000, whose sweep run {'0' * 32} is "
        f"not in this command's tracking store sqlite:///{tmp_path / 'mlflow.db'}; set MLFLOW_TRACKING_URI to the "
        f"study's, or pass another -P study= for a new sweep"]
    done = in_process("sweep", "--spec", spec, "--study", "deleted", "--storage", storage)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: study: deleted's sweep run {deleted} is deleted; restore it (mlflow runs restore --run-id {deleted}) "
        f"to go on with the study, or pass another -P study= for a new sweep"]
    for name in ("elsewhere", "deleted"):
        assert {t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials} == {"WAITING"}
    assert [r.info.run_id for r in client.search_runs([experiment_id], run_view_type=3)] == [deleted]


def test_a_rerun_of_a_study_whose_trials_all_failed_says_so_and_exits_as_the_first(store, tmp_path, in_process):
    """Its first command exits 3 (no trial finished, nothing registered: every trial diverged); the rerun said "is
    done" and exited 0.
    Each command's own run ends saying why in one line, as every other failing step's does: the sweep run ended
    FINISHED (under `mlflow run`: FAILED by `mlflow run`, with no reason), and the run `mlflow run` opened for the
    rerun FAILED with no reason."""
    spec = write_spec(tmp_path, "sweep-diverges", "grid:\n  train.lr: [1.0e+9]\n")  # diverges in its first epoch
    args = ("sweep", "--spec", spec, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    first = in_process(*args)
    assert first.returncode == 3, first.stderr[-2000:]
    (line,) = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: no trial of study sweep-diverges-") and " finished (1 diverged); nothing " in line
    assert "every trial diverged, as trial 0: TrainingDiverged: training diverged: loss became nan" in line
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("cifar10-resnet").experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.step = 'sweep'")
    assert parent.info.status == "FAILED" and parent.data.tags["failure_reason"] == line.removeprefix("error: ")
    (trial,) = client.search_runs([experiment_id], "tags.step = 'trial'")
    assert trial.info.status == "FAILED" and trial.data.tags["failure_reason"].startswith("TrainingDiverged: ")

    wrapper = client.create_run(client.get_experiment_by_name("e2e").experiment_id).info.run_id  # as `mlflow run`
    rerun = in_process(*args, env={"MLFLOW_RUN_ID": wrapper})
    assert rerun.returncode == 3, rerun.stderr[-2000:]
    (line,) = [line for line in rerun.stderr.splitlines() if line.startswith("error: ")]
    assert line.endswith("is done, but its 1 trial did not finish; nothing registered. Pass another -P study= "
                         "for a new sweep")
    assert "registered version" not in rerun.stdout
    tags = client.get_run(wrapper).data.tags
    assert tags["failure_reason"] == line.removeprefix("error: ") and tags["step"] == "sweep-worker"
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(parent.info.run_id).info.status == "FAILED"  # the rerun left it as it was


def test_a_sweep_every_trial_of_which_failed_on_its_params_says_so_and_exits_2(store, tmp_path, in_process,
                                                                               monkeypatch):
    """Trials whose params only training finds refused (a space drawing among data paths, each counted by its first
    trial's prepare, too few for the batch) all failed, and the command said only to read the trials table, exit 1, as
    for trials that diverged. It says the first refusal now, exit 2, as a command refused on bad input; its sweep run
    ends FAILED with that line, and so does the rerun."""
    def refused(cfg, trial):
        raise config.ConfigError(f"train.drop_remainder: the 88 training images make no whole batch of "
                                 f"train.batch_size {cfg.train.batch_size}")

    monkeypatch.setattr(sweep, "train_and_evaluate", refused)
    spec = write_spec(tmp_path, "sweep-refused", "grid:\n  train.batch_size: [128, 256]\n",
                      {"train.batch_size": None})
    args = ("sweep", "--spec", spec, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    done = in_process(*args)
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.fullmatch(r"error: no trial of study sweep-refused-\w+ finished \(2 failed\); nothing registered: every "
                        r"trial's params were refused, as trial 0: ConfigError: train.drop_remainder: the 88 training "
                        r"images make no whole batch of train.batch_size 128", line), line
    client = MlflowClient()
    (parent,) = client.search_runs([client.get_experiment_by_name("cifar10-resnet").experiment_id],
                                   "tags.step = 'sweep'")
    assert (parent.info.status, parent.data.tags["failure_reason"]) == ("FAILED", line.removeprefix("error: "))
    assert in_process(*args).returncode == 2


def test_a_worker_that_ends_a_study_none_of_whose_trials_finished_ends_its_sweep_run_failed_saying_why(
        store, tmp_path, monkeypatch):
    """The worker that ends the study (a `-P workers=N` command's, another host's, a rerun's after the leader died)
    enters the sweep run by id to record the trials: it ended it FINISHED, with no reason, whatever the trials did."""
    spec = write_spec(tmp_path, "sweep-all-fail", "grid:\n  train.lr: [0.1, 0.2]\n")
    plan = sweep.Plan(spec)
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    parent = client.create_run(experiment_id, tags={"step": "sweep"}).info.run_id  # not active here: another's
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name="all-fail", direction="maximize")
    sweep.lead(plan, study, parent, experiment_id)

    def fails(cfg, trial):
        raise StepFailed(f"data.source: unreadable on this host (trial {trial.number})")

    monkeypatch.setattr(sweep, "train_and_evaluate", fails)
    sweep.work(plan, study, storage)
    run = client.get_run(parent)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == sweep.nothing_finished(study) == (
        "no trial of study all-fail finished (2 failed); nothing registered: the trials table (trials.csv) says why: "
        "each trial's failure_reason (its run's tag), or pruned_at_epoch")
    assert run.data.tags["trials_fail"] == "2"
    assert optuna.load_study(study_name="all-fail.register", storage=storage).user_attrs["registered_version"] is None


def test_a_grid_queues_each_combination_and_a_space_draws_in_range_repeatably(tmp_path):
    body = "grid:\n  train.lr: [0.05, 0.1]\n  model.units_per_stage: [1, 2]\n"
    grid = sweep.Plan(write_spec(tmp_path, "sweep-grid", body), "train.epochs=1")
    assert [c.run_name() for c in grid.configs] == ["resnet11-e1-b16-lr0.05", "resnet20-e1-b16-lr0.05",
                                                    "resnet11-e1-b16-lr0.1", "resnet20-e1-b16-lr0.1"]
    assert grid.trials == 4 and grid.sampler_name == "grid"
    # the same spec over an edited base params file is another sweep (the spec names the file, not its content)
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  momentum: 0.9\n  validation_fraction: 0.1\n")
    based = tmp_path / "sweep-based.yaml"
    based.write_text(f"base: {base}\n{body}")
    before = sweep.Plan(based).fingerprint()
    base.write_text("train:\n  momentum: 0.8\n  validation_fraction: 0.1\n")
    assert sweep.Plan(based).fingerprint() != before

    spec = write_spec(tmp_path, "sweep-space", "space:\n  train.lr: {min: 0.01, max: 0.3, log: true}\n"
                      "  train.batch_size: {min: 16, max: 64}\n  model.widths: [[16, 32, 64], [8, 16, 32]]\n"
                      "sampler: random\ntrials: 5\nseed: 3\n", {"train.batch_size": None})

    assert len(sweep.Plan(spec).configs) == 2 * 2 * 2  # every combination of the choices and range ends was checked
    first = draw_all(spec)
    assert first == draw_all(spec) and len(first) == 5  # seeded: the same draws again
    assert all(0.01 <= d["train.lr"] <= 0.3 and isinstance(d["train.batch_size"], int)
               and 16 <= d["train.batch_size"] <= 64 and d["model.widths"] in ([16, 32, 64], [8, 16, 32])
               for d in first)
    assert len({d["train.lr"] for d in first}) == 5


def test_a_killed_worker_leaves_its_trial_failed_and_the_rerun_finishes_the_study(store, tmp_path, in_process,
                                                                                  monkeypatch):
    spec = write_spec(tmp_path, "sweep-killed", "grid:\n  train.lr: [0.1]\n", QUICK)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**store, "SWEEP_HEARTBEAT_SECONDS": "1"}  # stale after 6 s without a heartbeat
    # what SWEEP_HEARTBEAT_SECONDS=1 sets in a process of its own, for the rerun in this one (read at import: the
    # rerun waited out the default 120 s)
    monkeypatch.setattr(sweep, "HEARTBEAT_S", 1)
    monkeypatch.setattr(sweep, "GRACE_S", 6)
    # `python -m pipeline.sweep`, its trial held at the end of its first epoch (reported to the trial, its fit not
    # done) until it is killed there: a kill in training, at a moment of the test's choosing
    held = ("import sys, time; from pipeline import sweep; report = sweep.pruning_callback\n"
            "def held(trial):\n"
            "    callback = report(trial)\n"
            "    def on_epoch_end(epoch, logs=None, end=callback.on_epoch_end):\n"
            "        end(epoch, logs)\n"
            "        print('trained an epoch', flush=True)\n"
            "        time.sleep(300)\n"
            "    callback.on_epoch_end = on_epoch_end\n"
            "    return callback\n"
            "sweep.pruning_callback = held\n"
            "sys.argv[0] = 'pipeline.sweep'\n"
            "sweep.cli(sweep.main)\n")
    cmd = [sys.executable, "-c", held, "--spec", spec, "--study", "killed"]
    worker = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              start_new_session=True)
    try:
        deadline, line = time.monotonic() + 300, "-"
        while line and "trained an epoch" not in line:
            ready, _, _ = select.select([worker.stdout], [], [], max(0, deadline - time.monotonic()))
            line = worker.stdout.readline() if ready else ""
        assert line and worker.poll() is None, "the worker ended before it could be killed"
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    client = MlflowClient()
    trains = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.step = 'train'")
    assert len(trains) == 1 and trains[0].info.status == "RUNNING"  # killed in training
    study = optuna.load_study(study_name="killed", storage=storage)
    assert [t.state.name for t in study.trials] == ["RUNNING"]  # nobody has noticed yet

    done = in_process("sweep", "--spec", spec, "--study", "killed")  # again
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("waiting for trial(s) 0: running in another worker, or stopped (a killed worker's trial is queued again "
            "6 s after its last heartbeat)") in done.stdout  # not a silent wait
    study = optuna.load_study(study_name="killed", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].system_attrs["failed_trial"] == 0 and study.trials[1].params == study.trials[0].params
    killed = client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert killed.info.status == "FAILED" and "no heartbeat" in killed.data.tags["failure_reason"]
    assert client.get_run(killed.data.tags.get("train_run_id") or trains[0].info.run_id).info.status == "FAILED"
    parent, trials, _ = sweep_runs(client, "killed")
    assert parent.info.status == "FINISHED" and sorted(trials) == [0, 1]
    assert parent.data.tags["best_trial"] == "1" and len(client.search_model_versions("name = 'cifar10-resnet'")) == 1


def test_a_trial_whose_worker_stopped_too_often_is_not_said_to_be_queued_again(tmp_path, monkeypatch, capsys):
    """The third stale try of a trial printed "trial 2 queued again" while nothing was queued: the sweep finished
    without that trial."""
    monkeypatch.setattr(sweep, "GRACE_S", 1)
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage, study_name="stale", direction="maximize")
    study.enqueue_trial({})
    lines = []
    while waiting := study.get_trials(states=(optuna.trial.TrialState.WAITING,)):  # a worker claims it, then dies
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, waiting[0].number)
        storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.RUNNING)
        storage.record_heartbeat(trial_id)
        time.sleep(2.5)  # past the grace period, whole seconds in the storage
        optuna.storages.fail_stale_trials(study)
        lines += capsys.readouterr().err.splitlines()
    assert [t.state.name for t in study.trials] == ["FAIL"] * (sweep.MAX_RETRY + 1)
    assert lines == ["trial 0: worker stopped: no heartbeat for over 1 s; trial 0 queued again",
                     "trial 1: worker stopped: no heartbeat for over 1 s; trial 1 queued again",
                     "trial 2: worker stopped: no heartbeat for over 1 s; not queued again: the worker of each of "
                     "trials 0, 1, 2 (its tries) stopped"]


def test_a_killed_worker_of_several_is_a_warning_once_the_others_finish_the_study(store, tmp_path, in_process,
                                                                                 monkeypatch):
    """`--workers 2` with one worker killed (out of memory, say) while the other retried its trial and registered the
    best ended in a traceback, and the finished sweep run was marked FAILED. Nothing finished: one line, exit 3.
    Run from another folder than the project's, `--spec my-sweep.yaml --workers 2` started its study, then each worker
    (run from the project root) said "spec: file not found", and the command told to rerun it as it was."""
    real = subprocess.Popen

    class Killed:
        def wait(self):
            return -signal.SIGKILL

    def popen(cmd, **kwargs):  # the first worker process of a command (or all) is killed at once
        if "--join" not in cmd:
            return real(cmd, **kwargs)
        workers.append(cmd)
        return Killed() if kill_all or len(workers) == 1 else real(cmd, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    write_spec(tmp_path, "sweep-workers", "grid:\n  train.lr: [0.1, 0.05]\n", QUICK)  # a trial for each worker
    monkeypatch.chdir(tmp_path)
    spec = "sweep-workers.yaml"  # relative to this folder, where the worker runs too
    workers, kill_all = [], False
    done = in_process("sweep", "--spec", spec, "--study", "one-killed", "--workers", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: sweep workers exited with [-9, 0]; the others finished study one-killed" in done.stderr
    client = MlflowClient()
    parent, trials, _ = sweep_runs(client, "one-killed")
    assert parent.info.status == "FINISHED" and parent.data.tags["registered_version"] == "1"
    assert [r.info.status for r in trials.values()] == ["FINISHED", "FINISHED"]

    workers, kill_all = [], True
    done = in_process("sweep", "--spec", spec, "--study", "all-killed", "--workers", "2")
    assert done.returncode == 3, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == ["error: sweep workers exited with [-9, -9] before study all-killed "
                                                "was done; rerun the same command to go on with it"]


def test_workers_beyond_the_trials_left_are_not_started(store, tmp_path, in_process, monkeypatch):
    """`-P workers=5` on a grid of 2 trials started 5 worker processes, 3 of which only waited (each a TensorFlow
    start-up and a storage poll every few seconds) until the others had finished: as many start as there are trials
    left to run, and one line says so. The workers here are stand-ins that die at once: no trial trains."""
    real, started = subprocess.Popen, []

    class Killed:
        def wait(self):
            return -signal.SIGKILL

    def popen(cmd, **kwargs):
        if "--join" not in cmd:
            return real(cmd, **kwargs)
        started.append(cmd)
        return Killed()

    monkeypatch.setattr(subprocess, "Popen", popen)
    spec = write_spec(tmp_path, "sweep-idle", GRID, QUICK)
    done = in_process("sweep", "--spec", spec, "--study", "idle", "--workers", "5")
    assert done.returncode == 3, done.stderr[-3000:]
    assert len(started) == 2, started
    assert "workers: starting 2, not 5: study idle has 2 trials left to run (waiting or running)" in \
        done.stdout.splitlines(), done.stdout[-3000:]
    started.clear()
    done = in_process("sweep", "--spec", spec, "--study", "idle", "--workers", "2")  # no more than the trials: quiet
    assert len(started) == 2 and "workers: starting" not in done.stdout, done.stdout[-3000:]


def test_a_sweep_of_several_workers_stopped_by_sigterm_stops_its_workers(store, tmp_path):
    """`kill` (or `timeout`) sent SIGTERM to the command alone: it said "interrupted", exited 143, and its worker
    processes went on with every trial and registered the best as @champion."""
    # trials long enough to be caught in: on an idle machine 3 tiny epochs ended, and a version was registered,
    # before the poll below saw both trials running
    spec = write_spec(tmp_path, "sweep-stopped", "grid:\n  train.lr: [0.05, 0.1]\n", {"train.epochs": 100})
    cmd = [sys.executable, "-m", "pipeline.sweep", "--spec", spec, "--study", "stopped", "--workers", "2"]
    log = tmp_path / "stderr.txt"  # not a pipe: the workers hold it open as long as they live
    with log.open("w") as stderr:
        command = subprocess.Popen(cmd, env=store, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    client = MlflowClient()
    children: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and command.poll() is None:  # both workers are in their trials
            children = [int(p) for p in Path(f"/proc/{command.pid}/task/{command.pid}/children").read_text().split()]
            trials = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.step = 'trial'")
            if len(children) == 2 and len(trials) == 2:
                break
            time.sleep(0.5)
        assert command.poll() is None and len(children) == 2, "the sweep ended before it could be stopped"
        # --workers 2: two processes, each in a trial of its own
        assert sorted(r.data.tags["worker"] for r in trials) == sorted(f"{socket.gethostname()}:{pid}"
                                                                        for pid in children)
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=120) == 128 + signal.SIGTERM
        assert "error: interrupted by SIGTERM" in log.read_text()
        alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
        assert alive == [], "worker processes outlived the stopped sweep"
    finally:
        for pid in children:  # without the fix: the orphans, stopped here
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert not client.search_model_versions("name = 'cifar10-resnet'")


def test_a_worker_killed_while_registering_is_noticed_and_the_rerun_registers(store, tmp_path, in_process,
                                                                             monkeypatch):
    """SIGKILL between taking the study's register lock and recording the version left a study that every rerun
    called done ("registered version None") with nothing registered. A live registering worker is waited for."""
    spec = write_spec(tmp_path, "sweep-regkill", "grid:\n  train.lr: [0.1]\n", QUICK)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = ("--spec", spec, "--study", "regkill", "--storage", storage)
    with monkeypatch.context() as patched:  # its trial runs here; a worker that finds nothing left registers
        patched.setattr(sweep, "finish", lambda *a: None)
        trained = in_process("sweep", *args)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert [t.state.name for t in optuna.load_study(study_name="regkill", storage=storage).trials] == ["COMPLETE"]
    assert "regkill.register" not in [s.study_name for s in optuna.get_all_study_summaries(storage, False)]
    die = "import os, signal; from pipeline import sweep; " \
          "sweep.register_best = lambda *a: os.kill(os.getpid(), signal.SIGKILL); sweep.main()"
    killed = subprocess.run([sys.executable, "-c", die, *args], env=store, cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    lock = optuna.load_study(study_name="regkill.register", storage=storage)
    dead = lock.user_attrs["worker"]
    assert "registered_version" not in lock.user_attrs
    client = MlflowClient()
    assert not client.search_model_versions("name = 'cifar10-resnet'")

    lock.set_user_attr("worker", sweep.worker_name())  # as if this live process were registering it now
    busy = in_process("sweep", *args)
    assert busy.returncode == 2 and "is being registered by" in busy.stderr, busy.stderr[-2000:]

    lock.set_user_attr("worker", dead)
    done = in_process("sweep", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"the worker registering study regkill ({dead}) stopped before it finished" in done.stdout
    # a command joining a study says how many of its trials are left (a rerun after a Ctrl-C: what it goes on with)
    assert f"joined Optuna study regkill in {storage} (grid sampler, no pruner, 1 trial, 0 left to run); " \
        in done.stdout
    assert len(client.search_model_versions("name = 'cifar10-resnet'")) == 1
    parent, runs, _ = sweep_runs(client, "regkill")
    assert parent.info.status == "FINISHED" and parent.data.tags["registered_version"] == "1"
    # the last line says where the best trial is: its run, the version registered, the sweep run (it named the trial's
    # number and val_acc alone)
    val_acc = f"{optuna.load_study(study_name='regkill', storage=storage).trials[0].value:.4f}"
    best = (f"best trial 0 (train.lr=0.1) val_acc {val_acc}, run {runs[0].info.run_id}, registered cifar10-resnet v1 "
            f"(@champion moved to it); its sweep run {parent.info.run_id} holds trials.csv and the comparison")
    assert done.stdout.splitlines()[-1] == f"study regkill: {best}"
    again = in_process("sweep", *args)
    assert again.returncode == 0
    assert again.stdout.splitlines()[-1] == (f"study regkill in {storage} is done: 1 trial; {best}; pass another "
                                             "-P study= for a new sweep")


def test_the_tpe_example_prunes_from_epoch_2_as_its_comment_says():
    # Trials report val_acc at step = epoch (from 1); n_warmup_steps: 1 let the median pruner stop one after epoch 1.
    plan = sweep.Plan(str(ROOT / "params" / "sweep-tpe.yaml"))
    study = optuna.create_study(direction="maximize", pruner=plan.make_pruner())
    for _ in range(4):  # n_startup_trials finished trials, well ahead
        study.add_trial(optuna.trial.create_trial(value=0.9, intermediate_values={1: 0.8, 2: 0.9}))
    trial = study.ask()
    trial.report(0.1, step=1)
    assert not trial.should_prune()
    trial.report(0.1, step=2)
    assert trial.should_prune()


def test_the_help_says_the_defaults_mlproject_gives(in_process):
    """--help named params/sweep-example.yaml as an example, not the spec run when none is given, and no number of
    workers."""
    shown = in_process("sweep", "--help")
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "--spec SPEC sweep file (default: params/sweep-example.yaml)" in text
    assert "--workers WORKERS worker processes on this host (default: 1; no more than the study's trials left)" in text


def test_a_misspelt_name_is_told_the_names_a_user_gives_not_the_workers_own(store, in_process):
    """`-P worker=2` listed `--join`, the option each worker of `--workers N` is started with, among the names the
    sweep takes: a user who then gave `-P join=1` was refused as `unrecognized arguments: 1`."""
    refused = in_process("sweep", "--worker=2")
    assert refused.returncode == 2
    assert refused.stderr == ("error: arguments: unrecognized arguments: --worker=2; did you mean --workers? (known: "
                              "--overrides, --spec, --storage, --study, --workers)\n")


@pytest.mark.parametrize("given", [["--join", "1"], ["--join=1"], ["--join", ""]])
def test_a_value_given_to_the_workers_own_option_is_refused_naming_it(store, in_process, given):
    """`-P join=1` (mlflow run passes it on as `--join 1`) was refused as `unrecognized arguments: 1`, which names no
    option, and `--join=1` as `argument --join: ignored explicit argument '1'`; `--help` still leaves it out."""
    refused = in_process("sweep", *given)
    assert refused.returncode == 2
    assert refused.stderr == (f"error: arguments: --join takes no value, got {given[-1].split('=')[-1]!r}: it is how a "
                              "sweep starts the worker processes of --workers N, no parameter a user gives\n")
    assert "--join" not in in_process("sweep", "--help").stdout


def test_a_worker_of_workers_n_gets_a_value_beginning_with_a_dash():
    """`-P workers=2` with a spec file `-grid.yaml` (or storage, study spelt with a leading dash): each worker was
    started with `--spec -grid.yaml`, which argparse read as an option, and every worker failed."""
    args = argparse.Namespace(spec="-grid.yaml", overrides="-", workers="2")
    words = sweep.worker_command(args, "-storage.db", "-study")
    parser = config.entry_point_parser("sweep", "")
    parser.add_argument("--join", action="store_true")
    back = parser.parse_args(words[3:])
    assert (back.spec, back.overrides, back.storage, back.study, back.workers, back.join) == (
        "-grid.yaml", "-", "-storage.db", "-study", "1", True)


def test_an_empty_heartbeat_variable_is_the_default_interval():
    """SWEEP_HEARTBEAT_SECONDS= before a sweep died at import on int('') (a ValueError traceback)."""
    code = "from pipeline import sweep; print(sweep.HEARTBEAT_S, sweep.GRACE_S)"
    probe = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "SWEEP_HEARTBEAT_SECONDS": ""},
                           capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.split() == ["20", "120"], probe.stderr[-800:]


def test_tensorflows_retracing_advice_is_not_printed_by_a_sweep():
    """A plain sweep's console showed TensorFlow's "5 out of the last 7 calls to <function ...> triggered tf.function
    retracing ... (1) creating @tf.function repeatedly in a loop ..." from its third trial on, six lines of advice on
    stderr: each trial builds its own model, whose predict function is traced afresh by design. That advice is
    dropped; TensorFlow's other warnings are kept."""
    import logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        logger.warning("5 out of the last 7 calls to <function TensorFlowTrainer.make_predict_function.<locals>."
                       "one_step_on_data_distributed at 0x7f074ded7600> triggered tf.function retracing. Tracing is "
                       "expensive and the excessive number of tracings could be due to (1) creating @tf.function "
                       "repeatedly in a loop")
        logger.warning("another warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["another warning"]
