"""The fast path (mixed precision, XLA, data parallelism on one or several hosts) trains the same model.
The JAX backend's share of it is in test_fast_path_jax.py, a file of its own so that it runs beside these."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

import keras
import mlflow
import pytest
from mlflow import MlflowClient

from pipeline import config, distribute, prepare, train
from pipeline.tracking import cli
from pipeline.tracking.resume import TRAIN_CODE
from tests.conftest import ROOT, Host, Launcher, free_port, module_code
from tests.test_fault_tolerance import kill_tree, wait_until_stopped


def val_acc_curve(run_id: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, "val_acc"), key=lambda m: m.step)]


# One stage of basic blocks, for trainings whose model is not what a test is about: fewer layers to build, trace and
# for XLA to compile (the mixed-precision test's trainings learn the colours with it as well).
ONE_STAGE = "model.block=basic model.widths=[16] model.strides=[1]"


def test_mixed_precision_and_xla_reach_the_same_place_as_float32(store):
    curves, tags = {}, {}
    for name, overrides in {"float32": ["train.jit_compile=false"],
                            "fast": ["train.precision=mixed_bfloat16", "train.jit_compile=true",
                                     "train.steps_per_execution=4"]}.items():
        cfg = config.load("params/tiny.yaml", ["data.synthetic_train=512", "data.synthetic_test=128",
                                               *ONE_STAGE.split(), *overrides])
        with mlflow.start_run(experiment_id=MlflowClient().get_experiment_by_name("e2e").experiment_id) as run:
            dataset_uri = prepare.ensure_prepared(cfg)
            train.run(cfg, dataset_uri)
        curves[name] = val_acc_curve(run.info.run_id)
        tags[name] = MlflowClient().get_run(run.info.run_id).data.tags
    # What the trained models actually used (read off the compiled model), not just what was asked for.
    assert (tags["fast"]["dtype_policy"], tags["fast"]["jit_compile"]) == ("mixed_bfloat16", "true")
    assert (tags["float32"]["dtype_policy"], tags["float32"]["jit_compile"]) == ("float32", "false")
    assert len(curves["float32"]) == len(curves["fast"]) == 3
    assert keras.mixed_precision.global_policy().name == "float32"  # the fast run's policy did not leak
    # Same data, same seed, same schedule: both learn, and end within a few points of each other.
    assert curves["float32"][-1] > 0.5 and curves["fast"][-1] > 0.5
    assert abs(curves["float32"][-1] - curves["fast"][-1]) < 0.15, curves


def run_mirrored(launcher: Launcher, env: dict, *overrides: str) -> Host:
    """Train in a fresh process (see `Launcher`) with 2 TensorFlow logical CPU devices: one `train` command per
    OVERRIDES, one after the other in that process, each with train.distribute=mirrored."""
    code = textwrap.dedent(f"""
        import sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from pipeline import train
        from pipeline.tracking import cli
        for overrides in {list(overrides)!r}:
            sys.argv = ["train", "--params", "params/tiny.yaml", "--epochs", "2",
                        "--overrides", "train.distribute=mirrored tracking.experiment=e2e " + overrides]
            cli(train.main)
    """)
    host = launcher.start({**env, "KERAS_BACKEND": "tensorflow"}, code)
    host.wait(timeout=600)
    return host


def test_data_parallel_over_two_tensorflow_devices(launcher, store):
    """Plain, then with weight EMA, which recomputes the BN statistics under the strategy (train.ema_bn_batches),
    then an epoch ending in fewer images than replicas, refused: three `train` commands in one process, which sets up
    its two devices once (TensorFlow start-ups saved). 1,025 images at batch 32 end each epoch with 1 image for 2
    replicas: one would normalise an empty slice (NaN BatchNormalization statistics: 'diverged' on a GPU, a failed
    conv on CPU devices). Exit 2, one line, before any run opens."""
    small = "data.synthetic_train=512 data.synthetic_test=128 "
    host = run_mirrored(launcher, store, small, small + "train.ema=true train.ema_momentum=0.9 train.ema_bn_batches=4",
                        "data.synthetic_train=1025 train.batch_size=32")
    _, err = host.communicate()
    # the last command's exit: a failure of either training before it would have ended the process with no refusal
    assert host.returncode == 2, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "train.batch_size" in line and "batch of 1 of the 1025" in line and "drop_remainder=true" in line
    assert "Traceback" not in err
    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    runs = assert_two_device_runs(client, "tensorflow", 2, "attributes.status = 'FINISHED'")
    assert sorted((run.data.params["train.ema"], run.data.params["train.ema_bn_batches"]) for run in runs) == [
        ("false", "50"), ("true", "4")]
    # refused before any run opened (the image count known from the params): no train run left FAILED
    assert client.search_runs([experiment], "attributes.status != 'FINISHED'") == []
    models = client.search_logged_models([experiment])
    assert {model.source_run_id for model in models} == {run.info.run_id for run in runs}  # none of the refused one


def assert_two_device_run(client: MlflowClient, backend: str):
    """The one train run of the store's `e2e` experiment trained 2 epochs on both devices, and learned: that run."""
    (run,) = assert_two_device_runs(client, backend, 1)
    return run


