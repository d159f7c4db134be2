"""Where MLflow is used: the tracking layer and the served model import it; the steps and the Keras side do not."""

from __future__ import annotations

import ast
import json

from tests.conftest import ROOT

PIPELINE = ROOT / "pipeline"
MAY_IMPORT_MLFLOW = {"serve.py"}  # besides tracking/: the served pyfunc model is an MLflow class


def imports_mlflow(path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mlflow" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            return True
    return False


def test_only_the_tracking_layer_and_serve_import_mlflow():
    found = {str(p.relative_to(PIPELINE)) for p in PIPELINE.rglob("*.py") if imports_mlflow(p)}
    outside = sorted(p for p in found if not p.startswith("tracking/") and p not in MAY_IMPORT_MLFLOW)
    assert outside == [], f"MLflow imported outside pipeline/tracking/: {outside}"
    assert "tracking/__init__.py" in found  # the check does see imports


def test_steps_and_the_keras_side_never_import_mlflow():
    for name in ("prepare", "train", "evaluate", "register", "main", "compare", "sweep",
                 "fitting", "model", "augment", "data", "config", "distribute", "predict", "inputs"):
        assert not imports_mlflow(PIPELINE / f"{name}.py"), name


def pins(lines) -> list[str]:
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_every_requirements_file_pins_the_same_packages():
    """conda.yaml's pip list is requirements.txt; requirements-gpu.txt is too, with TensorFlow's CUDA build and
    the GPU metrics bindings added (it once lacked optuna, tabulate and psycopg2: sweeps and compare failed)."""
    import yaml

    cpu = pins((ROOT / "requirements.txt").read_text().splitlines())
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())["dependencies"]
    assert next(d["pip"] for d in conda if isinstance(d, dict)) == cpu
    gpu = pins((ROOT / "requirements-gpu.txt").read_text().splitlines())
    assert gpu == [p.replace("tensorflow==", "tensorflow[and-cuda]==") for p in cpu] + ["nvidia-ml-py==13.615.71"]


def test_every_command_lines_help_opens_with_its_docstrings_whole_first_paragraph():
    """`python -m bench.multi_gpu --help` opened on half a sentence, "... and whether XLA pays under": the
    description was the docstring's first line, not its first paragraph."""
    import re
    import subprocess
    import sys

    modules = [p for p in [*(ROOT / "bench").glob("*.py"), *PIPELINE.glob("*.py")]
               if "description=__doc__" in p.read_text()]
    assert len(modules) >= 10
    for path in modules:
        first = ast.get_docstring(ast.parse(path.read_text())).split("\n\n")[0]
        if "\n" not in first:
            continue  # one line: nothing to cut
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        shown = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                               timeout=120)
        assert shown.returncode == 0, (module, shown.stderr[-2000:])
        assert " ".join(first.split()) in re.sub(r"\s+", " ", shown.stdout), (module, shown.stdout[:600])


def test_an_editors_lock_or_checkpoint_file_in_the_package_is_not_part_of_its_source(tmp_path):
    """Emacs marks a file it edits with a lock, `.#config.py`, a link to nowhere; Jupyter keeps copies in
    `.ipynb_checkpoints/`. Neither is a module of the package: reading the package's source (`pipeline.source`, at its
    first import) read the lock and failed, FileNotFoundError, so every command failed while a file was being edited,
    and it copied the checkpoints into each model's code. In a process of its own, on a copy of pipeline/."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(PIPELINE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pipeline" / ".#config.py").symlink_to("someone@host.4242:1700000000")
    (tmp_path / "pipeline" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "pipeline" / ".ipynb_checkpoints" / "config-checkpoint.py").write_text("X = 1\n")
    script = "import json, pipeline; print(json.dumps(sorted(pipeline.source.FILES)))"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    modules = sorted(p.relative_to(PIPELINE).as_posix() for p in PIPELINE.rglob("*.py"))
    assert json.loads(result.stdout) == modules


def entry_point_reads(source: str) -> tuple[set[str], set[str]]:
    """The `args.<name>` a module reads (not `args.get(...)`, a method of a dict so named), and the options it adds to
    its parser itself (`parser.add_argument("--join", ...)`), as their argparse names."""
    tree = ast.parse(source)
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    reads = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and id(node) not in called
             and isinstance(node.value, ast.Name) and node.value.id == "args"}
    added = {node.args[0].value.lstrip("-").replace("-", "_") for node in ast.walk(tree)
             if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args
             and isinstance(node.args[0], ast.Constant)}
    return reads, added


def test_every_entry_points_parameters_are_the_ones_its_module_reads():
    """A parameter MLproject declares and the step never reads (renamed in the code, left in MLproject) would take
    `-P name=...` and do nothing; one the step reads that MLproject lacks fails as an AttributeError traceback."""
    import yaml

    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    for name, spec in entry_points.items():
        reads, added = entry_point_reads((PIPELINE / f"{name}.py").read_text())
        declared = set(spec["parameters"])
        assert reads - added == declared, (name, "read, not declared:", reads - added - declared,
                                           "declared, never read:", declared - reads)


def test_the_parameters_check_finds_a_dead_and_an_undeclared_parameter():
    reads, added = entry_point_reads("def main():\n    parser.add_argument('--join', action='store_true')\n"
                                     "    args = parser.parse_args()\n    run(args.spec, args.join, args.get('x'))\n")
    assert (reads, added) == ({"spec", "join"}, {"join"})
