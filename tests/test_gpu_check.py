"""bench/gpu.sh's training stage runs where the borrowed GPU machine's image leaves it: JAX and Keras, without
TensorFlow, MLflow, pandas, matplotlib or scikit-learn. A wrong import there would waste
the one GPU call of a session."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ABSENT = ("tensorflow", "mlflow", "pandas", "matplotlib", "sklearn")


SMALL = "train.feed=device train.epochs=2 model.widths=[8,16,32,64] train.steps_per_execution=1"


@pytest.mark.parametrize("overrides", [SMALL, f"{SMALL} model.ghost_batch=32 train.drop_remainder=true "
                                              "train.batch_size=64 train.alternate_flip=true train.ema=true"],
                         ids=["fast", "ghost-batch-norm-alternate-flip-ema"])  # the second: the extra stages' params
def test_a_gpu_stage_trains_and_scores_with_tensorflow_and_mlflow_unimportable(tmp_path, overrides):
    stubs = tmp_path / "absent"
    for name in ABSENT:  # first on the path: `import NAME` fails as on a machine without it
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ModuleNotFoundError('no {name} on the GPU machine', "
                                                  f"name={name!r})\n")
    out = tmp_path / "gpu-fast.json"
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": f"{stubs}{os.pathsep}{ROOT}"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_epoch", "--images", "512", "--out", str(out), "--full",
         "--params", "params/fast.yaml",
         "--overrides", overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model"] == "resnet9" and len(result["epoch_seconds"]) == 2
    assert 0.0 <= result["test_acc"] <= 1.0 and result["fit_seconds"] > 0
    assert (result["data"], result["test_images"]) == ("synthetic (512 training images)", 102)  # gpu_report says so
    # every test-time augmentation scored on the held-out images (fast.yaml holds 2% out) and the test images,
    # the profile's own (flip) being the test_acc it reports
    scores = result["tta_scores"]
    assert list(scores) == ["none", "flip", "flip_shift"] and scores["flip"]["test_acc"] == result["test_acc"]
    assert all(0.0 <= s[split] <= 1.0 for s in scores.values() for split in ("val_acc", "test_acc"))


def gpu_epoch(tmp_path, *args, **popen):
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "bench.gpu_epoch", "--out", str(tmp_path / "gpu-x.json"), *args]
    if popen:
        return subprocess.Popen(command, cwd=ROOT, env=env, **popen)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "1"], "--epochs: must be >= 2 (the first epoch compiles), got 1"),
    (["--params", "nosuch.yaml"], "params: file not found: nosuch.yaml"),
    (["--data", "/nonexistent/cifar.tar.gz"], "data.source: '/nonexistent/cifar.tar.gz' is neither"),
])
def test_gpu_stage_bad_arguments_are_one_line_and_exit_2(tmp_path, args, message):
    proc = gpu_epoch(tmp_path, "--params", "params/tiny.yaml", "--images", "64", *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "gpu-x.json").exists()  # 1 epoch: its compile time was reported as the steady epoch


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

    out = tmp_path / "gpu-x.json"
    monkeypatch.setattr(gpu_epoch.fitting, "fit", fit_stopped_after_two_epochs)
    monkeypatch.setattr(sys, "argv", ["gpu_epoch", "--out", str(out), "--params", "params/tiny.yaml", "--images",
                                      "64", "--epochs", "3"])
    with pytest.raises(KeyboardInterrupt):
        gpu_epoch.main()
    partial = json.loads(out.read_text())
    assert partial["partial"] and partial["epoch_seconds"] == [20.0, 0.5] and partial["train_images"] == 64
    assert (partial["data"], partial["test_images"]) == ("synthetic (64 training images)", 12)
    row = gpu_report.rows(tmp_path, "1999-01-01").iloc[0]
    assert row["status"] == "stopped at its time limit"
    assert row["device"] == gpu_epoch.device_kind() and row["device"]  # not blank: the machine it ran on
    assert row["date"] == partial["date"] != "1999-01-01"  # the day it ran, not the report's --date
