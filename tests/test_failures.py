"""Failing loudly and racing safely: divergence and bad params exit with the README's codes and leave no
run behind; concurrent starts on a fresh store and racing registers all finish, the alias on the best.
(Resuming after a kill, Ctrl-C or a dead server: test_fault_tolerance.py.)"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from bench.servers import free_port
from pipeline import config, evaluate, main, prepare, register, train
from pipeline.tracking import StepFailed, cli, registry, steps
from tests.conftest import ROOT, copy_store, eventually, http_stub, module_code
from tests.register_race import race, register_after_barrier, register_at_once
from tests.test_fault_tolerance import TINY, experiment_runs

# The smallest ResNet the params describe (one stage of one basic unit): for tests of what happens around training, a
# model that builds and trains in a fraction of the tiny profile's time.
SMALLEST_MODEL = "model.block=basic model.widths=[16] model.strides=[1]"


def interrupted(*args, **kwargs):
    """A stand-in for a step that Ctrl-C stops."""
    raise KeyboardInterrupt


def failed_main(in_process, epochs: str, overrides: str, code: int, error: str):
    """`main` on the tiny profile, which must exit `code` with `error` on its last line; the client and train run."""
    result = in_process("main", "--params", TINY, "--epochs", epochs,
                        "--overrides", f"{overrides} tracking.experiment=e2e")
    assert result.returncode == code, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {error}")
    client = MlflowClient()
    (run,) = experiment_runs(client, "tags.step = 'train'")
    return client, run


def test_divergence_fails_the_run_exits_3_and_registers_nothing(store, in_process):
    """The epoch that diverged logged (and printed) an acc and a val_acc of a model whose outputs are NaN, argmax
    reading each NaN row as class 0 ("val_acc: 0.0586 - val_loss: nan"): a real-looking accuracy of a diverged run in
    the UI and compare. They are NaN, as its loss."""
    client, run = failed_main(in_process, "2", f"train.lr=1e12 data.synthetic_train=256 {SMALLEST_MODEL}", 3,
                              "training diverged: loss became nan")
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["failure_reason"]
    assert all(math.isnan(run.data.metrics[key]) for key in ("loss", "acc", "val_loss", "val_acc")), run.data.metrics
    statuses = {r.data.tags.get("step"): r.info.status for r in experiment_runs(client)}
    assert statuses == {"prepare": "FINISHED", "train": "FAILED", "main": "FAILED"}, statuses
    (parent,) = experiment_runs(client, "tags.step = 'main'")
    assert parent.data.tags["failed_step"] == "train"
    assert client.search_registered_models() == []


def test_a_main_failing_in_a_middle_step_names_that_step_on_its_last_line_and_its_run(store, in_process, monkeypatch):
    """A main whose evaluate failed said only the evaluation's reason ("error: model_uri: ... gives NaN ..."), as an
    evaluate run on its own says it, and its run held no word of the step: which of the four failed was for the user to
    find among the child runs. The last line ends naming the step; the main run is tagged `failed_step`."""
    reason = "model_uri: models:/m-1 gives NaN or infinite probabilities for 3 of 10 test images"

    def nan(*args, **kwargs):
        raise StepFailed(reason)

    monkeypatch.setattr(evaluate, "run", nan)
    result = in_process("main", "--params", TINY, "--epochs", "1",
                        "--overrides", f"data.synthetic_train=256 {SMALLEST_MODEL} tracking.experiment=e2e")
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {reason} (main failed in its evaluate step)"
    runs = {r.data.tags["step"]: r for r in experiment_runs(MlflowClient())}
    assert {step: r.info.status for step, r in runs.items()} == {
        "prepare": "FINISHED", "train": "FINISHED", "evaluate": "FAILED", "main": "FAILED"}
    assert runs["main"].data.tags["failed_step"] == "evaluate"
    assert runs["main"].data.tags["failure_reason"] == runs["evaluate"].data.tags["failure_reason"] == reason
    assert all("failed_step" not in r.data.tags for step, r in runs.items() if step != "main")


def test_a_diverged_run_says_the_train_lr_it_was_given_and_the_one_lr_scaling_made_of_it(store, in_process):
    """With train.lr_scaling linear the advice named the scaled lr as train.lr's value ("Lower train.lr (now 5e+11)"
    for a train.lr of 1e12 at batch 64): the user's own value was nowhere, the one given seemed not to be read.
    Keras's TerminateOnNaN printed its own "Batch N: Invalid loss, terminating training" before that line: the
    error is said once, by train."""
    result = in_process("train", "--params", TINY, "--epochs", "2", "--overrides",
                        f"train.lr=1e12 train.lr_scaling=linear train.batch_size=64 data.synthetic_train=256 "
                        f"data.synthetic_test=32 {SMALLEST_MODEL} tracking.experiment=e2e")
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].endswith(
        "nothing was registered. Lower train.lr (now 1e+12: 5e+11 at batch 64 by train.lr_scaling linear) or check "
        "the data")
    assert "Invalid loss" not in result.stdout + result.stderr, result.stdout[-2000:]


def test_a_model_whose_validation_loss_is_nan_fails_the_run_and_logs_no_model(store, in_process):
    """With train.ema the averaged weights are validated, evaluated and served: at train.lr 150 the raw weights'
    loss stayed finite (2e17) while the averages validated to a NaN val_loss, and the run FINISHED, logging a model
    whose predictions are not numbers for main to evaluate and register. It ends as a diverged run does."""
    result = in_process("train", "--params", TINY, "--epochs", "2", "--overrides",
                        f"train.lr=150 train.ema=true data.synthetic_train=256 data.synthetic_test=32 "
                        f"{SMALLEST_MODEL} tracking.experiment=e2e")
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: training diverged: val_loss became nan in epoch ")
    (run,) = experiment_runs(MlflowClient(), "tags.step = 'train'")
    assert run.info.status == "FAILED" and "val_loss became nan" in run.data.tags["failure_reason"]
    assert math.isfinite(run.data.metrics["loss"]) and math.isnan(run.data.metrics["val_loss"])
    assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list") == []
    assert not (Path(os.environ["PIPELINE_CHECKPOINT_DIR"]) / run.info.run_id).exists()


def test_a_diverged_epoch_is_not_checkpointed_so_a_rerun_after_a_stop_diverges_again(store, in_process, monkeypatch):
    """A stop (Ctrl-C, a kill) after a last epoch that diverged, before its checkpoint was removed (while EMA
    recomputed BN statistics, or the run's end was logged), left that epoch's NaN weights checkpointed as a whole
    run: the rerun resumed it, trained no epoch, and FINISHED, exit 0, logging a model that predicts NaN. An epoch
    whose loss or val_loss is not finite is never checkpointed: the rerun trains again, diverges again, exit 3."""
    from mlflow.entities import RunStatus

    command = ["--params", TINY, "--epochs", "1", "--overrides",
               f"train.lr=1e12 data.synthetic_train=256 data.synthetic_test=32 {SMALLEST_MODEL} "
               f"tracking.experiment=e2e"]

    def ctrl_c(history):
        raise KeyboardInterrupt

    diverged = train.diverged
    monkeypatch.setattr(train, "diverged", ctrl_c)  # stopped as `fit` returned
    assert in_process("train", *command).returncode == 130
    monkeypatch.setattr(train, "diverged", diverged)
    again = in_process("train", *command)
    assert again.returncode == 3, again.stdout[-2000:] + again.stderr[-2000:]
    assert again.stderr.strip().splitlines()[-1].startswith("error: training diverged: loss became nan in epoch 1")
    runs = experiment_runs(MlflowClient(), "tags.step = 'train'")
    assert sorted(r.info.status for r in runs) == sorted([RunStatus.to_string(RunStatus.KILLED), "FAILED"])
    assert mlflow.search_logged_models(experiment_ids=[runs[0].info.experiment_id], output_format="list") == []


NO_SPACE = ("unexpected OSError: [Errno 28] No space left on device: '/checkpoints/epoch.weights.h5'; full traceback "
            "on the step's stderr (the console it ran in; `mlflow run` keeps no copy)")


def test_an_unexpected_error_ends_the_step_and_main_failed_with_its_reason_and_goes_on(store, monkeypatch):
    """An exception no step expects (a bug, a full disk, an error of TensorFlow) ended its runs FAILED with no
    `failure_reason`: nothing in the UI said why. The step's run and main's get its type and message, and the
    exception itself goes on out of `cli`, the very one, with its traceback (printed as Python prints it)."""
    import traceback

    full = OSError(28, "No space left on device", "/checkpoints/epoch.weights.h5")

    def no_space(*args, **kwargs):
        raise full

    monkeypatch.setattr(train, "fit", no_space)
    monkeypatch.setattr(sys, "argv", ["pipeline.main", "--params", TINY, "--epochs", "1",
                                      "--overrides", "tracking.experiment=e2e"])
    with pytest.raises(OSError) as raised:
        cli(main.main, resumable=True)
    assert raised.value is full and raised.value.__context__ is None  # neither replaced nor chained to another
    printed = "".join(traceback.format_exception(raised.value))
    assert "in no_space" in printed and printed.endswith(
        "OSError: [Errno 28] No space left on device: '/checkpoints/epoch.weights.h5'\n")
    client = MlflowClient()
    runs = {r.data.tags["step"]: r for r in experiment_runs(client)}
    assert {step: r.info.status for step, r in runs.items()} == {
        "prepare": "FINISHED", "train": "FAILED", "main": "FAILED"}
    assert runs["train"].data.tags["failure_reason"] == runs["main"].data.tags["failure_reason"] == NO_SPACE
    assert runs["main"].data.tags["failed_step"] == "train"  # where the traceback's last line does not say it
    assert "failure_reason" not in runs["prepare"].data.tags


def test_an_unexpected_errors_traceback_prints_on_the_steps_stderr_as_its_reason_says(store, tmp_path):
    """The reason's "full traceback on the step's stderr", in a step's process of its own (as `mlflow run` starts
    it: it keeps no copy, see pipeline/tracking): the traceback, exit 1, the run FAILED with that reason."""
    script = ("import os, pipeline.tracking as t\n"
              "def step():\n"
              "    with t.open_run('prepare', experiment='e2e'):\n"
              "        raise OSError(28, 'No space left on device', '/checkpoints/epoch.weights.h5')\n"
              "t.cli(step)\n")
    done = subprocess.run([sys.executable, "-c", script], env=store, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert "Traceback (most recent call last):" in lines and ", in step" in done.stderr
    assert lines[-1] == "OSError: [Errno 28] No space left on device: '/checkpoints/epoch.weights.h5'"
    (run,) = experiment_runs(MlflowClient())
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == NO_SPACE


def test_a_run_keeps_its_own_reason_and_an_interrupt_or_a_not_failure_gives_none(store):
    from pipeline.tracking import open_run, set_tags

    client = MlflowClient()
    with pytest.raises(ValueError, match="^bug$"), open_run("train", experiment="e2e") as own:
        set_tags({"failure_reason": "the step's own words"})
        raise ValueError("bug")
    with pytest.raises(KeyboardInterrupt), open_run("train", experiment="e2e") as interrupted:
        raise KeyboardInterrupt
    with pytest.raises(LookupError), open_run("train", experiment="e2e", not_failures=(LookupError,)) as pruned:
        raise KeyError("pruned")
    assert client.get_run(own.info.run_id).data.tags["failure_reason"] == "the step's own words"
    for run, status in ((interrupted, "KILLED"), (pruned, "FAILED")):
        ended = client.get_run(run.info.run_id)
        assert ended.info.status == status and "failure_reason" not in ended.data.tags, ended.data.tags


def test_a_failing_store_neither_replaces_the_error_nor_is_asked_again(store, monkeypatch):
    """The tracking store may be what failed: tagging the reason must not raise a second error over the first, and
    a store that failed once is not asked again for the runs around (a dead server takes 7 s a request)."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import open_run

    asked = []

    def store_fails(self, run_id, key, value, *args, **kwargs):
        asked.append(run_id)
        raise MlflowException("the tracking store went away")

    monkeypatch.setattr(MlflowClient, "set_tag", store_fails)
    for error in (OSError(28, "No space left on device"), MlflowException("the artifact store went away")):
        asked.clear()
        with (pytest.raises(type(error)) as raised, open_run("main", experiment="e2e") as parent,
              open_run("train") as child):
            raise error
        assert raised.value is error and error.__context__ is None
        assert asked == [child.info.run_id]  # the inner run alone: main's is not asked again
        assert MlflowClient().get_run(parent.info.run_id).info.status == "FAILED"


@pytest.mark.parametrize("step, resume", [("train", ""), ("evaluate", ""), ("register", ""), ("evaluate", "never")])
def test_a_server_lost_after_training_says_the_rerun_goes_on_from_the_trained_model(monkeypatch, capsys, step, resume):
    """A main whose server went away in evaluate or register (exit 4) said "Completed epochs, if any, are checkpointed
    under ...: rerun the same command to resume", of a train run that had finished and deleted its checkpoint. Its
    line says what the rerun does: evaluate and register the model it trained, without training again."""
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    mlflow.set_tracking_uri("http://127.0.0.1:1")
    monkeypatch.setattr(tracking, "ensure_store", lambda: None)
    monkeypatch.setattr(sys, "argv", ["pipeline.main"])

    rerun = "" if step == "train" else main.rerun_after_training(resume, "r1")  # as main.run gives it

    def failing():
        with tracking.failing_step(step, rerun=rerun):
            raise MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/get failed with exception "
                                  "HTTPConnectionPool: Max retries exceeded ([Errno 111] Connection refused)")

    try:
        with pytest.raises(SystemExit) as stopped:
            tracking.cli(failing, resumable=True)
    finally:
        mlflow.set_tracking_uri(None)
    assert stopped.value.code == 4
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: tracking server http://127.0.0.1:1 failed: no answer (Connection refused) "
                           f"(main failed in its {step} step).")
    if step == "train":
        assert line.endswith(": rerun the same command to resume."), line
    else:
        how = "the same command without resume" if resume else "the same command"
        assert line.endswith(f" The model is trained (train run r1): rerun {how} to evaluate and register it, without "
                             "training it again."), line


def test_a_server_unreachable_at_the_start_says_nothing_ran_not_that_epochs_are_checkpointed(monkeypatch, capsys):
    """A main or train whose tracking server did not answer at its start (a typo, a server not up yet) said
    "Completed epochs, if any, are checkpointed under ...: rerun the same command to resume": nothing had run. The
    line says that nothing ran, and to rerun once the server answers."""
    from pipeline import tracking

    uri = f"http://127.0.0.1:{free_port()}"
    mlflow.set_tracking_uri(uri)
    ran = []
    try:
        with pytest.raises(SystemExit) as stopped:
            tracking.cli(lambda: ran.append(1), resumable=True)
    finally:
        mlflow.set_tracking_uri(None)
    assert stopped.value.code == 4 and ran == []
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: tracking server {uri} failed: no answer (Connection refused); nothing ran: rerun the same "
                    "command once it answers"), line


def test_the_run_mlflow_run_opened_gets_the_reason_of_a_failure_before_the_steps_run(store, monkeypatch):
    """Under `mlflow run` (MLFLOW_RUN_ID), an error raised before the step's own run opened (a prepare ahead of
    `mlflow run . -e train`'s run, in a run of its own) left the run `mlflow run` ends FAILED without a reason."""
    client = MlflowClient()
    wrapper = client.create_run(client.get_experiment_by_name("e2e").experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", wrapper)

    def bug():
        return {}["missing"]

    with pytest.raises(KeyError):
        cli(bug)
    assert client.get_run(wrapper).data.tags["failure_reason"] == (
        "unexpected KeyError: 'missing'; full traceback on the step's stderr (the console it ran in; `mlflow run` "
        "keeps no copy)")


def test_a_refusal_quoting_a_long_value_still_ends_the_run_mlflow_run_opened(store, in_process, monkeypatch,
                                                                             tmp_path):
    """A bad param is refused with its value quoted: a value of thousands of characters (in a params file: overrides
    are refused past 6,000) made the `failure_reason` of the run `mlflow run` opened longer than MLflow's
    8,000-character tag limit. MLflow cut it there with a warning, or refused it (MLFLOW_TRUNCATE_LONG_VALUES=false, a
    store that enforces its column), and the run was then neither tagged nor trashed. The reason is cut at 5,000
    characters, with an ellipsis, as every run's is."""
    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")
    client = MlflowClient()
    wrapper = client.create_run(client.get_experiment_by_name("e2e").experiment_id).info.run_id
    settled = []
    monkeypatch.setattr(tracking, "_settle_wrapper_run", lambda *args, **kwargs: settled.append((args, kwargs)))
    (tmp_path / "long.yaml").write_text(f"tracking:\n  experiment: {'e' * 9000}\n")
    refused = in_process("prepare", "--params", str(tmp_path / "long.yaml"), env={"MLFLOW_RUN_ID": wrapper})
    assert refused.returncode == 2 and refused.stderr.startswith("error: tracking.experiment: must be at most 256")
    reason = client.get_run(wrapper).data.tags["failure_reason"]
    assert len(reason) == 5000 and reason.endswith("eee…") and refused.stderr[len("error: "):].startswith(reason[:-1])
    assert settled == [((wrapper, "FAILED"), {"delete": True})]


def test_the_help_asked_through_mlflow_run_leaves_no_run(store, in_process, monkeypatch):
    """`mlflow run . -e compare -P help=1` (a way to see the parameters) reaches the step as `--help 1`: argparse
    printed the help and exited 0, and `mlflow run` left its run FINISHED in the experiment, empty but for the -P
    values. It goes to the trash; a step's own exit 0 (nothing asked of the help) leaves it as it is."""
    from pipeline import tracking

    client = MlflowClient()
    wrapper = client.create_run(client.get_experiment_by_name("e2e").experiment_id).info.run_id
    settled = []
    monkeypatch.setattr(tracking, "_settle_wrapper_run", lambda *args, **kwargs: settled.append((args, kwargs)))
    shown = in_process("compare", "--help", "1", env={"MLFLOW_RUN_ID": wrapper})
    assert shown.returncode == 0 and shown.stdout.startswith("usage: ")
    assert settled == [((wrapper, "FINISHED"), {"delete": True})]
    settled.clear()
    assert in_process("compare", "--metric", "nope", env={"MLFLOW_RUN_ID": wrapper}).returncode == 2  # refused
    assert settled == [((wrapper, "FAILED"), {"delete": True})]


@pytest.mark.parametrize(("message", "line"), [
    # TensorFlow's: the node's error last, after the stack it was defined at, then its annotations
    ("Graph execution error:\n\nDetected at node compile_loss/SparseSoftmaxCrossEntropyWithLogits defined at (most "
     "recent call last):\n  File \"<string>\", line 6, in <module>\n\nReceived a label value of 7 which is outside the "
     "valid range of [0, 3).  Label values: 7 7\n\t [[{{node compile_loss/SparseSoftmaxCrossEntropyWithLogits}}]] "
     "[Op:__inference_multi_step_on_iterator_209]",
     "Received a label value of 7 which is outside the valid range of [0, 3). Label values: 7 7"),
    ("Graph execution error:\n\nOOM when allocating tensor with shape[1024,64,32,32]\n\t [[{{node conv}}]]\nHint: If "
     "you want to see a list of allocated tensors when OOM happens, add report_tensor_allocations_upon_oom to "
     "RunOptions.\n [Op:__inference_train_function_5]", "OOM when allocating tensor with shape[1024,64,32,32]"),
    # Keras's, the arguments of the layer's call after the error
    ("Exception encountered when calling Dense.call().\n\nInput 0 is incompatible: expected axis -1 of 4, got 5\n\n"
     "Arguments received by Dense.call():\n  • inputs=tf.Tensor(shape=(8, 5), dtype=float32)",
     "Input 0 is incompatible: expected axis -1 of 4, got 5"),
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4294967296 bytes.",
     "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4294967296 bytes."),
    ("", ""), ("x" * 400, "x" * 297 + "..."),
])
def test_the_reason_is_the_last_meaningful_line_of_the_message(message, line):
    from pipeline.tracking import failure_line, unexpected_reason

    assert failure_line(RuntimeError(message)) == line
    assert unexpected_reason(RuntimeError(message)).startswith(f"unexpected RuntimeError{': ' + line if line else ''};")
    assert len(unexpected_reason(RuntimeError(message))) <= 420


