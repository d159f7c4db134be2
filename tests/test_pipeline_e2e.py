"""End to end: every entry point through `mlflow run` on tiny synthetic data, real SQLite store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from pipeline import data
from pipeline.tracking import steps
from tests.conftest import ROOT, eventually, mlflow_run

TINY = "params/tiny.yaml"
# One stage of basic blocks, for a training whose model is not what a test is about: fewer layers to trace.
ONE_STAGE = "model.block=basic model.widths=[16] model.strides=[1]"
# Library lines a person running the pipeline cannot act on (see pipeline/__init__.py).
KNOWN_NOISE = ("absl::InitializeLog", "cudart_stub", "cpu_feature_guard", "oneDNN", "cuInit",
               "Add type hints to the `predict` method", "can be interpreted in multiple ways",
               "Passing a Python object as `python_model`", "Downloading artifacts",
               "Successfully registered model", "Created version")


def runs_by_step(client: MlflowClient, parent_id: str) -> dict:
    experiment = client.get_experiment_by_name("e2e").experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["step"]: r for r in children}


def test_main_trains_tracks_evaluates_registers_and_learns(store, in_process):
    # A newcomer's shell: no TensorFlow settings of its own (importing pipeline set them in this process).
    own = ("TF_CPP_MIN_LOG_LEVEL", "TF_CPU_ALLOCATOR_USE_BFC")
    result = mlflow_run({k: v for k, v in store.items() if k not in own}, "main", params=TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    parents = client.search_runs([experiment], "tags.step = 'main'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]

    # The console tells the pipeline's story, not the libraries' noise.
    console = result.stdout + result.stderr
    assert "prepared synthetic: 1024 train / 256 test" in console
    assert all(f"Epoch {epoch}/3" in console for epoch in (1, 2, 3)) and console.count("val_acc: ") == 3
    assert re.search(r"^test_acc 0\.\d{4} ", console, re.M)
    assert "registered cifar10-resnet v1: @champion moved (no version held @champion)" in console
    assert f"run {parent.info.run_id}: see it with `mlflow ui --backend-store-uri sqlite:///" in console
    for noise in KNOWN_NOISE:
        assert noise not in console, noise
    steps = runs_by_step(client, parent.info.run_id)
    assert set(steps) == {"prepare", "train", "evaluate", "register"}
    assert all(r.info.status == "FINISHED" for r in steps.values())

    train = steps["train"]
    assert train.data.params["train.epochs"] == "3" and train.data.params["model.block"] == "bottleneck"
    assert train.info.run_name == "resnet11-e3-b32-lr0.05"
    assert train.data.tags["cpu_allocator"] == "bfc"  # TensorFlow's pooled CPU memory, as pipeline asks for it
    for key in ("loss", "acc", "val_loss", "val_acc", "lr", "epoch_seconds"):
        history = client.get_metric_history(train.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
    lrs = {m.step: m.value for m in client.get_metric_history(train.info.run_id, "lr")}
    assert 0.05 > lrs[1] > lrs[2] > lrs[3] and lrs[3] < 1e-3  # tiny's cosine, from 0.05 to about 0 by the end
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert {"curves.png", "history.csv", "config.json"} <= artifacts

    prepare = steps["prepare"]
    digest = prepare.data.tags["dataset_sha256"]
    assert len(digest) == 64 and prepare.inputs.dataset_inputs[0].dataset.digest == digest[:32]
    # the UI's Dataset column names the data a training run used too
    assert [i.dataset.digest for i in train.inputs.dataset_inputs] == [digest[:32]]

    evaluation = steps["evaluate"]
    metrics = evaluation.data.metrics
    assert {"test_loss", "test_acc", "test_acc_class_0", "test_acc_class_9"} <= set(metrics)
    assert metrics["test_acc"] > 0.5  # 10 classes: chance is 0.1; the tiny model learns the colours
    eval_files = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"metrics.json", "confusion_matrix.png", "confusion_matrix.csv", "predictions.png"} <= eval_files
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{evaluation.info.run_id}/metrics.json"))
    assert report["test_images"] == 256 and report["test_acc"] == pytest.approx(metrics["test_acc"])
    assert metrics["test_images"] == parent.data.metrics["test_images"] == 256  # in the UI, beside test_acc
    # tiny validates on the test split (train.validation_fraction 0): the train run's val_data is the test split
    assert train.data.tags["val_data_sha256"] == evaluation.data.tags["test_data_sha256"]
    # and how many of them are training images too: on every step that can tell, none in synthetic data
    assert metrics["test_images_in_train"] == parent.data.metrics["test_images_in_train"] == 0
    assert prepare.data.metrics["test_images_in_train"] == report["test_images_in_train"] == 0

    champion = client.get_model_version_by_alias("cifar10-resnet", "champion")
    assert str(champion.version) == "1"
    assert float(champion.tags["test_acc"]) == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert champion.tags["run_id"] == train.info.run_id and champion.tags["test_images_in_train"] == "0"

    model = mlflow.pyfunc.load_model("models:/cifar10-resnet@champion")
    test = data.make_synthetic(n_train=1024, n_test=256, seed=0)
    predictions = model.predict(test.x_test[:64])
    assert len(predictions) == 64 and set(predictions["label"]) <= set(data.SYNTHETIC_CLASSES)
    accuracy = np.mean(predictions["label"].to_numpy() == np.array(data.SYNTHETIC_CLASSES)[test.y_test[:64]])
    assert accuracy > 0.5

    # A second, worse run (1 epoch) reuses the prepared dataset and is registered without the alias. `python -m
    # pipeline.main` in this process (Keras is loaded here already): `mlflow run` of main is what ran above.
    again = in_process("main", "--params", TINY, "--epochs", "1",
                       "--overrides", "train.lr_boundaries=[] tracking.experiment=e2e")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing prepared dataset" in again.stdout
    assert len(client.search_runs([experiment], "tags.step = 'prepare'")) == 1
    versions = client.search_model_versions("name = 'cifar10-resnet'")
    assert len(versions) == 2
    best = max(versions, key=lambda v: float(v.tags["test_acc"]))
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == str(best.version)


def dataset_inputs(run) -> list[tuple[str, str, str]]:
    """(name, digest, context) of each dataset input of `run`."""
    return [(i.dataset.name, i.dataset.digest, {t.key: t.value for t in i.tags}.get("mlflow.data.context"))
            for i in run.inputs.dataset_inputs]


def logged_file(model_uri: str, path: str) -> Path:
    """The file `path` of the logged model `models:/m-...` where the (local) artifact store keeps it."""
    location = mlflow.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    found = Path(location.removeprefix("file://")) / path
    assert found.is_file(), found
    return found


def test_each_entry_point_runs_on_its_own(store, in_process, tmp_path):
    prepared = mlflow_run(store, "prepare", params=TINY, overrides="data.synthetic_test=128")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    prepare_run = client.search_runs([experiment], "tags.step = 'prepare'")[0]
    dataset_uri = f"runs:/{prepare_run.info.run_id}/dataset/dataset.npz"
    # the URI `-e train` and `-e evaluate` take, on stdout's last line as their -P: no digging for it in the UI
    assert prepared.stdout.splitlines()[-1] == f"dataset_uri={dataset_uri}", prepared.stdout[-3000:]
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{prepare_run.info.run_id}/dataset"))
    assert steps.dataset_params(str(folder / "dataset.npz"))["data.synthetic_test"] == "128"  # a copy says it too

    # train and evaluate as `python -m pipeline.<step>` in this process (Keras loads once): how `mlflow run` starts a
    # step is what `-e prepare` above and `-e register` and `-e train` below go through; their command lines are
    # MLproject's (test_config.test_each_entry_points_command_line_is_the_one_mlproject_writes)
    trained = in_process("train", "--params", TINY, "--epochs", "2", "--dataset-uri", dataset_uri,
                         "--overrides", f"tracking.experiment=e2e {ONE_STAGE}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    train_run = client.search_runs([experiment], "tags.step = 'train'")[0]
    assert len(client.get_metric_history(train_run.info.run_id, "val_acc")) == 2
    # the run records the data it trained on, the prepare run's, not the params file's 256 test images
    assert train_run.data.params["data.synthetic_test"] == "128"
    assert "note: the data params are the dataset's" in trained.stderr and "(params: 256)" in trained.stderr
    model_uri = train_run.data.tags["model_uri"]

    # `python -m pipeline.register` in this process too: `-e register` runs through `mlflow run` below
    refused = in_process("register", "--params", TINY, "--model-uri", model_uri,
                         "--overrides", "tracking.experiment=e2e")
    assert refused.returncode == 2 and "run evaluate on it first" in refused.stderr, refused.stderr[-3000:]
    assert client.search_registered_models() == []

    # its scoring code edited in the copy logged with it, which serving it runs (as this checkout's is, after an edit
    # or a pull since it trained): scored here, it would run other code than it is served with. Refused, one line,
    # exit 2, before any run opens; with the copy as it was, it is scored
    served_code = logged_file(model_uri, "code/pipeline/serve.py")
    as_logged = served_code.read_bytes()
    served_code.write_bytes(as_logged + b"# changed since\n")
    changed = in_process("evaluate", "--params", TINY, "--model-uri", model_uri, "--dataset-uri", dataset_uri,
                         "--overrides", "tracking.experiment=e2e")
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert changed.stderr.strip().splitlines()[-1].startswith(
        f"error: model_uri: {model_uri} is served with other scoring code than this process loaded (pipeline/serve.py "
        f"differs from the copy logged with it, which serving it runs)"), changed.stderr[-3000:]
    commit = train_run.data.tags.get("git_commit")  # where it was trained in a git checkout
    trained_with = f"git commit {commit[:12]} of train run" if commit else "train run"
    assert (f"check out the code it was trained with ({trained_with} {train_run.info.run_id}) and score it there, or "
            f"train it again with this code") in changed.stderr, changed.stderr[-3000:]
    assert client.search_runs([experiment], "tags.step = 'evaluate'", run_view_type=ViewType.ALL) == []
    served_code.write_bytes(as_logged)
    evaluated = in_process("evaluate", "--params", TINY, "--model-uri", model_uri, "--dataset-uri", dataset_uri,
                           "--overrides", "evaluate.tta=flip tracking.experiment=e2e")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    # scored as it is served (logged without test-time augmentation), and told so
    assert "note: evaluate.tta=flip not applied" in evaluated.stderr
    evaluate_run = client.search_runs([experiment], "tags.step = 'evaluate'")[0]
    assert evaluate_run.data.params["evaluate.tta"] == "none"
    # the UI's Dataset column names the data an evaluate run scored (it had none), as the train run's does
    prepared_input = prepare_run.inputs.dataset_inputs[0].dataset
    assert dataset_inputs(evaluate_run) == [(prepared_input.name, prepared_input.digest, "test")]
    assert dataset_inputs(train_run) == [(prepared_input.name, prepared_input.digest, "train")]
    registered = mlflow_run(store, "register", params=TINY, model_uri=model_uri,
                            overrides="register.model_name=standalone")
    assert registered.returncode == 0, registered.stderr[-3000:]
    assert str(client.get_model_version_by_alias("standalone", "champion").version) == "1"

    # `-e evaluate` of a dataset path holding a space: `mlflow run` logs a -P shell-quoted ('/.../my data/...'), and
    # evaluate logging the path as given failed on MLflow's "Changing param values is not allowed" once it had scored
    spaced = tmp_path / "my data" / "dataset.npz"
    spaced.parent.mkdir()
    spaced.write_bytes((folder / "dataset.npz").read_bytes())
    rescored = mlflow_run(store, "evaluate", params=TINY, model_uri=model_uri, dataset_uri=str(spaced))
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    rescore = client.search_runs([experiment], "tags.step = 'evaluate'", order_by=["attributes.start_time DESC"])[0]
    assert rescore.info.status == "FINISHED" and "test_acc" in rescore.data.metrics
    assert rescore.data.params["dataset_uri"] == f"'{spaced}'"  # as `mlflow run` logged it, kept
    # a dataset file no prepare run logged: named after the file, of the digest its arrays have in a prepare run
    assert dataset_inputs(rescore) == [("dataset.npz", prepared_input.digest, "test")]
    assert json.loads(rescore.inputs.dataset_inputs[0].dataset.source)["uri"] == spaced.as_uri()

    # -e train on data no prepare run holds yet: the run `mlflow run` opened is the train run, the prepare a run
    # of its own beside it, both in the experiment asked for (the prepare took that run, train went elsewhere)
    fresh = mlflow_run(store, "train", params=TINY, epochs="1", overrides=f"data.synthetic_test=64 {ONE_STAGE}")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    prepares = client.search_runs([experiment], "tags.step = 'prepare'")
    trains = client.search_runs([experiment], "tags.step = 'train'", order_by=["attributes.start_time DESC"])
    assert len(prepares) == 2 and len(trains) == 2, (prepares, trains)
    newest = trains[0]
    assert newest.data.params["data.synthetic_test"] == "64" and newest.data.params["dataset_uri"] in ("", "''")
    new_prepare = next(r for r in prepares if r.info.run_id != prepare_run.info.run_id)
    assert newest.data.tags["dataset_uri"] == f"runs:/{new_prepare.info.run_id}/dataset/dataset.npz"
    assert new_prepare.data.tags["dataset_sha256"] in newest.data.tags["mlflow.note.content"]

    # registered on other test data than v1 of `standalone`, whose scoring code differs from this checkout's (edited
    # in its logged copy): v1 is not scored again with this checkout's code, and the alias stays, saying why
    evaluated = in_process("evaluate", "--params", TINY, "--model-uri", newest.data.tags["model_uri"], "--dataset-uri",
                           newest.data.tags["dataset_uri"], "--overrides", "tracking.experiment=e2e")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    served_code.write_bytes(as_logged + b"# changed since\n")
    challenged = in_process("register", "--params", TINY, "--model-uri", newest.data.tags["model_uri"],
                            "--overrides", "register.model_name=standalone tracking.experiment=e2e")
    assert challenged.returncode == 0, challenged.stderr[-3000:]
    assert "registered standalone v2: alias kept" in challenged.stdout, challenged.stdout[-3000:]
    assert (f"v1's model could not be scored on this one (model_uri: {model_uri} is served with other scoring code "
            f"than this process loaded (pipeline/serve.py differs") in challenged.stdout
    assert str(client.get_model_version_by_alias("standalone", "champion").version) == "1"
    assert client.search_runs([experiment], "tags.scores_champion = 'standalone/1'", run_view_type=ViewType.ALL) == []


# One refusal per place a command can fail before training: the params (every key: test_config.py),
# the model Keras would build, the data source. Each is a real `mlflow run` and its wrapper run.
@pytest.mark.parametrize(("entry", "params", "key"), [
    ("main", {"epochs": "0"}, "train.epochs"),
    ("train", {"overrides": "model.depth=164"}, "model.depth"),
    ("main", {"data": "/no/such/archive.tar.gz"}, "data.source"),
])
def test_bad_params_fail_fast_with_the_key_and_leave_nothing(store, entry, params, key):
    result = mlflow_run(store, entry, params=TINY, **params)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {key}"), result.stderr[-2000:]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    # The run `mlflow run` opened ended FAILED with the reason, and went to the trash.
    (refused,) = eventually(lambda: client.search_runs([experiment], run_view_type=ViewType.DELETED_ONLY))
    assert refused.info.status == "FAILED" and refused.data.tags["failure_reason"].startswith(key)
    assert client.search_runs([experiment]) == []  # no empty, randomly named run is left in the experiment
    assert client.search_registered_models() == []


# The inputs Keras has no part in are refused before it loads: in the seconds the interpreter and MLflow
# take, not after TensorFlow's import (~12 CPU-s here).
@pytest.mark.parametrize(("option", "value", "error"), [
    ("--data", "/no/such/archive.tar.gz", "error: data.source: '/no/such/archive.tar.gz' is neither"),
    ("--resume", "0123456789abcdef0123456789abcdef", "error: resume: no run '0123456789abcdef0123456789abcdef'"),
])
def test_wrong_data_or_run_to_resume_is_refused_before_keras_loads(store, option, value, error):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.main", "--params", TINY,
                             option, value], cwd=ROOT, env=store, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("error: ")][0].startswith(error), result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    assert {"mlflow", "pipeline.inputs"} <= imported  # the listing does show what was imported
    assert not {"keras", "tensorflow", "jax"} & imported
    client = MlflowClient()
    assert client.search_runs([client.get_experiment_by_name("e2e").experiment_id]) == []


@pytest.mark.parametrize(("overrides", "error"), [
    ("train.epoch=3", "error: train.epoch: unknown key"),
    ("train.validation_seed=-1", "error: train.validation_seed: must be in [0, 2**32), got -1"),
    ("train.validation_seed=first", "error: train.validation_seed: must be an integer, or null, got 'first'"),
], ids=["unknown-key", "negative-validation-seed", "validation-seed-word"])
def test_direct_module_call_with_bad_key_opens_no_run(store, in_process, overrides, error):
    result = in_process("train", "--params", TINY, "--overrides", overrides)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(error)
    client = MlflowClient()
    assert client.search_runs([client.get_experiment_by_name("e2e").experiment_id]) == []


@pytest.mark.parametrize("stop_in", ["read", "run"])
def test_a_prepare_stopped_says_whether_a_run_was_open(store, in_process, monkeypatch, stop_in):
    """SIGTERM (Ctrl-C under `mlflow run`) while prepare still read its source, before any run opened, said "open runs
    ended KILLED" all the same, sending the user looking for a run that was never made. It says none was open; once
    the prepare run is open, that it ended KILLED."""
    import signal

    from pipeline import prepare

    def stop(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(data, "load_source", stop) if stop_in == "read" else monkeypatch.setattr(
        steps, "log_prepared", stop)
    result = in_process("prepare", "--params", TINY)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ([] if stop_in == "read" else ["KILLED"])
    assert result.stderr.strip().splitlines()[-1] == ("error: interrupted by SIGTERM; no run was open."
                                                      if stop_in == "read" else
                                                      "error: interrupted by SIGTERM; open runs ended KILLED.")
    assert prepare._read == {}


def test_a_prepare_run_records_the_sha256_of_the_source_file(store, in_process, tmp_path):
    """The run recorded the digest of the arrays alone (`dataset_sha256`, which no one else can compute), not of the
    file read: which download of an archive a dataset came from could not be checked against its published sha256.
    Tag `source_sha256` and dataset.json's `source_sha256` hold the file's."""
    from tests.test_data import write_official

    archive = write_official(tmp_path)[0]
    result = in_process("prepare", "--params", TINY, "--data", str(archive))
    assert result.returncode == 0, result.stderr[-2000:]
    uri = result.stdout.strip().splitlines()[-1].removeprefix("dataset_uri=")
    run = MlflowClient().get_run(uri.removeprefix("runs:/").partition("/")[0])
    assert run.data.tags["source_sha256"] == data.file_sha256(archive)
    # the console named one sha256, the arrays', which a user compared with the archive's published one in vain
    assert (f"sha256 of the arrays {run.data.tags['dataset_sha256']}, of the file read {data.file_sha256(archive)}"
            in result.stdout)
    summary = json.loads(Path(mlflow.artifacts.download_artifacts(uri.replace("dataset.npz", "dataset.json"),
                                                                   dst_path=str(tmp_path / "got"))).read_text())
    assert summary["source_sha256"] == data.file_sha256(archive)


def test_train_validation_seed_alone_draws_the_held_out_images(store, in_process):
    """train.seed drew the held-out images too, so runs of other seeds were validated on other images (tag
    val_data_sha256); train.validation_seed, when set, draws them alone, and null keeps train.seed's draw of before."""
    from pipeline import config, prepare

    common = "tracking.experiment=e2e data.synthetic_train=256 train.validation_fraction=0.25"
    tags, params = {}, {}
    for seeds in ("train.seed=0", "train.seed=1 train.validation_seed=0", "train.seed=0 train.validation_seed=1"):
        done = in_process("train", "--params", TINY, "--epochs", "1", "--overrides", f"{common} {seeds} {ONE_STAGE}")
        assert done.returncode == 0, done.stderr[-3000:]
        client = MlflowClient()
        (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], max_results=1,
                                    order_by=["attributes.start_time DESC"])  # the one just trained
        tags[seeds] = run.data.tags["val_data_sha256"]
        params[seeds] = run.data.params["train.validation_seed"]
    assert params == {"train.seed=0": "null", "train.seed=1 train.validation_seed=0": "0",
                      "train.seed=0 train.validation_seed=1": "1"}
    dataset = prepare.build(config.load(TINY, common))
    expected = {}
    for seed in (0, 1):  # the draw as it always was: the first quarter of a permutation from the seed alone
        held_out = np.random.default_rng(seed).permutation(256)[:64]
        expected[seed] = data.arrays_digest([dataset.x_train[held_out], dataset.y_train[held_out]], dataset.class_names)
    assert tags["train.seed=0"] == expected[0]  # null: train.seed draws them, as before the key
    assert tags["train.seed=1 train.validation_seed=0"] == expected[0]  # another seed, the same images
    assert tags["train.seed=0 train.validation_seed=1"] == expected[1] != expected[0]  # validation_seed alone


