"""A checkpoint folder several Unix users share (a team's NFS path in `PIPELINE_CHECKPOINT_DIR`), and one tracking
server under several spellings: another user's locks are never taken for dead ones nor fail a step, a folder this
user may not write is one line before any run opens, and each store's stale locks are its mains' whatever its URI's
spelling. The tests run as root (CI does) and become user `nobody` in a forked child for the other user's side."""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline import config
from tests.conftest import ROOT, copy_store

NOBODY = pwd.getpwnam("nobody")
DATASET = "runs:/0123abcd/dataset/dataset.npz"


def as_nobody(work: Callable[[], object]) -> tuple[int, str]:
    """Run `work` in a forked child of this process that has become user `nobody` (no exec: the interpreter may lie
    where `nobody` may not read it); (its exit status, what it printed). A traceback in it is exit 1, printed."""
    assert os.geteuid() == 0, "the test becomes another user: run it as root (CI does)"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(read)
            sys.stdout = sys.stderr = os.fdopen(write, "w")
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            work()
            code = 0
        except SystemExit as exc:  # how `cli` ends a failed step
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - the parent reads it
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as output:
        printed = output.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), printed


@pytest.fixture
def shared(monkeypatch, empty_store_db):
    """A folder every user may reach (pytest's tmp_path is root's alone): a SQLite store all may write, under
    `store/` and under another spelling `link/` (a child's store then opens its own connections), and the checkpoint
    folder `checkpoints/`, root's (0755). Experiment `e2e`."""
    folder = Path(tempfile.mkdtemp(prefix="pipeline-shared-"))
    try:
        folder.chmod(0o755)
        (folder / "store").mkdir()
        (folder / "store").chmod(0o777)
        copy_store(empty_store_db, folder / "store" / "mlflow.db")
        (folder / "store" / "mlflow.db").chmod(0o666)
        (folder / "link").symlink_to(folder / "store")
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints").chmod(0o755)
        uri = f"sqlite:///{folder / 'store' / 'mlflow.db'}"
        mlflow.tracking.fluent._active_experiment_id = None
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(folder / "checkpoints"))
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment("e2e", artifact_location=str(folder / "artifacts"))
        yield folder
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.tracking.fluent._active_experiment_id = None
        shutil.rmtree(folder, ignore_errors=True)


def as_killed(step: str, tags: dict[str, str] | None = None) -> str:
    """A run of `step` left RUNNING, as a kill leaves it; its id."""
    experiment_id = mlflow.get_experiment_by_name("e2e").experiment_id
    run_id = mlflow.start_run(experiment_id=experiment_id, tags={"step": step, **(tags or {})}).info.run_id
    mlflow.end_run("RUNNING")
    return run_id


def dead_lock(run_id: str) -> Path:
    """The lock folder of run `run_id` as its process, killed, left it (made by this process); the folder."""
    from pipeline.tracking import resume

    assert resume.claim(run_id)
    resume._claimed.pop(run_id).close()  # its process gone
    return resume.checkpoint_dir(run_id)


def statuses(*run_ids: str) -> list[tuple[str, str | None]]:
    runs = [MlflowClient().get_run(r) for r in run_ids]
    return [(r.info.status, r.data.tags.get("ended_by")) for r in runs]


def in_the_child(shared: Path) -> None:
    """What a child that became another user does first: its store through its own connections (`link/`)."""
    mlflow.set_tracking_uri(f"sqlite:///{shared / 'link' / 'mlflow.db'}")