@pytest.mark.parametrize(("overrides", "error"), [
    ("train.batch_size=4096 train.drop_remainder=true", "train.drop_remainder: the 1024 training images make no whole"),
    ("data.max_train=1 train.validation_fraction=0.5", "train.validation_fraction: holding out 1 of the 1 training "
                                                       "images leaves none"),
    ("data.max_train=100 train.validation_fraction=0.1 train.drop_remainder=true train.batch_size=128",
     "train.drop_remainder: the 90 training images make no whole batch of train.batch_size 128"),
])
def test_too_few_images_to_hold_out_or_batch_are_refused_before_any_run(store, capsys, monkeypatch, overrides, error):
    """Holding out the only training image left none (the model trained on nothing, scored at chance and took
    @champion); a batch larger than the training set with `train.drop_remainder` made no step. For cifar10 and
    synthetic data the count is known from the params: refused before prepare or any run (it was refused only
    inside the train run, after CIFAR-10 was downloaded and prepared); for a path, the train step refuses it (or, at
    data.max_train, the command: the next test)."""
    monkeypatch.setattr(sys, "argv", ["pipeline.main", "--params", TINY, "--epochs", "1", "--overrides", overrides])
    with pytest.raises(SystemExit) as exit_info:
        cli(main.main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {error}")
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()],
                              run_view_type=ViewType.ALL) == []
    from pipeline import fitting  # the train step's own check, for data whose count only reading it tells

    cfg = config.load(TINY, overrides)
    with pytest.raises(config.ConfigError, match=f"^{error.split(': ', 1)[0]}"):
        dataset = prepare.build(cfg)
        splits = fitting.held_out_split(dataset, cfg.train)
        fitting.steps_per_epoch(cfg.train, len(splits[0]))


def test_too_few_cifar10_images_for_the_params_are_refused_before_cifar10_is_looked_up(store, capsys, monkeypatch):
    """The count follows from the params alone, but the command first made sure CIFAR-10 was at hand: with no archive
    in the Keras cache it downloaded 170 MB and only then refused the params (offline it said the download failed,
    not what was wrong with the params)."""
    from pipeline import data

    looked_up = []
    monkeypatch.setattr(data, "fetch_cifar10", lambda: looked_up.append("fetch_cifar10") or "/no/download")
    monkeypatch.setattr(sys, "argv", ["pipeline.main", "--params", TINY, "--data", "cifar10", "--epochs", "1",
                                      "--overrides", "data.max_train=1 train.validation_fraction=0.5"])
    with pytest.raises(SystemExit) as exit_info:
        cli(main.main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: train.validation_fraction: holding out 1 of the 1 training images leaves none")
    assert looked_up == []
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()],
                              run_view_type=ViewType.ALL) == []


def test_params_this_backend_cannot_train_are_refused_before_cifar10_is_looked_up(store, capsys, monkeypatch):
    """`main` checks the backend's params (train.feed device on TensorFlow) before any run opens, but after it made
    sure CIFAR-10 was at hand: with no archive cached it downloaded 170 MB first (offline it said the download
    failed, not what was wrong with the params)."""
    from pipeline import data

    looked_up = []
    monkeypatch.setattr(data, "fetch_cifar10", lambda: looked_up.append("fetch_cifar10") or "/no/download")
    monkeypatch.setattr(sys, "argv", ["pipeline.main", "--params", TINY, "--data", "cifar10",
                                      "--overrides", "train.feed=device"])  # the test process runs TensorFlow
    with pytest.raises(SystemExit) as exit_info:
        cli(main.main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: train.feed: 'device' needs the JAX backend, not tensorflow")
    assert looked_up == []


def test_too_few_images_of_a_path_at_data_max_train_are_refused_before_any_run(store, capsys, monkeypatch, tmp_path):
    """A path's image count is known only once it is read, but data.max_train bounds it: too few at the bound was
    refused only in the train run, after prepare had read and stored the data."""
    (tmp_path / "images.tar.gz").write_bytes(b"not read: refused before")
    monkeypatch.setattr(sys, "argv", ["pipeline.main", "--params", TINY, "--data", str(tmp_path / "images.tar.gz"),
                                      "--overrides", "data.max_train=100 train.drop_remainder=true "
                                                     "train.batch_size=128"])
    with pytest.raises(SystemExit) as exit_info:
        cli(main.main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: train.drop_remainder: the 100 training images make no whole batch of train.batch_size 128; lower "
        f"the batch size or set train.drop_remainder=false (data.max_train=100: {tmp_path}/images.tar.gz gives at "
        f"most that many)")
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()],
                              run_view_type=ViewType.ALL) == []


def test_too_few_images_of_a_path_prepared_before_are_refused_before_any_run(store, in_process, tmp_path):
    """A path's image count is known once a prepare run has read it (its metric train_images): each retry of a
    command its params refuse (another batch size, another validation_fraction) opened a train run and left it
    FAILED, prepared dataset reused or named by -P dataset_uri. Now refused before any run opens, as for cifar10."""
    from pipeline import data

    path = tmp_path / "d.npz"
    data.make_synthetic(n_train=100, n_test=20, seed=0).save(path)
    assert in_process("prepare", "--params", TINY, "--data", str(path)).returncode == 0
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    (prepared,) = client.search_runs(experiments, run_view_type=ViewType.ALL)
    uri = f"runs:/{prepared.info.run_id}/{steps.DATASET_ARTIFACT}"
    error = ("error: train.drop_remainder: the 50 training images make no whole batch of train.batch_size 64; lower "
             "the batch size or set train.drop_remainder=false")
    overrides = "train.validation_fraction=0.5 train.drop_remainder=true train.batch_size=64"
    for module, source in (("train", ["--data", str(path)]), ("main", ["--data", str(path)]),
                           ("train", ["--dataset-uri", uri])):
        result = in_process(module, "--params", TINY, *source, "--overrides", overrides)
        assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (2, error), (module, source)
    assert [r.info.run_id for r in client.search_runs(experiments, run_view_type=ViewType.ALL)] == [
        prepared.info.run_id]
    result = in_process("train", "--params", TINY, "--data", str(path), "--overrides",
                        "train.validation_fraction=0.995")
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (2, (
        "error: train.validation_fraction: holding out 100 of the 100 training images leaves none to train on; "
        "lower it, or train on more (data.max_train)"))


def test_too_few_images_of_a_path_are_refused_before_the_train_run_once_prepared(store, in_process, tmp_path):
    """The first try on a path: prepare reads it (a dataset the next command reuses), then the count refuses the
    params before the train run opens; it opened and was left FAILED."""
    from pipeline import data

    path = tmp_path / "d.npz"
    data.make_synthetic(n_train=100, n_test=20, seed=0).save(path)
    result = in_process("train", "--params", TINY, "--data", str(path), "--overrides",
                        "train.drop_remainder=true train.batch_size=128")
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (2, (
        "error: train.drop_remainder: the 100 training images make no whole batch of train.batch_size 128; lower "
        "the batch size or set train.drop_remainder=false"))
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], run_view_type=ViewType.ALL)
    assert [(r.data.tags.get("step"), r.info.status) for r in runs] == [("prepare", "FINISHED")]


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
    (train, ["--dataset-uri", "params/tiny.yaml"], "dataset_uri"),  # a file no prepare step wrote
    (train, ["--dataset-uri", "runs:/0123456789abcdef/dataset/dataset.json"], "dataset_uri"),  # not the .npz
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


def test_cifar10_out_of_reach_is_one_line_before_any_run(store, in_process, monkeypatch, tmp_path):
    """Offline with no archive in the Keras cache, the default source failed inside prepare: `mlflow run .` left a main
    and a prepare run FAILED in the store, where a missing data path is refused before any run opens. A dataset
    prepared from it before is still reused offline."""
    from pipeline import data, inputs
    from tests.test_data import write_official

    offline = "data.source: cannot download CIFAR-10 (Name or service not known)"

    def unreachable():
        raise data.DataError(offline)

    monkeypatch.setattr(data, "fetch_cifar10", unreachable)
    for module in ("main", "prepare"):
        done = in_process(module, "--params", TINY, "--data", "cifar10")
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == f"error: {offline}"
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()],
                              run_view_type=ViewType.ALL) == []

    archive, _, _ = write_official(tmp_path / "made")
    monkeypatch.setattr(data, "fetch_cifar10", lambda: archive)
    assert in_process("prepare", "--params", TINY, "--data", "cifar10").returncode == 0
    monkeypatch.setattr(data, "fetch_cifar10", unreachable)
    cfg = config.load(TINY, "data.source=cifar10")
    assert inputs.check_inputs(cfg, resume="never") == (cfg, "")



def test_data_that_cannot_be_read_is_one_line_before_any_run(store, in_process, tmp_path):
    """A corrupt image (or any data refused as it is read) failed inside prepare: `python -m pipeline.prepare` left a
    prepare run FAILED, `python -m pipeline.main` a main and a prepare run, as a missing path leaves none. The data
    is read before any run opens, once: the run prepares what was read."""
    from tests.test_data import write_image_folder

    folder = tmp_path / "images"
    write_image_folder(folder)
    (folder / "train" / "dog" / "1.png").write_bytes(b"not an image")
    for module in ("main", "prepare"):
        done = in_process(module, "--params", TINY, "--data", str(folder))
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith(f"error: {folder}:train/dog/1.png: not a decodable")
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()],
                              run_view_type=ViewType.ALL) == []


def test_data_that_changes_while_it_is_read_is_refused_not_prepared_under_the_key_of_before(monkeypatch, tmp_path):
    """A folder still being copied in (rsync, cp -r) as prepare read it was prepared half-copied, under the prepare key
    of what it held when the command started: refused, naming it, where its digest after the read differs."""
    from pipeline import data
    from tests.test_data import write_image_folder

    folder = tmp_path / "images"
    write_image_folder(folder)
    real = data.load_image_folder

    def copied_meanwhile(path):  # noqa: ANN001, ANN202 - load_image_folder's signature
        read = real(path)
        shutil.copy(folder / "train" / "cat" / "0.jpg", folder / "train" / "cat" / "9.jpg")
        return read

    monkeypatch.setattr(data, "load_image_folder", copied_meanwhile)
    cfg = config.load(TINY, f"data.source={folder}")
    with pytest.raises(data.DataError, match=f"^{folder}: changed while it was read"):
        prepare.read_source(cfg)
    monkeypatch.setattr(data, "load_image_folder", real)
    assert prepare.read_source(cfg) == prepare.prepare_key(cfg)


@pytest.mark.parametrize("module", ["main", "compare"])
def test_help_needs_no_tracking_store(tmp_path, monkeypatch, in_process, module):
    """`python -m pipeline.<step> --help` made `mlflow.db` in the working directory (the store was created before
    the arguments were read), and with MLFLOW_TRACKING_URI naming a server that does not answer it exited 4. Run in
    this process (`in_process`: `cli` as the module's `python -m` runs it), from an empty working directory."""
    from tests.conftest import free_port

    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "PIPELINE_"))]:
        monkeypatch.delenv(key)
    mlflow.set_tracking_uri(None)  # as in a process of its own: no store set, MLflow's default in the working directory
    monkeypatch.chdir(tmp_path)
    # an abbreviation is no option (`config._Parser`): `--hel` is refused in one line, before any store is made
    for uri, asked in ((None, "--help"), (f"http://127.0.0.1:{free_port()}", "--help"), (None, "--hel")):
        if uri:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        else:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        shown = in_process(module, asked)
        if asked == "--hel":
            assert shown.returncode == 2 and len(shown.stderr.strip().splitlines()) == 1, shown.stderr
            assert shown.stderr.startswith("error: arguments: unrecognized arguments: --hel; did you mean --help? "
                                           "(known: --")
        else:
            assert shown.returncode == 0, (uri, shown.stderr[-2000:])
            assert shown.stdout.startswith("usage: ") and ("--overrides" in shown.stdout or "--metric" in shown.stdout)
        assert list(tmp_path.iterdir()) == [], (uri, list(tmp_path.iterdir()))


def test_an_experiment_in_the_trash_is_one_line_naming_the_key(store, capsys, monkeypatch):
    """MLflow refuses to reuse a deleted experiment's name: `tracking.experiment` naming one was a traceback."""
    client = MlflowClient()
    client.delete_experiment(client.create_experiment("binned"))
    monkeypatch.setattr(sys, "argv", ["pipeline.main", "--params", TINY, "--overrides", "tracking.experiment=binned"])
    with pytest.raises(SystemExit) as exit_info:
        cli(main.main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: tracking.experiment: 'binned' is in MLflow's trash; restore it (mlflow experiments restore")
    assert client.search_runs([e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)],
                              run_view_type=ViewType.ALL) == []


@pytest.mark.parametrize("where", ["in place of the folder", "above it"])
def test_an_experiment_whose_artifact_folder_cannot_be_written_is_one_line_and_leaves_no_run(
        store, tmp_path, in_process, where):
    """An experiment whose artifact location is a path a file sits in (or above): prepare died on MLflow's
    NotADirectoryError traceback, exit 1, as it logged the dataset, leaving a FAILED run holding nothing (and under
    `mlflow run`, the run it opened too). Now one line naming the folder, exit 2, before any run opens; the run
    `mlflow run` opened goes to the trash, as for a bad param."""
    from bench.servers import server_run_command

    client = MlflowClient()
    (tmp_path / "a file").write_text("not a folder")
    location = tmp_path / "a file" / ("" if where == "in place of the folder" else "artifacts")
    client.create_experiment("blocked", artifact_location=str(location).rstrip("/"))
    expected = (f"error: tracking.experiment: experiment 'blocked' keeps its artifacts in {str(location).rstrip('/')},"
                f" where this user cannot write: {tmp_path / 'a file'} is a file, not a folder; ")
    refused = in_process("prepare", "--params", TINY, "--overrides", "tracking.experiment=blocked")
    command, _ = server_run_command("", "blocked", "prepare", {"params": TINY})
    under_mlflow_run = subprocess.run(command, env=store, capture_output=True, text=True, timeout=600)
    for result in (refused, under_mlflow_run):
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert len(errors) == 1 and errors[0].startswith(expected), result.stderr[-3000:]
    assert refused.returncode == 2
    experiment_id = client.get_experiment_by_name("blocked").experiment_id
    # the one `mlflow run` opened goes to the trash, FAILED, once `mlflow run` has exited
    (opened,) = eventually(lambda: client.search_runs([experiment_id], run_view_type=ViewType.DELETED_ONLY))
    assert opened.info.status == "FAILED" and client.search_runs([experiment_id]) == []


def test_a_run_without_a_checkpoint_or_a_dataset_without_its_summary_is_refused_before_a_run_opens(store, tmp_path):
    """resume=<id> of a train run that left no checkpoint (a finished one) was refused only inside main's run,
    after Keras loaded; a local dataset whose dataset.json is not prepare's raised a traceback."""
    from pipeline import data, inputs

    cfg = config.load(TINY)
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    with mlflow.start_run(experiment_id=experiment_id) as finished:  # a train run as train logs one
        mlflow.log_params({**cfg.flat(), "dataset_uri": "runs:/0123456789abcdef/dataset/dataset.npz"})
        mlflow.set_tag("step", "train")
    with pytest.raises(config.ConfigError, match=f"^resume: run {finished.info.run_id} finished \\(FINISHED\\), and "
                                                 f"a run deletes its checkpoint"):
        inputs.check_inputs(cfg, resume=finished.info.run_id)
    (tmp_path / "dataset.npz").write_bytes(b"")
    for summary in ("{not json", '["a list"]'):
        (tmp_path / "dataset.json").write_text(summary)
        with pytest.raises(data.DataError, match=r"^dataset_uri: .*dataset.json beside the dataset is not prepare's"):
            inputs.check_inputs(cfg, resume="", dataset_uri=str(tmp_path / "dataset.npz"))
    assert len(MlflowClient().search_runs([experiment_id])) == 1  # the stand-in alone: none opened

def test_a_file_uri_of_a_dataset_in_a_folder_with_a_space_and_an_accent_is_read(store, tmp_path, monkeypatch,
                                                                                  empty_store_db, in_process):
    """An artifact root in a folder whose name has a space or a non-ASCII letter: MLflow gives the prepare run's
    dataset as `file:///.../d%C3%ADr%20x/.../dataset.npz`, and `-P dataset_uri=` that URI was refused ("no file"),
    though MLflow reads it; its dataset.json, its bytes' sha256 and the resume check read the unquoted path too."""
    import hashlib

    from pipeline import data

    folder = tmp_path / "dír with space"
    folder.mkdir()
    copy_store(empty_store_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(folder / "checkpoints"))
    client = MlflowClient()
    client.create_experiment("e2e", artifact_location=(folder / "artifacts").as_uri())  # as MLflow spells its root
    overrides = f"tracking.experiment=e2e data.synthetic_train=256 data.synthetic_test=64 {SMALLEST_MODEL}"
    assert in_process("prepare", "--params", TINY, "--overrides", overrides).returncode == 0
    (prepare_run,) = experiment_runs(client, "tags.step = 'prepare'")
    dataset_uri = f"{prepare_run.info.artifact_uri}/{steps.DATASET_ARTIFACT}"
    assert dataset_uri.startswith("file:///") and "d%C3%ADr%20with%20space" in dataset_uri
    path = folder / "artifacts" / prepare_run.info.run_id / "artifacts" / steps.DATASET_ARTIFACT
    summary = json.loads(path.with_name("dataset.json").read_text())["sha256"]  # the note's, for a local file

    command = ["--params", TINY, "--epochs", "1", "--dataset-uri", dataset_uri, "--overrides", overrides]
    trained = in_process("train", *command)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = experiment_runs(client, "tags.step = 'train'")
    assert run.data.params["data.synthetic_train"] == "256"  # from the dataset.json beside it
    assert run.data.tags["dataset_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"sha256 `{summary}`" in run.data.tags["mlflow.note.content"]

    data.make_synthetic(n_train=256, n_test=64, seed=1).save(path)  # another dataset, written to the same path
    refused = in_process("train", *command, "--resume", run.info.run_id)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"error: dataset_uri: {dataset_uri} holds other bytes than train run {run.info.run_id} trained on")

    monkeypatch.chdir(folder)  # main, run from that folder, on that store: every step, the model registered
    done = in_process("main", "--params", str(ROOT / TINY), "--epochs", "1", "--overrides",
                      f"{overrides.replace('=64', '=32')} register.model_name=spaced")
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(client.get_model_version_by_alias("spaced", "champion").version) == "1"


def test_a_dataset_path_with_a_percent_sign_in_a_folder_name_is_that_path(store, tmp_path, in_process):
    """`-P dataset_uri=PATH` in a folder named `100%25 a%20b` passed the check that the file exists, then MLflow, asked
    to download it, unquoted the plain path and read `100% a b` ("cannot read ...: No such artifact")."""
    from pipeline import data

    overrides = f"tracking.experiment=e2e data.synthetic_train=256 data.synthetic_test=64 {SMALLEST_MODEL}"
    path = tmp_path / "100%25 a%20b" / "dataset.npz"
    path.parent.mkdir()
    data.make_synthetic(n_train=256, n_test=64, seed=0).save(path)  # as prepare writes it: the file, dataset.json
    (path.parent / "dataset.json").write_text(json.dumps({"params": config.load(ROOT / TINY, overrides).flat("data")}))
    trained = in_process("train", "--params", TINY, "--epochs", "1", "--dataset-uri", str(path), "--overrides",
                         overrides)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run,) = experiment_runs(MlflowClient(), "tags.step = 'train'")
    assert run.data.tags["dataset_uri"] == str(path)


def test_a_prepare_runs_dataset_read_leaves_no_copy_in_the_temporary_folder(store, tmp_path, in_process, monkeypatch):
    """Every train and evaluate of a `runs:/<id>/dataset/dataset.npz` left MLflow's download of the file in a folder of
    its own under /tmp, never removed: 184 MB each for CIFAR-10, a copy per trial of a sweep. Read, it is gone."""
    import tempfile

    from pipeline.tracking.resume import dataset_sha256

    prepared = in_process("prepare", "--params", TINY, "--overrides", "tracking.experiment=e2e")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    dataset_uri = prepared.stdout.splitlines()[-1].removeprefix("dataset_uri=")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    dataset = prepare.load_dataset(dataset_uri)
    assert len(dataset.x_train) == 1024 and len(dataset.x_test) == 256  # params/tiny.yaml's
    assert len(dataset_sha256(dataset_uri)) == 64
    assert list((tmp_path / "tmp").rglob("*")) == []


