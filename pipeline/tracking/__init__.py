"""The tracking layer: every MLflow call of the pipeline is made here (or in `pipeline.serve`, the
served model); the steps call these functions and never import MLflow.

- Runs: `step_run` / `open_run` open a step's run (reusing the one `mlflow run` opened, nested
  under an active parent, or resuming a run by id), tag it with the step, the git commit and whether the checkout
  differed from it, and end it KILLED on SIGTERM/SIGINT, or FAILED with tag `failure_reason` on any other exception
  (`reason_of`: an expected failure's line, a tracking server's failure as `cli` says it, or an unexpected one's type,
  last line and where its traceback is); `cli` turns expected failures into one line and an exit code;
  `ensure_store` creates the SQLite store once; `ui_hint` says where to look at a run.
- The active run: `active_run_id`, `log_params`, `log_metrics` (`log_constants`), `set_tags`, `log_dict`, `log_text`,
  and `artifact_dir`, a temporary folder whose files become the run's artifacts; `tracking_uri`.
- Keys and digests: `json_digest` (the cache key of prepare, train and sweep), `code_digest` (of the code this
  process loaded), `git_commit` and `git_dirty`.
- Finding runs by key: `finished_runs` (a prepare to reuse), `unfinished_runs` (a train run
  to resume); `metric_history` reads a run's metric per step.
- Logged models: `model_id` parses `models:/m-...`; `model_score` and `latest_metrics` apply the
  one rule for a metric's latest value (the newest timestamp); `model_score` also names the test split of its
  test_acc.
- Run descriptions (`describe_train_run`) and Markdown tables (`markdown_table`) for the UI.

What each step records and reads, by name:
- `pipeline.tracking.steps`: prepare (the dataset, its input and digests; reading a dataset URI
  back), evaluate (loading the model, the test metrics), compare (searching train runs, the
  comparison), main (the headline results).
- `pipeline.tracking.training` (imports Keras): the train run's params and tags, the per-epoch
  logger, the logged history and model logging. `pipeline.tracking.resume`: checkpoints, locks
  and which train run a command continues.
- `pipeline.tracking.registry`: the Model Registry (a model's test_acc, versions, the alias, the
  champion-vs-challenger report).
- `pipeline.tracking.trials`: the sweep's trial runs and how they end.

Tracking store: whatever `MLFLOW_TRACKING_URI` names, else MLflow's default, the embedded
SQLite store `sqlite:///mlflow.db` in the working directory (the project root under
`mlflow run .`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import functools
import gc
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.utils.file_utils import local_file_uri_to_path
from mlflow.utils.string_utils import quote
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from pipeline import interrupts, source
from pipeline.config import PROJECT_ROOT, Config, ConfigError
from pipeline.data import DataError

PIPELINE_DIR = Path(__file__).resolve().parent.parent


def checkpoint_root() -> Path:
    """Where per-run training checkpoints (the last completed epoch) live until the run finishes. An empty
    `PIPELINE_CHECKPOINT_DIR` is unset: as `Path("")`, the working directory, whose empty folders every main removed."""
    return Path(os.environ.get("PIPELINE_CHECKPOINT_DIR") or PROJECT_ROOT / "checkpoints")


# MLflow retries a dead tracking server 7 times with doubling back-off (minutes). A run whose
# server went away should fail soon and say so; its checkpoint lets the same command resume.
class _DropMessages(logging.Filter):
    """Drop log records whose message starts with one of `starts`; every other record passes."""

    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


# serve.ImageClassifier is logged as an object on purpose (its code ships with the model, see log_model):
# MLflow's advice to log models from code instead is noise on every training run.
logging.getLogger("mlflow.pyfunc").addFilter(_DropMessages("Passing a Python object as `python_model`"))
# The system metrics monitor's start and stop (tracking.system_metrics) would be 3 lines on every train step.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

for _var, _value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}.items():
    os.environ.setdefault(_var, _value)


class StepFailed(RuntimeError):
    """A step failed for a reason the user can act on (e.g. training diverged); the message says what."""


# Failures a step expects and says in one line (`cli`): a run they end gets that line as tag `failure_reason`.
EXPECTED_FAILURES = (ConfigError, DataError, StepFailed)

# Where an unexpected exception's traceback is: Python prints it on the step's stderr as the process exits, and
# `mlflow run` (local backend) starts the step with its own stdout and stderr, storing no copy anywhere.
TRACEBACK_WHERE = "full traceback on the step's stderr (the console it ran in; `mlflow run` keeps no copy)"

# TensorFlow's annotations around its message: the node (`[[{{node ...}}]]`) and the op (`[Op:...]`)
_TF_ANNOTATIONS = re.compile(r"\{\{[^{}]*\}\}|\[\[.*?\]\]|\[Op:[^\]]*\]")


def failure_line(exc: BaseException, limit: int = 300) -> str:
    """The last meaningful line of `exc`'s message, whitespace collapsed, at most `limit` characters ("" if none).

    The last line, as Python's own traceback ends with what went wrong: TensorFlow's "Graph execution error:" comes
    first, the node's error ("Received a label value of 10 which is outside the valid range of [0, 10)") after the
    stack it was defined at. Skipped: TensorFlow's node and op annotations and its `Hint:` lines, and the arguments
    Keras lists after the error of a layer's call."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a message that cannot be shown is no reason to lose the failure
        return ""
    text = text.split("\n\nArguments received by ")[0]
    lines = [" ".join(line.split()) for line in _TF_ANNOTATIONS.sub("", text).splitlines()]
    lines = [line for line in lines if line and not line.startswith("Hint:")]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[:limit - 3].rstrip() + "..."


def unexpected_reason(exc: BaseException) -> str:
    """Tag `failure_reason` of a run an unexpected exception ended (a bug, an OSError such as a full disk, an error of
    TensorFlow or JAX, MemoryError): its type, its message's last meaningful line (`failure_line`) and where the whole
    traceback is; one line of at most ~420 characters."""
    line = failure_line(exc)
    return f"unexpected {type(exc).__name__}{': ' + line if line else ''}; {TRACEBACK_WHERE}"


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: open runs end KILLED, checkpoints stay, the process exits 128 + signal.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# The signals `cli` stops a step on: SIGHUP too (the terminal it ran in hung up: an ssh connection lost, the window
# closed), unless ignored (`nohup`), which `cli` leaves as it is
_stopping_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)


def _ignore_further(signum, frame):
    """The stopping signals' handler once one has arrived: does nothing. Not SIG_IGN: a signal that arrived just before
    it was set (Ctrl-C, then `mlflow run`'s SIGTERM) is handled by CPython after, and under SIG_IGN it raises
    `OSError: Signal 15 ignored due to race condition`, a stray traceback in the step's clean-up."""


