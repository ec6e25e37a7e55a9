#!/usr/bin/env bash
# An MLflow tracking server backed by PostgreSQL (Debian's packages), both on 127.0.0.1, as in
# production but on this machine. Used by `make mlflow-server` and the integration tests.
#   mlflow-server.sh up | down | stop-mlflow | start-mlflow
# State in $MLFLOW_DIR (default runs/mlflow-server): the database cluster, a password file readable
# by its owner only (libpq reads it through PGPASSFILE: the password is never on a command line,
# in an environment variable or in a URI), the artifact store, logs and pids.
# Clients use MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT.
# ARTIFACTS=s3://BUCKET/PREFIX puts the artifact store on S3 or an S3-compatible server instead of
# $MLFLOW_DIR/artifacts (give the same value to every up/start-mlflow of a server: runs keep
# mlflow-artifacts:/ addresses relative to it). Clients up- and download through the server
# (--serve-artifacts), so only the server needs the S3 settings, from its environment: credentials
# (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role), AWS_DEFAULT_REGION, and
# for a server other than AWS its endpoint, AWS_ENDPOINT_URL=http(s)://host:port (boto3 reads it;
# MLflow's own MLFLOW_S3_ENDPOINT_URL wins over it). The bucket is checked before anything starts.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
DIR=${MLFLOW_DIR:-$ROOT/runs/mlflow-server}
PG_PORT=${PG_PORT:-5433}
MLFLOW_PORT=${MLFLOW_PORT:-5001}
ARTIFACTS=${ARTIFACTS:-$DIR/artifacts}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$PGBIN" ] || { echo "error: PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 2; }
export PGPASSFILE=$DIR/pgpass

as_db_owner() {  # PostgreSQL refuses to run as root: use its own system user then
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- env PGPASSFILE="$PGPASSFILE" "$@"; else "$@"; fi
}

start_mlflow() {  # without MLflow's job workers (GenAI scorers, trace jobs): the study does not use them
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$ROOT/.venv/bin/mlflow" server --workers 2 \
    --backend-store-uri "postgresql+psycopg2://mlflow@127.0.0.1:$PG_PORT/mlflow" \
    --serve-artifacts --artifacts-destination "$ARTIFACTS" --host 127.0.0.1 --port "$MLFLOW_PORT" \
    >>"$DIR/mlflow.log" 2>&1 </dev/null &
  echo $! >"$DIR/mlflow.pid"
  for _ in $(seq 90); do
    curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null && return 0
    sleep 1
  done
  echo "error: the MLflow server did not start; see $DIR/mlflow.log" >&2
  return 1
}

check_artifacts() {  # an s3:// store: its bucket answers, as boto3 in MLflow will reach it; exit 2 if not
  case $ARTIFACTS in s3://*) ;; *) return 0 ;; esac
  "$ROOT/.venv/bin/python" - "$ARTIFACTS" <<'PY'
import os
import sys
from urllib.parse import urlparse

import boto3
import botocore.exceptions

bucket, endpoint = urlparse(sys.argv[1]).netloc, os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
try:
    boto3.client("s3", endpoint_url=endpoint).head_bucket(Bucket=bucket)
except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
    where = (endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
             or "AWS")
    print(f"error: ARTIFACTS={sys.argv[1]}: bucket {bucket!r} at {where} cannot be used ({err})",
          file=sys.stderr)
    sys.exit(2)
PY
}

stop_mlflow() {
  [ -f "$DIR/mlflow.pid" ] || return 0
  local pid; pid=$(cat "$DIR/mlflow.pid")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 10); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$DIR/mlflow.pid"
}

case ${1:-} in
  up)
    check_artifacts
    mkdir -p "$DIR/artifacts"
    if [ ! -d "$DIR/pg" ]; then
      mkdir -p "$DIR/pg"
      password=$("$ROOT/.venv/bin/python" -c 'import secrets; print(secrets.token_hex(16))')
      (umask 077; echo "$password" >"$DIR/pwfile"
       echo "127.0.0.1:$PG_PORT:*:mlflow:$password" >"$PGPASSFILE")
      [ "$(id -u)" = 0 ] && chown postgres "$DIR/pg" "$DIR/pwfile" "$PGPASSFILE"
      as_db_owner "$PGBIN/initdb" -D "$DIR/pg" -U mlflow --auth=scram-sha-256 \
        --pwfile="$DIR/pwfile" >"$DIR/initdb.log"
      rm -f "$DIR/pwfile"
    fi
    as_db_owner "$PGBIN/pg_ctl" -D "$DIR/pg" -l "$DIR/pg/postgres.log" -w start \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $DIR/pg" >/dev/null
    as_db_owner "$PGBIN/psql" -w -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -tAc \
      "select 1 from pg_database where datname = 'mlflow'" | grep -q 1 ||
      as_db_owner "$PGBIN/createdb" -w -h 127.0.0.1 -p "$PG_PORT" -U mlflow mlflow
    # the sweeps' Optuna studies: their own database on the same server
    as_db_owner "$PGBIN/psql" -w -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -tAc \
      "select 1 from pg_database where datname = 'optuna'" | grep -q 1 ||
      as_db_owner "$PGBIN/createdb" -w -h 127.0.0.1 -p "$PG_PORT" -U mlflow optuna
    start_mlflow
    echo "MLflow up: MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT (PostgreSQL on 127.0.0.1:$PG_PORT," \
      "artifacts in $ARTIFACTS);" \
      "OPTUNA_STORAGE=postgresql+psycopg2://mlflow@127.0.0.1:$PG_PORT/optuna PGPASSFILE=$PGPASSFILE"
    ;;
  stop-mlflow) stop_mlflow ;;
  start-mlflow) check_artifacts; start_mlflow ;;
  down)
    stop_mlflow
    [ -d "$DIR/pg" ] && as_db_owner "$PGBIN/pg_ctl" -D "$DIR/pg" -m fast -w stop >/dev/null 2>&1 || true
    echo "MLflow and PostgreSQL down"
    ;;
  *) echo "usage: $0 up|down|stop-mlflow|start-mlflow" >&2; exit 2 ;;
esac
