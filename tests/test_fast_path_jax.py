"""The JAX backend: the pipeline with data parallelism over two host devices and images held on the
device, and the engine checks. (A file of its own, beside test_fast_path.py, so that the two run on
different pytest workers.)

The pipeline runs with XLA (`train.jit_compile=true`, what `auto` gives on JAX and what every recipe but
tiny uses): tiny's `false`, right for TensorFlow, would run JAX op by op, compiling each op on its own.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import jax  # requirements-dev.txt installs it: without JAX this module fails, it does not skip
import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from tests.conftest import eventually, mlflow_run, run_module
from tests.test_fast_path import assert_two_device_run

XLA = "train.jit_compile=true"
# One stage of basic blocks, for trainings whose model is not what a test is about: fewer layers for XLA to compile.
ONE_STAGE = "model.block=basic model.widths=[16] model.strides=[1]"
BACKEND_ERRORS = [
    ("JAX", "error: KERAS_BACKEND: 'JAX' is no Keras backend (jax, numpy, openvino, tensorflow, torch)"),
    ("torch", "error: KERAS_BACKEND: torch is not installed here"),
]


def test_wrong_engine_for_the_backend_is_a_param_error(store, in_process, monkeypatch):
    """`train` on JAX asked for TensorFlow's engine: refused as a param error. In this process (its Keras loaded on
    TensorFlow, told it runs JAX): the refusal comes before any training, so no JAX process need start for it."""
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    result = in_process("train", "--params", "params/tiny.yaml", "--epochs", "2", "--overrides",
                        "train.distribute=mirrored tracking.experiment=e2e")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: train.distribute: 'mirrored' needs the TensorFlow backend, not jax" in result.stderr


@pytest.mark.parametrize("module, args", [
    ("pipeline.main", ("--params", "params/tiny.yaml", "--epochs", "1")),
    ("pipeline.sweep", ("--spec", "params/sweep-example.yaml")),
], ids=["main", "sweep"])
@pytest.mark.parametrize("backend, message", BACKEND_ERRORS, ids=["misspelt", "not-installed"])
def test_a_keras_backend_that_cannot_load_is_one_line_before_any_run(store, tmp_path, module, args, backend, message):
    """KERAS_BACKEND=JAX (Keras's names are lower case) or a backend not installed: main went on to Keras's import
    and its traceback ("ValueError: Unable to import backend : JAX"), exit 1; a sweep did so after its sweep run,
    a prepare run and its study had begun, and left the run FAILED and the study's first trial RUNNING."""
    storage = tmp_path / "optuna.db"
    result = run_module({**store, "KERAS_BACKEND": backend}, module, *args,
                        *(("--storage", f"sqlite:///{storage}") if module == "pipeline.sweep" else ()))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []
    assert not storage.exists()


@pytest.mark.parametrize("module, args, backend", [
    ("pipeline.train", ("--params", "params/tiny.yaml", "--epochs", "1"), "JAX"),
    ("pipeline.evaluate", ("--model-uri", "models:/m-0", "--dataset-uri", "dataset.npz"), "torch"),
    ("pipeline.prepare", ("--params", "params/tiny.yaml"), "torch"),
    ("pipeline.register", ("--model-uri", "models:/m-0"), "JAX"),
], ids=["train", "evaluate", "prepare", "register"])
def test_each_step_refuses_a_keras_backend_that_cannot_load_in_one_line(store, module, args, backend):
    """`python -m pipeline.train` and `-m pipeline.evaluate` import Keras with their modules: KERAS_BACKEND=JAX (or
    one not installed) printed Keras's import traceback, exit 1; prepare said "cannot download CIFAR-10 (ValueError:
    Unable to import backend : JAX)" where it downloads, and register printed the traceback inside its run where it
    scores a champion. Each says what main says, one line naming KERAS_BACKEND and the value, exit 2, before any
    run."""
    result = run_module({**store, "KERAS_BACKEND": backend}, module, *args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(dict(BACKEND_ERRORS)[backend]), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()],
                                      run_view_type=ViewType.ALL) == []