def test_a_step_freezes_its_objects_out_of_the_collections_at_exit(tmp_path):
    """The interpreter's final collections over Keras's objects add ~4 s to every step and free nothing
    the OS does not reclaim: `cli` freezes what is alive at exit (gc.freeze), after the handlers of the step.
    MLflow's objects alone are hundreds of thousands: this step's process leaves Keras unloaded (~5 CPU-s less)."""
    script = ("import atexit, gc\n"
              "atexit.register(lambda: print('frozen at exit', gc.get_freeze_count()))  # first in, runs last\n"
              "from pipeline.tracking import cli\n"
              "cli(lambda: print('frozen in the step', gc.get_freeze_count()))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines() if line.startswith("frozen"))
    assert counts["frozen in the step"] == "0"  # nothing is frozen while the step runs
    assert int(counts["frozen at exit"]) > 100_000  # MLflow and what it loads: ~300,000 (with Keras ~600,000)


def test_three_runs_started_together_on_a_fresh_store_all_finish(tmp_path, launcher):
    """Three `main` commands at once on a store that does not exist yet: each creates it first (`cli`, under the
    store's file lock, as `python -m pipeline.tracking` does for the README's first command, whose `mlflow run`
    then finds it made), then creates the experiment, prepares, trains and registers alongside the others. Each
    is a process of its own, as the README's are (conftest's `launcher`); `mlflow run` around them adds no first use of
    the store."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PIPELINE_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}  # the README runs it from the project folder
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    lrs = ["0.02", "0.05", "0.1"]
    small = f"data.synthetic_train=256 data.synthetic_test=64 {SMALLEST_MODEL}"  # the start and registers race
    procs = [launcher.start(env, module_code("pipeline.main", ["--params", str(ROOT / TINY), "--epochs", "1",
                                                             "--overrides", f"train.lr={lr} train.seed={i} {small}"]),
                          cwd=tmp_path)
             for i, lr in enumerate(lrs)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    assert experiment.name == config.load(TINY).tracking.experiment  # one, though all three created it at once
    runs = client.search_runs([experiment.experiment_id])
    steps_run = [r.data.tags["step"] for r in runs]
    assert all(r.info.status == "FINISHED" for r in runs), steps_run
    # an identical finished prepare is reused: one to three prepares, as they overlapped
    assert {step: steps_run.count(step) for step in ("main", "train", "evaluate", "register")} == dict.fromkeys(
        ("main", "train", "evaluate", "register"), 3) and 1 <= steps_run.count("prepare") <= 3, steps_run
    train_runs = [r for r in runs if r.data.tags["step"] == "train"]
    assert sorted(r.data.params["train.lr"] for r in train_runs) == sorted(lrs)
    versions = client.search_model_versions("name = 'cifar10-resnet'")
    assert len(versions) == 3
    best = max(versions, key=lambda v: float(v.tags["test_acc"]))
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == str(best.version)


def test_a_main_that_lost_the_race_to_create_its_experiment_runs_in_it(store, monkeypatch):
    """Mains started together on a store without their experiment each look for it, find none and create it: MLflow's
    `set_experiment` whose insert the database refused as the other's duplicate returned that experiment without
    making it the active one, so this main's runs (and its steps') went to the Default experiment, all of them
    FINISHED, exit 0 (one of the three mains of
    `test_three_runs_started_together_on_a_fresh_store_all_finish` was missing from its experiment). Now they run in
    `tracking.experiment`, as the winner's do."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from pipeline.tracking import open_run

    real, created = SqlAlchemyStore.create_experiment, []

    def racing(self, name, *args, **kwargs):
        created.append(real(self, name, *args, **kwargs))  # the other main's, between this one's look and its insert
        return real(self, name, *args, **kwargs)  # refused: RESOURCE_ALREADY_EXISTS

    monkeypatch.setattr(SqlAlchemyStore, "create_experiment", racing)
    with open_run("main", experiment="raced") as run:
        pass
    assert len(created) == 1
    assert run.info.experiment_id == created[0] != MlflowClient().get_experiment_by_name("Default").experiment_id


def test_two_prepares_that_insert_the_same_dataset_at_once_both_log_it(store, monkeypatch):
    """Two prepares of the same data at once: MLflow checks for the dataset row, finds none, inserts it; the other
    process's insert landing in between failed this one on the table's unique key (`UNIQUE constraint failed:
    datasets.experiment_id, datasets.name, datasets.digest`, exit 1, as three mains started together on CI met).
    Now the insert, rolled back whole, is tried again: it finds the other's row and links it."""
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    cfg = config.load(TINY, ["data.synthetic_train=64", "data.synthetic_test=16"])
    dataset = prepare.build(cfg)
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    other = MlflowClient().create_run(experiment_id).info.run_id
    real, calls = SqlAlchemyStore._log_inputs_impl, []

    def racing(self, experiment_id, run_id, dataset_inputs=None, models=None):
        calls.append(run_id)
        if len(calls) == 1:  # the other prepare's insert lands between this one's check and its insert
            real(self, experiment_id, other, dataset_inputs, models)
            unique = sqlalchemy.exc.IntegrityError(
                "INSERT INTO datasets (dataset_uuid, experiment_id, name, digest) VALUES (?, ?, ?, ?)", (),
                Exception("UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest"))
            raise MlflowException(unique) from unique  # as MLflow's session raises it
        return real(self, experiment_id, run_id, dataset_inputs, models)

    monkeypatch.setattr(SqlAlchemyStore, "_log_inputs_impl", racing)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        steps.log_prepared(cfg, dataset, dataset.digest(), "its key", 0)
    assert calls == [run.info.run_id, run.info.run_id]
    inputs = [MlflowClient().get_run(i).inputs.dataset_inputs for i in (run.info.run_id, other)]
    assert [[found.dataset.digest for found in logged] for logged in inputs] == [[dataset.digest()[:32]]] * 2

    calls.clear()  # any other failure of the insert is not tried again
    monkeypatch.setattr(SqlAlchemyStore, "_log_inputs_impl", lambda *args, **kwargs: (calls.append(1), 1 / 0))
    with mlflow.start_run(experiment_id=experiment_id), pytest.raises(MlflowException):
        steps.log_prepared(cfg, dataset, dataset.digest(), "its key", 0)
    assert calls == [1]


def test_a_dataset_insert_the_team_server_refuses_as_a_duplicate_is_tried_once_more(monkeypatch):
    """Team members' prepares of the same data at once on the team server: the server's PostgreSQL refuses the second
    insert of the dataset row (`duplicate key value violates unique constraint "dataset_pk"`), and the server answers
    400 with MLflow's message alone: the retry, which looked for SQLAlchemy's exception behind MLflow's, never saw one
    there (exit 1). Now the message tells it: tried once more, as in-process; any other refusal is raised at once."""
    import psycopg2.errors
    import sqlalchemy.exc
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    def refusal(table: str) -> bytes:  # as `mlflow server` answers it: its session's exception, serialized
        unique = sqlalchemy.exc.IntegrityError(
            f"INSERT INTO {table} (dataset_uuid, experiment_id, name, digest) VALUES (%(dataset_uuid)s, "
            "%(experiment_id)s, %(name)s, %(digest)s)", {}, psycopg2.errors.UniqueViolation(
                'duplicate key value violates unique constraint "dataset_pk"'))
        return MlflowException(message=unique, error_code=BAD_REQUEST).serialize_as_json().encode()

    calls, answers = [], []

    def answer(request):
        calls.append(request.path)
        request.rfile.read(int(request.headers["Content-Length"]))
        status, body = answers.pop(0)
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.end_headers()
        request.wfile.write(body)

    dataset = mlflow.data.from_numpy(np.zeros((2, 1)), name="cifar10", digest="d" * 32)._to_mlflow_entity()
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])]
    with http_stub(answer) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        answers[:] = [(400, refusal("datasets")), (200, b"{}")]
        steps.log_inputs("r1", inputs)
        assert calls == ["/api/2.0/mlflow/runs/log-inputs"] * 2 and not answers
        calls.clear()
        answers[:] = [(400, refusal("inputs")), (200, b"{}")]  # no dataset row: not raced by another prepare
        with pytest.raises(MlflowException, match="dataset_pk"):
            steps.log_inputs("r1", inputs)
        assert len(calls) == 1


def test_two_mains_marking_the_train_run_they_went_on_from_done_at_once_both_finish(store, monkeypatch):
    """Two mains rerun together after one failed in evaluate both go on from its train run (`trained_before_a_failure`)
    and, done, tag it `pipeline_done`: MLflow's `set_tag` looks for the tag, then inserts it, and the other main's
    insert landing in between failed this main on the table's unique key (exit 1, its model registered). Now the tag
    is written once more, over the other's."""
    from mlflow.store.tracking.dbmodels.models import SqlTag
    from sqlalchemy.orm import Session

    from pipeline.tracking.resume import PIPELINE_DONE, mark_pipeline_done

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    trained, this, other = (client.create_run(experiment_id).info.run_id for _ in range(3))
    real, raced = Session.merge, []

    def racing(self, instance, **kwargs):
        merged = real(self, instance, **kwargs)  # looked for, none found: inserted as this session commits
        if isinstance(instance, SqlTag) and instance.key == PIPELINE_DONE and not raced:
            raced.append(instance.value)
            client.set_tag(trained, PIPELINE_DONE, other)  # the other main's, committed in between
        return merged

    monkeypatch.setattr(Session, "merge", racing)
    with mlflow.start_run(run_id=this):
        mark_pipeline_done(trained)
    assert raced == [this]
    assert client.get_run(trained).data.tags[PIPELINE_DONE] == this


def test_the_store_lock_is_the_database_files_and_serves_users_who_cannot_write_it(tmp_path, monkeypatch):
    """The lock was keyed by the URI's spelling, so `sqlite:///mlflow.db` in two users' folders was one lock file
    in /tmp, created by the first user (0644): every step of the second died on a PermissionError traceback."""
    import tempfile

    from pipeline import tracking

    locked = []
    real_lock = tracking.file_lock
    monkeypatch.setattr(tracking, "file_lock", lambda path: (locked.append(path), real_lock(path))[1])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder, uri in [("a", "sqlite:///mlflow.db"), ("a", f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"),
                        ("b", "sqlite:///mlflow.db")]:
        monkeypatch.chdir(tmp_path / folder)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert tracking.ensure_store() == uri
    assert locked[0] == locked[1] != locked[2]  # one file, two spellings: one lock; another folder's file: another

    # A lock file this process may not write (another user's, 0644 in /tmp): the lock still works. As root,
    # the check runs in a child that has become `nobody`, for whom root's file is read-only.
    fd, name = tempfile.mkstemp(suffix=".lock")
    os.close(fd)
    os.chmod(name, 0o444)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                with tracking.file_lock(Path(name)) as got:
                    code = 0 if got else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.unlink(name)


class Echo(mlflow.pyfunc.PythonModel):
    """A stand-in model: register only needs a logged model with a test_acc on it."""

    def predict(self, context, model_input, params=None):
        return model_input


def test_evaluate_refuses_a_dataset_of_other_classes(monkeypatch):
    """Scored against other labels, a test_acc would land on the model and feed register: refused, naming both."""
    from types import SimpleNamespace

    from pipeline import data
    from pipeline.tracking import steps

    monkeypatch.setattr(prepare, "load_dataset", lambda uri: data.make_synthetic(n_train=16, n_test=16))
    monkeypatch.setattr(steps, "load_classifier",
                        lambda uri, logged_model=None: SimpleNamespace(class_names=["cat", "dog"], tta="none"))
    with pytest.raises(config.ConfigError, match=r"^model_uri: models:/m-1 was trained on the classes \['cat', "
                                                 r"'dog'\], the dataset has \['class_0'"):
        evaluate.run(config.load(TINY), "models:/m-1", "runs:/0/dataset/dataset.npz")


def test_evaluate_refusing_a_dataset_of_the_models_classes_in_another_order_says_so(monkeypatch):
    """The same ten classes in another order (an .npz whose class_names array lists them otherwise) were refused as
    any other classes, two lists of ten names to compare by eye: the line says they are the same classes in another
    order, and how to make a dataset the model scores."""
    from types import SimpleNamespace

    from pipeline import data

    dataset = data.make_synthetic(n_train=16, n_test=16)
    monkeypatch.setattr(prepare, "load_dataset", lambda uri: dataset)
    monkeypatch.setattr(steps, "load_classifier", lambda uri, logged_model=None: SimpleNamespace(
        class_names=list(dataset.class_names)[::-1], tta="none"))
    with pytest.raises(config.ConfigError) as refused:
        evaluate.run(config.load(TINY), "models:/m-1", "runs:/0/dataset/dataset.npz")
    assert str(refused.value).endswith(
        "the same classes in another order: give its labels in the model's order (label i is the model's class i)")


def test_evaluate_refuses_a_model_it_cannot_score_before_any_run_opens(store, in_process, monkeypatch):
    """`evaluate` checked its dataset URI only before opening its run: a model URI naming no model, one that is no
    image classifier, one MLflow marked FAILED (its upload failed part way) and one of other classes than the
    dataset's each left a FAILED evaluate run behind; the FAILED model was even scored, and register took that score."""
    from types import SimpleNamespace

    import keras
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    prepared = in_process("prepare", "--params", TINY, "--overrides", "tracking.experiment=e2e")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    (prepare_run,) = experiment_runs(client)
    dataset_uri = f"runs:/{prepare_run.info.run_id}/dataset/dataset.npz"
    with mlflow.start_run(experiment_id=experiment_id):
        echo = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_id
        cut = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_id
        keras_model = keras.Sequential([keras.Input(shape=(32, 32, 3)), keras.layers.Flatten(),
                                        keras.layers.Dense(10, activation="softmax")])
        keras_flavor = mlflow.keras.log_model(keras_model, name="model", pip_requirements=["keras"]).model_id
    client.finalize_logged_model(cut, LoggedModelStatus.FAILED)
    runs = {r.info.run_id for r in client.search_runs([experiment_id], run_view_type=ViewType.ALL)}
    other_classes = SimpleNamespace(class_names=["cat", "dog"], tta="none")

    def evaluated(model_uri: str) -> str:
        result = in_process("evaluate", "--params", TINY, "--overrides", "tracking.experiment=e2e",
                            "--model-uri", model_uri, "--dataset-uri", dataset_uri)
        assert result.returncode == 2, result.stderr[-3000:]
        return result.stderr.strip().splitlines()[-1]

    assert evaluated("models:/m-0123456789abcdef").startswith(
        "error: model_uri: cannot load models:/m-0123456789abcdef")
    assert evaluated(f"models:/{echo}").startswith(f"error: model_uri: models:/{echo} is not an image classifier")
    assert evaluated(f"models:/{keras_flavor}") == (f"error: model_uri: models:/{keras_flavor} is not an image "
                                                    f"classifier this pipeline logged (a keras model): evaluate "
                                                    f"cannot score it")
    assert evaluated(f"models:/{cut}").startswith(f"error: model_uri: models:/{cut} was not logged whole (status "
                                                  f"FAILED")
    monkeypatch.setattr(steps, "load_classifier", lambda uri, logged_model=None: other_classes)
    assert evaluated(f"models:/{echo}").startswith(f"error: model_uri: models:/{echo} was trained on the classes "
                                                   f"['cat', 'dog']")
    assert {r.info.run_id for r in client.search_runs([experiment_id], run_view_type=ViewType.ALL)} == runs
    assert not client.get_logged_model(cut).metrics


def pyfunc_to_evaluate(python_model, in_process, tmp_path):
    """`python_model` logged in experiment e2e, a synthetic dataset.npz beside it; returns (its model id, its run's id,
    `refused(uri)`): evaluate of `uri` on that dataset, asserted to exit 2 and leave no run of its own and no metric on
    the model, its last stderr line."""
    from pipeline import data

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    data.make_synthetic(n_train=16, n_test=16).save(tmp_path / "dataset.npz")
    with mlflow.start_run(experiment_id=experiment_id) as logged:
        model_id = mlflow.pyfunc.log_model(name="model", python_model=python_model,
                                           pip_requirements=["mlflow"]).model_id

    def refused(uri: str) -> str:
        runs = {r.info.run_id for r in client.search_runs([experiment_id], run_view_type=ViewType.ALL)}
        result = in_process("evaluate", "--params", TINY, "--overrides", "tracking.experiment=e2e",
                            "--model-uri", uri, "--dataset-uri", str(tmp_path / "dataset.npz"))
        assert result.returncode == 2, result.stderr[-3000:]
        assert {r.info.run_id for r in client.search_runs([experiment_id], run_view_type=ViewType.ALL)} == runs
        assert not client.get_logged_model(model_id).metrics
        return result.stderr.strip().splitlines()[-1]

    return model_id, logged.info.run_id, refused


def test_evaluate_names_what_a_runs_or_registry_uri_lacks_in_registers_words(store, in_process, tmp_path):
    """A runs:/ URI of a run without a model there (one still training, a path that holds none) or a registry URI
    naming no model, version or alias was "cannot load ... (Failed to download artifacts from path 'model', please
    ensure that the path is correct.)" or MLflow's "Registered Model with name=... not found", where register, given
    the same URI, says what is missing: evaluate says it in register's words, exit 2, no run, no score."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    _, trained, refused = pyfunc_to_evaluate(Echo(), in_process, tmp_path)
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5}))
    running = client.create_run(experiment_id).info.run_id
    for uri, why in (
            (f"runs:/{running}/model", f"names no logged model: run {running} is still RUNNING and has no model at "
                                       f"model yet (no MLmodel file there): wait for it to finish, evaluate its "
                                       f"model, then register it"),
            (f"runs:/{trained}/no-such-model", f"names no logged model: run {trained} has no model at no-such-model "
                                               f"(no MLmodel file there)"),
            ("models:/nobody@champion", ": no registered model 'nobody'"),
            ("models:/cifar10-resnet/7", ": cifar10-resnet has no version 7"),
            ("models:/cifar10-resnet@nobody", ": no version of cifar10-resnet holds @nobody"),
            ("models:/cifar10-resnet/Staging", ": no version of cifar10-resnet is in stage Staging")):
        separator = "" if why.startswith(":") else " "
        assert refused(uri) == f"error: model_uri: {uri}{separator}{why}"


def test_evaluate_refuses_a_model_of_a_run_in_the_trash_before_any_run_opens(store, in_process, tmp_path):
    """A model whose train run the user deleted (MLflow's trash, where its artifacts stay until `mlflow gc`) was scored
    as any other, by `models:/m-...` or `runs:/<id>/model`, and its test_acc landed on the model for register to take:
    refused in one line naming the run and how to restore it, exit 2, no evaluate run."""
    model_id, trained, refused = pyfunc_to_evaluate(Echo(), in_process, tmp_path)
    MlflowClient().delete_run(trained)
    for uri in (f"models:/{model_id}", f"runs:/{trained}/model"):
        assert refused(uri) == (
            f"error: model_uri: {uri} was logged by run {trained}, which is in MLflow's trash; restore "
            f"it (mlflow runs restore --run-id {trained}) to score its model")


def test_evaluate_of_a_model_predicting_nan_fails_and_scores_nothing(store, in_process, tmp_path, monkeypatch):
    """A model whose probabilities are NaN (a diverged model: one logged before train refused them, or whose weights
    overflow on the test images) was scored as any other: argmax read each NaN row as class 0, so evaluate printed and
    logged a test_acc of that class's share ("test_acc 0.1000  test_loss nan"), a real-looking accuracy register could
    take. The step fails in one line naming the model and how many images it gave no number for, exit 3, run FAILED,
    no score on the run or the model."""
    from types import SimpleNamespace

    from pipeline import data

    dataset = data.make_synthetic(n_train=16, n_test=16)

    def predict_proba(pixels, batch_size=None):
        probs = np.full((len(pixels), 10), 0.1, dtype=np.float32)
        probs[::4] = np.nan  # 4 of 16
        return probs

    model_id, _, _ = pyfunc_to_evaluate(Echo(), in_process, tmp_path)
    monkeypatch.setattr(steps, "load_classifier", lambda uri, logged_model=None: SimpleNamespace(
        class_names=list(dataset.class_names), tta="none", predict_proba=predict_proba))
    uri = f"models:/{model_id}"
    result = in_process("evaluate", "--params", TINY, "--overrides", "tracking.experiment=e2e",
                        "--model-uri", uri, "--dataset-uri", str(tmp_path / "dataset.npz"))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "test_acc" not in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: model_uri: {uri} gives NaN or infinite probabilities for 4 of 16 test images, as a model whose "
        f"training diverged does: no score recorded, nothing to register; train it again with a lower train.lr")
    (run,) = experiment_runs(MlflowClient(), "tags.step = 'evaluate'")
    assert run.info.status == "FAILED" and "NaN or infinite" in run.data.tags["failure_reason"]
    assert "test_acc" not in run.data.metrics
    assert not MlflowClient().get_logged_model(model_id).metrics


def test_evaluates_scores_on_the_logged_model_name_the_dataset_they_were_measured_on(store, in_process, tmp_path,
                                                                                      monkeypatch):
    """The scores evaluate logs on the logged model carried no dataset: the model's page in MLflow 3 lists a model's
    metrics by the dataset they were measured on, and showed each test_acc as measured on none. They name the
    dataset input the evaluate run logged (context test), by its name and digest."""
    from types import SimpleNamespace

    from pipeline import data

    dataset = data.make_synthetic(n_train=16, n_test=16)
    model_id, _, _ = pyfunc_to_evaluate(Echo(), in_process, tmp_path)
    monkeypatch.setattr(steps, "load_classifier", lambda uri, logged_model=None: SimpleNamespace(
        class_names=list(dataset.class_names), tta="none",
        predict_proba=lambda pixels, batch_size=None: np.full((len(pixels), 10), 0.1, dtype=np.float32)))
    done = in_process("evaluate", "--params", TINY, "--overrides", "tracking.experiment=e2e",
                      "--model-uri", f"models:/{model_id}", "--dataset-uri", str(tmp_path / "dataset.npz"))
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = experiment_runs(MlflowClient(), "tags.step = 'evaluate'")
    (scored,) = [found.dataset for found in run.inputs.dataset_inputs]
    metrics = MlflowClient().get_logged_model(model_id).metrics
    assert {m.key for m in metrics} >= {"test_acc", "test_loss", "test_images"}
    assert {(m.dataset_name, m.dataset_digest) for m in metrics} == {(scored.name, scored.digest)}


def test_an_evaluation_of_an_alias_names_the_logged_model_it_scored(store, in_process, tmp_path, monkeypatch):
    """evaluate -P model_uri=models:/cifar10-resnet@champion recorded that URI alone in metrics.json and on the
    console: once the alias moved, nothing in the run's files or output said which model the scores were of. Both
    name the logged model scored, and the run has it as its model input."""
    from types import SimpleNamespace

    from pipeline import data

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    dataset = data.make_synthetic(n_train=16, n_test=16)
    dataset.save(tmp_path / "dataset.npz")
    champion = evaluated_model(experiment_id, {"test_acc": 0.5})
    registered(experiment_id, champion)
    monkeypatch.setattr(steps, "load_classifier", lambda uri, logged_model=None: SimpleNamespace(
        class_names=list(dataset.class_names), tta="none",
        predict_proba=lambda pixels, batch_size=None: np.full((len(pixels), 10), 0.1, dtype=np.float32)))
    done = in_process("evaluate", "--params", TINY, "--overrides", "tracking.experiment=e2e",
                      "--model-uri", "models:/cifar10-resnet@champion", "--dataset-uri", str(tmp_path / "dataset.npz"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"models:/cifar10-resnet@champion is {champion}" in done.stdout, done.stdout
    (run,) = experiment_runs(client, "tags.step = 'evaluate' and params.model_uri = 'models:/cifar10-resnet@champion'")
    written = json.loads(Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))).read_text())
    assert (written["model_uri"], written["scored_model_uri"]) == ("models:/cifar10-resnet@champion", champion)
    inputs = client.get_run(run.info.run_id).inputs.model_inputs
    assert [found.model_id for found in inputs] == [champion.removeprefix("models:/")]


def test_evaluate_of_a_model_on_other_data_than_it_trained_on_says_so(store, in_process, tmp_path, monkeypatch):
    """A model scored on a dataset other than the one it trained on (another prepare run's, a -P dataset_uri copied
    from the wrong line) printed its test_acc as any other: the line said nothing of the data. A note on stderr
    names the data it trained on; none where it is the same data, however its path is spelled."""
    from types import SimpleNamespace

    from pipeline import data

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    trained_on, other = data.make_synthetic(n_train=16, n_test=16), data.make_synthetic(n_train=16, n_test=16, seed=1)
    trained_on.save(tmp_path / "trained.npz")
    other.save(tmp_path / "other.npz")
    with mlflow.start_run(experiment_id=experiment_id):
        model_id = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_id
        steps.log_dataset_input(str(tmp_path / "trained.npz"), "train", trained_on)
    monkeypatch.setattr(steps, "load_classifier", lambda uri, logged_model=None: SimpleNamespace(
        class_names=list(trained_on.class_names), tta="none",
        predict_proba=lambda pixels, batch_size=None: np.full((len(pixels), 10), 0.1, dtype=np.float32)))

    def evaluated(dataset_uri: str) -> str:
        done = in_process("evaluate", "--params", TINY, "--overrides", "tracking.experiment=e2e",
                          "--model-uri", f"models:/{model_id}", "--dataset-uri", dataset_uri)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    assert "trained on other data" not in evaluated((tmp_path / "trained.npz").as_uri())
    assert f"note: models:/{model_id} was trained on other data than {tmp_path / 'other.npz'} (dataset digest " \
           f"{trained_on.digest()[:12]}, this one {other.digest()[:12]})" in evaluated(str(tmp_path / "other.npz"))
    # a prepare run's dataset, whose input that run logged: the same data by the digest the prepare run logged
    assert in_process("prepare", "--params", TINY, "--overrides", "tracking.experiment=e2e").returncode == 0
    (prepared,) = experiment_runs(client, "tags.step = 'prepare'")
    dataset_uri = f"runs:/{prepared.info.run_id}/dataset/dataset.npz"
    with mlflow.start_run(experiment_id=experiment_id):
        model_id = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_id
        steps.log_dataset_input(dataset_uri, "train")
    assert "trained on other data" not in evaluated(dataset_uri)


def test_evaluate_stopped_while_it_writes_its_plots_leaves_no_score_on_its_run_or_the_model(store, in_process,
                                                                                             tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) while evaluate drew its confusion matrix and sample predictions left a KILLED run with
    test_acc and no artifacts, and the score on the logged model's page, as if it were an evaluation of it. The scores
    are recorded after the artifacts: a stopped evaluation records none, on its run or on the model."""
    from types import SimpleNamespace

    from pipeline import data

    dataset = data.make_synthetic(n_train=16, n_test=16)
    model_id, _, _ = pyfunc_to_evaluate(Echo(), in_process, tmp_path)
    monkeypatch.setattr(steps, "load_classifier", lambda uri, logged_model=None: SimpleNamespace(
        class_names=list(dataset.class_names), tta="none",
        predict_proba=lambda pixels, batch_size=None: np.full((len(pixels), 10), 0.1, dtype=np.float32)))
    monkeypatch.setattr(evaluate, "plot_samples", interrupted)
    stopped = in_process("evaluate", "--params", TINY, "--overrides", "tracking.experiment=e2e",
                         "--model-uri", f"models:/{model_id}", "--dataset-uri", str(tmp_path / "dataset.npz"))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    (run,) = experiment_runs(MlflowClient(), "tags.step = 'evaluate'")
    assert run.info.status == "KILLED"
    assert not run.data.metrics and not MlflowClient().list_artifacts(run.info.run_id)
    assert run.data.params["model_uri"] == f"models:/{model_id}"  # which evaluation was stopped
    assert not MlflowClient().get_logged_model(model_id).metrics


@pytest.mark.parametrize(("argv", "error"), [
    (["--model-uri", "", "--dataset-uri", "runs:/0123/dataset/dataset.npz"],
     "error: model_uri: empty; give models:/m-..., models:/<name>@<alias>, models:/<name>/<version>, "
     "runs:/<train run id>/model or a downloaded model's folder"),
    (["--model-uri", "models:/m-0123", "--dataset-uri", " "],
     "error: dataset_uri: empty; give runs:/<prepare run id>/dataset/dataset.npz or a prepared dataset's .npz file"),
    (["--model-uri", "models:/cifar10-resnet", "--dataset-uri", "runs:/0123/dataset/dataset.npz"],
     "error: model_uri: models:/cifar10-resnet names a registered model but no version of it; give "
     "models:/cifar10-resnet/<version>, models:/cifar10-resnet@<alias> or models:/cifar10-resnet/latest"),
])
def test_evaluate_refuses_an_empty_or_versionless_uri_naming_it(store, in_process, argv, error):
    """`-P model_uri=` (or a blank) was refused as "cannot load  (Could not find an "MLmodel" configuration file at
    "<the project folder>/MLmodel")", as if the checkout were meant; an empty dataset_uri as "dataset_uri:  names no
    prepared dataset": each is one line saying the value is empty and what to give. models:/<name> without a version
    was "Logged model with ID '<name>' not found": it says which versions to name."""
    result = in_process("evaluate", "--params", TINY, *argv)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == error, result.stderr[-3000:]
    assert MlflowClient().search_runs(["0"], run_view_type=ViewType.ALL) == []


@pytest.mark.parametrize(("uri", "name"), [("models:/cifar10-resnet", "cifar10-resnet"),
                                         ("models:/cifar10-resnet/", "cifar10-resnet"), ("models:/nobody", "nobody")])
def test_a_versionless_registry_uri_is_refused_in_one_line_by_evaluate_and_register_alike(store, in_process, uri,
                                                                                          name):
    """models:/<name> (no version, alias or /latest) was refused by evaluate as "names a registered model but none of
    its versions", by register as "a registered model, not a version of it" or, where no model of that name was
    registered yet or the URI ended in a slash, "expected a logged model URI models:/m-...": the same line for both,
    naming the URI and the forms to write instead, exit 2, no run."""
    line = (f"error: model_uri: {uri} names a registered model but no version of it; give models:/{name}/<version>, "
            f"models:/{name}@<alias> or models:/{name}/latest")
    for step, more in (("evaluate", ["--dataset-uri", "runs:/0123/dataset/dataset.npz"]), ("register", [])):
        result = in_process(step, "--params", TINY, "--model-uri", uri, *more)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [line], (step, result.stderr[-3000:])
    assert MlflowClient().search_runs(["0"], run_view_type=ViewType.ALL) == []


@pytest.mark.parametrize("step", ["evaluate", "train"])
def test_a_dataset_of_a_run_in_the_trash_is_refused_before_any_run_opens(store, in_process, tmp_path, step):
    """A prepare run the user deleted keeps its dataset artifact until `mlflow gc`: evaluate scored a model on it (the
    score landing on the model), train trained on it (a model whose data's run is gone). Refused in one line
    naming the run and how to restore it, exit 2, no run opened."""
    from pipeline import data

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    data.make_synthetic(n_train=16, n_test=16).save(tmp_path / "dataset.npz")
    with mlflow.start_run(experiment_id=experiment_id) as prepared:
        mlflow.log_artifact(str(tmp_path / "dataset.npz"), "dataset")
    client.delete_run(prepared.info.run_id)
    uri = f"runs:/{prepared.info.run_id}/dataset/dataset.npz"
    given = ["--model-uri", "models:/m-0123456789abcdef"] if step == "evaluate" else ["--resume", "never"]
    result = in_process(step, "--params", TINY, "--overrides", "tracking.experiment=e2e", *given,
                        "--dataset-uri", uri)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: dataset_uri: {uri} was written by run {prepared.info.run_id}, which is in MLflow's trash; restore it "
        f"(mlflow runs restore --run-id {prepared.info.run_id}) to use it"), result.stderr[-3000:]
    assert [r.info.run_id for r in client.search_runs([experiment_id], run_view_type=ViewType.ALL)] == [
        prepared.info.run_id]


class NamedClasses(mlflow.pyfunc.PythonModel):
    """Another user's Python model that names its classes, as this pipeline's do, but scores no pixels."""

    def __init__(self, class_names):
        self.class_names = list(class_names)

    def predict(self, context, model_input, params=None):
        return model_input


def test_evaluate_refuses_a_python_model_that_names_classes_but_cannot_score_before_any_run_opens(store, in_process,
                                                                                                  tmp_path):
    """A Python model logged by someone else with `class_names` of the dataset's passed the check of an image
    classifier, opened the evaluate run and failed in it on AttributeError ('predict_proba'): a traceback, exit 1, a
    FAILED evaluate run. Refused as any model that is no image classifier of this pipeline: one line, exit 2."""
    from pipeline import data

    model_id, _, refused = pyfunc_to_evaluate(NamedClasses(data.make_synthetic(n_train=16, n_test=16).class_names),
                                              in_process, tmp_path)
    assert refused(f"models:/{model_id}") == (
        f"error: model_uri: models:/{model_id} is not an image classifier this pipeline logged (a NamedClasses): "
        f"evaluate cannot score it")


def test_the_confusion_matrix_of_many_classes_is_drawn_in_seconds_and_readable(tmp_path, monkeypatch):
    """A dataset of 100 classes (CIFAR-100 as an image folder) had evaluate write each of the 10,000 counts into a
    7x6-inch plot: 19 s on a 2-core CPU after the scores were logged, unreadable; 200 classes, 97 s; 1,000, hours.
    The plot grows with the classes (names up to 100); a cell shows its count up to 30 classes, the colour beyond."""
    import matplotlib.axes
    import numpy as np
    import pandas as pd
    from PIL import Image

    written, text = [], matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda ax, *args, **kwargs: written.append(args) or text(
        ax, *args, **kwargs))
    for n, counts in ((10, 100), (30, 900), (100, 0), (1000, 0)):
        names = [f"class_{i}" for i in range(n)]
        written.clear()
        evaluate.plot_confusion(pd.DataFrame(np.eye(n, dtype=int) * 7, index=names, columns=names),
                                tmp_path / f"{n}.png")
        assert len(written) == counts, n
        with Image.open(tmp_path / f"{n}.png") as png:
            assert png.height >= min(max(720, 0.3 * 120 * n), 1440), (n, png.size)  # 0.3 inch a class at 120 dpi