def _raise_interrupted(signum, frame):
    # Ctrl-C reaches both `mlflow run` and its step, and `mlflow run` then also sends SIGTERM: the first
    # signal wins, the ones after it would only cut the clean-up short.
    for other in _stopping_signals:
        signal.signal(other, _ignore_further)
    interrupts.raise_(Interrupted(signum))  # recorded: Keras may swallow it (pipeline.interrupts)


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """An exclusive OS lock (flock) on `path` for the duration; yields False if `blocking` is off and
    another process holds it. The OS drops the lock when the process dies, however it dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # read-only: flock needs no write access, so a lock file another user created serves as well
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o644)  # readable by the other users of the store, whatever the umask
    with os.fdopen(fd) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_store() -> str:
    """Create the SQLite tracking store (tables and migrations) if it does not exist yet, or check that
    another store answers; its URI.

    Serialised by a file lock, so processes starting together on a fresh store do not run MLflow's
    schema creation at the same time (which fails). The lock is keyed by the database file, not the URI's
    spelling (`sqlite:///mlflow.db` names another file in every folder). Other stores (a server) are left
    to their owner, only asked to answer: a server that does not (`_check_server_answers`) is MlflowException
    (`cli`: exit 4), a URI MLflow cannot open at all (a database store tried once: `_connect_once`) is ConfigError
    naming it.
    """
    uri = mlflow.get_tracking_uri()
    shown = _without_password(uri)  # also in the reason: MLflow's own message quotes the URI whole
    database = sqlite_file(uri)
    if database:
        _check_sqlite_file(database, shown)
        digest = hashlib.sha256(database.encode()).hexdigest()[:16]
        with file_lock(Path(tempfile.gettempdir()) / f"pipeline-store-{digest}.lock"):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates the tables
        return uri
    if uri.startswith(("http://", "https://")):
        _check_server_answers(uri, shown)
        return uri
    try:
        _connect_once(uri)
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        if uri.startswith(("http://", "https://")):
            raise
        reason = _first_line(str(exc.message).replace(uri, shown))  # e.g. an unknown scheme (a typo)
    except Exception as exc:  # noqa: BLE001 - a missing driver, a refused login: whatever the store's library raises
        reason = f"{type(exc).__name__}: {_first_line(str(exc).replace(uri, shown))}"
        if isinstance(exc, ModuleNotFoundError) and exc.name == "psycopg" and shown.startswith("postgresql://"):
            # SQLAlchemy 2.1's default driver for postgresql:// is psycopg 3; this project ships psycopg2
            reason += f"; name it {shown.replace('postgresql://', 'postgresql+psycopg2://', 1)}"
    else:
        return uri
    raise ConfigError(f"MLFLOW_TRACKING_URI: cannot open the tracking store {shown}: {reason}")


def _connect_once(uri: str) -> None:
    """Connect once to a database store (PostgreSQL, MySQL, ...), as MLflow checks it, raising what the driver
    raises: MLflow's own client retried a refused login, a missing database or a server that is down 10 times over
    ~100 s, logging a warning each time, before its error. Other URIs are left to MLflow."""
    from urllib.parse import urlparse

    from mlflow.store.db.db_types import DATABASE_ENGINES
    from mlflow.store.db.utils import create_sqlalchemy_engine

    if urlparse(uri).scheme.partition("+")[0] not in DATABASE_ENGINES:
        return
    import sqlalchemy

    engine = create_sqlalchemy_engine(uri)
    try:
        sqlalchemy.inspect(engine)
    finally:
        engine.dispose()


def _check_sqlite_file(database: str, shown: str) -> None:
    """ConfigError naming `database` if a `sqlite:///` store's file cannot be a SQLite database: a folder (MLflow
    retried "unable to open database file" for ~100 s, then a traceback), another file (a dataset, a typo: sqlalchemy's
    DatabaseError traceback) or a path below a file. A missing file (in missing folders too) is a new store.
    ConfigError too where this user may not write the store (`_read_only`): every step writes runs, and MLflow's
    "attempt to write a readonly database" came as a traceback once the first run opened."""
    path = Path(database)
    reason = None
    if path.is_dir():
        reason = f"{database} is a folder, not a SQLite database file"
    elif path.is_file() and path.stat().st_size:
        try:
            with path.open("rb") as file:
                header = file.read(16)
        except OSError:  # not to be read by this user: MLflow's own error says so
            return
        if header != b"SQLite format 3\x00":
            reason = f"{database} is not a SQLite database file"
    elif not path.exists() and (above := next(p for p in path.parents if p.exists())) and not above.is_dir():
        reason = f"{above} is a file, not a folder"
    if reason:
        raise ConfigError(f"MLFLOW_TRACKING_URI: cannot open the tracking store {shown}: {reason}; name a SQLite file "
                          f"(a new one is created)")
    if reason := _read_only(path):
        raise ConfigError(f"MLFLOW_TRACKING_URI: cannot write the tracking store {shown}: {reason}; give this user "
                          f"write access there, or name a SQLite file this user may write (a new one is created)")


def _read_only(path: Path) -> str | None:
    """Why this user may not write the SQLite store `path` (a file or, missing, one to create), or None: the file is
    read-only, or the folder it is in (SQLite writes its journal beside the file), or, missing, the nearest folder there
    is, where it would be created."""
    import pwd

    def may_write(found: Path, mode: int = os.W_OK) -> bool:
        return os.access(found, mode, effective_ids=os.access in os.supports_effective_ids)

    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    if path.exists():
        if not may_write(path):
            return f"{path} is read-only for user {user}"
        if not may_write(path.parent, os.W_OK | os.X_OK):
            return f"its folder {path.parent}, where SQLite writes its journal, is read-only for user {user}"
        return None
    above = next(p for p in path.parents if p.exists())
    if not may_write(above, os.W_OK | os.X_OK):
        return f"{path} does not exist, and user {user} may not create it in {above}"
    return None


def sqlite_file(uri: str) -> str | None:
    """The real path of a `sqlite:///` store's database file (`sqlite:///mlflow.db` names another file in every
    folder, and one file has many spellings: absolute, through a symlink); None for other stores."""
    return os.path.realpath(uri.removeprefix("sqlite:///").partition("?")[0]) if uri.startswith("sqlite:///") else None


def _check_server_answers(uri: str, shown: str, timeout: float = 15) -> None:
    """MlflowException (`cli`: exit 4) if nothing answers at tracking server `uri`: refused, unknown host, silent for
    `timeout` s. One try: MLflow's own client retries a dead server for minutes, and a step started with a bad param
    would wait all that time before saying so. The request is one of MLflow's API: any HTTP answer counts but a 401 that
    MLflow's own request, with its credentials, gets too (ConfigError: no login, or a wrong one), and TLS is left to
    MLflow's own settings (a private CA's server fails requests' check, not MLflow's); a proxy's 502, 503 or 504 (the
    server behind it is down) does not count, and a 404 or a web page is ConfigError: another service answers there (a
    model server, whose /health answers too; a wrong path; a login page). So is the address of a page, its `?...` or
    `#...` (the UI's, `/#/experiments/0`, pasted): MLflow sent every request to the UI's page, then said the server
    failed."""
    import urllib.parse

    import requests

    parts = urllib.parse.urlsplit(uri)
    if parts.query or parts.fragment:
        server = _without_password(urllib.parse.urlunsplit(parts._replace(query="", fragment="")).rstrip("/"))
        raise ConfigError(f"MLFLOW_TRACKING_URI: {shown} is the address of a page (its {'?' if parts.query else '#'} "
                          f"part), not of a server: name the server alone, {server}")
    api = "/api/2.0/mlflow/experiments/search"
    try:
        answer = requests.get(f"{uri.rstrip('/')}{api}", params={"max_results": 1}, timeout=timeout)
        if answer.status_code in (502, 503, 504):  # a proxy in front of a server that is down
            raise MlflowException(f"no answer (HTTP {answer.status_code} from what stands in front of it)")
        if answer.status_code == 401:  # a login: asked again with the one MLflow sends (its environment, the URI's)
            _check_login(uri, shown, api, timeout)
            return
        page = answer.ok and "html" in answer.headers.get("Content-Type", "")  # MLflow's API answers JSON
        if answer.status_code == 404 or page:
            raise ConfigError(f"MLFLOW_TRACKING_URI: {shown} answers, but not as an MLflow tracking server "
                              f"({'a web page' if page else 'HTTP 404'} for {api}): another service (a model "
                              "server?) or a wrong path")
    except requests.exceptions.SSLError:
        pass
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        if what := _not_http(exc):  # a port that takes the connection, then no HTTP: was "no answer", exit 4
            raise ConfigError(f"MLFLOW_TRACKING_URI: {shown} {what}: another service's port, not an MLflow tracking "
                              "server's (a PostgreSQL store is named "
                              "postgresql+psycopg2://USER@HOST:5432/DATABASE)") from None
        reason = _os_reason(str(exc)) or (f"nothing within {timeout:g} s" if isinstance(
            exc, requests.exceptions.Timeout) else type(exc).__name__)
        raise MlflowException(f"no answer ({reason})") from None
    except requests.exceptions.RequestException as exc:  # not a URL requests can read (a stray ':' or '/')
        raise ConfigError(f"MLFLOW_TRACKING_URI: {shown} is not a URL a client can reach "
                          f"({_first_line(str(exc).replace(uri, shown))})") from None


def _not_http(exc: Exception) -> str | None:
    """What the peer of a failed request did, in words, where it took the connection but gave no HTTP answer: closed
    it (PostgreSQL's port, told an HTTP request), or answered another protocol (an SSH banner); None otherwise."""
    import http.client

    cause = exc.args[0] if exc.args else None  # urllib3's ProtocolError("Connection aborted.", <the cause>)
    line = next((arg for arg in getattr(cause, "args", ()) if isinstance(arg, http.client.BadStatusLine)), None)
    if isinstance(line, http.client.RemoteDisconnected):
        return "closes the connection without an HTTP answer"
    return None if line is None else f"answers, but not in HTTP ({line.line[:60]!r})"


def _check_login(uri: str, shown: str, api: str, timeout: float) -> None:
    """ConfigError naming the 401 if tracking server `uri` refuses the request MLflow itself would send, with its
    credentials (MLFLOW_TRACKING_USERNAME and _PASSWORD or ~/.mlflow/credentials, a token, an auth plugin, the URI's
    user and password): every step would fail on it. A request that fails otherwise is left to MLflow's own."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        answer = http_request(creds, api, "GET", max_retries=0, timeout=timeout, raise_on_status=False,
                              params={"max_results": 1})
    except MlflowException:
        return
    if answer.status_code != 401:
        return
    import urllib.parse

    if creds.username or creds.password or creds.token or creds.auth or creds.aws_sigv4 or (
            urllib.parse.urlsplit(uri).username):
        raise ConfigError(f"MLFLOW_TRACKING_URI: {shown} refuses the login given (HTTP 401 for {api}): check "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    raise ConfigError(f"MLFLOW_TRACKING_URI: {shown} asks for a login (HTTP 401 for {api}): set "
                      "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")


def asks_for_help(args: list[str]) -> bool:
    """Whether `args` ask for the help: `-h`, `--help`, or an abbreviation of it (`--he`), which an entry point's
    parser refuses (`config._Parser`, no abbreviations): either way no store is made first."""
    return any(arg == "-h" or (arg.startswith("--h") and "--help".startswith(arg)) for arg in args)


def store_ready() -> str:
    """`python -m pipeline.tracking`'s line: the store `ensure_store` created or found answering, password hidden.
    ConfigError naming the folder where a database store's new experiments keep their artifacts (MLflow's default:
    `mlruns` in the working folder) if this user cannot write there (`_unwritable_folder`): "ready" came all the same,
    and every step then died on MLflow's NotADirectoryError traceback as it logged its first artifact, its run FAILED.
    A server's artifact store is left to its owner."""
    from mlflow.tracking._tracking_service.utils import _get_store

    shown = _without_password(ensure_store())
    if unwritable := unwritable_artifact_location(getattr(_get_store(), "artifact_root_uri", None) or ""):
        raise ConfigError(f"MLFLOW_TRACKING_URI: the tracking store {shown} keeps new experiments' artifacts in "
                          f"{unwritable[0]}, where this user cannot write: {unwritable[1]}; move that away, or run "
                          f"where it is a folder this user may write")
    return f"tracking store {shown} ready"


def unwritable_artifact_location(location: str) -> tuple[Path, str] | None:
    """(the folder, why) where artifact location `location` (a path or a `file:` URI) is a local folder this user
    cannot write (`_unwritable_folder`); None where it can, or for other artifact stores (a server's, a bucket: left
    to their owner)."""
    if location.startswith("file:"):
        location = local_file_uri_to_path(location)
    elif not location or re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", location):  # s3://, mlflow-artifacts:/, ...
        return None
    reason = _unwritable_folder(Path(location))
    return (Path(location), reason) if reason else None


def _unwritable_folder(path: Path) -> str | None:
    """Why this user cannot write files in local folder `path`, created if missing, or None: a file sits in its place
    or in the place of a folder above it, or it (or, missing, the nearest folder above it) is read-only."""
    import pwd

    found = next((p for p in (path, *path.parents) if p.exists()), None)
    if found is None:
        return None
    if not found.is_dir():
        return f"{found} is a file, not a folder"
    if os.access(found, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return None
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    return (f"{found} is read-only for user {user}" if found == path
            else f"{path} does not exist, and user {user} may not create it in {found}")


def _os_reason(text: str) -> str | None:
    """The OS's reason a connection failed (`[Errno 111] Connection refused` -> "Connection refused") as requests and
    urllib3 nest it in their messages, and MLflow in its own; None if `text` holds none."""
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return errno.group(1).strip() if errno else None


def _first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0][:600]  # whole sentences: MLflow ends its advice with the fix


def _without_password(uri: str) -> str:
    """`uri` with the password of its user part, if any, as `***` (an error line must not print it), and so a
    `password` query parameter (libpq takes one). The password runs to the first `@`, as SQLAlchemy reads it: a
    generated one may hold a `/`."""
    uri = re.sub(r"^([a-z0-9+.-]+://[^/@:]*):[^@]*@", r"\1:***@", uri, flags=re.IGNORECASE)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", uri, flags=re.IGNORECASE)


def code_digest(*modules: str) -> str:
    """sha256 of the named pipeline modules' source as this process loaded it (`pipeline.source`: the code it runs,
    not the files on disk now, which an edit or a pull may have changed since): a cache key that changes with the
    code."""
    h = hashlib.sha256()
    for module in sorted(modules):
        h.update(module.encode())
        h.update(source.FILES[f"{module}.py"])
    return h.hexdigest()


def json_digest(value: object) -> str:
    """sha256 of `value` as canonical JSON (sorted keys; str() for what JSON cannot hold): a cache key."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def markdown_table(table: pd.DataFrame, decimals: dict[str, int] | None = None) -> str:
    """`table` as a GitHub-flavoured Markdown table (pandas `to_markdown`): floats with 4 decimals (`decimals`: other
    counts by column, such as seconds to 1), missing values empty, other values as their text (not re-read as
    numbers: `1e-06` stays `1e-06`), a line break in one as `\\n`."""
    def cell(value, places: int) -> str:
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):  # NA: of an Int64
            return ""
        text = f"{value:.{places}f}" if isinstance(value, float) else str(value)
        # tabulate leaves a pipe inside a cell as a column break, and writes a line break as another row below
        return text.replace("|", "\\|").replace("\r\n", "\\n").replace("\r", "\\r").replace("\n", "\\n")

    places = decimals or {}
    cells = table.apply(lambda column: column.map(functools.partial(cell, places=places.get(column.name, 4))))
    return cells.to_markdown(index=False, disable_numparse=True) + "\n"


def shortened(text: str, chars: int) -> str:
    """`text`, or where it is longer than `chars` its first `chars` - 1 characters and an ellipsis."""
    return text if len(text) <= chars else text[:chars - 1] + "…"


def fit_note(text: str, whole: str) -> str:
    """`text` as a run's description (tag mlflow.note.content): whole where it fits MLflow's tag limit, else its lines
    that fit and one saying how many more artifact `whole` holds. MLflow cut it at the limit, mid-row of a long
    table, with nothing in the UI to say so."""
    if len(text) <= MAX_TAG_VAL_LENGTH:
        return text
    lines = text.splitlines(keepends=True)
    kept, size = 0, 0
    while size + len(lines[kept]) + 100 <= MAX_TAG_VAL_LENGTH:  # room for the last line
        size += len(lines[kept])
        kept += 1
    return "".join(lines[:kept]) + f"\n... and {len(lines) - kept} more rows: see {whole} for the whole table\n"


@functools.cache
def git_commit() -> str | None:
    """The project's checked-out commit (`git rev-parse HEAD`), or None outside a git checkout or without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


@functools.cache
def git_dirty() -> bool | None:
    """Whether the project's checkout differs from its commit (`git status --porcelain`: a file edited, staged,
    deleted or added and not ignored), or None outside a git checkout or without git."""
    try:
        out = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.strip())