def test_a_train_run_records_what_its_params_resolve_to(store, in_process):
    """train.lr_scaling linear trained at train.lr * batch / 128 while the run's description said train.lr (the run
    name said the other), and nothing recorded the warm-up's steps, the epochs the step schedule decays after or how
    many images were held out: each was worked out again by hand from the params and the data. Nor did anything say
    which params had no effect given the others (train.ema_momentum without train.ema): tag inert_params lists them,
    and a line on stderr names each set away from default.yaml's value."""
    from pipeline import fitting

    done = in_process("train", "--params", TINY, "--epochs", "2", "--overrides",
                      "tracking.experiment=e2e data.synthetic_train=256 train.validation_fraction=0.25 "
                      "train.lr_scaling=linear train.schedule=step train.lr_boundaries=[0.5] train.warmup=0.25 "
                      f"train.ema_momentum=0.5 {ONE_STAGE}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: train.ema_momentum 0.5 has no effect with train.ema false\n" in done.stderr
    assert "train.ema_bn_batches" not in done.stderr  # default.yaml's value: nobody chose it
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "tags.step = 'train'")
    tags, metrics = run.data.tags, run.data.metrics
    assert run.data.params["train.lr"] == "0.05" and tags["effective_lr"] == "0.0125"  # 0.05 * 32 / 128
    assert run.info.run_name.endswith("-lr0.0125") and "lr 0.0125 (train.lr 0.05" in tags["mlflow.note.content"]
    assert (metrics["train_images"], metrics["val_images"]) == (192, 64)  # a quarter of 256 held out
    assert tags["steps_per_epoch"] == "6"  # 192 / 32
    assert tags["warmup_steps"] == "3" and tags["lr_decay_epochs"] == "[1]"  # a quarter of 12 steps; half of 2 epochs
    assert tags["hardware"] == fitting.hardware()  # what its epoch_seconds and images_per_second were timed on
    assert json.loads(tags["inert_params"]) == {"train.ema_bn_batches": "train.ema false",
                                                "train.ema_momentum": "train.ema false"}
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert lrs[1] == pytest.approx(0.0125) and lrs[2] == pytest.approx(0.00125)  # the peak, then decayed after epoch 1


