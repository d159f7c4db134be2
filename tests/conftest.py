"""Shared fixtures: a throwaway MLflow store per test. Servers: see bench.servers; quiet TensorFlow: pipeline."""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import importlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# No JAX compilation cache for the suite (set before `bench` imports `pipeline`, which turns it on in the user's cache
# folder): each test compiles what it runs, as on a fresh machine, and nothing is written outside the test folders.
# tests/test_fast_path_jax.py tests the cache in a folder of its own.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")
# No MLflow telemetry (set before anything imports mlflow): its client starts a thread at import that looks up its
# server's name, before pytest sets the PYTEST_CURRENT_TEST that turns it off; on a machine with no internet, that
# getaddrinfo crashed a worker with a segmentation fault as the worker's first test loaded TensorFlow (a fresh-clone
# suite on a 2-core Zen 4, 2026-12-07: the worker and its test lost, the rest passed).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from bench.servers import ROOT, free_port, server_run_command  # noqa: F401 - ROOT, free_port: imported from here too

JPEG = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg-q75.tar.gz"  # all of CIFAR-10 as JPEG (CI has it too)

# One TensorFlow thread per pool in every test process and the processes it starts (they inherit the
# environment): four pytest-xdist workers share two cores, and TensorFlow's default, a pool per core per
# process, spends some CPU on threads waiting for cores. Whole suite on a 2-core AMD EPYC: 38.9 CPU-minutes
# and 21.4 min with this, 39.7 and 21.9 without (one run each). A test that sets its own value keeps it.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")


# Folders a test session may write in the checkout: git's, Python's bytecode, pytest's and ruff's caches. A folder
# holding pyvenv.cfg (a virtual environment) is not looked into either.
OWN_FOLDERS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
# What a person's editor writes in the checkout while the suite runs: Vim's swap files, Emacs' locks and backups, IDEs'
# folders, Jupyter's checkpoints, macOS's folder settings.
EDITORS = (".*.sw?", ".#*", "#*#", "*~", ".idea", ".vscode", ".ipynb_checkpoints", ".DS_Store")


def checkout_paths(root: Path = ROOT) -> set[str]:
    """Every file and folder under ROOT (the checkout), relative to it, but for OWN_FOLDERS, EDITORS' files and virtual
    environments; links are listed, not followed."""
    found = set()
    for folder, dirs, files in os.walk(root, onerror=lambda exc: None):
        dirs[:] = [d for d in dirs if d not in OWN_FOLDERS and not any(fnmatch.fnmatch(d, e) for e in EDITORS)
                   and not os.path.exists(os.path.join(folder, d, "pyvenv.cfg"))]
        rel = os.path.relpath(folder, root)
        found.update(os.path.normpath(os.path.join(rel, name)) for name in dirs + files
                     if not any(fnmatch.fnmatch(name, e) for e in EDITORS))
    return found


def left_behind(before: set[str], after: set[str]) -> list[str]:
    """The paths in AFTER and not in BEFORE, a new folder's contents as the folder alone (`mlruns/`)."""
    new = after - before
    return sorted(f"{p}/" if any(q.startswith(f"{p}/") for q in new) else p
                  for p in new if os.path.dirname(p) not in new)


def litter_message(who: str, paths: list[str]) -> str:
    shown = ", ".join(paths[:10]) + (f" and {len(paths) - 10} more" if len(paths) > 10 else "")
    return (f"{who} left in the checkout {ROOT}: {shown} (a test writes in a folder of its own: tmp_path, the `store` "
            "fixture's)")


@pytest.fixture(scope="module", autouse=True)
def _checkout_left_as_it_was(request):
    """Fails a test file that leaves a file or folder in the checkout that was not there before it (what a user had
    there stays out of it). Under pytest-xdist other files run meanwhile in other workers: `pytest -n 0 FILE` tells
    whether the paths are this file's."""
    before = checkout_paths()
    yield
    new = left_behind(before, checkout_paths())
    if new:
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        also = f" (or a test file run meanwhile by another pytest-xdist worker than {worker})" if worker else ""
        pytest.fail(litter_message(f"{request.path.relative_to(ROOT)}{also}", new), pytrace=False)


def pytest_configure(config):
    config._checkout_before = checkout_paths()


def pytest_sessionfinish(session, exitstatus):
    """The whole session too, in the main process (under xdist, the controller): what a test file's check cannot see,
    a write at collection or by a process that outlived its test file."""
    if hasattr(session.config, "workerinput") or not hasattr(session.config, "_checkout_before"):
        return
    session.config._checkout_new = left_behind(session.config._checkout_before, checkout_paths())
    if session.config._checkout_new:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    if getattr(config, "_checkout_new", None):
        terminalreporter.write_sep("=", "files left in the checkout", red=True)
        terminalreporter.write_line(litter_message("the test session", config._checkout_new), red=True)


