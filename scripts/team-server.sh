#!/usr/bin/env bash
# A team's MLflow tracking server: PostgreSQL backend store, artifacts proxied by the server.
#
#   scripts/team-server.sh              start PostgreSQL 15, create the role and databases if missing,
#                                       then run `mlflow server` in the foreground
#   scripts/team-server.sh postgres     only start PostgreSQL and create the role and databases
#   scripts/team-server.sh --help       this text
#
# Settings (environment, defaults in brackets):
#   MLFLOW_DB [mlflow]      database of the tracking store and the Model Registry
#   OPTUNA_DB [optuna]      database for Optuna studies (`-P storage=` of sweeps), not MLFLOW_DB
#   DB_USER [mlflow]        role owning both; DB_PASSWORD [mlflow] its password (set your own). A role
#                           that exists already keeps its password: DB_PASSWORD must be that one.
#   PGHOST [127.0.0.1] (a name or an address, IPv6 too; or a folder of the cluster's Unix sockets,
#                           /var/run/postgresql, where pg_hba.conf lets DB_USER in by password there)
#   PGPORT [5432]  PG_VERSION [15]  PG_CLUSTER [main]
#   ARTIFACTS [./mlartifacts]   the folder (or file:///...) where the server keeps artifacts
#   HOST [0.0.0.0]  PORT [5000]  WORKERS [2]   where and how `mlflow server` listens
#   ALLOWED_HOSTS []        more names (comma-separated, e.g. team-host,mlflow.example.com) by which
#                           members reach the server. This host's own names and addresses, localhost and
#                           private IPs are always allowed; MLflow answers 403 to any other Host header,
#                           and refuses the UI's changes from any other origin.
# PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user.
# The database password reaches `mlflow server` URL-encoded through its environment
# (MLFLOW_BACKEND_STORE_URI), never on a command line.
set -euo pipefail

# Any other argument (`stop`, a typo of `postgres`) started everything, on the default password where the role was new.
case ${1:-} in
  ""|postgres) [[ $# -le 1 ]] ||
    { echo "error: unexpected argument '$2': scripts/team-server.sh takes one at most" >&2; exit 2; } ;;
  -h|--help) sed -n '2,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "$0"; exit 0 ;;
  *) echo "error: unknown argument '$1': scripts/team-server.sh takes none (start everything), postgres, or --help" >&2
     exit 2 ;;
esac

MLFLOW_DB=${MLFLOW_DB:-mlflow}
OPTUNA_DB=${OPTUNA_DB:-optuna}
DB_USER=${DB_USER:-mlflow}
DB_PASSWORD=${DB_PASSWORD:-mlflow}
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
PG_VERSION=${PG_VERSION:-15}
PG_CLUSTER=${PG_CLUSTER:-main}
ARTIFACTS=${ARTIFACTS:-$PWD/mlartifacts}
HOST=${HOST:-0.0.0.0}
PORT=${PORT:-5000}
WORKERS=${WORKERS:-2}
ALLOWED_HOSTS=${ALLOWED_HOSTS:-}

for name in "$MLFLOW_DB" "$OPTUNA_DB" "$DB_USER"; do
  [[ $name =~ ^[a-z_][a-z0-9_]*$ ]] || { echo "error: database and role names take a-z, 0-9 and _, got '$name'" >&2; exit 2; }
done

# One database for both held MLflow's schema version and Optuna's in its one alembic_version table: the first sweep
# died on "The runtime optuna version ... is no longer compatible with the table schema", the server long started.
[[ $MLFLOW_DB != "$OPTUNA_DB" ]] || { echo "error: MLFLOW_DB and OPTUNA_DB name one database, $MLFLOW_DB: MLflow's" \
  "tables and Optuna's each keep their schema's version in it (alembic_version); give each its own" >&2; exit 2; }

# Exit 2: a setting refused (it names what is not there, or cannot be used); 1: this host lacks something, or
# PostgreSQL fails.
fail() { echo "error: $*" >&2; exit 1; }
refuse() { echo "error: $*" >&2; exit 2; }

# The caller's libpq settings stay out of the admin commands, which use the local socket: an exported
# PGHOST=127.0.0.1 would send them over TCP, where the postgres role has no password.
admin_env=(env -u PGHOST -u PGHOSTADDR -u PGUSER -u PGDATABASE -u PGSERVICE -u PGPASSWORD)
# From /: run from a folder postgres may not enter (root's home), each command printed "could not change directory".
as_postgres() (
  cd /
  exec 9>&-  # the port's lock (lock_port) stays out of the PostgreSQL server pg_ctlcluster starts
  if [[ $(id -un) == postgres ]]; then "${admin_env[@]}" "$@"
  elif [[ $(id -u) == 0 ]]; then runuser -u postgres -- "${admin_env[@]}" "$@"
  else sudo -u postgres "${admin_env[@]}" "$@"
  fi
)