def test_a_step_run_says_whether_its_checkout_had_uncommitted_changes(store, tmp_path, monkeypatch):
    """Every step's run named its git commit, and a run of a checkout with an edit not committed named the same commit
    as one without: the commit did not give back the code that ran. Tag `git_dirty` says which."""
    import pipeline.tracking as tracking

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t"]
    (checkout / "train.py").write_text("lr = 0.1\n")
    for args in (["init", "-q"], ["add", "train.py"], ["commit", "-qm", "one"]):
        subprocess.run(git + args, check=True)
    monkeypatch.setattr(tracking, "PROJECT_ROOT", checkout)
    tags = {}
    for state in ("clean", "edited"):
        if state == "edited":
            (checkout / "train.py").write_text("lr = 0.2\n")
        for cached in (tracking.git_commit, tracking.git_dirty):
            cached.cache_clear()
        with tracking.open_run("prepare", experiment="e2e") as run:
            pass
        tags[state] = MlflowClient().get_run(run.info.run_id).data.tags
    tracking.git_commit.cache_clear()
    tracking.git_dirty.cache_clear()
    assert tags["clean"]["git_commit"] == tags["edited"]["git_commit"]
    assert (tags["clean"]["git_dirty"], tags["edited"]["git_dirty"]) == ("false", "true")


def test_asking_whether_tensorflow_is_installed_leaves_its_import_quiet():
    """A check of which backends are installed (`importlib.util.find_spec("tensorflow")`, before Keras loads) used
    up the package's quiet import: TensorFlow's own import then printed absl's notice and its cuda lines."""
    code = ("import importlib.util, pipeline; assert importlib.util.find_spec('tensorflow'); "
            "assert importlib.util.find_spec('tensorflow'); import tensorflow")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [noise for noise in KNOWN_NOISE if noise in done.stderr], done.stderr[-2000:]
