"""bench.multi_gpu: how an arm's run is read (a result, a failure, a result then a crash), the speed-up and the
choice, and the refusal on a machine without several GPUs. Its arms themselves run through bench.gpu_epoch, whose
training code is pipeline.fitting's (tested with two devices in test_fast_path.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from bench import multi_gpu
from pipeline import config
from tests.conftest import ROOT, eventually, free_port
from tests.test_fault_tolerance import TINY


def arm(backend, name, seconds=None, val_acc=0.9, error=None, skipped=None):
    overrides = {a: o for b, a, o in multi_gpu.ARMS if b == backend}[name]
    entry = {"backend": backend, "arm": name, "overrides": overrides}
    if skipped:
        return {**entry, "skipped": skipped}
    result = {"devices": ["gpu:0", "gpu:1"], "jit_compile": "true", "steady_epoch_seconds": seconds,
              "train_images_per_second": round(48000 / seconds) if seconds else None, "val_acc": [0.5, val_acc]}
    return {**entry, "result": {**result, **({"error": error} if error else {})}}


def test_speed_up_over_the_backends_one_device_and_the_fastest_clean_arm_is_chosen(tmp_path):
    results = {"machine": "m", "date": "2026-12-04", "command": "", "params": "params/fast.yaml", "epochs": 3,
               "arms": [arm("tensorflow", "one device", 2.0), arm("tensorflow", "MirroredStrategy", 1.25),
                        arm("tensorflow", "MirroredStrategy + XLA", 0.8),
                        arm("jax", "one device", 1.0),
                        arm("jax", "DataParallel", 0.5, error="exit 134 after its result")]}
    frame = multi_gpu.table(results)
    assert list(frame["speed-up"]) == [1.0, 1.6, 2.5, 1.0, 2.0]
    assert list(frame["images/s (train steps)"]) == [24000, 38400, 60000, 48000, 96000]  # bench.gpu_epoch's figure
    assert "MirroredStrategy + XLA" in multi_gpu.choice(frame) and "2.5x" in multi_gpu.choice(frame)  # not the crash
    results["arms"] = [arm("tensorflow", "one device", skipped="tensorflow is not installed"),
                       arm("jax", "DataParallel", error="exit 1: ValueError: boom")]
    multi_gpu.write_markdown(results, tmp_path / "m.md")
    text = (tmp_path / "m.md").read_text()
    assert "tensorflow is not installed" in text and "ValueError: boom" in text
    assert "Choice: no arm ran to a result" in text and "**No arm ran to a result" in text


@pytest.mark.parametrize("virtual", [False, True])
def test_a_benchmark_where_no_arm_ran_to_a_result_says_so_and_exits_non_zero(monkeypatch, tmp_path, capsys,
                                                                               virtual):
    """Every arm failing at run time wrote its table of failures ("nothing to choose") and exited 0: a script or CI
    took the benchmark for done."""
    monkeypatch.setattr(multi_gpu, "gpu_names", lambda: ["NVIDIA H200", "NVIDIA H200"])
    monkeypatch.setattr(multi_gpu, "run_arm", lambda *a: {"error": "exit 1: ValueError: boom"})
    argv = ["--backends", "jax", "--results", str(tmp_path), *(["--virtual-cpus", "2"] if virtual else [])]
    with pytest.raises(SystemExit) as exit_info:
        multi_gpu.main(argv)
    assert exit_info.value.code not in (0, None)
    assert str(exit_info.value.code) == (f"error: no arm ran to a result (the first: exit 1: ValueError: boom); "
                                         f"{tmp_path / 'multi_gpu.md'} says so")
    text = (tmp_path / "multi_gpu.md").read_text()
    assert "**No arm ran to a result: nothing was measured**" in text and "ValueError: boom" in text
    assert "Choice: no arm ran to a result" in text
    # one arm with a number (its process crashed after its result): measured, exit 0
    results = iter([{"error": "exit 1: ValueError: boom"},
                    {"steady_epoch_seconds": 1.0, "devices": ["cpu:0", "cpu:1"], "error": "exit 134 after its result"}])
    monkeypatch.setattr(multi_gpu, "run_arm", lambda *a: next(results))
    multi_gpu.main(argv)
    assert "No arm ran" not in (tmp_path / "multi_gpu.md").read_text()


@pytest.mark.parametrize(("code", "writes", "stderr", "error"), [
    (0, True, "", None),
    (134, True, "F1204 rendezvous.cc:161] Termination timeout", "exit 134 after its result"),
    (1, False, "Traceback ...\nValueError: train.distribute: 'mirrored' needs the TensorFlow backend\n",
     "exit 1: ValueError: train.distribute: 'mirrored' needs the TensorFlow backend"),
    (1, False, "W0000 a warning\ntensorflow.python.framework.errors_impl.InvalidArgumentError: Graph execution error:"
               "\n\nTrying to access resource x located in device CPU:1 from device CPU:0\n",
     "exit 1: tensorflow.python.framework.errors_impl.InvalidArgumentError: Graph execution error: Trying to access "
     "resource x located in device CPU:1 from device CPU:0"),
    # TensorFlow's graph traceback between the exception and its cause (XLA under MirroredStrategy on 2 CPU devices):
    # the note was "...Graph execution error: Detected at node StatefulPartitionedCall defined at (most recent call
    # last): File "<frozen runpy>", line 198, ..." up to its 300 characters
    (1, False, "tensorflow.python.framework.errors_impl.InvalidArgumentError: Graph execution error:\n"
               "Detected at node StatefulPartitionedCall defined at (most recent call last):\n"
               '  File "<frozen runpy>", line 198, in _run_module_as_main\n'
               + '  File "/x/keras/src/backend/tensorflow/trainer.py", line 125, in wrapper\n' * 9
               + "Trying to access resource seed_generator/state/replica_1/3 (defined @ /x/keras/src/backend/"
               "tensorflow/core.py:43) located in device CPU:1 from device CPU:0\n Cf. https://www.tensorflow.org/xla/known_issues"
               "\n\t [[{{node StatefulPartitionedCall}}]] [Op:__inference_multi_step_on_iterator_7498]\n",
     "exit 1: tensorflow.python.framework.errors_impl.InvalidArgumentError: Graph execution error: Trying to access "
     "resource seed_generator/state/replica_1/3 located in device CPU:1 from device CPU:0 Cf. "
     "https://www.tensorflow.org/xla/known_issues"),
    (-6, False, "F1204 rendezvous.cc:161] Termination timeout\n    @     0x7fb5 std::__invoke_impl<>()\n",
     "exit -6: F1204 rendezvous.cc:161] Termination timeout"),
])
def test_an_arms_run_is_read_as_a_result_or_a_failure(monkeypatch, code, writes, stderr, error):
    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen.update(env=env, cmd=cmd)
        if writes:
            out = cmd[cmd.index("--out") + 1]
            with open(out, "w") as f:
                json.dump({"steady_epoch_seconds": 1.5, "val_acc": [0.8]}, f)
        return subprocess.CompletedProcess(cmd, code, "", stderr)

    monkeypatch.setattr(multi_gpu.subprocess, "run", fake_run)
    args = argparse.Namespace(data="", images=512, virtual_cpus=2, params="params/tiny.yaml", epochs=2,
                              overrides="train.feed=host", timeout=60)
    result = multi_gpu.run_arm("jax", "train.distribute=data_parallel", args)
    assert result.get("error") == error
    assert ("steady_epoch_seconds" in result) == writes
    assert seen["env"]["KERAS_BACKEND"] == "jax" and "device_count=2" in seen["env"]["XLA_FLAGS"]
    assert "train.distribute=data_parallel train.feed=host" in seen["cmd"]


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_rehearsal_on_virtual_cpus_runs_every_arm_on_them_not_on_the_gpus(monkeypatch, backend):
    """`--virtual-cpus 2` on a machine with a GPU (the rehearsal a one-GPU machine can run) said "A rehearsal on 2
    virtual CPU devices" while each arm trained on the GPU: MirroredStrategy and DataParallel take every GPU before
    any CPU device, so both ran over one GPU. The arms see no GPU then; XLA_FLAGS already set are kept."""
    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen.update(env)
        return subprocess.CompletedProcess(cmd, 1, "", "ValueError: boom\n")

    monkeypatch.setattr(multi_gpu.subprocess, "run", fake_run)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/dump")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = argparse.Namespace(data="", images=512, virtual_cpus=2, params="params/tiny.yaml", epochs=2,
                              overrides="", timeout=60)
    multi_gpu.run_arm(backend, "train.distribute=none", args)
    assert seen["CUDA_VISIBLE_DEVICES"] == "" and seen["JAX_PLATFORMS"] == "cpu"
    assert seen["XLA_FLAGS"] == "--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=2"
    seen.clear()
    multi_gpu.run_arm(backend, "train.distribute=none", argparse.Namespace(**{**vars(args), "virtual_cpus": 0}))
    assert "CUDA_VISIBLE_DEVICES" not in seen and seen["XLA_FLAGS"] == "--xla_dump_to=/tmp/dump"


def test_an_arm_past_its_time_limit_is_reported_and_the_others_go_on(monkeypatch):
    def too_slow(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(multi_gpu.subprocess, "run", too_slow)
    args = argparse.Namespace(data="x", images=0, virtual_cpus=0, params="p", epochs=3, overrides="", timeout=90)
    assert multi_gpu.run_arm("tensorflow", "train.distribute=none", args) == {"error": "stopped after --timeout 90 s"}


def test_without_several_gpus_it_refuses(monkeypatch, capsys):
    monkeypatch.setattr(multi_gpu, "gpu_names", lambda: ["NVIDIA H200"])
    with pytest.raises(SystemExit) as exit_info:
        multi_gpu.main(["--backends", "tensorflow"])
    assert exit_info.value.code == 2
    assert "found 1 GPU(s): several are needed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        multi_gpu.main(["--backends", "torch", "--virtual-cpus", "2"])
    assert exit_info.value.code == 2 and "unknown ['torch']" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--backends", ","], "error: --backends: none given"),
    (["--epochs", "1", "--virtual-cpus", "2"], "error: --epochs: must be >= 2"),
    (["--virtual-cpus", "1"], "error: --virtual-cpus: must be 0 or >= 2"),
    (["--virtual-cpus", "-2"], "error: --virtual-cpus: must be 0 or >= 2"),
    (["--overrides", "train.jit_compile=false", "--virtual-cpus", "2"],  # the XLA arm's would be refused
     "error: --overrides: train.jit_compile is set by the arms themselves; give other keys"),
    (["--overrides", "train.seed=1 train.seed=2", "--virtual-cpus", "2"],
     "error: --overrides: train.seed: given twice in overrides ('1' and '2')"),
    # every arm's bench.gpu_epoch refused these after its start-up, and the table of failures was written, exit 0
    (["--params", "params/nosuch.yaml", "--virtual-cpus", "2"],
     "error: --params/--overrides: params: file not found: params/nosuch.yaml"),
    (["--overrides", "train.batch_size=0", "--virtual-cpus", "2"],
     "error: --params/--overrides: train.batch_size: must be >= 1, got 0"),
    (["--data", "nosuch.tar.gz", "--virtual-cpus", "2"], "error: --data: no such file or folder: nosuch.tar.gz"),
    (["--images", "0", "--virtual-cpus", "2"], "error: --images: must be >= 1, got 0"),
    (["--timeout", "0", "--virtual-cpus", "2"], "error: --timeout: must be > 0 seconds, got 0"),
])
def test_arguments_no_arm_can_run_with_are_refused_before_any_arm(monkeypatch, capsys, argv, message):
    """Not one failed arm per backend after its start-up, nor (on a GPU machine) a table of failures written over
    bench/results/multi_gpu.md, nor pandas' KeyError on an empty table."""
    monkeypatch.setattr(multi_gpu, "gpu_names", lambda: ["NVIDIA H200", "NVIDIA H200"])
    monkeypatch.setattr(multi_gpu, "run_arm", lambda *a: pytest.fail("an arm ran"))
    monkeypatch.setattr(multi_gpu, "save_results", lambda *a: pytest.fail("results written"))
    with pytest.raises(SystemExit) as exit_info:
        multi_gpu.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith(message)


