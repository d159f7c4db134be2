"""bench/gpu.sh's training stage runs with what the GPU machine's image has: JAX and Keras, without
TensorFlow, MLflow, pandas, matplotlib or scikit-learn. A wrong import there would waste
a call on the GPU machine (10 minutes at most, 15 minutes of GPU time in all)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT

ABSENT = ("tensorflow", "mlflow", "pandas", "matplotlib", "sklearn")


SMALL = "train.feed=device train.epochs=2 model.widths=[8,16,32,64] train.steps_per_execution=1"


# the second: the extra stages' params
STAGES = {"fast": SMALL, "ghost-batch-norm-alternate-flip-ema": f"{SMALL} model.ghost_batch=32 "
          "train.drop_remainder=true train.batch_size=64 train.alternate_flip=true train.ema=true"}


def test_a_gpu_stage_trains_and_scores_with_tensorflow_and_mlflow_unimportable(tmp_path):
    """Each of STAGES' trainings, one after the other in one process (one JAX and Keras start-up for both) in which
    `import NAME` fails for each of ABSENT."""
    stubs = tmp_path / "absent"
    for name in ABSENT:  # first on the path: `import NAME` fails as on a machine without it
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ModuleNotFoundError('no {name} on the GPU machine', "
                                                  f"name={name!r})\n")
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": f"{stubs}{os.pathsep}{ROOT}"}
    from pipeline import data

    # the second reads its images as bench/gpu.sh's stages do, decoded once (a source of their own: 100 test images)
    data.make_synthetic(n_train=512, n_test=100).save(tmp_path / "decoded.npz")
    sources = [["--images", "512"], ["--data", "/nonexistent/cifar10-jpeg-q75.tar.gz", "--decoded",
                                     str(tmp_path / "decoded.npz")]]
    runs = [(str(tmp_path / f"{i}.json"), o, sources[i]) for i, o in enumerate(STAGES.values())]
    runner = (f"import sys\nfrom bench import gpu_epoch\n"
              f"for out, overrides, source in {runs!r}:\n"
              f"    sys.argv = ['gpu_epoch', *source, '--out', out, '--full', '--params', "
              f"'params/fast.yaml', '--overrides', overrides]\n"
              f"    gpu_epoch.main()\n")
    proc = subprocess.run([sys.executable, "-c", runner], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, stage in enumerate(STAGES):
        result = json.loads((tmp_path / f"{i}.json").read_text())
        assert result["overrides"] == STAGES[stage], stage
        assert result["model"] == "resnet9" and len(result["epoch_seconds"]) == len(result["train_step_seconds"]) == 2
        assert result["train_images_per_second"] > 0
        assert 0.0 <= result["test_acc"] <= 1.0 and result["fit_seconds"] > 0
        assert (result["data"], result["test_images"]) == [("synthetic (512 training images)", 102),  # the report
                                                           ("/nonexistent/cifar10-jpeg-q75.tar.gz", 100)][i]  # says
        # every test-time augmentation scored on the held-out images (fast.yaml holds 2% out) and the test images,
        # the profile's own (flip) being the test_acc it reports
        scores = result["tta_scores"]
        assert list(scores) == ["none", "flip", "flip_shift"] and scores["flip"]["test_acc"] == result["test_acc"]
        assert all(0.0 <= s[split] <= 1.0 for s in scores.values() for split in ("val_acc", "test_acc"))


def gpu_epoch(tmp_path, *args, **popen):
    """`python -m bench.gpu_epoch --out TMP_PATH/gpu-x.json ARGS` on JAX; ARGS `-c CODE`: `python -c CODE`."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    command = ([sys.executable, *args] if args[0] == "-c"
               else [sys.executable, "-m", "bench.gpu_epoch", "--out", str(tmp_path / "gpu-x.json"), *args])
    if popen:
        return subprocess.Popen(command, cwd=ROOT, env=env, **popen)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "1"], "--epochs: must be >= 2 (the first epoch compiles), got 1"),
    (["--params", "nosuch.yaml"], "params: file not found: nosuch.yaml"),
    (["--data", "/nonexistent/cifar.tar.gz"], "data.source: '/nonexistent/cifar.tar.gz' is neither"),
    (["--decoded", "x.npz"], "--decoded: only with --data (the source it was decoded from, which the record names)"),
])
def test_gpu_stage_bad_arguments_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    """In this process (each refusal comes before any training: no JAX process need start for it): argparse's
    exit 2 with the message, and no other exception (its traceback, in a process of its own)."""
    from bench import gpu_epoch

    monkeypatch.setattr(sys, "argv", ["gpu_epoch", "--out", str(tmp_path / "gpu-x.json"), "--params",
                                      "params/tiny.yaml", "--images", "64", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        gpu_epoch.main()
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and message in stderr, stderr
    assert not (tmp_path / "gpu-x.json").exists()  # 1 epoch: its compile time was reported as the steady epoch


def test_main_gives_the_callers_sigint_handler_back_however_it_ends(tmp_path, monkeypatch):
    """main installs its own SIGINT handler (a stage's time limit): it stayed installed after main returned or
    raised, in a caller such as this test process."""
    from bench import gpu_epoch

    def callers(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, callers)
    try:
        monkeypatch.setattr(sys, "argv", ["gpu_epoch", "--out", str(tmp_path / "x.json"), "--epochs", "1"])
        with pytest.raises(SystemExit):  # refused: --epochs 1
            gpu_epoch.main()
        assert signal.getsignal(signal.SIGINT) is callers

        def fails(*args):
            assert signal.getsignal(signal.SIGINT) is not callers  # its own while it measures
            raise RuntimeError("stop")

        monkeypatch.setattr(gpu_epoch, "measure", fails)
        with pytest.raises(RuntimeError):
            gpu_epoch.main()
        assert signal.getsignal(signal.SIGINT) is callers
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("count", ["-1", "-2"])
def test_a_negative_count_of_virtual_cpus_is_refused(tmp_path, monkeypatch, capsys, count):
    """`--virtual-cpus -1` split the CPU into no TensorFlow device: "No CPU devices are available in this process",
    a traceback."""
    from bench import gpu_epoch

    monkeypatch.setattr(sys, "argv", ["gpu_epoch", "--out", str(tmp_path / "x.json"), "--virtual-cpus", count])
    with pytest.raises(SystemExit) as exit_info:
        gpu_epoch.main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"gpu_epoch: error: --virtual-cpus: must be 0 (the devices there are) or >= 1, got {count}")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_rehearsal_on_virtual_cpus_hides_the_gpus_as_multi_gpu_does(tmp_path, monkeypatch, backend):
    """`--virtual-cpus 2` on a machine with a GPU trained on the GPU (a mirrored or data_parallel run took it before
    any CPU device), and on JAX on one CPU device, `devices: ['cpu:0']`: the process starts again with the GPUs hidden
    and N CPU devices, as bench.multi_gpu's arms do; once so started it goes on (no second start)."""
    from bench import gpu_epoch

    started = {}

    def execve(path, argv, env):
        started.update(path=path, argv=argv, env=env)
        raise SystemExit(0)

    monkeypatch.setattr(gpu_epoch.os, "execve", execve)
    monkeypatch.setenv("KERAS_BACKEND", backend)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/dump")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    argv = ["--out", str(tmp_path / "x.json"), "--virtual-cpus", "2", "--params", "params/tiny.yaml"]
    monkeypatch.setattr(sys, "argv", ["gpu_epoch", *argv])
    with pytest.raises(SystemExit):
        gpu_epoch.main()
    env = started["env"]
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["JAX_PLATFORMS"] == "cpu" and env["KERAS_BACKEND"] == backend
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=2"
    assert started["argv"] == [sys.executable, "-m", "bench.gpu_epoch", *argv]
    from bench import multi_gpu  # its arms' environment is the one a restart gives: they are not started again

    seen = {}
    monkeypatch.setattr(multi_gpu.subprocess, "run", lambda cmd, env, **kwargs: seen.update(env) or
                        subprocess.CompletedProcess(cmd, 1, "", "ValueError: boom\n"))
    multi_gpu.run_arm(backend, "train.distribute=none", argparse.Namespace(
        data="", images=512, virtual_cpus=2, params="params/tiny.yaml", epochs=2, overrides="", timeout=60))
    assert all(seen[key] == env[key] for key in ("CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS", "XLA_FLAGS"))


def test_a_gpu_stage_stopped_at_its_time_limit_names_its_date_and_device(tmp_path, monkeypatch):
    from bench import gpu_epoch, gpu_report

    def fit_stopped_after_two_epochs(model, cfg, splits, classes, callbacks):
        timer = callbacks[0]
        timer.on_train_begin()
        for epoch, seconds in enumerate((20.0, 0.5)):
            timer.seconds.append(seconds)
            for callback in callbacks[1:]:
                callback.on_epoch_end(epoch)
        raise KeyboardInterrupt  # gpu.sh's `timeout --signal=INT`

    out = tmp_path / "new" / "gpu-x.json"  # a folder not there yet: made before the first epoch writes there
    monkeypatch.setattr(gpu_epoch.fitting, "fit", fit_stopped_after_two_epochs)
    monkeypatch.setattr(sys, "argv", ["gpu_epoch", "--out", str(out), "--params", "params/tiny.yaml", "--images",
                                      "64", "--epochs", "3"])
    with pytest.raises(KeyboardInterrupt):
        gpu_epoch.main()
    partial = json.loads(out.read_text())
    assert partial["partial"] and partial["epoch_seconds"] == [20.0, 0.5] and partial["train_images"] == 64
    assert (partial["data"], partial["test_images"]) == ("synthetic (64 training images)", 12)
    row = gpu_report.rows(out.parent, "1999-01-01").iloc[0]
    assert row["status"] == "stopped at its time limit"
    assert row["device"] == gpu_epoch.device_kind() and row["device"]  # not blank: the machine it ran on
    assert row["date"] == partial["date"] != "1999-01-01"  # the day it ran, not the report's --date


def test_images_per_second_is_the_images_trained_over_the_training_steps_time_as_trains(tmp_path, monkeypatch):
    """It was the training split's size over the median whole epoch, validation included, with the images
    train.drop_remainder leaves out counted: another figure than train's `images_per_second` metric (images trained
    over the training steps' time), under the same name. The older files' `images_per_second` stays readable."""
    import types

    from bench import gpu_epoch, gpu_report

    def fit(model, cfg, splits, classes, callbacks):  # 3 epochs: whole, and their training steps alone
        timer = callbacks[0]
        timer.on_train_begin()
        for epoch, (whole, steps) in enumerate(((10.0, 9.0), (2.0, 1.5), (2.2, 1.7))):
            timer.seconds.append(whole)
            timer.train_seconds.append(steps)
            for callback in callbacks[1:]:
                callback.on_epoch_end(epoch)
        return types.SimpleNamespace(history={"acc": [0.1] * 3, "val_acc": [0.1] * 3})

    out = tmp_path / "gpu-x.json"
    monkeypatch.setattr(gpu_epoch.fitting, "fit", fit)
    monkeypatch.setattr(sys, "argv", ["gpu_epoch", "--out", str(out), "--params", "params/tiny.yaml", "--images",
                                      "100", "--epochs", "3", "--overrides",
                                      "train.drop_remainder=true train.validation_fraction=0"])
    gpu_epoch.main()
    result = json.loads(out.read_text())
    assert (result["train_images"], result["images_per_epoch"]) == (100, 96)  # 3 whole batches of 32
    assert result["train_step_seconds"] == [9.0, 1.5, 1.7] and result["steady_train_step_seconds"] == 1.6
    assert result["train_images_per_second"] == 60 and "images_per_second" not in result  # 96 / 1.6, not 100 / 2.1
    row = gpu_report.rows(tmp_path).iloc[0]
    assert (row["images/s (train steps)"], row["images/s (whole epoch, older files)"]) == (60, None)
    older = {key: value for key, value in result.items() if not key.startswith(("train_", "steady_train"))}
    (tmp_path / "gpu-x.json").write_text(json.dumps({**older, "images_per_second": 48}))
    row = gpu_report.rows(tmp_path).iloc[0]
    assert (row["images/s (train steps)"], row["images/s (whole epoch, older files)"]) == (None, 48)


def test_the_epoch_timer_counts_the_training_steps_apart_from_validation():
    import keras

    from pipeline.fitting import EpochTimer

    class SlowValidation(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            time.sleep(1.0)

    x = np.zeros((64, 4), np.float32)
    y = keras.utils.to_categorical(np.zeros(64), 3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    timer = EpochTimer()
    model.fit(x, y, batch_size=32, epochs=2, validation_data=(x, y), verbose=0, callbacks=[SlowValidation(), timer])
    assert len(timer.train_seconds) == len(timer.seconds) == 2
    assert all(0 < steps <= whole - 1.0 for steps, whole in zip(timer.train_seconds, timer.seconds, strict=True))


def test_the_gpu_results_of_earlier_calls_stay_readable():
    """bench/results holds files written before train_images_per_second: their images/s is shown as what it was."""
    from bench import gpu_report

    for folder in (ROOT / "bench" / "results", ROOT / "bench" / "results" / "gpu-2026-11-30"):
        frame = gpu_report.rows(folder, "2026-11-30")
        fast = frame[frame["file"] == "gpu-fast.json"].iloc[0]
        assert fast["images/s (whole epoch, older files)"] > 0 and fast["images/s (train steps)"] is None
        assert gpu_report.report(folder, "2026-11-30").count("| gpu-") == len(frame)


def test_a_resumed_call_takes_the_epoch_after_its_compiling_first_to_last_as_the_runs_steady_ones():
    """--stop-after's estimate of the next epoch: after a resumed call's first epoch (improved.yaml's: ~100 s of
    XLA compiles, then 4.6 s each) the steady seconds earlier calls measured, not the first's. With the first's,
    a call with 190 s left after it stopped there and trained one epoch instead of ~40."""
    import types

    from bench.gpu_epoch import StopBefore, steady_seconds
    from pipeline.fitting import EpochTimer

    before = {"epoch_seconds": [100.0, 4.6, 4.7, 101.0, 4.5], "resumed_at": [3]}
    assert steady_seconds(before) == 4.6 and steady_seconds({"epoch_seconds": [], "resumed_at": []}) is None

    def stops(seconds, steady):
        timer = EpochTimer()
        timer.seconds = seconds
        stop = StopBefore(time.monotonic() + 60, timer, steady)
        stop.set_params({"epochs": 150})
        stop.set_model(types.SimpleNamespace(stop_training=False))
        stop.on_epoch_end(len(seconds) - 1)
        return stop.stopped

    assert not stops([100.0], steady_seconds(before))  # 60 s left: another epoch of 4.6 s fits
    assert stops([100.0], None)  # a first call knows no steady epoch: the first one's length, to be safe
    assert stops([100.0, 4.6, 70.0], 4.6)  # past the first, the last epoch's own length


def test_a_checkpointed_run_goes_on_under_settings_that_leave_its_training_as_it_is(tmp_path):
    """As pipeline.train's resume (NOT_TRAINING): another evaluate.batch_size or train.checkpoint_every, or the
    same config spelled by other overrides, goes on (a commit between two calls may change a default there: the
    whole config was compared, and the run refused, its calls lost); another seed or width is refused, by name."""
    import dataclasses

    from bench.gpu_epoch import Progress
    from pipeline import config

    def identity(overrides):
        cfg = config.load_from_cli("params/improved.yaml", f"{overrides} train.verbose=2")
        return {"params": "params/improved.yaml", "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
                "overrides": overrides, "data": "synthetic (512 training images)", "backend": "jax"}

    (tmp_path / "training_metadata.json").write_text('{"epoch": 5}')
    (tmp_path / "progress.json").write_text(json.dumps({
        "identity": identity("train.feed=device"), "epoch_seconds": [100.0] + [4.6] * 6, "acc": [0.1] * 7,
        "val_acc": [0.1] * 7, "resumed_at": [], "parts": [{}]}))
    record = Progress.resume(tmp_path, identity("train.feed=device evaluate.batch_size=500 train.checkpoint_every=10 "
                                                "train.seed=0"), {"date": "later"})
    assert record["resumed_at"] == [5] and len(record["epoch_seconds"]) == 5 and record["parts"][-1]["date"] == "later"
    with pytest.raises(ValueError, match=r"other model.widths \(\[64, 128, 256\] there, \[16, 32, 64\] here\), "
                                         r"train.seed \(0 there, 1 here\); remove it"):
        Progress.resume(tmp_path, identity("train.feed=device train.seed=1 model.widths=[16,32,64]"), {})


def test_a_whole_schedule_stopped_short_of_its_end_goes_on_from_its_checkpoint_in_the_next_call(tmp_path,
                                                                                               monkeypatch, capsys):
    """params/improved.yaml's 150 epochs outlast one call on the GPU machine (10 minutes at most): with --checkpoint a
    call that stops at --stop-after, or is stopped by the stage's hard limit (SIGINT), leaves the training saved, and
    the next call finishes it to the same result as one uninterrupted run (the lr schedule, the weights, the EMA and the
    augmentation's random state all go on). With JAX's compilation cache kept beside it (gpu.sh's .gpu-state/jax) the
    calls after the first load their programs instead of compiling them, and each call's part of the record says how
    many it loaded."""
    from pipeline.fitting import Checkpoint

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # these toy programs compile in under 1 s

    folder, out = tmp_path / "state", tmp_path / "gpu-x.json"
    # with EMA (improved.yaml's), checkpoints every 2 epochs (improved.yaml: 5) and a first stop between two; 512
    # images: one batch (fast.yaml's 512) an epoch
    args = ["--images", "512", "--full", "--params", "params/fast.yaml", "--overrides",
            SMALL.replace("train.epochs=2", "train.epochs=6") + " train.checkpoint_every=2 train.ema=true"]
    # the first call, then in the same process (one JAX start-up less) the uninterrupted run to compare with at the
    # end, on its own (no --checkpoint); its programs go to the cache too, after the first call counted its own
    (tmp_path / "whole").mkdir()
    calls = [[str(out), "--checkpoint", str(folder), "--stop-after", "1"],  # past it at epoch 1's end
             [str(tmp_path / "whole" / "gpu-x.json")]]
    first = gpu_epoch(tmp_path, "-c", "import sys\nfrom bench import gpu_epoch\n"
                                      f"for where, *extra in {calls!r}:\n"
                                      f"    sys.argv = ['gpu_epoch', '--out', where, *{args!r}, *extra]\n"
                                      "    gpu_epoch.main()\n")
    assert first.returncode == 0 and "stopped after epoch 1 of 6" in first.stdout, first.stderr[-3000:]
    assert Checkpoint.completed_epochs(folder) == 1
    partial = json.loads(out.read_text())
    assert partial["partial"] and partial["checkpoint"] == str(folder) and len(partial["epoch_seconds"]) == 1
    assert partial["compile_cache_programs"] == 0  # the first call compiled what it ran

    # refused before the data is read (the JPEG copy's ~15 s, every call while the checkpoint stays). In this
    # process (its Keras loaded on TensorFlow, told it runs JAX, as the checkpoint's calls did): the refusal comes
    # before any data or training, so no JAX process need start for it
    import keras

    from bench.gpu_epoch import main

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the checkpoint's run was refused")

    with monkeypatch.context() as patched:
        patched.setattr(keras.backend, "backend", lambda: "jax")
        patched.setattr("pipeline.data.load_source", no_data)
        patched.setattr("pipeline.data.make_synthetic", no_data)
        patched.setattr(sys, "argv", ["gpu_epoch", "--out", str(out), *args[:-1], args[-1] + " train.seed=1",
                                      "--checkpoint", str(folder), "--data", "/nonexistent/cifar.tar.gz"])
        capsys.readouterr()
        with pytest.raises(SystemExit) as refused:
            main()
    stderr = capsys.readouterr().err
    assert refused.value.code == 2 and ("holds a run of other data (synthetic (512 training images) there, "
                                        "/nonexistent/cifar.tar.gz here), train.seed (0 there, 1 here); remove it"
                                        ) in stderr, stderr[-2000:]
    assert Checkpoint.completed_epochs(folder) == 1  # refused before touching it

    # the second call, stopped by SIGINT (gpu.sh's `timeout --signal=INT` at the stage's hard limit) in an epoch
    # after a checkpoint. Its epochs take a fraction of a second each: a test process descheduled for longer would
    # signal too late (the run over), so the call holds at the first batch once the checkpoint holds >= 3 epochs,
    # until the signal comes; the signal still arrives from outside, in the middle of `fit`
    log, held = tmp_path / "stopped.log", tmp_path / "held"
    hold = ("import sys, time, keras\nfrom bench import gpu_epoch\nfrom pipeline import fitting\n"
            "class Hold(keras.callbacks.Callback):\n"
            "    def on_train_batch_begin(self, batch, logs=None):\n"
            f"        if fitting.Checkpoint.completed_epochs({str(folder)!r}) >= 3:\n"
            f"            open({str(held)!r}, 'w').close()\n"
            "            time.sleep(120)\n"
            "fit = fitting.fit\n"
            "fitting.fit = lambda model, cfg, splits, classes, callbacks: fit(model, cfg, splits, classes, "
            "[*callbacks, Hold()])\n"
            f"sys.argv = ['gpu_epoch', '--out', {str(out)!r}, *{args!r}, '--checkpoint', {str(folder)!r}]\n"
            "gpu_epoch.main()\n")
    with log.open("w") as sink:
        stopped = gpu_epoch(tmp_path, "-c", hold, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not held.exists() and stopped.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    stopped.send_signal(signal.SIGINT)
    stopped.wait(60)
    done = Checkpoint.completed_epochs(folder)
    assert stopped.returncode != 0 and 3 <= done < 6, (stopped.returncode, done, log.read_text()[-3000:])
    assert len(json.loads(out.read_text())["epoch_seconds"]) >= done  # every call's epochs, the first call's too

    resumed = gpu_epoch(tmp_path, *args, "--checkpoint", str(folder))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not folder.exists()  # whole and scored: nothing left to go on with
    assert result["resumed_at"] == [1, done] and len(result["parts"]) == 3 and "partial" not in result
    loaded = [part["compile_cache_programs"] for part in result["parts"]]
    assert loaded[0] == 0 and min(loaded[1:]) >= 1 and result["compile_cache_programs"] >= loaded[2], loaded
    assert len(result["epoch_seconds"]) == len(result["acc"]) == len(result["val_acc"]) == 6
    assert len(result["train_step_seconds"]) == 6 and result["train_images_per_second"] > 0  # every call's epochs
    assert all(0 < s <= w for s, w in zip(result["train_step_seconds"], result["epoch_seconds"], strict=True))
    assert result["fit_seconds"] == pytest.approx(sum(result["epoch_seconds"]), abs=0.1)

    reference = json.loads((tmp_path / "whole" / "gpu-x.json").read_text())
    assert "partial" not in reference and "resumed_at" not in reference and len(reference["acc"]) == 6
    assert (result["acc"], result["val_acc"]) == (reference["acc"], reference["val_acc"])
    assert result["tta_scores"] == reference["tta_scores"]


def test_the_full_runs_scores_are_the_served_float32_models_whatever_precision_trained_it(tmp_path, monkeypatch):
    """tta_scores and test_acc score the model train logs (pipeline.fitting.inference_copy: float32, no augmentation
    layers), not the bfloat16 training model, whose predictions differ in a few images in 1,000."""
    from bench import gpu_epoch
    from pipeline import data, serve

    scored, real = [], gpu_epoch.tta_scores

    def capture(model, *args, **kwargs):
        scored.append(model)
        return real(model, *args, **kwargs)

    out = tmp_path / "gpu-x.json"
    monkeypatch.setattr(gpu_epoch, "tta_scores", capture)
    monkeypatch.setattr(sys, "argv", ["gpu_epoch", "--out", str(out), "--params", "params/tiny.yaml", "--images",
                                      "256", "--full", "--overrides", "train.precision=mixed_bfloat16 train.epochs=2 "
                                      "train.validation_fraction=0.25 evaluate.tta=flip"])
    gpu_epoch.main()
    result = json.loads(out.read_text())
    assert result["dtype_policy"] == "mixed_bfloat16" and len(scored) == 1
    model = scored[0]
    assert model.dtype_policy.name == "float32" and "augment" not in [layer.name for layer in model.layers]
    dataset = data.make_synthetic(n_train=256, n_test=256 // 5, seed=0)
    served = serve.ImageClassifier("flip")
    served.model = model
    accuracy = (served.predict_proba(dataset.x_test).argmax(1) == dataset.y_test).mean()
    assert result["test_acc"] == round(float(accuracy), 4)


FAKE_PYTHON = """#!/bin/bash
# bench/gpu.sh's python: `-c` checks pass; a stage records its name, then leaves improved.yaml's run unfinished
# (its checkpoint folder) where FAKE_UNFINISHED is set, else whole; a stage given a JAX compilation cache in its
# environment (improved) writes an entry of FAKE_CACHE_KIB KiB there
[[ $1 == -c && $2 == *torch* && -n ${FAKE_NO_TORCH:-} ]] && exit 1  # the image without PyTorch, say
[[ $1 == -c ]] && exit 0
[[ $1 == -V ]] && echo "Python 3.12.3" && exit 0
while (( $# )); do case $1 in --out) out=$2; shift;; --checkpoint) ckpt=$2; shift;; esac; shift; done
name=${out##*/gpu-}; echo "${name%.json}" >> "$FAKE_LOG"
if [[ -n ${JAX_COMPILATION_CACHE_DIR:-} ]]; then
  mkdir -p "$JAX_COMPILATION_CACHE_DIR" && head -c "$(( ${FAKE_CACHE_KIB:-4} * 1024 ))" /dev/zero \
    > "$JAX_COMPILATION_CACHE_DIR/${name%.json}-cache"
fi
[[ -n ${ckpt:-} && -n ${FAKE_REFUSED:-} ]] && exit 2  # a checkpoint of other params
if [[ -n ${ckpt:-} && -n ${FAKE_UNFINISHED:-} ]]; then
  mkdir -p "$ckpt" && echo '{}' > "$ckpt/progress.json" && echo '{"epoch": 5}' > "$ckpt/training_metadata.json"
  echo '{"partial": true}' > "$out"
else
  echo '{"epoch_seconds": [1.0], "test_acc": 0.5}' > "$out" && rm -rf "${ckpt:-/nonexistent}"
fi
"""


def test_gpu_sh_times_improved_within_its_limit_goes_on_from_its_checkpoint_and_past_a_whole_one(tmp_path):
    """improved.yaml's 150 epochs outlast a call and the GPU time the machine gives in all: a call gives it
    IMPROVED_LIMIT (its seconds per epoch and projection) and goes on with fast.yaml's questions, not the rest of the
    call; named in GPU_SH_STAGES it has the rest. A call that carries its unfinished run goes on from it in its place;
    once whole, later calls skip it; a checkpoint refused (other settings) costs that stage alone."""
    import re
    import shutil
    import tarfile

    from bench import gpu_report

    fake, checkout, log = tmp_path / "python", tmp_path / "checkout", tmp_path / "stages.log"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (checkout / ".whl").mkdir(parents=True)
    (checkout / ".whl" / "airbench-0.1.8.tar.gz").write_bytes(b"")  # the reference stage's package: it runs

    def call(out, **env):
        log.write_text("")
        proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=checkout, capture_output=True,
                              text=True, timeout=120, env={"PATH": os.environ["PATH"], "PYTHON": str(fake),
                                                           "OUT": str(tmp_path / out), "FAKE_LOG": str(log), **env})
        assert proc.returncode == (1 if "FAKE_REFUSED" in env else 0), proc.stdout + proc.stderr
        with tarfile.open(tmp_path / out / "gpu-results.tar.gz") as tar:
            logs[out] = tar.extractfile("gpu.log").read().decode()
            return log.read_text().split(), sorted(m.name for m in tar.getmembers() if m.isfile())

    def improved_limit(out):
        return int(re.search(r"^== improved \(limit (\d+)s\)", logs[out], re.M)[1])

    first = ["fast", "fast-warm", "reference-airbench94", "reference-airbench96", "seed"]
    last = ["explore-ceiling", "explore-wide", "explore-24-ghost", "explore-seed1", "explore-ema", "explore-32",
            "explore-drop", "explore-24-altflip"]
    logs = {}
    ran, packed = call("first", FAKE_UNFINISHED="1")
    assert ran == [*first, "improved", *last] and improved_limit("first") == 200
    assert "== improved stopped within its 200s: seconds per epoch and the projected 150 epochs" in logs["first"]
    assert ".gpu-state/improved/progress.json" in packed  # its training goes back, for a later call
    ran, packed = call("second", FAKE_UNFINISHED="1", IMPROVED_LIMIT="170")  # carried: goes on in its place
    assert ran == [*first, "improved", *last] and improved_limit("second") == 170
    assert call("named", FAKE_UNFINISHED="1", GPU_SH_STAGES="improved", GPU_SH_BUDGET="400")[0] == ["improved"]
    assert improved_limit("named") > 370  # the rest of the call: 400 less 20 for packing
    assert call("other", FAKE_UNFINISHED="1", GPU_SH_STAGES="explore-drop")[0] == ["explore-drop"]
    assert call("no-torch", FAKE_NO_TORCH="1", GPU_SH_STAGES="reference-airbench94")[0] == []
    assert "== reference-airbench94 skipped: Python 3.12.3 has no PyTorch and torchvision with a CUDA GPU" \
        in logs["no-torch"]
    (checkout / ".whl" / "airbench-0.1.8.tar.gz").rename(tmp_path / "airbench-0.1.8.tar.gz")
    assert call("no-sdist", GPU_SH_STAGES="reference-airbench94 reference-airbench96")[0] == []
    assert logs["no-sdist"].count("skipped: no .whl/airbench-*.tar.gz (pip download --no-deps airbench==0.1.8 "
                                  "-d .whl)") == 2
    (tmp_path / "airbench-0.1.8.tar.gz").rename(checkout / ".whl" / "airbench-0.1.8.tar.gz")
    # a checkpoint of other settings: that stage fails, the rest of the call is not lost with it
    assert call("refused", FAKE_REFUSED="1")[0] == [*first, "improved", *last]

    shutil.rmtree(checkout / ".gpu-state")
    (tmp_path / "others").mkdir()
    (tmp_path / "others" / "gpu-improved.json").write_text('{"test_acc": 0.5}')  # an earlier run's, in OUT
    assert call("others", GPU_SH_STAGES="fast")[0] == ["fast"]
    assert not (checkout / ".gpu-state" / "improved.json").exists()  # not run here: not taken for whole
    ran, packed = call("whole")
    assert ran == [*first, "improved", *last] and ".gpu-state/improved.json" in packed
    local = tmp_path / "local"
    (local / ".gpu-state" / "improved").mkdir(parents=True)  # the unfinished run it carried
    gpu_report.unpack(tmp_path / "whole" / "gpu-results.tar.gz", tmp_path / "results", local)
    assert [p.name for p in (local / ".gpu-state").iterdir()] == ["improved.json"]  # carried by the next call
    shutil.copytree(local / ".gpu-state", checkout / ".gpu-state", dirs_exist_ok=True)
    assert call("after")[0] == [*first, *last] and "== improved skipped: whole in an earlier call" in logs["after"]


def test_gpu_sh_carries_improveds_compiled_programs_with_its_unfinished_training_while_they_fit(tmp_path):
    """improved.yaml compiles for ~100 s on each call that goes on from its checkpoint: its stage keeps JAX's
    compilation cache in .gpu-state/jax, packed with its training, as long as what the next call carries (.whl,
    .data, .gpu-state) stays within the 64 MiB a call carries; over it, or once the run is whole, it is dropped."""
    import tarfile

    fake, checkout = tmp_path / "python", tmp_path / "checkout"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (checkout / ".data").mkdir(parents=True)
    (checkout / ".data" / "images.tar.gz").write_bytes(b"\0" * (20 << 20))  # what the JPEG copy takes of the 64

    def call(out, **env):
        proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=checkout, capture_output=True,
                              text=True, timeout=120, env={"PATH": os.environ["PATH"], "PYTHON": str(fake),
                                                           "OUT": str(tmp_path / out), "FAKE_LOG": os.devnull,
                                                           "GPU_SH_STAGES": "fast improved", **env})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with tarfile.open(tmp_path / out / "gpu-results.tar.gz") as tar:
            return tar.extractfile("gpu.log").read().decode(), sorted(m.name for m in tar.getmembers() if m.isfile())

    log, packed = call("small", FAKE_UNFINISHED="1", FAKE_CACHE_KIB="1024")
    assert ".gpu-state/jax/improved-cache" in packed and ".gpu-state/improved/progress.json" in packed
    assert not [name for name in packed if "fast-cache" in name]  # the other stages keep the machine's own cache
    log, packed = call("large", FAKE_UNFINISHED="1", FAKE_CACHE_KIB=str(44 << 10))  # 20 + 44 MiB, and the training
    assert not [name for name in packed if name.startswith(".gpu-state/jax")]
    assert ".gpu-state/improved/progress.json" in packed  # the training itself is carried all the same
    assert "== improved's compiled programs not kept (44 MiB): with the checkout, .whl, .data and .gpu-state, 64 MiB," \
           " over the 64 MiB a call carries; the next call compiles them again" in log
    log, packed = call("whole")
    assert ".gpu-state/improved.json" in packed and not [name for name in packed if "/jax" in name]


@pytest.mark.parametrize("git", [False, True], ids=["machine-copy", "git-checkout"])
def test_gpu_sh_counts_the_checkouts_own_files_in_what_the_next_call_carries(tmp_path, git):
    """The 64 MiB a call carries hold the checkout's files too (bench/results' figures...), not only .whl, .data and
    .gpu-state: compiled programs that fit beside those alone but not with the checkout made the next call too large
    to send. In a git checkout only what git does not ignore travels (a .venv does not count); in the machine's copy,
    all of it but .git and __pycache__."""
    import tarfile

    fake, checkout = tmp_path / "python", tmp_path / "checkout"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    (checkout / ".data").mkdir(parents=True)
    (checkout / ".data" / "images.tar.gz").write_bytes(b"\0" * (20 << 20))
    if git:
        (checkout / ".venv").mkdir()
        (checkout / ".venv" / "lib.so").write_bytes(b"\0" * (30 << 20))  # ignored: stays behind
        (checkout / ".gitignore").write_text("/.venv/\n/.data/\n/.gpu-state/\n")
        subprocess.run(["git", "init", "-q"], cwd=checkout, check=True)

    def kept(out, cache_mib):
        proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=checkout, capture_output=True,
                              text=True, timeout=120, env={"PATH": os.environ["PATH"], "PYTHON": str(fake),
                                                           "OUT": str(tmp_path / out), "FAKE_LOG": os.devnull,
                                                           "GPU_SH_STAGES": "improved", "FAKE_UNFINISHED": "1",
                                                           "FAKE_CACHE_KIB": str(cache_mib << 10)})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with tarfile.open(tmp_path / out / "gpu-results.tar.gz") as tar:
            return ".gpu-state/jax/improved-cache" in tar.getnames()

    assert kept("alone", 40)  # 20 + 40 MiB (and a .venv git ignores)
    (checkout / "bench" / "results").mkdir(parents=True)
    (checkout / "bench" / "results" / "curves.png").write_bytes(b"\0" * (4 << 20))  # the checkout's own files
    assert not kept("with-the-checkout", 40)  # 20 + 40 + 4 MiB: over 64
    assert kept("smaller", 30)


FAKE_CACHING_PYTHON = """#!/bin/bash
# bench/gpu.sh's python, as JAX's compilation cache sees a stage: the folder in its environment, else pipeline's
# default under $HOME; it records whether that folder held programs already, then leaves one there
[[ $1 == -c ]] && exit 0
while (( $# )); do case $1 in --out) out=$2; shift;; esac; shift; done
name=${out##*/gpu-} cache=${JAX_COMPILATION_CACHE_DIR-$HOME/.cache/cifar10-resnet/jax} state=off
if [[ -n $cache ]]; then
  [[ -n "$(ls -A "$cache" 2>/dev/null)" ]] && state=warm || state=cold
  mkdir -p "$cache" && echo program > "$cache/${name%.json}-program"
fi
echo "${name%.json} $state" >> "$FAKE_LOG"
echo '{"epoch_seconds": [1.0], "test_acc": 0.5}' > "$out"
"""


def test_gpu_sh_times_fast_compiling_on_a_machine_an_earlier_call_left_warm(tmp_path):
    """A machine kept warm between two calls keeps its files: with pipeline's cache in ~/.cache the second call's
    fast stage loaded the programs the first one compiled (fast timed without its compiling, fast-warm no different).
    Each call's stages have caches of the call's own, removed at its end; one set in the environment stays."""
    fake, log, home, tmp = tmp_path / "python", tmp_path / "stages.log", tmp_path / "home", tmp_path / "tmp"
    fake.write_text(FAKE_CACHING_PYTHON)
    fake.chmod(0o755)
    tmp.mkdir()

    def call(out, **env):
        log.write_text("")
        proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={"PATH": os.environ["PATH"], "PYTHON": str(fake), "HOME": str(home),
                                                "TMPDIR": str(tmp), "OUT": str(tmp_path / out), "FAKE_LOG": str(log),
                                                "GPU_SH_STAGES": "fast fast-warm", **env})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return log.read_text().splitlines()

    for out in ("first", "second"):  # the same warm machine
        assert call(out) == ["fast cold", "fast-warm warm"]
        assert not list(tmp.iterdir())  # removed at the call's end
    assert call("off", JAX_COMPILATION_CACHE_DIR="") == ["fast off", "fast-warm off"]
    mine = tmp_path / "my-cache"
    assert call("mine", JAX_COMPILATION_CACHE_DIR=str(mine)) == ["fast cold", "fast-warm warm"]
    assert call("mine-again", JAX_COMPILATION_CACHE_DIR=str(mine)) == ["fast warm", "fast-warm warm"]  # kept


def test_gpu_sh_times_each_stages_compiling_but_fast_warms(tmp_path):
    """The call's stages shared one cache: every explore stage of fast.yaml's model loaded some of fast's programs
    (those its schedule leaves the same: in the CPU rehearsal weight initialisers and a train step, 5-7 programs; 6.9 s
    of compiling spared, explore-drop's first epoch 6.7 s against fast's 12.6 s), and their first epochs and fit
    seconds were short of their compiling.
    Each stage has a cache of its own; fast-warm fast's."""
    fake, log, tmp = tmp_path / "python", tmp_path / "stages.log", tmp_path / "tmp"
    fake.write_text(FAKE_CACHING_PYTHON)
    fake.chmod(0o755)
    tmp.mkdir()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PATH": os.environ["PATH"], "PYTHON": str(fake), "HOME": str(tmp_path),
                                            "TMPDIR": str(tmp), "OUT": str(tmp_path / "out"), "FAKE_LOG": str(log),
                                            "GPU_SH_STAGES": "fast fast-warm explore-32 explore-drop explore-ema"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert log.read_text().splitlines() == ["fast cold", "fast-warm warm", "explore-ema cold", "explore-32 cold",
                                            "explore-drop cold"]
    assert not list(tmp.iterdir())  # removed at the call's end


def test_gpu_sh_refuses_a_misspelt_stage_name_before_anything_runs(tmp_path):
    """GPU_SH_STAGES naming no stage ran nothing, and the call came back empty."""
    fake, log = tmp_path / "python", tmp_path / "stages.log"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ["PATH"], "PYTHON": str(fake), "FAKE_LOG": str(log),
                                           "OUT": str(tmp_path / "out"), "GPU_SH_STAGES": "explore-drop explore-wdie"})
    assert proc.returncode == 2
    assert "GPU_SH_STAGES: no stage 'explore-wdie' (stages: fast fast-warm reference-airbench94 reference-airbench96 " \
        "seed improved explore-ceiling" in proc.stderr
    assert not log.exists() and not (tmp_path / "out").exists()
    import re

    script = (ROOT / "bench" / "gpu.sh").read_text()  # the names it knows are those of its stages
    known = re.search(r'^STAGES="([^"]*)"', script, re.M)[1].split()
    staged = re.findall(r'^\s*(?:\w+=\S* )*stage ([\w-]+) ', script, re.M)  # some with an environment
    assert sorted(known) == sorted(staged) and len(known) == 14



