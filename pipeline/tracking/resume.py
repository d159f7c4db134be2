"""Resuming training runs: checkpoints, which run a command continues, and what it may change.

A train run's completed epochs are checkpointed in `checkpoint_dir(run_id)` (Keras BackupAndRestore)
until it finishes. The process training a run holds an OS lock in that folder (`claim`), so a live
run is never taken over. `find_resumable` picks the run a command continues (the same `train_key`:
every param that decides what is trained, and the dataset); `config_to_resume` checks a command against the
run it names, whose `train.epochs` may grow (`log_train_params` records the extension, as MLflow params are
immutable), as may the params that do not change what is trained (`NOT_TRAINING`); what each machine resolves for
itself (the backend, `auto` precision and XLA) goes on as the run recorded it (`recorded_training`). A checkpoint
folder several users share: the folder must be this user's to write (`check_checkpoint_root`, before any run opens),
and another user's lock this process cannot inspect is never taken for a dead process's (`_locked`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import json
import os
import pwd
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.file_utils import local_file_uri_to_path
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from pipeline import config, data
from pipeline.distribute import LOOPBACK
from pipeline.tracking import (
    DATASET_SHA256,
    _without_password,
    checkpoint_root,
    code_digest,
    json_digest,
    local_path,
    shortened,
    sqlite_file,
    steps,
    trained_dataset_uri,
    unfinished_runs,
    written_despite_a_race,
)

# Held (flock) by the process training a run, in the run's checkpoint folder: a live run is never resumed. It holds
# the tracking store of the process that made it (`_store`).
LOCK_FILE = "training.lock"
# Seconds after which a `_new_lock` temporary file or an empty folder is no live process's (each lasts microseconds)
LEFT_S = 10


def checkpoint_dir(run_id: str) -> Path:
    return checkpoint_root() / run_id


def check_checkpoint_root() -> None:
    """ConfigError unless this process may make run folders in `checkpoint_root` (or make it, where it is missing:
    as `mkdir -p` would, with the umask, once a run needs it): checked before any run opens, as each run's lock lives
    there. A folder several users share is theirs to make group-writable (docs/team.md)."""
    root = checkpoint_root()
    try:
        if root.is_dir():
            with tempfile.TemporaryFile(dir=root):  # unnamed where the file system can (O_TMPFILE): no main sees it
                pass
        else:
            above = next(p for p in root.absolute().parents if p.exists())
            if root.exists() or not above.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            if not writable(above):
                raise PermissionError(errno.EACCES, f"{os.strerror(errno.EACCES)} (to make it in {above})")
    except OSError as exc:
        raise config.ConfigError(
            f"PIPELINE_CHECKPOINT_DIR: cannot write the checkpoint folder {root} as user {_user(os.geteuid())}: "
            f"{exc.strerror or exc}; give this user write access to it (a folder shared by a team: group-writable, "
            f"chmod g+ws, each user's umask 002) or set PIPELINE_CHECKPOINT_DIR to a folder of this user's") from None


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _check_writable_checkpoint(run_id: str) -> None:
    """ConfigError if run `run_id`'s checkpoint folder is another user's, which this process may not write (`claim`
    takes no such run: its next checkpoints could not be saved)."""
    folder = checkpoint_dir(run_id)
    if folder.is_dir() and not writable(folder):
        raise config.ConfigError(f"resume: run {run_id}'s checkpoint folder {folder} belongs to user "
                                 f"{_user(folder.stat().st_uid)}, and user {_user(os.geteuid())} may not write it; "
                                 f"resume there as that user, or resume=never to start afresh")


_claimed: dict[str, object] = {}  # run id -> the open lock file this process holds


def claim(run_id: str, *, left: bool = False) -> bool:
    """Lock the run's checkpoint folder for this process (an OS flock, dropped when the process dies,
    however it dies); False if another live process holds it, i.e. is training that run now, or if its process
    removes the lock file meanwhile (a run that ends removes its folder, then releases its lock), or if this process
    cannot tell (`_locked`: another user's lock file it may not read, in a shared checkpoint folder). `left`: only a
    lock file already there, none made (False if there is none); else False too for another user's folder that this
    process may not write, whose run it could not checkpoint."""
    if run_id in _claimed:
        return True
    path = checkpoint_dir(run_id) / LOCK_FILE
    if not left:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not writable(path.parent):  # another user's run (a shared folder): this process could not checkpoint it
            return False
    handle = _new_lock(path) if not left and not path.exists() else None
    if handle is None:
        handle = _locked(path)  # not made: one made here would stand unlocked for an instant (`_new_lock`)
        if handle is None:
            return False
        if not _named(path, handle):  # its run ended while this locked it: no dead process's
            handle.close()
            return False
    _claimed[run_id] = handle
    return True


def _locked(path: Path):  # noqa: ANN202 - an open file, or None
    """`path` opened and locked (flock) by this process; None if it is gone, or another live process holds it, or
    this process cannot tell: another user's file it may not read, or one it may only read where an exclusive lock
    needs it open for writing (NFS, whose flock is a byte-range lock), or no locks at all. A lock this process
    cannot inspect is never taken for a dead process's."""
    try:
        handle = path.open("r+")
    except PermissionError:  # another user's (a shared folder): flock needs no write access on a local disk
        try:
            handle = path.open()
        except OSError:
            return None
    except OSError:  # FileNotFoundError: gone (its run ended), IsADirectoryError, ...
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held; EBADF (NFS, read only), ENOLCK: not to be told
        handle.close()
        return None
    return handle


def writable(folder: Path) -> bool:
    """Whether this process may make and remove files in `folder` (a shared checkpoint folder: another user's run
    folder is not, unless it is group-writable and this user is in its group)."""
    return os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids)


def _named(path: Path, handle) -> bool:  # noqa: ANN001 - an open file
    """Whether `path` still names the file open in `handle`."""
    try:
        named, held = path.stat(), os.fstat(handle.fileno())
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _new_lock(path: Path):  # noqa: ANN202 - an open file
    """A lock file that appears already locked, or None if another process made it first: made and then locked, it
    would stand unlocked for an instant, in which another main's `remove_stale_locks` takes it for a dead main's
    and ends the live main KILLED. None too on a file system without hard links (FAT, a bucket mounted with FUSE),
    the lock file made there unlocked, for `claim` to lock: that instant, or no lock at all."""
    made = path.with_name(f".{LOCK_FILE}.{os.getpid()}")
    handle = made.open("w")
    try:  # removed however this ends, SIGTERM (`Interrupted`) too; SIGKILL leaves it (`_left_over`, `_claim_unnamed`)
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a name no other process uses: never held
        handle.write(_store())  # written before the file bears its name: never read half-written
        handle.flush()
        try:
            os.link(made, path)
        except FileExistsError:
            handle.close()
            return None
        except OSError:  # EPERM (FAT), ENOSYS (gcsfuse), ...
            handle.close()
            with contextlib.suppress(FileExistsError), path.open("x") as lock:
                lock.write(_store())
            return None
    except BaseException:
        handle.close()
        raise
    finally:
        made.unlink()
    return handle


