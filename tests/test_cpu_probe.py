"""`auto` precision and XLA on a CPU are measured (pipeline.cpu_probe): the fastest candidate is taken, once per
machine and model, and recorded on the train run; a resumed run goes on with what it recorded, backend too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import config, cpu_probe, data, fitting, inputs
from pipeline.distribute import Distribution, distribution
from pipeline.tracking.resume import checkpoint_dir
from tests.conftest import ROOT

# The smallest ResNet the params describe: one stage of one basic unit. The XLA compiles (the probe's, an epoch's)
# and, on JAX, the op-by-op compiles that build a model take longer the more layers it has.
ONE_STAGE = ["model.block=basic", "model.widths=[16]", "model.strides=[1]"]
SLOW = {("float32", False): 0.002, ("float32", True): 0.03, ("mixed_bfloat16", False): 0.015}


class Fake:
    """A 'model' whose train step takes the time its candidate says."""

    def __init__(self, candidate):
        self.seconds = SLOW[candidate]

    def train_on_batch(self, x, y):
        time.sleep(self.seconds)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "cpu-fast-path.json"


def test_the_fastest_candidate_is_taken_and_kept_per_machine_and_job(cache):
    built = []

    def build(precision, jit):
        built.append((precision, jit))
        return Fake((precision, jit))

    x, y = np.zeros((4, 32, 32, 3), np.uint8), np.zeros((4, 10))
    candidates = list(SLOW)
    best, speeds, cached = cpu_probe.fastest(candidates, "job-a", build, x, y)
    assert best == ("float32", False) and not cached
    assert set(speeds) == {"float32", "float32 + XLA", "mixed_bfloat16"}
    assert speeds["float32"] > speeds["mixed_bfloat16"] > speeds["float32 + XLA"]
    assert sorted(built) == sorted(candidates)
    # The next run on this machine reads the file: nothing is built or timed again.
    built.clear()
    assert cpu_probe.fastest(candidates, "job-a", build, x, y) == (best, speeds, True) and not built
    # Another model (job) or another candidate set is measured anew, beside the first in the same file.
    assert cpu_probe.fastest(candidates, "job-b", build, x, y)[2] is False and built
    assert len(json.loads(cache.read_text())) == 2
    # A torn or foreign cache file is measured over, not trusted.
    cache.write_text("{not json")
    assert cpu_probe.fastest(candidates, "job-a", build, x, y)[0] == ("float32", False)
    assert len(json.loads(cache.read_text())) == 1
    # One candidate is no question: it is taken unmeasured.
    built.clear()
    assert cpu_probe.fastest([("float32", True)], "job-c", build, x, y) == (("float32", True), {}, False)
    assert not built


def test_an_unwritable_cache_still_gives_the_measured_choice(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "file" / "below-a-file"))
    x, y = np.zeros((4, 32, 32, 3), np.uint8), np.zeros((4, 10))
    best, _, cached = cpu_probe.fastest(list(SLOW), "job", lambda p, j: Fake((p, j)), x, y)
    assert best == ("float32", False) and not cached


def test_an_empty_cache_dir_variable_is_the_default_folder_not_the_current_one(monkeypatch, tmp_path):
    """PIPELINE_CACHE_DIR= before a command put cpu-fast-path.json in whatever folder the command ran in."""
    monkeypatch.setenv("PIPELINE_CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cpu_probe.cache_file() == tmp_path / ".cache" / "cifar10-resnet" / "cpu-fast-path.json"


@pytest.mark.parametrize(("precision", "jit", "bf16", "expected"), [
    ("auto", "auto", True, [("float32", False), ("float32", True), ("mixed_bfloat16", False),
                            ("mixed_bfloat16", True)]),
    ("auto", "auto", False, [("float32", False), ("float32", True)]),
    ("auto", "false", True, [("float32", False), ("mixed_bfloat16", False)]),
    ("float32", "auto", True, [("float32", False), ("float32", True)]),
    ("float32", "false", True, None),  # nothing to choose: no probe
])
def test_each_auto_on_a_cpu_is_a_question_to_measure(monkeypatch, precision, jit, bf16, expected):
    asked = []

    def fastest(candidates, *probe):
        asked.append(candidates)
        return candidates[-1], {cpu_probe.label(c): 1.0 for c in candidates}, False

    monkeypatch.setattr(cpu_probe, "fastest", fastest)
    monkeypatch.setattr(fitting, "cpu_has_bf16", lambda: bf16)
    t = config.load("params/tiny.yaml", [f"train.precision={precision}", f"train.jit_compile={jit}"]).train
    chosen = fitting.fast_path(t, distribution("none"), lambda: ("job", None, None, None))
    assert asked == ([expected] if expected else [])
    if expected:
        assert chosen == expected[-1]
    # On a GPU, or under a strategy over several CPU devices, nothing is probed: bfloat16 there, Keras's XLA rule.
    assert fitting.fast_path(t, Distribution("none", ["/device:GPU:0"]), lambda: 1 / 0)[0] == (
        "mixed_bfloat16" if precision == "auto" else precision)
    assert len(asked) == (1 if expected else 0)


def test_a_run_trains_with_the_measured_choice_and_records_it(store, cache):
    from pipeline import prepare, train

    cfg = config.load("params/tiny.yaml", ["train.epochs=1", "train.verbose=0", "data.synthetic_train=256",
                                           "data.synthetic_test=64", "train.precision=auto", "train.jit_compile=auto",
                                           "tracking.experiment=e2e", *ONE_STAGE])
    import mlflow

    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("e2e").experiment_id) as run:
        train.run(cfg, prepare.run(cfg))
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    probe = json.loads(tags["cpu_fast_path_probe"])
    speeds = probe["images_per_second"]
    assert len(speeds) == (4 if fitting.cpu_has_bf16() else 2) and min(speeds.values()) > 0
    assert probe["choice"] == max(speeds, key=speeds.get) and probe["cached"] is False
    assert (tags["dtype_policy"], tags["jit_compile"]) == (
        probe["choice"].split(" + ")[0], "true" if probe["choice"].endswith("+ XLA") else "false")
    assert keras.mixed_precision.global_policy().name == "float32"  # the probe's policies did not leak
    # The machine's answer is kept: the next model of the same recipe takes it without measuring.
    fitting.compile_model(cfg, data.make_synthetic(n_train=256, n_test=64), distribution("none"), 256)
    assert fitting.PROBED["cached"] is True and fitting.PROBED["choice"] == probe["choice"]


@pytest.mark.parametrize(("precision", "jit", "expected"), [
    ("auto", "auto", ("float32", "auto")),  # auto gives up bfloat16 and keeps XLA, as on the GPU
    ("auto", "true", ("float32", True)),
    ("mixed_bfloat16", "auto", ("mixed_bfloat16", False)),  # bfloat16 asked for: without XLA
    ("mixed_bfloat16", "false", ("mixed_bfloat16", False)),
    ("float32", "auto", ("float32", "auto")),
])
def test_bfloat16_xla_is_not_used_on_a_jax_cpu_that_computes_it_wrongly(monkeypatch, precision, jit, expected):
    # jaxlib 0.11.2 on a CPU: NaN val_loss and garbage val_acc from a bfloat16 model validated under XLA
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setattr(fitting, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(fitting, "jax_cpu_bf16_xla_wrong", lambda: True)
    t = config.load("params/fast.yaml", [f"train.precision={precision}", f"train.jit_compile={jit}"]).train
    assert fitting.fast_path(t, Distribution("none", ["cpu:0"])) == expected
    gpu = ("mixed_bfloat16" if precision == "auto" else precision, t.jit_compile)
    assert fitting.fast_path(t, Distribution("none", ["cuda:0"])) == gpu  # GPUs are not touched
    monkeypatch.setattr(fitting, "jax_cpu_bf16_xla_wrong", lambda: False)
    assert fitting.fast_path(t, Distribution("none", ["cpu:0"])) == (
        "mixed_bfloat16" if precision == "auto" else precision, t.jit_compile)


def test_bfloat16_with_xla_both_asked_for_on_a_jax_cpu_that_computes_it_wrongly_is_a_param_error(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    cfg = config.load("params/fast.yaml", ["train.precision=mixed_bfloat16", "train.jit_compile=true"])
    monkeypatch.setattr(fitting, "jax_cpu_bf16_xla_wrong", lambda: False)
    fitting.check_backend(cfg)
    monkeypatch.setattr(fitting, "jax_cpu_bf16_xla_wrong", lambda: True)
    with pytest.raises(config.ConfigError, match=r"^train.precision: mixed_bfloat16 with train.jit_compile true "
                                                 r"computes wrong results on this JAX's CPU"):
        fitting.check_backend(cfg)



def test_main_refuses_bfloat16_with_xla_on_a_jax_cpu_that_computes_it_wrongly_before_prepare(monkeypatch, store):
    import mlflow

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setattr(fitting, "jax_cpu_bf16_xla_wrong", lambda: True)
    cfg = config.load("params/fast.yaml", ["train.precision=mixed_bfloat16", "train.jit_compile=true",
                                           "data.source=synthetic"])
    with pytest.raises(config.ConfigError, match=r"^train.precision: mixed_bfloat16 with train.jit_compile true"):
        inputs.check_inputs(cfg, resume="")  # main's checks, before any run opens
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_the_jax_cpu_check_tells_a_right_xla_from_a_wrong_one(monkeypatch):
    import jax

    fitting.jax_cpu_bf16_xla_wrong.cache_clear()
    try:
        assert not fitting.jax_cpu_bf16_xla_wrong()  # the dev venv's JAX (0.10.2) is right: bfloat16 rounding passes
        fitting.jax_cpu_bf16_xla_wrong.cache_clear()
        # what jaxlib 0.11.2 did: NaN in a share of the outputs
        monkeypatch.setattr(jax, "jit", lambda f: lambda *a: f(*a).at[0, 0, 0, :8].set(np.nan))
        assert fitting.jax_cpu_bf16_xla_wrong()
    finally:
        fitting.jax_cpu_bf16_xla_wrong.cache_clear()


# `auto` and the backend are resolved per machine: a run resumed on another (a checkpoint folder shared between hosts)
# went on in another precision, XLA choice or backend than the epochs it trained, its tags then describing only the
# last part of it.
RESUMABLE = ["--params", "params/tiny.yaml", "--epochs", "2", "--overrides",
             "tracking.experiment=e2e train.precision=auto train.jit_compile=auto data.synthetic_train=256 "
             "data.synthetic_test=64 " + " ".join(ONE_STAGE)]


def stopped_after_one_epoch(in_process, monkeypatch):
    """`train` of `RESUMABLE` stopped by SIGTERM as its second epoch begins: its run, KILLED, with a checkpoint of
    epoch 1; the machine's choice is float32 without XLA (a CPU without bf16 units, where no XLA measured faster)."""
    from pipeline import tracking, train

    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise tracking.Interrupted(signal.SIGTERM)

    def fit(model, cfg, splits, num_classes, callbacks):
        return fitting.fit(model, cfg, splits, num_classes, [*callbacks, Stop()])

    asked = []
    monkeypatch.setattr(cpu_probe, "fastest", lambda candidates, *a: (
        asked.append(candidates) or ("float32", False), {cpu_probe.label(c): 1.0 for c in candidates}, False))
    monkeypatch.setattr(fitting, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(train, "fit", fit)
    stopped = in_process("train", *RESUMABLE)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    monkeypatch.setattr(train, "fit", fitting.fit)
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("e2e").experiment_id],
                                        "tags.step = 'train'")
    assert asked and run.info.status == "KILLED"
    assert fitting.Checkpoint.completed_epochs(checkpoint_dir(run.info.run_id)) == 1
    return run