# pipeline.distribute: what TF_CONFIG, the backend and the batch allow, and a host lost mid-training.

def tf_config(cluster, task_type="worker", index=0) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


TWO = ["localhost:1", "localhost:2"]


@pytest.mark.parametrize(("raw", "message"), [
    (tf_config({"worker": "host-a:12345"}), "'worker' must be a list of 'host:port' strings"),  # TF: TypeError
    (tf_config({"worker": ["a:1", 2]}), "'worker' must be a list of 'host:port' strings"),
    (tf_config({"chief": TWO}, "chief", 1), "at most one 'chief'"),  # TF: ValueError; both would log to MLflow
    # no host logged: worker 0 under `mlflow run` was told it logs nothing, under `main` to run on the chief
    (tf_config({"chief": [], "worker": TWO}), "'chief' lists no address: leave it out (worker 0 then logs)"),
    (tf_config({"worker": TWO}, index=0.5), "the task index must be 0, 1, ..., got 0.5"),  # int(): worker 0
    (tf_config({"worker": TWO}, index=True), "the task index must be 0, 1, ..., got True"),
    (tf_config({"worker": TWO}, index=-1), "the task index must be 0, 1, ..., got -1"),
    (json.dumps({"cluster": ["a:1", "b:2"], "task": {"type": "worker", "index": 0}}), "not a cluster spec"),
    # each said as Python's exception: "(TypeError: list indices must be integers or slices, not str)", "(KeyError:
    # 'task')", "(TypeError: string indices must be integers, not 'str')"
    ("{'cluster': {}}", "(not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ('["a:1", "b:2"]', "(a JSON object is needed, got a list)"),
    (json.dumps({"cluster": {"worker": TWO}}), "(no 'task': this host's place in the cluster)"),
    (json.dumps({"cluster": {"worker": TWO}, "task": {"index": 1}}), "('task' has no 'type')"),
    (json.dumps({"cluster": {"worker": TWO}, "task": {"type": "worker"}}), "('task' has no 'index')"),
    (json.dumps({"cluster": {"worker": TWO}, "task": "worker"}), "('task' must be an object like {\"type\": "
                                                                 "\"worker\", \"index\": 0}, got 'worker')"),
    # this host's port: bind()'s OverflowError, a traceback; another's: a 10-minute wait, then "Connection refused"
    (tf_config({"worker": ["localhost:99999", "localhost:2"]}), "'localhost:99999' is not a 'host:port' address with"),
    (tf_config({"worker": ["localhost:1", "localhost:0"]}), "'localhost:0' is not a 'host:port' address with a port"),
    (tf_config({"worker": ["localhost:1", "host-b"]}), "'host-b' is not a 'host:port' address with a port in 1-65535"),
    # two tasks on one address: worker 0 found its own port answering, then TensorFlow waited forever (SIGTERM too)
    (tf_config({"worker": ["localhost:1", "localhost:1"]}), "got localhost:1 more than once"),
    (tf_config({"chief": ["localhost:1"], "worker": ["localhost:1"]}), "got localhost:1 more than once"),
    (tf_config({"chief": ["localhost:1"], "worker": ["127.0.0.1:1", "[::1]:2"]}),
     "got localhost:1 = 127.0.0.1:1 more than once"),
    (tf_config({"worker": ["Team-Host:1", "team-host:1"]}), "got Team-Host:1 = team-host:1 more than once"),
    # one port however written: the second host's listener found its port taken, and the first waited, then named
    # its own port as worker 1 started as worker 0
    (tf_config({"worker": ["localhost:2222", "localhost:02222"]}), "got localhost:2222 = localhost:02222 more than"),
    # no host TensorFlow (gRPC) reaches: each waited $PIPELINE_HOSTS_TIMEOUT for it, then "did not start"
    (tf_config({"worker": ["http://host-a:1", "host-b:2"]}), "'http://host-a:1' is not a 'host:port' address"),
    (tf_config({"worker": ["host-a:1", " host-b:2"]}), "' host-b:2' is not a 'host:port' address"),
    (tf_config({"worker": ["::1:1", "host-b:2"]}), "'::1:1' is not a 'host:port' address with a port in 1-65535 (an "
                                                   "IPv6 host in brackets: [::1]:12345)"),
    (tf_config({"worker": ["[]:1", "host-b:2"]}), "'[]:1' is not a 'host:port' address"),
    # a 'ps' never started (MultiWorkerMirroredStrategy has no use for one): TensorFlow waited for it forever
    (tf_config({"worker": TWO, "ps": ["localhost:3"]}), "only 'chief' and 'worker' tasks train here, got 'ps'"),
    # Python's int() reads other scripts' digits; TensorFlow's address parser does not
    (tf_config({"worker": ["localhost:\u0661", "localhost:2"]}), "'localhost:\u0661' is not a 'host:port' address"),
    (tf_config({"worker": TWO}, index="\u0661"), "the task index must be 0, 1, ..., got '\u0661'"),
])
def test_a_malformed_tf_config_is_a_param_error(monkeypatch, raw, message):
    """Each was accepted, then TensorFlow's MultiWorkerMirroredStrategy raised a traceback (exit 1), or the host
    took another task than TensorFlow's."""
    from pipeline import distribute
    from pipeline.config import ConfigError

    monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(ConfigError, match=r"^TF_CONFIG: not a cluster spec") as error:
        distribute.cluster_from_env()
    assert message in str(error.value)



@pytest.mark.parametrize(("task", "index", "said"), [
    ("worker", 2, "worker 2"), ("chief", 0, "chief 0"), ("Worker", 0, "Worker 0"), ("evaluator", 0, "evaluator 0")])
def test_a_task_the_cluster_does_not_list_is_named_with_the_tasks_it_lists(monkeypatch, task, index, said):
    """Said as "task {'type': 'worker', 'index': 2} is not a chief or worker listed in the cluster": what it does
    list, and so which index or type is wrong, was left to the reader to work out from the JSON."""
    from pipeline import distribute
    from pipeline.config import ConfigError

    monkeypatch.setenv("TF_CONFIG", tf_config({"worker": TWO}, task, index))
    with pytest.raises(ConfigError, match=f"^TF_CONFIG: this host's task, {said}, is not in the cluster, which lists "
                                          "worker 0 and worker 1: give this host its own task there$"):
        distribute.cluster_from_env()

def test_a_task_index_written_as_a_string_is_read_as_tensorflow_reads_it(monkeypatch):
    from pipeline import distribute

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("TF_CONFIG", tf_config({"worker": TWO}, index="1"))
    cluster = distribute.cluster_from_env()
    assert (cluster.task, cluster.workers, cluster.chief) == ("worker 1", 2, False)


@pytest.mark.parametrize("raw", ["{}", " { } ", '{"cluster": {}}', '{"task": {"type": "worker", "index": 0}}',
                                 tf_config({}), tf_config({"worker": ["localhost:1"]})])
def test_a_tf_config_naming_no_cluster_trains_on_this_host_alone_as_tensorflow_reads_it(monkeypatch, raw):
    """TF_CONFIG='{}' (what a launcher exports for a job of one host) was refused with exit 2, "not a cluster spec
    (KeyError: 'cluster')", where TensorFlow reads it as no cluster: one host. It stays no cluster for multi_worker."""
    import tensorflow as tf

    from pipeline import distribute
    from pipeline.config import ConfigError

    monkeypatch.setenv("TF_CONFIG", raw)
    spec = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec().as_dict()
    assert spec in ({}, {"worker": TWO[:1]})
    assert distribute.cluster_from_env() is None
    assert distribute.cluster_from_env(any_task=True) is None
    distribute.check_mode("auto", "jax", None)
    with pytest.raises(ConfigError, match="^train.distribute: 'multi_worker' needs TF_CONFIG naming at least two"):
        distribute.check_mode("multi_worker", "tensorflow", distribute.cluster_from_env())


@pytest.mark.parametrize("mode", ["auto", "multi_worker"])
def test_a_cluster_on_another_backend_than_tensorflow_is_refused(monkeypatch, mode):
    """Under JAX TF_CONFIG was ignored: the chief trained alone (tags distribute=none, workers=1) and the README's
    worker command was told to run `python -m pipeline.train`, which it was running."""
    import keras

    from pipeline import distribute
    from pipeline.config import ConfigError

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("TF_CONFIG", tf_config({"worker": TWO}))
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ConfigError, match=f"^train.distribute: '{mode}' with TF_CONFIG naming 2 hosts: training over "
                                          "several hosts .* needs the TensorFlow backend, not jax: set "
                                          "KERAS_BACKEND=tensorflow, or unset TF_CONFIG"):
        distribute.distribution(mode)


class Strategy:
    def __init__(self, replicas: int):
        self.num_replicas_in_sync = replicas