def _store() -> str:
    """The tracking store this process writes to, as its lock files record it: a local one (a SQLite file, a folder)
    by its real path, as `sqlite:///mlflow.db` names another file in every working directory and one file has many
    spellings (`sqlite:////abs/mlflow.db`, a folder through a symlink); a server or a database by its URI as
    `_canonical` spells it (one server has many spellings too)."""
    uri = mlflow.get_tracking_uri()
    if database := sqlite_file(uri):
        return "sqlite:///" + database
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("", "file"):  # a folder, by the path MLflow opens (`file:///d%C3%ADr%20x` is `/dír x`)
        return "file://" + os.path.realpath(local_file_uri_to_path(uri))
    return _canonical(uri)


# Schemes of a tracking server or a database whose URIs `_canonical` spells one way, with their default ports (a
# database scheme may name its driver: `postgresql+psycopg2`)
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def _canonical(uri: str) -> str:
    """One spelling of a server's or a database's URI, as far as the URI alone tells (no name is looked up: that
    could hang, and a name may resolve otherwise elsewhere): scheme and host name lower-case, a trailing dot of the
    host name, the default port and (a server's) trailing slash dropped, `localhost`, `127.0.0.1` and `::1` (any
    spelling of an IP address) one loopback host, no user part (the file is for anyone to read, and another user or
    a new password is the same store). Another URI (a local store `_store` spelled already; `databricks`) as it is,
    less its password and (not a local store's) trailing slash."""
    scheme = uri.partition("://")[0].lower()
    base = scheme.partition("+")[0]
    if base in _DEFAULT_PORTS and base not in ("http", "https"):  # a database's password runs to the first `@`
        # (`_without_password`), a `/` in it too: no URL parser reads it so
        uri = re.sub(r"^([a-z0-9+.-]+://)[^/@:]*(:[^@]*)?@", r"\1", uri, flags=re.IGNORECASE)
    parts = urllib.parse.urlsplit(uri)
    try:
        port, host = parts.port, parts.hostname
    except ValueError:  # a port that is no number
        host = None
    if base not in _DEFAULT_PORTS or not host:
        return _without_password(uri).rstrip("/") if scheme not in ("sqlite", "file") else uri
    host = host.rstrip(".")
    with contextlib.suppress(ValueError):
        host = ipaddress.ip_address(host).compressed  # `::0001`, `0:0:0:0:0:0:0:1`: `::1`
    host = "localhost" if host in LOOPBACK else f"[{host}]" if ":" in host else host
    netloc = host if port in (None, _DEFAULT_PORTS[base]) else f"{host}:{port}"
    path = parts.path.rstrip("/") if base in ("http", "https") else parts.path
    query = re.sub(r"(^|&)password=[^&]*", "", parts.query, flags=re.IGNORECASE).lstrip("&")  # as the user part
    return urllib.parse.urlunsplit((scheme, netloc, path, query, parts.fragment))


def _store_of(folder: Path) -> str:
    """The store recorded in `folder`'s lock file (`_store`, spelled by `_canonical`, as an older one may not be);
    "" for one made before stores were recorded, or one this process may not read."""
    try:
        return _canonical((folder / LOCK_FILE).read_text())
    except (OSError, UnicodeDecodeError):
        return ""


# The names of the folders under the checkpoint root: a run's id (MLflow's 32 hex digits), another host's training
# (`train.worker_checkpoint_dir`: task, '-', 16 hex digits)
RUN_FOLDER = re.compile(r"[0-9a-f]{32}|\w+-[0-9a-f]{16}")


def remove_stale_locks() -> None:
    """Remove the folders in `checkpoint_root` that hold a lock file alone (`_lock_only`), no live process's: left by a
    process killed (SIGKILL, the OOM killer) before or while writing its first checkpoint, or by a killed `main`, whose
    folder only ever holds its lock: that main's runs left RUNNING (itself, the step it was in: prepare, train,
    evaluate, register) end KILLED (`end_dead_main`), else nothing would ever end them, as do those of a step run on its
    own (`step_lock`: prepare, evaluate, register; a register's evaluation of its champion too), as does a train run
    killed before its first checkpoint (`python -m pipeline.train` alone: no main to end it); one killed after a
    checkpoint keeps its folder, for a rerun to resume, its run ended KILLED. The folders' runs are read in one search,
    not one call each (200 folders: ~2 s from a tracking server on this host). Only this store's folders (`_store_of`):
    another store's (two `MLFLOW_TRACKING_URI` sharing `PIPELINE_CHECKPOINT_DIR`) are left to that store's next main,
    the only one that can end their runs. A folder that holds only the temporary file of a process killed in `_new_lock`
    is taken as lock-only (`_claim_unnamed`). Empty folders named as runs' are removed (`RUN_FOLDER`; on NFS a lock file
    removed while open stays as a `.nfs*` file until released, and keeps its folder). In a folder several users share,
    another user's folder that this process may not list, or whose lock it may not inspect (`_locked`), is left alone,
    never taken for dead; a dead one it may not remove has its runs ended all the same and stays, for a main of a user
    who may remove it."""
    root, ours = checkpoint_root(), _store()
    try:
        entries = list(root.iterdir())
    except OSError:  # none yet (FileNotFoundError), or not to be listed by this user: nothing to tell dead here
        entries = []
    names = {f: _names(f) for f in entries if f.name not in _claimed}
    # a new one's lock may be coming; a folder not named as runs' and hosts' are (a user's own, where the root is a
    # folder of other uses: PIPELINE_CHECKPOINT_DIR=$HOME) is never this pipeline's to remove
    for folder in [f for f, listed in names.items() if listed == [] and RUN_FOLDER.fullmatch(f.name) and _old(f)]:
        with contextlib.suppress(OSError):  # NFS: its `.nfs*` file not gone yet, the next main's turn
            folder.rmdir()
    # Claimed before their runs are read: a run read RUNNING, then ended by its live process, was ended KILLED
    unnamed = {f: store for f, listed in names.items()
               if listed == [] and (store := _claim_unnamed(f, ours)) is not None}
    # a train run's checkpoint beside its lock: its process killed after a checkpoint where no main was there to end
    # its run (`python -m pipeline.train` alone), or live
    checkpointed = {f for f, listed in names.items() if listed and {LOCK_FILE, CHECKPOINT_METADATA} <= {*listed}}
    folders = [f for f, listed in names.items()
               if (_lock_only(listed) or f in checkpointed) and _store_of(f) in ("", ours)
               and claim(f.name, left=True)] + [*unnamed]
    client = MlflowClient()
    runs = _runs_by_id(client, [f.name for f in folders])
    for folder in folders:
        run = runs.get(folder.name)
        if folder in checkpointed:  # resumable: the folder stays, its run ends KILLED (a rerun still resumes it)
            if run is not None and run.data.tags.get("step") == "train" and run.info.status == "RUNNING":
                _end_killed(client, [run], "ended_by")
            release(folder.name)
            continue
        if run is None and unnamed.get(folder) == "":  # its store unknown: another store's run, left to its main
            release(folder.name)
            continue
        if run is not None and run.data.tags.get("step") != "train":  # a main, or a step run on its own (`step_lock`)
            end_dead_main(client, run, tag="ended_by")
            continue
        if run is not None and run.info.status == "RUNNING":  # a train killed before its first checkpoint (under
            # a main the main's end would end it too; `python -m pipeline.train` alone has none): nothing to resume
            _end_killed(client, [run], "ended_by")
        shutil.rmtree(folder, ignore_errors=True)  # a train's, or no run here (deleted, or a lock not naming its store)
        release(folder.name)