def test_a_class_without_test_images_has_no_score_not_zero():
    import numpy as np

    from pipeline import data

    dataset = data.make_synthetic(n_train=16, n_test=40)
    dataset = data.Dataset(dataset.x_train, dataset.y_train, dataset.x_test[dataset.y_test != 3],
                           dataset.y_test[dataset.y_test != 3], dataset.class_names)
    probs = np.eye(10)[dataset.y_test]  # a perfect model
    metrics, _ = evaluate.score(probs, dataset)
    assert metrics["test_acc"] == 1.0 and "class_3" not in metrics["per_class_acc"]
    assert set(metrics["per_class_acc"].values()) == {1.0}


def test_scores_on_other_test_data_do_not_compete_for_the_champion(store):
    """A model scored on other test images (synthetic ones, a subset) may score higher, but that says nothing
    about which is better: it is registered without the alias, and the reason says why."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    decisions = []
    for acc, test_data in ((0.80, "a" * 64), (0.99, "b" * 64), (0.85, "a" * 64)):
        with mlflow.start_run(experiment_id=experiment_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
            mlflow.log_metric("test_acc", acc, model_id=info.model_id)
            mlflow.set_logged_model_tags(info.model_id, {"test_data_sha256": test_data})
        with mlflow.start_run(experiment_id=experiment_id):
            decisions.append(register.run(config.load(TINY), info.model_uri))
    assert [d["alias_moved"] for d in decisions] == [True, False, True]
    assert "other test data than v1's 0.8000" in decisions[1]["reason"] and "not comparable" in decisions[1]["reason"]
    # its report shows both scores, but no difference between scores of other test images
    other = MlflowClient().get_model_version("cifar10-resnet", "2")
    assert other.tags["test_acc_difference"] == "" and "+0.1900" not in other.description
    assert MlflowClient().get_model_version("cifar10-resnet", "3").tags["test_acc_difference"] == "+0.050000"
    champion = MlflowClient().get_model_version_by_alias("cifar10-resnet", "champion")
    assert str(champion.version) == "3" and champion.tags["test_data_sha256"] == "a" * 64


def test_an_equal_score_is_a_tie_that_keeps_the_champion(store):
    """test_acc 250/256 = 0.9765625 is tagged 0.976562: an equal challenger must not count as better than that
    tag (the alias moved, then went back, while the decision said "moved")."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    decisions = []
    for _ in range(2):
        with mlflow.start_run(experiment_id=experiment_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
            mlflow.log_metric("test_acc", 250 / 256, model_id=info.model_id)
        with mlflow.start_run(experiment_id=experiment_id):
            decisions.append(register.run(config.load(TINY), info.model_uri))
    assert decisions[0]["alias_moved"] and not decisions[1]["alias_moved"]
    assert "does not beat" in decisions[1]["reason"]
    assert str(MlflowClient().get_model_version_by_alias("cifar10-resnet", "champion").version) == "1"


def test_two_registers_placing_an_alias_no_version_holds_both_place_it(store, monkeypatch):
    """Where no version held the alias, two registers placing it at once could both insert it (MLflow's SQL store
    reads, then inserts): the second insert failed as a duplicate (sqlite3.IntegrityError: UNIQUE constraint failed:
    registered_model_aliases...) and took its whole `main` down, once in CI's three runs started together. The
    refused one now sets it again, which updates it; any other error still fails."""
    from mlflow.exceptions import MlflowException

    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    for acc in (0.5, 0.6):
        registry.register_version(evaluated_model(experiment_id, {"test_acc": acc}), "cifar10-resnet",
                                  {"test_acc": f"{acc:.6f}"})
    real = MlflowClient.set_registered_model_alias
    calls = []

    def raced(self, name, alias, version):
        calls.append(version)
        if len(calls) == 1:  # the other register's insert lands first; this one's is refused
            real(self, name, alias, "1")
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases."
                                  "workspace, registered_model_aliases.name, registered_model_aliases.alias")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", raced)
    registry.move_alias("cifar10-resnet", "champion", "2")
    assert calls == ["2", "2"]
    assert str(MlflowClient().get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"

    def refused(self, name, alias, version):
        raise MlflowException("the tracking store went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refused)
    with pytest.raises(MlflowException, match="went away"):
        registry.move_alias("cifar10-resnet", "champion", "1")


def test_racing_registers_leave_the_alias_on_the_best_version(store):
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    models = {}
    for acc in (0.9, 0.6):
        with mlflow.start_run(experiment_id=experiment_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
            mlflow.log_metric("test_acc", acc, model_id=info.model_id)
        models[acc] = info.model_uri
    # Both read "no champion" before either registers; the worse one then writes its alias last.
    results = race(store["MLFLOW_TRACKING_URI"], experiment_id, register_after_barrier,
                   [(models[acc], {"delay": delay}) for acc, delay in ((0.9, 0.0), (0.6, 3.0))])
    assert all(d["champion_version"] is None for d in results), results  # both read "no champion": they overlapped
    decided = {d["test_acc"]: d for d in results}  # what each reports is where the alias ended, not what it tried
    assert decided[0.9]["alias_moved"] and not decided[0.6]["alias_moved"], results
    assert "after registers that ran alongside" in decided[0.6]["reason"]
    champion = MlflowClient().get_model_version_by_alias("cifar10-resnet", "champion")
    assert float(champion.tags["test_acc"]) == pytest.approx(0.9)


def test_a_worse_register_moving_the_alias_just_after_a_better_one_finished_gives_it_back(store, monkeypatch):
    """A better model's register (A) had created its version when a worse one's (B) started, so B counted that version
    among those before it, never to weigh again; B found no version holding the alias, and between B's check and its
    move A placed the alias and finished: B's move left the worse version holding it for good. B weighs the versions
    whose registers were still running when it started too, and gives the alias back."""
    import threading

    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    better, worse = (evaluated_model(experiment_id, {"test_acc": acc}) for acc in (0.9, 0.6))
    created, checked, finished = threading.Event(), threading.Event(), threading.Event()
    create, move = registry.register_version, registry.move_alias

    def create_then_wait(*args, **kwargs):
        made = create(*args, **kwargs)
        if threading.current_thread().name == "A":  # B starts now, and checks the alias before A does
            created.set()
            assert checked.wait(60)
        return made

    def move_once_a_finished(*args):
        if threading.current_thread().name == "B" and not checked.is_set():  # B has checked: no version holds it
            checked.set()
            assert finished.wait(60)
        return move(*args)

    monkeypatch.setattr(registry, "register_version", create_then_wait)
    monkeypatch.setattr(registry, "move_alias", move_once_a_finished)
    decisions, errors = {}, []

    def register_as(model):
        try:
            decisions[threading.current_thread().name] = registered(experiment_id, model)
        except BaseException as exc:  # noqa: BLE001 - the test's assertion names it
            errors.append(exc)
        finally:
            finished.set() if threading.current_thread().name == "A" else None

    a = threading.Thread(target=register_as, args=(better,), name="A")
    a.start()
    assert created.wait(60)
    b = threading.Thread(target=register_as, args=(worse,), name="B")
    b.start()
    for thread in (a, b):
        thread.join(timeout=120)
    assert not errors, errors
    assert decisions["A"]["alias_moved"] and decisions["A"]["version"] == 1, decisions
    assert not decisions["B"]["alias_moved"] and decisions["B"]["version"] == 2, decisions
    assert "@champion is on v1, the best-scoring version" in decisions["B"]["reason"]
    assert str(MlflowClient().get_model_version_by_alias("cifar10-resnet", "champion").version) == "1"


def test_a_version_whose_register_was_stopped_and_rolled_back_by_hand_is_not_weighed_again(store, monkeypatch):
    """A version whose register was stopped (Ctrl-C) after placing the alias, the alias moved back by hand: a later
    register that places the alias weighs no such version, though its register never finished: only versions whose
    register runs are still running beside it."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.6}))
    monkeypatch.setattr(registry, "record_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.9}))
    monkeypatch.undo()
    assert "decision" not in client.get_model_version("cifar10-resnet", "2").tags
    client.set_registered_model_alias("cifar10-resnet", "champion", "1")  # rolled back by hand
    decision = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.7}))
    assert decision["version"] == 3 and decision["alias_moved"], decision
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "3"


def test_two_registers_of_the_same_model_at_once_register_it_once(store):
    """Two registers of one train run's model started together (a `main` rerun beside an `-e register` of its model)
    each found no version of it and each created one: two versions of the same model with the same score. The one
    created second is taken back, and its register names the first."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    model = evaluated_model(experiment_id, {"test_acc": 0.7})
    results = race(store["MLFLOW_TRACKING_URI"], experiment_id, register_at_once, [(model, {})] * 2)
    assert [str(v.version) for v in client.search_model_versions("name = 'cifar10-resnet'")] == ["1"], results
    assert [d["version"] for d in results] == [1, 1], results
    assert any("registered alongside" in d["reason"] for d in results), results
    version = client.get_model_version("cifar10-resnet", "1")
    assert version.tags["alias_moved"] == "true" and version.tags["decision"] == "no version held @champion"
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "1"
    logged = client.get_logged_model(model.removeprefix("models:/"))
    assert [str(v["version"]) for v in json.loads(logged.tags["mlflow.modelVersions"])] == ["1"]


def test_registers_of_one_model_under_two_names_at_once_each_list_their_version_on_the_model(store, monkeypatch):
    """Two registers of one logged model under other register.model_name values at once each read the model's
    `mlflow.modelVersions` tag (the UI's link from the model to its versions), then wrote it with their own version
    added: the second write dropped the first's version. Each now lists its version whatever the other wrote."""
    import threading

    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    model = evaluated_model(experiment_id, {"test_acc": 0.7})
    real, barrier, written = MlflowClient.set_logged_model_tags, threading.Barrier(2, timeout=60), set()

    def write_once_both_read(self, model_id, tags):  # each register's first write waits until both have read
        if threading.get_ident() not in written:
            written.add(threading.get_ident())
            barrier.wait()
        return real(self, model_id, tags)

    monkeypatch.setattr(MlflowClient, "set_logged_model_tags", write_once_both_read)
    results, errors = {}, []

    def register_as(name):
        try:
            results[name] = registry.register_version(model, name, {"test_acc": "0.700000", "alias": "champion"})
        except BaseException as exc:  # noqa: BLE001 - the test's assertion names it
            errors.append(exc)

    threads = [threading.Thread(target=register_as, args=(name,)) for name in ("resnet-a", "resnet-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and all(created for _, created in results.values()), (errors, results)
    logged = MlflowClient().get_logged_model(model.removeprefix("models:/"))
    listed = json.loads(logged.tags["mlflow.modelVersions"])
    assert sorted((v["name"], str(v["version"])) for v in listed) == [("resnet-a", "1"), ("resnet-b", "1")], listed


def test_a_version_a_tracking_server_lists_on_its_model_is_listed_once(store, monkeypatch):
    """Against a tracking server, whose create-version lists the version on the logged model itself (MLflow's
    handler calls its store's set_model_versions_tags), register added it again: the model's `mlflow.modelVersions`
    tag named the version twice, and the UI showed it twice. Listed once; a duplicate created alongside and deleted
    again is not listed."""
    from mlflow.tracking._tracking_service.utils import _get_store

    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    model = evaluated_model(experiment_id, {"test_acc": 0.7})
    real = MlflowClient.create_model_version

    def as_a_server(self, name, source, *args, model_id=None, **kwargs):
        version = real(self, name, source, *args, model_id=model_id, **kwargs)
        _get_store().set_model_versions_tags(name, version.version, model_id)
        return version

    monkeypatch.setattr(MlflowClient, "create_model_version", as_a_server)
    tags = {"test_acc": "0.700000", "alias": "champion"}
    assert registry.register_version(model, "cifar10-resnet", tags)[1]
    logged = model.removeprefix("models:/")
    assert json.loads(MlflowClient().get_logged_model(logged).tags["mlflow.modelVersions"]) == [
        {"name": "cifar10-resnet", "version": 1}]
    monkeypatch.setattr(registry, "_same_score", lambda version, *_: str(version.version) == "1")
    assert registry.register_version(model, "cifar10-resnet", tags)[1] is False  # v2 created, then deleted
    assert json.loads(MlflowClient().get_logged_model(logged).tags["mlflow.modelVersions"]) == [
        {"name": "cifar10-resnet", "version": 1}]


def test_a_version_deleted_while_a_register_alongside_lists_versions_is_not_listed_by_it(store, monkeypatch):
    """Two registers of one model at once (CI, 2026-12-08): one created v1 and listed the model's versions, reading
    the registry just before the other deleted its duplicate v2 and dropped it from the model's
    `mlflow.modelVersions` tag; the first then wrote [1, 2] and, reading the tag back, kept v2 as an entry another
    register had written. The UI linked the model to a version that does not exist. An entry whose version is gone
    is dropped."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    model = evaluated_model(experiment_id, {"test_acc": 0.7})
    logged = model.removeprefix("models:/")
    tags = {"test_acc": "0.700000", "alias": "champion"}
    assert registry.register_version(model, "cifar10-resnet", tags)[1]
    client.create_model_version("cifar10-resnet", model, tags=tags, model_id=logged)  # the duplicate alongside
    real, calls = MlflowClient.search_model_versions, []

    def read_just_before_the_delete(self, *args, **kwargs):
        found = real(self, *args, **kwargs)
        if not calls:  # the register alongside deletes v2 and drops it from the tag right after this read
            calls.append(1)
            client.delete_model_version("cifar10-resnet", "2")
            registry.list_versions_on_model(logged, dropped=("cifar10-resnet", "2"))
        return found

    monkeypatch.setattr(MlflowClient, "search_model_versions", read_just_before_the_delete)
    registry.list_versions_on_model(logged)
    assert json.loads(client.get_logged_model(logged).tags["mlflow.modelVersions"]) == [
        {"name": "cifar10-resnet", "version": 1}]


def test_a_register_killed_before_its_alias_is_not_weighed_by_a_register_run_on_its_own(store, monkeypatch):
    """A register killed (SIGKILL, the OOM killer) after creating its version, before placing the alias, left its run
    RUNNING: a register run on its own after it (`mlflow run . -e register`) took that version for one of a register
    running alongside and weighed it, moving the alias to a version no register decided on, until the next `main`
    ended the dead run. It ends such runs first, as a main does: the alias stays on its own version."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    better, worse = (evaluated_model(experiment_id, {"test_acc": acc}) for acc in (0.9, 0.8))
    script = ("import time, mlflow\n"
              "from pipeline.tracking import registry\n"
              "from pipeline.tracking.resume import step_lock\n"
              f"with step_lock() as hold, mlflow.start_run(experiment_id='{experiment_id}', "
              "tags={'step': 'register'}) as step:\n"
              "    hold(step)\n"
              f"    registry.register_version('{better}', 'cifar10-resnet', {{'test_acc': '0.900000', "
              f"'alias': 'champion', 'test_data_sha256': '{'a' * 64}'}})\n"
              "    print(step.info.run_id, flush=True)\n"
              "    time.sleep(120)\n")
    killed = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=store, stdout=subprocess.PIPE, text=True)
    try:
        dead_run = killed.stdout.readline().strip()
    finally:
        killed.kill()
        killed.wait()
    assert client.get_run(dead_run).info.status == "RUNNING"
    monkeypatch.setattr(sys, "argv", ["pipeline.register", "--params", TINY, "--model-uri", worse])
    register.main()
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"
    assert client.get_run(dead_run).info.status == "KILLED"


@pytest.mark.parametrize("step", ["prepare", "evaluate", "register"])
def test_a_step_that_builds_no_model_is_not_tagged_with_the_depth_of_params_it_was_not_given(store, step):
    """`mlflow run . -e evaluate -P model-uri=...` (or register, prepare) without the `-P params` the model was trained
    with tagged its run `model_depth` of the default params, whatever the model: a ResNet-9's evaluation read
    "model_depth 20" in the UI. Only the runs that build the model (train, main) are tagged with its depth."""
    from pipeline.tracking import step_run

    cfg = config.load(TINY)
    for name in (step, "train", "main"):
        with step_run(cfg, name) as run:
            pass
        assert (MlflowClient().get_run(run.info.run_id).data.tags.get("model_depth")
                == (str(cfg.model.depth) if name in ("train", "main") else None)), name


@pytest.mark.parametrize("entry_point", ["evaluate", "register"])
def test_a_bare_run_or_model_id_is_named_as_such_with_the_uri_meant(store, monkeypatch, entry_point):
    """A run's or a logged model's id as the UI and the console print it, given as the model URI: evaluate answered
    "cannot load f0e27... (No such artifact: 'f0e27...')" or MLflow's "Invalid uri", register "is no model register
    takes". Each says what the id is and which URI to give."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    model = evaluated_model(experiment_id, {"test_acc": 0.7})
    logged = model.removeprefix("models:/")
    trained = client.get_logged_model(logged).source_run_id
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "prepare"}) as bare:
        pass
    for given, said in ((logged, f"{logged} is a logged model's id, no URI: give {model}"),
                        (trained, f"{trained} is the id of run {trained}, no URI: give its model, "
                                  f"runs:/{trained}/model"),
                        (bare.info.run_id, f"{bare.info.run_id} is the id of prepare run {bare.info.run_id}, which "
                                           f"logged no model: give a training run's model, "
                                           f"runs:/<train run id>/model")):
        argv = [f"pipeline.{entry_point}", "--model-uri", given]
        monkeypatch.setattr(sys, "argv", argv + ["--dataset-uri", "runs:/p/dataset"] * (entry_point == "evaluate"))
        with pytest.raises(config.ConfigError) as refused:
            {"evaluate": evaluate, "register": register}[entry_point].main()
        assert str(refused.value) == f"model_uri: {said}"
    assert len(client.search_runs([experiment_id])) == 3  # the model's, its evaluation's, the bare one: none opened


def test_a_dataset_uri_naming_a_run_is_answered_with_that_runs_dataset(store):
    """`-P dataset_uri=<prepare run id>` (or `runs:/<id>`, `runs:/<id>/dataset`, a train run's id) was answered with
    the URI's form alone, `give runs:/<prepare run id>/dataset/dataset.npz`: the line now gives the URI of that run's
    dataset, a train run's the one it trained on. An id of no run keeps the form."""
    from pipeline import data

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "prepare"}) as prepared:
        pass
    dataset = f"runs:/{prepared.info.run_id}/dataset/dataset.npz"
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "train", "dataset_uri": dataset}) as trained:
        pass
    for given, meant in ((prepared.info.run_id, f"{dataset} (the dataset of prepare run {prepared.info.run_id})"),
                         (f"runs:/{prepared.info.run_id}/dataset", f"{dataset} (the dataset of prepare run "
                                                                  f"{prepared.info.run_id})"),
                         (f"runs:/{trained.info.run_id}/model", f"{dataset} (the dataset of train run "
                                                               f"{trained.info.run_id})"),
                         ("0" * 32, "runs:/<prepare run id>/dataset/dataset.npz")):
        with pytest.raises(data.DataError) as refused:
            prepare.check_dataset_uri(given)
        assert str(refused.value) == f"dataset_uri: {given} names no prepared dataset (.npz); give {meant}"


def evaluated_model(experiment_id: str, metrics: dict[str, float], test_data: str = "a" * 64) -> str:
    """A stand-in logged model scored as evaluate scores one (steps.log_evaluation in a run of its own)."""
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
    evaluate_again(experiment_id, info.model_uri, metrics, test_data)
    return info.model_uri


def evaluate_again(experiment_id: str, model_uri: str, metrics: dict[str, float], test_data: str = "a" * 64) -> None:
    with mlflow.start_run(experiment_id=experiment_id):
        steps.log_evaluation({"model_uri": model_uri}, metrics, model_uri, test_data)


def registered(experiment_id: str, model_uri: str) -> dict:
    with mlflow.start_run(experiment_id=experiment_id):
        return register.run(config.load(TINY), model_uri)


@pytest.mark.parametrize("how", ["deleted", "artifacts-removed"])
def test_a_champion_whose_model_is_gone_is_not_weighed_and_gives_up_the_alias(store, how):
    """The champion's logged model deleted (MlflowClient.delete_logged_model, gone for good at `mlflow gc`), or its
    artifacts removed: register still weighed the challenger against the score the champion was registered with,
    "test_acc 0.6000 does not beat v1's 0.7000" (or, on other test data, failed to score it for a reason beside the
    point), and left @champion on a model no one can load or serve. The challenger takes the alias, and the reason
    says why, quoting the champion's score as the one it was registered with."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    champion = evaluated_model(experiment_id, {"test_acc": 0.7})
    registered(experiment_id, champion)
    found = champion.removeprefix("models:/")
    if how == "deleted":
        client.delete_logged_model(found)
        gone, test_data = f"logged model {found} is deleted from the tracking store", "a" * 64
    else:
        shutil.rmtree(client.get_logged_model(found).artifact_location.removeprefix("file://"))
        gone, test_data = "its artifacts are gone: no MLmodel file", "b" * 64  # no rescoring it either
    decision = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.6}, test_data))
    assert decision["alias_moved"] and decision["version"] == 2, decision
    assert decision["reason"] == (f"v1 holds @champion, but its model {champion} is gone ({gone}): nothing to serve "
                                  f"or weigh test_acc 0.6000 against (v1 was registered with 0.7000); @champion moved")
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"


@pytest.mark.parametrize("test_data", ["a" * 64, "b" * 64])
def test_a_champion_whose_training_run_is_in_the_trash_is_not_weighed_and_gives_up_the_alias(store, test_data):
    """The champion's training run deleted (MLflow's trash): register refuses such a challenger, yet weighed such a
    champion, by its registered score or (on other test data) scored anew, a score landing on a model its user
    discarded. As for a champion whose model is gone, it is not weighed: the challenger takes the alias, and the reason
    names the run and how to restore it."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    champion = evaluated_model(experiment_id, {"test_acc": 0.7})
    registered(experiment_id, champion)
    trained = client.get_logged_model(champion.removeprefix("models:/")).source_run_id
    client.delete_run(trained)
    decision = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.6}, test_data))
    assert decision["alias_moved"] and decision["version"] == 2, decision
    assert decision["reason"] == (
        f"v1 holds @champion, but its model {champion} was logged by run {trained}, which is in MLflow's trash "
        f"(mlflow runs restore --run-id {trained} restores it): not weighed against test_acc 0.6000 (v1 was "
        f"registered with 0.7000); @champion moved")
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"
    assert not client.search_runs([experiment_id], "tags.scores_champion = 'cifar10-resnet/1'")  # not scored anew


