"""The README is a contract: its commands work as written, in the order a reader meets them.

They run in a scratch copy of the project, with the copy's own default store (`mlflow.db` there,
no MLFLOW_TRACKING_URI): the first command's `python -m pipeline.tracking && mlflow run ...`
(the venv and pip steps before it are what this test process already is), the compare commands,
the serve command in the background and the predict client on two image files. The training
command gets the tiny profile by appending ` -P params=params/tiny.yaml`; `<run id>` placeholders
become the training run's id and the server's port a free one. Nothing else is changed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from bench.servers import free_port, stop_group, wait_until_up
from pipeline.data import SYNTHETIC_CLASSES
from tests.conftest import ROOT

TINY = " -P params=params/tiny.yaml"
SETUP = ("python3 -m venv .venv", ". .venv/bin/activate", "pip install -r requirements.txt")


def shell_blocks() -> list[str]:
    """The README's ```bash blocks, each as a list of commands (continued lines joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [[re.sub(r"\s{2,}#.*$", "", line).strip() for line in block.replace("\\\n", " ").splitlines()
             if line.strip() and not line.lstrip().startswith("#")] for block in blocks]


def documented() -> dict[str, list[str]]:
    """The commands this test runs, by role, exactly as the README spells them."""
    blocks = shell_blocks()
    first = blocks[0][0].split(" && ")
    assert tuple(first[:len(SETUP)]) == SETUP, first  # only the environment set-up is left to this test's own venv
    compare = next(block for block in blocks if any(" -e compare " in f"{c} " for c in block))
    serving = next(block for block in blocks if any(c.startswith("mlflow models serve") for c in block))
    return {"train": [" && ".join(first[len(SETUP):])],
            "compare": [c for c in compare if c.startswith("mlflow run . -e compare")],
            "serve": [c for c in serving if c.startswith("mlflow models serve")],
            "predict": [c for c in serving if c.startswith("python -m pipeline.predict")]}


def scratch_copy(folder: Path) -> Path:
    copy = folder / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "mlruns", "mlartifacts", "mlflow.db", "checkpoints", "__pycache__", ".pytest_cache",
        ".ruff_cache", "out"))
    return copy


def shell(command: str, cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_readme_commands_work_in_sequence(tmp_path):
    commands = documented()
    assert commands["train"] == ["python -m pipeline.tracking && mlflow run . --env-manager local"]
    assert len(commands["compare"]) == 3 and len(commands["serve"]) == 1 and len(commands["predict"]) == 1
    project = scratch_copy(tmp_path)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "PIPELINE_", "KERAS_BACKEND"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python`, `mlflow` of this venv
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"

    trained = shell(commands["train"][0] + TINY, project, env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"tracking store sqlite:///{project / 'mlflow.db'} ready" in trained.stdout
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (train,) = client.search_runs(["0"], "tags.step = 'train'")  # MLflow's Default experiment, as documented
    assert train.info.status == "FINISHED"
    champion = client.get_model_version_by_alias("cifar10-resnet", "champion")
    assert champion.tags["run_id"] == train.info.run_id

    train_id = train.info.run_id
    for command in commands["compare"]:
        compared = shell(command.replace("<run id>", train_id), project, env, timeout=300)
        assert compared.returncode == 0, (command, compared.stderr[-3000:])
        assert re.search(r"\| run +\| run_id +\|", compared.stdout) and train_id in compared.stdout, command
    comparisons = client.search_runs(["0"], "tags.step = 'compare'")
    assert len(comparisons) == 3 and all(r.data.tags["compared_runs"] == train_id for r in comparisons)
    every = client.search_runs(["0"])
    assert every and all(r.info.status == "FINISHED" for r in every), [(r.data.tags.get("step"), r.info.status)
                                                                        for r in every]

    port = str(free_port())
    serve, predict = (commands[role][0].replace("5001", port) for role in ("serve", "predict"))
    assert port in serve and port in predict
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(["bash", "-c", f"exec {serve}"], cwd=project, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, timeout=180, log=log)
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(project / "cat.png")
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(project / "truck.jpg")
        answered = shell(predict, project, env, timeout=120)
    finally:
        stop_group(server)
    assert answered.returncode == 0, answered.stderr[-3000:]
    lines = [line.split("\t") for line in answered.stdout.splitlines()]
    assert [line[0] for line in lines] == ["cat.png", "truck.jpg"]
    for _, label, probability in lines:
        assert label in SYNTHETIC_CLASSES and 0 < float(probability) <= 1


@pytest.mark.parametrize("role", ["train", "compare", "serve", "predict"])
def test_the_documented_commands_are_found(role):
    """The parser above finds each command it runs (a renamed section must fail here, not pass vacuously)."""
    assert documented()[role]
