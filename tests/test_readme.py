"""The README is a contract: its commands work as written, in the order a reader meets them.

They run in a scratch copy of the project, with the copy's own default store (`mlflow.db` there,
no MLFLOW_TRACKING_URI): the first command's `python -m pipeline.tracking && mlflow run ...`
(the venv and pip steps before it are what this test process already is), the compare commands,
the serve command in the background and the predict client on two image files. The training
command gets the tiny profile by appending ` -P params=params/tiny.yaml`; `<run id>` placeholders
become the training run's id and the server's port a free one. Nothing else is changed. The several-hosts
section's tracking server is started too, to check the names it answers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
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


def answer(port: int, host: str) -> int:
    """The HTTP status of a tracking-server API call to 127.0.0.1:`port` with `Host: host` (0: no answer yet)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_the_tracking_server_command_answers_the_names_the_readme_reaches_it_by(tmp_path):
    """The several-hosts section's `mlflow server ... --allowed-hosts ...`, as written but for its store, port and
    workers: naming hosts replaces MLflow's defaults (localhost and private IPs), so the chief's
    MLFLOW_TRACKING_URI and localhost's spellings must be among them, and a private IP not listed gets 403."""
    (block,) = [block for block in shell_blocks() if any(c.startswith("mlflow server ") for c in block)]
    server = next(c for c in block if c.startswith("mlflow server "))
    uri = next(c for c in block if c.startswith("export MLFLOW_TRACKING_URI=http://")).partition("=")[2]
    port = free_port()
    server = server.removesuffix("&").replace("sqlite:///mlflow.db", f"sqlite:///{tmp_path / 'mlflow.db'}")
    server = server.replace("--host 0.0.0.0", "--host 127.0.0.1").replace("--port 5000", f"--port {port}")
    assert f"--port {port}" in server and "127.0.0.1" in server, server
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with (tmp_path / "server.log").open("wb") as out:
        process = subprocess.Popen(["bash", "-c", f"exec {server} --workers 1"], cwd=tmp_path, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while answer(port, "localhost:5000") == 0 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        names = [urllib.parse.urlsplit(uri).netloc, "localhost:5000", "127.0.0.1:5000", "10.0.0.5:5000"]
        answers = {name: answer(port, name) for name in names}
    finally:
        stop_group(process)
    assert answers == {names[0]: 200, "localhost:5000": 200, "127.0.0.1:5000": 200, "10.0.0.5:5000": 403}, (
        answers, (tmp_path / "server.log").read_text()[-2000:])


@pytest.mark.parametrize("role", ["train", "compare", "serve", "predict"])
def test_the_documented_commands_are_found(role):
    """The parser above finds each command it runs (a renamed section must fail here, not pass vacuously)."""
    assert documented()[role]


# Paths the README and docs pages name as what a command writes, not as files here.
WRITTEN_BY_A_COMMAND = {"bench/results/multi_gpu.md", "bench/results/quick-recheck.md"}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(text: str) -> Iterator[str]:
    """The anchors GitHub gives a Markdown page's headings: lower case, punctuation dropped, spaces as hyphens, a
    repeated heading numbered (headings in fenced blocks, such as a shell comment, are none)."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"```\w*\n.*?```", "", text, flags=re.S), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if not seen[slug] else f"{slug}-{seen[slug]}"


def names(page: Path) -> tuple[list[str], list[tuple[str, str]], set[str]]:
    """What `page` names that must exist: links and paths that resolve to nothing (a link relative to the page's
    folder, a `path` in backticks relative to the project; an anchor must be a heading of the page it points into),
    the `test_x.py::test_y` tests it names, and the params keys in its code spans and blocks."""
    text = page.read_text()
    prose = re.sub(r"```\w*\n.*?```", "", text, flags=re.S)
    missing = []
    for link in re.findall(r"\]\(([^)\s]+)\)", prose):
        if "://" in link or link.startswith("mailto:"):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path) if path else page
        if not target.exists():
            missing.append(f"{page.name}: {link}")
        elif anchor and target.suffix == ".md" and anchor not in set(anchors(target.read_text())):
            missing.append(f"{page.name}: {link} (no such heading)")
    for path in set(re.findall(r"`((?:bench|params|pipeline|docs|scripts|tests|\.ci)/[\w./-]+)`", text)):
        if path not in WRITTEN_BY_A_COMMAND and not (ROOT / path.split("::")[0]).exists():
            missing.append(f"{page.name}: {path}")
    tests = re.findall(r"(test_\w+\.py)::(test_\w+)", text)
    spans = re.findall(r"```\w*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", prose)
    keys = {k for k in re.findall(r"(?<![\w/.])((?:data|model|train|evaluate|register|tracking)\.\w+)(?![\w(])",
                                  " ".join(spans)) if not k.endswith(".py")}
    return missing, tests, keys


def test_every_file_test_and_params_key_the_readme_names_exists():
    """A reader follows the README's links and names to files, tests and params keys: each must be there (a renamed
    test, a moved report or a dropped key would leave the README pointing at nothing). The same for the docs/ pages
    it links to, and for the links between them: `docs/x.md#heading` must be a heading there."""
    from pipeline import config

    known = {f"{section}.{key}" for section, (_, keys) in config._sections().items() for key in keys}
    found = {page.name: names(page) for page in PAGES}
    assert {"README.md", "params.md", "data.md", "results.md", "benchmarks.md", "gpus.md", "reliability.md",
            "comparing.md", "sweeps.md", "team.md", "several-hosts.md", "steps.md"} <= set(found)
    missing = [m for page_missing, _, _ in found.values() for m in page_missing]
    assert not missing, missing
    tests = [t for _, page_tests, _ in found.values() for t in page_tests]
    assert found["reliability.md"][1] and found["benchmarks.md"][1], "the pages name tests, and this test reads them"
    assert not [t for t in tests if f"def {t[1]}(" not in (ROOT / "tests" / t[0]).read_text()], tests
    keys = set().union(*(page_keys for _, _, page_keys in found.values()))
    assert len(found["README.md"][2]) > 30 and len(keys) > 40
    assert not sorted(keys - known - {"train.epoch"}), sorted(keys - known)  # the misspelt example


def test_the_link_check_finds_a_broken_link_a_missing_heading_and_an_unknown_key(tmp_path):
    """The check above fails where it should: links resolve from the page's own folder, anchors must be headings."""
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text("# A page\n\n## Some `odd.key`: heading\n\n[ok](#some-oddkey-heading) [up](../README.md) "
                    "[gone](../nowhere.md) [bad](#no-heading) [self](page.md#a-page)\n\n```bash\n# not a heading\n```\n"
                    "`train.batch_size` `train.no_such_key` `test_readme.py::test_the_documented_commands_are_found`\n")
    (tmp_path / "README.md").write_text("# R\n")
    missing, tests, keys = names(page)
    assert missing == ["page.md: ../nowhere.md", "page.md: #no-heading (no such heading)"], missing
    assert tests == [("test_readme.py", "test_the_documented_commands_are_found")]
    assert keys == {"train.batch_size", "train.no_such_key"}
    assert set(anchors((ROOT / "README.md").read_text())) >= {"several-hosts-tensorflow-multiworkermirroredstrategy",
                                                               "what-survives-a-crash-what-is-checked-on-input"}