@pytest.mark.parametrize("backend", ["numpy", "openvino"])
def test_a_keras_backend_that_cannot_train_is_refused_in_one_line(monkeypatch, backend):
    """KERAS_BACKEND=numpy (installed with Keras) passed the backend check: `main` loaded Keras on it and failed, before
    any run opened, in Keras's distribution code, which the numpy backend (it only infers) lacks, with a traceback
    ("'NoneType' object has no attribute 'list_devices'"), exit 1. Refused before Keras loads, as a backend that
    cannot load is; in this process, Keras held out of sys.modules as in a fresh command."""
    from pipeline import config, inputs

    monkeypatch.setenv("KERAS_BACKEND", backend)
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.setattr(inputs.importlib.util, "find_spec", lambda name: object())  # installed, as numpy is
    with pytest.raises(config.ConfigError) as refused:
        inputs.check_configured_backend()
    assert str(refused.value) == (f"KERAS_BACKEND: {backend} is a Keras backend that cannot train; "
                                  f"name one that can (jax, tensorflow, torch)")


def test_a_missing_jax_is_refused_naming_the_backends_that_are_installed(monkeypatch):
    """KERAS_BACKEND=jax where JAX is not installed said "install it, or name an installed backend (KERAS_BACKEND=jax
    or tensorflow)": the very backend missing, offered as an installed one. It names those installed here."""
    from pipeline import config, inputs

    find_spec = inputs.importlib.util.find_spec
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.setattr(inputs.importlib.util, "find_spec", lambda name: None if name == "jax" else find_spec(name))
    with pytest.raises(config.ConfigError) as refused:
        inputs.check_configured_backend()
    assert str(refused.value) == ("KERAS_BACKEND: jax is not installed here; install it, or name an installed "
                                  "backend (KERAS_BACKEND=tensorflow)")


def test_mlflow_run_of_train_with_a_keras_backend_that_cannot_load_trashes_its_run(store):
    """`mlflow run . -e train` with KERAS_BACKEND=JAX: the step's one line, and the run `mlflow run` opened ends
    FAILED with that reason and goes to the trash, as for a bad param (it was left FAILED under Keras's traceback)."""
    result = mlflow_run({**store, "KERAS_BACKEND": "JAX"}, "train", params="params/tiny.yaml", epochs="1")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors == [dict(BACKEND_ERRORS)["JAX"]], result.stderr[-3000:]
    experiment_id = MlflowClient().get_experiment_by_name("e2e").experiment_id
    (opened,) = eventually(lambda: MlflowClient().search_runs([experiment_id], run_view_type=ViewType.DELETED_ONLY))
    assert opened.info.status == "FAILED" and opened.data.tags["failure_reason"] == errors[0][len("error: "):]
    assert MlflowClient().search_runs([experiment_id]) == []


def test_device_batches_cover_every_image_once_per_epoch_in_a_new_order():
    import numpy as np

    from pipeline.fitting import DeviceBatches, first_flips, flipped_in

    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    labels = np.eye(10, dtype=np.float32)
    feed = DeviceBatches(images, labels, 4, shuffle=True, seed=0)
    assert len(feed) == 3 and isinstance(feed[0][0], jax.Array)

    def epoch():
        batches = [feed[i] for i in range(len(feed))]
        return np.concatenate([np.asarray(x) for x, _ in batches]), np.concatenate([np.asarray(y) for _, y in batches])

    xs, ys = epoch()
    first = ys.argmax(axis=1)
    assert xs.dtype == np.uint8 and sorted(first) == list(range(10))
    np.testing.assert_array_equal(xs, images[first])  # each image still with its own label
    feed.on_epoch_end()
    second = epoch()[1].argmax(axis=1)
    assert sorted(second) == list(range(10)) and list(second) != list(first)
    in_order = DeviceBatches(images, labels, 4, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([np.asarray(in_order[i][0]) for i in range(3)]), images)
    alternate = DeviceBatches(images, labels, 4, shuffle=True, seed=0, alternate_flip=True)
    for epoch in range(2):  # train.alternate_flip: the gather on the device mirrors the images first_flips says
        mirror = flipped_in(first_flips(10, 0), epoch)
        for i in range(len(alternate)):
            x, y = (np.asarray(a) for a in alternate[i])
            rows = y.argmax(axis=1)
            np.testing.assert_array_equal(x, np.where(mirror[rows, None, None, None], images[rows][:, :, ::-1],
                                                      images[rows]))
        alternate.on_epoch_end()