def mirrored(replicas: int = 2, devices: str = "CPU"):
    from pipeline.distribute import Distribution

    return Distribution("mirrored", [f"/device:{devices}:{i}" for i in range(replicas)], Strategy(replicas))


@pytest.mark.parametrize(("batch", "drop", "ghost", "train", "val", "message"), [
    # 1025 images of batch 32 end each epoch with 1 image, 2 replicas: one trains on none, BN's mean of nothing is
    # NaN: val_loss nan after epoch 1 and "training diverged ... Lower train.lr" (on CPU devices: a traceback)
    (32, False, 0, 1025, 256, "each epoch ends with a batch of 1 of the 1025 training images, split over 2 replicas"),
    (1, False, 0, 1024, 256, "train.batch_size: 1 is split over 2 replicas"),
    # ghost 32 of batch 32: 16 per replica; GhostBatchNormalization's ValueError traceback
    (32, True, 32, 1024, 256, "model.ghost_batch: each of the 2 replicas (mirrored over /device:CPU:0, "
                              "/device:CPU:1) normalises its slice of train.batch_size 32 in ghost batches of 32: "
                              "the batch must be a multiple of 2 x 32 = 64"),
    (32, False, 0, 1024, 257, "validation ends with a batch of 1 of the 257 images"),  # oneDNN's conv on CPUs
])
def test_a_batch_the_replicas_cannot_share_is_a_param_error(batch, drop, ghost, train, val, message):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError) as error:
        mirrored().check_batches(batch, drop, ghost, train, val)
    assert message in str(error.value)


def test_batches_every_replica_gets_images_of_are_accepted():
    from pipeline.distribute import Distribution

    mirrored().check_batches(32, True, 0, 1025, 256)  # the partial batch dropped
    mirrored().check_batches(32, False, 0, 1026, 256)  # 2 images: one each
    mirrored().check_batches(33, False, 0, 1023, 256)  # uneven slices (17 and 16), none empty
    mirrored().check_batches(64, True, 32, 1024, 256)
    mirrored(devices="GPU").check_batches(32, False, 0, 1024, 257)  # a GPU's conv takes an empty slice
    Distribution("none", ["cpu:0"]).check_batches(32, False, 32, 1025, 257)
    Distribution("data_parallel", ["cpu:0", "cpu:1"]).check_batches(32, False, 0, 1026, 258)  # even last batches
    Distribution("data_parallel", ["cpu:0", "cpu:1"]).check_batches(32, True, 0, 1025, 256)  # the odd one dropped


@pytest.fixture(scope="module")
def two_tensorflow_devices() -> dict:
    """What the checks below saw under MirroredStrategy over two TensorFlow CPU devices, set before TensorFlow starts:
    in one process of their own, which starts TensorFlow once for both (a TensorFlow start-up saved). Each check's
    result by name, or the traceback it ended with."""
    script = textwrap.dedent("""
        import json
        import traceback
        import keras
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from pipeline import config, fitting, prepare
        from pipeline.augment import RandomCutout, RandomShiftFlip
        from pipeline.distribute import distribution

        def augments():
            strategy = distribution("mirrored").strategy
            with strategy.scope():
                layers = {"shift_flip": RandomShiftFlip(3, seed=0), "cutout": RandomCutout(4, seed=0)}
            images = np.tile(np.arange(1, 65, dtype="float32").reshape(1, 8, 8, 1), (8, 1, 1, 1))
            batch = next(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(images))))
            seen = {}
            for name, layer in layers.items():
                step = tf.function(lambda x: strategy.run(lambda x: layer(x, training=True), args=(x,)))
                first, second = ([v.numpy() for v in strategy.experimental_local_results(step(batch))]
                                 for _ in range(2))
                seen[name] = [len(first[0]), np.array_equal(*first), np.array_equal(first[0], second[0])]
            return seen

        def batch_norm_statistics():
            cfg = config.load("params/tiny.yaml", ["data.synthetic_train=64", "data.synthetic_test=32",
                                                   "train.epochs=1", "train.distribute=mirrored", "train.verbose=0"])
            dataset, dist = prepare.build(cfg), distribution("mirrored")
            splits = fitting.held_out_split(dataset, cfg.train)
            model = fitting.compile_model(cfg, fitting.training_part(dataset, splits), dist, len(splits[0]))
            fitting.fit(model, cfg, splits, len(dataset.class_names), [])
            norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
            copies = [[c.numpy() for c in v.value.values] for n in norms for v in (n.moving_mean, n.moving_variance)]
            return [len(copies), sum(np.array_equal(*pair) for pair in copies)]

        def ema_batch_norm_slices():
            sizes = []

            class Recorded(fitting.EMABatchNorm):
                def recalibrate(self):
                    sizes.append(list(self.rows.shape))
                    super().recalibrate()

            fitting.EMABatchNorm = Recorded
            cfg = config.load("params/tiny.yaml", ["data.synthetic_train=64", "data.synthetic_test=32",
                                                   "train.epochs=1", "train.distribute=mirrored", "train.verbose=0",
                                                   "train.ema=true", "train.ema_bn_batches=2", "train.batch_size=16"])
            dataset, dist = prepare.build(cfg), distribution("mirrored")
            splits = fitting.held_out_split(dataset, cfg.train)
            model = fitting.compile_model(cfg, fitting.training_part(dataset, splits), dist, len(splits[0]))
            fitting.fit(model, cfg, splits, len(dataset.class_names), [])
            return sizes

        def another_model():  # after the trainings above, in the same process: as a sweep's next trial
            keras.backend.clear_session()  # as the sweep does after each trial
            cfg = config.load("params/tiny.yaml", ["data.synthetic_train=64", "data.synthetic_test=32",
                                                   "train.epochs=2", "train.distribute=mirrored", "train.verbose=0",
                                                   "model.widths=[8,16,24]"])
            dataset, dist = prepare.build(cfg), distribution("mirrored")
            splits = fitting.held_out_split(dataset, cfg.train)
            model = fitting.compile_model(cfg, fitting.training_part(dataset, splits), dist, len(splits[0]))
            history = fitting.fit(model, cfg, splits, len(dataset.class_names), [])
            return [len(history.history["loss"]), bool(np.isfinite(history.history["loss"]).all()),
                    dist.strategy is distribution("mirrored").strategy]

        seen = {}
        for check in (augments, batch_norm_statistics, ema_batch_norm_slices, another_model):
            try:
                seen[check.__name__] = check()
            except Exception:
                seen[check.__name__] = traceback.format_exc()
        print(json.dumps(seen, default=int))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "KERAS_BACKEND": "tensorflow"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_each_replica_draws_its_own_shifts_flips_and_cutout_squares(two_tensorflow_devices):
    """Under MirroredStrategy each replica augments its slice of the batch from the one mirrored seed state: every
    replica drew the same numbers, so with 2 replicas image k of each slice got the same shift, flip and cutout square
    (half the draws of one device). Here one image fills the batch: the two slices come out different, and the next
    step draws anew."""
    # per layer: each replica's slice of 4 images; the two slices the same; a replica's slice the same next step
    assert two_tensorflow_devices["augments"] == {"shift_flip": [4, False, False], "cutout": [4, False, False]}


def test_every_replica_validates_and_saves_the_mean_of_the_replicas_batch_norm_statistics(two_tensorflow_devices):
    """Keras 3's BatchNormalization moving statistics are mirrored variables each replica updates from its own slice
    and never synchronised: validation scored each replica's slice with that replica's, the checkpoint and the served
    model held the first replica's alone, and a resumed run (every replica given the first's) validated otherwise than
    the uninterrupted one. After `fit` every replica holds the same, their mean: a 1-epoch tiny run."""
    seen = two_tensorflow_devices["batch_norm_statistics"]
    assert isinstance(seen, list), seen  # else the traceback it ended with
    statistics, the_same = seen
    assert statistics > 4 and the_same == statistics  # every moving mean and variance: one value on both replicas


def test_ema_batch_norm_recalibrates_on_each_replicas_slice_of_a_batch(two_tensorflow_devices):
    """With weight EMA under MirroredStrategy, the moving statistics recomputed under the averaged weights are each
    replica's slice's moments (8 images of a batch of 16 on 2 replicas), as training gathers them: they were the whole
    global batch's. Recalibrated before the one validation and at the end: 2 batches of 16, so 4 slices, each time."""
    assert two_tensorflow_devices["ema_batch_norm_slices"] == [[4, 8], [4, 8]]


def test_another_model_trains_under_mirrored_after_the_first_in_the_same_process(two_tensorflow_devices):
    """A sweep's trials train one after another in one process. Each took a new MirroredStrategy, which numbered its
    gradients' all-reduce from the same collective keys as the last: a trial of another model (here other widths,
    after three trainings) ended at its first step with "Shape mismatch in the collective instance". One strategy per
    set of devices now serves every training of the process."""
    assert two_tensorflow_devices["another_model"] == [2, True, True]


def test_jaxs_data_parallel_ends_with_its_training():
    """keras.distribution.DataParallel is process-wide: after a data_parallel training, the served copy, evaluate in
    `main` and a sweep's next trial (`none`) were still sharded over every device, and a batch no multiple of them
    failed (jax's IndivisibleError; the served model's power-of-two batches on 3 GPUs). Three XLA host devices, in a
    process of their own (set before JAX starts)."""
    script = textwrap.dedent("""
        import keras
        import numpy as np
        from pipeline.distribute import distribution

        def predicts_one_image():
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
            try:
                return model.predict(np.ones((1, 4), "float32"), verbose=0).shape == (1, 2)
            except Exception as exc:
                return type(exc).__name__

        trained = distribution("data_parallel")
        seen = [trained.replicas, predicts_one_image()]
        seen.append(distribution("none").replicas == 1 and predicts_one_image())  # the next trial of a sweep
        distribution("data_parallel").end()  # what follows a training: its served copy, evaluate
        seen.append(predicts_one_image())
        print(seen)
    """)
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[3, 'IndivisibleError', True, True]"


@pytest.mark.parametrize(("batch", "drop", "train", "val", "message"), [
    (33, True, 1056, 264, "train.batch_size: 33, which keras.distribution.DataParallel cannot split evenly over 2 "
                          "replicas (data_parallel over cpu:0, cpu:1): use a multiple of 2"),
    (32, False, 1025, 256, "each epoch ends with a batch of 1 of the 1025 training images"),
    # 251 test images validated in batches of 32 (tiny.yaml, data.synthetic_test=251): jax's IndivisibleError
    # traceback in the last validation batch of the first epoch, "dimension size is 27"
    (32, False, 1024, 251, "validation ends with a batch of 27 of the 251 images"),
])
def test_a_batch_jaxs_data_parallel_cannot_split_evenly_is_a_param_error(batch, drop, train, val, message):
    from pipeline.config import ConfigError
    from pipeline.distribute import Distribution

    with pytest.raises(ConfigError) as error:
        Distribution("data_parallel", ["cpu:0", "cpu:1"]).check_batches(batch, drop, 0, train, val)
    assert message in str(error.value)



