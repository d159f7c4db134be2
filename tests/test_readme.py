"""The README is a contract: its commands work as written, in the order a reader meets them.

They run in a scratch copy of the project, with the copy's own default store (`mlflow.db` there,
no MLFLOW_TRACKING_URI): the first command's `python -m pipeline.tracking && mlflow run ...`
(the venv and pip steps before it are what this test process already is), the compare commands,
the serve command in the background and the predict client on two image files. The training
command gets the tiny profile by appending ` -P params=params/tiny.yaml`; `<run id>` placeholders
become the training run's id and the server's port a free one. Nothing else is changed. The several-hosts
section's tracking server is started too, to check the names it answers.

The README and the docs pages are checked without running anything too: their links, anchors, named files, tests,
params keys, commands' entry points and options, the environment variables they tell a reader to set, the revisions
they give to git, the tags and metrics the pipeline logs, the layout page's list of files, and which way a "below" or
"above" link points.
"""

from __future__ import annotations

import os
import re
import shlex
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
    return [[re.sub(r"\s{2,}#.*$", "", line).strip() for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines()
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
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, timeout=300, log=log)
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
        deadline = time.monotonic() + 300  # MLflow imported twice, the store made: ~8 CPU-s, more loaded
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
    spans = code_spans(text)
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


# The calls that log tags or metrics, or take the tags a run is opened with, by their literal names.
LOGGING_CALLS = {"set_tag", "set_tags", "log_metric", "log_metrics", "set_logged_model_tags", "start_training",
                 "create_trial_run", "adopt_wrapper_run", "set_run_tags", "start_run"}


def logged_names(folder: Path) -> dict[str, str]:
    """Every tag and metric name the code under `folder` logs by a literal name (a string, or a module's string
    constant, as a dict key or a `set_tag`/`log_metric` argument), with the file that logs it; MLflow's own
    (`mlflow.*`) left out."""
    import ast

    trees = {path: ast.parse(path.read_text()) for path in sorted(folder.rglob("*.py"))}
    constants = {target.id: node.value.value for tree in trees.values() for node in tree.body  # imported ones too
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                 and isinstance(node.value.value, str) for target in node.targets if isinstance(target, ast.Name)}

    def text(node) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return constants.get(node.id if isinstance(node, ast.Name) else getattr(node, "attr", ""))

    found: dict[str, str] = {}
    for path, tree in trees.items():
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            function = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
            if function not in LOGGING_CALLS:
                continue
            keys = [key for arg in [*call.args, *(k.value for k in call.keywords)] if isinstance(arg, ast.Dict)
                    for key in arg.keys]
            if function in ("set_tag", "log_metric") and len(call.args) >= 2:  # (run_id,) name, value
                keys.append(call.args[-2])
            for key in keys:
                name = key is not None and text(key)
                if name and re.fullmatch(r"[a-z][a-z0-9_]*", name):
                    found.setdefault(name, str(path.relative_to(folder.parent)))
    return found


def code_spans(text: str) -> list[str]:
    """A page's code: each fenced block whole, then each inline `span` outside the blocks."""
    return re.findall(r"```\w*\n(.*?)```", text, re.S) + re.findall(
        r"`([^`\n]+)`", re.sub(r"```\w*\n.*?```", "", text, flags=re.S))


def named_in_docs(name: str, pages: list[Path]) -> bool:
    """Whether a page names `name` in a code span, as itself (`train.distribute` is not `distribute`)."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(name)}(?![\w.])")
    for page in pages:
        text = page.read_text()
        spans = re.findall(r"`([^`\n]+)`", re.sub(r"```\w*\n.*?```", "", text, flags=re.S))
        if any(pattern.search(span) for span in spans):
            return True
    return False


def test_every_tag_and_metric_the_pipeline_logs_is_named_in_the_docs():
    """A reader looking at a run in the MLflow UI finds what each of its tags and metrics means: every name the
    pipeline logs is named (in a code span) in the README or a docs page, so a new tag or a renamed metric must
    come with its documentation."""
    logged = logged_names(ROOT / "pipeline")
    assert {"backend", "trainable_params", "wall_seconds", "train_key", "best_trial_val_acc", "optuna_study",
            "test_data_sha256", "val_data_sha256"} <= set(logged), sorted(logged)
    missing = {name: where for name, where in logged.items() if not named_in_docs(name, PAGES)}
    assert not missing, missing


def test_the_logged_names_check_reads_dict_keys_constants_and_single_tags(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        'TAG = "the_tag"\n'
        'def f(client, mlflow, run):\n'
        '    mlflow.set_tags({"a_tag": "1", TAG: "2", "mlflow.note.content": "x"})\n'
        '    client.set_tag(run, "single_tag", "v")\n'
        '    mlflow.log_metrics({"a_metric": 1.0}, step=1)\n'
        '    print({"not_logged": 1})\n')
    assert logged_names(tmp_path / "pkg") == {"a_tag": "pkg/m.py", "the_tag": "pkg/m.py", "single_tag": "pkg/m.py",
                                              "a_metric": "pkg/m.py"}
    page = tmp_path / "p.md"
    page.write_text("`a_tag` and `train.the_tag`, `step=single_tag`\n\n```bash\n`a_metric`\n```\n")
    assert [named_in_docs(n, [page]) for n in ("a_tag", "the_tag", "single_tag", "a_metric")] == [
        True, False, True, False]


def unnamed_in_layout(root: Path) -> list[str]:
    """What docs/layout.md under `root` leaves out of "every file and folder of the project": a top-level entry
    (what .gitignore lists left out) or a module of pipeline/, pipeline/tracking/ or bench/ (other than
    `__init__.py`) that it does not name."""
    import fnmatch

    layout = (root / "docs" / "layout.md").read_text()
    if (root / ".git").exists():  # what the checkout tracks, not what a reader's runs left beside it
        tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
        entries = sorted({line.split("/")[0] for line in tracked.splitlines()})
    else:
        ignored = [line.strip().strip("/") for line in (root / ".gitignore").read_text().splitlines() if line.strip()]
        entries = sorted(p.name for p in root.iterdir() if not any(fnmatch.fnmatch(p.name, i) for i in ignored))
    modules = [p for folder in ("pipeline", "pipeline/tracking", "bench") for p in sorted((root / folder).iterdir())
               if p.suffix in (".py", ".sh") and p.name != "__init__.py"]
    missing = [name for name in entries if not re.search(rf"(?<![\w/.-]){re.escape(name)}(?![\w-]|\.\w)", layout)]
    return missing + [str(p.relative_to(root)) for p in modules
                      if not re.search(rf"(?<![\w-]){re.escape(p.stem)}(?![\w-])", layout)]


def test_the_layout_page_names_every_file_and_folder():
    """docs/layout.md says it lists every file and folder of the project and what it holds: a new top-level file, a
    new module or a new benchmark must come with its line."""
    assert not unnamed_in_layout(ROOT)


def test_the_layout_check_finds_an_unnamed_file_and_module(tmp_path):
    for folder in ("docs", "pipeline/tracking", "bench"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("README.md", "new.toml", "mlflow.db", "pipeline/__init__.py", "pipeline/train.py",
                 "pipeline/tracking/steps.py", "bench/gpu.sh", "bench/new_bench.py"):
        (tmp_path / name).write_text("")
    (tmp_path / ".gitignore").write_text("mlflow.db\n__pycache__/\n")
    (tmp_path / "docs" / "layout.md").write_text("README.md .gitignore docs/ pipeline/train.py, steps.py gpu.sh "
                                                 "pipeline/__init__.py: sub-bench/ and new.toml.bak\n")
    assert unnamed_in_layout(tmp_path) == ["bench", "new.toml", "bench/new_bench.py"]


def misdirected(page: Path) -> list[str]:
    """Links within `page` spelt `[below](#x)` whose heading comes before them, or `[above](#x)` after."""
    text = page.read_text()
    offsets = {}
    for heading, slug in zip(re.finditer(r"^#{1,6} +(.+?) *$", text, re.M), anchors(text), strict=False):
        offsets.setdefault(slug, heading.start())
    wrong = []
    for link in re.finditer(r"\[(below|above)\]\(#([^)\s]+)\)", text):
        where, anchor = link.groups()
        at = offsets.get(anchor)
        if at is not None and (at < link.start()) != (where == "above"):
            wrong.append(f"{page.name}: [{where}](#{anchor})")
    return wrong


def test_links_said_to_be_below_or_above_point_that_way():
    """A reader told "below" reads on: a section that moved must take its links' words with it."""
    assert not [w for page in PAGES for w in misdirected(page)]


def test_the_direction_check_finds_a_link_pointing_the_wrong_way(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[below](#end) [above](#top) [above](#end) [below](#top)\n\n## End\n")
    assert misdirected(page) == ["page.md: [above](#end)", "page.md: [below](#top)"]


SHOWN_REFUSED = {"epoch", "help"}  # params.md's misspelt `-P epoch=30`, shown refused, and `-P help=1`


def unknown_options(page: Path) -> list[str]:
    """In `page`'s code, the `mlflow run .` commands' entry points (`-e`) and `-P` names that MLproject does not
    have, a `-P name=` outside a command that no entry point has, and the `python -m pipeline.<x>`/`bench.<x>`
    commands whose module or `--option` does not exist (an entry point's options are its MLproject parameters; a
    bench module's, the ones its source adds)."""
    import yaml

    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    text = page.read_text()
    spans = code_spans(text)
    unknown = []
    every = {name for spec in entry_points.values() for name in spec["parameters"]} | SHOWN_REFUSED
    for span in (s.replace("\\\n", " ") for s in spans):
        if "mlflow run ." not in span:  # `-P dataset_uri=PATH` in a sentence: a parameter of some entry point
            unknown += [f"{page.name}: -P {name}" for name in re.findall(r"-P (\w+)=", span) if name not in every]
        for command in re.findall(r"mlflow run \.[^\n;&|#]*", span):
            entry = re.search(r"(?:-e|--entry-point) (\w+)", command)
            entry = entry[1] if entry else "main"
            if entry not in entry_points:
                unknown.append(f"{page.name}: -e {entry}")
                continue
            unknown += [f"{page.name}: -e {entry} -P {name}" for name in re.findall(r"-P (\w+)=", command)
                        if name not in entry_points[entry]["parameters"]]
        for module, rest in re.findall(r"python -m ((?:pipeline|bench)\.\w+)([^\n;&|#`]*)", span):
            source = ROOT / (module.replace(".", "/") + ".py")
            if not source.exists():  # a package run by its __main__.py
                source = ROOT / module.replace(".", "/") / "__main__.py"
            if not source.exists():
                unknown.append(f"{page.name}: {module}")
                continue
            step = module.split(".")[1]
            known = ({f"--{p.replace('_', '-')}" for p in entry_points[step]["parameters"]}
                     if module.startswith("pipeline.") and step in entry_points
                     else set(re.findall(r"\"(--[\w-]+)\"", source.read_text())))
            unknown += [f"{page.name}: {module} {option}" for option in re.findall(r"(?<!\S)(--[\w-]+)", rest)
                        if option not in known | {"--help"}]
    return unknown


def test_every_documented_command_names_entry_points_and_options_that_exist():
    """The commands the pages show, beyond those the sequence above runs: a renamed `-P` parameter, entry point,
    module or option must take its documentation with it."""
    assert not [u for page in PAGES for u in unknown_options(page)]


def test_the_command_check_finds_unknown_entry_points_parameters_modules_and_options(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nmlflow run . -e compare --env-manager local -P top=5 -P nope=1\n"
                    "mlflow run . -e nothing -P x=1\npython -m pipeline.train --params p --nope 1\n```\n"
                    "`mlflow run . -P params=x -P epoch=3`, `python -m bench.sweep --epochs 2 --bad`, "
                    "`python -m bench.nothing`, `python -m pipeline.tracking`, `-P dataset_uri=PATH`, "
                    "`-P dataset=PATH`\n")
    assert unknown_options(page) == [
        "page.md: -e compare -P nope", "page.md: -e nothing", "page.md: pipeline.train --nope",
        "page.md: -e main -P epoch", "page.md: bench.sweep --bad", "page.md: bench.nothing", "page.md: -P dataset"]


# Named in the docs as what the pipeline leaves unset (gpus.md: TensorFlow's persistent XLA cache stays off).
NOT_SET_HERE = {"TF_XLA_FLAGS"}


def project_sources(root: Path) -> str:
    """The code that reads settings: the pipeline and benchmark modules, the shell scripts, MLproject and CI."""
    files = [*sorted(root.glob("pipeline/**/*.py")), *sorted(root.glob("bench/*.py")), root / "bench" / "gpu.sh",
             *sorted(root.glob("scripts/*")), root / "MLproject", root / ".ci" / "run"]
    return "\n".join(path.read_text() for path in files if path.is_file())


def unread_names(page: Path, sources: str) -> list[str]:
    """The environment variables and constants `page`'s code names (`NAME_WITH_UNDERSCORES` in capitals) that
    `sources` never names: a setting renamed in the code would leave the page telling a reader to set one that
    nothing reads. A name ending in `_` is a prefix (`MLFLOW_HTTP_REQUEST_*`)."""
    named = {name for span in code_spans(page.read_text())
             for name in re.findall(r"(?<![\w.])([A-Z][A-Z0-9]*(?:_[A-Z0-9]*)+)(?![\w.])", span)}
    return [f"{page.name}: {name}" for name in sorted(named - NOT_SET_HERE)
            if not re.search(r"(?<!\w)" + re.escape(name) + ("" if name.endswith("_") else r"(?!\w)"), sources)]


def test_every_setting_the_docs_name_is_one_the_code_reads():
    """`PIPELINE_HOSTS_TIMEOUT=...`, `GPU_SH_BUDGET=1200`, team-server.sh's `MLFLOW_DB`, `KERAS_BACKEND`: each
    variable a page tells the reader to set (and each constant it points into the code at, `TRAIN_CODE`) is named by
    the code."""
    sources = project_sources(ROOT)
    found = {page.name: unread_names(page, "") for page in PAGES}
    assert len(set().union(*map(set, found.values()))) > 25, found  # the parser reads the names it should
    assert not [name for page in PAGES for name in unread_names(page, sources)]


def test_the_settings_check_finds_a_name_the_code_never_reads(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("`PIPELINE_GONE=1 mlflow run .`, `$PIPELINE_KEPT`, `MLFLOW_HTTP_REQUEST_*`, `model.l2`, "
                    "`TF_XLA_FLAGS=...`\n\n```bash\nGPU_SH_OLD=1 bash bench/gpu.sh\n```\n")
    sources = 'os.environ.get("PIPELINE_KEPT")  # MLFLOW_HTTP_REQUEST_MAX_RETRIES\nGPU_SH_OLDER=${GPU_SH_OLDER:-}'
    assert unread_names(page, sources) == ["page.md: GPU_SH_OLD", "page.md: PIPELINE_GONE"]


def unknown_revisions(page: Path, root: Path = ROOT) -> list[str]:
    """The revisions `page`'s code gives a reader to run, `git show REV:path` and `python -m bench.step_graph REV ...`,
    that `root`'s git history lacks (or, for `git show`, whose file is not there at that revision)."""
    wanted = []
    for span in code_spans(page.read_text()):
        wanted += re.findall(r"git show ([0-9a-f]{7,40}:[\w./-]+)", span)
        for revisions in re.findall(r"python -m bench\.step_graph((?: +(?:[0-9a-f]{7,40}|HEAD|\.)(?![\w-]))+)", span):
            wanted += [f"{r}^{{commit}}" for r in revisions.split() if r not in ("HEAD", ".")]
    return [f"{page.name}: {ref}" for ref in wanted if subprocess.run(
        ["git", "cat-file", "-e", ref], cwd=root, capture_output=True).returncode]


def test_every_revision_the_docs_give_to_git_and_step_graph_is_in_the_history():
    """`git show cb1cf0d:bench/results/benchmark.md` (a report the commits since replaced) and the README's
    `python -m bench.step_graph 5caae06 c2e24b9 7e3ab7c HEAD`: a reader's clone must hold each revision, and the file
    at it. A mistyped hash, or a path renamed before the report was written, would answer `fatal: invalid object`."""
    assert sum("git show " in page.read_text() for page in PAGES) >= 2
    assert not [ref for page in PAGES for ref in unknown_revisions(page)]


def test_the_revision_check_finds_an_unknown_commit_and_a_file_not_at_it(tmp_path):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    page = tmp_path / "page.md"
    page.write_text(f"`git show {head}:README.md`, `git show {head}:no/such.md`, `git show 0000000:README.md`\n\n"
                    f"```bash\npython -m bench.step_graph {head} 1111111 HEAD . --name x\n```\n")
    assert unknown_revisions(page) == ["page.md: 1111111^{commit}", f"page.md: {head}:no/such.md",
                                       "page.md: 0000000:README.md"]  # the blocks' first, then the inline spans'


# Data a command names that is refused on purpose: the example of a missing path.
REFUSED_ON_PURPOSE = {"/no/such.tar.gz"}


def documented_runs(page: Path) -> list[tuple[str, dict[str, str]]]:
    """The training and sweep commands in `page`'s code, each as (entry point, {parameter: value}): `mlflow run .`'s
    `-P name=value` and `python -m pipeline.<step>`'s `--name value`, shell-quoted values unquoted. Commands with a
    placeholder (`...`, `<run id>`) and other entry points are left out."""
    text = page.read_text()
    spans = code_spans(text)
    found = []
    for span in (s.replace("\\\n", " ") for s in spans):
        for command in re.findall(r"(?:mlflow run \.|python -m pipeline\.\w+)[^\n;&|#`]*", span):
            if "..." in command or "<" in command:
                continue
            words = shlex.split(command)
            if words[0] == "mlflow":
                entry = next((words[i + 1] for i, w in enumerate(words) if w in ("-e", "--entry-point")), "main")
                given = dict(words[i + 1].partition("=")[::2] for i, w in enumerate(words) if w == "-P")
            else:
                entry = words[2].split(".")[1]
                given = {w.removeprefix("--").replace("-", "_"): v for w, v in zip(words[3::2], words[4::2],
                                                                                    strict=False)}
            if entry in ("main", "train", "prepare", "sweep"):
                found.append((entry, given))
    return found


def test_every_documented_training_and_sweep_command_passes_the_params_checks():
    """A reader copies a page's `mlflow run .` or `python -m pipeline.train` command: its params file, overrides,
    epochs and data must pass the checks made before any run opens (a params file edited so that `-P epochs=30` or an
    override no longer fits it would otherwise leave the docs showing a command that stops with exit 2), and a data
    path it names must be there, read from the checkout's root as `mlflow run` reads it. Sweep commands' specs and
    overrides build their plan of trials."""
    from pipeline import config, inputs, sweep

    commands = [(page.name, entry, given) for page in PAGES for entry, given in documented_runs(page)]
    assert {"main", "train", "sweep"} <= {entry for _, entry, _ in commands}, commands
    assert len([c for c in commands if c[0] == "README.md"]) >= 7, commands
    refused = []
    for page, entry, given in commands:
        try:
            if entry == "sweep":
                sweep.Plan(str(ROOT / given.get("spec", "params/sweep-example.yaml")), given.get("overrides", ""))
                continue
            shortcuts = {name: given.get(name, "") for name in ("epochs", "data") if entry != "prepare" or
                         name == "data"}
            params = str(ROOT / given["params"]) if given.get("params") else ""
            cfg = config.load_from_cli(params, given.get("overrides", ""), **shortcuts)
            inputs.check_known_training_images(cfg)
        except config.ConfigError as exc:
            refused.append(f"{page}: {entry} {given}: {exc}")
            continue
        source = cfg.data.source
        if source not in ("cifar10", "synthetic", *REFUSED_ON_PURPOSE) and not (ROOT / source).exists():
            refused.append(f"{page}: {entry} {given}: no {source} beside the checkout")
    assert not refused, refused


def test_the_documented_runs_are_read_with_their_entry_point_and_params(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nmlflow run . --env-manager local -P params=params/quick.yaml -P epochs=3 \\\n"
                    "  -P overrides=\"train.lr=0.1 train.seed=1\"   # a comment\n"
                    "python -m pipeline.train --params params/tiny.yaml --epochs 2\n```\n"
                    "`mlflow run . -e sweep -P spec=params/sweep-tpe.yaml`, `mlflow run . -e compare -P top=5`, "
                    "`mlflow run . -e evaluate -P model_uri=... -P dataset_uri=...`, "
                    "`KERAS_BACKEND=jax mlflow run . ...`\n")
    assert documented_runs(page) == [
        ("main", {"params": "params/quick.yaml", "epochs": "3", "overrides": "train.lr=0.1 train.seed=1"}),
        ("train", {"params": "params/tiny.yaml", "epochs": "2"}),
        ("sweep", {"spec": "params/sweep-tpe.yaml"})]


def test_the_images_the_serving_section_extracts_are_in_the_archive_it_names():
    """The Serving section's `tar -xzf ../shared/datasets/... test/cat/0338.jpg ...` names members of the JPEG copy
    beside the checkout: a renamed archive or member would leave the reader's predict command without its images."""
    import tarfile

    text = (ROOT / "README.md").read_text()
    (command,) = [c for c in re.findall(r"`(tar -xzf [^`]+)`", text) if "../shared/" in c]
    archive, *members = shlex.split(command)[2:]
    assert members and f"`{' '.join(members)}`" in text, command  # the files then passed to predict
    with tarfile.open(ROOT / archive) as tar:
        names = set(tar.getnames())
    assert not [m for m in members if m not in names], (members, archive)
