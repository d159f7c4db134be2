#!/usr/bin/env bash
# A team's MLflow tracking server: PostgreSQL backend store, artifacts proxied by the server.
#
#   scripts/team-server.sh              start PostgreSQL 15, create the role and databases if missing,
#                                       then run `mlflow server` in the foreground
#   scripts/team-server.sh postgres     only start PostgreSQL and create the role and databases
#
# Settings (environment, defaults in brackets):
#   MLFLOW_DB [mlflow]      database of the tracking store and the Model Registry
#   OPTUNA_DB [optuna]      database for Optuna studies (`-P storage=` of sweeps)
#   DB_USER [mlflow]        role owning both; DB_PASSWORD [mlflow] its password (set your own)
#   PGHOST [127.0.0.1]  PGPORT [5432]  PG_VERSION [15]  PG_CLUSTER [main]
#   ARTIFACTS [./mlartifacts]   where the server keeps artifacts
#   HOST [0.0.0.0]  PORT [5000]  WORKERS [2]   where and how `mlflow server` listens
# PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user.
set -euo pipefail

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

for name in "$MLFLOW_DB" "$OPTUNA_DB" "$DB_USER"; do
  [[ $name =~ ^[a-z_][a-z0-9_]*$ ]] || { echo "error: database and role names take a-z, 0-9 and _, got '$name'" >&2; exit 2; }
done

as_postgres() {
  if [[ $(id -un) == postgres ]]; then "$@"
  elif [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"
  else sudo -u postgres "$@"
  fi
}

psql_admin() { as_postgres psql -p "$PGPORT" -v ON_ERROR_STOP=1 -qtAX "$@"; }

start_postgres() {
  if ! command -v pg_ctlcluster >/dev/null || [[ ! -d /usr/lib/postgresql/$PG_VERSION ]]; then
    echo "error: PostgreSQL $PG_VERSION is not installed (Debian: apt-get install -y postgresql-$PG_VERSION)" >&2
    exit 1
  fi
  if ! pg_isready -q -h "$PGHOST" -p "$PGPORT"; then
    # Two callers may start it at once; the loser's "already running" is fine.
    as_postgres pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start 2>/dev/null || true
    for _ in $(seq 60); do pg_isready -q -h "$PGHOST" -p "$PGPORT" && break; sleep 0.5; done
    pg_isready -q -h "$PGHOST" -p "$PGPORT" || {
      echo "error: PostgreSQL $PG_VERSION/$PG_CLUSTER did not start on $PGHOST:$PGPORT; see /var/log/postgresql/" >&2
      exit 1
    }
  fi
  psql_admin -d postgres -c "DO \$\$ BEGIN
      CREATE ROLE $DB_USER LOGIN PASSWORD '${DB_PASSWORD//\'/\'\'}';
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END \$\$;"
  for db in "$MLFLOW_DB" "$OPTUNA_DB"; do
    if [[ -z $(psql_admin -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$db'") ]]; then
      as_postgres createdb -p "$PGPORT" -O "$DB_USER" "$db" 2>/dev/null \
        || [[ -n $(psql_admin -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$db'") ]]
    fi
  done
  echo "PostgreSQL $PG_VERSION on $PGHOST:$PGPORT: databases $MLFLOW_DB (tracking) and $OPTUNA_DB (Optuna), owner $DB_USER"
}

start_postgres
[[ ${1:-} == postgres ]] && exit 0

mkdir -p "$ARTIFACTS"
echo "mlflow server on http://$HOST:$PORT: backend postgresql://$DB_USER@$PGHOST:$PGPORT/$MLFLOW_DB, artifacts $ARTIFACTS"
echo "sweeps: -P storage=postgresql://$DB_USER@$PGHOST:$PGPORT/$OPTUNA_DB (password from PGPASSWORD or ~/.pgpass)"
exec python -m mlflow server --host "$HOST" --port "$PORT" --workers "$WORKERS" \
  --backend-store-uri "postgresql+psycopg2://$DB_USER:$DB_PASSWORD@$PGHOST:$PGPORT/$MLFLOW_DB" \
  --artifacts-destination "$ARTIFACTS" --serve-artifacts