def assert_two_device_runs(client: MlflowClient, backend: str, count: int, where: str = "") -> list:
    """The store's `e2e` experiment holds `count` train runs (those matching WHERE, a filter string, if given), each
    trained 2 epochs on both devices and learned."""
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id],
                              "tags.step = 'train'" + (f" and {where}" if where else ""))
    assert len(runs) == count, [run.info.run_id for run in runs]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(run.data.tags["devices"].split(", ")) == 2 and run.data.tags["replicas"] == "2", run.data.tags
        assert run.data.tags["backend"] == backend
        assert len(val_acc_curve(run.info.run_id)) == 2
        assert run.data.metrics["acc"] > 0.5
    return runs


def start_two_hosts(launcher: Launcher, env: dict, *args: str, ports: list[int] | None = None,
                    worker_args: tuple[str, ...] = (), worker_root: Path = ROOT,
                    preludes: tuple[str, str] = ("", "")) -> list[Host]:
    """Two processes on localhost standing for two hosts, as in the README: the chief (worker 0) runs the whole
    pipeline, worker 1 `pipeline.train` with the same ARGS (`--option value` pairs), those WORKER_ARGS name taking
    WORKER_ARGS' values instead (an option given twice is refused), from the checkout WORKER_ROOT; TF_CONFIG differs
    in the task index only. train.distribute stays auto. PRELUDES: Python code each host runs first, in the process
    that then runs its module (a fault of that host alone)."""
    replaced = set(worker_args[0::2])
    worker_args = (*(part for name, value in zip(args[0::2], args[1::2], strict=True) if name not in replaced
                     for part in (name, value)), *worker_args)
    cluster = {"worker": [f"localhost:{port}" for port in ports or (free_port(), free_port())]}
    return [launcher.start({**env, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                            "task": {"type": "worker", "index": i}})},
                           module_code(module, list(host_args), prelude), root)
            for i, (module, host_args, root, prelude) in enumerate([("pipeline.main", args, ROOT, preludes[0]),
                                                                    ("pipeline.train", worker_args, worker_root,
                                                                     preludes[1])])]


def finish(procs: list[Host]) -> list[str]:
    """Wait for both hosts; each must exit 0. Their stdout + stderr."""
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return [out + err for out, err in outputs]