@pytest.fixture(scope="session", autouse=True)
def _checkpoints_out_of_the_checkout(tmp_path_factory):
    """Checkpoints in the session's temporary folder for the tests with no `store` (those against a module's `mlflow
    server`) and the processes they start: they trained into the checkout's checkpoints/, whose folders another
    worker's main removes, or into the user's own PIPELINE_CHECKPOINT_DIR. A test that sets its own keeps it."""
    saved = os.environ.get("PIPELINE_CHECKPOINT_DIR")
    os.environ["PIPELINE_CHECKPOINT_DIR"] = str(tmp_path_factory.mktemp("checkpoints"))
    yield
    if saved is None:
        os.environ.pop("PIPELINE_CHECKPOINT_DIR", None)
    else:
        os.environ["PIPELINE_CHECKPOINT_DIR"] = saved


@pytest.fixture(scope="session")
def empty_store_db(tmp_path_factory) -> Path:
    """A freshly created SQLite store file: MLflow's schema migrations take ~4 s, a copy ~0.1 s."""
    import mlflow

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates the tables
    return path


@pytest.fixture(scope="session")
def cifar_jpeg(tmp_path_factory):
    """The JPEG copy of CIFAR-10 beside the project, through `data.load_source`, decoded once per test session:
    the first pytest-xdist worker to ask decodes the 60,000 images (~30 CPU-s here) and leaves the arrays in
    the session's shared temporary folder; the others wait for them and load them (~1 s)."""
    from pipeline import data

    if not JPEG.exists():  # the project stands alone; CI and this machine have the copy beside it
        pytest.skip(f"{JPEG} is absent")
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = shared / "cifar10-jpeg.npz"
    with (shared / "cifar10-jpeg.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cache.exists():
            return data.load_prepared(cache)
        dataset = data.load_source(str(JPEG))
        dataset.save(shared / "cifar10-jpeg.partial.npz")
        (shared / "cifar10-jpeg.partial.npz").rename(cache)
        return dataset


def copy_store(empty_store_db: Path, path: Path) -> Path:
    """A copy at `path` of the template store `empty_store_db` whose artifacts stay out of the checkout; `path`.

    MLflow makes an experiment's artifact location of ./mlruns in the working directory of the process that creates
    it: the checkout, for the `Default` experiment of the template, a new experiment of an in-process command or of
    one started there (`mlflow run` runs its steps in the project). In the copy such a location is ./mlruns beside
    `path`: the first, at once; a new one, by a trigger, as MLflow writes it."""
    shutil.copyfile(empty_store_db, path)
    checkout, ours = ("'" + str(p).replace("'", "''") + "'" for p in (ROOT / "mlruns", path.parent / "mlruns"))
    moved = f"UPDATE experiments SET artifact_location = replace(artifact_location, {checkout}, {ours})"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(moved)
        for change in ("INSERT", "UPDATE OF artifact_location"):
            db.execute(f"CREATE TRIGGER \"out of the checkout on {change}\" AFTER {change} ON experiments "
                       f"WHEN instr(NEW.artifact_location, {checkout}) "
                       f"BEGIN {moved} WHERE experiment_id = NEW.experiment_id; END")
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store_db):
    """An empty SQLite tracking store + registry with artifacts under tmp_path.

    Yields the environment for subprocesses (MLFLOW_TRACKING_URI set) with an experiment
    `e2e` whose artifacts live in tmp_path too.
    """
    import mlflow

    copy_store(empty_store_db, tmp_path / "mlflow.db")
    # MLflow's active experiment is process-wide: one an in-process command of an earlier test set belongs to that
    # test's store, and starting a run by id under it fails ("active experiment ID does not match")
    mlflow.tracking.fluent._active_experiment_id = None
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("e2e", artifact_location=str(tmp_path / "artifacts"))
    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    env.pop("MLFLOW_RUN_ID", None)
    yield env
    mlflow.set_tracking_uri(None)
    mlflow.tracking.fluent._active_experiment_id = None


def mlflow_run(env: dict, entry_point: str = "main", **params: str) -> subprocess.CompletedProcess:
    """`mlflow run <project> -e ENTRY --env-manager local --experiment-name e2e -P k=v ...`."""
    cmd, _ = server_run_command("", "e2e", entry_point, params)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@contextlib.contextmanager
def http_stub(answer: Callable) -> Iterator[str]:
    """A quiet local HTTP server whose every GET and POST is `answer(handler)` (an `http.server.BaseHTTPRequestHandler`:
    it sends the response); yields its address, `http://127.0.0.1:PORT`, and shuts it down after."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            answer(self)

        do_POST = do_GET  # noqa: N815 - http.server's name

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    # shutdown() waits for serve_forever's next poll: 0.5 s by default, as long as most tests using the stub
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_module(env: dict, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(autouse=True)
def _sys_path_as_it_was():
    """Undo what a test adds to `sys.path`: loading a logged model (`mlflow.pyfunc.load_model`) puts its `code/`
    copy of `pipeline` first there, and processes this one spawns (`multiprocessing`) would import that copy."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