def test_gpu_sh_runs_the_stages_named_on_several_lines_or_with_tabs(tmp_path):
    """GPU_SH_STAGES="fast<newline>explore-drop" (a command written on two lines) passed the check of its names, then
    matched no stage: the call ran nothing and exited 0."""
    fake, log = tmp_path / "python", tmp_path / "stages.log"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    for stages in ("fast\nexplore-drop", "\tfast\t explore-drop\n"):
        log.write_text("")
        proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, env={"PATH": os.environ["PATH"], "PYTHON": str(fake), "FAKE_LOG": str(log),
                                               "OUT": str(tmp_path / "out"), "GPU_SH_STAGES": stages})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert log.read_text().split() == ["fast", "explore-drop"], (stages, proc.stdout)


@pytest.mark.parametrize(("variable", "value"), [("GPU_SH_BUDGET", "10m"), ("GPU_SH_BUDGET", "abc"),
                                                 ("FAST_LIMIT", "0"), ("IMPROVED_LIMIT", "08"),
                                                 ("GPU_SH_CARRY_MIB", "64MiB"), ("GPU_SH_PIECE_MIB", "0")])
def test_gpu_sh_refuses_a_budget_or_limit_that_is_no_whole_number_before_anything_runs(tmp_path, variable, value):
    """GPU_SH_BUDGET=10m made every stage's check of the time left fail, so each ran whatever the budget, until the
    script died on an unbound variable before packing what they wrote; FAST_LIMIT=0 ran fast without a limit."""
    fake, log = tmp_path / "python", tmp_path / "stages.log"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ["PATH"], "PYTHON": str(fake), "FAKE_LOG": str(log),
                                           "OUT": str(tmp_path / "out"), variable: value})
    assert proc.returncode == 2
    assert proc.stderr == f"{variable}: a whole number from 1, got '{value}'\n"
    assert not log.exists() and not (tmp_path / "out").exists()