def ui_hint(run: mlflow.entities.Run | mlflow.ActiveRun) -> str:
    """Where to look at `run`: its page on the tracking server, or the `mlflow ui` command for a local store."""
    uri = _without_password(mlflow.get_tracking_uri())  # a console line, kept in logs: no password
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    if uri.startswith(("http://", "https://")):
        return f"run {run.info.run_id}: {uri.rstrip('/')}/{page}"
    # shell-quoted where it must be (a folder with a space, a database URI's `&`): a command that runs as pasted
    return (f"run {run.info.run_id}: see it with `mlflow ui --backend-store-uri {shlex.quote(uri)}`, then "
            f"http://127.0.0.1:5000/{page}")


def step_run(cfg: Config, step: str, *, run_name: str | None = None, resume_run_id: str | None = None,
             not_failures: tuple[type[BaseException], ...] = ()) -> contextlib.AbstractContextManager[mlflow.ActiveRun]:
    """`open_run` for a pipeline step, in `tracking.experiment`; one that builds the model (train, main) tagged with
    its depth (a step on its own is given no model params: prepare, evaluate and register runs were tagged the
    default params' depth, whatever the model); a train step logs MLflow's system metrics if
    `tracking.system_metrics`."""
    return open_run(step, experiment=cfg.tracking.experiment, run_name=run_name, resume_run_id=resume_run_id,
                    tags={"model_depth": str(cfg.model.depth)} if step in ("train", "main") else {},
                    system_metrics=step == "train" and cfg.tracking.system_metrics, not_failures=not_failures)