@pytest.mark.parametrize("module", ["train", "main"])
@pytest.mark.parametrize(("overrides", "message"), [
    ("train.batch_size=33", "train.batch_size: 33, which keras.distribution.DataParallel cannot split evenly over 2 "
                            "replicas (data_parallel over cpu:0, cpu:1): use a multiple of 2"),
    # the images the params make known before any data is read: synthetic's counts
    ("data.synthetic_train=1025", "train.batch_size: each epoch ends with a batch of 1 of the 1025 training images"),
    ("data.synthetic_test=251", "train.batch_size: validation ends with a batch of 27 of the 251 images"),
])
def test_a_batch_the_replicas_cannot_share_is_refused_before_any_run_opens(store, in_process, monkeypatch, module,
                                                                           overrides, message):
    """Refused in the train run: the data prepared (a prepare run), then a train run (and main's) left FAILED for a
    batch the params alone ruled out."""
    from mlflow import MlflowClient

    from pipeline import distribute, main, train

    two = distribute.Distribution("data_parallel", ["cpu:0", "cpu:1"])
    monkeypatch.setattr(train if module == "train" else main, "distribution",
                        lambda mode, job=None, checkpoint=None: two)
    result = in_process(module, "--params", TINY, "--epochs", "1", "--overrides",
                        f"{overrides} tracking.experiment=e2e")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


@pytest.mark.parametrize(("overrides", "logged", "split"), [
    ("data.source=cifar10 data.max_test=500", None, (50000, 500)),
    ("data.source=cifar10 train.validation_fraction=0.1", None, (45000, 5000)),
    ("data.source=synthetic data.max_train=100", None, (100, 256)),
    # a path's counts: those its prepare run logged (the dataset given, or the one these params reuse), else unknown
    ("data.source=/data/folder", {"train": 1025, "test": 300}, (1025, 300)),
    ("data.source=/data/folder train.validation_fraction=0.5", {"train": 1000, "test": 300}, (500, 500)),
    ("data.source=/data/folder", None, (None, None)),
])
def test_the_images_known_before_any_data_is_read_are_those_each_split_trains_and_validates_on(
        monkeypatch, overrides, logged, split):
    from pipeline import inputs, prepare

    cfg = config.load(TINY, overrides.split())
    monkeypatch.setattr(prepare, "prepare_key", lambda cfg: "its key")  # (digests the path's files)
    monkeypatch.setattr(prepare, "find_prepared", lambda key: "runs:/p/dataset" if logged else None)
    monkeypatch.setattr(prepare, "training_images", lambda uri: logged["train"])
    monkeypatch.setattr(prepare, "test_images", lambda uri: logged["test"])
    assert inputs.known_split_images(cfg) == split

# TensorFlow's messages as two local hosts got them (2026-12-05): worker 1 killed in a compiled train step, and in an
# eager collective (whose function name holds the reporting host's own device); worker 0 killed, as worker 1 saw it.
UNHEALTHY = ("Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are unhealthy "
             "(stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed. Check the task logs "
             "for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further.\n"
             "The error could be from a previous operation. Restart your program to reset.\n")
RESET = ("Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error information from "
         "remote target /job:worker/replica:0/task:0 while calling /tensorflow.WorkerService/CompleteInstance:\n"
         ":UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:\"recvmsg:Connection reset by peer\"}\n"
         "The error could be from a previous operation. Restart your program to reset. [Op:CollectiveReduceV2] name: ")
EAGER = ("{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_device_/job:worker/replica:0/task:%d/"
         "device:CPU:0}} ")


class FailingFit:
    """A model whose `fit` ends `steps` train steps (its callbacks told so), then loses a host (TensorFlow's `lost`,
    raised as `error`, by default an UnavailableError)."""

    def __init__(self, lost: str, steps: int, error: type | None = None):
        self.lost, self.steps, self.error = lost, steps, error

    def fit(self, *args, callbacks=None, **kwargs):
        import tensorflow as tf

        for step in range(self.steps):
            for callback in callbacks or ():
                callback.on_train_batch_end(step)
        raise (self.error or tf.errors.UnavailableError)(None, None, self.lost)


def adapted(index: int):
    """worker INDEX of a 2-host cluster (of which it knows only its place)."""
    from pipeline import distribute

    return distribute.Distribution("multi_worker", [f"/job:worker/replica:0/task:{index}/device:CPU:0"], Strategy(2),
                                   distribute.Cluster({"worker": TWO}, "worker", index))


@pytest.mark.parametrize(("index", "lost", "said"), [
    (0, "{{function_node __inference_multi_step_on_iterator_4646}} " + UNHEALTHY
     + "\t [[{{node CollectiveReduceV2}}]] [Op:__inference_multi_step_on_iterator_4646]", "worker 1"),
    (0, EAGER % 0 + UNHEALTHY, "worker 1"),  # named "worker 0, worker 1": the host reporting it among the lost
    (1, EAGER % 1 + RESET, "worker 0"),
], ids=["in-a-train-step", "in-an-eager-collective", "the-chief"])
def test_a_host_lost_mid_training_is_one_line_naming_it(monkeypatch, index, lost, said):
    """A worker killed mid-epoch: its peers got TensorFlow's UnavailableError (exit 1, 50 lines, the run FAILED
    with no reason) ~7 s later. Now a StepFailed (exit 3) naming the host lost, not the one reporting it, and how to
    continue."""
    from pipeline import distribute
    from pipeline.tracking import StepFailed

    monkeypatch.setattr(distribute, "_multi_worker_fit_fixes", lambda model, strategy: None)
    model = FailingFit(lost, steps=5)
    adapted(index).adapt(model)
    with pytest.raises(StepFailed) as error:
        model.fit(epochs=3, callbacks=[])
    text = str(error.value)
    assert "\n" not in text and "{{" not in text and text.startswith(
        f"TF_CONFIG: {said} stopped answering (TensorFlow: Collective ops is aborted by: ")
    assert text.endswith("Completed epochs stay checkpointed on every host: once it is back, rerun every host's "
                         "command to continue")


# The chief's own heartbeat late on a busy 2-core CI machine (2026-12-07): its train step aborted.
LATE = ("{{function_node __inference_multi_step_on_iterator_4735}} Collective ops is aborted by: Unexpected heartbeat "
        "request from an already-in-error task: /job:worker/replica:0/task:0 with existing error: UNAVAILABLE: Task "
        "/job:worker/replica:0/task:0 heartbeat timeout. This indicates that the remote task has failed, got "
        "preempted, or crashed unexpectedly. Check the task logs for an earlier error or scheduler events (e.g. "
        "preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']\n\n"
        "RPC: /tensorflow.CoordinationService/Heartbeat\nThe error could be from a previous operation. Restart your "
        "program to reset.\n\t [[{{node CollectiveReduceV2}}]] [Op:__inference_multi_step_on_iterator_4735]")


def test_a_host_the_cluster_took_for_lost_is_told_so_in_one_line(monkeypatch):
    """The chief whose own heartbeats came late (a busy machine) got TensorFlow's AbortedError from its train step:
    a traceback, exit 1, its run FAILED with no reason. Now a StepFailed (exit 3) saying the cluster took this host
    for lost, the timeout it missed and how to continue."""
    import tensorflow as tf

    from pipeline import distribute
    from pipeline.tracking import StepFailed

    monkeypatch.setenv(distribute.HEARTBEAT_TIMEOUT, "45")
    monkeypatch.setattr(distribute, "_multi_worker_fit_fixes", lambda model, strategy: None)
    model = FailingFit(LATE, steps=5, error=tf.errors.AbortedError)
    adapted(0).adapt(model)
    with pytest.raises(StepFailed) as error:
        model.fit(epochs=3, callbacks=[])
    assert str(error.value) == (
        "TF_CONFIG: the cluster took this host (worker 0) for lost: its heartbeats came more than 45 s apart, "
        "$PIPELINE_HEARTBEAT_TIMEOUT (TensorFlow: Task /job:worker/replica:0/task:0 heartbeat timeout). "
        "Completed epochs stay checkpointed on every host: rerun every host's command to continue (with a larger "
        "$PIPELINE_HEARTBEAT_TIMEOUT on every host if this one was busy)")


@pytest.mark.parametrize("raw", ["0", "-5", "ten", "inf", "nan"])
def test_a_heartbeat_timeout_that_is_not_a_positive_number_is_refused(monkeypatch, raw):
    from pipeline import distribute

    monkeypatch.setenv(distribute.HEARTBEAT_TIMEOUT, raw)
    with pytest.raises(config.ConfigError, match=rf"^PIPELINE_HEARTBEAT_TIMEOUT: the seconds without a host's "
                                                 rf"heartbeat before the others take it for lost, a positive number, "
                                                 rf"got '{raw}'$"):
        distribute.heartbeat_timeout()
    monkeypatch.setenv(distribute.HEARTBEAT_TIMEOUT, "")  # empty: unset
    assert distribute.heartbeat_timeout() == 60


@pytest.mark.parametrize(("index", "lost", "said", "where"), [
    (1, EAGER % 1 + RESET, "worker 0 (the chief)",
     " (and, where the chief could end its MLflow run, in that run's failure_reason tag)"),
    (0, EAGER % 0 + UNHEALTHY, "worker 1", ""),
], ids=["the-chief", "a-worker"])
def test_a_host_that_ends_before_training_is_said_to_have_ended_before_training(index, lost, said, where):
    """The chief failed in prepare (a bad data path on it alone): worker 1, waiting in `agree` (the hosts' first
    collective), said "worker 0 stopped answering ... Completed epochs stay checkpointed ... rerun every host's
    command to continue", as if a training host had been lost. Now: which host ended before training began, and
    where its error is."""
    import tensorflow as tf

    from pipeline import distribute
    from pipeline.tracking import StepFailed

    class Gone(Strategy):
        def run(self, fn):
            raise tf.errors.UnavailableError(None, None, lost)

        def gather(self, value, axis):
            return value

    dist = distribute.Distribution("multi_worker", [f"/job:worker/replica:0/task:{index}/device:CPU:0"], Gone(2),
                                   distribute.Cluster({"worker": TWO}, "worker", index))
    with pytest.raises(StepFailed) as error:
        dist.agree({"data": "d" * 64}, 0)
    text = str(error.value)
    assert "\n" not in text and text.startswith(
        f"TF_CONFIG: {said} ended before training began (TensorFlow: Collective ops is aborted by: ")
    assert text.endswith(f"): nothing was trained. Its own output says why{where}: fix that, then rerun every host's "
                         f"command"), text