def test_a_register_does_not_move_the_alias_off_a_better_version_moved_there_alongside(store, monkeypatch):
    """Register B has registered v2 (0.7) when register A (0.6) reads the versions and the champion (v1, 0.5);
    B then moves @champion to v2 and settles. A's version came after v2, so A's settling never weighs v2 again:
    A must not put the alias on its worse version, over v2."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5}))
    b_model, a_model = (evaluated_model(experiment_id, {"test_acc": acc}) for acc in (0.7, 0.6))
    b, _ = registry.register_version(b_model, "cifar10-resnet", {"test_acc": "0.700000", "test_data_sha256": "a" * 64})
    read, b_done = registry.current_champion, []

    def champion_then_b_finishes(name, alias):
        found = read(name, alias)
        if not b_done:
            b_done.append(True)
            registry.move_alias(name, alias, b.version)  # B: 0.7 beats v1's 0.5
            registry.settle_alias(name, alias, "a" * 64, 1)
        return found

    monkeypatch.setattr(registry, "current_champion", champion_then_b_finishes)
    decision = registered(experiment_id, a_model)
    assert decision["champion_version"] == 1 and not decision["alias_moved"], decision
    assert "@champion is on v2" in decision["reason"]
    assert str(MlflowClient().get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"


def test_a_version_registered_alongside_for_another_alias_never_takes_this_one(store, monkeypatch):
    """A register for @champion settled the alias over every version registered alongside it, whatever alias its
    register weighed it for: a `register.alias=staging` register finishing meanwhile (0.9, "no version held @staging")
    had @champion moved onto its version too, one never weighed for @champion, and the @champion register's decision
    blamed "registers that ran alongside"."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5}))  # v1 @champion
    staging_model, model = (evaluated_model(experiment_id, {"test_acc": acc}) for acc in (0.9, 0.6))
    read, staged = registry.current_champion, []

    def champion_then_staging_registers(name, alias):
        found = read(name, alias)
        if alias == "champion" and not staged:  # read: the other register runs, whole, before this one goes on
            with mlflow.start_run(experiment_id=experiment_id, nested=True):
                staged.append(register.run(config.load(TINY, "register.alias=staging"), staging_model))
        return found

    monkeypatch.setattr(registry, "current_champion", champion_then_staging_registers)
    decision = registered(experiment_id, model)
    assert staged[0]["version"] == 2 and staged[0]["reason"] == "no version held @staging", staged
    assert decision["version"] == 3 and decision["alias_moved"], decision
    assert decision["reason"] == "test_acc 0.6000 beats v1's 0.5000"
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("cifar10-resnet", "staging").version) == "2"