@contextlib.contextmanager
def apart_from_wrapper_run(cfg: Config) -> Iterator[Config]:
    """Under `mlflow run` with no run active, the run `mlflow run` opened (MLFLOW_RUN_ID) is the entry point's own
    step's (train's, whose data may be prepared first): a step run opened inside this context is a run of its
    own, in that run's experiment (not `tracking.experiment`). Yields the params to open it with."""
    wrapper = os.environ.get("MLFLOW_RUN_ID") if mlflow.active_run() is None else None
    if not wrapper:
        yield cfg
        return
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(client.get_run(wrapper).info.experiment_id).name
    del os.environ["MLFLOW_RUN_ID"]
    try:
        yield dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, experiment=experiment))
    finally:
        os.environ["MLFLOW_RUN_ID"] = wrapper


@contextlib.contextmanager
def open_run(step: str, *, experiment: str | None = None, run_name: str | None = None,
             resume_run_id: str | None = None, tags: dict[str, str] | None = None,
             system_metrics: bool = False,
             not_failures: tuple[type[BaseException], ...] = ()) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one step, tagged `step` (and `tags`, the git commit).

    Under `mlflow run` the run already exists (MLFLOW_RUN_ID) and is reused. Inside another
    active run (the `main` driver, a sweep) a nested child run is opened in the parent's
    experiment. Otherwise a new run is opened in `experiment` (MLflow's default if None).
    `resume_run_id` reopens that existing run instead (nested in whatever run is active).
    A step that raises ends FAILED with tag `failure_reason` (except for `not_failures`, which the caller ends as it
    sees fit); one interrupted by SIGTERM/SIGINT ends KILLED (see `_ended_with_reason`). `system_metrics`: the
    step's run logs MLflow's system metrics while open (continuing their steps when reopened).
    """
    parent = mlflow.active_run()
    tags = {"step": step, **(tags or {})}
    commit = git_commit()
    if commit:  # and whether the code that ran is that commit's (an edit not committed is not)
        tags["git_commit"] = commit
        if (dirty := git_dirty()) is not None:
            tags["git_dirty"] = str(dirty).lower()
    if resume_run_id:
        with contextlib.ExitStack() as stack:
            if parent is None and os.environ.get("MLFLOW_RUN_ID"):  # the run `mlflow run` opened for this try
                stack.enter_context(_ended_with_reason(functools.partial(  # step "resume": compare and searches skip it
                    mlflow.start_run, tags={**tags, "step": "resume", "resumes_run": resume_run_id}), not_failures))
            yield stack.enter_context(_ended_with_reason(lambda: _reopen(resume_run_id, system_metrics),
                                                         not_failures))
        return
    if parent is not None:
        start = functools.partial(mlflow.start_run, run_name=run_name or step, nested=True,
                                  experiment_id=parent.info.experiment_id, tags=tags, log_system_metrics=system_metrics)
    elif os.environ.get("MLFLOW_RUN_ID"):
        _check_artifact_location(mlflow.MlflowClient().get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id)
        start = functools.partial(mlflow.start_run, tags=tags, log_system_metrics=system_metrics)
    else:
        if experiment:
            _check_artifact_location(_set_experiment(experiment).experiment_id)
        start = functools.partial(mlflow.start_run, run_name=run_name or step, tags=tags,
                                  log_system_metrics=system_metrics)
    with _ended_with_reason(start, not_failures) as run:
        if run_name:  # `mlflow run` names its run at random; a descriptive name reads better in the UI
            mlflow.set_tag("mlflow.runName", run_name)
        yield run


def _reopen(run_id: str, system_metrics: bool) -> mlflow.ActiveRun:
    """`mlflow.start_run` of the existing run `run_id`, nested in the active run if one is, in its own experiment.
    MLflow refuses to reopen a run of another experiment than the one `set_experiment` made active: a train run that
    `mlflow run --experiment-name` (or MLflow's Default) started, resumed by `python -m pipeline.main` (its runs in
    `tracking.experiment`), was a traceback once main's run was open. The run's experiment is made active for the
    moment it is reopened, then the active run's again (its later steps' experiment), as `mlflow run`, which sets
    none, reopens it."""
    outer = mlflow.active_run()
    run = mlflow.MlflowClient().get_run(run_id)
    own = run.info.experiment_id
    if outer is None or own == outer.info.experiment_id:
        reopened = mlflow.start_run(run_id=run_id, nested=outer is not None, log_system_metrics=system_metrics)
    else:
        mlflow.set_experiment(experiment_id=own)
        try:
            reopened = mlflow.start_run(run_id=run_id, nested=True, log_system_metrics=system_metrics)
        finally:
            mlflow.set_experiment(experiment_id=outer.info.experiment_id)
    _set_aside_the_last_end(run)
    return reopened


# Tags that say how a run ended (`_ended_with_reason`; `resume.remove_stale_locks` for a dead process's run), and the
# tag a reopened run lists them in for each session before (`_set_aside_the_last_end`), oldest first
END_TAGS = ("failure_reason", "interrupted_by", "ended_by")
EARLIER_ENDS = "earlier_sessions_ended"
EARLIER_END_CHARS = 400  # of each session's end the list keeps


def _set_aside_the_last_end(run: mlflow.entities.Run) -> None:
    """Move the tags of how reopened run `run` last ended (`END_TAGS`) to the end of its tag `EARLIER_ENDS` (`KILLED
    (interrupted_by SIGINT) | FAILED (failure_reason ...)`): they were the tags of the session that ends next too
    (`tag_failure` keeps a `failure_reason` there is), and a resumed run that finished read as failed and interrupted.
    The list keeps its newest sessions where it passes MLflow's tag limit."""
    tags, client = run.data.tags, mlflow.MlflowClient()
    said = [f"{key} {shortened(tags[key], EARLIER_END_CHARS)}" for key in END_TAGS if key in tags]
    if not said:
        return
    ends = [*filter(None, tags.get(EARLIER_ENDS, "").split(" | ")), f"{run.info.status} ({', '.join(said)})"]
    while len(" | ".join(ends)) > MAX_TAG_VAL_LENGTH:
        ends = ends[1:]
    client.set_tag(run.info.run_id, EARLIER_ENDS, " | ".join(ends))
    for key in END_TAGS:
        if key in tags:
            client.delete_tag(run.info.run_id, key)