@pytest.mark.parametrize(("index", "lost", "said", "where"), [
    (1, EAGER % 1 + RESET, "worker 0 (the chief)",
     " (and, where the chief could end its MLflow run, in that run's failure_reason tag)"),
    (0, "{{function_node __inference_multi_step_on_iterator_4646}} " + UNHEALTHY
     + "\t [[{{node CollectiveReduceV2}}]] [Op:__inference_multi_step_on_iterator_4646]", "worker 1", ""),
], ids=["the-chief", "a-worker"])
def test_a_host_lost_before_the_first_train_step_ended_before_training_began(monkeypatch, index, lost, said, where):
    """The chief failed between building its model and `fit` (a ConfigError in opening its train run): worker 1,
    waiting in the first step's collective, said "worker 0 stopped answering ... Completed epochs stay checkpointed
    ... rerun every host's command to continue". Until this host's first train step has ended, the host lost ended
    before training began; once it has, it stopped answering (the test above)."""
    from pipeline import distribute
    from pipeline.tracking import StepFailed

    monkeypatch.setattr(distribute, "_multi_worker_fit_fixes", lambda model, strategy: None)
    for steps, callbacks in [(0, None), (0, []), (1, [])]:
        model = FailingFit(lost, steps)
        adapted(index).adapt(model)
        with pytest.raises(StepFailed) as error:
            model.fit(epochs=3, callbacks=callbacks)
        text = str(error.value)
        assert "\n" not in text
        if steps:
            assert text.startswith(f"TF_CONFIG: {said.removesuffix(' (the chief)')} stopped answering (TensorFlow: ")
            continue
        assert text.startswith(f"TF_CONFIG: {said} ended before training began (TensorFlow: Collective ops is "
                               f"aborted by: "), text
        assert text.endswith(f"): nothing was trained. Its own output says why{where}: fix that, then rerun every "
                             f"host's command"), text
    assert callbacks == []  # the caller's list is left as it was


class TwoHosts:
    """Two hosts' `Distribution.agree` in two threads of this process: each one's `gather` returns both hosts' rows
    in task order once both have sent theirs, as MultiWorkerMirroredStrategy's does over the network."""

    def __init__(self):
        import threading

        self.rows, self.met = {}, threading.Barrier(2, timeout=30)

    def host(self, index: int):
        from pipeline import distribute

        hosts = self

        class Strategy:
            def run(self, fn):
                return fn()

            def gather(self, value, axis):
                import tensorflow as tf

                hosts.rows[index] = value
                hosts.met.wait()
                return tf.concat([hosts.rows[i] for i in (0, 1)], axis=axis)

        return distribute.Distribution("multi_worker", [f"/job:worker/replica:0/task:{index}/device:CPU:0"],
                                       Strategy(), distribute.Cluster({"worker": TWO}, "worker", index))

    def agree(self, fast_paths: list, done: tuple[int, int] = (0, 0), jobs: tuple[str, str] = ("d" * 64,) * 2,
              runs: tuple[int, int] = (0, 0)):
        """What each host's `agree` returns, or the error it raises, given each host's fast path."""
        from concurrent.futures import ThreadPoolExecutor

        def agree(index):
            try:
                return self.host(index).agree({"data": jobs[index]}, done[index], fast_paths[index], runs[index])
            except Exception as exc:  # noqa: BLE001 - compared below
                return exc

        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(agree, (0, 1)))


@pytest.mark.parametrize("fast_paths", [
    [("mixed_bfloat16", "auto"), ("float32", "auto")],  # a GPU (or bf16 CPU) chief, a CPU worker without bf16
    [("float32", True), ("mixed_bfloat16", "auto")],  # a chief resumed as its run recorded, a worker of another kind
    [("float32", False), ("float32", False)],
])
def test_every_host_of_a_cluster_trains_in_the_chiefs_precision_and_xla_choice(fast_paths):
    """train.precision auto resolves per machine (bfloat16 on GPUs and CPUs with bf16 units, else float32), and a
    resumed chief goes on as its run recorded while the other hosts, reading no run, resolved `auto` themselves: the
    hosts trained in lock step in different precisions, silently. `agree` hands every host the chief's."""
    assert TwoHosts().agree(fast_paths) == [(0, fast_paths[0], 0)] * 2
    assert TwoHosts().agree(fast_paths, done=(2, 2)) == [(2, fast_paths[0], 0)] * 2


def test_the_hosts_verdict_on_their_jobs_and_epochs_is_the_same_on_every_host():
    """Other data, or other epochs, are still refused on every host, whatever their fast paths; a chief that trains
    nothing (TRAINED) stops them all."""
    from pipeline.config import ConfigError
    from pipeline.distribute import TRAINED

    fast = [("float32", False), ("mixed_bfloat16", False)]
    for errors, message in ((TwoHosts().agree(fast, jobs=("d" * 64, "e" * 64)),
                             "TF_CONFIG: worker 1 started with other data than the chief (worker 0)"),
                            (TwoHosts().agree(fast, done=(1, 0)),
                             "resume: the hosts' checkpoints hold different completed epochs (worker 0 1, "
                             "worker 1 0)")):
        assert all(isinstance(e, ConfigError) and str(e).startswith(message) for e in errors), errors
    assert [done for done, _, _ in TwoHosts().agree(fast, done=(TRAINED, 0))] == [TRAINED] * 2


def test_a_workers_checkpoint_of_another_run_than_the_chiefs_is_refused_at_the_same_epoch():
    """A worker's checkpoint is keyed by params and data, not by the chief's run: run A killed at epoch 2, run B of the
    same params (`resume=never` on every host) killed at epoch 2 too, then A resumed (`-P resume=<A>`, or the
    default on A's identical command): the hosts agreed on 2 epochs and went on, the chief from A's weights, worker
    1 from B's, each applying the summed gradients to its own: the model logged was no single training's. Each
    host sends the run its checkpoint trains (the chief: its run; another host: the run its checkpoint recorded);
    every host refuses a checkpoint of another run, and accepts one that recorded none (older)."""
    from pipeline.config import ConfigError
    from pipeline.distribute import run_key

    fast = [("float32", False)] * 2
    a, b = run_key("a" * 32), run_key("b" * 32)
    assert 0 < a < 1 << 28 and a != b and run_key("") == 0
    errors = TwoHosts().agree(fast, done=(2, 2), runs=(a, b))
    assert all(isinstance(e, ConfigError) and str(e) == (
        "resume: worker 1's checkpoint holds 2 epochs of another run than the chief's (worker 0): the hosts would "
        "train on from different weights. Start afresh: rerun every host with resume=never (`-P resume=never` on the "
        "chief, `--resume never` on the others)") for e in errors), errors
    assert TwoHosts().agree(fast, done=(2, 2), runs=(a, a)) == [(2, fast[0], a)] * 2
    assert TwoHosts().agree(fast, done=(2, 2), runs=(a, 0)) == [(2, fast[0], a)] * 2  # recorded none: as before
    assert TwoHosts().agree(fast, done=(0, 0), runs=(a, b)) == [(0, fast[0], a)] * 2  # nothing to go on from


def test_a_worker_builds_its_model_in_the_chiefs_precision_where_it_would_take_another(monkeypatch, tmp_path,
                                                                                          capsys):
    """Worker 1 of a cluster whose chief trains in bfloat16 (a GPU, or a CPU with bf16 units; or a resumed run that
    recorded it), on a CPU without bf16 units: it sent what it would take, and built its model in the chief's
    choice, saying so. A resumed chief sends what its run recorded, for each `auto`."""
    from pipeline import distribute, fitting, train

    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setattr(fitting, "cpu_has_bf16", lambda: False)
    cfg = config.load("params/tiny.yaml", ["train.precision=auto", "train.jit_compile=auto", "data.synthetic_train=64",
                                           "data.synthetic_test=32"])
    sent, built = [], []

    class Worker(distribute.Distribution):
        def agree(self, job, done, fast_path=("float32", False), run=0):
            sent.append(fast_path)
            return done, ("mixed_bfloat16", False), 0

    class History:
        history = {"loss": [1.0]}

    def fit(model, *args):
        built.append(model)
        return History()

    monkeypatch.setattr(train, "fit", fit)
    worker = Worker("none", ["/device:CPU:0"], None, distribute.Cluster({"worker": TWO}, "worker", 1))
    train.run_worker(cfg, "", worker)
    assert sent == [("float32", "auto")]  # what this host takes: no bf16 units, Keras's rule for XLA
    assert built[0].dtype_policy.name == "mixed_bfloat16" and built[0].jit_compile is False
    assert ("train.precision auto and train.jit_compile auto: mixed_bfloat16 without XLA, as the chief (worker 0) "
            "trains; this host would take float32 with jit_compile auto") in capsys.readouterr().out
    recorded = fitting.Recorded("mixed_bfloat16", True, "train run r1")
    assert fitting.planned_fast_path(cfg.train, worker, recorded) == ("mixed_bfloat16", True)
    explicit = config.load("params/tiny.yaml", ["train.precision=float32"]).train  # tiny's jit_compile: false
    assert fitting.planned_fast_path(explicit, worker, recorded) == ("float32", False)


def test_a_worker_records_the_chiefs_run_with_its_checkpoint_and_sends_it_when_rerun(monkeypatch, tmp_path):
    """What `agree` compares: worker 1 killed mid-training keeps, beside its checkpoint, the run of the chief it
    trained with, and sends it when its command is rerun."""
    from pipeline import distribute, train

    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path))
    cfg = config.load("params/tiny.yaml", ["data.synthetic_train=64", "data.synthetic_test=32"])
    sent, chief = [], distribute.run_key("a" * 32)

    class Worker(distribute.Distribution):
        def agree(self, job, done, fast_path=("float32", False), run=0):
            sent.append(run)
            return done, fast_path, chief

    def killed(*args):
        raise RuntimeError("killed")

    monkeypatch.setattr(train, "fit", killed)
    worker = Worker("none", ["/device:CPU:0"], None, distribute.Cluster({"worker": TWO}, "worker", 1))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="killed"):
            train.run_worker(cfg, "", worker)
    assert sent == [0, chief]