def test_another_users_locks_are_left_alone_unless_told_dead_and_never_fail_a_main(shared):
    """Root's lock folders (0755, lock files 0644, as its umask made them) in the folder `nobody` shares: a main of
    `nobody` died on a PermissionError traceback in `remove_stale_locks` (the lock file opened for writing, a folder
    listed, a temporary file read), and resuming root's checkpoint did too. Now a lock `nobody` can inspect (read and
    flock) and finds free is a dead main's: its run ends KILLED, its folder stays (not `nobody`'s to remove) for
    root's next main to remove; one held, or that `nobody` may not read or list, is left alone, its run RUNNING; a
    checkpoint `nobody` may not write is not continued (a note; its dead run ends KILLED, the checkpoint stays), and
    resuming it by id is one line."""
    from pipeline.tracking import resume

    cfg = config.load(ROOT / "params" / "tiny.yaml")
    dead = as_killed("main")
    live = as_killed("main")
    hidden_lock, hidden_folder, hidden_temporary = as_killed("main"), as_killed("main"), as_killed("main")
    trained = as_killed("train", {"train_key": resume.train_key(cfg, DATASET)})
    for run_id in (dead, live, hidden_lock, hidden_folder, trained):
        dead_lock(run_id)
    (resume.checkpoint_dir(trained) / "training_metadata.json").write_text("{}")  # a checkpoint (has_checkpoint)
    (resume.checkpoint_dir(hidden_lock) / resume.LOCK_FILE).chmod(0o600)
    resume.checkpoint_dir(hidden_folder).chmod(0o700)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    temporary = resume.checkpoint_dir(hidden_temporary) / f".{resume.LOCK_FILE}.{gone.stdout.strip()}"
    temporary.parent.mkdir()
    temporary.write_text(resume._store())  # a main killed in `_new_lock`, its process gone
    temporary.chmod(0o600)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
                               str(resume.checkpoint_dir(live) / resume.LOCK_FILE)], stdout=subprocess.PIPE, text=True)

    def nobodys_main() -> None:
        in_the_child(shared)
        with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("e2e").experiment_id,
                              tags={"step": "main"}) as main:
            print(f"main {main.info.run_id}")
            resume.remove_stale_locks()
            print(f"resumable {resume.newest_resumable(cfg, DATASET)}")
            try:
                resume.find_resumable(cfg, DATASET, trained)
            except config.ConfigError as exc:
                print(f"error: {exc}")

    try:
        assert holder.stdout.readline() == "held\n"
        code, printed = as_nobody(nobodys_main)
        assert code == 0, printed
        lines = printed.splitlines()
        assert lines[0].startswith("main ") and lines[-2:-1] == ["resumable None"], printed
        main = lines[0].split()[1]
        assert lines[1:-2] == [f"note: train run {trained} left a checkpoint in {resume.checkpoint_dir(trained)}, "
                               f"which user nobody may not write; not continued here (-P resume={trained} as its "
                               f"user goes on with it)"]
        assert lines[-1] == (f"error: resume: run {trained}'s checkpoint folder {resume.checkpoint_dir(trained)} "
                             f"belongs to user root, and user nobody may not write it; resume there as that user, "
                             f"or resume=never to start afresh")
        assert statuses(dead, live, hidden_lock, hidden_folder, hidden_temporary, trained) == [
            ("KILLED", main), *[("RUNNING", None)] * 4, ("KILLED", main)]  # its checkpoint stays, root's to resume
        assert sorted(p.name for p in resume.checkpoint_root().iterdir()) == sorted(
            [dead, live, hidden_lock, hidden_folder, hidden_temporary, trained])
        with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("e2e").experiment_id,
                              tags={"step": "main"}) as roots:  # the folders' owner: dead ones are its to remove
            resume.remove_stale_locks()
    finally:
        holder.kill()
        holder.wait()
    assert statuses(dead, live, hidden_lock, hidden_folder, hidden_temporary) == [
        ("KILLED", main), ("RUNNING", None), *[("KILLED", roots.info.run_id)] * 3]
    assert sorted(p.name for p in resume.checkpoint_root().iterdir()) == sorted([live, trained])


@pytest.mark.parametrize("missing", [False, True], ids=["roots", "missing-in-roots"])
def test_a_checkpoint_folder_this_user_may_not_write_is_one_line_before_any_run_opens(shared, monkeypatch, missing):
    """`main` as `nobody` with root's checkpoint folder (0755), or one still to be made in a folder of root's: its
    main run opened, then making its lock there died on a PermissionError traceback (exit 1, the run FAILED).
    Refused with one line, exit 2, before any run opens."""
    from pipeline import main
    from pipeline.tracking import cli

    for name in ("MLproject", "params/default.yaml", "params/tiny.yaml"):  # the project may be root's alone
        shutil.copyfile(ROOT / name, shared / Path(name).name)
    monkeypatch.setattr(config, "MLPROJECT", shared / "MLproject")
    monkeypatch.setattr(config, "DEFAULT_PARAMS", shared / "default.yaml")
    monkeypatch.setattr(sys, "argv", ["pipeline.main", "--params", str(shared / "tiny.yaml"), "--overrides",
                                      "tracking.experiment=e2e"])

    def nobodys_main() -> None:
        in_the_child(shared)
        os.environ["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
        cli(main.main, resumable=True)

    root = shared / "checkpoints"
    if missing:
        monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(root / "team" / "ours"))
    code, printed = as_nobody(nobodys_main)
    denied = f"Permission denied (to make it in {root})" if missing else "Permission denied"
    assert (code, printed) == (2, f"error: PIPELINE_CHECKPOINT_DIR: cannot write the checkpoint folder "
                                  f"{root / 'team' / 'ours' if missing else root} as user nobody: {denied}; give "
                                  f"this user write access to it (a folder shared by a team: group-writable, chmod "
                                  f"g+ws, each user's umask 002) or set PIPELINE_CHECKPOINT_DIR to a folder of this "
                                  f"user's\n")
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert list(root.iterdir()) == []