def _set_experiment(name: str) -> mlflow.entities.Experiment:
    """`mlflow.set_experiment`, which it returns; ConfigError naming `tracking.experiment` if that experiment is in
    MLflow's trash (MLflow refuses to reuse its name: a traceback, before any run was opened). One that another process
    created between MLflow's look for it and its insert is made active all the same: MLflow's `set_experiment`, its
    insert refused as a duplicate, returns it without making it active, and the runs went to the Default experiment."""
    found = mlflow.MlflowClient().get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise ConfigError(f"tracking.experiment: {name!r} is in MLflow's trash; restore it (mlflow experiments "
                          f"restore --experiment-id {found.experiment_id}) or name another")
    experiment = mlflow.set_experiment(name)
    return experiment if found is not None else mlflow.set_experiment(experiment_id=experiment.experiment_id)


def _check_artifact_location(experiment_id: str) -> None:
    """ConfigError naming the folder where experiment `experiment_id` keeps its artifacts in a local folder this user
    cannot write (`unwritable_artifact_location`). MLflow's NotADirectoryError or PermissionError came as a traceback
    once the step's first artifact was written, its run ended FAILED with nothing in it."""
    experiment = mlflow.MlflowClient().get_experiment(experiment_id)
    if unwritable := unwritable_artifact_location(experiment.artifact_location or ""):
        folder, reason = unwritable
        raise ConfigError(f"tracking.experiment: experiment {experiment.name!r} keeps its artifacts in {folder}, where "
                          f"this user cannot write: {reason}; make it a folder this user may write, or name another "
                          f"experiment")


@contextlib.contextmanager
def _ended_with_reason(start: Callable[[], mlflow.ActiveRun],
                       not_failures: tuple[type[BaseException], ...] = ()) -> Iterator[mlflow.ActiveRun]:
    """Open a run with `start` (an `mlflow.start_run`) and enter it; a SIGTERM/SIGINT inside ends the run KILLED (not
    FAILED). Any other exception ends it FAILED with tag `failure_reason` (`reason_of`; unless the step already gave
    one), and goes on as it was (an unexpected one's traceback is printed as ever). `not_failures` end the run without
    the tag: the caller settles how (a sweep's pruned fit). Runs nested in each other (main's and its steps') end one
    after the other with the same exception, and so get the same reason. A claim the step holds on the run
    (`resume.claim`: a train run's) goes once the run has ended, however it ends: released before, an identical
    command started meanwhile resumed the run, then saw it ended under it. A SIGTERM/SIGINT that arrives while MLflow
    opens the run (`interrupts.deferred`: the run written, not yet on MLflow's active-run list) is raised once it is
    open, and ends it KILLED: else it stayed RUNNING for good. One that arrives while MLflow ends a run whose step is
    done or failed (`mlflow.end_run`: the run taken off its stack, its status not yet written) ends it FINISHED or
    FAILED all the same, then goes on: else it stayed RUNNING for good."""
    run, ending = None, None  # ending: the status MLflow is writing as the block ends (FINISHED, FAILED)
    try:
        with contextlib.ExitStack() as entered:
            try:
                with interrupts.deferred():
                    run = entered.enter_context(start())
                yield run
                # A signal whose exception was swallowed on the way (a weakref callback's or `__del__`'s "Exception
                # ignored", a bare except): with the signals ignored from then on nothing else would stop the pipeline
                if (pending := interrupts.take()) is not None:
                    raise pending
                ending = "FINISHED"
            except (Interrupted, KeyboardInterrupt) as exc:
                if run is not None:
                    mlflow.set_tag("interrupted_by", signal.Signals(getattr(exc, "signum", signal.SIGINT)).name)
                    mlflow.end_run("KILLED")  # the context's own exit then finds the run ended
                    exc.ended_runs = True  # for `cli`'s line: a run was open
                raise
            except not_failures:
                raise
            except Exception as exc:
                if run is not None:
                    tag_failure(run.info.run_id, reason_of(exc), exc)
                    ending = "FAILED"
                raise
    except (Interrupted, KeyboardInterrupt):
        if ending:  # the handler ignores any further signal: this end is not cut short
            with contextlib.suppress(MlflowException):
                if (active := mlflow.active_run()) is not None and active.info.run_id == run.info.run_id:
                    mlflow.end_run(ending)
                else:
                    mlflow.MlflowClient().set_terminated(run.info.run_id, ending)
        raise
    finally:
        if run is not None:
            from pipeline.tracking.resume import release  # (it imports this module)

            release(run.info.run_id)


def reason_of(exc: Exception) -> str:
    """Tag `failure_reason` of a run `exc` ended: an expected failure's one line (`EXPECTED_FAILURES`), a tracking
    server's failure as `cli` says it (exit 4), else `unexpected_reason`."""
    if isinstance(exc, EXPECTED_FAILURES):  # a message may quote a long value (a path, a param)
        return shortened(str(exc), 5000)
    return _server_failure(exc) or unexpected_reason(exc)


def unexpected(exc: BaseException) -> bool:
    """Whether `exc` is a failure no step expects: `cli` lets its traceback print (`unexpected_reason`)."""
    return isinstance(exc, Exception) and not isinstance(exc, EXPECTED_FAILURES) and _server_failure(exc) is None


def _server_failure(exc: BaseException) -> str | None:
    """What `cli` says of an MlflowException from a tracking server (exit 4: the server failed; credentials in the
    URI as `***`); None for any other exception or store."""
    uri = mlflow.get_tracking_uri()
    if not isinstance(exc, MlflowException) or not uri.startswith(("http://", "https://")):
        return None
    shown = _without_password(uri)  # MLflow's message quotes the request's URL, credentials and all
    # A server gone: the OS's reason, as `_check_server_answers` says it; it ends MLflow's message, past 300 characters
    message = str(exc.message)
    errno = _os_reason(message.partition("failed with exception ")[2])
    reason = f"no answer ({errno})" if errno else _first_line(message.replace(uri, shown))
    return f"tracking server {shown} failed: {reason[:300]}"


def tag_failure(run_id: str, reason: str, exc: BaseException) -> None:
    """Tag run `run_id` `failure_reason` `reason`, as `exc` ended it, unless it has one (the step's own, or one given
    for `exc` before: the run `mlflow run` opened is often the step's). Never raises: the tracking store may be what
    failed, and `exc` is the error to report. Once a try failed, no other is made for `exc` (a server that stopped
    answering takes 7 s of MLflow's retries to fail each request, with this module's MLFLOW_HTTP_REQUEST_* defaults,
    on a 2-core AMD EPYC),
    nor for an exception raised while handling it (MLflow's own end of the run failing the same way)."""
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        if getattr(cause, "_failure_reason_untaggable", False):
            return
        seen.add(id(cause))
        cause = cause.__context__
    try:
        client = mlflow.MlflowClient()
        if "failure_reason" not in client.get_run(run_id).data.tags:
            client.set_tag(run_id, "failure_reason", reason)
    except Exception:  # noqa: BLE001 - whatever the store raises (MlflowException, a driver's error)
        with contextlib.suppress(AttributeError):  # an exception type with __slots__ takes no attribute
            exc._failure_reason_untaggable = True