def test_gpu_sh_cuts_an_archive_of_more_than_ten_pieces_and_the_report_joins_them(tmp_path):
    """The packed results were cut with `split -a 1`: an archive of more than 10 pieces (improved's training and
    compiled programs carried under a larger GPU_SH_CARRY_MIB) stopped split at .part9 ("output file suffixes
    exhausted"), the call failed and the whole archive, too large to come back, stayed beside its first 10 pieces.
    Now the pieces are numbered with as many digits as their count takes, and bench.gpu_report joins them in order."""
    from bench import gpu_report

    fake, checkout = tmp_path / "python", tmp_path / "checkout"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    training = os.urandom(11 << 20 | 12345)  # incompressible: 12 pieces of 1 MiB once packed
    (checkout / ".gpu-state" / "improved").mkdir(parents=True)
    (checkout / ".gpu-state" / "improved" / "weights.bin").write_bytes(training)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=checkout, capture_output=True, text=True,
                          timeout=120, env={"PATH": os.environ["PATH"], "PYTHON": str(fake), "FAKE_LOG": os.devnull,
                                            "OUT": str(out), "GPU_SH_STAGES": "fast", "GPU_SH_PIECE_MIB": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(path.name for path in out.iterdir()) == [f"gpu-results.tar.gz.part{k:02d}" for k in range(12)]
    assert all(path.stat().st_size == 1 << 20 for path in sorted(out.iterdir())[:-1])
    local = tmp_path / "local"
    local.mkdir()
    gpu_report.unpack(out / "gpu-results.tar.gz", tmp_path / "results", local)
    assert (local / ".gpu-state" / "improved" / "weights.bin").read_bytes() == training
    assert (tmp_path / "results" / "gpu-fast.json").exists()
    (out / "gpu-results.tar.gz.part03").unlink()  # one that did not come back is named as it would be
    with pytest.raises(SystemExit, match=r"piece gpu-results.tar.gz.part03 missing \(found .part00, .part01, .part02, "
                                         r".part04, "):
        gpu_report.unpack(out / "gpu-results.tar.gz", tmp_path / "results", local)


def wheel(folder, name: str, version: str, tag: str, source: str) -> None:
    """A wheel of one module `name` (its __init__.py: `source`), as pip installs it."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-{tag}.whl", "w") as whl:
        whl.writestr(f"{name}/__init__.py", source)
        whl.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
                                                f"{'true' if tag.startswith('py3') else 'false'}\nTag: {tag}\n")
        whl.writestr(f"{dist}.dist-info/RECORD", "")


# bench/gpu.sh's python where this one (not 3.12) stands for the machine's: pip as it is, `-c` and `-V` without
# site-packages (no keras, optree or jax but the stubs on PYTHONPATH); a stage logs its name and the keras it imports
IMAGE_PYTHON = f"""#!/bin/bash
[[ $1 == -m && $2 == pip ]] && exec {sys.executable} "$@"
[[ $1 == -c || $1 == -V ]] && exec {sys.executable} -S "$@"
while (( $# )); do case $1 in --out) out=$2; shift;; esac; shift; done
name=${{out##*/gpu-}}; echo "${{name%.json}} $({sys.executable} -S -c 'import keras; print(keras.__version__)')" \\
  >> "$FAKE_LOG"
echo '{{"epoch_seconds": [1.0], "test_acc": 0.5}}' > "$out"
"""

KERAS = """import jax
if jax.__version__ != "0.11.2":  # as a Keras whose backend calls what this JAX no longer has
    raise ImportError(f"this keras needs jax 0.11.2, not {{jax.__version__}}")
__version__ = "{version}"
"""


@pytest.mark.parametrize(("image", "wheels", "installed"), [
    # the cp312 optree wheel fits no other Python, but this one has optree: not needed (all of .whl was installed,
    # and pip refused the lot)
    (["optree"], ["optree-0.18.0-cp312-cp312-manylinux_2_28_x86_64"], ["keras", "namex"]),
    # no optree here: pip picks this Python's wheel among those .whl holds for several
    ([], ["optree-0.18.0-cp312-cp312-manylinux_2_28_x86_64",
          f"optree-0.18.0-cp{sys.version_info.major}{sys.version_info.minor}-"
          f"cp{sys.version_info.major}{sys.version_info.minor}-manylinux_2_28_x86_64"], ["keras", "namex", "optree"]),
    # another keras here (the image's) would measure other code: the one of .whl goes first on the path
    (["optree", "namex", "keras"], ["optree-0.18.0-cp312-cp312-manylinux_2_28_x86_64"], ["keras"]),
], ids=["optree-there", "optree-for-this-python", "other-keras-there"])
def test_gpu_sh_installs_from_its_wheels_what_the_machines_python_lacks(tmp_path, image, wheels, installed):
    stubs, whl, log = tmp_path / "stubs", tmp_path / "checkout" / ".whl", tmp_path / "stages.log"
    for name in ["jax", *image]:  # the machine's own packages
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(
            "import os\n__version__ = os.environ.get('FAKE_JAX_VERSION', '0.11.2')\ndef devices():\n    return []\n"
            if name == "jax" else KERAS.format(version="3.5.0") if name == "keras" else "")
    wheel(whl, "keras", "3.15.1", "py3-none-any", KERAS.format(version="3.15.1"))
    wheel(whl, "namex", "0.1.0", "py3-none-any", "")
    for name in wheels:
        wheel(whl, "optree", "0.18.0", name.removeprefix("optree-0.18.0-"), "")
    fake = tmp_path / "python"
    fake.write_text(IMAGE_PYTHON)
    fake.chmod(0o755)

    def call(out, **env):
        return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=whl.parent, capture_output=True,
                              text=True, timeout=180, env={
                                  "PATH": os.environ["PATH"], "PYTHON": str(fake), "OUT": str(tmp_path / out),
                                  "FAKE_LOG": str(log), "PYTHONPATH": str(stubs), "GPU_SH_SITE": str(tmp_path / "site"),
                                  "GPU_SH_STAGES": "fast explore-drop", **env})

    proc = call("first")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert log.read_text().split("\n") == ["fast 3.15.1", "explore-drop 3.15.1", ""]
    assert sorted(p.name for p in (tmp_path / "site").iterdir() if "." not in p.name) == installed
    assert f"python {sys.version.split()[0]} jax 0.11.2 keras 3.15.1" in proc.stdout
    assert call("again").returncode == 0  # a warm machine keeps the site of a call before

    # a JAX that this keras does not import with: every stage would fail alike; one line, and the reason back
    log.unlink()
    proc = call("broken", FAKE_JAX_VERSION="0.13.0")
    assert proc.returncode == 1 and not log.exists()
    import tarfile

    with tarfile.open(tmp_path / "broken" / "gpu-results.tar.gz") as tar:
        assert "this keras needs jax 0.11.2, not 0.13.0" in tar.extractfile("gpu.txt").read().decode()
        assert "== no stage run: keras 3.15.1 and this machine's JAX and Python do not import together" in \
            tar.extractfile("gpu.log").read().decode()


def test_gpu_sh_names_the_python_its_wheels_do_not_fit(tmp_path):
    """No optree for this Python in .whl, nor here: one line naming the Python and the wheels, exit 1."""
    whl = tmp_path / "checkout" / ".whl"
    wheel(whl, "keras", "3.15.1", "py3-none-any", "")
    wheel(whl, "namex", "0.1.0", "py3-none-any", "")
    wheel(whl, "optree", "0.18.0", "cp39-cp39-manylinux_2_28_x86_64", "")
    fake = tmp_path / "python"
    fake.write_text(IMAGE_PYTHON)
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=whl.parent, capture_output=True, text=True,
                          timeout=180, env={"PATH": os.environ["PATH"], "PYTHON": str(fake),
                                            "OUT": str(tmp_path / "out"), "FAKE_LOG": str(tmp_path / "stages.log"),
                                            "GPU_SH_SITE": str(tmp_path / "site")})
    assert proc.returncode == 1 and not (tmp_path / "stages.log").exists()
    assert (f"installing keras==3.15.1 namex optree from .whl failed for Python {sys.version.split()[0]} (.whl holds: "
            "keras-3.15.1-py3-none-any.whl namex-0.1.0-py3-none-any.whl optree-0.18.0-cp39-cp39-manylinux_2_28_x86_64"
            ".whl)") in (tmp_path / "out" / "gpu.log").read_text()


# bench/gpu.sh's python for the calls gpu_report reads: fast trains whole; seed compiles past its limit; improved
# ends an epoch (its file, partial, and its checkpoint written), then fails, or (FAKE_HANG) hangs till the call ends
REPORTED_PYTHON = """#!/bin/bash
[[ $1 == -c ]] && exit 0
while (( $# )); do case $1 in --out) out=$2; shift;; --checkpoint) ckpt=$2; shift;; esac; shift; done
case ${out##*/gpu-} in
  fast.json) echo "Epoch 1/2 - 9.0s"; echo "Epoch 2/2 - 1.0s"
    echo '{"epoch_seconds": [9.0, 1.0], "test_acc": 0.5}' > "$out";;
  seed.json) exec sleep 20;;
  reference-airbench94.json) echo "Run 1/4: {}"  # its first run's record, then its limit
    echo '{"partial": true, "reference": "airbench94 (x)", "runs": [{"timed": false}], "runs_planned": 4}' > "$out"
    exec sleep 20;;
  reference-airbench96.json) echo "ModuleNotFoundError: No module named 'torchvision'"; exit 1;;
  improved.json) mkdir -p "$ckpt"; echo '{"epoch": 1}' > "$ckpt/training_metadata.json"
    echo '{"partial": true, "checkpoint": ".gpu-state/improved", "epoch_seconds": [100.0]}' > "$out"
    echo "Epoch 1/150 - 100.0s"  # last: a test that stops the call on this line finds the files written
    [[ -n ${FAKE_HANG:-} ]] && exec sleep 20
    echo "Traceback (most recent call last):"; echo "FloatingPointError: NaN loss at epoch 2"; exit 1;;
esac
"""


def test_gpu_report_says_which_stages_of_the_call_did_not_run_and_how_each_stopped(tmp_path):
    """A stage that wrote no file in the call (skipped, its limit reached while XLA compiled its first epoch) was
    absent from the table, or shown by an earlier call's file of its name as if measured; a partial file said
    `stopped at its time limit` of a stage that crashed. gpu.log says which: the table now does."""
    from bench import gpu_report

    fake, checkout, results = tmp_path / "python", tmp_path / "checkout", tmp_path / "results"
    fake.write_text(REPORTED_PYTHON)
    fake.chmod(0o755)
    (checkout / ".whl").mkdir(parents=True)
    (checkout / ".whl" / "airbench-0.1.8.tar.gz").write_bytes(b"")
    results.mkdir()
    (results / "gpu-seed.json").write_text(json.dumps({"date": "2026-11-30", "epoch_seconds": [80.0, 15.0]}))
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "GPU_SH_BUDGET": "200",
           "FAST_LIMIT": "30", "SEED_LIMIT": "1", "EXPLORE_LIMIT": "250", "REFERENCE_LIMIT": "1"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=checkout, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    gpu_report.unpack(tmp_path / "out" / "gpu-results.tar.gz", results, checkout)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    table = {(row["file"], row["date"]): row["status"] for _, row in gpu_report.rows(results, "1999-01-01").iterrows()}
    assert table.pop(("gpu-fast.json", "1999-01-01")) == "full schedule"  # (gpu_epoch's files say their date)
    assert table.pop(("gpu-improved.json", "1999-01-01")) == ("failed after 1 epochs, exit 1: FloatingPointError: "
                                                             "NaN loss at epoch 2")
    assert table.pop(("gpu-seed.json", "2026-11-30")) == "timed"  # an earlier call's, dated so
    assert table.pop(("gpu-seed.json", today)) == "not run: stopped at its 1 s limit before its first epoch ended " \
                                                  "(it includes XLA's compiles)"
    assert table.pop(("gpu-explore-wide.json", today)).startswith("not run: skipped, ")
    # the reference's runs before its limit stay (a line per run in gpu.log); the other failed at its start
    assert table.pop(("gpu-reference-airbench94.json", "1999-01-01")) == ("reference, stopped after 1 of 4 runs "
                                                                          "(medians of those): airbench94 (x)")
    assert table.pop(("gpu-reference-airbench96.json", today)) == ("not run: failed, exit 1: ModuleNotFoundError: No "
                                                                  "module named 'torchvision'")
    for name in ("fast-warm", "explore-ceiling"):  # the fake exits 0 for them and writes nothing: said, not dropped
        assert table.pop((f"gpu-{name}.json", today)) == (f"no result: gpu.log says it ran (exit 0), but "
                                                          f"gpu-{name}.json is not in the results")
    assert all(status.startswith("not run: skipped, ") and status.endswith("s of 200s used, it may take 250s")
               for status in table.values()) and len(table) == 6
    assert "not run: skipped" in gpu_report.report(results, "1999-01-01")


def test_gpu_report_takes_the_loose_files_of_a_call_ended_before_it_packed_them(tmp_path):
    """The GPU machine ends a call at its limit (a second call, its GPU_SH_BUDGET not lowered): gpu.sh
    never packs, and what its stages wrote comes back loose. --unpack took only the archive ('no such file')."""
    from bench import gpu_report

    fake, checkout, results = tmp_path / "python", tmp_path / "checkout", tmp_path / "results"
    fake.write_text(REPORTED_PYTHON)
    fake.chmod(0o755)
    (checkout / ".gpu-state" / "improved").mkdir(parents=True)
    (checkout / ".gpu-state" / "improved" / "training_metadata.json").write_text('{"epoch": 40}')  # carried
    shutil.copytree(checkout / ".gpu-state", tmp_path / "carried" / ".gpu-state")
    out = tmp_path / "out"
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "OUT": str(out), "FAKE_HANG": "1",
           "GPU_SH_STAGES": "improved", "TMPDIR": str(tmp_path)}  # a second call, going on with the run the first
    #                                   carried back; its stages' cache folder, killed with it, is left in tmp_path
    call = subprocess.Popen(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=tmp_path / "carried",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while "Epoch 1/150" not in ((out / "gpu.log").read_text() if (out / "gpu.log").exists() else "") \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(call.pid, signal.SIGKILL)  # as the GPU machine's limit: no trap, nothing packed
    call.wait(10)
    assert not (out / "gpu-results.tar.gz").exists() and (out / "gpu-improved.json").exists()
    assert gpu_report.unpack(out / "gpu-results.tar.gz", results, checkout) == ["gpu-improved.json", "gpu.log",
                                                                                 "gpu.txt"]
    table = {row["file"]: row["status"] for _, row in gpu_report.rows(results).iterrows()}
    assert table == {"gpu-improved.json": "stopped when the call ended; the next call goes on from the checkpoint "
                                          "it carried"}
    # no .gpu-state came back: the checkout's, carried, stays for the next call
    assert (checkout / ".gpu-state" / "improved" / "training_metadata.json").read_text() == '{"epoch": 40}'


# bench.airbench_reference's view of PyTorch and of airbench where neither is installed (CI): torch saves by pickle;
# airbench's loader reads ./cifar10/*.pt as the real one does, and each run's "model" scores by its number and
# tta_level, so that the report's medians can be checked
FAKE_TORCH = '''import pickle
__version__ = "0.0+fake"
def from_numpy(array):
    return array
def save(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
class cuda:
    synchronize = staticmethod(lambda: None)
    get_device_name = staticmethod(lambda index: "Fake GPU")
'''
FAKE_AIRBENCH = '''import os, pickle
RUNS = []
class CifarLoader:
    def __init__(self, path, train=True, batch_size=500, aug=None, altflip=False):
        with open(os.path.join(path, "train.pt" if train else "test.pt"), "rb") as f:
            saved = pickle.load(f)
        self.images, self.labels, self.classes = saved["images"], saved["labels"], saved["classes"]
        self.batch_size, self.aug, self.altflip = batch_size, aug, altflip
def train94(loader, verbose=True):
    if len(RUNS) + 1 == int(os.environ.get("FAKE_FAIL_AT", 0)):
        raise RuntimeError("CUDA out of memory")
    assert not verbose and loader.batch_size == 1024 and loader.altflip and loader.aug == {"flip": True, "translate": 2}
    assert os.path.exists("cifar10/test.pt")  # where its own test loader reads it
    RUNS.append(loader.images.shape)
    return len(RUNS)
def evaluate(model, loader, tta_level=0):
    assert loader.images.shape[1:] == (32, 32, 3) and str(loader.labels.dtype) == "int64"
    return [0.9, 0.5, 0.7, 0.6][model - 1] + 0.01 * tta_level
'''
FAKE_RECIPE = ('from airbench import train94 as train{n}\n'
               'hyp = {{"opt": {{"train_epochs": {epochs}, "batch_size": 1024}},\n'
               '       "aug": {{"flip": True, "translate": 2}}}}\n')


def airbench_sdist(path, files: dict[str, str]) -> None:
    """A source archive as PyPI's airbench-0.1.8.tar.gz lays it out, holding `files` under airbench-0.1.8/."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, text in {"setup.py": "", **files}.items():
            info = tarfile.TarInfo(f"airbench-0.1.8/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))


def test_the_airbench_reference_trains_on_the_given_data_in_a_folder_of_its_own(tmp_path):
    """airbench reads ./cifar10/{train,test}.pt: the reference writes them from the data into a folder of the call's
    own, where it runs airbench (one untimed run, then --runs timed), and comes back to leave nothing behind but its
    JSON: the medians of every run's scores with each TTA, the seconds of the timed ones alone."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(FAKE_TORCH)
    airbench_sdist(tmp_path / "airbench-0.1.8.tar.gz", {
        "airbench/__init__.py": FAKE_AIRBENCH, "airbench/lib_airbench94.py": FAKE_RECIPE.format(n=94, epochs=9.9),
        "airbench/lib_airbench96.py": FAKE_RECIPE.format(n=96, epochs=40.0)})
    (tmp_path / "tmp").mkdir()
    (tmp_path / "cwd").mkdir()
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}", "TMPDIR": str(tmp_path / "tmp")}
    sdist = tmp_path / "airbench-0.1.8.tar.gz"
    proc = subprocess.run([sys.executable, "-m", "bench.airbench_reference", "--images", "64", "--runs", "3",
                           "--out", "out/gpu-reference-airbench94.json", "--package", str(sdist)],
                          cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "cwd" / "out" / "gpu-reference-airbench94.json").read_text())  # --out as given
    assert [run["timed"] for run in result["runs"]] == [False, True, True, True]
    assert [run["test_acc"]["mirror_translate"] for run in result["runs"]] == [0.92, 0.52, 0.72, 0.62]
    assert result["test_acc"] == 0.67 and result["tta"] == "mirror_translate"  # the median of all four
    assert result["tta_scores"] == {"none": {"test_acc": 0.65}, "mirror": {"test_acc": 0.66},
                                    "mirror_translate": {"test_acc": 0.67}}
    assert (result["test_acc_min"], result["test_acc_max"]) == (0.52, 0.92)
    assert result["fit_seconds"] == sorted(run["seconds"] for run in result["runs"][1:])[1]
    assert result["device_kind"] == "Fake GPU" and result["epochs"] == 9.9 and result["test_images"] == 12
    assert result["reference"].startswith("airbench94 (airbench-0.1.8, unchanged): 94.01% (mean of 1,000 runs)")
    assert not result["cold"]
    assert sorted(p.name for p in (tmp_path / "cwd").iterdir()) == ["out"]  # no cifar10/ here
    assert not list((tmp_path / "tmp").iterdir())  # its folder removed

    from bench import gpu_report

    row = gpu_report.rows(tmp_path / "cwd" / "out").iloc[0]
    assert (row["epochs"], row["test_acc"], row["fit s"]) == (9.9, 0.67, result["fit_seconds"])
    assert row["status"].startswith("reference, 4 runs (medians; fit s over the 3 timed): airbench94")
    assert row["val/test acc by TTA"] == "none -/.6500, mirror -/.6600, mirror_translate -/.6700"

    # the data decoded once by gpu.sh: its arrays read, the source named
    from pipeline import data

    data.make_synthetic(n_train=48, n_test=16, seed=1).save(tmp_path / "decoded.npz")
    proc = subprocess.run([sys.executable, "-m", "bench.airbench_reference", "--data", str(tmp_path / "nowhere.tar.gz"),
                           "--decoded", str(tmp_path / "decoded.npz"), "--runs", "0",
                           "--out", "decoded/gpu-reference-airbench94.json", "--package", str(sdist)],
                          cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    decoded = json.loads((tmp_path / "cwd" / "decoded" / "gpu-reference-airbench94.json").read_text())
    assert decoded["data"] == str(tmp_path / "nowhere.tar.gz") and decoded["test_images"] == 16

    # a run that fails (or a limit's SIGINT): the runs before it stay in the file, `partial`
    proc = subprocess.run([sys.executable, "-m", "bench.airbench_reference", "--images", "64", "--runs", "3",
                           "--out", "failed/gpu-reference-airbench94.json", "--package", str(sdist)],
                          cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=120,
                          env={**env, "FAKE_FAIL_AT": "3"})
    assert proc.returncode == 1 and "RuntimeError: CUDA out of memory" in proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("Run ")] == ["Run 1/4",
                                                                                                 "Run 2/4"]
    failed = json.loads((tmp_path / "cwd" / "failed" / "gpu-reference-airbench94.json").read_text())
    assert failed["partial"] and failed["runs_planned"] == 4 and len(failed["runs"]) == 2
    assert failed["test_acc"] == 0.72  # the median of the two (0.92, 0.52)
    assert gpu_report.rows(tmp_path / "cwd" / "failed").iloc[0]["status"] == (
        f"reference, stopped after 2 of 4 runs (medians of those): {failed['reference']}")
    assert not list((tmp_path / "tmp").iterdir())

    # the larger recipe, its one run cold: its seconds are the run's, cuDNN's autotuning in them, and it says so
    proc = subprocess.run([sys.executable, "-m", "bench.airbench_reference", "--images", "64", "--runs", "0",
                           "--recipe", "96", "--out", "cold/gpu-reference-airbench96.json", "--package", str(sdist)],
                          cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cold = json.loads((tmp_path / "cwd" / "cold" / "gpu-reference-airbench96.json").read_text())
    assert cold["cold"] and len(cold["runs"]) == 1 and cold["fit_seconds"] == cold["runs"][0]["seconds"]
    assert cold["test_acc"] == 0.92 and cold["epochs"] == 40.0 and cold["model"] == "airbench96"
    assert gpu_report.rows(tmp_path / "cwd" / "cold").iloc[0]["status"].startswith(
        "reference, 1 run (its fit s cold: cuDNN's autotuning included): airbench96 (airbench-0.1.8, unchanged): "
        "96.05% (mean of 200 runs)")


def test_the_airbench_reference_writes_airbenchs_files_with_the_training_images_shuffled_once():
    """airbench fits its whitening layer on the first 5,000 training images; an image folder lists them class by
    class (all airplanes): the training split goes in one fixed random order, each image with its label."""
    from bench.airbench_reference import airbench_files
    from pipeline import data

    d = data.make_synthetic(n_train=200, n_test=40, seed=3)
    order = np.argsort(d.y_train, kind="stable")  # class by class, as an image folder reads
    d = data.Dataset(d.x_train[order], d.y_train[order], d.x_test, d.y_test, d.class_names)
    files = airbench_files(d, seed=0)
    train, test = files["train"], files["test"]
    assert train["labels"].dtype == np.int64 and train["images"].dtype == np.uint8
    assert not np.array_equal(train["labels"], d.y_train)  # no longer class by class
    pairs = {(img.tobytes(), int(label)) for img, label in zip(train["images"], train["labels"], strict=True)}
    assert pairs == {(img.tobytes(), int(label)) for img, label in zip(d.x_train, d.y_train, strict=True)}
    assert np.array_equal(test["images"], d.x_test) and np.array_equal(test["labels"], d.y_test)
    assert train["classes"] == list(d.class_names)
    assert np.array_equal(airbench_files(d, seed=0)["train"]["labels"], train["labels"])  # one fixed order


@pytest.mark.parametrize(("args", "message"), [
    (["--runs", "-1"], "--runs: must be >= 0, got -1"),
    (["--recipe", "97"], "argument --recipe: invalid choice: 97 (choose from 94, 95, 96)"),
    (["--decoded", "x.npz"], "--decoded: only with --data (the source it was decoded from, which the record names)"),
    (["--package", "missing.tar.gz"], "--package: missing.tar.gz: no such file (pip download --no-deps "
                                      "airbench==0.1.8 -d .whl)"),
    (["--data", "nowhere"], "data.source: 'nowhere' is neither"),
    (["--package", "{sdist_empty}"], "holds no airbench/*.py (an airbench sdist from PyPI?)"),
    (["--package", "{not_tar}"], "not a readable .tar.gz"),
], ids=["runs", "recipe", "decoded", "no-package", "no-data", "not-airbench", "not-tar"])
def test_the_airbench_reference_refuses_bad_arguments_in_one_line_before_any_training(tmp_path, args, message):
    sdist = tmp_path / "airbench-0.1.8.tar.gz"
    airbench_sdist(sdist, {"airbench/__init__.py": FAKE_AIRBENCH})
    airbench_sdist(tmp_path / "empty.tar.gz", {"README.md": "no package"})
    (tmp_path / "not.tar.gz").write_text("plain text")
    args = [a.format(sdist_empty=tmp_path / "empty.tar.gz", not_tar=tmp_path / "not.tar.gz") for a in args]
    argv = ["--out", str(tmp_path / "out.json"), "--package", str(sdist), "--images", "64", *args]
    fake = tmp_path / "fake"  # no PyTorch to reach: each refusal comes before it
    proc = subprocess.run([sys.executable, "-m", "bench.airbench_reference", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}"})
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "out.json").exists()


# bench/gpu.sh's python for the data decoded once: `-c` of the decode writes its .npz (or fails, FAKE_DECODE_FAILS);
# a stage logs its name, its --data and --decoded, and whether that file is there
DECODING_PYTHON = """#!/bin/bash
if [[ $1 == -c && $2 == *load_source* ]]; then
  [[ -n ${FAKE_DECODE_FAILS:-} ]] && { echo "pipeline.data.DataError: test/cat/0001.jpg: truncated"; exit 1; }
  touch "$4"; exit 0
fi
[[ $1 == -c ]] && exit 0
while (( $# )); do case $1 in --out) out=$2; shift;; --data) data=$2; shift;; --decoded) decoded=$2; shift;; esac; shift
done
name=${out##*/gpu-}; there=$([[ -f ${decoded:-/nonexistent} ]] && echo there || echo absent)
echo "${name%.json} $data ${decoded:-none} $there" >> "$FAKE_LOG"
echo '{"epoch_seconds": [1.0], "test_acc": 0.5}' > "$out"
"""


def test_gpu_sh_decodes_the_data_once_for_every_stage_and_removes_it_at_the_end(tmp_path):
    """Each stage decoded the JPEG copy itself (~14 s of its limit on a 2-core CPU, some 3 minutes of a call): the
    call decodes it once into a folder of its own, which every stage reads, naming $DATA all the same, and removes
    it at its end; where that decode fails, each stage decodes $DATA itself, as before."""
    fake, checkout, log, tmp = tmp_path / "python", tmp_path / "checkout", tmp_path / "stages.log", tmp_path / "tmp"
    fake.write_text(DECODING_PYTHON)
    fake.chmod(0o755)
    for folder in (checkout / ".data", checkout / ".whl", tmp):
        folder.mkdir(parents=True)
    (checkout / ".data" / "cifar10-jpeg-q75.tar.gz").write_bytes(b"images")
    (checkout / ".whl" / "airbench-0.1.8.tar.gz").write_bytes(b"")

    def call(out, **env):
        log.write_text("")
        proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=checkout, capture_output=True,
                              text=True, timeout=120, env={"PATH": os.environ["PATH"], "PYTHON": str(fake),
                                                           "TMPDIR": str(tmp), "OUT": str(tmp_path / out),
                                                           "FAKE_LOG": str(log), **env,
                                                           "GPU_SH_STAGES": "fast reference-airbench94 seed"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert not list(tmp.iterdir())  # the decoded data and the stages' caches: removed at the call's end
        return [line.split() for line in log.read_text().splitlines()], proc.stdout

    stages, console = call("once")
    assert [stage[0] for stage in stages] == ["fast", "reference-airbench94", "seed"]
    assert {stage[1] for stage in stages} == {".data/cifar10-jpeg-q75.tar.gz"}  # what the records name
    assert len({stage[2] for stage in stages}) == 1 and stages[0][2].startswith(str(tmp / "gpu-data."))
    assert {stage[3] for stage in stages} == {"there"}
    assert "== .data/cifar10-jpeg-q75.tar.gz decoded once for every stage in " in console

    stages, console = call("each", FAKE_DECODE_FAILS="1")
    assert [stage[1:] for stage in stages] == [[".data/cifar10-jpeg-q75.tar.gz", "none", "absent"]] * 3
    assert "pipeline.data.DataError: test/cat/0001.jpg: truncated" in console
    assert "== .data/cifar10-jpeg-q75.tar.gz not decoded once (above): each stage decodes it itself" in console


def test_gpu_report_refuses_the_results_of_other_code_than_the_checkouts(tmp_path):
    """An archive's results were unpacked whatever code measured them: a call made before a change to the pipeline
    went into the table as this checkout's. gpu.sh records its source files' hash in gpu.txt; --unpack compares."""
    import tarfile

    from bench import gpu_report

    fake, checkout, out = tmp_path / "python", tmp_path / "checkout", tmp_path / "out"
    fake.write_text(REPORTED_PYTHON)
    fake.chmod(0o755)
    for name in ("pipeline/train.py", "bench/gpu.sh", "params/fast.yaml", "pipeline/__pycache__/x.py", "README.md"):
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text(name)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=checkout, capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ["PATH"], "PYTHON": str(fake), "OUT": str(out),
                                           "GPU_SH_STAGES": "fast"})
    with tarfile.open(out / "gpu-results.tar.gz") as tar:
        device = tar.extractfile("gpu.txt").read().decode()
    assert f"source {gpu_report.source_hash(checkout)}\n" in device, proc.stdout + proc.stderr
    (checkout / "README.md").write_text("docs, pycache: not the code measured")
    (checkout / "pipeline" / "__pycache__" / "x.py").write_text("y")
    assert "gpu.txt" in gpu_report.unpack(out / "gpu-results.tar.gz", tmp_path / "results", checkout)
    (checkout / "pipeline" / "train.py").write_text("changed")
    with pytest.raises(SystemExit, match=r"gpu-results.tar.gz: measured other code \(source [0-9a-f]{16} in its "
                                         r"gpu.txt, [0-9a-f]{16} in .*checkout\)"):
        gpu_report.unpack(out / "gpu-results.tar.gz", tmp_path / "other", checkout)
    assert not (tmp_path / "other").exists()
