"""End to end on the team setup: `scripts/team-server.sh` (PostgreSQL 15 + `mlflow server` with proxied
artifacts), `main`, and a sweep whose two worker commands (as on two hosts) share one Optuna study in
PostgreSQL. Everything is checked through the server's REST API, plus both databases directly.

PostgreSQL must be installed (CI installs and starts it): without it this test fails, it does not skip.
Each run creates its own two databases (unique names) and drops them afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import optuna
import psycopg2
import psycopg2.errors
import pytest

from bench.servers import free_port, server_run_command, stop_group, wait_until_up
from pipeline.sweep import best_of
from tests.conftest import ROOT, eventually, http_stub
from tests.test_compare import api, artifact_bytes, create_experiment, params_of, search, tags_of

SCRIPT = ROOT / "scripts" / "team-server.sh"
USER, PASSWORD = "mlflow", "mlflow"  # the script's default role
TINY = "params/tiny.yaml"
# one stage of basic blocks: the model is not what these tests are about
SMALL = ("data.synthetic_train=512 data.synthetic_test=128 train.epochs=2 evaluate.samples=1 model.block=basic "
         "model.widths=[16] model.strides=[1]")


def drop_databases(port: str, *names: str, timeout: float = 60, user: str = USER, password: str = PASSWORD) -> None:
    """DROP ... WITH (FORCE), as the role that owns them, retried while a session this role may not end (an
    autovacuum worker that has just started on the new database) still holds one."""
    connection = psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="postgres")
    connection.autocommit = True  # DROP DATABASE runs outside a transaction
    with connection.cursor() as cursor:
        def dropped(name: str) -> bool:
            try:
                cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            except (psycopg2.errors.InsufficientPrivilege, psycopg2.errors.ObjectInUse):
                return False
            return True

        for name in names:
            eventually(lambda name=name: dropped(name), timeout)
    connection.close()


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The documented command, on its own databases, role and port: {"url", "optuna", "mlflow_db", "pgport", "user",
    "password"}. The role's password holds characters that URLs and SQL treat specially (see
    test_a_password_with_url_and_sql_characters_works_and_stays_off_command_lines): one server start for both."""
    folder = tmp_path_factory.mktemp("team")
    suffix = uuid.uuid4().hex[:10]
    user, password = f"mlflow_pw_{suffix}", f"p@ss/w:rd?#%$$'x {suffix}"
    port, pgport = free_port(), os.environ.get("PGPORT", "5432")
    settings = {"MLFLOW_DB": f"mlflow_test_{suffix}", "OPTUNA_DB": f"optuna_test_{suffix}", "ARTIFACTS": str(folder /
                "artifacts"), "HOST": "127.0.0.1", "PORT": str(port), "WORKERS": "1", "PGPORT": pgport,
                "ALLOWED_HOSTS": "team-host.example", "DB_USER": user, "DB_PASSWORD": password}
    # No GenAI job runner: it starts several busy consumer processes that this test never uses.
    env = {**os.environ, **settings, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "TMPDIR": str(folder)}
    log = folder / "server.log"
    with log.open("ab") as out:
        process = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process, timeout=300, log=log)
        yield {"url": f"http://127.0.0.1:{port}", "pgport": pgport, "mlflow_db": settings["MLFLOW_DB"],
               "optuna": f"postgresql://{user}@127.0.0.1:{pgport}/{settings['OPTUNA_DB']}", "user": user,
               "password": password}
    finally:
        stop_group(process)
        with contextlib.suppress(psycopg2.OperationalError):
            drop_databases(pgport, settings["MLFLOW_DB"], settings["OPTUNA_DB"], user=user, password=password)
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else ["sudo", "-u", "postgres"]
        subprocess.run([*as_postgres, "psql", "-p", pgport, "-qc", f"DROP ROLE IF EXISTS {user}"], check=True,
                       cwd="/")