def test_both_hosts_killed_rerun_and_continue_the_same_run(launcher, store, tmp_path):
    """The README's multi-host resume: both hosts die (SIGKILL) after the first epoch's checkpoints; rerunning
    both commands continues the chief's MLflow run from there, the lr schedule crossing its boundary after it.
    Hosts whose checkpoints disagree are refused first, on every host, before any step. The run that ends is the
    README's whole multi-worker run: the chief's pipeline through register, over both hosts, logged by the chief
    alone (worker 1 opens no run)."""
    ports = [free_port(), free_port()]
    # Epochs twice tiny's (more time between checkpoints to kill in), a step decay after epoch 2 of 3.
    args = ("--params", "params/tiny.yaml", "--epochs", "3", "--overrides",
            "tracking.experiment=e2e data.synthetic_train=2048 train.schedule=step train.lr_boundaries=[0.5]")
    procs = start_two_hosts(launcher, store, *args, ports=ports)
    checkpoints = tmp_path / "checkpoints"
    deadline = time.monotonic() + 300
    while len(saved := list(checkpoints.glob("*/training_metadata.json"))) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.1)
    for proc in procs:  # both hosts die at once, the next checkpoints an epoch away
        kill_tree(proc.pid)
        proc.wait(timeout=30)
    assert [json.loads(path.read_text())["epoch"] for path in saved] == [1, 1]  # 1 epoch done on both, not 2

    # A host whose checkpoint is behind (here: lost) is found as the hosts meet: both refuse, exit 2, no run opened
    (kept,) = checkpoints.glob("worker1-*")
    assert (kept / train.MEETING).read_text() == train.meeting_key(config.load("params/tiny.yaml", [
        "data.synthetic_train=2048", "train.schedule=step", "train.lr_boundaries=[0.5]"]))
    kept.rename(tmp_path / "kept")
    procs = start_two_hosts(launcher, store, *args, ports=ports)
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            "error: resume: the hosts' checkpoints hold different completed epochs (worker 0 1, worker 1 0): they "
            "must continue from the same one. Start afresh: rerun every host with resume=never (`-P resume=never` "
            "on the chief, `--resume never` on the others)")
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "tags.step = 'train'")
    assert run.info.status == "RUNNING"  # as the kill left it (the next main ends it KILLED), not FAILED by a refusal
    assert len(client.search_runs([run.info.experiment_id])) == 3  # the killed main, its prepare and train runs
    assert sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)[-1].step == 1
    assert client.search_model_versions("name = 'cifar10-resnet'") == []

    (tmp_path / "kept").rename(kept)  # the lost checkpoint found again: the same two commands continue the run
    chief, worker = finish(start_two_hosts(launcher, store, *args, ports=ports))
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "tags.step = 'train'")
    assert f"resuming train run {run.info.run_id}" in chief
    for output in (chief, worker):
        assert "Epoch 1/3" not in output and "Epoch 3/3" in output, output[-3000:]  # both restored epoch 1
    assert run.info.status == "FINISHED" and run.data.tags["workers"] == "2"
    assert "worker 1 of 2: training on" in worker
    assert run.data.tags["distribute"] == "multi_worker"
    assert run.data.tags["replicas"] == "2" and len(run.data.tags["devices"].split(", ")) == 1  # the chief's only
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in ("val_acc", "iterations", "lr")}
    assert sorted(history["val_acc"]) == [1, 2, 3]  # no gap, no epoch twice
    per_epoch = history["iterations"][1]
    assert per_epoch > 0 and history["iterations"] == {e: e * per_epoch for e in (1, 2, 3)}
    assert history["lr"] == pytest.approx({1: 0.05, 2: 0.05, 3: 0.005})  # decayed after epoch 2, once resumed
    assert run.data.metrics["acc"] > 0.5
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    # one train, evaluate and register run, none of worker 1's: the chief's mains (the prepare reused after the first)
    assert sorted(r.data.tags["step"] for r in runs) == ["evaluate", "main", "main", "prepare", "register",
                                                         "train"]
    mains = [r for r in runs if r.data.tags["step"] == "main"]
    assert sorted(r.info.status for r in mains) == ["FINISHED", "KILLED"]  # killed, done (the refused one opened none)
    (done,) = [r for r in mains if r.info.status == "FINISHED"]
    assert done.data.metrics["test_acc"] > 0.5
    assert list(checkpoints.iterdir()) == []  # both hosts removed their checkpoints once done


def both_refused_as_they_meet(procs, ports: list[int], other: str) -> None:
    """Each of two hosts exits 2 naming the other as started with `other` things than itself."""
    for index, proc in enumerate(procs):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            f"error: TF_CONFIG: worker {1 - index} (localhost:{ports[1 - index]}) was started with other {other} "
            f"than this host (worker {index}): start every host with the same code, params, epochs, overrides and "
            f"data")