def test_a_group_writable_shared_folder_lets_each_user_end_and_resume_the_others_runs(shared):
    """The shared setup the README gives: the checkpoint folder group-owned and setgid (chmod g+ws), each user's
    umask 002. Root's run folders and lock files are then group-writable in that group, and `nobody`, a member, ends
    root's dead main and removes its folder, and continues root's checkpoint."""
    from pipeline.tracking import resume

    root = resume.checkpoint_root()
    os.chown(root, 0, NOBODY.pw_gid)
    root.chmod(0o2775)
    cfg = config.load(ROOT / "params" / "tiny.yaml")
    umask = os.umask(0o002)
    try:
        dead, trained = as_killed("main"), as_killed("train", {"train_key": resume.train_key(cfg, DATASET)})
        for run_id in (dead, trained):
            folder = dead_lock(run_id)
        (folder / "training_metadata.json").write_text("{}")
    finally:
        os.umask(umask)
    made = [resume.checkpoint_dir(dead), resume.checkpoint_dir(dead) / resume.LOCK_FILE]
    assert [(stat.S_IMODE(p.stat().st_mode), p.stat().st_gid) for p in made] == [
        (0o2775, NOBODY.pw_gid), (0o664, NOBODY.pw_gid)]

    def nobodys_main() -> None:
        in_the_child(shared)
        with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("e2e").experiment_id,
                              tags={"step": "main"}) as main:
            print(main.info.run_id)
            resume.remove_stale_locks()
            print(resume.newest_resumable(cfg, DATASET))
            with open(resume.checkpoint_dir(trained) / resume.LOCK_FILE) as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print("held")

    code, printed = as_nobody(nobodys_main)
    assert code == 0, printed
    main, resumed, held = printed.split()
    assert (resumed, held) == (trained, "held")
    assert statuses(dead) == [("KILLED", main)]
    assert [p.name for p in root.iterdir()] == [trained]


def test_a_checkpoint_folder_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    from pipeline.tracking import resume

    (tmp_path / "file").touch()
    for root in (tmp_path / "file", tmp_path / "file" / "below"):
        monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(root))
        user = pwd.getpwuid(os.geteuid()).pw_name
        with pytest.raises(config.ConfigError, match=rf"^PIPELINE_CHECKPOINT_DIR: cannot write the checkpoint "
                                                     rf"folder {root} as user {user}: Not a directory; "):
            resume.check_checkpoint_root()
    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path / "to" / "be" / "made"))
    resume.check_checkpoint_root()  # made once a run needs it
    assert not (tmp_path / "to").exists()