def _lock_only(listed: list[str] | None) -> bool:
    """Whether a run folder holding `listed` holds its lock and no checkpoint: the lock alone, or beside what a kill
    during the first checkpoint's write left (`_TORN_FIRST_CHECKPOINT`), which kept the folder (a file as large as the
    model) and its run RUNNING for good."""
    return bool(listed) and LOCK_FILE in listed and all(
        name == LOCK_FILE or _TORN_FIRST_CHECKPOINT.fullmatch(name) for name in listed)


def prune_checkpoints() -> list[str]:
    """Remove the run folders in `checkpoint_root` whose run is deleted in this store: in MLflow's trash (`mlflow runs
    delete`, or its experiment deleted), or gone (`mlflow gc`; only where the folder's lock names this store, as a
    run of another store is gone from this one too). `main` keeps a killed run's checkpoint for a rerun to resume, and
    nothing else removed one whose run was deleted: it stayed on disk for good. A run's folder is removed only while
    this process holds its lock (`claim`): one a live process trains in is left alone, and so are the folders of
    runs present (finished, failed, killed or live), of another store's runs, hosts' folders and any other.

    Output: a line per folder, `removed <folder> (<why>)`, or `not removed ...: <the OS's reason>`."""
    root, ours = checkpoint_root(), _store()
    try:
        folders = [f for f in root.iterdir() if re.fullmatch(r"[0-9a-f]{32}", f.name) and f.is_dir()]
    except OSError:  # none yet, or not to be listed by this user: nothing of ours there
        return []
    runs = _runs_by_id(MlflowClient(), [f.name for f in folders])
    removed = []
    for folder in folders:
        store, run = _store_of(folder), runs.get(folder.name)
        if run is None:
            why = "no such run in this store (mlflow gc)" if store == ours else None
        else:  # (deleting an experiment moves its runs to the trash too)
            why = "its run is in MLflow's trash" if run.info.lifecycle_stage == "deleted" else None
        if why is None or store not in ("", ours) or folder.name in _claimed or not claim(folder.name, left=True):
            continue
        try:
            shutil.rmtree(folder)
            removed.append(f"removed {folder} ({why})")
        except OSError as exc:  # another user's files in it (a shared folder): theirs to remove
            removed.append(f"not removed {folder} ({why}): {exc.strerror or exc}")
        finally:
            release(folder.name)
    return removed


def _claim_unnamed(folder: Path, ours: str) -> str | None:
    """Claim (as `claim`) a run's folder whose process was killed in `_new_lock` before its temporary file bore the
    lock file's name: that file, left alone in the folder (`_left_over`: its process dead, or it old), stands for the
    lock file. The store the file records ("" if killed before writing it: a main of any store may read its run),
    None if not claimed: another store's (`_store_of`), or a live process holds it (stopped in `_new_lock` past
    `LEFT_S`)."""
    with contextlib.suppress(FileNotFoundError):
        for path in folder.iterdir():
            if not _TEMPORARY.fullmatch(path.name):
                continue
            handle = _locked(path)
            if handle is None:  # another main removed the folder meanwhile, or held, or not to be told
                continue
            try:
                store = _canonical(handle.read())
            except UnicodeDecodeError:
                store = None
            if store in ("", ours) and _named(path, handle):
                _claimed[folder.name] = handle
                return store
            handle.close()
    return None


def _names(folder: Path) -> list[str] | None:
    """The names in `folder` but `_left_over` ones; None for a stray file (a .DS_Store failed every main), for a
    folder its run removed as it ended, and for another user's that this process may not list."""
    try:
        return [p.name for p in folder.iterdir() if not _left_over(p)]
    except (NotADirectoryError, FileNotFoundError, PermissionError):  # PermissionError: another user's, left alone
        return None


_TEMPORARY = re.compile(rf"\.{re.escape(LOCK_FILE)}\.(\d+)")  # `_new_lock`'s temporary file, by its process id


def _left_over(path: Path) -> bool:
    """Whether `path` in a run's folder is none of the run's: an NFS client's `.nfs*` file (a file removed while open,
    as a lock file by a run that ends: gone once closed), or the temporary file of a process killed in `_new_lock`
    (its pid dead, or older than `LEFT_S`: a live one's lasts microseconds). A live lock is never taken for dead all
    the same: `claim` tells."""
    if path.name.startswith(".nfs"):
        return True
    pid = _TEMPORARY.fullmatch(path.name)
    if not pid:
        return False
    with contextlib.suppress(PermissionError):  # another user's process: alive
        try:
            os.kill(int(pid[1]), 0)
        except (ProcessLookupError, OverflowError):
            return True
    return _old(path)


def _old(path: Path) -> bool:
    """Whether `path` is older than `LEFT_S` (or gone)."""
    try:
        return time.time() - path.stat().st_mtime > LEFT_S
    except FileNotFoundError:
        return True


def _runs_by_id(client: MlflowClient, run_ids: list[str]) -> dict[str, mlflow.entities.Run]:
    """{run id: run} of those of `run_ids` in this store, in any experiment, deleted ones too (as `get_run` finds)."""
    ids = [r for r in run_ids if re.fullmatch(r"[\w-]+", r)]  # a quote would break the filter: no run id has one
    if not ids:
        return {}
    experiments, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ALL, page_token=token)
        experiments += [e.experiment_id for e in page]
        if not (token := page.token):
            break
    found = {}
    for start in range(0, len(ids), 100):
        listed = ", ".join(f"'{r}'" for r in ids[start:start + 100])
        found.update({r.info.run_id: r for r in client.search_runs(
            experiments, f"attributes.run_id IN ({listed})", run_view_type=ViewType.ALL)})
    return found


def release(run_id: str) -> None:
    handle = _claimed.pop(run_id, None)
    if handle is not None:
        handle.close()


CHECKPOINT_METADATA = "training_metadata.json"  # fitting.Checkpoint.METADATA (no Keras here)

# What a process killed while it wrote its run's first checkpoint leaves beside the lock (`fitting.Checkpoint`): the
# weights file, torn or whole, and the metadata not yet renamed to name it; no checkpoint to resume
_TORN_FIRST_CHECKPOINT = re.compile(rf"epoch-\d+\.weights\.h5|{re.escape(CHECKPOINT_METADATA)}\.partial")


def has_checkpoint(run_id: str) -> bool:
    return (checkpoint_dir(run_id) / CHECKPOINT_METADATA).exists()


def check_checkpoint_readable(run_id: str) -> None:
    """ConfigError naming the file if run `run_id`'s checkpoint cannot be read back: metadata that is no
    `fitting.Checkpoint`'s, its weights file missing or no whole HDF5 file (a disk that failed, a copy cut short, a file
    system that lost a write). Else the resume died in `fit` on h5py's traceback, its run and main ended FAILED, and
    every rerun died so again. Read without Keras (h5py alone), before any run opens."""
    import h5py

    folder = checkpoint_dir(run_id)
    path = folder / CHECKPOINT_METADATA
    try:
        saved = json.loads(path.read_text())
        int(saved["epoch"])
        path = folder / saved.get("weights", "latest.weights.h5")
        with h5py.File(path, "r"):
            pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        if isinstance(exc, KeyError):
            reason = f"no {exc}"
        raise config.ConfigError(f"resume: train run {run_id}'s checkpoint cannot be read ({path}: {reason}); "
                                 f"restore the file to go on with the run, or remove {folder} (or give "
                                 f"resume=never) to start afresh") from None