def test_hosts_started_with_other_params_or_code_are_refused_on_every_host(launcher, store, tmp_path):
    """A worker started with another lr, or left on other code (a checkout not pulled), would train other weights
    under the chief's logged params and code (with another batch size or epoch count it would wait on a collective
    forever): both hosts exit 2 as they meet, before any run opens, naming what differs (they were refused in the
    chief's train run, after its main and prepare runs: three runs FAILED). With another model (other variable shapes)
    both failed sooner, with TensorFlow's traceback (exit 1), in building it: its variables' initial values are
    broadcast from the chief. One cluster for all three: a worker with another model, from a checkout whose model.py
    differs by one line, is refused naming both; another lr is another job's params as another model's are."""
    small = ["data.synthetic_train=64", "data.synthetic_test=32"]
    dataset = prepare.build(config.load("params/tiny.yaml", small))
    chiefs = train.training_job(config.load("params/tiny.yaml", small), dataset)
    for other in ("train.lr=0.2", "model.widths=[16,32,128]"):
        job = train.training_job(config.load("params/tiny.yaml", [*small, other]), dataset)
        assert [part for part in job if job[part] != chiefs[part]] == ["model or train params"], other
    worker_root = tmp_path / "checkout"
    for folder in ("pipeline", "params"):
        shutil.copytree(ROOT / folder, worker_root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "MLproject", worker_root)
    with open(worker_root / "pipeline" / "model.py", "a") as f:
        f.write("\nPADDING = 'same'\n")
    ports = [free_port(), free_port()]
    procs = start_two_hosts(launcher, store, "--params", "params/tiny.yaml", "--overrides", "tracking.experiment=e2e",
                            worker_args=("--overrides", "tracking.experiment=e2e model.widths=[16,32,128]"),
                            worker_root=worker_root, ports=ports)
    both_refused_as_they_meet(procs, ports, f"model or train params and other code (pipeline/"
                                            f"{{{','.join(TRAIN_CODE)}}}.py)")
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_worker_on_other_data_is_refused_on_every_host_as_they_meet(launcher, store, tmp_path):
    """The chief given a data path (here a broken archive), worker 1 synthetic data: they met, the chief opened main's
    run, and only then did one of them fail (the chief in reading it, or every host before training, on the data's
    digest), leaving runs FAILED. Each host's hello now carries its data's digest: both exit 2 as they meet, naming
    the data, and no run opens."""
    bad = tmp_path / "cifar10.tar.gz"
    bad.write_bytes(b"not an archive" * 100)
    ports = [free_port(), free_port()]
    procs = start_two_hosts(launcher, store, "--params", "params/tiny.yaml", "--overrides", "tracking.experiment=e2e",
                            "--data", str(bad), worker_args=("--data", "synthetic"), ports=ports)
    both_refused_as_they_meet(procs, ports, train.MEETING_DATA)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_host_stopped_past_the_heartbeat_timeout_is_taken_for_lost_in_one_line_on_both_hosts(launcher, store,
                                                                                               tmp_path):
    """$PIPELINE_HEARTBEAT_TIMEOUT is the cluster's: worker 1 stopped (SIGSTOP) once training has begun is taken for
    lost by the chief past it (TensorFlow's fixed 10 s let it through), and once it goes on it is told in one line
    that the cluster took it for lost. A chief whose own heartbeat came late on a busy machine ended with
    TensorFlow's AbortedError traceback (exit 1). The timeout is one a live host's heartbeat meets on a loaded
    machine (with 2 s, the chief's own could come late under CI's load, and it took itself for lost), and worker 1
    stays stopped until the chief has said it lost it (a fixed 6 s could end before a starved chief noticed)."""
    # Heartbeats go every half timeout: a stopped host is taken for lost between 15 s and 30 s (and a poll of the
    # service) after it stopped here, at TensorFlow's 10 s between 5 s and 10 s
    procs = start_two_hosts(launcher, {**store, distribute.HEARTBEAT_TIMEOUT: "30"}, "--params", "params/tiny.yaml",
                            "--epochs", "30", "--overrides",
                            f"tracking.experiment=e2e data.synthetic_train=2048 {ONE_STAGE}")
    deadline = time.monotonic() + 300
    while not list((tmp_path / "checkpoints").glob("worker1-*/training_metadata.json")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.1)
    stopped = kill_tree(procs[1].pid, signal.SIGSTOP)
    wait_until_stopped(stopped)
    started = time.monotonic()
    while "\nerror: " not in "\n" + (said := (procs[0].folder / "err").read_text()) and procs[0].poll() is None:
        assert time.monotonic() < started + 300, said[-2000:]  # the chief said nothing of worker 1 (hung)
        time.sleep(0.2)
    assert time.monotonic() - started > 14, said[-2000:]  # $PIPELINE_HEARTBEAT_TIMEOUT's 30 s, not TensorFlow's 10
    kill_tree(procs[1].pid, signal.SIGCONT)
    (_, chief), (_, worker) = [p.communicate(timeout=120) for p in procs]
    assert procs[0].returncode == 3, chief[-3000:]
    assert chief.strip().splitlines()[-1].startswith("error: TF_CONFIG: worker 1 stopped answering (TensorFlow: ")
    assert procs[1].returncode == 3, worker[-3000:]
    assert "Traceback" not in worker, worker[-3000:]
    last = worker.strip().splitlines()[-1]  # the chief gone, or the cluster having taken it for lost, as it goes on
    assert last.startswith("error: TF_CONFIG: ") and "rerun every host's command to continue" in last, last