DATA_PARALLEL_FEED = """
import json

import keras
import numpy as np
from keras.src.backend.jax.trainer import _distribute_data

from pipeline.fitting import DeviceBatches

keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
images = np.arange(8 * 2 * 2 * 3, dtype=np.uint8).reshape(8, 2, 2, 3)
feed = DeviceBatches(images, np.eye(8, dtype=np.float32), 4, shuffle=True, seed=0, alternate_flip=True)
x, y = feed[0]
placed = _distribute_data((x, y))  # what Keras's trainer does with each batch under DataParallel
rows = np.asarray(y).argmax(axis=1)
print(json.dumps({
    "images_on": len(feed.images.sharding.device_set),
    "slices": [[s.device.id, s.data.shape[0]] for s in x.addressable_shards],
    "left_as_they_are": placed[0] is x and placed[1] is y,
    "each_image_its_label": all(set((np.asarray(x)[k].ravel() // 12).tolist()) == {int(rows[k])} for k in range(4)),
}))
"""


def test_under_data_parallel_each_device_gathers_its_own_slice_of_every_batch():
    """`train.feed=device` with data_parallel: every device holds the images and gathers its own half of each batch,
    in the layout Keras's DataParallel trains on, which Keras then leaves as it is. The images were on the first
    device alone, which gathered every whole batch, and each step copied the other devices' halves from it."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", DATA_PARALLEL_FEED], env=env, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen == {"images_on": 2, "slices": [[0, 2], [1, 2]], "left_as_they_are": True,
                    "each_image_its_label": True}


def test_main_on_the_jax_backend_data_parallel_over_two_devices_with_images_held_there(store):
    """The whole pipeline (`python -m pipeline.main`, as `mlflow run`'s main entry point runs it: test_pipeline_e2e
    runs it through `mlflow run`) on JAX, two host devices, the device feed: one run for all three, since each JAX
    process spends most of its minute compiling."""
    env = {**store, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = run_module(env, "pipeline.main", "--params", "params/tiny.yaml", "--epochs", "2", "--overrides",
                        f"tracking.experiment=e2e train.feed=device train.distribute=data_parallel {XLA} {ONE_STAGE}")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient()
    run = assert_two_device_run(client, "jax")
    assert run.data.tags["distribute"] == "data_parallel" and run.data.tags["jit_compile"] == "true"
    assert run.data.params["train.feed"] == "device"
    experiment = client.get_experiment_by_name("e2e").experiment_id
    evaluation = client.search_runs([experiment], "tags.step = 'evaluate'")[0]
    assert evaluation.data.metrics["test_acc"] > 0.5
    champion = client.get_model_version_by_alias("cifar10-resnet", "champion")
    requirements = mlflow.pyfunc.get_model_dependencies(f"models:/cifar10-resnet/{champion.version}")
    assert "jax==" in Path(requirements).read_text()  # the served model asks for the backend it was trained with


RESUMED_ORDER = """
import sys
from pathlib import Path

import keras
from pipeline import config, data, fitting
from pipeline.distribute import distribution

cfg = config.load("params/tiny.yaml", "train.epochs=3 train.cutout=4 train.verbose=0 train.jit_compile=true "
                  "model.block=basic model.widths=[16] model.strides=[1]")
dataset = data.make_synthetic(n_train=96, n_test=32, seed=0)
splits = fitting.split_validation(dataset, 0.0, 0)


def fit(folder, *callbacks):
    model = fitting.compile_model(cfg, dataset, distribution("none"), len(splits[0]))
    return fitting.fit(model, cfg, splits, 10, [fitting.Checkpoint(folder, 1, keep=True), *callbacks]).history["loss"]


