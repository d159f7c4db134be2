"""`auto` precision and XLA on a CPU are measured (pipeline.cpu_probe): the fastest candidate is taken, once per
machine and model, and recorded on the train run."""

from __future__ import annotations

import json
import time

import keras
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import config, cpu_probe, data, fitting, inputs
from pipeline.distribute import Distribution, distribution

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
                                           "tracking.experiment=e2e"])
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