def test_a_chief_that_fails_before_training_is_named_so_on_the_workers(launcher, store):
    """The chief's prepare fails (its data refused as it is read, on the chief alone): worker 1, waiting for it in the
    hosts' first collective, said "worker 0 stopped answering" and "rerun every host's command to continue". Now it
    says the chief ended before training began and where its error is; no host hangs."""
    refused = ("from pipeline import data, prepare\n"
               "def read_source(cfg, key=None):\n"
               "    raise data.DataError('cifar10.tar.gz: unreadable archive (on the chief alone)')\n"
               "prepare.read_source = read_source")
    chief, worker = start_two_hosts(launcher, store, "--params", "params/tiny.yaml", "--overrides",
                                    "tracking.experiment=e2e", preludes=(refused, ""))
    outputs = [p.communicate(timeout=300) for p in (chief, worker)]
    assert chief.returncode == 2, outputs[0][1][-2000:]
    assert "unreadable archive" in outputs[0][1].strip().splitlines()[-1]
    assert worker.returncode == 3, outputs[1][1][-3000:]
    last = outputs[1][1].strip().splitlines()[-1]
    assert last.startswith("error: TF_CONFIG: worker 0 (the chief) ended before training began (TensorFlow: "), last
    assert last.endswith("Its own output says why (and, where the chief could end its MLflow run, in that run's "
                         "failure_reason tag): fix that, then rerun every host's command")


FAULTS = {  # a fault of one host, after the hosts agreed and before training began (see `Distribution.agree`)
    "raises in building the model": "from pipeline import fitting\n"
                                     "def make_model(*args, **kwargs):\n"
                                     "    raise RuntimeError('the model does not fit in memory')\n"
                                     "fitting.make_model = make_model",
    "is killed in building the model": "import os, signal\nfrom pipeline import fitting\n"
                                       "def make_model(*args, **kwargs):\n"
                                       "    os.kill(os.getpid(), signal.SIGKILL)\n"
                                       "fitting.make_model = make_model",
    "is refused in building the model": "from pipeline import fitting\nfrom pipeline.config import ConfigError\n"
                                        "def make_model(*args, **kwargs):\n"
                                        "    raise ConfigError('model.widths: refused on this host alone')\n"
                                        "fitting.make_model = make_model",
    # the chief's model built (the worker's fit waits in its first step), its train run not
    "is refused in opening its train run": "from pipeline import train\nfrom pipeline.config import ConfigError\n"
                                           "def start_training(*args, **kwargs):\n"
                                           "    raise ConfigError('model.widths: refused on this host alone')\n"
                                           "train.start_training = start_training",
}


@pytest.mark.parametrize(("host", "fault"), [("chief", "raises in building the model"),
                                             ("chief", "is killed in building the model"),
                                             ("chief", "is refused in opening its train run"),
                                             ("worker", "is refused in building the model")])