@pytest.mark.parametrize("module", ["main", "train", "sweep"])
def test_every_entry_point_that_trains_checks_its_checkpoint_folder_before_any_run(store, tmp_path, in_process,
                                                                                 module):
    (tmp_path / "file").touch()
    args = ["--spec", "params/sweep-example.yaml"] if module == "sweep" else ["--params", "params/tiny.yaml"]
    done = in_process(module, *args, env={"PIPELINE_CHECKPOINT_DIR": str(tmp_path / "file")})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: PIPELINE_CHECKPOINT_DIR: cannot write the checkpoint folder {tmp_path / 'file'} as user ")
    client = MlflowClient()
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_worker_of_a_cluster_checks_its_checkpoint_folder_before_it_meets_the_others(store, tmp_path, in_process):
    """Worker 1 of the README's two hosts, with a checkpoint folder it cannot write: it met the chief, trained an
    epoch, then failed saving it on a NotADirectoryError traceback, and the chief said it had stopped answering and
    to rerun every host's command, which failed the same way. Refused with one line, exit 2, before it waits for
    anyone."""
    import json

    from bench.servers import free_port

    (tmp_path / "file").touch()
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    done = in_process("train", "--params", "params/tiny.yaml", env={
        "PIPELINE_CHECKPOINT_DIR": str(tmp_path / "file"), "PIPELINE_HOSTS_TIMEOUT": "1",
        "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: PIPELINE_CHECKPOINT_DIR: cannot write the checkpoint folder {tmp_path / 'file'} as user ")
    assert "waiting for" not in done.stdout


@pytest.mark.parametrize("resume", ["0123456789abcdef0123456789abcdef", "nevr"])
def test_a_worker_started_with_a_run_to_resume_is_told_the_chief_picks_the_run(store, tmp_path, in_process, resume):
    """Worker 1 given the chief's `--resume <run id>` (or a misspelt never) ignored it: it went on from whatever its
    checkpoint held, under a run it never reads. Only '' and never mean something on a worker: anything else is
    refused with one line, exit 2, before it waits for anyone."""
    import json

    from bench.servers import free_port

    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    done = in_process("train", "--params", "params/tiny.yaml", "--resume", resume, env={
        "PIPELINE_CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "PIPELINE_HOSTS_TIMEOUT": "1",
        "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: resume: {resume!r} on worker 1, which reads no MLflow run: the chief's -P resume picks the run, and "
        f"this host goes on from its own checkpoint. Start it with --resume '' (the default), or --resume never to "
        f"start afresh as the chief does with -P resume=never")
    assert "waiting for" not in done.stdout


@pytest.mark.parametrize(("spellings", "one"), [
    (["http://localhost:5000", "http://127.0.0.1:5000/", "HTTP://LocalHost:5000", "http://[::1]:5000",
      "http://[0:0:0:0:0:0:0:1]:5000/", "http://alice:s3cret@localhost:5000", "http://localhost.:5000"], True),
    (["https://mlflow.example.com", "https://MLflow.Example.COM:443/", "https://bob@mlflow.example.com/"], True),
    (["http://team-host:80/mlflow/", "http://team-host/mlflow"], True),
    (["postgresql://mlflow:s3/cret@DB:5432/mlflow", "postgresql://other@db/mlflow"], True),
    (["postgresql+psycopg2://db/mlflow", "postgresql+psycopg2://db:5432/mlflow"], True),
    (["http://localhost:5000", "http://localhost:5001"], False),
    (["http://localhost:5000", "https://localhost:5000"], False),
    (["http://team-host:5000", "http://127.0.0.1:5000"], False),  # no name is looked up
    (["http://127.0.0.2:5000", "http://127.0.0.1:5000"], False),
    (["http://team-host:5000/a", "http://team-host:5000/b"], False),
    (["postgresql://db/mlflow", "postgresql://db/other"], False),
    (["file:///tmp/d%C3%ADr%20x/mlruns", "/tmp/dír x/mlruns", "file:///tmp/dír x/mlruns/"], True),
    (["file:///tmp/a%2520b/mlruns", "/tmp/a b/mlruns"], False),  # the folder `a%20b`, not `a b`
], ids=["loopback", "https-default-port", "http-default-port-path", "postgresql", "postgresql-driver", "ports",
        "schemes", "names", "other-loopback-address", "paths", "databases", "folder-quoted", "folder-percent"])
def test_one_tracking_server_under_any_spelling_is_one_store(spellings, one):
    """Two spellings of one server (`http://localhost:5000` and `http://127.0.0.1:5000/`) counted as two stores, so a
    main of one spelling left the other's dead mains RUNNING for good. Spelled one way, without a name lookup (that
    could hang); no password, nor any user part, in what the lock file records. A lock file an older version wrote
    (`user:***@`, a trailing slash) is read the same way."""
    from pipeline.tracking import resume

    try:
        stores = set()
        for uri in spellings:
            mlflow.set_tracking_uri(uri)
            stores.add(resume._store())
            assert "s3" not in resume._store() and "@" not in resume._store()
    finally:
        mlflow.set_tracking_uri(None)
    assert (len(stores) == 1) is one, stores


def test_a_lock_file_of_an_older_spelling_names_the_same_store(tmp_path, monkeypatch):
    from pipeline.tracking import resume

    monkeypatch.setenv("PIPELINE_CHECKPOINT_DIR", str(tmp_path))
    (tmp_path / "abc").mkdir()
    (tmp_path / "abc" / resume.LOCK_FILE).write_text("http://alice:***@LOCALHOST:5000/")
    try:
        mlflow.set_tracking_uri("http://127.0.0.1:5000")
        assert resume._store_of(tmp_path / "abc") == resume._store() == "http://localhost:5000"
    finally:
        mlflow.set_tracking_uri(None)