@pytest.mark.parametrize("stopped_in", ["move_alias", "record_report"])
def test_a_register_stopped_after_creating_its_version_leaves_it_described_and_the_rerun_finishes_it(
        store, monkeypatch, stopped_in):
    """A register killed between creating the version and writing its report left a version with no description
    and no decision; the rerun registered the model a second time (weighed against itself if it held the alias)."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5}))
    challenger = evaluated_model(experiment_id, {"test_acc": 0.7})

    step = getattr(registry, stopped_in)
    monkeypatch.setattr(registry, stopped_in, interrupted)
    with pytest.raises(KeyboardInterrupt):
        registered(experiment_id, challenger)
    version = client.get_model_version("cifar10-resnet", "2")
    assert "@champion not placed yet (test_acc 0.7000 beats v1's 0.5000)" in version.description
    assert version.tags["test_acc"] == "0.700000" and version.tags["champion_version"] == "1"
    assert "decision" not in version.tags  # not finished: what the rerun looks for
    logged = client.get_logged_model(challenger.removeprefix("models:/"))
    assert [str(v["version"]) for v in json.loads(logged.tags["mlflow.modelVersions"])] == ["2"]

    monkeypatch.setattr(registry, stopped_in, step)
    decision = registered(experiment_id, challenger)
    assert decision["version"] == 2 and decision["alias_moved"], decision
    assert len(client.search_model_versions("name = 'cifar10-resnet'")) == 2  # finished, not registered again
    version = client.get_model_version("cifar10-resnet", "2")
    assert version.description.startswith("**Champion vs challenger** (cifar10-resnet): @champion moved to v2: ")
    assert version.tags["alias_moved"] == "true" and version.tags["decision"] == decision["reason"]
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"
    assert ("holds @champion already" if stopped_in == "record_report" else "beats v1's") in decision["reason"]


def test_the_rerun_of_a_register_stopped_before_listing_its_version_on_the_model_lists_it(store, monkeypatch):
    """A register stopped (Ctrl-C, a kill) after creating its version but before listing it in the logged model's
    `mlflow.modelVersions` tag: its rerun finished the version, but never listed it, and the UI's link from the
    model to it was missing for good. The rerun lists it."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    challenger = evaluated_model(experiment_id, {"test_acc": 0.7})
    monkeypatch.setattr(registry, "list_versions_on_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registered(experiment_id, challenger)
    logged = challenger.removeprefix("models:/")
    assert "mlflow.modelVersions" not in client.get_logged_model(logged).tags
    monkeypatch.undo()
    decision = registered(experiment_id, challenger)
    assert decision["version"] == 1 and decision["alias_moved"], decision
    assert json.loads(client.get_logged_model(logged).tags["mlflow.modelVersions"]) == [
        {"name": "cifar10-resnet", "version": 1}]


def test_the_rerun_of_a_stopped_register_whose_champion_was_deleted_keeps_no_tag_naming_it(store, monkeypatch):
    """A register stopped before placing the alias left its version tagged with the champion it weighed (v1); v1 was
    deleted before the rerun, which found no version holding @champion and said so, but the version kept the tags
    champion_version 1, test_acc_difference +0.200000 and v1's champion_evaluate_run_id beside that decision."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5}))
    challenger = evaluated_model(experiment_id, {"test_acc": 0.7})
    move = registry.move_alias

    monkeypatch.setattr(registry, "move_alias", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registered(experiment_id, challenger)
    assert client.get_model_version("cifar10-resnet", "2").tags["champion_version"] == "1"
    client.delete_model_version("cifar10-resnet", "1")
    monkeypatch.setattr(registry, "move_alias", move)
    decision = registered(experiment_id, challenger)
    assert (decision["version"], decision["alias_moved"], decision["reason"]) == (2, True, "no version held @champion")
    tags = client.get_model_version("cifar10-resnet", "2").tags
    assert tags["decision"] == "no version held @champion" and tags["alias_moved"] == "true"
    assert not {"champion_version", "test_acc_difference", "champion_evaluate_run_id"} & set(tags), tags


def test_the_rerun_of_a_register_stopped_after_placing_the_alias_reports_the_champion_it_beat(store, monkeypatch):
    """Stopped after moving @champion to v2, before its report, the register's rerun found v2 holding the alias and
    wrote a report weighing v2 against itself: champion v2, test_acc_difference +0.000000, every per-class
    difference 0, in place of v1's 0.5 that v2 beat by 0.2."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5, "test_acc_cat": 0.4}))
    challenger = evaluated_model(experiment_id, {"test_acc": 0.7, "test_acc_cat": 0.9})
    record = registry.record_report

    monkeypatch.setattr(registry, "record_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registered(experiment_id, challenger)
    monkeypatch.setattr(registry, "record_report", record)
    decision = registered(experiment_id, challenger)
    assert (decision["version"], decision["champion_version"], decision["champion_test_acc"]) == (2, 1, 0.5)
    version = client.get_model_version("cifar10-resnet", "2")
    assert version.tags["champion_version"] == "1" and version.tags["test_acc_difference"] == "+0.200000"
    assert version.tags["alias_moved"] == "true" and "holds @champion already" in version.tags["decision"]
    assert "| champion   | v1" in version.description and "+0.5000" in version.description  # cat: 0.9 - 0.4


def test_a_register_whose_report_upload_fails_leaves_its_version_for_the_rerun(store, monkeypatch):
    """The report's artifacts were uploaded after the version's decision tag: a failed upload (an artifact store
    down) failed the register but left the version finished, and the rerun registered the model a second time."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    challenger = evaluated_model(experiment_id, {"test_acc": 0.7})
    upload = mlflow.log_dict

    def unavailable(value, path, *args, **kwargs):
        if path == "champion_vs_challenger.json":
            raise OSError("artifact store unavailable")
        return upload(value, path, *args, **kwargs)

    monkeypatch.setattr(mlflow, "log_dict", unavailable)
    with pytest.raises(OSError):
        registered(experiment_id, challenger)
    assert "decision" not in client.get_model_version("cifar10-resnet", "1").tags
    monkeypatch.setattr(mlflow, "log_dict", upload)
    decision = registered(experiment_id, challenger)
    assert decision["version"] == 1 and decision["alias_moved"], decision
    assert len(client.search_model_versions("name = 'cifar10-resnet'")) == 1


def test_a_model_registered_with_its_score_already_is_not_registered_again(store):
    """A `main` whose tracking server went away after its register (in its headline results) is rerun, as its
    error says: it goes on from the trained model, evaluates it again and registered it a second time (v2, the
    same model and score, "does not beat v1's"). Scored again on other test data, it is a new version."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    model = evaluated_model(experiment_id, {"test_acc": 0.7})
    first = registered(experiment_id, model)
    evaluate_again(experiment_id, model, {"test_acc": 0.7})  # the rerun's evaluate: the same score
    again = registered(experiment_id, model)
    assert (again["version"], again["alias_moved"]) == (first["version"], True) == (1, True), again
    assert "not registered again; @champion is on it" in again["reason"]
    assert len(client.search_model_versions("name = 'cifar10-resnet'")) == 1
    assert client.get_model_version("cifar10-resnet", "1").tags["decision"] == first["reason"]  # its report kept
    evaluate_again(experiment_id, model, {"test_acc": 0.6}, "b" * 64)
    assert registered(experiment_id, model)["version"] == 2


def test_a_model_registered_already_names_the_champion_it_was_weighed_against(store):
    """The rerun of a register that finished (a `main` rerun after it) logged and returned a decision whose
    champion_version, champion_test_acc and champion_evaluate_run were null, though its version was weighed against
    a champion, as its report and its first decision say."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.7}))  # v1 @champion
    for acc in (0.8, 0.6):  # v2 beats v1 and takes @champion; v3 does not beat v2
        model = evaluated_model(experiment_id, {"test_acc": acc})
        first = registered(experiment_id, model)
        assert first["champion_version"] is not None, first
        with mlflow.start_run(experiment_id=experiment_id) as rerun:
            again = register.run(config.load(TINY), model)
        assert again["version"] == first["version"] and "not registered again" in again["reason"], again
        weighed = ("champion_version", "champion_test_acc", "champion_evaluate_run")
        assert [again[k] for k in weighed] == [first[k] for k in weighed], (first, again)
        logged = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=rerun.info.run_id,
                                                                    artifact_path="decision.json")).read_text())
        assert [logged[k] for k in weighed] == [first[k] for k in weighed]


def test_a_model_registered_for_one_alias_is_weighed_for_another(store):
    """Registered for @champion, the same model registered again with `register.alias=staging` was taken for a
    rerun of the first register: nothing registered, "@staging is on no version", and @staging never placed, though
    no version held it. Only a register for the same alias is a rerun; one for another weighs it for that alias."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    model = evaluated_model(experiment_id, {"test_acc": 0.7})
    assert registered(experiment_id, model)["alias_moved"]
    staging = config.load(TINY, "register.alias=staging")
    with mlflow.start_run(experiment_id=experiment_id):
        decision = register.run(staging, model)
    assert decision["alias_moved"] and decision["reason"] == "no version held @staging", decision
    held = client.get_model_version_by_alias("cifar10-resnet", "staging")
    assert str(held.version) == str(decision["version"]) and held.tags["test_acc"] == "0.700000"
    assert registry.version_model_uri(held) == model
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "1"
    with mlflow.start_run(experiment_id=experiment_id):  # its rerun: registered already, for this alias
        again = register.run(staging, model)
    assert again["version"] == decision["version"] and "not registered again; @staging is on it" in again["reason"]
    assert len(client.search_model_versions("name = 'cifar10-resnet'")) == 2


def test_the_report_of_a_hundred_classes_fits_a_version_description(store):
    """MLflow keeps a version's description in 5,000 characters: the report of a 100-class dataset was longer, and
    on the team server's PostgreSQL creating the version failed ("value too long for type character
    varying(5000)"), leaving a registered model without it. The register run's report stays whole."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    per_class = {f"test_acc_fine_class_{i:03d}": 0.5 for i in range(100)}
    decision = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5, **per_class}))
    description = MlflowClient().get_model_version("cifar10-resnet", "1").description
    assert len(description) <= 5000 and description.startswith("**Champion vs challenger** (cifar10-resnet): @champ")
    assert description.endswith("the whole report is the register run's champion_vs_challenger.md)\n")
    report = mlflow.artifacts.load_text(f"runs:/{mlflow.last_active_run().info.run_id}/champion_vs_challenger.md")
    assert "| fine_class_099 |" in report and decision["alias_moved"]


def test_a_champion_moved_by_hand_stays_where_it_was_put(store):
    """A roll-back (the alias moved by hand to a worse version) is a decision: a later register weighs its new
    version against that holder only, and never puts back a better version from before."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    for acc in (0.9, 0.8):
        registered(experiment_id, evaluated_model(experiment_id, {"test_acc": acc}))
    client.set_registered_model_alias("cifar10-resnet", "champion", "2")  # rolled back from v1 (0.9) to v2 (0.8)
    other = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.99}, "b" * 64))
    assert not other["alias_moved"] and other["champion_version"] == 2 and "not comparable" in other["reason"]
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"
    better = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.85}))
    assert better["alias_moved"] and "beats v2's 0.8000" in better["reason"], better
    assert "alongside" not in better["reason"]
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "4"


def test_a_champion_registered_by_hand_is_weighed_by_its_models_score(store):
    """A version registered without register's tags: its logged model's evaluation is its score (a tie keeps it);
    one whose model evaluate never scored keeps the alias, and the reason says why."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    for name, metrics in (("handpicked", {"test_acc": 250 / 256}), ("unscored", None)):
        if metrics:
            uri = evaluated_model(experiment_id, metrics)
        else:
            with mlflow.start_run(experiment_id=experiment_id):
                uri = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_uri
        mlflow.register_model(uri, name)
        client.set_registered_model_alias(name, "champion", "1")
        challenger = evaluated_model(experiment_id, {"test_acc": 250 / 256})
        with mlflow.start_run(experiment_id=experiment_id):
            decision = register.run(config.load(TINY, f"register.model_name={name}"), challenger)
        assert not decision["alias_moved"] and decision["champion_version"] == 1, decision
        assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
        if metrics:
            assert decision["champion_test_acc"] == 0.976562 and "does not beat v1's 0.9766" in decision["reason"]
        else:
            assert decision["champion_test_acc"] is None and "without a test_acc" in decision["reason"]


def test_a_champion_whose_models_score_is_nan_gives_up_the_alias(store):
    """A version registered by hand whose model's test_acc is NaN (a diverged model's score, logged by other code) read
    as 0.0 from the store's logged model, a score any challenger beat. Read as NaN, no challenger could beat it
    ("does not beat v1's nan") and the alias stayed on it for good: a NaN champion is no score to weigh against, and
    the alias moves, the reason saying why."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    mlflow.register_model(evaluated_model(experiment_id, {"test_acc": math.nan}), "cifar10-resnet")
    client.set_registered_model_alias("cifar10-resnet", "champion", "1")
    decision = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5}))
    assert decision["alias_moved"] and decision["champion_version"] == 1, decision
    assert decision["champion_test_acc"] is None, decision
    assert decision["reason"] == ("v1 holds @champion with test_acc NaN, a diverged model's score: no score to weigh "
                                  "test_acc 0.5000 against; @champion moved"), decision
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"


@pytest.mark.parametrize("tag", ["n/a", "nan", "", "93.1"])
def test_a_champions_test_acc_tag_edited_to_no_accuracy_is_weighed_by_its_models_score(store, tag):
    """A version's test_acc tag edited by hand to something that is no accuracy failed every register with a
    traceback (`n/a`, empty), or, NaN, lost every comparison while the alias went to the challenger all the same, the
    decision blaming registers that ran alongside; a percentage won every one. Such a tag now counts as none: the
    version is weighed by its model's score, as one registered by hand."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5}))
    client.set_model_version_tag("cifar10-resnet", "1", "test_acc", tag)
    decision = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.6}))
    assert decision["alias_moved"] and decision["reason"] == "test_acc 0.6000 beats v1's 0.5000", decision
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"
    decision = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.55}))  # v1 weighs nothing
    assert not decision["alias_moved"] and decision["reason"] == "test_acc 0.5500 does not beat v2's 0.6000"


def test_the_report_takes_each_sides_per_class_scores_from_the_evaluation_of_its_test_acc(store):
    """A champion evaluated again later (on fewer images, with a class missing) keeps the per-class scores of the
    evaluation it was registered with; the challenger shows those of its own newest evaluation only."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    champion = evaluated_model(experiment_id, {"test_acc": 0.9, "test_acc_cat": 0.8, "test_acc_dog": 1.0})
    registered(experiment_id, champion)
    evaluate_again(experiment_id, champion, {"test_acc": 0.5, "test_acc_cat": 0.5}, "c" * 64)
    challenger = evaluated_model(experiment_id, {"test_acc": 0.7, "test_acc_cat": 0.6, "test_acc_dog": 0.9})
    evaluate_again(experiment_id, challenger, {"test_acc": 0.95, "test_acc_cat": 0.9}, "a" * 64)
    decision = registered(experiment_id, challenger)
    assert decision["alias_moved"] and decision["test_acc"] == 0.95 and decision["champion_test_acc"] == 0.9
    report = mlflow.artifacts.load_dict(f"runs:/{mlflow.last_active_run().info.run_id}/champion_vs_challenger.json")
    rows = {row["class"]: row for row in report["per_class"]}
    assert (rows["cat"]["champion"], rows["cat"]["challenger"], rows["dog"]["champion"]) == (0.8, 0.9, 1.0)
    assert rows["dog"]["challenger"] is None  # absent from the challenger's newest evaluation: no score, not 0.9
    assert report["test_acc_difference"] == pytest.approx(0.05)


def test_a_bare_logged_model_id_is_refused_before_anything_is_registered(store):
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    uri = evaluated_model(experiment_id, {"test_acc": 0.9})
    with pytest.raises(config.ConfigError, match=r"^model_uri: expected a logged model URI models:/m-\.\.\., got 'm-"):
        registry.model_test_acc(uri.removeprefix("models:/"))
    assert MlflowClient().search_registered_models() == []


def test_an_evaluation_of_a_registry_uri_lands_on_its_logged_model(store):
    """evaluate -P model_uri=models:/cifar10-resnet@champion: the scores go on the champion's logged model too
    (register reads them there), as for models:/m-...; they went on the evaluate run only. So do those of
    runs:/<train run id>/model, which went on the evaluate run only too: register then found the model unevaluated;
    and those of models:/cifar10-resnet/latest (MLflow's newest version), which went on the evaluate run only."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    uri = evaluated_model(experiment_id, {"test_acc": 0.5})
    registered(experiment_id, uri)
    source_run = MlflowClient().get_logged_model(uri.removeprefix("models:/")).source_run_id
    for other_uri, acc in (("models:/cifar10-resnet@champion", 0.6), ("models:/cifar10-resnet/1", 0.7),
                           (f"runs:/{source_run}/model", 0.8), ("models:/cifar10-resnet/latest", 0.9)):
        evaluate_again(experiment_id, other_uri, {"test_acc": acc})
        assert registry.model_test_acc(uri).test_acc == acc
    assert steps.logged_model_id(f"runs:/{source_run}/no-such-model") is None
    assert steps.registered_model_id("models:/cifar10-resnet@nobody") is None
    assert steps.registered_model_id("models:/cifar10-resnet/no-such-stage") is None
    assert steps.registered_model_id("models:/cifar10-resnet/2") is None


def test_an_evaluation_of_a_model_uri_with_a_trailing_slash_lands_on_its_logged_model(store):
    """evaluate -P model_uri=models:/m-.../ (a slash left by a shell's completion or a copied path) loaded and scored
    the model, but its scores went on the evaluate run only, unchecked for a model not logged whole: register then
    found the model unevaluated, or took an older score. They go on the logged model, as without the slash."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    uri = evaluated_model(experiment_id, {"test_acc": 0.5})
    registered(experiment_id, uri)
    for other_uri, acc in ((f"{uri}/", 0.6), ("models:/cifar10-resnet/1/", 0.7), ("models:/cifar10-resnet@champion/",
                                                                                   0.8)):
        assert steps.logged_model_id(other_uri) == uri.removeprefix("models:/"), other_uri
        evaluate_again(experiment_id, other_uri, {"test_acc": acc})
        assert registry.model_test_acc(uri).test_acc == acc


def test_register_takes_the_runs_model_uri_evaluate_takes(store, in_process):
    """`-e evaluate -P model_uri=runs:/<train run id>/model` scored the model, then `-e register` with the same URI was
    refused ("expected a logged model URI models:/m-..."): register takes what evaluate takes, and registers the logged
    model behind it."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    uri = evaluated_model(experiment_id, {"test_acc": 0.5})
    source_run = MlflowClient().get_logged_model(uri.removeprefix("models:/")).source_run_id
    done = in_process("register", "--params", TINY, "--overrides", "tracking.experiment=e2e",
                      "--model-uri", f"runs:/{source_run}/model")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered cifar10-resnet v1: @champion moved" in done.stdout, done.stdout[-3000:]
    (version,) = MlflowClient().search_model_versions("name = 'cifar10-resnet'")
    assert registry.version_model_uri(version) == uri
    # a path of the run that holds no model, or a run this store has not: named as such, not as a URI of another form
    # ("expected a logged model URI models:/m-..., got 'runs:/...'", the form register had just taken)
    MlflowClient().set_tag(source_run, "model_uri", uri)  # as train tags its run
    for given, why in ((f"runs:/{source_run}/no-such-model", f"run {source_run} has no model at no-such-model (no "
                                                                 f"MLmodel file there; its model_uri tag is {uri})"),
                       ("runs:/0123456789abcdef/model", "no run 0123456789abcdef in this tracking store")):
        refused = in_process("register", "--params", TINY, "--model-uri", given)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines()[-1] == f"error: model_uri: {given} names no logged model: {why}"
    assert len(MlflowClient().search_model_versions("name = 'cifar10-resnet'")) == 1


def test_register_of_a_run_still_running_without_a_model_says_to_wait_for_it(store, in_process):
    """`-e register -P model_uri=runs:/<train run id>/model` while that run still trains (no model logged yet) said
    "has no model at model (no MLmodel file there)", as of a run that never logs one: it says the run is still
    running, to wait for it and evaluate its model; a run that ended without one says how it ended."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    running = client.create_run(experiment_id).info.run_id
    refused = in_process("register", "--params", TINY, "--model-uri", f"runs:/{running}/model")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: model_uri: runs:/{running}/model names no logged model: run {running} is still RUNNING and has no "
        f"model at model yet (no MLmodel file there): wait for it to finish, evaluate its model, then register it")
    client.set_terminated(running, "FAILED")
    refused = in_process("register", "--params", TINY, "--model-uri", f"runs:/{running}/model")
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: model_uri: runs:/{running}/model names no logged model: run {running} ended FAILED with no model at "
        f"model (no MLmodel file there)")
    assert client.search_registered_models() == []
    assert [r.info.run_id for r in client.search_runs([experiment_id])] == [running]