def mlflow_run(url: str, experiment: str, entry: str, password: str, **params: str) -> subprocess.Popen:
    """`mlflow run` against the team server, started in the background; the Optuna password comes from
    PGPASSWORD, so it never appears in a logged param."""
    cmd, env = server_run_command(url, experiment, entry, params, PGPASSWORD=password)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def test_main_and_a_two_worker_sweep_on_the_postgresql_server(team, tmp_path, in_process):
    import mlflow

    url, user, password = team["url"], team["user"], team["password"]
    experiment_id = create_experiment(url, "team")
    # `main` in this process (`mlflow run` against the server: the sweep's commands below), logging to the server
    try:
        done = in_process("main", "--params", TINY, "--overrides", f"{SMALL} tracking.experiment=team",
                          env={"MLFLOW_TRACKING_URI": url, "PIPELINE_CHECKPOINT_DIR": str(tmp_path / "checkpoints")})
    finally:
        mlflow.tracking.fluent._active_experiment_id = None  # the server's "team": no other test's
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert [r["info"]["status"] for r in search(url, experiment_id, "tags.step = 'main'")] == ["FINISHED"]

    # Two workers started as on two hosts: the same command, one study of 4 trials in PostgreSQL. The first under
    # `mlflow run` (it starts the study and leads it); the second, once the first is in a trial, in this process (the
    # sweep's `python -m pipeline.sweep`, as `mlflow run` runs it).
    spec = tmp_path / "sweep-team.yaml"
    spec.write_text(f"base: {TINY}\noverrides: {{train.validation_fraction: 0.125}}\n"
                    "grid:\n  train.lr: [0.2, 0.05, 0.01, 0.005]\n"
                    "pruner: {type: median, n_startup_trials: 2}\n")
    sweep = dict(spec=str(spec), overrides=SMALL, storage=team["optuna"], study="team-sweep")
    optuna_url = team["optuna"].replace(f"postgresql://{user}@",
                                        f"postgresql+psycopg2://{user}:{urllib.parse.quote(password, safe='')}@")
    first = mlflow_run(url, "team", "sweep", password, **sweep)
    optuna_db = psycopg2.connect(host="127.0.0.1", port=team["pgport"], user=user, password=password,
                                 dbname=team["optuna"].rsplit("/", 1)[1])
    optuna_db.autocommit = True
    try:
        def in_a_trial() -> bool:
            """the first worker has claimed a trial"""
            if first.poll() is not None:
                raise AssertionError(f"the first worker ended first: {first.stdout.read()[-4000:]}")
            with optuna_db.cursor() as cursor:
                try:
                    cursor.execute("SELECT count(*) FROM trials JOIN studies USING (study_id) "
                                   "WHERE study_name = 'team-sweep' AND state = 'RUNNING'")
                except psycopg2.errors.UndefinedTable:  # Optuna's tables are not made yet
                    return False
                return cursor.fetchone()[0] > 0

        eventually(in_a_trial, 300)
        second = in_process("sweep", *(f"--{k}={v}" for k, v in sweep.items()), env={"PGPASSWORD": password})
    finally:
        optuna_db.close()
        mlflow.tracking.fluent._active_experiment_id = None
        outputs = [finish(first)]
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    outputs.append(second.stdout)
    # The dashboard hint names the driver the storage opened (a bare postgresql:// needs psycopg 3).
    assert f"optuna-dashboard postgresql+psycopg2://{user}@" in outputs[0], outputs[0]
    assert "started Optuna study team-sweep" in outputs[0] and "joined Optuna study team-sweep" in outputs[1]

    # One sweep parent; every trial is its child, each trial ran once, on one of the two workers.
    parents = search(url, experiment_id, "tags.step = 'sweep'")
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED", outputs
    parent_id = parents[0]["info"]["run_id"]
    trials = search(url, experiment_id, f"tags.step = 'trial' and tags.mlflow.parentRunId = '{parent_id}'")
    assert len(trials) == 4
    assert sorted(int(tags_of(r)["optuna_trial"]) for r in trials) == list(range(4))
    assert sorted(params_of(r)["train.lr"] for r in trials) == sorted(["0.2", "0.05", "0.01", "0.005"])
    assert {r["info"]["status"] for r in trials} <= {"FINISHED", "KILLED"}
    assert len({tags_of(r)["worker"] for r in trials}) == 2  # both workers took trials
    assert len(search(url, experiment_id, "tags.step = 'trial'")) == 4  # and no other trial run exists

    # The Optuna study in PostgreSQL agrees: 4 trials, finished or pruned, each naming its MLflow run.
    study = optuna.load_study(study_name="team-sweep", storage=optuna_url)
    assert len(study.trials) == 4
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r["info"]["run_id"] for r in trials}
    assert study.user_attrs["mlflow_parent_run_id"] == parent_id
    for run in trials:
        if run["info"]["status"] == "KILLED":
            assert int(tags_of(run)["pruned_at_epoch"]) < 2

    # Per-epoch metrics of a training run, through the REST API.
    # The best by registration's rule (val_acc, the first of equals), not by test_acc: the two may disagree.
    winner = best_of(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))).user_attrs["mlflow_run_id"]
    best_trial = next(r for r in trials if r["info"]["run_id"] == winner)
    best_train = tags_of(best_trial)["train_run_id"]
    history = api(url, "/api/2.0/mlflow/metrics/get-history", run_id=best_train, metric_key="val_acc")["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2] and all(0 <= m["value"] <= 1 for m in history)
    assert tags_of(parents[0])["best_trial_run_id"] == best_trial["info"]["run_id"]

    # The registry: main's version 1 and exactly one version from the sweep, its best trial; the alias
    # on the better of the two.
    versions = api(url, "/api/2.0/mlflow/model-versions/search", filter="name = 'cifar10-resnet'")["model_versions"]
    assert sorted(v["version"] for v in versions) == ["1", "2"]
    v2 = next(v for v in versions if v["version"] == "2")
    accs = {v["version"]: float({t["key"]: t["value"] for t in v["tags"]}["test_acc"]) for v in versions}
    assert {t["key"]: t["value"] for t in v2["tags"]}["run_id"] == best_train
    champion = api(url, "/api/2.0/mlflow/registered-models/alias", name="cifar10-resnet",
                   alias="champion")["model_version"]
    assert champion["version"] == max(accs, key=lambda v: (accs[v], -int(v)))

    # Artifacts come through the server: the training history and the sweep's trials table.
    history_csv = artifact_bytes(url, best_train, "history.csv").decode()
    assert history_csv.splitlines()[0].startswith("epoch,") and len(history_csv.splitlines()) == 3
    table = artifact_bytes(url, parent_id, "trials.csv").decode()
    assert len(table.strip().splitlines()) == 5 and "train.lr" in table.splitlines()[0]

    # And the tracking store really is PostgreSQL.
    connection = psycopg2.connect(host="127.0.0.1", port=team["pgport"], user=user, password=password,
                                  dbname=team["mlflow_db"])
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (parent_id,))
        assert cursor.fetchone()[0] == 1
    connection.close()


def test_workers_opening_a_new_study_database_together_all_get_it():
    """Workers started together on a new database race to create Optuna's tables: none may fail."""
    import threading

    from pipeline import sweep

    pgport = os.environ.get("PGPORT", "5432")
    name = f"optuna_race_{uuid.uuid4().hex[:10]}"
    subprocess.run(["bash", str(SCRIPT), "postgres"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "MLFLOW_DB": f"{name}_mlflow", "OPTUNA_DB": name, "PGPORT": pgport})
    url = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{pgport}/{name}"
    start, errors, opened = threading.Barrier(4), [], []

    def worker():
        start.wait()
        try:
            opened.append(sweep.open_storage(url))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        assert len(opened) == 4
        study = optuna.create_study(storage=opened[0], study_name="s")
        assert [s.study_name for s in optuna.get_all_study_summaries(opened[3], include_best_trial=False)] == ["s"]
        del study
    finally:
        for storage in opened:
            storage.engine.dispose()
        drop_databases(pgport, name, f"{name}_mlflow")


def test_a_study_whose_database_goes_away_mid_sweep_is_one_line():
    """A sweep whose Optuna PostgreSQL failed mid-study (its server stopped, its database gone) died on a traceback
    of Optuna's, whose message blames the data ("invalid data in the commit, e.g. exceeding max length"), and the
    sweep run kept that message as its reason."""
    from pipeline import sweep
    from pipeline.tracking import StepFailed

    pgport = os.environ.get("PGPORT", "5432")
    name = f"optuna_gone_{uuid.uuid4().hex[:10]}"
    run_script("postgres", MLFLOW_DB=f"{name}_mlflow", OPTUNA_DB=name).check_returncode()
    url = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{pgport}/{name}"
    storage = sweep.open_storage(url)
    try:
        study = optuna.create_study(storage=storage, study_name="s")
        trial = study.ask()
        drop_databases(pgport, name)
        with pytest.raises(StepFailed) as failed, sweep.storage_failures(url):
            study.tell(trial, 0.5)  # Optuna's StorageInternalError, from SQLAlchemy's OperationalError
        assert str(failed.value) == (f"storage postgresql://{USER}:***@127.0.0.1:{pgport}/{name} failed: "
                                     f'connection to server at "127.0.0.1", port {pgport} failed: FATAL:  database '
                                     f'"{name}" does not exist; rerun the same command to go on with the study')
        with pytest.raises(ValueError, match="other"), sweep.storage_failures(url):
            raise ValueError("any other error goes on as it was")
    finally:
        storage.engine.dispose()
        drop_databases(pgport, name, f"{name}_mlflow")


# ---------------------------------------------------------------- the script's own checks

def run_script(*args: str, timeout: float = 120, **settings: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPORT": os.environ.get("PGPORT", "5432"), **settings}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def database_exists(name: str) -> bool:
    connection = psycopg2.connect(host="127.0.0.1", port=os.environ.get("PGPORT", "5432"), user=USER,
                                  password=PASSWORD, dbname="postgres")
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        found = cursor.fetchone() is not None
    connection.close()
    return found


def one_error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The script's one error line; `code` its exit status: 2 for a setting refused (the port taken, ARTIFACTS, the
    password, the cluster ...), 1 where this host lacks something or PostgreSQL fails."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), result
    return lines[0]