stop = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: setattr(stop.model, "stop_training", True))
uninterrupted = fit(Path(sys.argv[1]) / "a")
fit(Path(sys.argv[1]) / "b", stop)  # as a kill after epoch 1 leaves it
print("losses", uninterrupted[1:], fit(Path(sys.argv[1]) / "b"), flush=True)
"""


def test_a_second_run_loads_its_compiled_programs_from_jaxs_cache_and_a_resumed_fit_trains_as_an_uninterrupted_one(
        store, tmp_path):
    """`pipeline` turns on JAX's persistent compilation cache (the suite turns it off, tests/conftest.py): the same
    training again loads its train and test steps instead of compiling them, and its run says how many and how much
    compiling that spared. The two trainings run one after the other in one process (as a sweep's trials do: one JAX
    start-up less); the second's model is a new one, whose programs JAX's in-memory caches do not hold.

    Then, in the same process (one JAX start-up less again), RESUMED_ORDER: on JAX without train.drop_remainder or
    train.alternate_flip, training went through Keras's array feed, which shuffles from NumPy's global generator,
    seeded afresh by `compile_model`: a run resumed at epoch 2 drew epoch 1's order (and the augmentations that follow
    it) again, and its losses were another run's. `ArrayBatches` draws each epoch's order from (train.seed, epoch),
    as `host_batches` does on TensorFlow. Its second and third trainings' models load the first's programs from the
    cache instead of compiling them again; the same programs, the same losses."""
    import json
    import subprocess
    import sys

    import numpy as np

    from tests.conftest import ROOT

    cache = tmp_path / "jax-cache"
    # JAX keeps only programs that took over 1 s to compile: tiny's take less
    env = {**store, "KERAS_BACKEND": "jax", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from pipeline import train
        from pipeline.tracking import cli
        for name in ("cold", "warm"):
            print(f"=== {{name}}", flush=True)
            sys.argv = ["train", "--params", "params/tiny.yaml", "--epochs", "1", "--resume", "never",
                        "--overrides", "{XLA} {ONE_STAGE} data.synthetic_train=256 data.synthetic_test=64"]
            cli(train.main)
            sys.stdout.flush()
            if name == "cold":
                print("cache holds programs:", any(Path({str(cache)!r}).iterdir()), flush=True)
        print("=== resumed", flush=True)
        sys.argv = ["-c", {str(tmp_path)!r}]
        exec(compile({RESUMED_ORDER!r}, "RESUMED_ORDER", "exec"), {{"__name__": "__main__"}})
    """)
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = dict(part.split("\n", 1) for part in result.stdout.split("=== ")[1:])
    cold, warm = parts["cold"], parts["warm"]
    assert "cache holds programs: True" in cold, cold[-3000:]
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.step = 'train'", order_by=["attributes.start_time ASC"])
    assert [r.data.tags["compile_cache"] for r in runs] == [str(cache), str(cache)]
    programs = [r.data.metrics["compile_cache_programs"] for r in runs]
    assert programs[0] == 0 and programs[1] >= 2, programs  # the train step and the test step
    assert runs[1].data.metrics["compile_seconds_saved"] > 0
    assert "compiled program(s) loaded from" in warm and "loaded from" not in cold

    (line,) = [line for line in parts["resumed"].splitlines() if line.startswith("losses ")]
    uninterrupted, resumed = json.loads(f"[{line.removeprefix('losses ').replace('] [', '], [')}]")
    assert len(uninterrupted) == len(resumed) == 2
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-5)


def test_the_jax_compilation_cache_set_empty_is_off(monkeypatch):
    import keras

    from pipeline import fitting

    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == ""  # as tests/conftest.py sets it, before JAX was imported
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    assert fitting.compile_cache() == "off"
    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    assert fitting.compile_cache() == "n/a"


COUNTS_PER_TRAINING = """
import jax
from pipeline import config, data, fitting
from pipeline.distribute import distribution

cfg = config.load_from_cli("params/tiny.yaml", "model.block=basic model.widths=[16] model.strides=[1]")
dataset = data.make_synthetic(n_train=64, n_test=16)
fitting.compile_model(cfg, dataset, distribution("none"), 64)
# what JAX records for each program it loads from its persistent compilation cache (jax._src.compiler)
jax.monitoring.record_event("/jax/compilation_cache/cache_hits")
jax.monitoring.record_event_duration_secs("/jax/compilation_cache/compile_time_saved_sec", 2.5)
print("first", *fitting.compile_cache_loaded())
fitting.compile_model(cfg, dataset, distribution("none"), 64)  # the next training of the process (a sweep's trial)
print("second", *fitting.compile_cache_loaded())
"""