@contextlib.contextmanager
def failing_step(step: str, *, rerun: str = "") -> Iterator[None]:
    """A pipeline's `step` (main's prepare, train, evaluate, register): an exception out of it tags the active run (the
    pipeline's) `failed_step` and carries the step's name (`cli` ends its line with it) and `rerun`, what rerunning
    does, if not what `cli` says of a step that trains (the checkpoint it resumes from), then goes on as it was. Never
    asks a store that already failed to tag `exc` (see `tag_failure`)."""
    try:
        yield
    except Exception as exc:
        if getattr(exc, "failed_step", None) is None:
            with contextlib.suppress(AttributeError):  # an exception type with __slots__ takes no attribute
                exc.failed_step, exc.rerun_hint = step, rerun
            if mlflow.active_run() is not None and not getattr(exc, "_failure_reason_untaggable", False):
                try:
                    mlflow.set_tag("failed_step", step)
                except Exception:  # noqa: BLE001 - whatever the store raises: `exc` is the error to report
                    with contextlib.suppress(AttributeError):
                        exc._failure_reason_untaggable = True
        raise


def _in_step(exc: BaseException) -> str:
    """" (main failed in its <step> step)" for an exception a pipeline's step raised (`failing_step`), else ""."""
    step = getattr(exc, "failed_step", None)
    return f" (main failed in its {step} step)" if step else ""


def _settle_wrapper_run(run_id: str, status: str, *, delete: bool = False) -> None:
    """Give the run `mlflow run` opened for this step (MLFLOW_RUN_ID) its final `status`, and `delete` it.

    `mlflow run` marks its run FINISHED or FAILED once the step has exited, overwriting whatever the step
    set (MLflow 3.17 checks for an already ended run by comparing a status name with status numbers,
    which never matches). So a detached `python -m pipeline.tracking --settle` waits for `mlflow run`
    (this process's parent) to exit and then writes the status: the last word.
    """
    subprocess.Popen([sys.executable, "-m", "pipeline.tracking", "--settle", run_id, status, str(os.getppid()),
                      *(["--delete"] if delete else [])], cwd=PROJECT_ROOT, start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _end_refused_run(run_id: str, reason: str) -> None:
    """A run `mlflow run` opened for a command refused on bad input holds nothing: it ends FAILED with the
    reason and goes to the trash, so no empty, randomly named run is left in the experiment."""
    with contextlib.suppress(MlflowException):
        client = mlflow.MlflowClient()
        if client.search_runs([client.get_run(run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{run_id}'", max_results=1):
            return  # steps ran under it: keep it as their record
        client.set_tag(run_id, "failure_reason", reason)
        _settle_wrapper_run(run_id, "FAILED", delete=True)


def cli(main: Callable[[], object], *, resumable: bool = False) -> None:
    """Run an entry point's `main`, turning expected failures into one line on stderr.

    Exit 2: a bad param or data file (a run `mlflow run` opened for it is marked FAILED and
    deleted). Exit 3: the step failed (e.g. training diverged). Exit 4: the tracking server
    stopped answering (after bounded retries); `resumable` entry points (those that train) add how
    to continue from the checkpoint. Exit 130 (SIGINT), 143 (SIGTERM, what `mlflow run` sends its
    step on Ctrl-C) or 129 (SIGHUP: the terminal hung up; not under `nohup`, which ignores it): interrupted; every
    open run ends KILLED (the line says so, or that no run was open) and checkpoints stay. Any other exception (a bug,
    a full disk, an error of TensorFlow or JAX) goes on, its traceback printed, and exits 1. A run that a failure
    ends FAILED carries tag `failure_reason` (`reason_of`), as does the run `mlflow run` opened.
    The SQLite store is created first, under a file lock (see `ensure_store`), unless the command line asks for
    `--help`, which needs no store (nor a server that answers).
    At exit the objects alive are frozen out of the cyclic collector: the interpreter's final
    collections over TensorFlow's and Keras's objects added ~4 s to the end of every step and freed
    nothing the OS does not reclaim anyway (bench/results/step_exit.md). Exit handlers all still run.
    """
    global _stopping_signals
    _freeze_at_exit()
    _stopping_signals = (signal.SIGTERM, signal.SIGINT) + (
        (signal.SIGHUP,) if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL else ())
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in _stopping_signals}
    wrapper_run = os.environ.get("MLFLOW_RUN_ID")  # read now: MLflow unsets it when that run ends
    started = False  # whether `main` ran: a server that did not answer at the start stopped nothing to resume
    try:
        if not asks_for_help(sys.argv[1:]):  # argparse prints the help and exits 0: no store to make
            ensure_store()
        started = True
        interrupts.take()  # one an earlier entry point in this process handled
        main()
        if (pending := interrupts.take()) is not None:  # swallowed outside any step (see `_ended_with_reason`)
            raise pending
    except SystemExit as exc:
        # `mlflow run . -P help=1` reaches the step as `--help 1`: argparse printed the help and exits 0, and the run
        # `mlflow run` opened, which holds nothing, was left FINISHED in the experiment
        if wrapper_run and exc.code in (0, None) and asks_for_help(sys.argv[1:]):
            _settle_wrapper_run(wrapper_run, "FINISHED", delete=True)
        raise
    except (Interrupted, KeyboardInterrupt) as exc:
        interrupts.take()  # handled here
        signum = getattr(exc, "signum", signal.SIGINT)
        ended = getattr(exc, "ended_runs", False) or wrapper_run or mlflow.active_run() is not None
        with contextlib.suppress(MlflowException):
            while mlflow.active_run():
                mlflow.end_run("KILLED")
            if wrapper_run:  # the run `mlflow run` opened, whether this step entered it or not
                mlflow.MlflowClient().set_tag(wrapper_run, "interrupted_by", signal.Signals(signum).name)
                _settle_wrapper_run(wrapper_run, "KILLED")
        hint = _resume_hint() if resumable else ""
        with contextlib.suppress(OSError):  # a terminal that hung up takes no line (EIO)
            # stopped before any run opened (prepare reading its source): said, not "open runs ended KILLED"
            print(f"error: interrupted by {signal.Signals(signum).name}; "
                  f"{'open runs ended KILLED' if ended else 'no run was open'}.{hint}",
                  file=sys.stderr)
        sys.exit(128 + signum)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}{_in_step(exc)}", file=sys.stderr)
        if wrapper_run:
            _end_refused_run(wrapper_run, reason_of(exc))
        sys.exit(2)
    except StepFailed as exc:
        print(f"error: {exc}{_in_step(exc)}", file=sys.stderr)
        if wrapper_run:  # where it failed outside the step's run (a prepare before `mlflow run . -e train`'s run)
            tag_failure(wrapper_run, reason_of(exc), exc)
        sys.exit(3)
    except Exception as exc:
        if wrapper_run:
            tag_failure(wrapper_run, reason_of(exc), exc)
        if unexpected(exc):
            raise  # the traceback prints, as Python prints it
        if not started:  # the hint of epochs checkpointed, if any, read as if a step had run
            print(f"error: {_server_failure(exc)}; nothing ran: rerun the same command once it answers",
                  file=sys.stderr)
            sys.exit(4)
        hint = (getattr(exc, "rerun_hint", "") or _resume_hint()) if resumable else ""
        print(f"error: {_server_failure(exc)}{_in_step(exc)}.{hint}", file=sys.stderr)
        sys.exit(4)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stopping_signals = (signal.SIGTERM, signal.SIGINT)
        if (resume := sys.modules.get("pipeline.tracking.resume")) is not None:  # loaded by the steps that train
            resume.training_ended()


def _resume_hint() -> str:
    from pipeline.tracking.resume import stopped_training  # (resume imports this module)

    # "if any": a step stopped before its first epoch ended (loading data, waiting for a cluster's hosts) has none
    return " " + (stopped_training() or f"Completed epochs, if any, are checkpointed under {checkpoint_root()}: rerun "
                                        f"the same command to resume.")


@functools.cache
def _freeze_at_exit() -> None:
    atexit.register(gc.freeze)


def _settle(run_id: str, status: str, wait_for_pid: int, delete: bool, timeout: float = 300) -> None:
    """Once process `wait_for_pid` has exited (at most `timeout` s), end run `run_id` with `status`
    (and move it to the trash if `delete`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(wait_for_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    client = mlflow.MlflowClient()
    client.set_terminated(run_id, status)
    if delete:
        client.delete_run(run_id)



# ---------------------------------------------------------------- the active run

def tracking_uri() -> str:
    """The tracking store this process writes to (`MLFLOW_TRACKING_URI`, else MLflow's default)."""
    return mlflow.get_tracking_uri()


def active_run_id() -> str:
    """Id of the active run (the innermost one a step or the caller opened)."""
    return mlflow.active_run().info.run_id


def log_params(params: dict) -> None:
    """Log `params` on the active run (MLflow keeps them as strings, and never changes one). One that `mlflow run`
    logged already as the entry point's -P is left as it is: MLflow logs a -P shell-quoted (`'/my data/d.npz'`), and
    logging the value as given failed ("Changing param values is not allowed") once the step's work was done."""
    logged = mlflow.MlflowClient().get_run(active_run_id()).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged or logged[k] != quote(str(v))})


def given_param(value: str | None) -> str | None:
    """A logged param as the command was given it: one `mlflow run` logged as an entry point's -P, shell-quoted
    (`'/my data/d.npz'`, `''` for one left out), unquoted; any other as it is (a step logs its own unquoted)."""
    if not isinstance(value, str) or not (value.startswith("'") and value.endswith("'")):
        return value
    try:
        parts = shlex.split(value)
    except ValueError:  # an unbalanced quote: no quoting of mlflow run's
        return value
    return "" if not parts else parts[0] if len(parts) == 1 else value


def log_metrics(metrics: dict[str, float]) -> None:
    """Log `metrics` on the active run."""
    mlflow.log_metrics(metrics)


def log_constants(metrics: dict[str, float]) -> None:
    """Log `metrics`, values a run has once (its image counts), on the active run where it holds none of that value
    yet: a resumed run's session logs them again, which put a second point at step 0 in each one's history."""
    held = mlflow.MlflowClient().get_run(active_run_id()).data.metrics
    if new := {key: value for key, value in metrics.items() if held.get(key) != value}:
        mlflow.log_metrics(new)


def set_tags(tags: dict[str, str]) -> None:
    """Set `tags` on the active run."""
    mlflow.set_tags(tags)


def log_dict(value: dict, artifact_file: str) -> None:
    """Log `value` as a JSON (or YAML, by the file's extension) artifact of the active run."""
    mlflow.log_dict(value, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    """Log `text` as an artifact of the active run."""
    mlflow.log_text(text, artifact_file)


@contextlib.contextmanager
def artifact_dir(artifact_path: str | None = None) -> Iterator[Path]:
    """A temporary folder to write files into; when the block ends without an error, its files become
    artifacts of the active run (under `artifact_path`, else at the top)."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)
        mlflow.log_artifacts(tmp, artifact_path)


def metric_history(run_id: str, key: str) -> pd.Series:
    """A run's metric `key` per step (index: step; the newest value where a step was logged twice)."""
    history = mlflow.MlflowClient().get_metric_history(run_id, key)
    return pd.Series({m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))},
                     name=key, dtype=float)