def test_a_run_resumed_where_auto_resolves_otherwise_goes_on_as_it_trained(store, cache, in_process, monkeypatch):
    """Resumed on a machine whose probe takes bfloat16: the run goes on in float32 without XLA, as its first epoch
    trained, unmeasured, and says so in a line; its tags still describe every epoch."""
    run = stopped_after_one_epoch(in_process, monkeypatch)
    run_id, before = run.info.run_id, run.data.tags
    assert (before["dtype_policy"], before["jit_compile"]) == ("float32", "false")

    measured = []  # another machine: bf16 units, and its probe would take bfloat16
    monkeypatch.setattr(fitting, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(cpu_probe, "fastest", lambda candidates, *a: (
        measured.append(candidates) or ("mixed_bfloat16", False), {cpu_probe.label(c): 1.0 for c in candidates},
        False))
    built = []
    compile_model = fitting.compile_model

    def compiled(*args, **kwargs):
        model = compile_model(*args, **kwargs)
        built.append((model.dtype_policy.name, bool(model.jit_compile)))
        return model

    from pipeline import train

    monkeypatch.setattr(train, "compile_model", compiled)
    done = in_process("train", *RESUMABLE)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming train run {run_id}" in done.stdout
    assert built == [("float32", False)] and not measured  # as recorded: nothing measured, nothing else built
    assert (f"train.precision auto and train.jit_compile auto: float32 without XLA, as train run {run_id} trained "
            f"its first epoch (tags dtype_policy, jit_compile); not measured on this machine") in done.stdout
    after = MlflowClient().get_run(run_id)
    assert after.info.status == "FINISHED"
    assert {k: after.data.tags[k] for k in ("backend", "dtype_policy", "jit_compile", "cpu_fast_path_probe")} == {
        k: before[k] for k in ("backend", "dtype_policy", "jit_compile", "cpu_fast_path_probe")}


def test_a_resumed_run_says_where_this_machine_would_take_another_precision(monkeypatch, capsys):
    """The line, from what this machine takes without measuring (its probe's cache): another choice, the same (no
    line), or none kept (not measured)."""
    cfg = config.load("params/tiny.yaml", ["train.precision=auto", "train.jit_compile=auto"])
    recorded = fitting.Recorded("float32", False, "train run r trained its first epoch")
    dataset = data.make_synthetic(n_train=64, n_test=16)
    monkeypatch.setattr(fitting, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(cpu_probe, "fastest", lambda *a: 1 / 0)  # never measured
    for kept, line in [(("mixed_bfloat16", False), "this machine would take mixed_bfloat16 without XLA"),
                       (("float32", False), None), (None, "not measured on this machine")]:
        monkeypatch.setattr(cpu_probe, "cached_fastest", lambda candidates, job, kept=kept: kept)
        capsys.readouterr()
        model = fitting.compile_model(cfg, dataset, distribution("none"), 64, recorded)
        assert (model.dtype_policy.name, model.jit_compile) == ("float32", False)
        out = capsys.readouterr().out
        assert (line in out if line else "train.precision auto" not in out), out
        if line:
            assert (f"train.precision auto and train.jit_compile auto: float32 without XLA, as train run r trained "
                    f"its first epoch; {line}") in out


def test_a_resumed_run_whose_backend_or_precision_cannot_go_on_here_is_refused_before_any_run_opens(
        store, cache, in_process, monkeypatch):
    """Another backend than the run's in a process that has loaded Keras, a backend not installed here, bfloat16 +
    XLA on a JAX CPU that computes it wrongly: one line naming the key and both values, exit 2, no run opened, no
    epoch trained."""
    run = stopped_after_one_epoch(in_process, monkeypatch)
    run_id, client = run.info.run_id, MlflowClient()

    def runs():
        return sorted((r.info.run_id, r.info.status) for r in client.search_runs([run.info.experiment_id]))

    before = runs()
    client.set_tag(run_id, "backend", "jax")
    for entry in ("train", "main"):
        refused = in_process(entry, *RESUMABLE)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines()[-1] == (
            f"error: KERAS_BACKEND: train run {run_id} trained its first epoch on jax, and this process runs "
            f"tensorflow; set KERAS_BACKEND=jax to go on with it, or resume=never to start afresh")
    refused = in_process("main", *RESUMABLE, "--resume", run_id)
    assert refused.returncode == 2 and "error: KERAS_BACKEND: " in refused.stderr

    client.set_tag(run_id, "backend", "no_such_backend")
    refused = in_process("main", *RESUMABLE)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: KERAS_BACKEND: train run {run_id} trained its first epoch on no_such_backend, which is not installed "
        f"here (this machine runs tensorflow); install no_such_backend to go on with it, or resume=never to start "
        f"afresh")

    # trained on a GPU with JAX in bfloat16 + XLA, resumed on a JAX CPU whose XLA computes that wrongly
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setattr(fitting, "jax_cpu_bf16_xla_wrong", lambda: True)
    for key, value in {"backend": "jax", "dtype_policy": "mixed_bfloat16", "jit_compile": "true"}.items():
        client.set_tag(run_id, key, value)
    refused = in_process("main", *RESUMABLE)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: train.precision: train run {run_id} trained its first epoch in mixed_bfloat16 with XLA, which this "
        f"JAX computes wrongly on its CPU (its XLA miscompiles bfloat16 convolutions: NaN val_loss; a fresh run here "
        f"takes float32 with XLA); set XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= to go on with it, or "
        f"resume=never to start afresh")

    assert runs() == before  # no run opened, the resumed one untouched
    assert fitting.Checkpoint.completed_epochs(checkpoint_dir(run_id)) == 1
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1]


