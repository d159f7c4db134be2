"""The fast path (mixed precision, XLA, data parallelism on one or several hosts) trains the same model.
The JAX backend's share of it is in test_fast_path_jax.py, a file of its own so that it runs beside these."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import keras
import mlflow
import pytest
from mlflow import MlflowClient

from pipeline import config, prepare, train
from pipeline.tracking import cli
from tests.conftest import ROOT, free_port


def val_acc_curve(run_id: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, "val_acc"), key=lambda m: m.step)]


def test_mixed_precision_and_xla_reach_the_same_place_as_float32(store):
    curves, tags = {}, {}
    for name, overrides in {"float32": ["train.jit_compile=false"],
                            "fast": ["train.precision=mixed_bfloat16", "train.jit_compile=true",
                                     "train.steps_per_execution=4"]}.items():
        cfg = config.load("params/tiny.yaml", overrides)
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


def run_distributed(env: dict, backend: str, mode: str, overrides: str = "") -> subprocess.CompletedProcess:
    """Train in a fresh process with 2 virtual CPU devices (TF logical devices / XLA host devices)."""
    env = {**env, "KERAS_BACKEND": backend, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    script = textwrap.dedent(f"""
        import sys
        if "{backend}" == "tensorflow":
            import tensorflow as tf
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from pipeline import train
        from pipeline.tracking import cli
        sys.argv = ["train", "--params", "params/tiny.yaml", "--epochs", "2",
                    "--overrides", "train.distribute={mode} tracking.experiment=e2e {overrides}"]
        cli(train.main)
    """)
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_data_parallel_over_two_tensorflow_devices(store):
    result = run_distributed(store, "tensorflow", "mirrored")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_two_device_run(MlflowClient(), "tensorflow")


def assert_two_device_run(client: MlflowClient, backend: str):
    """The one train run of the store's `e2e` experiment trained 2 epochs on both devices, and learned: that run."""
    run = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "tags.step = 'train'")[0]
    assert run.info.status == "FINISHED"
    assert len(run.data.tags["devices"].split(", ")) == 2, run.data.tags["devices"]
    assert run.data.tags["backend"] == backend
    assert len(val_acc_curve(run.info.run_id)) == 2
    assert run.data.metrics["acc"] > 0.5
    return run


def test_multi_worker_over_two_local_hosts_logs_from_the_chief_only(store, tmp_path):
    """Two processes on localhost stand for two hosts, as in the README: the chief runs the whole
    pipeline, the worker `pipeline.train` with the same params; TF_CONFIG differs in the task index."""
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    args = ["--params", "params/tiny.yaml", "--epochs", "2", "--overrides", "tracking.experiment=e2e"]
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**store, "TF_CONFIG": json.dumps({"cluster": cluster,
                                                                     "task": {"type": "worker", "index": i}})})
             for i, module in enumerate(["pipeline.main", "pipeline.train"])]  # train.distribute stays auto
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert "worker 1 of 2: training on" in outputs[1][0]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert sorted(r.data.tags["step"] for r in runs) == ["evaluate", "main", "prepare", "register", "train"]
    (run,) = [r for r in runs if r.data.tags["step"] == "train"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["distribute"] == "multi_worker" and run.data.tags["workers"] == "2"
    assert len(val_acc_curve(run.info.run_id)) == 2
    assert run.data.metrics["acc"] > 0.5
    (main_run,) = [r for r in runs if r.data.tags["step"] == "main"]
    assert main_run.data.metrics["test_acc"] > 0.5
    assert list((tmp_path / "checkpoints").iterdir()) == []  # both hosts removed their checkpoints


WORKER_1 = json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}})


@pytest.mark.parametrize(("module", "env", "overrides", "message"), [
    ("train", {}, "train.distribute=multi_worker", "error: train.distribute: 'multi_worker' needs TF_CONFIG"),
    ("train", {"TF_CONFIG": "{not json"}, "", "error: TF_CONFIG: not a cluster spec"),
    ("train", {"TF_CONFIG": WORKER_1.replace('"index": 1', '"index": 2')}, "",
     "error: TF_CONFIG: task {'type': 'worker', 'index': 2} is not a chief or worker listed in the cluster"),
    ("train", {"TF_CONFIG": WORKER_1, "MLFLOW_RUN_ID": "0123"}, "",
     "error: TF_CONFIG: this host is worker 1, which logs nothing: start it with `python -m pipeline.train`"),
    ("main", {"TF_CONFIG": WORKER_1}, "", "error: TF_CONFIG: this host is worker 1; the pipeline runs on the chief"),
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
    assert MlflowClient().search_runs([MlflowClient().get_experiment_by_name("e2e").experiment_id]) == []
