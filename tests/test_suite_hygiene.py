"""The suite leaves nothing in the checkout: a test's stores, artifacts and checkpoints are in folders of its own."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from tests.conftest import ROOT, checkout_paths, left_behind, litter_message


def test_a_run_in_the_stores_default_experiment_keeps_its_artifacts_in_the_tests_folder(store, tmp_path):
    """A command recording into MLflow's `Default` experiment (no --experiment, no MLFLOW_EXPERIMENT_NAME) wrote its
    artifacts to the checkout's ./mlruns/0: the store's template was made with the checkout as working directory."""
    import mlflow

    with mlflow.start_run(experiment_id="0") as run:
        mlflow.log_text("x", "note.txt")
    location = Path(urllib.parse.urlparse(run.info.artifact_uri).path)
    assert location.is_relative_to(tmp_path), location
    assert (location / "note.txt").read_text() == "x"


def test_a_run_in_an_experiment_a_command_creates_in_the_store_keeps_its_artifacts_in_the_tests_folder(store, tmp_path):
    """A sweep or a main into a new experiment (params' cifar10-resnet, a sweep's own) made its artifact location
    the checkout's ./mlruns/<id>: MLflow takes ./mlruns from the working directory of the process that creates it, the
    checkout for in-process commands and those started there (`mlflow run` runs its steps in the project)."""
    import mlflow

    mlflow.set_experiment("cifar10-resnet")
    with mlflow.start_run() as run:
        mlflow.log_text("x", "note.txt")
    location = Path(urllib.parse.urlparse(run.info.artifact_uri).path)
    assert location.is_relative_to(tmp_path), location
    assert (location / "note.txt").read_text() == "x"


def test_a_training_outside_the_store_fixture_keeps_its_checkpoints_out_of_the_checkout():
    """A test with no `store` (one against a module's `mlflow server`) trained into the checkout's checkpoints/."""
    from pipeline.tracking import resume

    assert not resume.checkpoint_root().resolve().is_relative_to(ROOT.resolve()), resume.checkpoint_root()


def test_the_checkout_check_names_what_is_new_and_not_what_was_there(tmp_path):
    (tmp_path / "mlruns" / "0" / "a").mkdir(parents=True)  # a user's own runs
    (tmp_path / "runs.md").touch()
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "pyvenv.cfg").touch()
    (tmp_path / "tests").mkdir()
    before = checkout_paths(tmp_path)
    (tmp_path / "mlruns" / "0" / "b" / "artifacts").mkdir(parents=True)
    (tmp_path / "mlruns" / "0" / "b" / "artifacts" / "model.txt").touch()
    (tmp_path / "runs.md").write_text("rewritten")  # was there: not new
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "tests" / "__pycache__").mkdir(parents=True)  # Python's own
    (tmp_path / "env" / "lib").mkdir()  # inside a virtual environment
    new = left_behind(before, checkout_paths(tmp_path))
    assert new == ["checkpoints", "mlruns/0/b/"]
    assert litter_message("tests/test_x.py", new).startswith(f"tests/test_x.py left in the checkout {ROOT}: "
                                                             "checkpoints, mlruns/0/b/ (")


def test_the_checkout_check_leaves_out_what_an_editor_writes_meanwhile(tmp_path):
    """A person editing in the checkout while the suite runs (its ~20 min) is no test's doing: Vim's swap file, Emacs'
    lock and backup, an IDE's folder, Jupyter's checkpoints, macOS's folder settings."""
    (tmp_path / "pipeline").mkdir()
    before = checkout_paths(tmp_path)
    (tmp_path / "pipeline" / ".config.py.swp").touch()
    (tmp_path / "pipeline" / ".#config.py").symlink_to("someone@host.4242:1700000000")
    (tmp_path / "README.md~").touch()
    (tmp_path / "#README.md#").touch()
    for folder in (".idea", ".vscode", ".ipynb_checkpoints"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x").touch()
    (tmp_path / ".DS_Store").touch()
    (tmp_path / "pipeline" / "runs.md").touch()
    assert left_behind(before, checkout_paths(tmp_path)) == ["pipeline/runs.md"]


def test_free_port_never_gives_one_port_twice(monkeypatch):
    """`free_port(), free_port()` gave the two hosts of a test cluster one address where the OS handed the port it had
    just freed out again (CI, 2026-12-08: "every task needs an address of its own, got localhost:40625 more than
    once"). A port this process was given is never given again."""
    from bench import servers

    offered = iter([40625, 40625, 40625, 40626])

    class Socket:  # the OS as it answered: the same free port, twice and more
        def __init__(self):
            self.port = next(offered)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(servers, "_handed_out", set())
    monkeypatch.setattr(servers.socket, "socket", Socket)
    assert [servers.free_port(), servers.free_port()] == [40625, 40626]