def request(url: str, host: str, *, origin: str | None = None) -> int:
    """The HTTP status of a GET (or, with `origin`, a browser's POST) to `url` with Host header `host`."""
    headers = {"Host": host, **({"Origin": origin, "Content-Type": "application/json"} if origin else {})}
    data = f'{{"name": "origin-{uuid.uuid4().hex[:8]}"}}'.encode() if origin else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_members_reach_the_server_by_this_hosts_name_and_allowed_hosts(team):
    """MLflow's default answers 403 to any Host header but localhost and private IPs, so
    MLFLOW_TRACKING_URI=http://team-host:5000 failed; and refused the UI's changes from its own origin."""
    port = team["url"].rsplit(":", 1)[1]
    search = f"{team['url']}/api/2.0/mlflow/experiments/search?max_results=1"
    for name in (socket.gethostname(), "team-host.example", "10.1.2.3", "localhost"):
        assert request(search, f"{name}:{port}") == 200, name
    assert request(search, f"evil.example:{port}") == 403  # the DNS-rebinding check stays on
    create = f"{team['url']}/api/2.0/mlflow/experiments/create"
    for name in (socket.gethostname(), "team-host.example"):
        assert request(create, f"{name}:{port}", origin=f"http://{name}:{port}") == 200, name
    assert request(create, f"{socket.gethostname()}:{port}", origin="http://evil.example") == 403


