"""bench.multi_gpu: how an arm's run is read (a result, a failure, a result then a crash), the speed-up and the
choice, and the refusal on a machine without several GPUs. Its arms themselves run through bench.gpu_epoch, whose
training code is pipeline.fitting's (tested with two devices in test_fast_path.py)."""

from __future__ import annotations

import argparse
import json
import subprocess

import pytest

from bench import multi_gpu


def arm(backend, name, seconds=None, val_acc=0.9, error=None, skipped=None):
    overrides = {a: o for b, a, o in multi_gpu.ARMS if b == backend}[name]
    entry = {"backend": backend, "arm": name, "overrides": overrides}
    if skipped:
        return {**entry, "skipped": skipped}
    result = {"devices": ["gpu:0", "gpu:1"], "jit_compile": "true", "steady_epoch_seconds": seconds,
              "images_per_second": round(49000 / seconds) if seconds else None, "val_acc": [0.5, val_acc]}
    return {**entry, "result": {**result, **({"error": error} if error else {})}}


def test_speed_up_over_the_backends_one_device_and_the_fastest_clean_arm_is_chosen(tmp_path):
    results = {"machine": "m", "date": "2026-12-04", "command": "", "params": "params/fast.yaml", "epochs": 3,
               "arms": [arm("tensorflow", "one device", 2.0), arm("tensorflow", "MirroredStrategy", 1.25),
                        arm("tensorflow", "MirroredStrategy + XLA", 0.8),
                        arm("jax", "one device", 1.0),
                        arm("jax", "DataParallel", 0.5, error="exit 134 after its result")]}
    frame = multi_gpu.table(results)
    assert list(frame["speed-up"]) == [1.0, 1.6, 2.5, 1.0, 2.0]
    assert "MirroredStrategy + XLA" in multi_gpu.choice(frame) and "2.5x" in multi_gpu.choice(frame)  # not the crash
    results["arms"] = [arm("tensorflow", "one device", skipped="tensorflow is not installed"),
                       arm("jax", "DataParallel", error="exit 1: ValueError: boom")]
    multi_gpu.write_markdown(results, tmp_path / "m.md")
    text = (tmp_path / "m.md").read_text()
    assert "tensorflow is not installed" in text and "ValueError: boom" in text
    assert "Choice: no arm finished cleanly" in text


@pytest.mark.parametrize(("code", "writes", "stderr", "error"), [
    (0, True, "", None),
    (134, True, "F1204 rendezvous.cc:161] Termination timeout", "exit 134 after its result"),
    (1, False, "Traceback ...\nValueError: train.distribute: 'mirrored' needs the TensorFlow backend\n",
     "exit 1: ValueError: train.distribute: 'mirrored' needs the TensorFlow backend"),
    (1, False, "W0000 a warning\ntensorflow.python.framework.errors_impl.InvalidArgumentError: Graph execution error:"
               "\n\nTrying to access resource x located in device CPU:1 from device CPU:0\n",
     "exit 1: tensorflow.python.framework.errors_impl.InvalidArgumentError: Graph execution error: Trying to access "
     "resource x located in device CPU:1 from device CPU:0"),
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