def test_main_resumes_a_run_on_the_backend_it_trained_on(store, cache, in_process, monkeypatch):
    """A run that trained its first epoch on JAX with XLA, resumed by `main` on a machine whose Keras loads
    TensorFlow: main loads Keras on JAX, says so in a line, and the run's second epoch trains there, with XLA."""
    run = stopped_after_one_epoch(in_process, monkeypatch)  # trained on TensorFlow: its checkpoint loads on JAX too
    run_id, client = run.info.run_id, MlflowClient()
    client.set_tag(run_id, "backend", "jax")
    client.set_tag(run_id, "jit_compile", "true")  # (JAX without XLA runs op by op: minutes)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    done = subprocess.run([sys.executable, "-m", "pipeline.main", *RESUMABLE], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**env, "KERAS_BACKEND": "tensorflow"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"KERAS_BACKEND: jax, as train run {run_id} trained its first epoch on it; this machine would load "
            f"tensorflow (resume=never starts afresh on it)") in done.stdout
    assert f"resuming train run {run_id}" in done.stdout and "backend jax" in done.stdout
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED"
    assert (after.data.tags["backend"], after.data.tags["dtype_policy"], after.data.tags["jit_compile"]) == (
        "jax", "float32", "true")
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_acc")) == [1, 2]