def test_a_host_that_fails_after_the_hosts_agreed_is_named_in_one_line_on_the_other(launcher, store, host, fault):
    """A host failing between `agree` and the first train step (in building the model, whose variables' initial
    values are broadcast from the chief, or the chief in opening its train run while the other waits in `fit`'s
    first step): the other host ended with TensorFlow's UnavailableError traceback (exit 1; on the chief a train run
    FAILED with no reason), or said "worker 0 stopped answering ... rerun every host's command to continue". Now it
    says in one line (exit 3) which host ended before training began; the failing host's own error is its own.
    Known at once, not after the heartbeat timeout (here 600 s, twice what the test allows): a worker that fails
    reports it to the cluster (`Distribution.telling_the_others`), a chief's ending is its coordination service's."""
    failing = 0 if host == "chief" else 1
    started = time.monotonic()
    procs = start_two_hosts(launcher, {**store, distribute.HEARTBEAT_TIMEOUT: "600"}, "--params", "params/tiny.yaml",
                            "--epochs", "1", "--overrides",
                            f"tracking.experiment=e2e {ONE_STAGE}",
                            preludes=tuple(FAULTS[fault] if i == failing else "" for i in (0, 1)))
    (_, failed_err), (_, err) = [procs[i].communicate(timeout=400) for i in (failing, 1 - failing)]
    assert time.monotonic() - started < 300  # ~12 s on an idle 2-core machine; CI's load makes it several times that
    failed, other = procs[failing], procs[1 - failing]
    if "killed" in fault:
        assert failed.returncode == -9
    elif "raises" in fault:
        assert failed.returncode == 1 and failed_err.strip().splitlines()[-1] == (
            "RuntimeError: the model does not fit in memory")
    else:
        assert failed.returncode == 2 and failed_err.strip().splitlines()[-1] == (
            "error: model.widths: refused on this host alone" + (" (main failed in its train step)" if failing == 0
                                                                   else "")), failed_err[-3000:]
    assert other.returncode == 3, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    lost = "worker 0 (the chief)" if host == "chief" else "worker 1"
    assert last.startswith(f"error: TF_CONFIG: {lost} ended before training began (TensorFlow: "), last
    if host == "worker":  # its own reason, as it reported it
        assert "worker/replica:0/task:1 ended with an error of its own: model.widths: refused on this host" in last
    assert last.endswith("): nothing was trained. Its own output says why"
                         + (" (and, where the chief could end its MLflow run, in that run's failure_reason tag)"
                            if failing == 0 else "") + ": fix that, then rerun every host's command"
                         + (" (main failed in its train step)" if failing == 1 else "")), last
    client = MlflowClient()
    experiment = client.get_experiment_by_name("e2e").experiment_id
    (run,) = client.search_runs([experiment], "tags.step = 'train'")
    assert client.get_metric_history(run.info.run_id, "val_acc") == []  # not one epoch
    assert client.search_model_versions("name = 'cifar10-resnet'") == []
    if "killed" in fault:  # left RUNNING: the next main on that host ends it KILLED (`remove_stale_locks`)
        return
    (main,) = client.search_runs([experiment], "tags.step = 'main'")
    assert run.info.status == main.info.status == "FAILED"
    if failing == 1:  # the chief's run says why
        assert run.data.tags["failure_reason"] == last.removeprefix("error: ").removesuffix(
            " (main failed in its train step)")
        assert main.data.tags["failed_step"] == "train"
    elif "refused" in fault:
        assert run.data.tags["failure_reason"] == "model.widths: refused on this host alone"
    else:  # an unexpected error: its type and message, as the workers' line says to look there
        assert run.data.tags["failure_reason"] == main.data.tags["failure_reason"] == (
            "unexpected RuntimeError: the model does not fit in memory; full traceback on the step's stderr (the "
            "console it ran in; `mlflow run` keeps no copy)")


def test_a_workers_checkpoint_is_found_by_a_rerun_that_extends_the_run(store):
    """The chief's `resume=<id>` may grow train.epochs (or change train.checkpoint_every) to extend a killed run: worker
    1's checkpoint, keyed by every param, was then not found and both hosts refused ("checkpoints hold different
    completed epochs (worker 0 1, worker 1 0)"). Other params or data are another job: another folder."""
    cfg, data = config.load("params/tiny.yaml", []), "d" * 64
    folder = train.worker_checkpoint_dir(cfg, data, "worker 1")
    extended = config.load("params/tiny.yaml", ["train.epochs=5", "train.checkpoint_every=2"])
    assert train.worker_checkpoint_dir(extended, data, "worker 1") == folder and folder.name.startswith("worker1-")
    others = {train.worker_checkpoint_dir(config.load("params/tiny.yaml", ["train.lr=0.2"]), data, "worker 1"),
              train.worker_checkpoint_dir(cfg, "e" * 64, "worker 1"),
              train.worker_checkpoint_dir(cfg, data, "worker 2")}
    assert len(others) == 3 and folder not in others