def test_register_takes_a_registry_uri_and_registers_its_versions_logged_model(store, in_process):
    """`-e register -P model_uri=models:/cifar10-resnet@champion` (or `/1`, `/latest`) with another
    `register.model_name` was refused ("expected a logged model URI models:/m-..."): it registers the logged model of
    the version the URI names, as for that model's `models:/m-...`. An unknown model, version or alias is named in one
    line, exit 2, before any run opens."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    uri = evaluated_model(experiment_id, {"test_acc": 0.5})
    registered(experiment_id, uri)
    for index, registry_uri in enumerate(("models:/cifar10-resnet@champion", "models:/cifar10-resnet/1",
                                          "models:/cifar10-resnet/latest")):
        done = in_process("register", "--params", TINY, "--overrides",
                          f"tracking.experiment=e2e register.model_name=other{index}", "--model-uri", registry_uri)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"model_uri: {registry_uri} is v1 of cifar10-resnet, {uri}" in done.stdout, done.stdout[-3000:]
        assert f"registered other{index} v1: @champion moved" in done.stdout, done.stdout[-3000:]
        (version,) = MlflowClient().search_model_versions(f"name = 'other{index}'")
        assert registry.version_model_uri(version) == uri
    runs = len(MlflowClient().search_runs([experiment_id], run_view_type=ViewType.ALL))
    for registry_uri, line in (("models:/nobody@champion", "no registered model 'nobody'"),
                               ("models:/cifar10-resnet/7", "cifar10-resnet has no version 7"),
                               ("models:/cifar10-resnet@nobody", "no version of cifar10-resnet holds @nobody"),
                               ("models:/cifar10-resnet/Staging", "no version of cifar10-resnet is in stage Staging"),
                               ("models:/cifar10-resnet", "names a registered model but no version of it; give "
                                "models:/cifar10-resnet/<version>, models:/cifar10-resnet@<alias> or "
                                "models:/cifar10-resnet/latest")):
        refused = in_process("register", "--params", TINY, "--overrides", "tracking.experiment=e2e register."
                             "model_name=other9", "--model-uri", registry_uri)
        assert refused.returncode == 2, refused.stderr[-3000:]
        separator = " " if line.startswith("names") else ": "
        assert refused.stderr.strip().splitlines() == [f"error: model_uri: {registry_uri}{separator}{line}"], \
            refused.stderr
    assert len(MlflowClient().search_runs([experiment_id], run_view_type=ViewType.ALL)) == runs
    assert not MlflowClient().search_model_versions("name = 'other9'")


def test_register_takes_a_model_uri_with_a_trailing_slash_as_evaluate_does(store, in_process):
    """`-e register -P model_uri=models:/cifar10-resnet/1/` (or `@champion/`, `/latest/`, `models:/m-.../`: a slash
    left by a shell's completion or a copied path), which evaluate scores as without the slash, was refused ("expected
    a logged model URI models:/m-..."): register reads it as without the slash too, its param as given."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    uri = evaluated_model(experiment_id, {"test_acc": 0.5})
    registered(experiment_id, uri)
    for index, given in enumerate(("models:/cifar10-resnet/1/", "models:/cifar10-resnet@champion/",
                                   "models:/cifar10-resnet/latest//", f"{uri}/")):
        done = in_process("register", "--params", TINY, "--overrides",
                          f"tracking.experiment=e2e register.model_name=other{index}", "--model-uri", given)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"registered other{index} v1: @champion moved" in done.stdout, done.stdout[-3000:]
        (version,) = MlflowClient().search_model_versions(f"name = 'other{index}'")
        assert registry.version_model_uri(version) == uri
        (run,) = MlflowClient().search_runs([experiment_id], f"params.model_uri = '{given}'")
        assert run.data.tags["registered_model_uri"] == uri


def test_register_under_mlflow_run_of_a_uri_it_resolves_keeps_the_given_uri_as_its_param(store, in_process,
                                                                                          monkeypatch):
    """`mlflow run . -e register -P model_uri=runs:/<id>/model` (or a registry URI) logs the -P as given; register
    then logged param model_uri as the logged model it resolved, which MLflow refused ("Changing param values is not
    allowed") after the version was registered and the alias moved: exit 1, a version left without its report. The
    param stays as given, and tag `registered_model_uri` names the logged model registered."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    uri = evaluated_model(experiment_id, {"test_acc": 0.5})
    registered(experiment_id, uri)
    source_run = client.get_logged_model(uri.removeprefix("models:/")).source_run_id
    for index, given in enumerate((f"runs:/{source_run}/model", "models:/cifar10-resnet@champion")):
        wrapper = client.create_run(experiment_id).info.run_id  # as `mlflow run` opens it, its -P logged
        client.log_batch(wrapper, params=[mlflow.entities.Param(key, value) for key, value in (
            ("params", TINY), ("overrides", f"register.model_name=other{index}"), ("model_uri", given))])
        monkeypatch.setenv("MLFLOW_RUN_ID", wrapper)
        done = in_process("register", "--params", TINY, "--overrides", f"register.model_name=other{index}",
                          "--model-uri", given)
        assert done.returncode == 0, done.stderr[-3000:]
        run = client.get_run(wrapper)
        assert run.data.params["model_uri"] == given and run.data.tags["registered_model_uri"] == uri
        assert run.data.tags["registered_version"] == "1"
        assert "decision" in client.get_model_version(f"other{index}", "1").tags  # finished


def test_a_registry_uri_of_a_version_of_the_model_it_would_register_under_registers_nothing(store, in_process,
                                                                                           monkeypatch):
    """`-e register -P model_uri=models:/cifar10-resnet/1` under the same register.model_name registered v1's model
    again as v2 where it had been evaluated since: one line says it is a version of that model for that alias
    already, exit 0, no version and no run written. For another register.alias it is weighed as its models:/m-..."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    uri = evaluated_model(experiment_id, {"test_acc": 0.5})
    registered(experiment_id, uri)
    evaluate_again(experiment_id, uri, {"test_acc": 0.6})
    runs = len(client.search_runs([experiment_id], run_view_type=ViewType.ALL))
    for registry_uri in ("models:/cifar10-resnet/1", "models:/cifar10-resnet@champion"):
        done = in_process("register", "--params", TINY, "--overrides", "tracking.experiment=e2e",
                          "--model-uri", registry_uri)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1] == (
            f"model_uri: {registry_uri} is v1 of cifar10-resnet, register.model_name, for @champion already: nothing "
            f"to register (name another register.model_name or register.alias to register it for that)"
        ), done.stdout[-3000:]
    assert [v.version for v in client.search_model_versions("name = 'cifar10-resnet'")] == [1]
    assert len(client.search_runs([experiment_id], run_view_type=ViewType.ALL)) == runs
    # under `mlflow run`, its run (finished, exit 0) says why it holds nothing, not a blank register run
    wrapper = client.create_run(experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", wrapper)
    done = in_process("register", "--params", TINY, "--model-uri", "models:/cifar10-resnet/1")
    assert done.returncode == 0, done.stderr[-3000:]
    tags = client.get_run(wrapper).data.tags
    assert tags["step"] == "register" and tags["decision"] == done.stdout.strip().splitlines()[-1].removeprefix(
        "model_uri: ")
    monkeypatch.delenv("MLFLOW_RUN_ID")
    # weighed for another alias, as its models:/m-... would be: a version of its own for that alias
    done = in_process("register", "--params", TINY, "--overrides", "tracking.experiment=e2e register.alias=staging",
                      "--model-uri", "models:/cifar10-resnet/1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered cifar10-resnet v2: @staging moved" in done.stdout, done.stdout[-3000:]
    assert str(client.get_model_version_by_alias("cifar10-resnet", "staging").version) == "2"


class Answers(mlflow.pyfunc.PythonModel):
    """A stand-in image classifier that answers `labels`, in order, whatever the pixels."""

    def __init__(self, class_names, labels):
        self.class_names, self.labels, self.tta = list(class_names), labels, "none"

    def predict_proba(self, pixels, batch_size=256):
        import numpy as np

        return np.eye(len(self.class_names), dtype=np.float32)[self.labels[:len(pixels)]]


def test_an_evaluation_of_an_alias_moved_while_it_scores_lands_on_the_model_it_scored(store, in_process, tmp_path,
                                                                                         monkeypatch):
    """evaluate -P model_uri=models:/cifar10-resnet@champion read the alias to load the model, and again to record
    the score: a register moving the alias while it scored put v1's test_acc on v2's logged model, where register
    and compare read it as v2's."""
    import numpy as np

    from pipeline import data

    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    dataset = data.make_synthetic(n_train=16, n_test=40)
    np.savez(tmp_path / "data.npz", x_train=dataset.x_train, y_train=dataset.y_train, x_test=dataset.x_test,
             y_test=dataset.y_test, class_names=np.array(dataset.class_names))
    uris = []
    client.create_registered_model("cifar10-resnet")
    for labels in (dataset.y_test, (dataset.y_test + 1) % 10):  # v1 right on every image, v2 on none
        with mlflow.start_run(experiment_id=experiment_id):
            uris.append(mlflow.pyfunc.log_model(name="model", python_model=Answers(dataset.class_names, labels),
                                                pip_requirements=["mlflow"]).model_uri)
        client.create_model_version("cifar10-resnet", uris[-1], model_id=uris[-1].removeprefix("models:/"))
    client.set_registered_model_alias("cifar10-resnet", "champion", "1")
    scoring = evaluate.score

    def score_while_the_alias_moves(probs, scored):
        client.set_registered_model_alias("cifar10-resnet", "champion", "2")
        return scoring(probs, scored)

    monkeypatch.setattr(evaluate, "score", score_while_the_alias_moves)
    result = in_process("evaluate", "--params", TINY, "--overrides", "tracking.experiment=e2e",
                        "--model-uri", "models:/cifar10-resnet@champion", "--dataset-uri", str(tmp_path / "data.npz"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_acc 1.0000" in result.stdout
    assert registry.model_test_acc(uris[0]).test_acc == 1.0
    assert not client.get_logged_model(uris[1].removeprefix("models:/")).metrics


def test_an_evaluation_whose_run_failed_or_was_deleted_is_no_score(store):
    """evaluate logs its scores on the model before its artifacts: an evaluate run that then failed (an artifact
    upload lost) or was killed left a score that register took as the model's, and compare showed; so did one of a
    run the user deleted. Only finished evaluate runs count."""
    from pipeline import tracking

    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5}))
    challenger = evaluated_model(experiment_id, {"test_acc": 0.4})
    for status in ("FAILED", "KILLED"):
        with mlflow.start_run(experiment_id=experiment_id) as failed:
            steps.log_evaluation({"model_uri": challenger}, {"test_acc": 0.9}, challenger, "a" * 64)
            mlflow.end_run(status)
        assert client.get_run(failed.info.run_id).info.status == status
    assert registry.model_test_acc(challenger).test_acc == 0.4  # its finished evaluation, not the newest
    assert tracking.model_score(challenger)[0]["test_acc"] == 0.4  # compare's column
    decision = registered(experiment_id, challenger)
    assert not decision["alias_moved"] and decision["test_acc"] == 0.4, decision

    deleted = evaluated_model(experiment_id, {"test_acc": 0.9})
    client.delete_run(client.get_logged_model(deleted.removeprefix("models:/")).metrics[0].run_id)
    with pytest.raises(config.ConfigError, match=r"has no test_acc from an evaluate run that finished: its newest "
                                                  r"evaluate run \w+ is deleted; run evaluate on it again"):
        registry.model_test_acc(deleted)
    assert tracking.model_score(deleted) == ({}, None)
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "1"


def test_a_model_whose_only_evaluation_failed_or_is_running_is_refused_naming_that_run(store):
    """A model whose one evaluate run was still RUNNING (or had FAILED) was refused with "run evaluate on it
    first", as if never evaluated: the user ran evaluate, and learned nothing of its run. The line names the run
    and its status."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    with mlflow.start_run(experiment_id=experiment_id):
        uri = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_uri
    for status, hint in (("RUNNING", "wait for it to finish"), ("FAILED", "run evaluate on it again")):
        with mlflow.start_run(experiment_id=experiment_id) as scoring:
            steps.log_evaluation({"model_uri": uri}, {"test_acc": 0.9}, uri, "a" * 64)
            mlflow.end_run(status)
        with pytest.raises(config.ConfigError) as refused:
            registry.model_test_acc(uri)
        assert str(refused.value) == (f"model_uri: {uri} has no test_acc from an evaluate run that finished: its "
                                      f"newest evaluate run {scoring.info.run_id} is {status}; {hint}")
    assert MlflowClient().search_registered_models() == []


def test_a_model_whose_training_run_was_deleted_for_good_registers_whole(store):
    """After `mlflow gc` removed its training run, register failed with a traceback after placing the alias and
    before its report (describing the training run), leaving the version unfinished on every rerun."""
    from mlflow.tracking._tracking_service.utils import _get_store

    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    soft, gone = (evaluated_model(experiment_id, {"test_acc": acc}) for acc in (0.5, 0.6))
    for uri in (soft, gone):  # the stand-in training runs have no description: register would write one
        client.delete_run(client.get_logged_model(uri.removeprefix("models:/")).source_run_id)
    _get_store()._hard_delete_run(client.get_logged_model(gone.removeprefix("models:/")).source_run_id)
    for uri, version in ((soft, "1"), (gone, "2")):
        decision = registered(experiment_id, uri)
        assert decision["alias_moved"] and decision["version"] == int(version), decision
        assert "decision" in client.get_model_version("cifar10-resnet", version).tags  # finished


def test_evaluate_records_how_many_test_images_it_scored(store, monkeypatch, tmp_path):
    """Two evaluations, on the whole test split and on a `data.max_test` subset, differed in the UI by a digest
    only: the count of images scored was in metrics.json alone."""
    from types import SimpleNamespace

    import numpy as np

    from pipeline import data

    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    dataset = data.make_synthetic(n_train=16, n_test=40)
    monkeypatch.setattr(prepare, "load_dataset", lambda uri: dataset)
    monkeypatch.setattr(steps, "load_classifier", lambda uri, logged_model=None: SimpleNamespace(
        class_names=dataset.class_names, tta="none", predict_proba=lambda x, batch_size: np.eye(10)[dataset.y_test]))
    with mlflow.start_run(experiment_id=experiment_id):
        uri = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_uri
    with mlflow.start_run(experiment_id=experiment_id) as run:
        stub_data = tmp_path / "stub-data.npz"  # read by the stub; evaluate digests the file's bytes
        stub_data.write_bytes(b"")
        evaluate.run(config.load(TINY), uri, str(stub_data))
    assert MlflowClient().get_run(run.info.run_id).data.metrics["test_images"] == 40
    assert registry.model_test_acc(uri).metrics["test_images"] == 40  # on the model's page too


def leaky_dataset(copied: int = 6):
    """A synthetic dataset, and a copy of it with its first `copied` test images copied into train/ too (in place of
    training images): the same test split."""
    import numpy as np

    from pipeline import data

    clean = data.make_synthetic(n_train=64, n_test=32)
    x_train = np.concatenate([clean.x_test[:copied], clean.x_train[copied:]])
    y_train = np.concatenate([clean.y_test[:copied], clean.y_train[copied:]])
    return clean, data.Dataset(x_train, y_train, clean.x_test, clean.y_test, clean.class_names)


def test_prepare_records_test_images_in_train_and_says_so_when_reused(store, tmp_path, capsys):
    """Test images copied into train/ were a console warning of the prepare that read them, and not a word when
    main reused that prepare run: the prepare run, its dataset.json and every reuse now say how many."""
    import numpy as np

    _, leaky = leaky_dataset()
    np.savez(tmp_path / "leaky.npz", x_train=leaky.x_train, y_train=leaky.y_train, x_test=leaky.x_test,
             y_test=leaky.y_test, class_names=np.array(leaky.class_names))
    cfg = config.load(TINY, [f"data.source={tmp_path / 'leaky.npz'}", "tracking.experiment=e2e"])
    warning = f"warning: {tmp_path / 'leaky.npz'}: 6 of 32 test images are also training images (the same pixels)"
    uris = []
    for _ in range(2):
        capsys.readouterr()
        uris.append(prepare.ensure_prepared(cfg))
        assert warning in capsys.readouterr().err
    assert uris[0] == uris[1]  # the second one reused the first
    run = MlflowClient().get_run(uris[0].removeprefix("runs:/").partition("/")[0])
    assert run.data.metrics["test_images_in_train"] == 6 and "**6 of the test images" in run.data.tags[
        "mlflow.note.content"]
    summary = mlflow.artifacts.load_dict(uris[0].replace("dataset.npz", "dataset.json"))
    assert summary["test_images_in_train"] == 6


def held_out_copied(copied: int, fraction: float = 0.25, seed: int = 0):
    """A synthetic dataset of 128 training images in which `copied` of the images `train.validation_fraction`
    `fraction` holds out at `train.seed` `seed` have a copy (the same pixels) among the images trained on (in place of
    training images: the same images are held out)."""
    from pipeline import data, fitting

    clean = data.make_synthetic(n_train=128, n_test=32)
    trained, _, held_out, _ = fitting.split_validation(clean, fraction, seed)
    where = {image.tobytes(): i for i, image in enumerate(clean.x_train)}
    x_train = clean.x_train.copy()
    for original, copy in zip(held_out[:copied], trained[:copied], strict=True):
        x_train[where[copy.tobytes()]] = original
    return data.Dataset(x_train, clean.y_train, clean.x_test, clean.y_test, clean.class_names)


@pytest.mark.parametrize(("made", "fraction", "expected"), [
    ("held-out copied", 0.25, 5), ("clean", 0.25, 0), ("test copied", 0.0, 6)])
def test_train_counts_validation_images_it_trains_on(store, in_process, tmp_path, made, fraction, expected):
    """A held-out image with a copy among the images trained on (a picture in the training split twice) inflated
    val_acc, which a sweep selects and prunes on, and nothing said so: the train run logs `val_images_in_train` and
    warns. With train.validation_fraction 0 val_acc is on the test split: the test images that are training images."""
    import numpy as np

    dataset = {"held-out copied": lambda: held_out_copied(5), "clean": lambda: held_out_copied(0),
               "test copied": lambda: leaky_dataset(6)[1]}[made]()
    np.savez(tmp_path / "data.npz", x_train=dataset.x_train, y_train=dataset.y_train, x_test=dataset.x_test,
             y_test=dataset.y_test, class_names=np.array(dataset.class_names))
    result = in_process("train", "--params", TINY, "--epochs", "1", "--overrides",
                        f"data.source={tmp_path / 'data.npz'} train.validation_fraction={fraction} "
                        f"tracking.experiment=e2e {SMALLEST_MODEL}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = experiment_runs(MlflowClient(), "tags.step = 'train'")
    assert run.data.metrics["val_images_in_train"] == expected
    held_out = "held-out training images" if fraction else "test images (train.validation_fraction 0)"
    warning = f"warning: {expected} of the 32 {held_out} val_acc is measured on are also images the model trains on"
    assert warning in result.stderr if expected else "val_acc is measured on are" not in result.stderr


def test_evaluate_counts_test_images_of_the_data_the_model_trained_on(store, monkeypatch):
    """A model trained on a copy with test images in train/ and scored on the cleaned copy (the same test images)
    scored them as unseen; scored on the copy it trained on, nothing on the run or the model said so."""
    from types import SimpleNamespace

    import numpy as np

    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    clean, leaky = leaky_dataset()
    datasets = {"runs:/clean/dataset/dataset.npz": clean, "runs:/leaky/dataset/dataset.npz": leaky}
    monkeypatch.setattr(prepare, "load_dataset", lambda uri: datasets[uri])
    monkeypatch.setattr(evaluate, "dataset_sha256", lambda uri: uri.split("/")[1])  # no prepare run holds the files
    monkeypatch.setattr(steps, "load_classifier", lambda uri, logged_model=None: SimpleNamespace(
        class_names=clean.class_names, tta="none", predict_proba=lambda x, batch_size: np.eye(10)[clean.y_test]))
    for trained_on in ("leaky", "clean", None):  # None: a model no train run logged: the scored dataset's split
        with mlflow.start_run(experiment_id=experiment_id):
            if trained_on:
                mlflow.set_tag("dataset_uri", f"runs:/{trained_on}/dataset/dataset.npz")
            uri = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_uri
        for scored in ("leaky", "clean"):
            with mlflow.start_run(experiment_id=experiment_id) as run:
                metrics = evaluate.run(config.load(TINY), uri, f"runs:/{scored}/dataset/dataset.npz")
            expected = 6 if (trained_on or scored) == "leaky" else 0
            assert MlflowClient().get_run(run.info.run_id).data.metrics["test_images_in_train"] == expected
            assert metrics["test_images_in_train"] == expected
            assert registry.model_test_acc(uri).in_train == expected  # on the model, where register reads it


def test_a_score_on_test_images_the_model_trained_on_takes_no_alias(store):
    """register promoted a test_acc that counted images the model was trained on: it is registered (tagged with
    how many) without the alias, even where no version holds it, and a clean model's score still takes it."""
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    client = MlflowClient()
    leaky = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.9, "test_images_in_train": 6}))
    assert not leaky["alias_moved"] and leaky["version"] == 1
    assert "counts 6 test images the model was trained on" in leaky["reason"]
    version = client.get_model_version("cifar10-resnet", "1")
    assert version.tags["test_images_in_train"] == "6" and version.tags["decision"] == leaky["reason"]
    assert registry.current_champion("cifar10-resnet", "champion") is None
    clean = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5, "test_images_in_train": 0}))
    assert clean["alias_moved"] and clean["reason"] == "no version held @champion", clean
    better = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.95, "test_images_in_train": 1}))
    assert not better["alias_moved"] and "counts 1 test images" in better["reason"]
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "2"
    # a register running alongside weighs the versions registered since it began: never one of those
    assert registry.settle_alias("cifar10-resnet", "champion", "a" * 64, 0) == "2"
    client.delete_registered_model_alias("cifar10-resnet", "champion")
    assert registry.settle_alias("cifar10-resnet", "champion", "a" * 64, 0) == "2"



def main_run(in_process, epochs: str, overrides: str, code: int = 0):
    """`main` on the tiny profile in this process, which must exit `code`."""
    result = in_process("main", "--params", TINY, "--epochs", epochs,
                        "--overrides", f"{overrides} tracking.experiment=e2e".strip())
    assert result.returncode == code, result.stderr[-3000:]
    return result