psql_admin() { as_postgres psql -p "$PGPORT" -v ON_ERROR_STOP=1 -qtAX "$@"; }
exists() { [[ -n $(psql_admin -d postgres -c "SELECT 1 FROM $1 WHERE $2 = '$3'") ]]; }

start_postgres() {
  if ! command -v pg_ctlcluster >/dev/null || [[ ! -d /usr/lib/postgresql/$PG_VERSION ]]; then
    fail "PostgreSQL $PG_VERSION is not installed (Debian: apt-get install -y postgresql-$PG_VERSION)"
  fi
  if [[ $(id -un) != postgres && $(id -u) != 0 ]] && ! command -v sudo >/dev/null; then
    fail "PostgreSQL's admin commands run as the postgres user: run this as root or postgres, or install sudo"
  fi
  local cluster port out
  cluster=$(pg_lsclusters -h 2>/dev/null | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" '$1 == v && $2 == c')
  [[ -n $cluster ]] || refuse "no PostgreSQL cluster $PG_VERSION/$PG_CLUSTER (pg_lsclusters lists them;" \
    "set PG_VERSION/PG_CLUSTER, or create it: pg_createcluster $PG_VERSION $PG_CLUSTER)"
  port=$(awk '{print $3}' <<< "$cluster")
  [[ $port == "$PGPORT" ]] || refuse "PostgreSQL cluster $PG_VERSION/$PG_CLUSTER is on port $port, not PGPORT=$PGPORT"
  if ! pg_isready -q -h "$PGHOST" -p "$PGPORT"; then
    # Two callers may start it at once: the loser's start fails, with "already running" or, while the
    # winner's server is still coming up, pg_ctl's own error; either way the server then answers.
    local started=1 tries=60
    if ! out=$(as_postgres pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start 2>&1) && [[ $out != *"already running"* ]]; then
      started= tries=10
    fi
    for _ in $(seq "$tries"); do
      pg_isready -q -h "$PGHOST" -p "$PGPORT" && break
      # Up on its own socket, not where PGHOST says (a typo, an address it does not listen on): the script waited
      # 30 s for a cluster that ran all along, then blamed the start.
      if as_postgres pg_isready -q -p "$PGPORT"; then
        sleep 1  # its TCP sockets open as its Unix one does
        pg_isready -q -h "$PGHOST" -p "$PGPORT" && break
        local where="an address it listens on (listen_addresses"
        [[ $PGHOST != /* ]] || where="a folder of its sockets (unix_socket_directories"
        refuse "PostgreSQL $PG_VERSION/$PG_CLUSTER runs, but does not answer on $PGHOST:$PGPORT: set PGHOST to" \
          "$where in /etc/postgresql/$PG_VERSION/$PG_CLUSTER/postgresql.conf)"
      fi
      sleep 0.5
    done
    if ! pg_isready -q -h "$PGHOST" -p "$PGPORT"; then
      [[ -n $started ]] || fail "could not start PostgreSQL $PG_VERSION/$PG_CLUSTER: $(head -n 1 <<< "$out")"
      fail "PostgreSQL $PG_VERSION/$PG_CLUSTER does not answer on $PGHOST:$PGPORT; see /var/log/postgresql/"
    fi
  fi
  # Swapped (or another application's database): mlflow server died on alembic's "Can't locate revision" traceback
  # (Optuna's schema), or the first sweep on MLflow's. Each one's alembic_version sits beside its main table.
  local setting db table own other
  for setting in MLFLOW_DB OPTUNA_DB; do
    db=${!setting} table=experiments own="MLflow's" other="Optuna's"
    [[ $setting == MLFLOW_DB ]] || table=studies own="Optuna's" other="MLflow's"
    if exists pg_database datname "$db" && [[ $(psql_admin -d "$db" -c "SELECT to_regclass('public.alembic_version')
        IS NOT NULL AND to_regclass('public.$table') IS NULL") == t ]]; then
      refuse "$setting=$db holds another application's tables (alembic_version, no $table table): $other?" \
        "MLFLOW_DB and OPTUNA_DB swapped? name $own database, or a new one"
    fi
  done
  # The password goes through stdin (not a command line), as a plain literal (in a DO block, a $$ in
  # it would end the block).
  # The name quoted: DB_USER=user (an SQL keyword) failed, its error thrown away, and the script ended without a word.
  local existed=1 made
  if ! exists pg_roles rolname "$DB_USER"; then
    existed=
    if ! made=$(psql_admin -d postgres 2>&1 <<< "CREATE ROLE \"$DB_USER\" LOGIN PASSWORD '${DB_PASSWORD//\'/\'\'}'") \
      && ! exists pg_roles rolname "$DB_USER"; then  # (else another caller created it meanwhile)
      fail "cannot create role $DB_USER: $(head -n 1 <<< "${made#*ERROR:  }")"
    fi
  fi
  # Log in as mlflow server will, before any database is made: a role made earlier with another
  # password is one line here, not a traceback from every server worker later.
  local login
  if ! login=$(PGPASSWORD=$DB_PASSWORD PGCONNECT_TIMEOUT=10 psql -h "$PGHOST" -p "$PGPORT" -U "$DB_USER" \
        -d postgres -w -qtAX -c "SELECT 1" 2>&1); then
    login=$(head -n 1 <<< "${login#psql: error: }")
    local hint=" (role $DB_USER existed already and keeps its password: set DB_PASSWORD to it, or as postgres"
    # PGHOST=/var/run/postgresql: Debian's pg_hba.conf lets a socket's connections in by the OS user's name alone,
    # where no password helps: the line blamed the role's password.
    if [[ $login == *"Peer authentication failed"* ]]; then
      login+=" (on a Unix socket pg_hba.conf wants OS user $DB_USER: set PGHOST=127.0.0.1, or give local"
      login+=" connections scram-sha-256 in /etc/postgresql/$PG_VERSION/$PG_CLUSTER/pg_hba.conf)"
    elif [[ -n $existed ]]; then
      login+="$hint: ALTER ROLE $DB_USER PASSWORD '...')"
    fi
    refuse "cannot log in to PostgreSQL on $PGHOST:$PGPORT as $DB_USER with DB_PASSWORD: $login"
  fi
  for db in "$MLFLOW_DB" "$OPTUNA_DB"; do
    if ! exists pg_database datname "$db" && ! made=$(as_postgres createdb -p "$PGPORT" -O "$DB_USER" "$db" 2>&1) \
      && ! exists pg_database datname "$db"; then  # (else another caller created it meanwhile)
      fail "cannot create database $db: $(head -n 1 <<< "${made#createdb: error: }")"
    fi
    # One made otherwise (by hand, as postgres) may not let the role make its tables: one line here, not a
    # traceback from every server worker (or every sweep) later.
    if [[ $(psql_admin -d "$db" -c "SELECT has_schema_privilege('$DB_USER', 'public', 'CREATE')") != t ]]; then
      refuse "database $db exists, owned by $(psql_admin -d postgres -c \
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '$db'"), and $DB_USER may not make" \
        "tables in it: as postgres, ALTER DATABASE $db OWNER TO $DB_USER (or use another MLFLOW_DB/OPTUNA_DB)"
    fi
  done
  echo "PostgreSQL $PG_VERSION on $PGHOST:$PGPORT: databases $MLFLOW_DB (tracking) and $OPTUNA_DB (Optuna), owner $DB_USER"
}

# Checked before anything is made: with a server already on the port (this script run twice, say),
# `mlflow server` logs a bind error and exits 0.
check_port() {
  command -v python >/dev/null || fail "no python on PATH: activate the project's virtual environment (. .venv/bin/activate)"
  python - "$HOST" "$PORT" "$WORKERS" <<'PY' || exit $?
import errno, importlib.util, os, socket, sys
host, port, workers = sys.argv[1], sys.argv[2], sys.argv[3]


def refuse(line):  # a setting refused: exit 2 (sys.exit's 1 is this host's python lacking a package)
    print(line, file=sys.stderr)
    sys.exit(2)


# Another python on PATH (the venv not activated) failed only at the end, after the databases were made.
missing = [name for name in ("mlflow", "psycopg2") if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"error: {sys.executable} has no {' or '.join(missing)}: activate the project's virtual environment"
             " (. .venv/bin/activate)")


def listener(port):
    """"pid N (command line)" of the process listening on `port` here, if this user may see it, else "". A server
    whose team-server.sh was killed (SIGKILL, the OOM killer) leaves its uvicorn worker serving, in no terminal."""
    import psutil  # mlflow's dependency

    try:
        pids = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr
                and c.laddr.port == port and c.pid}
        if len(pids) != 1:
            return ""
        process = psutil.Process(pids.pop())
        # `mlflow server` listens through its uvicorn (or gunicorn) worker: the server to stop is the one above it
        process = next((p for p in reversed(process.parents()) if "mlflow" in " ".join(p.cmdline()[:3])), process)
        pid, command = process.pid, process.cmdline()
    except (psutil.Error, OSError):
        return ""
    words = " ".join([os.path.basename(command[0]), *command[1:]] if command else []).split()
    shown = " ".join(words)
    return f"pid {pid} ({shown[:120] + '...' if len(shown) > 120 else shown})"


if not port.isdigit() or not 0 < int(port) < 65536:
    refuse(f"error: PORT takes a port number, got {port!r}")
# Else uvicorn refused it only once the databases were made.
if not (workers.isascii() and workers.isdigit() and int(workers) > 0):
    refuse(f"error: WORKERS takes the number of server processes (1, 2, ...), got {workers!r}")
try:
    family, kind, proto, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        s.bind(address)
except OSError as exc:
    # A HOST of no address here (a typo, another host's) was blamed on the port too
    hint = {errno.EADDRINUSE: "another server there? set HOST/PORT",
            errno.EACCES: "a port below 1024 takes root: set PORT"}.get(
        exc.errno, "HOST takes a name or address of this host (0.0.0.0: all of them)")
    if exc.errno == errno.EADDRINUSE and (holder := listener(int(port))):
        hint = f"{holder} holds it: stop it (kill {holder.split()[1]}), or set HOST/PORT"
    refuse(f"error: mlflow server cannot listen on {host}:{port} ({exc.strerror or exc}): {hint}")
PY
}

# Also before anything is made: an ARTIFACTS the server cannot make (a normal user's /srv/...) stopped the
# script only after it had made the databases.
# A URI, as `mlflow server` takes it: file:///srv/x was checked as ./file:/srv/x, made in the current folder; another
# store's (s3://...) made ./s3:/... and started a server that failed each upload (no client library installed).
check_artifacts() {
  local folder=$ARTIFACTS
  if [[ $folder =~ ^[A-Za-z][A-Za-z0-9+.-]*: ]]; then
    [[ $folder =~ ^file:(//)?/([^/]|$) ]] || refuse "ARTIFACTS takes a folder of this host (or file:///...), got" \
      "'$ARTIFACTS': the server keeps and serves the artifacts there"
    folder=${folder#file:}
    folder=/${folder#"${folder%%[!/]*}"}  # file:///srv/x, file:/srv/x: /srv/x
  fi
  mkdir -p "$folder" 2>/dev/null && [[ -w $folder ]] ||
    refuse "cannot make or write ARTIFACTS=$ARTIFACTS: run this as a user who may, or set ARTIFACTS"
}

# Names only: a port or a scheme in one (team-host:5000, http://team-host) made it an "IPv6 address", bracketed, which
# no Host header matches: the server started and answered members 403.
check_allowed_hosts() {
  local name extra
  IFS=', ' read -r -a extra <<< "$ALLOWED_HOSTS"
  for name in "${extra[@]}"; do
    [[ $name =~ ^[A-Za-z0-9*?_.-]+$ || $name =~ ^\[?[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\]?$ ]] || {  # a name, IPv6
      echo "error: ALLOWED_HOSTS takes names or addresses without a port or scheme (team-host,mlflow.example.com;" \
        "any port), got '$name'" >&2; exit 2; }
  done
}

# Held by `mlflow server` (exec'd below) for as long as it runs: run twice close together, before the first server
# listened, both starts passed check_port, and the second server logged a bind error and exited 0.
lock_port() {
  command -v flock >/dev/null || return 0
  lock=${TMPDIR:-/tmp}/team-server-$PORT.lock
  { exec 9>>"$lock"; } 2>/dev/null || return 0  # another user's: check_port only
  flock -n 9 || refuse "another scripts/team-server.sh starts or runs mlflow server on port $PORT: stop it, or set PORT"
  trap 'rm -f "$lock"' EXIT  # refused before the server starts: no file left (exec keeps it for the server)
}

# An MLflow newer than the one that made the tracking database (requirements.txt moved on): every server worker died
# on MLflow's "Detected out-of-date database schema" traceback. One line naming the command that upgrades it (exit 2).
check_schema() {
  python - "$1" "$2" <<'PY' || exit $?
import os, sys

import mlflow
import sqlalchemy
from alembic.script import ScriptDirectory
from mlflow.store.db.utils import _get_alembic_config, _get_schema_version  # what `mlflow server` compares

setting, upgrade = sys.argv[1:]
engine = sqlalchemy.create_engine(os.environ["MLFLOW_BACKEND_STORE_URI"])
try:
    found = _get_schema_version(engine)  # None: a new database, whose tables the server makes
except sqlalchemy.exc.SQLAlchemyError as exc:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    sys.exit(f"error: cannot read the schema version of {setting}: {reason}")
finally:
    engine.dispose()
revisions = ScriptDirectory.from_config(_get_alembic_config(""))
head = revisions.get_current_head()
if found not in (None, head):
    if found in {r.revision for r in revisions.walk_revisions()}:
        print(f"error: {setting} holds the tracking schema of an older MLflow (revision {found}; MLflow "
              f"{mlflow.__version__} needs {head}): back both databases up (docs/team.md), then {upgrade}",
              file=sys.stderr)
    else:
        print(f"error: {setting} holds the tracking schema of a newer MLflow (revision {found}, which MLflow "
              f"{mlflow.__version__} does not know): start the server with the MLflow that upgraded it",
              file=sys.stderr)
    sys.exit(2)
PY
}

[[ ${1:-} == postgres ]] || { check_allowed_hosts; check_port; check_artifacts; lock_port; }
start_postgres
[[ ${1:-} == postgres ]] && exit 0

# Host headers and browser origins MLflow accepts: its own defaults (localhost, private IPs) and the
# names members use (this host's, ALLOWED_HOSTS). These are fnmatch patterns: a literal [ is [[].
hosts=(localhost "localhost:*" 127.0.0.1 "127.0.0.1:*" "[::1]" "[[]::1]:*" 0.0.0.0 "0.0.0.0:*" "192.168.*" "10.*"
       $(printf '172.%s.* ' $(seq 16 31)) "fc00:*" "fd00:*")
origins=() names=()
IFS=', ' read -r -a extra <<< "$ALLOWED_HOSTS"
for name in $(hostname) $(hostname -f 2>/dev/null) $(hostname -I 2>/dev/null) "${extra[@]}"; do
  [[ $name == *:* && $name != \[* ]] && name="[$name]"  # an IPv6 address, as a Host header writes it
  [[ " ${names[*]} " == *" $name "* ]] && continue
  names+=("$name")
  hosts+=("$name" "${name/#\[/[[]}:*")
  origins+=("http://$name:$PORT" "https://$name")
done
MLFLOW_SERVER_ALLOWED_HOSTS=$(IFS=,; echo "${hosts[*]}")
MLFLOW_SERVER_CORS_ALLOWED_ORIGINS=$(IFS=,; echo "${origins[*]}")
password=$(DB_PASSWORD=$DB_PASSWORD python -c 'import os, urllib.parse
print(urllib.parse.quote(os.environ["DB_PASSWORD"], safe=""))')
# A database's URL, as SQLAlchemy (and Optuna) read it: postgres_url SCHEME USER[:PASSWORD] DATABASE
postgres_url() {
  if [[ $PGHOST == /* ]]; then  # a socket folder goes in the query (in the host part: `@/var/run/...:5432/mlflow`)
    echo "$1://$2@/$3?host=$(python -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' \
      "$PGHOST")&port=$PGPORT"
  else  # an IPv6 address, bracketed (else SQLAlchemy's traceback from every server worker)
    local host=$PGHOST
    [[ $host == *:* && $host != \[* ]] && host="[$host]"
    echo "$1://$2@$host:$PGPORT/$3"
  fi
}
MLFLOW_BACKEND_STORE_URI=$(postgres_url postgresql+psycopg2 "$DB_USER:$password" "$MLFLOW_DB")
export MLFLOW_SERVER_ALLOWED_HOSTS MLFLOW_SERVER_CORS_ALLOWED_ORIGINS MLFLOW_BACKEND_STORE_URI
check_schema "MLFLOW_DB=$MLFLOW_DB" "PGPASSWORD=... mlflow db upgrade $(postgres_url postgresql+psycopg2 "$DB_USER" \
  "$MLFLOW_DB")"

echo "mlflow server on http://$HOST:$PORT: backend $(postgres_url postgresql "$DB_USER" "$MLFLOW_DB"), artifacts $ARTIFACTS"
echo "members reach it by these names (more: ALLOWED_HOSTS), localhost or a private IP: ${names[*]}"
echo "sweeps: -P storage=$(postgres_url postgresql "$DB_USER" "$OPTUNA_DB") (password from PGPASSWORD or ~/.pgpass)"
exec python -m mlflow server --host "$HOST" --port "$PORT" --workers "$WORKERS" \
  --artifacts-destination "$ARTIFACTS" --serve-artifacts