def test_ci_installs_python3_venv_where_python3_has_no_ensurepip(tmp_path):
    """`.ci/run` installed PostgreSQL where it was missing but not python3-venv: on a Debian whose python3 has no
    ensurepip, `python3 -m venv .venv` failed after the installs. Stubs stand in for apt-get (which records its
    arguments and stops the script), sudo and such a python3."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "apt.log"
    log.touch()
    for name, body in {"apt-get": f'echo "$*" >> {log}; [ "$1" = update ]', "sudo": 'exec "$@"',
                       "python3": '[ "$*" = "-c import ensurepip" ] && exit 1; exit 3'}.items():
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    # PG_CLUSTER=nosuch: a script that went on would stop in team-server.sh before it touched PostgreSQL
    result = subprocess.run([str(ROOT / ".ci" / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PG_CLUSTER": "nosuch"})
    assert result.returncode != 0
    installs = [line.split() for line in log.read_text().splitlines() if line.startswith("install")]
    assert len(installs) == 1 and "python3-venv" in installs[0], (log.read_text(), result.stderr)


def test_a_port_in_use_is_one_line_before_anything_is_made():
    """Run twice on one port, the second `mlflow server` logged a bind error and exited 0, having made the
    databases."""
    name = f"mlflow_port_{uuid.uuid4().hex[:10]}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        try:
            result = run_script(MLFLOW_DB=name, OPTUNA_DB=f"{name}_optuna", HOST="127.0.0.1", PORT=port, WORKERS="1",
                                MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
            assert f"127.0.0.1:{port}" in one_error_line(result) and "in use" in result.stderr
            assert not database_exists(name)
        finally:
            drop_databases(os.environ.get("PGPORT", "5432"), name, f"{name}_optuna")
    assert "PORT takes a port number" in one_error_line(run_script(PORT="50OO"))


def test_a_port_held_by_a_server_left_running_names_its_process():
    """A team server whose main process was killed (SIGKILL, the OOM killer) left its uvicorn worker serving on the
    port, a process of no terminal: the next start said "another server there?" and no more. The line names the
    process that holds the port, and how to stop it."""
    code = ("import socket, sys, time\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "print(s.getsockname()[1], flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = holder.stdout.readline().strip()
        line = one_error_line(run_script(HOST="127.0.0.1", PORT=port, WORKERS="1"))
    finally:
        holder.kill()
        holder.wait()
    assert line.startswith(f"error: mlflow server cannot listen on 127.0.0.1:{port} (Address already in use): ")
    assert f"pid {holder.pid} ({Path(sys.executable).name} -c import socket" in line
    assert line.endswith(f"holds it: stop it (kill {holder.pid}), or set HOST/PORT"), line


@pytest.mark.parametrize(("host", "reason"), [("nosuchhost.invalid", "Name or service not known"),
                                              ("192.0.2.123", "Cannot assign requested address")])
def test_a_host_that_is_no_address_of_this_host_is_one_line_naming_host(host, reason):
    """HOST naming no address of this host (a typo, another host's address) was blamed on the port: "another server
    there? set HOST/PORT". The line names HOST and what it takes, before PostgreSQL is touched (PG_VERSION=99)."""
    port = str(free_port())
    line = one_error_line(run_script(HOST=host, PORT=port, PG_VERSION="99"))
    assert line == (f"error: mlflow server cannot listen on {host}:{port} ({reason}): HOST takes a name or address "
                    "of this host (0.0.0.0: all of them)"), line


@pytest.mark.parametrize("workers", ["two", "0", "-1", "1.5"])
def test_a_workers_count_that_is_no_number_is_one_line_before_postgresql_is_touched(workers):
    """uvicorn refused `--workers two` only once PostgreSQL was started and the databases made. (PG_VERSION=99:
    were WORKERS not checked first, the script would stop at "PostgreSQL 99 is not installed".)"""
    line = one_error_line(run_script(WORKERS=workers, PG_VERSION="99", HOST="127.0.0.1", PORT=str(free_port())))
    assert line == f"error: WORKERS takes the number of server processes (1, 2, ...), got {workers!r}"


def stubbed_postgresql(tmp_path: Path, serve: str) -> dict[str, str]:
    """Settings for `run_script` under which PostgreSQL's tools are stubs (each query finds its role or database, whose
    tables are its own; the tracking schema's check finds a new database) and `python -m mlflow` runs the bash `serve`
    instead of serving."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    scripts = {"pg_lsclusters": "echo '15 main 5432 online postgres /nowhere /nowhere.log'", "pg_isready": "",
               "pg_ctlcluster": "exit 1", "createdb": "exit 1",
               "psql": 'case "$*" in *to_regclass*) echo f ;; *) echo t ;; esac',
               "runuser": 'shift 3; exec "$@"',  # runuser -u postgres -- CMD...
               "python": f'[[ $1 == -m && $2 == mlflow ]] && {{ {serve}; exit 0; }}\n'
                         '[[ $1 == - && $2 == MLFLOW_DB=* ]] && exit 0\n'  # check_schema
                         f'exec {sys.executable} "$@"'}
    for name, body in scripts.items():
        (stubs / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (stubs / name).chmod(0o755)
    return {"PGPORT": "5432", "PG_VERSION": "15", "PG_CLUSTER": "main", "ARTIFACTS": str(tmp_path / "artifacts"),
            "PATH": f"{stubs}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}  # the port's lock file there


def test_an_ipv6_pghost_is_bracketed_in_the_servers_store_uri(tmp_path):
    """PGHOST=::1 made `postgresql+psycopg2://mlflow:...@::1:5432/mlflow`, which SQLAlchemy cannot parse: every
    server worker's traceback, once the databases were made. PostgreSQL's tools are stubbed here (each query finds
    its role or database), and `python -m mlflow` prints the URI it was given instead of serving."""
    from sqlalchemy.engine import make_url

    result = run_script(PGHOST="::1", DB_PASSWORD="p@ss/%", HOST="127.0.0.1", PORT=str(free_port()),
                        **stubbed_postgresql(tmp_path, 'echo "uri=$MLFLOW_BACKEND_STORE_URI"'))
    assert result.returncode == 0, result.stderr
    uri = make_url(result.stdout.split("uri=")[1].strip())
    assert (uri.host, uri.port, uri.password, uri.database) == ("::1", 5432, "p@ss/%", "mlflow")
    assert "postgresql://mlflow@[::1]:5432/optuna" in result.stdout


def test_a_unix_socket_pghost_goes_in_the_store_uris_query(tmp_path):
    """PGHOST=/var/run/postgresql (a folder of the cluster's sockets, as libpq takes it) made
    `postgresql+psycopg2://mlflow:...@/var/run/postgresql:5432/mlflow`, a URL of no host and database
    `var/run/postgresql:5432/mlflow`. The folder goes in the query, where psycopg2 takes it as the host; the sweeps'
    storage line too. (PostgreSQL's tools stubbed, as for the IPv6 address.)"""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    result = run_script(PGHOST="/var/run/postgresql", DB_PASSWORD="p@ss/%", HOST="127.0.0.1", PORT=str(free_port()),
                        **stubbed_postgresql(tmp_path, 'echo "uri=$MLFLOW_BACKEND_STORE_URI"'))
    assert result.returncode == 0, result.stderr
    uri = make_url(result.stdout.split("uri=")[1].strip())
    _, connect = sqlalchemy.create_engine(uri).dialect.create_connect_args(uri)
    assert connect == {"dbname": "mlflow", "user": "mlflow", "password": "p@ss/%", "host": "/var/run/postgresql",
                       "port": "5432"}, connect
    storage = result.stdout.split("-P storage=")[1].split()[0]
    assert storage == "postgresql://mlflow@/optuna?host=/var/run/postgresql&port=5432", storage


def test_a_unix_socket_pghost_that_peer_authentication_refuses_is_one_line_saying_so():
    """On Debian's pg_hba.conf, PGHOST=/var/run/postgresql logs in by the OS user's name (peer), where no password
    helps: the line blamed DB_PASSWORD ("role mlflow existed already and keeps its password ..."). It says what peer
    wants and names the fixes; a socket folder the cluster has none in names unix_socket_directories."""
    run_script("postgres").check_returncode()  # the cluster runs, the role exists
    name = f"mlflow_sock_{uuid.uuid4().hex[:10]}"
    cluster = os.environ.get("PG_CLUSTER", "main")
    line = one_error_line(run_script("postgres", PGHOST="/var/run/postgresql", MLFLOW_DB=name,
                                     OPTUNA_DB=f"{name}_optuna"))
    assert 'Peer authentication failed for user "mlflow"' in line and line.endswith(
        "(on a Unix socket pg_hba.conf wants OS user mlflow: set PGHOST=127.0.0.1, or give local connections "
        f"scram-sha-256 in /etc/postgresql/15/{cluster}/pg_hba.conf)"), line
    assert "existed already" not in line and not database_exists(name)
    line = one_error_line(run_script("postgres", PGHOST="/nonexistent-sockets", MLFLOW_DB=name))
    assert "does not answer on /nonexistent-sockets:" in line and "unix_socket_directories" in line, line


def test_a_second_start_on_a_port_whose_first_server_is_starting_is_one_line(tmp_path):
    """Run twice close together (before the first `mlflow server` listened), both passed the port check and the second
    server logged a bind error and exited 0. The first start holds the port's lock for as long as its server runs: the
    second is one line naming the port, exit 2; once the first is gone, a start goes ahead. (PostgreSQL stubbed, and
    `mlflow server`, which holds the port for HOLD s.)"""
    port, serving = str(free_port()), tmp_path / "serving"
    settings = {**stubbed_postgresql(tmp_path, 'touch "$SERVING"; sleep "$HOLD"'), "HOST": "127.0.0.1", "PORT": port,
                "SERVING": str(serving)}
    lock = tmp_path / f"team-server-{port}.lock"
    first = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env={**os.environ, **settings, "HOLD": "60"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        eventually(serving.exists, 30)
        line = one_error_line(run_script(**settings, HOLD="0"))
        assert line == (f"error: another scripts/team-server.sh starts or runs mlflow server on port {port}: stop it, "
                        "or set PORT"), line
    finally:
        stop_group(first)
    assert run_script(**settings, HOLD="0").returncode == 0 and lock.exists()  # the server's, while it runs
    lock.unlink()
    one_error_line(run_script(**settings, HOLD="0", DB_USER="Bad-Name"))  # refused before the lock: none made
    one_error_line(run_script(**{**settings, "PGPORT": "1"}, HOLD="0"))  # refused after it: none left
    assert not lock.exists()


def test_an_artifacts_folder_or_a_python_it_cannot_use_is_one_line_before_anything_is_made(tmp_path):
    """As a normal user, the README's ARTIFACTS=/srv/mlflow-artifacts failed in mkdir after the databases were made."""
    name = f"mlflow_art_{uuid.uuid4().hex[:10]}"
    (tmp_path / "a-file").write_text("")
    try:
        result = run_script(MLFLOW_DB=name, OPTUNA_DB=f"{name}_optuna", HOST="127.0.0.1", PORT=str(free_port()),
                            ARTIFACTS=str(tmp_path / "a-file" / "artifacts"))
        assert f"ARTIFACTS={tmp_path / 'a-file' / 'artifacts'}" in one_error_line(result)
        assert not database_exists(name)
        # A `python` on PATH without the project's packages (the venv not activated) failed at the very end.
        stubs = tmp_path / "bin"
        stubs.mkdir()
        (stubs / "python").symlink_to(Path(sys.base_prefix) / "bin" / "python3")  # the venv's base: no mlflow
        result = run_script(MLFLOW_DB=name, OPTUNA_DB=f"{name}_optuna", HOST="127.0.0.1", PORT=str(free_port()),
                            ARTIFACTS=str(tmp_path / "artifacts"), PATH=f"{stubs}:{os.environ['PATH']}")
        assert "has no mlflow" in one_error_line(result, 1) and "activate" in result.stderr
        assert not database_exists(name)
    finally:
        drop_databases(os.environ.get("PGPORT", "5432"), name, f"{name}_optuna")


def test_an_artifacts_uri_is_checked_where_the_server_keeps_them_and_one_of_another_store_is_one_line(tmp_path):
    """ARTIFACTS=file:///srv/mlflow-artifacts (a URI, as `mlflow server` takes it) was checked by making
    ./file:/srv/mlflow-artifacts in the current folder, not the folder the server writes; s3://bucket made ./s3:/bucket
    and started a server that fails each upload (this project installs no S3 client). The file: URI's folder is
    checked and made (PG_VERSION=99: the script then stops, before PostgreSQL); another scheme is one line, exit 2."""
    settings = {"HOST": "127.0.0.1", "PORT": str(free_port()), "PG_VERSION": "99"}
    for uri in (f"file://{tmp_path}/artifacts", f"file:{tmp_path}/other"):
        result = run_script(ARTIFACTS=uri, **settings)
        assert "PostgreSQL 99 is not installed" in one_error_line(result, 1)
    assert (tmp_path / "artifacts").is_dir() and (tmp_path / "other").is_dir()
    (tmp_path / "a-file").write_text("")
    line = one_error_line(run_script(ARTIFACTS=f"file://{tmp_path}/a-file/artifacts", **settings))
    assert line.startswith(f"error: cannot make or write ARTIFACTS=file://{tmp_path}/a-file/artifacts"), line
    for uri in ("s3://bucket/mlflow", "file://team-host/srv/mlflow"):  # (the latter a folder of another host)
        line = one_error_line(run_script(ARTIFACTS=uri, **settings))
        assert line == (f"error: ARTIFACTS takes a folder of this host (or file:///...), got '{uri}': the server keeps "
                        "and serves the artifacts there"), line
    assert not (ROOT / "file:").exists() and not (ROOT / "s3:").exists()


def test_one_database_for_the_tracking_store_and_optuna_is_one_line_before_anything_is_made():
    """MLFLOW_DB=team OPTUNA_DB=team made one database for both: MLflow's tables and Optuna's each keep their schema's
    version in the one `alembic_version` table, so the first sweep died on Optuna's "The runtime optuna version ...
    is no longer compatible with the table schema (set up by optuna ...)", after the server had started on it."""
    name = f"mlflow_one_{uuid.uuid4().hex[:10]}"
    try:
        result = run_script("postgres", MLFLOW_DB=name, OPTUNA_DB=name)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"error: MLFLOW_DB and OPTUNA_DB name one database, {name}: MLflow's tables and Optuna's each keep their "
            "schema's version in it (alembic_version); give each its own"], result
        assert not database_exists(name)
    finally:
        drop_databases(os.environ.get("PGPORT", "5432"), name)


def test_bad_postgresql_settings_are_one_line_and_quick():
    """A wrong password (the role exists already), an unknown cluster, a PGPORT the cluster is not on:
    one line and exit 2 (they exited 1, as for a PostgreSQL that failed) at once, not a traceback later or a 30 s wait
    that blames the start."""
    name = f"mlflow_bad_{uuid.uuid4().hex[:10]}"
    try:
        line = one_error_line(run_script("postgres", MLFLOW_DB=name, OPTUNA_DB=f"{name}_optuna",
                                         DB_PASSWORD="not-the-password"))
        assert "password authentication failed" in line and "existed already" in line
        assert not database_exists(name)  # nothing half made
    finally:
        drop_databases(os.environ.get("PGPORT", "5432"), name, f"{name}_optuna")
    started = time.monotonic()
    assert "no PostgreSQL cluster 15/nosuch" in one_error_line(run_script("postgres", PG_CLUSTER="nosuch"))
    other_port = str(free_port())
    assert f"not PGPORT={other_port}" in one_error_line(run_script("postgres", PGPORT=other_port))
    assert time.monotonic() - started < 15


def test_a_pghost_the_running_cluster_does_not_answer_on_is_one_line_at_once():
    """PGHOST naming a host the cluster does not listen on (a typo, an address not in listen_addresses): the script
    waited 30 s for a cluster that ran all along, then said it "does not answer ...; see /var/log/postgresql/", exit 1.
    Now one line at once naming PGHOST and where the cluster's addresses are set, exit 2, nothing made."""
    run_script("postgres").check_returncode()  # the cluster runs (as CI starts it)
    name = f"mlflow_host_{uuid.uuid4().hex[:10]}"
    cluster, pgport = os.environ.get("PG_CLUSTER", "main"), os.environ.get("PGPORT", "5432")
    started = time.monotonic()
    line = one_error_line(run_script("postgres", PGHOST="nosuchhost.invalid", MLFLOW_DB=name,
                                     OPTUNA_DB=f"{name}_optuna"))
    assert line == (f"error: PostgreSQL 15/{cluster} runs, but does not answer on nosuchhost.invalid:{pgport}: set "
                    f"PGHOST to an address it listens on (listen_addresses in /etc/postgresql/15/{cluster}/"
                    "postgresql.conf)"), line
    assert time.monotonic() - started < 15 and not database_exists(name)


def test_a_role_named_by_an_sql_keyword_is_made_and_a_reserved_one_is_one_line():
    """DB_USER=user (an SQL keyword, which the names' check lets through) or pg_team (PostgreSQL keeps pg_ names for
    its own roles): CREATE ROLE failed, its error thrown away, and the script ended exit 1 without a word. Now the
    role name is quoted, so `user` is made like any other; a reserved one is one line with PostgreSQL's reason."""
    name = f"mlflow_kw_{uuid.uuid4().hex[:10]}"
    pgport = os.environ.get("PGPORT", "5432")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else ["sudo", "-u", "postgres"]
    line = one_error_line(run_script("postgres", DB_USER="pg_team", MLFLOW_DB=name, OPTUNA_DB=f"{name}_optuna"), 1)
    assert line.startswith("error: cannot create role pg_team: ") and 'role name "pg_team" is reserved' in line, line
    assert not database_exists(name)  # nothing half made
    try:
        result = run_script("postgres", DB_USER="user", DB_PASSWORD="kw-secret", MLFLOW_DB=name,
                            OPTUNA_DB=f"{name}_optuna")
        assert result.returncode == 0, result
        assert f"databases {name} (tracking) and {name}_optuna (Optuna), owner user" in result.stdout
        connection = psycopg2.connect(host="127.0.0.1", port=pgport, user="user", password="kw-secret", dbname=name)
        connection.close()
    finally:
        for db in (name, f"{name}_optuna"):
            subprocess.run([*as_postgres, "dropdb", "--if-exists", "-p", pgport, db], check=True, cwd="/")
        subprocess.run([*as_postgres, "psql", "-p", pgport, "-qc", 'DROP ROLE IF EXISTS "user"'], check=True, cwd="/")


def test_a_database_the_role_may_not_make_tables_in_is_one_line():
    """A database that existed already, made by hand as postgres (`createdb mlflow`), was taken as it was: the script
    said "owner mlflow", then every server worker died on "permission denied for schema public" (a sweep too)."""
    name = f"mlflow_owner_{uuid.uuid4().hex[:10]}"
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else ["sudo", "-u", "postgres"]
    subprocess.run([*as_postgres, "createdb", "-p", os.environ.get("PGPORT", "5432"), name], check=True, cwd="/")
    try:
        line = one_error_line(run_script("postgres", MLFLOW_DB=name, OPTUNA_DB=f"{name}_optuna"))
        assert f"database {name} exists, owned by postgres" in line and f"ALTER DATABASE {name} OWNER TO" in line
    finally:
        subprocess.run([*as_postgres, "dropdb", "-p", os.environ.get("PGPORT", "5432"), name], check=True, cwd="/")


def test_databases_holding_the_other_ones_tables_are_one_line_before_the_server_starts():
    """MLFLOW_DB and OPTUNA_DB swapped (or naming another application's database): the script said "databases ...
    owner mlflow", then `mlflow server` died on alembic's "Can't locate revision identified by 'v3.2.0.a'" (Optuna's
    schema) traceback, exit 1; an OPTUNA_DB of MLflow's tables failed the first sweep. One line naming the setting,
    exit 2 (MLflow's and Optuna's tables are stood in for by their alembic_version and main table)."""
    name = f"mlflow_swap_{uuid.uuid4().hex[:10]}"
    tracking, studies = name, f"{name}_optuna"
    pgport = os.environ.get("PGPORT", "5432")
    run_script("postgres", MLFLOW_DB=tracking, OPTUNA_DB=studies).check_returncode()
    try:
        for db, table in ((tracking, "experiments"), (studies, "studies")):
            connection = psycopg2.connect(host="127.0.0.1", port=pgport, user=USER, password=PASSWORD, dbname=db)
            with connection, connection.cursor() as cursor:
                cursor.execute(f"CREATE TABLE alembic_version (version_num varchar(32)); CREATE TABLE {table} (id int)")
            connection.close()
        assert run_script("postgres", MLFLOW_DB=tracking, OPTUNA_DB=studies).returncode == 0
        line = one_error_line(run_script("postgres", MLFLOW_DB=studies, OPTUNA_DB=tracking))
        assert line == (f"error: MLFLOW_DB={studies} holds another application's tables (alembic_version, no "
                        "experiments table): Optuna's? MLFLOW_DB and OPTUNA_DB swapped? name MLflow's database, or a "
                        "new one"), line
        line = one_error_line(run_script("postgres", MLFLOW_DB=f"{name}_new", OPTUNA_DB=tracking))
        assert line == (f"error: OPTUNA_DB={tracking} holds another application's tables (alembic_version, no "
                        "studies table): MLflow's? MLFLOW_DB and OPTUNA_DB swapped? name Optuna's database, or a "
                        "new one"), line
        assert not database_exists(f"{name}_new")  # nothing made
        one_error_line(run_script("postgres", MLFLOW_DB=studies, OPTUNA_DB=tracking, DB_USER=f"{name}_role"))
        connection = psycopg2.connect(host="127.0.0.1", port=pgport, user=USER, password=PASSWORD, dbname="postgres")
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (f"{name}_role",))
            assert cursor.fetchone() is None  # nor a role
        connection.close()
    finally:
        drop_databases(pgport, tracking, studies, f"{name}_new")
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else ["sudo", "-u", "postgres"]
        subprocess.run([*as_postgres, "psql", "-p", pgport, "-qc", f"DROP ROLE IF EXISTS {name}_role"], check=True,
                       cwd="/")


def test_a_tracking_schema_of_another_mlflow_is_one_line_naming_the_upgrade(tmp_path):
    """A tracking database an older MLflow made (requirements.txt moved on since): `mlflow server` died in every
    worker on "Detected out-of-date database schema ..." in a traceback, exit 1. One line naming the documented
    upgrade, exit 2, before the server starts; one a newer MLflow upgraded, one line too. (MLflow's tables are stood in
    for by their alembic_version and experiments table.)"""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    revisions = ScriptDirectory.from_config(_get_alembic_config(""))
    older = revisions.get_revision(revisions.get_current_head()).down_revision
    name, pgport = f"mlflow_schema_{uuid.uuid4().hex[:10]}", os.environ.get("PGPORT", "5432")
    settings = {"MLFLOW_DB": name, "OPTUNA_DB": f"{name}_optuna", "HOST": "127.0.0.1", "PORT": str(free_port()),
                "WORKERS": "1", "ARTIFACTS": str(tmp_path / "artifacts"), "TMPDIR": str(tmp_path),
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    run_script("postgres", **settings).check_returncode()
    try:
        connection = psycopg2.connect(host="127.0.0.1", port=pgport, user=USER, password=PASSWORD, dbname=name)
        with connection, connection.cursor() as cursor:
            cursor.execute("CREATE TABLE alembic_version (version_num varchar(32)); CREATE TABLE experiments (id int);"
                           "INSERT INTO alembic_version VALUES (%s)", (older,))
        line = one_error_line(run_script(timeout=60, **settings))
        assert line.startswith(f"error: MLFLOW_DB={name} holds the tracking schema of an older MLflow (revision "
                               f"{older}; MLflow ") and line.endswith(
            f"back both databases up (docs/team.md), then PGPASSWORD=... mlflow db upgrade "
            f"postgresql+psycopg2://{USER}@127.0.0.1:{pgport}/{name}"), line
        with connection, connection.cursor() as cursor:
            cursor.execute("UPDATE alembic_version SET version_num = 'fedcba987654'")
        connection.close()
        line = one_error_line(run_script(timeout=60, **settings))
        assert "holds the tracking schema of a newer MLflow (revision fedcba987654" in line, line
    finally:
        drop_databases(pgport, name, f"{name}_optuna")


def test_a_start_that_loses_the_race_to_another_caller_is_fine_once_the_server_answers():
    """Callers started together on a stopped cluster: the loser's `pg_ctlcluster start` failed with pg_ctl's own error
    (not "already running") while the winner's server came up, and the script stopped (1 in 3 tries of 3 callers).
    Stubs play the loser: the cluster looks down at first, its start fails; then the real server answers."""
    import shutil
    import tempfile

    stubs = Path(tempfile.mkdtemp())  # not under tmp_path: the postgres user runs pg_ctlcluster from here
    try:
        stubs.chmod(0o755)
        scripts = {"pg_isready": f'[ -e {stubs}/asked ] && exec /usr/bin/pg_isready "$@"; touch {stubs}/asked; exit 2',
                   "pg_ctlcluster": 'echo "Error: /usr/lib/postgresql/15/bin/pg_ctl start ... exited with status 1:"'
                                    "; exit 1"}
        for name, body in scripts.items():
            (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
            (stubs / name).chmod(0o755)
        result = run_script("postgres", PATH=f"{stubs}:{os.environ['PATH']}")
        assert result.returncode == 0, result
        assert (stubs / "asked").exists()  # the stubs were used
    finally:
        shutil.rmtree(stubs)


def test_an_exported_pghost_does_not_send_the_admin_commands_over_tcp():
    """PGHOST is a documented setting, so the script's environment has it: psql as postgres then went
    over TCP, asked for the postgres role's password and failed (or waited for it on a terminal)."""
    name = f"mlflow_pghost_{uuid.uuid4().hex[:10]}"
    try:
        result = run_script("postgres", MLFLOW_DB=name, OPTUNA_DB=f"{name}_optuna", PGHOST="127.0.0.1", PGUSER=USER)
        assert result.returncode == 0, result
        assert database_exists(name)
    finally:
        drop_databases(os.environ.get("PGPORT", "5432"), name, f"{name}_optuna")


def test_a_password_with_url_and_sql_characters_works_and_stays_off_command_lines(team):
    """DB_PASSWORD went into the backend URI unencoded (an @ or / broke it: every worker's traceback) and
    onto `mlflow server`'s command line, which every local user reads in ps; a $$ broke role creation. The `team`
    server's role has such a password (and test_main_and_a_two_worker_sweep_on_the_postgresql_server works on it)."""
    assert "@" in team["password"] and "/" in team["password"] and "$$" in team["password"]
    port = team["url"].rsplit(":", 1)[1]
    assert request(f"{team['url']}/api/2.0/mlflow/experiments/search?max_results=5", f"127.0.0.1:{port}") == 200
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            assert b"p@ss/w" not in cmdline.read_bytes() and b"p%40ss" not in cmdline.read_bytes(), cmdline


@pytest.mark.parametrize("argument", ["stop", "status", "postgress", "--port=5001"])
def test_an_unknown_argument_is_one_line_before_anything_is_started(argument):
    """Any argument but `postgres` was ignored: `scripts/team-server.sh stop` (or a typo of `postgres`) started
    PostgreSQL, made the role and databases and served on 0.0.0.0:5000. (PG_VERSION=99: were the argument not checked
    first, the script would stop at "PostgreSQL 99 is not installed".)"""
    result = run_script(argument, PG_VERSION="99", HOST="127.0.0.1", PORT=str(free_port()))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == [f"error: unknown argument {argument!r}: scripts/team-server.sh takes "
                                                "none (start everything), postgres, or --help"], result
    result = run_script("postgres", argument, PG_VERSION="99")
    assert result.returncode == 2 and result.stderr.startswith(f"error: unexpected argument {argument!r}"), result


@pytest.mark.parametrize("argument", ["--help", "-h"])
def test_help_prints_the_usage_and_starts_nothing(argument):
    """`scripts/team-server.sh --help` started the server (on the default password, where the role was new)."""
    result = run_script(argument, PG_VERSION="99", HOST="127.0.0.1", PORT=str(free_port()))
    assert result.returncode == 0 and result.stderr == "", result
    assert "scripts/team-server.sh postgres" in result.stdout and "DB_PASSWORD" in result.stdout
    assert not result.stdout.startswith("#") and "set -euo" not in result.stdout


def test_a_database_store_that_refuses_the_login_or_does_not_answer_is_one_line_at_once():
    """A member's MLFLOW_TRACKING_URI naming the team's PostgreSQL directly, with a wrong password (or a port nothing
    listens on): `python -m pipeline.tracking` (and every step) logged MLflow's 5-line warning 9 times over ~100 s of
    retries before its one line. Now one try: the line at once, the password never printed."""
    name = f"mlflow_login_{uuid.uuid4().hex[:10]}"
    pgport = os.environ.get("PGPORT", "5432")
    run_script("postgres", MLFLOW_DB=name, OPTUNA_DB=f"{name}_optuna").check_returncode()
    try:
        for uri, reason in [(f"postgresql+psycopg2://{USER}:s3cret@127.0.0.1:{pgport}/{name}",
                             f'password authentication failed for user "{USER}"'),
                            (f"postgresql+psycopg2://{USER}:s3cret@127.0.0.1:{free_port()}/{name}",
                             "Connection refused")]:
            start = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "pipeline.tracking"], cwd=ROOT, capture_output=True,
                                  text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=120)
            lines = done.stderr.strip().splitlines()
            shown = uri.replace("s3cret", "***")
            assert done.returncode == 2 and len(lines) == 1, (uri, done.stderr[-3000:])
            assert lines[0].startswith(f"error: MLFLOW_TRACKING_URI: cannot open the tracking store {shown}: "
                                       "OperationalError: ") and reason in lines[0], lines
            # ~2.3 CPU-s here (MLflow imported, one try); under CI's load several times that, far from 100 s
            assert "s3cret" not in done.stdout + done.stderr and time.monotonic() - start < 60
    finally:
        drop_databases(pgport, name, f"{name}_optuna")


def test_a_tracking_uri_that_answers_but_is_no_mlflow_server_is_one_line(monkeypatch, capsys):
    """MLFLOW_TRACKING_URI naming another web service (the model server of `mlflow models serve -p 5001`, whose
    /health answers 200; a web page; a path too many): `python -m pipeline.tracking` said "tracking store ... ready",
    and every step then failed on MLflow's 404. Now one line naming the URI, exit 2; a server that answers MLflow's
    API (200, or a proxy's 401) is ready as before."""
    import mlflow

    from pipeline.tracking import cli, store_ready

    def answer(request):
        request.send_response(200 if request.path in ("/health", "/ping") or request.path.startswith("/mlflow/")
                              else 404)
        request.end_headers()

    mlflow.set_tracking_uri(None)  # MLFLOW_TRACKING_URI decides
    with http_stub(answer) as address:
        base = address.replace("//", "//alice:s3cret@")
        for uri, code in [(base, 2), (f"{base}/mlflow", 0)]:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            capsys.readouterr()
            with pytest.raises(SystemExit) if code else contextlib.nullcontext() as exited:
                cli(lambda: print(store_ready()))  # `python -m pipeline.tracking`
            out, err = capsys.readouterr()
            shown = uri.replace("s3cret", "***")
            if code:
                assert exited.value.code == 2 and "ready" not in out, (out, err)
                assert err.strip().splitlines() == [
                    f"error: MLFLOW_TRACKING_URI: {shown} answers, but not as an MLflow tracking server (HTTP 404 for "
                    "/api/2.0/mlflow/experiments/search): another service (a model server?) or a wrong path"]
            else:
                assert out == f"tracking store {shown} ready\n", (out, err)


def store_check(monkeypatch, capsys, uri: str, **env: str) -> tuple[int, str, str]:
    """`python -m pipeline.tracking` with MLFLOW_TRACKING_URI `uri` (and `env`): its exit status, stdout, stderr."""
    from pipeline.tracking import cli, store_ready

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    try:
        cli(lambda: print(store_ready()))
    except SystemExit as exc:
        return exc.code, *capsys.readouterr()
    return 0, *capsys.readouterr()


def test_a_tracking_server_behind_a_login_without_the_right_one_is_one_line(monkeypatch, capsys, tmp_path):
    """A server behind a login (`mlflow server --app-name basic-auth`, or a proxy's) answered 401 to a member who had
    not set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or had set a wrong one: `python -m
    pipeline.tracking` said "tracking store ... ready", and every step then failed on MLflow's 401. Now the check
    asks with the login MLflow sends: one line naming the 401, exit 2; with the right login (the environment's, or
    the URI's), ready as before."""
    import base64

    import mlflow


    login = "Basic " + base64.b64encode(b"alice:s3cret").decode()

    def answer(request):
        ok = request.headers.get("Authorization") == login
        body = b'{"experiments": []}' if ok else b"You are not authenticated."
        request.send_response(200 if ok else 401)
        if not ok:
            request.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        request.send_header("Content-Type", "application/json" if ok else "text/plain")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials of the machine's
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(None)  # MLFLOW_TRACKING_URI decides

    def ready(uri: str, **env: str) -> tuple[int, str, str]:
        return store_check(monkeypatch, capsys, uri, **env)

    api = "/api/2.0/mlflow/experiments/search"
    with http_stub(answer) as address:
        assert ready(address) == (2, "", f"error: MLFLOW_TRACKING_URI: {address} asks for a login (HTTP 401 for "
                                         f"{api}): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD\n")
        refused = (2, "", f"error: MLFLOW_TRACKING_URI: {address} refuses the login given (HTTP 401 for {api}): "
                          "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD\n")
        assert ready(address, MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD="wrong") == refused
        assert ready(address, MLFLOW_TRACKING_PASSWORD="s3cret") == (0, f"tracking store {address} ready\n", "")
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        base = address.replace("//", "//alice:s3cret@")
        assert ready(base) == (0, f"tracking store {base.replace('s3cret', '***')} ready\n", "")


@pytest.mark.parametrize(("said", "what"), [
    (b"", "closes the connection without an HTTP answer"),  # PostgreSQL's port: no answer to a bad startup packet
    (b"SSH-2.0-OpenSSH_9.2p1\r\n", "answers, but not in HTTP ('SSH-2.0-OpenSSH_9.2p1\\r\\n')"),
])
def test_a_tracking_uri_naming_a_port_of_another_protocol_is_one_line_saying_so(monkeypatch, capsys, said, what):
    """`MLFLOW_TRACKING_URI=http://team-host:5432` (PostgreSQL's port, as an http URL) or another service's port:
    "tracking server ... failed: no answer (ConnectionError)", exit 4, as if the server were down. Now one line saying
    that something listens there but speaks no HTTP, exit 2, naming the scheme of a PostgreSQL store this project
    opens (its `postgresql://` is refused: SQLAlchemy's default driver for it is psycopg 3, not installed here)."""
    import socketserver
    import threading

    import mlflow

    from pipeline.tracking import cli, store_ready

    class Peer(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(said)
            self.request.recv(65536)

    server = socketserver.TCPServer(("127.0.0.1", 0), Peer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://alice:s3cret@127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(None)  # MLFLOW_TRACKING_URI decides
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exited:
            cli(lambda: print(store_ready()))  # `python -m pipeline.tracking`
    finally:
        server.shutdown()
        server.server_close()
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == "", (out, err)
    assert err.strip().splitlines() == [
        f"error: MLFLOW_TRACKING_URI: {uri.replace('s3cret', '***')} {what}: another service's port, not an MLflow "
        "tracking server's (a PostgreSQL store is named postgresql+psycopg2://USER@HOST:5432/DATABASE)"]


def test_a_password_in_the_tracking_uris_query_is_never_printed_nor_written(monkeypatch, capsys):
    """libpq also takes the password as a query parameter (`postgresql://mlflow@db-host/mlflow?password=...`): the
    error line, the ready line and each step's console link printed it, and the checkpoints' lock files (readable by
    every user of the store) recorded it. Now `***` where printed, and left out of the store the lock files name (a
    new password is the same store)."""
    import mlflow

    from pipeline.tracking import cli, store_ready, ui_hint
    from pipeline.tracking.resume import _store

    port = free_port()
    uri = f"postgresql+psycopg2://{USER}@127.0.0.1:{port}/mlflow?sslmode=disable&password=s3cret&connect_timeout=5"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(None)  # MLFLOW_TRACKING_URI decides
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli(lambda: print(store_ready()))  # `python -m pipeline.tracking`: nothing listens on that port
    out, err = capsys.readouterr()
    shown = uri.replace("s3cret", "***")
    assert exited.value.code == 2 and err.startswith(f"error: MLFLOW_TRACKING_URI: cannot open the tracking store "
                                                     f"{shown}: "), err
    run = mlflow.entities.Run(mlflow.entities.RunInfo("r1", "7", "", 0, 0, "FINISHED", "", ""), None)
    assert ui_hint(run).startswith(f"run r1: see it with `mlflow ui --backend-store-uri '{shown}'`")
    assert _store() == f"postgresql+psycopg2://localhost:{port}/mlflow?sslmode=disable&connect_timeout=5"
    assert "s3cret" not in out + err


@pytest.mark.parametrize("given", ["team-host:5000", "http://team-host", "https://mlflow.example.com/"])
def test_allowed_hosts_with_a_port_or_a_url_is_one_line_before_anything_is_made(given, tmp_path):
    """`ALLOWED_HOSTS=team-host:5000` (or a URL) was taken for an IPv6 address and bracketed, `[team-host:5000]`: the
    server started, and answered every member who used that name 403. (PG_VERSION=99: were ALLOWED_HOSTS not checked
    first, the script would stop at "PostgreSQL 99 is not installed".)"""
    result = run_script(ALLOWED_HOSTS=f"other-host,{given}", PG_VERSION="99", HOST="127.0.0.1", PORT=str(free_port()))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == [f"error: ALLOWED_HOSTS takes names or addresses without a port or "
                                                f"scheme (team-host,mlflow.example.com; any port), got {given!r}"]
    # names, addresses (IPv6 too, bracketed or not) and patterns pass: the script goes on to PostgreSQL
    result = run_script(ALLOWED_HOSTS="team-host, 10.0.0.5,fd00::5,[fd00::6],*.example.com", PG_VERSION="99",
                        HOST="127.0.0.1", PORT=str(free_port()), ARTIFACTS=str(tmp_path / "artifacts"))
    assert result.returncode == 1 and "PostgreSQL 99 is not installed" in result.stderr, result


def test_the_uis_address_or_a_web_page_as_tracking_uri_is_one_line(monkeypatch, capsys):
    """The address of a page of the UI pasted as MLFLOW_TRACKING_URI (`http://team-host:5000/#/experiments/0`), or a
    URL where a web page answers every path (a login page, another site): `python -m pipeline.tracking` said "ready",
    then every step ended exit 4 on "tracking server ... failed: ... not in a valid JSON format" (the server is fine).
    Now one line saying what is wrong, exit 2."""
    import mlflow


    pages = {"everywhere": False}  # True: a web page on every path, the API's too

    def answer(request):
        json = request.path.startswith("/api/") and not pages["everywhere"]
        body = b'{"experiments": []}' if json else b"<!doctype html><html><body>a page</body></html>"
        request.send_response(200)
        request.send_header("Content-Type", "application/json" if json else "text/html; charset=utf-8")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    mlflow.set_tracking_uri(None)  # MLFLOW_TRACKING_URI decides

    def ready(uri: str) -> tuple[int, str, str]:
        return store_check(monkeypatch, capsys, uri)

    with http_stub(answer) as address:
        base = address.replace("//", "//alice:s3cret@")
        shown = base.replace("s3cret", "***")
        for tail in ("/#/experiments/0", "/?experiment=0"):
            code, out, err = ready(base + tail)
            assert code == 2 and err.strip().splitlines() == [
                f"error: MLFLOW_TRACKING_URI: {shown}{tail} is the address of a page (its {tail[1]} part), not of a "
                f"server: name the server alone, {shown}"], (out, err)
        assert ready(base) == (0, f"tracking store {shown} ready\n", "")
        pages["everywhere"] = True
        code, out, err = ready(base)
        assert code == 2 and err.strip().splitlines() == [
            f"error: MLFLOW_TRACKING_URI: {shown} answers, but not as an MLflow tracking server (a web page for "
            "/api/2.0/mlflow/experiments/search): another service (a model server?) or a wrong path"], (out, err)


def test_a_working_directory_the_postgres_user_may_not_enter_adds_no_noise(tmp_path):
    """Run as root from root's home (0700, as the README's command most often is), each of PostgreSQL's commands run as
    postgres printed `could not change directory to "/root": Permission denied`: five such lines on a run that
    succeeded, and more than one line around any error."""
    name = f"mlflow_cwd_{uuid.uuid4().hex[:10]}"
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    env = {**os.environ, "PGPORT": os.environ.get("PGPORT", "5432"), "MLFLOW_DB": name,
           "OPTUNA_DB": f"{name}_optuna"}
    try:
        result = subprocess.run(["bash", str(SCRIPT), "postgres"], cwd=home, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and result.stderr == "", result
        assert database_exists(name)
    finally:
        drop_databases(os.environ.get("PGPORT", "5432"), name, f"{name}_optuna")