# ---------------------------------------------------------------- logged models, metrics, runs by key

# Tag on a logged model, its evaluate run and its registered versions: the sha256 of the test split its test_acc
# was measured on. Scores compare only between equal digests.
TEST_DATA_TAG = "test_data_sha256"
# Tag on a training run: the sha256 of the images its val_acc was measured on (`data.arrays_digest`; with
# train.validation_fraction 0 the test split's, equal to its TEST_DATA_TAG). val_accs compare only between equal ones.
VAL_DATA_TAG = "val_data_sha256"
# Tag on a training run: its params that have no effect given the others (`config.inert_params`), as JSON
# {key: the params that make it so}; "{}" where none. compare shows no column that differs only in such values.
INERT_PARAMS_TAG = "inert_params"
# Tag on a train or evaluate run: the sha256 of the dataset file's bytes (`resume.dataset_sha256`: a local file's, or a
# `runs:/` artifact's), on a train run when it last started or resumed (`config_to_resume` checks a `resume=<id>` on a
# local file against it). An evaluation is of the data a model trained on where these are equal, however either
# command spelled the path or named the file (a copy of a prepare run's artifact: `same_dataset`).
DATASET_SHA256 = "dataset_sha256"


def model_id(model_uri: str | None) -> str | None:
    """`models:/m-...` -> the logged model's id (None for registry URIs like models:/name/1, a bare `m-...`, or
    no URI: MLflow registers a bare id as a version whose source is that string, which no one can load)."""
    if not isinstance(model_uri, str) or not model_uri.startswith("models:/"):  # NaN: a run without the tag
        return None
    tail = model_uri.removeprefix("models:/")
    return tail if tail.startswith("m-") and "/" not in tail else None


def latest_metrics(metrics, runs: dict | None = None) -> dict[str, float]:
    """{key: value} of MLflow Metric entities, keeping each key's newest (by timestamp; the later one on ties). With
    `runs` ({run id: its RunData}), metrics logged on a logged model: each 0.0 whose run's own value of that key is NaN
    reads NaN (`logged_value`)."""
    latest: dict[str, tuple[int, float]] = {}
    for metric in metrics or []:
        if metric.key not in latest or metric.timestamp >= latest[metric.key][0]:
            latest[metric.key] = (metric.timestamp, logged_value(metric, runs))
    return {key: value for key, (_, value) in latest.items()}


def logged_value(metric, runs: dict | None) -> float:
    """A logged model's metric as its run logged it: MLflow's SQL store writes a logged model's NaN as 0.0 (it flags a
    run's NaN metrics, not a model's), and a diverged model's NaN test_acc read as a score of 0. Its run (`runs`:
    {run id: RunData}) holds the NaN: a 0.0 whose run logged that key as NaN is NaN."""
    run = (runs or {}).get(metric.run_id)
    if metric.value == 0 and run is not None and math.isnan(run.metrics.get(metric.key, 0.0)):
        return math.nan
    return metric.value


def finished_run(run_id: str | None):
    """The run `run_id` if it FINISHED and was not deleted, else None: the metrics an evaluate run that failed, was
    killed, is still running or was deleted logged on a model are no evaluation (register and compare skip them)."""
    if not run_id:
        return None
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return None  # deleted for good (`mlflow gc`)
    return run if run.info.status == "FINISHED" and run.info.lifecycle_stage == "active" else None


def dataset_location(uri: str | None) -> str:
    """Where a dataset URI points, however it is spelled: a local file (a path, relative or not, or a `file:` URI) as
    its absolute path, links followed (`./data/d.npz`, `data/d.npz`, `/proj/data/d.npz` and `file:///proj/data/d.npz`
    are one; a relative path read from the current folder, where `mlflow run` runs every step); a `runs:/` URI with its
    artifact path normalized; any other URI as it is; "" for none."""
    if not uri:
        return ""
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        return f"runs:/{run_id}/{posixpath.normpath(path) if path else ''}"
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", uri) and not uri.startswith("file:"):  # s3://, mlflow-artifacts:/, ...
        return uri
    return os.path.realpath(local_path(uri))


def same_dataset(uri: str | None, sha256: str | None, other_uri: str | None, other_sha256: str | None) -> bool:
    """Whether two runs' dataset URIs (and their tags DATASET_SHA256, where they have one) name the same data: the
    same file bytes where both know them (the same path written again since holds other data), else the same place
    (`dataset_location`); never where one names none (None: a run without the param)."""
    if sha256 and other_sha256:
        return sha256 == other_sha256
    return uri is not None and other_uri is not None and dataset_location(uri) == dataset_location(other_uri)