def test_each_training_counts_only_the_programs_it_loaded_from_jaxs_cache(jax_scripts):
    """A sweep worker trains its trials one after another in one process: each train run's compile_cache_programs
    and compile_seconds_saved are its own training's loads, not those of the trials before it (nor of their served
    copies' programs, loaded after their counts were logged)."""
    out = jax_scripts["COUNTS_PER_TRAINING"]
    assert "Traceback" not in out and "first 1 2.5" in out and "second 0 0.0" in out, out[-3000:]


SERVED_SIZES = """
import keras, numpy as np
from pipeline import serve
model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Conv2D(4, 3),
                          keras.layers.BatchNormalization(), keras.layers.GlobalAveragePooling2D(),
                          keras.layers.Dense(10, activation="softmax")])
served = serve.ImageClassifier("flip")
served.model, served.class_names = model, [str(i) for i in range(10)]
images = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
alone = np.concatenate([served.predict_proba(image[None]) for image in images])
sizes = []
predict_on_batch = model.predict_on_batch
model.predict_on_batch = lambda x: sizes.append(len(x)) or predict_on_batch(x)
for n in range(1, 10):
    np.testing.assert_allclose(served.predict_proba(images[:n]), alone[:n], rtol=1e-5, atol=1e-6)
print("sizes", sorted(set(sizes)))
"""


def test_a_model_served_on_jax_compiles_for_a_few_batch_sizes_not_for_every_request_size(jax_scripts):
    """JAX compiles the served model once per batch size: a server answering requests of 1, 2, 3, ... images compiled
    it again for each new size, in that request's time. Padded to powers of two, requests of 1-9 images run it at
    4 sizes, and each image's probabilities are those it has alone."""
    out = jax_scripts["SERVED_SIZES"]
    assert "Traceback" not in out and "sizes [1, 2, 4, 8, 16]" in out, out[-3000:]


@pytest.fixture(scope="module")
def jax_scripts() -> dict[str, str]:
    """COUNTS_PER_TRAINING and SERVED_SIZES, each in a namespace of its own, in one fresh process on the JAX backend
    (one JAX and Keras start-up for both, ~6 CPU-s): what each printed, with its traceback if it failed."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    runner = textwrap.dedent(f"""
        import traceback
        for name, code in {{"COUNTS_PER_TRAINING": {COUNTS_PER_TRAINING!r}, "SERVED_SIZES": {SERVED_SIZES!r}}}.items():
            print(f"=== {{name}}", flush=True)
            try:
                exec(compile(code, name, "exec"), {{"__name__": "__main__"}})
            except BaseException:
                traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
    """)
    result = subprocess.run([sys.executable, "-c", "import sys\n" + runner], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "KERAS_BACKEND": "jax"}, timeout=300)
    parts = dict(part.split("\n", 1) for part in result.stdout.split("=== ")[1:])
    return {name: parts.get(name, "") + f"\n(exit {result.returncode}) {result.stderr[-2000:]}"
            for name in ("COUNTS_PER_TRAINING", "SERVED_SIZES")}


def test_without_a_home_folder_the_jax_cache_stays_off_instead_of_a_folder_named_tilde(tmp_path):
    """HOME unset and no passwd entry (some containers): `~` stays `~`, and the cache went to a folder named `~` in
    the working directory. A relative XDG_CACHE_HOME is no cache folder either (the XDG spec ignores it)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = ("import os; os.path.expanduser = lambda path: path; import pipeline; "
              "print(repr(os.environ.get('JAX_COMPILATION_CACHE_DIR')))")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME", "HOME")}
    for extra, expected in (({}, "None"), ({"XDG_CACHE_HOME": "relative"}, "None"),
                            ({"XDG_CACHE_HOME": str(tmp_path)}, repr(str(tmp_path / "cifar10-resnet" / "jax")))):
        result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                                env={**env, "PYTHONPATH": str(ROOT), **extra}, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == expected, (extra, result.stdout)
    assert not (tmp_path / "~").exists()
