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
    # every test-time augmentation scored on the held-out images (fast.yaml holds 2% out) and the test images,
    # the profile's own (flip) being the test_acc it reports
    scores = result["tta_scores"]
    assert list(scores) == ["none", "flip", "flip_shift"] and scores["flip"]["test_acc"] == result["test_acc"]
    assert all(0.0 <= s[split] <= 1.0 for s in scores.values() for split in ("val_acc", "test_acc"))