def test_a_champion_scored_on_other_test_data_is_scored_on_the_challengers_to_compare(store, in_process, monkeypatch):
    """A first register of a smoke run scored on a `data.max_test` subset held @champion for good: every later model
    scored on the whole split was "not comparable". Register now scores the champion's model on the challenger's
    test data (evaluate's own code, with the champion's test-time augmentation), logs that evaluation, compares on
    it, and a later register on that data reuses it instead of scoring again. A register stopped while it scores
    leaves no version, and its rerun scores again."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    small = f"data.synthetic_train=256 data.synthetic_test=128 {SMALLEST_MODEL}"
    main_run(in_process, "1", f"{small} data.max_test=64 evaluate.tta=flip")  # v1, flip TTA, scored on 64 test images
    v1 = client.get_model_version("cifar10-resnet", "1")
    champion_uri = registry.version_model_uri(v1)
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "1"

    scoring = evaluate.run

    def stopped_while_scoring_the_champion(cfg, model_uri, *args, **kwargs):
        if model_uri == champion_uri:
            raise KeyboardInterrupt
        return scoring(cfg, model_uri, *args, **kwargs)

    monkeypatch.setattr(evaluate, "run", stopped_while_scoring_the_champion)
    main_run(in_process, "2", small, code=130)  # v2's model, scored on all 128 test images, without TTA
    assert len(client.search_model_versions("name = 'cifar10-resnet'")) == 1  # nothing registered
    (killed,) = experiment_runs(client, "tags.scores_champion = 'cifar10-resnet/1'")
    assert killed.info.status == "KILLED"
    monkeypatch.setattr(evaluate, "run", scoring)
    main_run(in_process, "2", small)  # the rerun goes on from the trained model: evaluates, scores v1 again, registers
    v2 = client.get_model_version("cifar10-resnet", "2")
    assert v1.tags["test_data_sha256"] != v2.tags["test_data_sha256"]
    (register_run,) = experiment_runs(client, "tags.step = 'register' and tags.registered_version = '2'")
    decision = mlflow.artifacts.load_dict(f"runs:/{register_run.info.run_id}/decision.json")
    assert "not comparable" not in decision["reason"], decision
    # the champion's model scored on v2's test data, in an evaluate run nested in the register run
    (rescore,) = experiment_runs(client, f"tags.`mlflow.parentRunId` = '{register_run.info.run_id}'")
    assert rescore.info.status == "FINISHED" and rescore.data.tags["step"] == "evaluate"
    assert rescore.data.tags["scores_champion"] == "cifar10-resnet/1"
    assert rescore.data.tags["test_data_sha256"] == v2.tags["test_data_sha256"]
    assert rescore.data.params["model_uri"] == champion_uri
    assert rescore.data.params["evaluate.tta"] == "flip"  # as the champion is served and was first scored
    assert rescore.data.metrics["test_images"] == 128 and rescore.data.metrics["test_images_in_train"] == 0
    champion_acc = float(f"{rescore.data.metrics['test_acc']:.6f}")
    assert decision["champion_version"] == 1 and decision["champion_test_acc"] == champion_acc
    assert decision["champion_evaluate_run"] == rescore.info.run_id
    assert decision["alias_moved"] == (decision["test_acc"] > champion_acc), decision
    assert f"v1's {champion_acc:.4f} on this test data (scored on it by evaluate run {rescore.info.run_id}; v1 was " \
           f"registered with {float(v1.tags['test_acc']):.4f} on other test data" in decision["reason"]
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == (
        "2" if decision["alias_moved"] else "1")
    report = mlflow.artifacts.load_dict(f"runs:/{register_run.info.run_id}/champion_vs_challenger.json")
    assert report["test_acc_difference"] == pytest.approx(decision["test_acc"] - champion_acc, abs=1e-6)
    assert report["champion"]["registered_test_acc"] == float(v1.tags["test_acc"])
    assert v2.tags["champion_evaluate_run_id"] == rescore.info.run_id
    assert "v1's test_acc is its model's score on the challenger's test data" in v2.description
    assert client.get_model_version("cifar10-resnet", "1").tags == v1.tags  # it keeps the score it was registered with

    # Rolled back to v1 by hand: a later challenger on v2's test data is weighed by that evaluation, none made again
    client.set_registered_model_alias("cifar10-resnet", "champion", "1")
    worse = {"test_acc": champion_acc / 2}  # than v1 on this test data: the alias stays
    later = registered(experiment_id, evaluated_model(experiment_id, worse, v2.tags["test_data_sha256"]))
    assert later["champion_test_acc"] == champion_acc and later["champion_evaluate_run"] == rescore.info.run_id
    assert f"by evaluate run {rescore.info.run_id}" in later["reason"] and not later["alias_moved"], later
    assert len(experiment_runs(client, "tags.scores_champion = 'cifar10-resnet/1'")) == 2  # the killed one, that one


def test_registers_overlapping_while_they_score_the_champion_each_score_it_and_the_alias_ends_on_the_best(
        store, tmp_path, monkeypatch):
    """Two registers of challengers scored on other test data than the champion's, overlapping while they score it:
    each scores it (nothing tells one that the other is scoring it), each decision is weighed by its own evaluation
    of the same model on the same images, the alias ends on the best, and a later register on that test data reuses
    the newest evaluation instead of scoring a third time (docs/comparing.md#registers-running-at-the-same-time)."""
    import threading
    from types import SimpleNamespace

    from pipeline import data

    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5}))  # v1, on test data "a"
    dataset = data.make_synthetic(n_train=16, n_test=40)
    dataset.save(tmp_path / "other.npz")
    digest = dataset.digest(test_only=True)
    monkeypatch.setattr(steps, "load_classifier", lambda uri: SimpleNamespace(tta="none"))
    monkeypatch.setattr(evaluate, "check_classes", lambda *args: None)
    both_scoring = threading.Barrier(2, timeout=120)

    def scored(cfg, model_uri, dataset_uri, **kwargs):  # evaluate's record of the champion's score, once both score it
        both_scoring.wait()
        steps.log_evaluation({"model_uri": model_uri, "dataset_uri": dataset_uri}, {"test_acc": 0.7}, model_uri,
                             digest)

    monkeypatch.setattr(evaluate, "run", scored)
    challengers = {}
    for acc in (0.8, 0.6):
        with mlflow.start_run(experiment_id=experiment_id):
            uri = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_uri
        with mlflow.start_run(experiment_id=experiment_id):
            steps.log_evaluation({"model_uri": uri, "dataset_uri": str(tmp_path / "other.npz")}, {"test_acc": acc},
                                 uri, digest)
        challengers[acc] = uri
    decisions: dict[float, dict] = {}

    def register_challenger(acc: float) -> None:  # in a thread: MLflow's active run is the thread's own
        decisions[acc] = registered(experiment_id, challengers[acc])

    threads = [threading.Thread(target=register_challenger, args=(acc,)) for acc in challengers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(decisions) == [0.6, 0.8], decisions
    scorings = experiment_runs(client, "tags.scores_champion = 'cifar10-resnet/1'")
    assert len(scorings) == 2 and all(run.info.status == "FINISHED" for run in scorings)  # the work done twice
    assert sorted(d["champion_evaluate_run"] for d in decisions.values()) == sorted(r.info.run_id for r in scorings)
    assert all(d["champion_version"] == 1 and d["champion_test_acc"] == 0.7 for d in decisions.values()), decisions
    assert decisions[0.8]["alias_moved"] and not decisions[0.6]["alias_moved"], decisions
    best = str(decisions[0.8]["version"])
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == best

    client.set_registered_model_alias("cifar10-resnet", "champion", "1")  # rolled back by hand
    later = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.65}, digest))
    assert later["champion_evaluate_run"] in {r.info.run_id for r in scorings} and not later["alias_moved"], later
    assert len(experiment_runs(client, "tags.scores_champion = 'cifar10-resnet/1'")) == 2  # none made again


def test_a_champion_that_cannot_be_scored_on_the_challengers_test_data_keeps_the_alias_saying_why(
        store, tmp_path, monkeypatch):
    """Where the champion's model cannot be scored on the challenger's test data (no dataset named, one unreadable
    or changed since, a model evaluate cannot score), the alias stays as before and the decision says why; no
    evaluate run is opened. Scores on the same test data are compared as they are: nothing is scored again."""
    from pipeline import data

    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5}))  # v1, a stand-in: not loadable
    dataset = data.make_synthetic(n_train=16, n_test=40)
    dataset.save(tmp_path / "other.npz")
    digest = dataset.digest(test_only=True)
    missing = f"runs:/{'0' * 32}/dataset/dataset.npz"
    whys = {
        None: "names no dataset_uri to read that test data from",
        (missing, "b" * 64): f"dataset_uri: cannot read {missing}",
        (str(tmp_path / "other.npz"), "c" * 64): f"{tmp_path / 'other.npz'} holds other test images now (test split "
                                                 f"sha256 {digest[:12]}, not cccccccccccc)",
        (str(tmp_path / "other.npz"), digest): "is not an image classifier this pipeline logged (a Echo)",
    }
    for where, why in whys.items():
        with mlflow.start_run(experiment_id=experiment_id):
            uri = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_uri
        dataset_uri, test_data = where or (None, "d" * 64)
        with mlflow.start_run(experiment_id=experiment_id):
            steps.log_evaluation({"model_uri": uri, **({"dataset_uri": dataset_uri} if dataset_uri else {})},
                                 {"test_acc": 0.9}, uri, test_data)
        decision = registered(experiment_id, uri)
        assert not decision["alias_moved"] and "not comparable, @champion kept" in decision["reason"], decision
        assert "v1's model could not be scored on this one (" in decision["reason"] and why in decision["reason"]
    assert experiment_runs(MlflowClient(), "tags.scores_champion = 'cifar10-resnet/1'") == []
    assert str(MlflowClient().get_model_version_by_alias("cifar10-resnet", "champion").version) == "1"

    def never(*args, **kwargs):
        raise AssertionError("scored again on the same test data")

    monkeypatch.setattr(register, "champion_on_test_data", never)
    decision = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.6}))
    assert decision["alias_moved"] and decision["reason"] == "test_acc 0.6000 beats v1's 0.5000", decision


def test_a_champion_whose_scoring_fails_unexpectedly_keeps_the_alias_and_the_register_goes_on(
        store, tmp_path, monkeypatch, capsys):
    """Scoring the champion on the challenger's test data failing unexpectedly (out of memory, an error of TensorFlow
    or JAX) failed the register before the challenger's version existed, and every rerun the same way: no model
    could be registered until the champion was moved by hand. Now the register goes on: the alias stays, the decision
    says why, the traceback prints, and the scoring run ends FAILED with the reason."""
    from types import SimpleNamespace

    from pipeline import data, evaluate

    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5}))  # v1, on test data "a"
    dataset = data.make_synthetic(n_train=16, n_test=40)
    dataset.save(tmp_path / "other.npz")
    monkeypatch.setattr(steps, "load_classifier", lambda uri: SimpleNamespace(tta="none"))
    monkeypatch.setattr(evaluate, "check_classes", lambda *args: None)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while scoring")

    monkeypatch.setattr(evaluate, "run", out_of_memory)
    with mlflow.start_run(experiment_id=experiment_id):
        uri = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_uri
    with mlflow.start_run(experiment_id=experiment_id):
        steps.log_evaluation({"model_uri": uri, "dataset_uri": str(tmp_path / "other.npz")}, {"test_acc": 0.9}, uri,
                             dataset.digest(test_only=True))
    decision = registered(experiment_id, uri)
    assert not decision["alias_moved"] and decision["version"] == 2, decision
    assert ("v1's model could not be scored on this one (unexpected RuntimeError: RESOURCE_EXHAUSTED: out of memory "
            "while scoring" in decision["reason"]), decision
    assert "Traceback" in capsys.readouterr().err
    (scoring,) = experiment_runs(MlflowClient(), "tags.scores_champion = 'cifar10-resnet/1'")
    assert scoring.info.status == "FAILED"
    assert scoring.data.tags["failure_reason"].startswith("unexpected RuntimeError: RESOURCE_EXHAUSTED")
    assert str(MlflowClient().get_model_version_by_alias("cifar10-resnet", "champion").version) == "1"


def test_the_run_scoring_a_champion_of_the_longest_model_name_has_a_name_mlflow_keeps(store, tmp_path, monkeypatch):
    """MLflow keeps a run's name in a 250-character column, which PostgreSQL (a team's store) enforces: the run scoring
    a champion of a 256-character register.model_name, `evaluate-<name>-v1`, would fail the register there."""
    from types import SimpleNamespace

    from pipeline import data, evaluate

    name = "m" * 256
    cfg = config.load(TINY, f"register.model_name={name}")
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    champion = evaluated_model(experiment_id, {"test_acc": 0.5})  # v1, on test data "a"
    with mlflow.start_run(experiment_id=experiment_id):
        register.run(cfg, champion)
    dataset = data.make_synthetic(n_train=16, n_test=40)
    dataset.save(tmp_path / "other.npz")
    monkeypatch.setattr(steps, "load_classifier", lambda uri: SimpleNamespace(tta="none"))
    monkeypatch.setattr(evaluate, "check_classes", lambda *args: None)
    monkeypatch.setattr(evaluate, "run", lambda *args, **kwargs: {})  # scores nothing: the run's name is the point
    with mlflow.start_run(experiment_id=experiment_id):
        uri = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"]).model_uri
    with mlflow.start_run(experiment_id=experiment_id):
        steps.log_evaluation({"model_uri": uri, "dataset_uri": str(tmp_path / "other.npz")}, {"test_acc": 0.9}, uri,
                             dataset.digest(test_only=True))
    with mlflow.start_run(experiment_id=experiment_id):
        register.run(cfg, uri)
    (scoring,) = experiment_runs(MlflowClient(), f"tags.scores_champion = '{name}/1'")
    assert len(scoring.info.run_name) == 250 and scoring.info.run_name.startswith("evaluate-mmm")
    assert scoring.info.run_name.endswith("m-v1")


def test_a_dead_mains_register_leaves_no_evaluation_of_its_champion_running(store):
    """A main killed (SIGKILL) while its register scored the champion left that nested evaluate run RUNNING for
    good: the next main ends it KILLED with the dead main's steps."""
    from pipeline.tracking import resume

    experiment_id = mlflow.get_experiment_by_name("e2e").experiment_id
    dead = mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}).info.run_id
    step = mlflow.start_run(nested=True, experiment_id=experiment_id, tags={"step": "register"}).info.run_id
    scoring = mlflow.start_run(nested=True, experiment_id=experiment_id, tags={"step": "evaluate"}).info.run_id
    for _ in range(3):
        mlflow.end_run("RUNNING")
    with mlflow.start_run(experiment_id=experiment_id, tags={"step": "main"}) as rerun:
        resume.end_dead_main(MlflowClient(), dead, tag="ended_by")
    for run_id in (dead, step, scoring):
        run = MlflowClient().get_run(run_id)
        assert (run.info.status, run.data.tags.get("ended_by")) == ("KILLED", rerun.info.run_id)


def test_a_champion_weighed_by_its_registered_score_names_no_other_evaluation_as_its_source(store):
    """A champion's registered score whose evaluate run is gone (deleted) was reported as measured by its model's
    newest evaluation, another (a register's scoring of it on other test data, here): the challenger's tag
    `champion_evaluate_run_id` and the decision named a run that measured another test_acc on other images."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    v1_model = evaluated_model(experiment_id, {"test_acc": 0.5})  # on test data "a"
    registered(experiment_id, v1_model)
    own = client.get_model_version("cifar10-resnet", "1").tags[registry.EVALUATE_RUN_TAG]
    client.delete_run(own)  # its evaluation gone: the version keeps the score it was registered with
    evaluate_again(experiment_id, v1_model, {"test_acc": 0.7}, "b" * 64)  # its model scored on other test data
    decision = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.6}))  # on "a" again
    assert decision["champion_test_acc"] == 0.5 and decision["alias_moved"], decision
    assert decision["champion_evaluate_run"] is None, decision
    assert registry.CHAMPION_EVALUATE_RUN_TAG not in client.get_model_version("cifar10-resnet", "2").tags


def register_refused(in_process, experiment_id: str, uri: str) -> str:
    """Register `uri` in experiment e2e; assert it exits 2 and leaves no run behind; its last line of stderr."""
    client = MlflowClient()
    runs = {r.info.run_id for r in client.search_runs([experiment_id], run_view_type=ViewType.ALL)}
    result = in_process("register", "--params", TINY, "--overrides", "tracking.experiment=e2e", "--model-uri", uri)
    assert result.returncode == 2, result.stderr[-3000:]
    assert {r.info.run_id for r in client.search_runs([experiment_id], run_view_type=ViewType.ALL)} == runs
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("acc", "read"), [(93.1, "93.1"), (-0.25, "-0.25"), (float("inf"), "1.79769e+308")])
def test_a_model_whose_test_acc_is_no_accuracy_is_refused_before_anything_is_registered(store, in_process, acc,
                                                                                        read):
    """A test_acc on a logged model that is no accuracy in [0, 1] (logged by another tool: a percentage; inf, which
    MLflow's SQL store keeps as the largest float) was registered as any score: 93.1 took the alias, and no score of
    evaluate's could beat it again. Refused in one line naming the model and the value, exit 2, no register run, no
    version. (NaN: test_a_model_whose_test_acc_is_nan_is_refused_not_read_as_0.)"""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    uri = evaluated_model(experiment_id, {"test_acc": acc})
    line = register_refused(in_process, experiment_id, uri)
    assert line.startswith(f"error: model_uri: {uri} has test_acc {read}, no accuracy in [0, 1] (logged by run "), line
    assert client.search_registered_models() == []


def test_a_model_whose_test_acc_is_nan_is_refused_not_read_as_0(store, in_process):
    """A test_acc logged as NaN on a logged model (a diverged model's score, logged by other code) reads back from
    MLflow's SQL store as 0.0 (it keeps no NaN flag for a logged model's metrics, as it does for a run's): register
    registered it as a score of 0, and moved the alias to it where no version held it. The evaluate run's own metric
    says NaN: refused in one line naming the model and saying so, exit 2, no register run, no version."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    uri = evaluated_model(experiment_id, {"test_acc": math.nan, "test_loss": math.nan})
    assert registry.model_score(uri).test_acc != 0.0
    line = register_refused(in_process, experiment_id, uri)
    assert line.startswith(f"error: model_uri: {uri} has test_acc NaN (logged by run "), line
    assert line.endswith("as a diverged model's score is: train it again with a lower train.lr"), line
    assert client.search_registered_models() == []


def test_a_model_whose_artifacts_are_gone_is_refused_before_anything_is_registered(store, in_process):
    """A model evaluated, then its files removed (by hand, or `mlflow gc` of its deleted run): register registered it
    and moved the alias to a model no one can load or serve. Refused in one line naming it, exit 2, no register run,
    no version, the alias where it was."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    registered(experiment_id, evaluated_model(experiment_id, {"test_acc": 0.5}))
    uri = evaluated_model(experiment_id, {"test_acc": 0.9})
    shutil.rmtree(client.get_logged_model(uri.removeprefix("models:/")).artifact_location.removeprefix("file://"))
    assert register_refused(in_process, experiment_id, uri) == (
        f"error: model_uri: {uri} cannot be registered: its artifacts are gone: no MLmodel file (nothing to load or "
        f"serve); train it again")
    assert [str(v.version) for v in client.search_model_versions("name = 'cifar10-resnet'")] == ["1"]
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "1"


def scored_without_digest(experiment_id: str, metrics: dict[str, float]) -> str:
    """A stand-in logged model whose score has no test split digest (scored before evaluate recorded one, or by
    hand)."""
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.log_metrics(metrics)
        mlflow.log_metrics(metrics, model_id=info.model_id)
    return info.model_uri


def test_a_champion_scored_on_an_unknown_test_split_of_another_size_does_not_compete(store):
    """A champion whose score has no test split digest was weighed against any challenger as if on the same images: one
    measured on 1,280 test images kept the alias against one on 10,000 scoring less, or lost it to one scoring more,
    without a word. Their numbers of test images differ: not comparable, as for other digests (the alias stays, the
    reason gives both counts). Where that too is unknown, they are compared, and the reason says the split is
    unknown."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    registered(experiment_id, scored_without_digest(experiment_id, {"test_acc": 0.9, "test_images": 1280}))
    for acc in (0.85, 0.95):
        decision = registered(experiment_id, evaluated_model(experiment_id, {"test_acc": acc, "test_images": 10000}))
        assert not decision["alias_moved"], decision["reason"]
        assert decision["reason"].startswith(
            f"test_acc {acc:.4f} was measured on other test data than v1's 0.9000 (10000 vs 1280 test images, v1's "
            f"test split unknown), and v1's model could not be scored on this one"), decision["reason"]
    assert str(client.get_model_version_by_alias("cifar10-resnet", "champion").version) == "1"
    for uri, unknown in ((evaluated_model(experiment_id, {"test_acc": 0.5}), "v1's test split is"),
                         (scored_without_digest(experiment_id, {"test_acc": 0.5}), "both test splits are")):
        decision = registered(experiment_id, uri)
        assert not decision["alias_moved"], decision["reason"]
        assert decision["reason"] == (f"test_acc 0.5000 does not beat v1's 0.9000 ({unknown} unknown: compared as if "
                                      f"the same)"), decision["reason"]


def test_register_refuses_an_empty_uri_or_a_models_folder_saying_what_to_give(store, in_process):
    """`-P model_uri=` (or a blank) and a downloaded model's folder, which evaluate takes, were refused as "expected a
    logged model URI models:/m-..., got ''": the line says the value is empty, or that a folder is no model register
    takes, naming the logged model the folder was downloaded from; `runs:/` with no run id says that. Exit 2, no run."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    uri = evaluated_model(experiment_id, {"test_acc": 0.5})
    folder = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    forms = "give models:/m-..., models:/<name>@<alias>, models:/<name>/<version> or runs:/<train run id>/model"
    runs = {r.info.run_id for r in client.search_runs([experiment_id], run_view_type=ViewType.ALL)}
    for given, line in (("", f"model_uri: empty; {forms}"), (" ", f"model_uri: empty; {forms}"),
                        (folder, f"model_uri: {folder} is a folder, no model register takes: it holds a copy of "
                                 f"{uri}: give that"),
                        ("file:///nowhere", f"model_uri: 'file:///nowhere' is no model register takes; {forms}"),
                        ("runs:/", "model_uri: runs:/ names no logged model: no run id after runs:/")):
        result = in_process("register", "--params", TINY, "--overrides", "tracking.experiment=e2e",
                            "--model-uri", given)
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1] == f"error: {line}", result.stderr[-3000:]
    assert {r.info.run_id for r in client.search_runs([experiment_id], run_view_type=ViewType.ALL)} == runs
    assert client.search_registered_models() == []


def test_register_refuses_a_model_of_a_run_in_the_trash_before_any_run_opens(store, in_process):
    """A model evaluated, then its training run deleted (MLflow's trash, its artifacts kept until `mlflow gc`): evaluate
    refuses to score such a model, but register registered it and could move the alias to a model its user
    discarded. Refused in one line naming the run and how to restore it, exit 2, no run, no version."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    uri = evaluated_model(experiment_id, {"test_acc": 0.9})
    trained = client.get_logged_model(uri.removeprefix("models:/")).source_run_id
    client.delete_run(trained)
    assert register_refused(in_process, experiment_id, uri) == (
        f"error: model_uri: {uri} was logged by run {trained}, which is in MLflow's trash; restore it (mlflow runs "
        f"restore --run-id {trained}) to register its model")
    assert client.search_registered_models() == []