_training: list[str] = []  # the train runs this process trains now (`training_started` to `training_ended`)


def training_started(run_id: str) -> None:
    _training.append(run_id)


def training_ended(run_id: str | None = None) -> None:
    """`run_id` trains no longer here; None: none does (an entry point's end: the next, in this process, starts
    afresh)."""
    if run_id is None:
        _training.clear()
    elif run_id in _training:
        _training.remove(run_id)


def stopped_training() -> str | None:
    """What a rerun does with the train run this process was training when it stopped (Ctrl-C, a lost tracking
    server), in words for the line saying it stopped: the epoch its checkpoint holds, or that it left none (a rerun
    trains a run of its own from epoch 1); None where it was training none. Read from the checkpoint folder alone:
    the tracking store may be what failed."""
    if not _training:
        return None
    run_id = _training[-1]
    folder = checkpoint_dir(run_id)
    if has_checkpoint(run_id):
        return (f"Train run {run_id} keeps its checkpoint after epoch {checkpointed_epochs(run_id)} in {folder}: rerun "
                f"the same command to resume (or -P resume={run_id}).")
    return (f"Train run {run_id} left no checkpoint in {folder} (stopped before its first): a rerun of the same "
            f"command trains a run of its own from epoch 1.")


def checkpointed_epochs(run_id: str) -> int:
    """The epochs run `run_id`'s checkpoint holds (`fitting.Checkpoint.completed_epochs`, read without Keras); 0 if
    none, or unreadable."""
    try:
        return int(json.loads((checkpoint_dir(run_id) / CHECKPOINT_METADATA).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# What a train run trained with that no param fixes: the backend (KERAS_BACKEND), and what `train.precision` and
# `train.jit_compile` auto resolved to (`fitting.fast_path`), each the machine's own. Tags of the run (`train.run`);
# a resumed run goes on with them (`recorded_training`), not with what the machine it resumes on would take.
RECORDED_TAGS = ("backend", "dtype_policy", "jit_compile")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")  # the dtype policies `train.precision` names


def recorded_training(run_id: str) -> tuple[str | None, str | None, bool | None, str]:
    """(backend, dtype policy, jit_compile) train run `run_id` recorded (None each where it recorded none, or what no
    run records: a run stopped before it trained), and its source in words for messages: `train run <id> trained its
    first N epoch(s)`."""
    tags = MlflowClient().get_run(run_id).data.tags
    backend, policy, jit = (tags.get(k) for k in RECORDED_TAGS)
    epochs = checkpointed_epochs(run_id)
    trained = f" its first {epochs} epochs" if epochs > 1 else " its first epoch" if epochs else ""
    return (backend or None, policy if policy in PRECISIONS else None,
            {"true": True, "false": False}.get(jit or ""), f"train run {run_id} trained{trained}")


# Params that leave what is trained as it is: how training is displayed and checkpointed, and the later steps'
# settings. A rerun that changes them still continues the run (the run records the change: `log_train_params`).
NOT_TRAINING = ("train.verbose", "train.checkpoint_every", "evaluate.batch_size", "evaluate.samples", "register.",
                "tracking.system_metrics")


def training_params(cfg: config.Config) -> dict[str, str]:
    """The params that decide what a train run trains (every one but `NOT_TRAINING` and those without effect given the
    others, `config.inert_params`: a rerun setting one otherwise resumes the run), as MLflow stores them, but
    `data.source` as the file it names (`config.source_identity`: a rerun spelling it otherwise resumes the run)."""
    params = {k: v for k, v in config.effective_params(cfg).items() if not k.startswith(NOT_TRAINING)}
    return {**params, "data.source": config.source_identity(params["data.source"])}


def train_key(cfg: config.Config, dataset_uri: str, dataset_sha256: str | None = None) -> str:
    """Identity of a training job: the `training_params` and the dataset. Equal keys may resume each other. A local
    dataset file (`-P dataset_uri=PATH`; a `runs:/` artifact never changes) is known by its bytes too: another dataset
    written to the same path is other data (a killed run, rerun after that, went on from the old data's weights).
    `dataset_sha256`: that file's `local_dataset_sha256`, where the caller has it already."""
    dataset = {"dataset_uri": dataset_uri}
    if digest := dataset_sha256 or local_dataset_sha256(dataset_uri):
        dataset["dataset_sha256"] = digest
    return json_digest({**training_params(cfg), **dataset})




def local_dataset_sha256(dataset_uri: str) -> str | None:
    """The sha256 of the bytes of a local dataset file (`-P dataset_uri=PATH`); None for a `runs:/` artifact, which
    never changes. DataError naming `dataset_uri` if the file cannot be read."""
    if dataset_uri.startswith("runs:/"):
        return None
    try:
        return data.file_sha256(local_path(dataset_uri))
    except OSError as exc:  # e.g. another user's file: one line, as reading the dataset would say
        raise data.DataError(f"dataset_uri: {exc.filename}: cannot be read ({exc.strerror or exc})") from None


def dataset_sha256(dataset_uri: str) -> str:
    """The sha256 of the bytes of the dataset file `dataset_uri` names: a local file's (`local_dataset_sha256`), or a
    `runs:/` artifact's (downloaded, or where a local artifact store keeps it): tag `DATASET_SHA256` of the train and
    evaluate runs of it, by which compare finds the evaluation of the data a model trained on whichever way each
    command named it (a prepare run's artifact, a copy of it beside the project: `same_dataset`). DataError naming
    `dataset_uri` if it cannot be read."""
    if digest := local_dataset_sha256(dataset_uri):
        return digest
    with steps.downloaded_artifact(dataset_uri, "dataset_uri") as path:
        return local_dataset_sha256(path)


def no_checkpoint(run_id: str, run: mlflow.entities.Run | None = None) -> str:
    """Why run `run_id` (`run`, read already) cannot be resumed, having no checkpoint here: it finished (a run deletes
    its checkpoint as it finishes), or diverged (one that does deletes it too), or stopped before its first one, or
    trained on another machine or under another PIPELINE_CHECKPOINT_DIR. The one line said "(finished runs delete
    theirs)" of every run, and of a diverged one, or one a live process trains in its first epoch, that it "stopped
    before its first checkpoint"."""
    with contextlib.suppress(MlflowException):
        run = run or MlflowClient().get_run(run_id)
    status = run.info.status if run else None
    reason = run.data.tags.get("failure_reason", "") if run else ""
    if status == "FAILED" and reason.startswith("training diverged"):  # (`fitting.diverged`; train.run removes it)
        lr = re.search(r"Lower (train\.lr \(now .*\)) or check the data", reason)
        return (f"resume: run {run_id} failed (FAILED) as {reason.partition(';')[0]}, and a run that diverges deletes "
                f"its checkpoint, as going on from it would diverge again: nothing to go on from; "
                f"{f'lower {lr[1]} and ' if lr else ''}resume=never trains a new run")
    if _held(run_id):  # its process's lock, in its first epoch (a folder only looked at: none made)
        return f"resume: run {run_id} is being trained by another process right now (before its first checkpoint)"
    if status == "FINISHED":
        return (f"resume: run {run_id} finished (FINISHED), and a run deletes its checkpoint as it finishes: nothing "
                f"to go on from; resume=never trains a new run")
    return (f"resume: run {run_id}{f' ({status})' if status else ''} has no checkpoint in {checkpoint_dir(run_id)}: "
            f"it stopped before its first checkpoint, or trained on another machine or under another "
            f"PIPELINE_CHECKPOINT_DIR (set that one to resume it there)")


def find_resumable(cfg: config.Config, dataset_uri: str, resume: str = "") -> str | None:
    """The train run to continue, or None to start a new one.

    resume "": the newest unfinished run of the same job that left a checkpoint and that no live
    process is training (so rerunning a killed command continues it, and a second identical command
    started while the first trains gets a run of its own); "never": None; a run id: that run, which
    must have a checkpoint and not be training elsewhere. The run returned is claimed (see `claim`).
    An interrupted parent run of the resumed one (left RUNNING by the kill) is marked KILLED.
    """
    if resume == "never":
        return None
    client = MlflowClient()
    if resume:
        if not has_checkpoint(resume):
            raise config.ConfigError(no_checkpoint(resume))
        _check_writable_checkpoint(resume)
        if not claim(resume):
            raise config.ConfigError(f"resume: run {resume} is being trained by another process right now")
        run_id, changed = resume, code_change(resume)
    else:
        run_id, changed = newest_resumable(cfg, dataset_uri), None
        if run_id is None:
            _note_other_epochs(cfg, dataset_uri)
            return None
        refuse_other_code(run_id)  # as check_inputs did before any run opened, unless a run changed since
    run = client.get_run(run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    active = mlflow.active_run()
    if parent and (active is None or parent != active.info.run_id) and client.get_run(parent).info.status == "RUNNING":
        client.set_tag(parent, "resumed_by", active.info.run_id if active else "")
        client.set_terminated(parent, "KILLED")
    # a run `mlflow run --experiment-name` started, rerun by `python -m pipeline.main` (tracking.experiment): it goes on
    # in its own experiment (`tracking.open_run`), not among main's steps
    elsewhere = (f" (in experiment {client.get_experiment(run.info.experiment_id).name!r}, where it stays)"
                 if active is not None and run.info.experiment_id != active.info.experiment_id else "")
    print(f"resuming train run {run_id} {_resumed_after(run_id, cfg)}{elsewhere}")
    if changed:  # resume=<id>: the way on that refuse_other_code's message gives; start_training tags the run
        print(f"warning: train run {run_id} was checkpointed by other code (train_code {changed[0][:12]}, "
              f"here {changed[1][:12]}): its next epochs train with the code here from the old code's weights "
              f"(tag resumed_across_code)", file=sys.stderr)
    return run_id


def _resumed_after(run_id: str, cfg: config.Config) -> str:
    """The epoch train run `run_id` goes on after, in words for the line resuming it: its checkpoint's, of `cfg`'s
    epochs, and the epochs it logged since (killed between checkpoints, `train.checkpoint_every`), which train
    again (their logged points stay: `MlflowEpochLogger`). "From its last completed epoch" was said of a run that went
    on from epochs before it."""
    done, total = checkpointed_epochs(run_id), cfg.train.epochs
    if done >= total:
        return f"after epoch {done} of {total}, its last: its model is left to log"
    since = sorted(m.step for m in MlflowClient().get_metric_history(run_id, "val_acc") if done < m.step <= total)
    if not since:
        return f"after epoch {done} of {total}, its last checkpoint"
    epochs = f"epoch {since[0]}, logged since, trains" if len(since) == 1 else \
        f"epochs {since[0]}-{since[-1]}, logged since, train"
    return f"after epoch {done} of {total}, its last checkpoint; {epochs} again"


def newest_resumable(cfg: config.Config, dataset_uri: str) -> str | None:
    """The newest unfinished run of the same job that left a checkpoint and that no live process trains, claimed;
    one whose folder is another user's, which this process may not write, is not continued (a note says so), nor is
    one a live process trains now (a note says so: the command, run twice, trained afresh unsaid)."""
    for run_id in unfinished_runs("train_key", train_key(cfg, dataset_uri)):
        if not has_checkpoint(run_id):
            if _held(run_id):  # live, before its first checkpoint
                _note_live(run_id)
            continue
        if not writable(checkpoint_dir(run_id)):  # another user's: its next checkpoints could not be saved here
            if run_id not in _noted:
                _noted.add(run_id)
                print(f"note: train run {run_id} left a checkpoint in {checkpoint_dir(run_id)}, which user "
                      f"{_user(os.geteuid())} may not write; not continued here (-P resume={run_id} as its user "
                      f"goes on with it)", file=sys.stderr)
        elif claim(run_id):
            return run_id
        else:
            _note_live(run_id)
    return None


def _note_other_epochs(cfg: config.Config, dataset_uri: str) -> None:
    """A note (stderr) naming each stopped train run with a checkpoint here whose params and data are `cfg`'s and
    `dataset_uri`'s but for `train.epochs`, which a plain rerun does not resume (the epochs are in its `train_key`),
    with the `resume=<id>` that extends it where `cfg` has more epochs. A run of 30 epochs stopped, rerun with
    `-P epochs=60` to train it longer, trained a run of its own from epoch 1 without a word of the stopped one."""
    try:
        folders = [f.name for f in checkpoint_root().iterdir()
                   if re.fullmatch(r"[0-9a-f]{32}", f.name) and (f / CHECKPOINT_METADATA).exists()]
    except OSError:  # none yet, or not to be listed by this user
        return
    ours = {k: v for k, v in training_params(cfg).items() if k != "train.epochs"}
    runs = sorted(_runs_by_id(MlflowClient(), folders).values(), key=lambda r: -r.info.start_time)
    for run in runs:
        if run.data.tags.get("step") != "train" or run.info.status == "FINISHED" or \
                run.info.lifecycle_stage == "deleted" or trained_dataset_uri(run) != dataset_uri:
            continue
        try:
            logged = config.from_run_params(run.data.params)
        except config.ConfigError:  # params of an older config: not this command's run
            continue
        epochs = int(run.data.tags.get("extended_epochs", str(logged.train.epochs)).split("->")[-1])
        theirs = {k: v for k, v in training_params(logged).items() if k != "train.epochs"}
        if theirs != ours or epochs == cfg.train.epochs or run.info.run_id in _noted or _held(run.info.run_id):
            continue
        _noted.add(run.info.run_id)
        way = (f"-P resume={run.info.run_id} extends that run to {cfg.train.epochs} epochs instead"
               if cfg.train.epochs > epochs else "a run is resumed with its epochs or more")
        print(f"note: train run {run.info.run_id} ({run.info.status}), of the same params and data but train.epochs "
              f"{epochs}, left a checkpoint after epoch {checkpointed_epochs(run.info.run_id)}; this command trains a "
              f"run of its own from epoch 1 ({way})", file=sys.stderr)


_noted: set[str] = set()  # the runs `newest_resumable` said it could not continue (it is asked twice per command)


def _note_live(run_id: str) -> None:
    if run_id not in _noted:
        _noted.add(run_id)
        print(f"note: train run {run_id}, of the same params and data, is being trained by another process now; this "
              f"command trains a run of its own", file=sys.stderr)


def code_change(run_id: str) -> tuple[str, str] | None:
    """(tag `train_code` of train run `run_id`, `train_code()` here) if they differ; None if equal or untagged."""
    theirs, ours = MlflowClient().get_run(run_id).data.tags.get("train_code"), train_code()
    return (theirs, ours) if theirs and theirs != ours else None


def refuse_other_code(run_id: str) -> None:
    """ConfigError if train run `run_id`, which a plain rerun would continue, was checkpointed by other code
    (`TRAIN_CODE` changed since: an edit, a pull): going on from its weights with this code is no clean run of
    either. Releases the run first."""
    changed = code_change(run_id)
    if changed:
        release(run_id)
        raise config.ConfigError(
            f"resume: train run {run_id} was checkpointed by other code (train_code {changed[0][:12]}, here "
            f"{changed[1][:12]}: pipeline/{{{','.join(TRAIN_CODE)}}}.py changed since); resume={run_id} goes on "
            f"from its weights with the code here (tagged resumed_across_code), resume=never starts afresh")


def resumable_run(cfg: config.Config, dataset_uri: str) -> str | None:
    """The run a plain rerun of `cfg` on `dataset_uri` would continue (`newest_resumable`), or None; left unclaimed
    unless this process held it already: `find_resumable` claims it again, once the runs are open."""
    held = set(_claimed)
    run_id = newest_resumable(cfg, dataset_uri)
    if run_id and run_id not in held:
        release(run_id)
    return run_id


def check_resumable_code(cfg: config.Config, dataset_uri: str | None) -> str | None:
    """`refuse_other_code` and `check_checkpoint_readable` for the run a plain rerun would continue (`find_resumable`),
    before any run opens
    (`dataset_uri`: the one the command will train on, None if it is not prepared yet: then no run resumes).
    Returns that run's id, or None."""
    if not dataset_uri:
        return None
    run_id = resumable_run(cfg, dataset_uri)
    if run_id:
        refuse_other_code(run_id)
        check_checkpoint_readable(run_id)
    return run_id


# The modules that decide what a train run trains and how its logged model serves (`train_code`, tag `train_code` on
# the run): a failed pipeline's model is no rerun's to go on from once they changed (an edit, a pull).
TRAIN_CODE = ("augment", "data", "fitting", "model", "serve", "train")


def train_code() -> str:
    return code_digest(*TRAIN_CODE)


def trained_before_a_failure(cfg: config.Config, dataset_uri: str) -> tuple[str, str] | None:
    """(run id, model URI) of a finished train run of the same job (`train_key`) that a `main` trained and no
    `main` carried through to the registry (`mark_pipeline_done`), none running now, trained by the code here now
    (`train_code`): its pipeline failed after training, in evaluate or register, and rerunning the command goes on
    from its logged model instead of training again. The newest such run, or None. A run whose main was deleted for
    good (`mlflow gc`) is not known as a main's: the rerun trains anew."""
    client = MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.train_key = '{train_key(cfg, dataset_uri)}' and "
                                            f"tags.train_code = '{train_code()}' and attributes.status = 'FINISHED'")
    for run in runs:
        tags, run_id = run.data.tags, run.info.run_id
        if "model_uri" not in tags or PIPELINE_DONE in tags or "mlflow.parentRunId" not in tags:
            continue
        try:
            parent = client.get_run(tags["mlflow.parentRunId"])
        except MlflowException:  # deleted for good (`mlflow gc`): not known as a main's, nor whether one is live
            continue
        if parent.data.tags.get("step") != "main":  # a standalone train or a sweep trial: not main's to reuse
            continue
        users = [parent, *client.search_runs([parent.info.experiment_id], f"tags.train_run_id = '{run_id}'")]
        running = [r.info.run_id for r in users if r.info.status == "RUNNING"]
        # A live main holds its claim; one whose lock file is not here runs on another host (a team's server) or
        # predates the lock, and one another user's this process may not inspect (`_locked`): taken for live
        claimed = [main for main in running if claim(main, left=True)]
        if len(claimed) < len(running):  # a live main is still evaluating or registering it
            for main in claimed:
                release(main)
            continue
        for main in running:  # killed (SIGKILL, power lost) before it could end its runs: they would stay RUNNING
            end_dead_main(client, main)
        return run_id, tags["model_uri"]
    return None


def end_dead_main(client: MlflowClient, main: mlflow.entities.Run | str, *, tag: str = "resumed_by") -> None:
    """End the RUNNING steps of a main whose process died without ending them (its `claim` was free), the RUNNING
    runs nested in those (a register's evaluation of its champion, `pipeline.register.champion_on_test_data`), and
    the main itself if RUNNING (one `mlflow run` marked FAILED once its step was killed keeps that), KILLED; tag
    `tag` names the active run that found it dead."""
    main = client.get_run(main) if isinstance(main, str) else main
    running = client.search_runs([main.info.experiment_id], "attributes.status = 'RUNNING'",  # nested ones: in it too
                                 max_results=50_000)  # MLflow's most in one page; its default, 1,000, a team exceeds
    steps = [r for r in running if r.data.tags.get("mlflow.parentRunId") == main.info.run_id
             and not _held(r.info.run_id)]  # not a train run a live main resumed (`find_resumable`)
    ids = {r.info.run_id for r in steps}
    steps += [r for r in running if r.data.tags.get("mlflow.parentRunId") in ids]  # a register's scoring evaluate run
    _end_killed(client, [*steps, main] if main.info.status == "RUNNING" else steps, tag)
    # only its lock file (a main has no checkpoint), removed before it is released, as a main ending removes its own
    shutil.rmtree(checkpoint_dir(main.info.run_id), ignore_errors=True)
    release(main.info.run_id)


@contextlib.contextmanager
def main_lock() -> Iterator[Callable[[str], object]]:
    """For a `main` (entered before its run opens, so left after it has ended): yields `hold`, which claims the main
    run for this process (`claim`). Its lock file goes once the run has ended (a kill before leaves it for the next
    main, which ends the main KILLED if it had not ended). One whose store was lost (MlflowException: a tracking
    server gone, its runs perhaps left RUNNING) stays, released, for the next main on this machine to take for a dead
    main's and end them, as after SIGKILL: removed, they stayed RUNNING for good, and a rerun trained again instead
    of going on from the model (`trained_before_a_failure`)."""
    held: list[str] = []
    lost = False
    try:
        yield lambda run_id: held.append(run_id) or claim(run_id)
    except MlflowException:
        lost = True
        raise
    finally:
        for run_id in held:
            if not lost:
                shutil.rmtree(checkpoint_dir(run_id), ignore_errors=True)
            release(run_id)


@contextlib.contextmanager
def step_lock() -> Iterator[Callable[[mlflow.ActiveRun], None]]:
    """For a step run on its own (`mlflow run . -e register`, `python -m pipeline.evaluate`; not under a main, whose
    lock stands for its steps), entered before its run opens: yields `hold`, which holds the run for this process as
    `main_lock` holds a main's, so that the next main ends it KILLED (and the runs nested in it: a register's
    evaluation of its champion) if this process is killed (SIGKILL, the OOM killer) before it ends; they stayed
    RUNNING for good. Best effort: a checkpoint folder this user may not write (these steps write no checkpoint, and
    never asked for one) leaves the run unheld, as before."""
    with main_lock() as hold:
        def hold_step(step: mlflow.ActiveRun) -> None:
            with contextlib.suppress(OSError):
                hold(step.info.run_id)

        yield hold_step


def _end_killed(client: MlflowClient, runs: list[mlflow.entities.Run], tag: str) -> None:
    """End `runs` KILLED, each tagged `tag` with the active run's id (the run that found them dead)."""
    for run in runs:
        client.set_tag(run.info.run_id, tag, mlflow.active_run().info.run_id)
        client.set_terminated(run.info.run_id, "KILLED")


def claimed(run_id: str) -> bool:
    """Whether this process holds run `run_id`'s claim (`claim`): it, and no other live process, trains that run."""
    return run_id in _claimed


def _held(run_id: str) -> bool:
    """Whether a live process, this one too, holds run `run_id`'s claim (the lock file is only looked at: no folder
    is made for a run that has none). A lock file removed meanwhile is its live process's, ending the run; one this
    process cannot inspect (another user's, `_locked`) is taken as held."""
    if run_id in _claimed:
        return True
    if not (checkpoint_dir(run_id) / LOCK_FILE).exists():
        return False
    if not claim(run_id, left=True):
        return True
    release(run_id)
    return False


PIPELINE_DONE = "pipeline_done"  # tag on a train run: a main registered its model (the main run's id)


def mark_pipeline_done(train_run_id: str) -> None:
    """Tag train run `train_run_id` as carried through to the registry by the active main run. Two mains rerun
    together after one failed in evaluate or register may both go on from its train run (`trained_before_a_failure`)
    and tag it at once: the insert that loses (MLflow looks for the tag, then inserts it) is written again, an update
    (`written_despite_a_race`)."""
    main = mlflow.active_run().info.run_id
    written_despite_a_race(lambda: MlflowClient().set_tag(train_run_id, PIPELINE_DONE, main), "tags")


def config_to_resume(run_id: str, cfg: config.Config, dataset_uri: str = "") -> str:
    """Check that `cfg` (and `dataset_uri`, if given) are what train run `run_id` was started with; return
    the run's dataset URI. `train.epochs` may grow, to extend the run (the lr schedule is then built for
    the new length), or go back to the run's own count where an extension stopped before it trained
    (`_extension_untrained`), and the params in `NOT_TRAINING` may change; any other difference is a ConfigError naming
    the keys, as is a local dataset file that holds other bytes than the run trained on (`_check_same_bytes`), a run in
    MLflow's trash, one that left no checkpoint here or one a live process trains now (or has claimed to train: the
    run is claimed for this process, `claim`)."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        if named := _named_train_runs(run_id):
            raise config.ConfigError(named) from None
        hint = ("; did you mean resume=never?" if run_id.strip().lower() == "never" else
                " (resume takes '' to continue an interrupted identical run, never to start afresh, or a train run's "
                "id)")
        raise config.ConfigError(f"resume: no run {run_id!r} in the tracking store{hint}") from None
    params = run.data.params
    trained_on = trained_dataset_uri(run)
    if not trained_on or run.data.tags.get("step") != "train":
        raise config.ConfigError(f"resume: run {run_id} is {_not_a_train_run(run)}")
    if run.info.lifecycle_stage == "deleted":  # MLflow refuses to reopen it: a traceback, once main's run was open
        raise config.ConfigError(f"resume: run {run_id} is in MLflow's trash; restore it (mlflow runs restore --run-id "
                                 f"{run_id}) to go on with it, or resume=never to start afresh")
    logged = config.from_run_params(params)
    if "extended_epochs" in run.data.tags:
        logged = dataclasses.replace(logged, train=dataclasses.replace(
            logged.train, epochs=int(run.data.tags["extended_epochs"].split("->")[-1])))
    ours, theirs = training_params(cfg), training_params(logged)
    differ = sorted(k for k in ours.keys() | theirs.keys() if k != "train.epochs" and ours.get(k) != theirs.get(k))
    if dataset_uri and dataset_uri != trained_on:
        differ.append("dataset_uri")
    if differ:
        details = ", ".join(f"{k}={ours.get(k, params.get(k))} (run has {theirs.get(k, params.get(k))})"
                            for k in differ)
        raise config.ConfigError(f"resume: run {run_id} was started with other params: {details}; give the "
                                 f"command it was started with (train.epochs may grow), or resume=never")
    if cfg.train.epochs < logged.train.epochs and not _extension_untrained(run, cfg, trained_on):
        if "extended_epochs" in run.data.tags:
            raise config.ConfigError(
                f"train.epochs: run {run_id} was extended from {params.get('train.epochs')} to {logged.train.epochs} "
                f"epochs and trained on their schedule since: resuming it can only keep or extend its "
                f"{logged.train.epochs} epochs, got {cfg.train.epochs} (resume=never starts afresh)")
        raise config.ConfigError(f"train.epochs: resuming run {run_id} can only keep or extend its "
                                 f"{logged.train.epochs} epochs, got {cfg.train.epochs}")
    _check_same_bytes(run, dataset_uri or trained_on)
    if not has_checkpoint(run_id):  # as find_resumable says it, but before any run opens
        raise config.ConfigError(no_checkpoint(run_id, run))
    _check_writable_checkpoint(run_id)
    check_checkpoint_readable(run_id)
    # as find_resumable says it, but before any run opens (it opened main's, left FAILED), and held from now on: a
    # second resume=<id> started beside this one found the run free while this one loaded Keras, then was refused
    # inside its main run (the caller releases the claim where it refuses the command after all)
    if not claim(run_id):
        raise config.ConfigError(f"resume: run {run_id} is being trained by another process right now")
    return trained_on


def _named_train_runs(name: str) -> str | None:
    """The refusal of `resume=<name>` where `name` is no run id but the name of train runs (the UI's Run Name column,
    `config.Config.run_name`): the ids of those that left a checkpoint here to give instead, or that none did; None
    where no train run bears that name. It was refused as 'no run ... in the tracking store'."""
    if "'" in name or not name.strip():  # a quote would break the filter: no run name `run_name` makes has one
        return None
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.mlflow.runName = '{name}' and tags.step = 'train'")
    if not runs:
        return None
    named = f"resume: {name!r} is the name of {len(runs)} train run{'s' * (len(runs) > 1)}"
    left = [r for r in runs if r.info.status != "FINISHED" and has_checkpoint(r.info.run_id)]
    if not left:
        return f"{named}, none of which left a checkpoint here to go on from; resume takes a train run's id"

    def said(run: mlflow.entities.Run) -> str:
        return f"({run.info.status}, after epoch {checkpointed_epochs(run.info.run_id)})"

    if len(left) == 1:
        return (f"{named}, not a run id; resume={left[0].info.run_id} goes on with the one of them that left a "
                f"checkpoint here {said(left[0])}")
    return (f"{named}, not a run id; {len(left)} of them left a checkpoint here: "
            + ", ".join(f"resume={r.info.run_id} {said(r)}" for r in left))


def _not_a_train_run(run: mlflow.entities.Run) -> str:
    """What run `run`, given to resume but no train run, is, in words: a main run (the row the UI lists for a
    pipeline) with the `resume=` of its train run (tag `train_run_id`: a run it resumed, or one it trained; else the
    one nested in it), or the step it is."""
    tags = run.data.tags
    step = tags.get("step")
    if step not in ("main", "resume"):  # "resume": the run `mlflow run` opened for a resumed train run (`open_run`)
        return f"a {step} run, not a train run" if step and step != "train" else "not a train run"
    trained = tags.get("train_run_id") or tags.get("resumes_run") or next(
        (r.info.run_id for r in MlflowClient().search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.step = 'train'",
            order_by=["attributes.start_time DESC"], max_results=1)), None)
    if not trained:
        return f"a {step} run, not a train run, and trained nothing (it stopped before)"
    return f"a {step} run, not a train run; resume={trained} goes on with its train run"


def _extension_untrained(run: mlflow.entities.Run, cfg: config.Config, dataset_uri: str) -> bool:
    """Whether train run `run` was extended (tag `extended_epochs`) by a command stopped before it trained, and `cfg`
    is the command the run last trained with (its tag `train_key`, set as training begins): the run goes on at
    `cfg`'s epochs, as a rerun of that command does (`log_train_params` drops the tag). `resume=<id>` with them was
    refused as shrinking the run to fewer epochs than the extension's."""
    return "extended_epochs" in run.data.tags and run.data.tags.get("train_key") == train_key(cfg, dataset_uri)


def _check_same_bytes(run: mlflow.entities.Run, dataset_uri: str) -> None:
    """ConfigError naming `dataset_uri` if that local dataset file, which `config_to_resume` resumes train run `run`
    on, no longer holds the bytes the run trained on (its tag `DATASET_SHA256`): another dataset was written to the
    same path since, and the run would go on training the old data's weights on other data. A file gone is left to
    `prepare.check_dataset_uri` to refuse ("no file"). A run started before train runs recorded the tag is known by
    its path alone, as every run was then (and records the tag once resumed): its tag `train_key` holds the bytes'
    digest too, but mixed with params that the run's logged ones need not give back (keys a newer config added, which
    the run never logged; `train.epochs` as last extended), so a key that differs could not tell other bytes from
    other params, and no run is refused on a guess."""
    recorded = run.data.tags.get(DATASET_SHA256)
    if not recorded or dataset_uri.startswith("runs:/") or not os.path.exists(local_path(dataset_uri)):
        return
    now = local_dataset_sha256(dataset_uri)
    if now != recorded:
        raise config.ConfigError(
            f"dataset_uri: {dataset_uri} holds other bytes than train run {run.info.run_id} trained on (sha256 "
            f"{now[:12]} here, {recorded[:12]} in the run: another dataset was written there since); put the "
            f"original file back to go on with the run, or resume=never to start afresh")


def log_train_params(cfg: config.Config, dataset_uri: str) -> None:
    """Log every param and the dataset URI on the active train run. A resumed run keeps the values it logged
    (MLflow params are immutable): one whose `train.epochs` grew gets tag `extended_epochs` and a run name with
    the new count (both go again where the run goes on at its logged count: an extension stopped before it
    trained), one resumed with other `NOT_TRAINING` params tag `resumed_with` (`key=new (logged old)`, the
    latest rerun's; see `resumed_with`)."""
    params = {**cfg.flat(), "dataset_uri": dataset_uri}
    mlflow.set_tag("dataset_uri", dataset_uri)  # `mlflow run . -e train` logged param dataset_uri as its -P: ''
    run = MlflowClient().get_run(mlflow.active_run().info.run_id)
    logged = run.data.params
    if logged.get("train.epochs") not in (None, params["train.epochs"]):
        extension = f"{logged['train.epochs']} -> {cfg.train.epochs}"
        if run.data.tags.get("extended_epochs") != extension:  # extended now, not resumed on the extension's schedule
            mlflow.set_tag("extended_after_epoch", _extended_after(run))
        mlflow.set_tags({"extended_epochs": extension,
                         "mlflow.runName": cfg.run_name()})  # the name says the epochs: now the new count
    elif "extended_epochs" in run.data.tags:  # an extension stopped before it trained (its `train_key` was not yet
        # the longer run's), resumed by the first command: the run goes on to the epochs it logged, and says so
        for tag in ("extended_epochs", "extended_after_epoch"):
            if tag in run.data.tags:
                MlflowClient().delete_tag(run.info.run_id, tag)
        mlflow.set_tag("mlflow.runName", cfg.run_name())
    changed = {k: v for k, v in params.items() if k in logged and logged[k] != v and k != "train.epochs"}
    if changed:
        mlflow.set_tag("resumed_with", resumed_with(changed, logged))
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})