def test_a_cluster_rerun_that_goes_on_from_a_trained_model_trains_nothing(launcher, store, monkeypatch, in_process):
    """The chief's pipeline failed after training (here in register): the rerun's chief goes on from the trained model
    (`trained_before_a_failure`). Worker 1, started to train it, waited in building the model until the chief ended,
    then crashed with TensorFlow's traceback (exit 1); now it is told there is nothing to train and ends (exit 0)."""
    from mlflow.exceptions import MlflowException

    from pipeline import register

    args = ("--params", "params/tiny.yaml", "--epochs", "1", "--overrides", f"tracking.experiment=e2e {ONE_STAGE}")

    def registry_fails(*args, **kwargs):
        raise MlflowException("the registry went away")

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setattr(register, "run", registry_fails)
    with pytest.raises(MlflowException, match="went away"):
        in_process("main", *args)  # trained on this host alone: the same job (train_key) as the cluster's
    chief, worker = finish(start_two_hosts(launcher, store, *args))
    assert "reusing train run" in chief and "Epoch " not in chief + worker
    assert "worker 1: nothing to train: the chief goes on from the model an identical command trained" in worker
    client = MlflowClient()
    (trained,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "tags.step = 'train'")
    assert client.get_model_version_by_alias("cifar10-resnet", "champion").tags["run_id"] == trained.info.run_id


WORKER_1 = json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}})


@pytest.mark.parametrize(("module", "env", "overrides", "message"), [
    ("train", {}, "train.distribute=multi_worker", "error: train.distribute: 'multi_worker' needs TF_CONFIG"),
    ("train", {"TF_CONFIG": "{not json"}, "", "error: TF_CONFIG: not a cluster spec"),
    ("train", {"TF_CONFIG": WORKER_1.replace('"index": 1', '"index": 2')}, "",
     "error: TF_CONFIG: this host's task, worker 2, is not in the cluster, which lists worker 0 and worker 1"),
    ("train", {"TF_CONFIG": WORKER_1, "MLFLOW_RUN_ID": "0123"}, "",
     "error: TF_CONFIG: this host is worker 1, which logs nothing: start it with `python -m pipeline.train`"),
    ("main", {"TF_CONFIG": WORKER_1}, "", "error: TF_CONFIG: this host is worker 1; the pipeline runs on the chief"),
    # main checked the mode only in a cluster: these failed after prepare, in an empty train run under a failed main
    ("main", {}, "train.distribute=multi_worker", "error: train.distribute: 'multi_worker' needs TF_CONFIG"),
    ("main", {}, "train.distribute=data_parallel", "error: train.distribute: 'data_parallel' needs the JAX backend"),
])
def test_bad_cluster_settings_are_param_errors(store, capsys, monkeypatch, module, env, overrides, message):
    """Caught before TensorFlow starts or any run opens; nothing waits for the other hosts."""
    from pipeline import main

    monkeypatch.delenv("TF_CONFIG", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", [module, "--params", "params/tiny.yaml", "--overrides", overrides])
    with pytest.raises(SystemExit) as exit_info:
        cli({"train": train, "main": main}[module].main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []  # tiny's experiment too


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "/nosuch/cifar.npz"],
     "error: data.source: '/nosuch/cifar.npz' is neither 'cifar10', 'synthetic' nor an existing path"),
    (["--dataset-uri", "runs:/0123abcd/dataset"], "error: dataset_uri: runs:/0123abcd/dataset names no prepared "
                                                  "dataset (.npz)"),
])
def test_a_workers_data_that_cannot_be_read_is_refused_before_it_meets_the_others(store, capsys, monkeypatch, args,
                                                                                   message):
    """Worker 1 with a data path or dataset URI bad on it alone met the chief, then failed reading it: the chief's main,
    prepare and train runs were left FAILED ('worker 1 ended before training began'). Refused as the chief's own data
    is, exit 2 before it waits for anyone: the chief then waits for it and opens no run."""
    monkeypatch.setenv("TF_CONFIG", WORKER_1)
    monkeypatch.setenv("PIPELINE_HOSTS_TIMEOUT", "1")
    monkeypatch.setattr(sys, "argv", ["train", "--params", "params/tiny.yaml", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli(train.main)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith(message) and "waiting for" not in out