def model_score(model_uri: str | None, dataset_uri: str | None = None, dataset_sha256: str | None = None
                ) -> tuple[dict[str, float], str | None]:
    """(latest value of each metric logged on the model `models:/m-...` by finished evaluate runs (`finished_run`),
    tag `test_data_sha256` of the evaluate run whose test_acc that is: the test split it was measured on); ({}, None)
    if none or unknown. With `dataset_uri` (and `dataset_sha256`, the train run's tag DATASET_SHA256), of the runs
    that evaluated that dataset only (`same_dataset`: their param `dataset_uri` may spell it otherwise). One read of
    the model and one of each run that logged on it."""
    found = model_id(model_uri)
    if found is None:
        return {}, None
    try:
        metrics = mlflow.get_logged_model(found).metrics or []
    except MlflowException:
        return {}, None  # the model was deleted or lives in a store this client cannot see
    runs = {run_id: run.data for run_id in {m.run_id for m in metrics if m.run_id}
            if (run := finished_run(run_id)) is not None}
    metrics = [m for m in metrics if m.run_id in runs]
    if dataset_uri is not None:  # an evaluate run's param as `mlflow run . -e evaluate` logged it: shell-quoted
        metrics = [m for m in metrics if same_dataset(given_param(runs[m.run_id].params.get("dataset_uri")),
                                                      runs[m.run_id].tags.get(DATASET_SHA256), dataset_uri,
                                                      dataset_sha256)]
    scores = [m for m in metrics if m.key == "test_acc"]
    test_data = runs[max(scores, key=lambda m: m.timestamp).run_id].tags.get(TEST_DATA_TAG) if scores else None
    return latest_metrics(metrics, runs), test_data


def finished_runs(tag: str, key: str) -> Iterator[str]:
    """Ids of the FINISHED runs, in any experiment, whose tag `tag` equals `key`, the first to finish first. The first,
    so that every later command finds the same one (a prepare to reuse: `prepare.find_prepared`): a later identical
    run (a prepare run on its own) would change what they find, and with it the `train_key` a rerun resumes by. The
    first to finish, not to start: no run finishing later can come before it (two identical commands started together
    each prepared, and the one whose prepare started later but finished first trained on a dataset no later command
    found: killed, its rerun trained afresh)."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.{tag} = '{key}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.end_time ASC", "attributes.start_time ASC"])
    return (r.info.run_id for r in runs)


def unfinished_runs(tag: str, key: str) -> list[str]:
    """Ids of the runs, in any experiment, whose tag `tag` equals `key` and that did not finish; newest first."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              order_by=["attributes.start_time DESC"], filter_string=f"tags.{tag} = '{key}'")
    return [r.info.run_id for r in runs if r.info.status != "FINISHED"]


# ---------------------------------------------------------------- run descriptions

def prepare_run_id(dataset_uri: str) -> str | None:
    """`runs:/<id>/dataset/dataset.npz` -> <id>."""
    match = re.match(r"runs:/([0-9a-f]+)/", dataset_uri or "")
    return match.group(1) if match else None


def local_path(uri: str) -> str:
    """The local file a dataset URI that is no `runs:/` one names, as MLflow reads it (`download_artifacts`): a `file:`
    URI's path unquoted (an artifact root in a folder with a space or a non-ASCII letter gives
    `file:///tmp/d%C3%ADr%20x/.../dataset.npz`), a plain path as typed."""
    return local_file_uri_to_path(uri) if uri.startswith("file:") else uri


def model_summary(params: dict[str, str], tags: dict[str, str]) -> str:
    """The model of a training run in words, from its params and tags (`model_depth`)."""
    depth, widths = tags.get("model_depth", "?"), params.get("model.widths", "?")
    if params.get("model.arch") == "resnet9":
        stem = ", patch-whitening stem" if params.get("model.stem") == "whiten" else ""
        return f"ResNet-9 (conv-BN-ReLU, widths {widths}{stem})"
    return (f"Pre-activation ResNet-{depth} ({params.get('model.block', '?')} blocks, "
            f"units_per_stage {params.get('model.units_per_stage', '?')}, widths {widths})")


def trained_dataset_uri(run) -> str:
    """The dataset a train run trained on: its tag `dataset_uri`, else (runs before the tag) its param (under
    `mlflow run . -e train` that param is the -P as given, shell-quoted, often '')."""
    return run.data.tags.get("dataset_uri") or given_param(run.data.params.get("dataset_uri", ""))


def describe_train_run(run_id: str, *, overwrite: bool = False) -> str | None:
    """Write a training run's description (tag mlflow.note.content): model, recipe and data digest.

    The data digest is tag `dataset_sha256` of the prepare run named in the run's `dataset_uri`
    param. Keeps an existing description unless `overwrite`. Returns the text written, or None.
    """
    client = mlflow.MlflowClient()
    try:
        train = client.get_run(run_id)
    except MlflowException:
        return None  # deleted for good (`mlflow gc`): its model may still be registered, undescribed
    if train.info.lifecycle_stage != "active" or (train.data.tags.get("mlflow.note.content") and not overwrite):
        return None  # a deleted run takes no tags
    params, tags = train.data.params, train.data.tags
    dataset_uri = trained_dataset_uri(train)
    prepare_id = prepare_run_id(dataset_uri)
    try:
        digest = client.get_run(prepare_id).data.tags.get("dataset_sha256", "unknown") if prepare_id else "unknown"
    except MlflowException:
        digest = "unknown"  # the prepare run was deleted
    local = local_path(dataset_uri)
    if local and not prepare_id:  # a local dataset file: prepare wrote its digest in the dataset.json beside it
        with contextlib.suppress(OSError, ValueError, AttributeError):
            digest = json.loads(Path(local).with_name("dataset.json").read_text()).get("sha256") or digest
    epochs = tags.get("extended_epochs", "").rpartition("-> ")[2] or params.get("train.epochs", "?")
    lr = params.get("train.lr", "?")
    if (effective := tags.get("effective_lr")) and effective != lr:  # train.lr_scaling linear: the lr trained with
        lr = f"{effective} (train.lr {lr} scaled to the batch)"
    note = (f"{model_summary(params, tags)}, {epochs} epochs, "
            f"batch {params.get('train.batch_size', '?')}, lr {lr}.\n\n"
            f"Data: `{params.get('data.source', '?')}`, sha256 `{digest}` (prepare run `{prepare_id}`).\n\n"
            f"Model: `{tags.get('model_uri', '?')}`.")
    # two registers describing it at once: MLflow's SQL store reads, then inserts
    written_despite_a_race(lambda: client.set_tag(run_id, "mlflow.note.content", note))
    return note


def duplicate_insert(exc: MlflowException, table: str | None = None) -> bool:
    """Whether `exc` is the database refusing an insert (into `table`, where given) as a duplicate: another process
    inserted the same key between MLflow's read and its insert (its SQL store reads, then inserts). Written again, the
    value is an update, or the row found. Told by MLflow's message, which names the database's error and SQLAlchemy's
    statement (`[SQL: INSERT INTO <table> ...`) alike in this process and from a tracking server, which sends the
    message alone (a `RestException`, no SQLAlchemy exception behind it)."""
    message = str(exc.message)
    return bool(re.search(r"unique constraint|IntegrityError|UniqueViolation|duplicate key", message, re.IGNORECASE)
                and (table is None or re.search(rf"\[SQL: INSERT INTO {re.escape(table)}\b", message, re.IGNORECASE)))


def written_despite_a_race(write: Callable[[], object], table: str | None = None) -> None:
    """`write()`, once more where the database refused its insert (into `table`, where given) as a duplicate
    (`duplicate_insert`): MLflow rolled that write back whole, and the second finds the other process's row. Any other
    failure, and a second one, raises."""
    try:
        write()
    except MlflowException as exc:
        if not duplicate_insert(exc, table):
            raise
        write()