@pytest.mark.parametrize("mode", ["none", "mirrored"])
def test_a_one_host_mode_under_a_cluster_is_refused(monkeypatch, mode):
    """train.distribute=mirrored with the README's TF_CONFIG: worker 0 trained alone (workers=1) while worker 1 was
    told to run `python -m pipeline.train`, the command it was running."""
    from pipeline import distribute
    from pipeline.config import ConfigError

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    for index in (0, 1):
        monkeypatch.setenv("TF_CONFIG", tf_config({"worker": TWO}, index=index))
        with pytest.raises(ConfigError, match=f"^train.distribute: '{mode}' trains on one host, but TF_CONFIG names 2 "
                                              "hosts: use auto or multi_worker"):
            distribute.distribution(mode)


class TensorFlowServer:
    """What a host that met the others listens with on its port: TensorFlow's gRPC server, which speaks first on
    every connection (an HTTP/2 SETTINGS frame, checked against TensorFlow 2.21's)."""

    SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty one

    def __init__(self, port: int):
        import socket
        import threading

        self.server = socket.create_server(("", port))
        self.server.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.answer, daemon=True)
        self.thread.start()

    def answer(self) -> None:
        while not self.stop.is_set():
            try:
                conn = self.server.accept()[0]
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), conn:
                conn.sendall(self.SETTINGS)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.server.close()