def _extended_after(run: mlflow.entities.Run) -> str:
    """Tag `extended_after_epoch` of train run `run` as it is extended: the epoch its checkpoint holds, from which the
    longer schedule trains, and the epochs logged past it (stopped between checkpoints), which train again on that
    schedule while the points they logged stay those of the shorter one (`MlflowEpochLogger` logs a step once)."""
    done = checkpointed_epochs(run.info.run_id)
    since = sorted(m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_acc") if m.step > done)
    if not since:
        return str(done)
    shorter = run.data.tags.get("extended_epochs", "").split("->")[-1].strip() or run.data.params["train.epochs"]
    epochs = f"epoch {since[0]} keeps" if len(since) == 1 else f"epochs {since[0]}-{since[-1]} keep"
    return f"{done}; {epochs} the points logged on the {shorter}-epoch schedule before"


RESUMED_WITH = "resumed_with.txt"  # a train run's artifact: the latest rerun's changed params, where its tag cuts them
RESUMED_VALUE_CHARS = 200  # of each value the tag shows then


def resumed_with(changed: dict[str, str], logged: dict[str, str]) -> str:
    """Tag `resumed_with` of a run resumed with the `changed` params (new values; `logged`: the run's): `key=new
    (logged old)`, comma separated. Where that passes MLflow's tag limit (two spellings of a long data.source path),
    the text is logged whole as artifact RESUMED_WITH, and the tag says how many changed and shows each value
    shortened to RESUMED_VALUE_CHARS, with an ellipsis: MLflow cut it mid-value with a warning, or, with
    MLFLOW_TRUNCATE_LONG_VALUES=false (or a store that enforces its column), refused it, and the resume failed."""
    def listed(shown: Callable[[str], str]) -> str:
        return ", ".join(f"{k}={shown(v)} (logged {shown(logged[k])})" for k, v in sorted(changed.items()))

    whole = listed(str)
    if len(whole) <= MAX_TAG_VAL_LENGTH:
        return whole
    mlflow.log_text(whole + "\n", RESUMED_WITH)
    return shortened(f"{len(changed)} params changed (whole values in artifact {RESUMED_WITH}): "
                     f"{listed(lambda value: shortened(value, RESUMED_VALUE_CHARS))}", MAX_TAG_VAL_LENGTH)