@pytest.fixture
def in_process(monkeypatch, capsys):
    """`python -m pipeline.<module> ARGS...` run in this test process, as a `subprocess.CompletedProcess`
    (exit code, stdout, stderr); `env` is set for the rest of the test. For commands whose process is
    not what a test is about: no TensorFlow import (~13 CPU-s here) or MLflow start-up per command."""
    from pipeline.tracking import cli

    def run(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "argv", [f"pipeline.{module}", *args])
        capsys.readouterr()
        code, path = 0, list(sys.path)
        try:
            cli(importlib.import_module(f"pipeline.{module}").main, resumable=module in ("main", "train"))
        except SystemExit as exc:  # how cli() reports a failure
            code = exc.code
        finally:
            sys.path[:] = path  # as a process of its own would leave it (see _sys_path_as_it_was)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([module, *args], code, out, err)

    return run


@contextlib.contextmanager
def stopping_signals_raise():
    """SIGTERM and SIGINT raise `Interrupted` meanwhile, as in a step's process (`pipeline.tracking.cli`)."""
    from pipeline import tracking

    previous = {signum: signal.signal(signum, tracking._raise_interrupted) for signum in (signal.SIGTERM,
                                                                                          signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def eventually(check, timeout: float = 300):
    """Poll `check()` until it returns something truthy (returned) or `timeout` s pass (AssertionError).

    For what `mlflow run` settles after it exits: a step's final status on its run is written by a
    detached process once `mlflow run` is gone (see pipeline.tracking._settle_wrapper_run). That process
    imports MLflow first (~4 CPU-s, several times that in wall time on a loaded CI machine): the timeout
    only tells a status never written from one written late."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check.__doc__ or check}")
        time.sleep(0.5)
    return result


class Host:
    """A host process started by `Launcher`, read as a `subprocess.Popen` with stdout and stderr piped (to files)."""

    def __init__(self, proc: subprocess.Popen, folder: Path):
        self.proc, self.pid, self.folder = proc, proc.pid, folder

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise subprocess.TimeoutExpired(f"host {self.pid}", timeout) from None

    @property
    def stderr(self):
        """Its stderr so far, as a file to read."""
        return (self.folder / "err").open()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return (self.folder / "out").read_text(), (self.folder / "err").read_text()


class Launcher:
    """Starts host processes: each a fresh `python -c CODE`, as a host started on its own is (its environment, working
    folder first on its path, then its PYTHONPATH's). Forking them from one process that had imported TensorFlow,
    Keras and MLflow saved ~8 CPU-s a host, but a host forked so crashed with SIGSEGV on CI (that process's threads:
    OpenBLAS's, pyarrow's jemalloc's, TensorFlow's own, do not survive a fork)."""

    def __init__(self, folder: Path):
        self.folder, self.count, self.hosts = folder, 0, []

    def start(self, env: dict, code: str, cwd: Path = ROOT) -> Host:
        """A host running CODE (as `python -c CODE`) in CWD with environment ENV."""
        self.count += 1
        folder = self.folder / f"host{self.count}"
        folder.mkdir()
        with (folder / "out").open("w") as out, (folder / "err").open("w") as err:
            proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err)
        self.hosts.append(proc)
        return Host(proc, folder)

    def close(self) -> None:
        for proc in self.hosts:  # no host outlives its tests
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("hosts"))
    yield launcher
    launcher.close()


def module_code(module: str, args: list[str], prelude: str = "") -> str:
    """Python code that runs PRELUDE, then `python -m MODULE ARGS...`."""
    return (f"import sys\nsys.argv = {[module, *args]!r}\n{prelude}\nimport runpy\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")


# Test files in the order pytest-xdist (`--dist loadfile --no-loadscope-reorder`, pyproject) hands them out, whole
# files at a time: each worker first gets one of the four longest, then one of the next four, shortest of those to
# the worker with the longest (so the first two files of every worker add up to about the same), then the rest go
# to whichever worker is free. Estimated from the CPU seconds of each file in a whole-suite run on a 2-core AMD EPYC
# (Zen 3, four workers, 2026-12-06) less the cuts made after it, and the CPU seconds of single files alone (-n 0) on a
# 2-core Zen 2 (2026-12-07): test_fault_tolerance 224 (298 before that day's cuts; 239 in a later, busier run, before
# its background mains were forked: -6), test_failures 168 (175 in that later run, before its three mains were forked:
# -15), test_gpu_check 131, test_pipeline_e2e 141 (161 before its one-stage trainings), test_fast_path_jax 133 (~166
# before its one-stage trainings), test_fast_path ~125 (~140 before), test_recipes 74, test_readme 60, test_cpu_probe
# 58; files not listed follow in name order, small enough to fill the ends.
LONGEST_FIRST = ["test_fault_tolerance.py", "test_sweep.py", "test_failures.py", "test_fast_path.py",
                 "test_gpu_check.py", "test_pipeline_e2e.py", "test_learning.py", "test_fast_path_jax.py",
                 "test_compare.py", "test_team_server.py", "test_recipes.py", "test_readme.py", "test_serve.py",
                 "test_cpu_probe.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