def test_hosts_meet_in_any_order_and_those_that_never_start_are_named(monkeypatch):
    """TensorFlow's own wait for the other hosts blocks in C++ (no Ctrl-C, no timeout, ~1 h): `wait_for_hosts` waits
    first, in Python. Two hosts find each other (each answers on its port while it waits); a host that never
    starts is named, with the reason, once $PIPELINE_HOSTS_TIMEOUT passes."""
    import threading
    import time

    from bench.servers import free_port
    from pipeline import distribute
    from pipeline.config import ConfigError

    ports = [free_port(), free_port()]
    hosts = [f"localhost:{port}" for port in ports]
    met, servers = [], []

    def host(index: int, delay: float) -> None:
        time.sleep(delay)
        distribute.wait_for_hosts(distribute.Cluster({"worker": hosts}, "worker", index), timeout=20)
        met.append(index)
        servers.append(TensorFlowServer(ports[index]))  # TensorFlow's server, which then takes the port

    started = time.monotonic()
    threads = [threading.Thread(target=host, args=(1, 0)), threading.Thread(target=host, args=(0, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(met) == [0, 1] and time.monotonic() - started < 10
    for server in servers:
        server.close()

    monkeypatch.setenv("PIPELINE_HOSTS_TIMEOUT", "0.5")
    with pytest.raises(ConfigError) as error:
        distribute.wait_for_hosts(distribute.Cluster({"worker": hosts}, "worker", 0))  # worker 1 never starts
    assert str(error.value) == (
        f"TF_CONFIG: worker 1 ({hosts[1]}: Connection refused) did not start within 0.5 s ($PIPELINE_HOSTS_TIMEOUT): "
        f"start every host's command, or check TF_CONFIG's addresses and that their ports are open between the hosts")
    monkeypatch.setenv("PIPELINE_HOSTS_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match=r"^PIPELINE_HOSTS_TIMEOUT: the seconds a host waits .*, got 'soon'$"):
        distribute.wait_for_hosts(distribute.Cluster({"worker": hosts}, "worker", 0))
    monkeypatch.setenv("PIPELINE_HOSTS_TIMEOUT", "")  # empty, as unset (was refused: "got ''")
    assert distribute.hosts_timeout() == 600


def meet(*clusters: tuple, timeout: float = 5) -> list:
    """`wait_for_hosts` of each (cluster spec, task type, index[, job]) in a thread of its own, as hosts started at
    once: what each ended with (None, or the ConfigError it raised), and the seconds the slowest took. A host that goes
    on listens on its port, as TensorFlow's server then does."""
    import threading
    import time

    from pipeline import distribute
    from pipeline.config import ConfigError

    ended: list = [ConfigError("never ended")] * len(clusters)
    servers: list = []

    def host(i: int) -> None:
        try:
            cluster = distribute.Cluster(*clusters[i][:3])
            ended[i] = distribute.wait_for_hosts(cluster, timeout=timeout, job=(*clusters[i], None, None)[3],
                                                 checkpoint=(*clusters[i], None, None)[4])
            servers.append(TensorFlowServer(int(cluster.addresses[cluster.task].rpartition(":")[2])))
        except ConfigError as exc:
            ended[i] = exc

    started = time.monotonic()
    threads = [threading.Thread(target=host, args=(i,)) for i in range(len(clusters))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout + 10)
    for server in servers:
        server.close()
    return [*ended, time.monotonic() - started]


def test_hosts_started_with_other_clusters_are_refused_on_every_host_before_tensorflow_waits():
    """Worker 0's TF_CONFIG listed 2 workers, worker 1's 3 (or another address for a task): worker 0 found worker 1
    answering and went on into TensorFlow's wait, deaf to Ctrl-C, while worker 1 waited for worker 2, gave up after
    $PIPELINE_HOSTS_TIMEOUT and left worker 0 hanging for good."""
    from bench.servers import free_port

    hosts = [f"localhost:{free_port()}" for _ in range(3)]
    two, three = {"worker": hosts[:2]}, {"worker": hosts}
    first, second, seconds = meet((two, "worker", 0), (three, "worker", 1), timeout=20)
    assert seconds < 10  # each hears the other, whichever refuses first
    assert str(first) == (
        f"TF_CONFIG: worker 1 ({hosts[1]}) was started with another cluster, {json.dumps(three)}, than this host "
        f"(worker 0), {json.dumps(two)}: give every host the same TF_CONFIG 'cluster', and each its own 'task'")
    assert str(second).startswith(f"TF_CONFIG: worker 0 ({hosts[0]}) was started with another cluster, ")
    moved = {"chief": [hosts[0]], "worker": [hosts[2]]}  # worker 0's address spelled otherwise: the same host
    same = {"chief": [hosts[0].replace("localhost", "127.0.0.1")], "worker": [hosts[1]]}
    first, second, _ = meet((moved, "chief", 0), (same, "worker", 0), timeout=2)
    assert str(second).startswith(f"TF_CONFIG: chief 0 ({same['chief'][0]}) was started with another cluster, ")
    assert "worker 0 (" + hosts[2] + ": Connection refused) did not start within 2 s" in str(first)
    # one host's other names (here: another loopback address) are its own: TensorFlow reaches it there alike
    other_name = {"chief": [hosts[0]], "worker": [hosts[1].replace("localhost", "127.0.0.2")]}
    assert meet((same, "chief", 0), (other_name, "worker", 0))[:2] == [None, None]


def test_hosts_started_with_other_params_or_code_are_refused_when_they_meet_before_any_run_opens(monkeypatch):
    """Worker 1 started with another lr (or another checkout) met the chief, which then opened main's run, prepared
    the data, opened the train run, and only there (`Distribution.agree`) every host refused: three runs FAILED for a
    mistake the hosts could tell apart as they met. Each host's hello now carries the digests of its params and code
    (`train.meeting_job`), and each refuses a peer's that differ, before any run opens."""
    from bench.servers import free_port
    from pipeline import train

    hosts = [f"localhost:{free_port()}" for _ in range(2)]
    spec = {"worker": hosts}
    chief_job = train.meeting_job(config.load(TINY))
    worker_job = train.meeting_job(config.load(TINY, ["train.lr=0.1"]))
    first, second, seconds = meet((spec, "worker", 0, chief_job), (spec, "worker", 1, worker_job), timeout=20)
    assert seconds < 10
    assert str(first) == (f"TF_CONFIG: worker 1 ({hosts[1]}) was started with other model or train params than this "
                          f"host (worker 0): start every host with the same code, params, epochs, overrides and data")
    assert str(second).startswith(f"TF_CONFIG: worker 0 ({hosts[0]}) was started with other model or train params ")
    monkeypatch.setattr(train, "train_code", lambda: "another checkout")
    assert "with other code (pipeline/" in str(meet((spec, "worker", 0, chief_job),
                                                     (spec, "worker", 1, train.meeting_job(config.load(TINY))))[0])
    assert meet((spec, "worker", 0, chief_job), (spec, "worker", 1, dict(chief_job)))[:2] == [None, None]


def test_hosts_started_with_other_data_are_refused_when_they_meet_before_any_run_opens(tmp_path):
    """Worker 1 started on another copy of the data (another archive at the same path, other data.* params) met the
    chief, which opened main's run, prepared the data and opened the train run: only there (`Distribution.agree`) did
    every host refuse it, leaving three runs FAILED. Each host that builds its data from data.source now sends a
    digest of it in its hello (`train.meeting_data`): what the source holds, and the data.* params with an effect, not
    the path it is kept at."""
    from bench.servers import free_port
    from pipeline import data, train

    paths = [tmp_path / "a" / "d.npz", tmp_path / "b" / "d.npz", tmp_path / "c.npz"]
    for path, seed in zip(paths, (0, 1, 0), strict=True):  # a and c alike, b another draw
        path.parent.mkdir(exist_ok=True)
        data.make_synthetic(n_train=64, n_test=32, seed=seed).save(path)

    def job(source, *overrides: str) -> dict:
        cfg = config.load(TINY, [f"data.source={source}", *overrides])
        return {**train.meeting_job(cfg), **train.meeting_data(cfg)}

    hosts = [f"localhost:{free_port()}" for _ in range(2)]
    spec = {"worker": hosts}
    first, second, seconds = meet((spec, "worker", 0, job(paths[0])), (spec, "worker", 1, job(paths[1])), timeout=20)
    assert seconds < 10
    assert str(first) == (f"TF_CONFIG: worker 1 ({hosts[1]}) was started with other data (data.* params or what "
                          f"data.source holds) than this host (worker 0): start every host with the same code, "
                          f"params, epochs, overrides and data")
    assert str(second).startswith(f"TF_CONFIG: worker 0 ({hosts[0]}) was started with other data (data.* params ")
    assert "with other data" in str(meet((spec, "worker", 0, job(paths[0])),
                                         (spec, "worker", 1, job(paths[2], "data.max_train=32")))[0])
    # the same bytes at another path, and a param without effect on them (synthetic's counts for a file): alike
    assert meet((spec, "worker", 0, job(paths[0])), (spec, "worker", 1, job(paths[2], "data.synthetic_train=100"))
                )[:2] == [None, None]
    # a host that reads a prepared dataset, or one resumed by id, or whose source cannot be read yet, sends none:
    # its data is compared before training, as before
    cfg = config.load(TINY, [f"data.source={paths[0]}"])
    assert train.meeting_data(cfg, dataset_uri="runs:/r/dataset/dataset.npz") == {}
    assert train.meeting_data(cfg, resume="0123abcd") == {}
    assert train.meeting_data(config.load(TINY, [f"data.source={tmp_path / 'none.npz'}"])) == {}


def test_hosts_whose_checkpoints_cannot_go_on_together_are_refused_when_they_meet_before_any_run_opens():
    """Rerun after both hosts were killed, a worker whose checkpoint was lost (or one epoch behind, or another run's of
    the same params) met the chief, which opened main's run and resumed its train run: only there
    (`Distribution.agree`) did every host refuse, the resumed run ended FAILED. Each host's hello now carries the
    epochs its checkpoint holds and the chief's run they belong to, where known before any run opens."""
    from bench.servers import free_port

    hosts = [f"localhost:{free_port()}" for _ in range(2)]
    spec = {"worker": hosts}
    first, second, seconds = meet((spec, "worker", 0, None, (2, 7)), (spec, "worker", 1, None, (0, 0)), timeout=20)
    assert seconds < 10
    said = ("resume: the hosts' checkpoints hold different completed epochs (worker 0 2, worker 1 0): they must "
            "continue from the same one. Start afresh: rerun every host with resume=never (`-P resume=never` on the "
            "chief, `--resume never` on the others)")
    assert str(first) == str(second) == said
    first, second, _ = meet((spec, "worker", 0, None, (2, 7)), (spec, "worker", 1, None, (2, 9)))
    assert str(first) == str(second) == (
        "resume: worker 1's checkpoint holds 2 epochs of another run than the chief's (worker 0): the hosts would "
        "train on from different weights. Start afresh: rerun every host with resume=never (`-P resume=never` on the "
        "chief, `--resume never` on the others)")
    for worker in ((2, 7), (2, 0), None):  # the chief's run, or none recorded (an earlier version), or not known
        assert meet((spec, "worker", 0, None, (2, 7)), (spec, "worker", 1, None, worker))[:2] == [None, None]
    # two workers are not compared with each other, only each with the chief
    three = {"worker": [*hosts, f"localhost:{free_port()}"]}
    assert meet((three, "worker", 0, None, None), (three, "worker", 1, None, (0, 0)),
                (three, "worker", 2, None, (2, 7)))[:3] == [None, None, None]


def test_a_workers_checkpoint_is_found_before_its_data_is_read(monkeypatch, tmp_path):
    """Its folder is keyed by the data's digest, known once the data is read, after the hosts met: the key it meets
    with (`meeting_key`), written beside its epochs, finds it before."""
    from pipeline import train

    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path))
    cfg = config.load(TINY)
    assert train.worker_checkpoint(cfg, "worker 1") == (0, 0)
    folder = tmp_path / "worker1-0123456789abcdef"
    folder.mkdir()
    (folder / "training_metadata.json").write_text('{"epoch": 2}')
    (folder / train.CHIEF_RUN).write_text("7")
    assert train.worker_checkpoint(cfg, "worker 1") is None  # an earlier version's folder: not known
    (folder / train.MEETING).write_text(train.meeting_key(cfg))
    assert train.worker_checkpoint(cfg, "worker 1") == (2, 7)
    assert train.worker_checkpoint(cfg, "worker 2") == (0, 0)
    assert train.worker_checkpoint(cfg, "worker 1", resume="never") == (0, 0)  # removed once its data is read
    assert train.worker_checkpoint(config.load(TINY, ["train.lr=0.1"]), "worker 1") == (0, 0)  # another job's
    assert train.worker_checkpoint(config.load(TINY, ["train.epochs=9"]), "worker 1") == (2, 7)  # an extension
    assert train.worker_checkpoint(cfg, "worker 1", dataset_uri="runs:/r/dataset/dataset.npz") is None


def test_what_the_hosts_compare_as_they_meet_is_what_they_compare_again_before_training(monkeypatch):
    """A host's `meeting_job` is its `training_job` less the data's digest (the chief prepares the data after): every
    part the same, so hosts that meet are never told apart later by a digest made otherwise."""
    from pipeline import data, train

    cfg = config.load(TINY, ["train.epochs=2", "train.verbose=0", "train.distribute=multi_worker"])
    dataset = data.load_source("synthetic", synthetic_train=16, synthetic_test=8)
    job = train.training_job(cfg, dataset)
    assert train.meeting_job(cfg) == {part: job[part] for part in job if part != "data"}
    assert train.meeting_job(config.load(TINY, ["train.verbose=1", "train.distribute=auto", "data.max_train=8"])) != \
        train.meeting_job(cfg)  # train.epochs differs
    assert train.meeting_job(config.load(TINY, ["train.epochs=2", "data.max_train=8"])) == train.meeting_job(cfg)


@pytest.mark.parametrize(("module", "index"), [("main", 0), ("train", 0), ("train", 1)])
def test_every_host_meets_the_others_with_its_params_and_codes_digests(store, in_process, monkeypatch, module, index):
    from pipeline import main, train
    from pipeline.config import ConfigError

    met = []

    def meets(mode, job=None, checkpoint=None):
        met.append(job)
        held.append(checkpoint)
        raise ConfigError("met")

    held = []

    monkeypatch.setattr(train if module == "train" else main, "distribution", meets)
    monkeypatch.setenv("TF_CONFIG", tf_config({"worker": TWO}, index=index))
    result = in_process(module, "--params", TINY, "--overrides", "train.lr=0.1 tracking.experiment=e2e")
    assert result.returncode == 2 and result.stderr.strip().endswith("error: met")
    cfg = config.load(TINY, ["train.lr=0.1"])
    assert met == [{**train.meeting_job(cfg), **train.meeting_data(cfg)}] and len(met[0]) == 3
    assert held == [(0, 0)]  # no checkpoint: a fresh store, and none in this host's checkpoint folder


def test_a_host_at_a_loopback_address_beside_hosts_on_other_machines_is_refused_at_once():
    """TF_CONFIG listed this host as localhost:PORT, the other on another machine (192.0.2.1, an address no machine
    here has), which can never reach it there: with the same port the other host reached its own port and was told
    "localhost:PORT, worker 0 of the cluster, was started as worker 1", with another it waited
    $PIPELINE_HOSTS_TIMEOUT (10 minutes). Refused at once, before this host listens."""
    import time

    from bench.servers import free_port
    from pipeline import distribute
    from pipeline.config import ConfigError

    port = free_port()
    spec = {"worker": [f"localhost:{port}", f"192.0.2.1:{port}"]}
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        distribute.wait_for_hosts(distribute.Cluster(spec, "worker", 0), timeout=5)
    assert time.monotonic() - started < 2
    assert str(error.value) == (
        f"TF_CONFIG: this host (worker 0) is at localhost:{port}, a loopback address, which worker 1 "
        f"(192.0.2.1:{port}), on another machine, cannot reach: give this host's name or address as the others "
        f"reach it")


def test_a_peer_whose_address_reaches_this_host_itself_is_named_so():
    """Worker 1 on host-b, its TF_CONFIG naming worker 0 (on another machine) `localhost` on worker 1's own port: it
    reached its own port and was told that localhost, worker 0 of the cluster, was started as worker 1, as if two
    hosts had been started as one task."""
    from bench.servers import free_port
    from pipeline import distribute
    from pipeline.config import ConfigError

    port = free_port()
    spec = {"worker": [f"localhost:{port}", f"host-b.invalid:{port}"]}
    with pytest.raises(ConfigError) as error:
        distribute.wait_for_hosts(distribute.Cluster(spec, "worker", 1), timeout=5)
    assert str(error.value) == (f"TF_CONFIG: worker 0's address, localhost:{port}, reaches this host (worker 1) "
                                f"itself: give worker 0 the address the other hosts reach its machine at")


def test_a_host_started_as_another_hosts_task_is_refused():
    """Every host's TF_CONFIG copied with the same task: on their own machines each found the other answering, and
    two worker 0s (each the chief, each logging to MLflow) went on into TensorFlow's wait."""
    import socket
    import threading

    from bench.servers import free_port
    from pipeline import distribute
    from pipeline.config import ConfigError

    hosts = [f"localhost:{free_port()}" for _ in range(2)]
    spec = {"worker": hosts}
    other = socket.create_server(("", int(hosts[1].rpartition(":")[2])))  # the other machine's worker 0, on host 1

    def answer() -> None:  # then ends, as it refuses too (else this host answers on until it has read why)
        conn, _ = other.accept()
        with conn:
            conn.sendall(distribute.hello(distribute.Cluster(spec, "worker", 0)))
        other.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    with pytest.raises(ConfigError) as error:
        distribute.wait_for_hosts(distribute.Cluster(spec, "worker", 0), timeout=5)
    assert str(error.value) == (f"TF_CONFIG: {hosts[1]}, worker 1 of the cluster, was started as worker 0: give each "
                                f"host its own TF_CONFIG 'task' (its type and index)")


def test_a_host_that_cannot_reach_another_at_the_address_it_was_given_holds_every_host_back():
    """Three hosts, worker 1's TF_CONFIG with a typo in worker 2's name (the same port): worker 0 and worker 2 heard
    every host answer and went on into TensorFlow's wait, deaf to Ctrl-C, for worker 1, which never reached worker 2
    and gave up after $PIPELINE_HOSTS_TIMEOUT. No host goes on until every host has reached every other: each
    names, once the time is up, the host still waiting and the address it could not reach."""
    from bench.servers import free_port

    hosts = [f"localhost:{free_port()}" for _ in range(3)]
    typo = [*hosts[:2], hosts[2].replace("localhost", "no-such-host.invalid")]
    first, second, third, seconds = meet(({"worker": hosts}, "worker", 0), ({"worker": typo}, "worker", 1),
                                         ({"worker": hosts}, "worker", 2), timeout=3)
    assert seconds < 10
    assert str(second).startswith(f"TF_CONFIG: worker 2 ({typo[2]}: Name or service not known) did not start "
                                  f"within 3 s")
    tail = ("within 3 s ($PIPELINE_HOSTS_TIMEOUT): check that host's TF_CONFIG addresses, and that their ports are "
            "open between the hosts")
    assert str(first) == (f"TF_CONFIG: worker 1 ({hosts[1]}) did not reach worker 2 at {typo[2]} (Name or service not "
                          f"known; this host reaches it at {hosts[2]}) {tail}")
    assert str(third) == (f"TF_CONFIG: worker 1 ({hosts[1]}) did not reach worker 2 at {typo[2]} (Name or service not "
                          f"known; worker 2 is this host, at {hosts[2]}) {tail}")


def host_code(spec: dict, index: int, timeout: float, prelude: str = "") -> str:
    """A host process that only meets the others (`wait_for_hosts`) of `spec` as worker `index`: exit 0 once it would go
    on into TensorFlow, or exit 2 with the one line a host's command prints."""
    return (f"import sys\nfrom pipeline import distribute\nfrom pipeline.config import ConfigError\n{prelude}\n"
            f"try:\n    distribute.wait_for_hosts(distribute.Cluster({spec!r}, 'worker', {index}), timeout={timeout})\n"
            f"except ConfigError as exc:\n    print(f'error: {{exc}}', file=sys.stderr)\n    sys.exit(2)\n")


def test_a_probe_takes_only_a_whole_hello_or_another_servers_first_bytes_for_an_answer():
    """A port that said nothing for 2 s (a host stopped: the kernel still accepts for it), or closed the connection
    first (a host closing its port), was taken for TensorFlow's: that host had met every other and was not probed
    again. Only a whole hello, answered with the prober's token, or another server's first bytes (TensorFlow's gRPC
    server speaks first) are an answer."""
    import socket
    import threading

    from pipeline import distribute

    with socket.create_server(("", 0)) as silent:  # accepts (the kernel's queue), never speaks
        assert distribute._probe(f"localhost:{silent.getsockname()[1]}", "t0", wait=0.3) is None
    heard = []

    def answer(server, said: bytes, read: bool = True) -> None:
        conn = server.accept()[0]
        with conn:
            conn.sendall(said)
            conn.settimeout(5)
            heard.append(conn.recv(256) if read else b"")

    for said in (b"", distribute.HELLO + b'{"task": "wor'):  # closed before a whole hello
        with socket.create_server(("", 0)) as server:
            thread = threading.Thread(target=answer, args=(server, said, False))
            thread.start()
            assert distribute._probe(f"localhost:{server.getsockname()[1]}", "t0", wait=30) is None
            thread.join()
    tensorflow = TensorFlowServer(free_port())
    assert distribute._probe(f"localhost:{tensorflow.server.getsockname()[1]}", "t0") == TensorFlowServer.SETTINGS
    tensorflow.close()
    hello = distribute.hello(distribute.Cluster({"worker": ["a:1", "b:1"]}, "worker", 1), me="t1")
    with socket.create_server(("", 0)) as server:
        thread = threading.Thread(target=answer, args=(server, hello))
        thread.start()
        assert distribute._probe(f"localhost:{server.getsockname()[1]}", "t0") == hello
        thread.join()
    assert heard[-1] == distribute.HEARD + b"t0\n"


def test_a_host_stopped_before_it_answers_is_waited_for_and_then_refused_not_taken_as_gone_on(launcher):
    """Worker 0 stopped (SIGSTOP: a loaded machine, a slow start) after it began listening: its port still accepts
    (the kernel's queue), but says nothing. Worker 1, started with another cluster, took 2 s of silence for an
    answer (TensorFlow's server, it assumed, so worker 0 had met every host) and never probed it again: worker 0,
    once going on, refused worker 1 and exited 2, and worker 1 waited out $PIPELINE_HOSTS_TIMEOUT for worker 2 (or,
    with no third host, went on into TensorFlow's wait for good). Silence is no answer: worker 1 probes on, hears
    worker 0 once it runs, and both refuse."""
    from tests.test_fault_tolerance import wait_until_stopped

    hosts = [f"localhost:{free_port()}" for _ in range(3)]
    first = launcher.start(dict(os.environ), host_code({"worker": hosts[:2]}, 0, timeout=120))
    eventually(lambda: "worker 0: waiting for worker 1" in (first.folder / "out").read_text(), timeout=60)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        wait_until_stopped([first.pid])
        second = launcher.start(dict(os.environ), host_code({"worker": hosts}, 1, timeout=60))
        # its first round of probes has ended, worker 0's among them
        eventually(lambda: "worker 1: waiting for " in (second.folder / "out").read_text(), timeout=60)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    for host, peer in ((second, 0), (first, 1)):
        _, err = host.communicate(timeout=120)
        assert host.returncode == 2 and err.startswith(
            f"error: TF_CONFIG: worker {peer} ({hosts[peer]}) was started with another cluster, "), err


def test_a_host_stopped_after_it_answered_still_hears_the_refusal_once_it_goes_on(launcher, tmp_path):
    """Worker 0 read worker 1's hello (another cluster) and refused it, answering on for 3 s so that worker 1, probing,
    would refuse too. Worker 1 stopped (SIGSTOP: a loaded machine) before it probed worker 0, for longer than that,
    then found nothing at worker 0's port and waited out $PIPELINE_HOSTS_TIMEOUT ("worker 0 ... did not start").
    The refusing host answers on until the other has read its answer: worker 1 refuses once it runs again."""
    from tests.test_fault_tolerance import wait_until_stopped

    hosts = [f"localhost:{free_port()}" for _ in range(3)]
    refused, go = tmp_path / "refused", tmp_path / "go"
    # ordering only: worker 1 probes worker 0 once the test says so; worker 0 marks that it has refused worker 1
    held = (f"import os, time\nprobe = distribute._probe\n"
            f"def held(address, *args, **kwargs):\n"
            f"    while address == {hosts[0]!r} and not os.path.exists({str(go)!r}):\n"
            f"        time.sleep(0.05)\n"
            f"    return probe(address, *args, **kwargs)\n"
            f"distribute._probe = held")
    marked = (f"check = distribute._check_peer\n"
              f"def marked(*args, **kwargs):\n"
              f"    try:\n"
              f"        return check(*args, **kwargs)\n"
              f"    except ConfigError:\n"
              f"        open({str(refused)!r}, 'w').close()\n"
              f"        raise\n"
              f"distribute._check_peer = marked")
    second = launcher.start(dict(os.environ), host_code({"worker": hosts}, 1, timeout=60, prelude=held))
    first = launcher.start(dict(os.environ), host_code({"worker": hosts[:2]}, 0, timeout=120, prelude=marked))
    eventually(refused.exists, timeout=60)
    os.kill(second.pid, signal.SIGSTOP)
    try:
        wait_until_stopped([second.pid])
        go.touch()
        with contextlib.suppress(subprocess.TimeoutExpired):
            first.wait(timeout=5)  # the refusing host's whole window and more (it answered for 3 s)
    finally:
        os.kill(second.pid, signal.SIGCONT)
    for host, peer in ((second, 0), (first, 1)):
        _, err = host.communicate(timeout=120)
        assert host.returncode == 2 and err.startswith(
            f"error: TF_CONFIG: worker {peer} ({hosts[peer]}) was started with another cluster, "), err


@pytest.mark.parametrize(("logged", "epochs", "said"), [
    # a cluster's chief killed after 2 epochs, rerun without TF_CONFIG: it resumed alone, and the tags said so only
    ({"distribute": "multi_worker", "workers": "2", "replicas": "2"}, 2,
     "multi_worker over 2 hosts, 2 replicas -> none over 1 host, 1 replica after epoch 2"),
    ({"distribute": "mirrored", "workers": "1", "replicas": "4", "resumed_across_distribution": "none over 1 host, 1 "
      "replica -> mirrored over 1 host, 4 replicas after epoch 1"}, 3,
     "none over 1 host, 1 replica -> mirrored over 1 host, 4 replicas after epoch 1, mirrored over 1 host, 4 replicas "
     "-> none over 1 host, 1 replica after epoch 3"),
    ({"distribute": "none", "workers": "1", "replicas": "1"}, 2, None),  # the same
    ({"distribute": "multi_worker", "workers": "2", "replicas": "2"}, 0, None),  # nothing trained under it
    ({}, 2, None),  # no session reached training: nothing logged
])
def test_a_run_resumed_under_another_distribution_says_which_and_after_which_epoch(logged, epochs, said):
    """The train run's tags distribute, workers and replicas were the last session's alone: a run whose first epochs
    trained over two hosts, resumed on one, read as trained on one throughout."""
    from pipeline.tracking import training

    now = {"distribute": "none", "workers": "1", "replicas": "1", "devices": "cpu:0"}
    assert training.resumed_across_distribution(logged, now, epochs) == said


def test_one_replica_looks_up_no_image_count_before_training(monkeypatch):
    """Any batch suits one replica: a data path's digest (reading every file) and a store query per command were
    spent on nothing."""
    from pipeline import inputs
    from pipeline.distribute import Distribution

    def counted(*args):
        raise AssertionError("counted the images")

    monkeypatch.setattr(inputs, "known_split_images", counted)
    inputs.check_known_batches(config.load(TINY, ["train.batch_size=33"]), Distribution("none", ["cpu:0"]))
    with pytest.raises(AssertionError, match="counted"):
        inputs.check_known_batches(config.load(TINY), Distribution("data_parallel", ["cpu:0", "cpu:1"]))


def test_mirrored_or_data_parallel_over_one_device_is_a_warning(monkeypatch, capsys):
    """`train.distribute: mirrored` on a machine of one device trained without a word as 'none' does, and without
    XLA under jit_compile auto (Keras turns it off under any strategy): a run slower for nothing, said nowhere."""
    import tensorflow as tf

    from pipeline import distribute

    one = tf.config.list_logical_devices("CPU")[:1]
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda device_type=None: one if device_type == "CPU" else [])
    assert distribute.distribution("mirrored").replicas == 1
    assert capsys.readouterr().err == (
        f"warning: train.distribute 'mirrored' over one device ({one[0].name}) trains as 'none' does but without XLA "
        f"under train.jit_compile auto (Keras turns it off under a strategy): give 'auto' or 'none' on a machine of "
        f"one device\n")
    distribute.one_device_note("data_parallel", ["cpu:0"])  # JAX keeps XLA under it: no cost named
    assert capsys.readouterr().err == ("warning: train.distribute 'data_parallel' over one device (cpu:0) trains as "
                                       "'none' does: give 'auto' or 'none' on a machine of one device\n")
    distribute.one_device_note("mirrored", ["cpu:0", "cpu:1"])
    assert capsys.readouterr().err == ""
