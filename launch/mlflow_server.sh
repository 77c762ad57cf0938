#!/usr/bin/env bash
# An MLflow tracking server for raymix sweeps: runs, params and metrics in a SQL database,
# checkpoints and plots in an artifact store that the server proxies (so workers on other
# nodes upload through it and need no access of their own).
#
#   launch/mlflow_server.sh                          # 127.0.0.1:5000, state in ./mlflow-server
#   launch/mlflow_server.sh --dir /shared/mlflow     # database and artifacts elsewhere
#   launch/mlflow_server.sh --host 0.0.0.0 --allowed-hosts head.internal:5000
#   PGUSER=mlflow PGPASSWORD=... launch/mlflow_server.sh --backend-store-uri postgresql+psycopg2://db:5432/mlflow
#   launch/mlflow_server.sh --backend-store-uri postgresql+psycopg2://db:5432/mlflow --artifacts-destination s3://bucket/mlflow
#
# PostgreSQL (--backend-store-uri postgresql+psycopg2://HOST:PORT/DATABASE) is the store for
# several writers; the default SQLite file is for one machine, never for NFS. The database
# must exist; MLflow creates its tables. Give the credentials as PGUSER and PGPASSWORD (read
# by the driver, so the password is in neither the command line nor the log) or in the URI
# (postgresql+psycopg2://USER:PASSWORD@HOST/DB, URL-encoded). The driver must sit beside
# mlflow: pip install psycopg2-binary (the image of launch/Dockerfile has it). A bare
# postgresql:// means psycopg 3 to SQLAlchemy 2.1 (pip install 'psycopg[binary]').
#
# Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (or raymix submit --tracking-uri).
# The server listens on 127.0.0.1 unless --host says otherwise: MLflow has no login of
# its own, so expose it only on a network you trust. Runs in the foreground; Ctrl-C stops it.
set -euo pipefail

host=127.0.0.1
port=5000
dir="$PWD/mlflow-server"
backend=""
artifacts=""
allowed=""

usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; }  # the comment at the top
fail() { echo "mlflow_server.sh: error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --host|--port|--dir|--backend-store-uri|--artifacts-destination|--allowed-hosts)
      [[ $# -ge 2 && -n "$2" ]] || fail "$1 needs a value"
      case "$1" in
        --host) host=$2 ;;
        --port) port=$2 ;;
        --dir) dir=$2 ;;
        --backend-store-uri) backend=$2 ;;
        --artifacts-destination) artifacts=$2 ;;
        --allowed-hosts) allowed=$2 ;;
      esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) fail "unknown option $1 (allowed: --host --port --dir --backend-store-uri --artifacts-destination --allowed-hosts)" ;;
  esac
done

[[ "$port" =~ ^[0-9]+$ ]] && (( port >= 1 && port <= 65535 )) || fail "--port $port: expected 1-65535"
command -v mlflow >/dev/null || fail "mlflow is not on PATH: activate raymix's environment (source .venv/bin/activate)"

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)  # MLflow resolves relative SQLite paths against its own working directory
backend=${backend:-"sqlite:///$dir/mlflow.db"}
artifacts=${artifacts:-"$dir/artifacts"}

case "$backend" in
  postgres://*) fail "--backend-store-uri: write postgresql+psycopg2://, not postgres:// (SQLAlchemy knows no postgres://)" ;;
  postgresql*|mysql*|mssql*)  # a database server: its Python driver must sit beside mlflow
    python=$(dirname "$(command -v mlflow)")/python
    [[ -x "$python" ]] || python=python3
    dbapi='import sys; from sqlalchemy.engine import make_url; make_url(sys.argv[1]).get_dialect().import_dbapi()'
    "$python" -c "$dbapi" "$backend" 2>/dev/null || fail "the Python driver of the ${backend%%://*}:// backend" \
      "is not installed beside mlflow. PostgreSQL: postgresql+psycopg2:// with pip install psycopg2-binary" \
      "(launch/Dockerfile's image has it), or postgresql:// with pip install 'psycopg[binary]' (psycopg 3)" ;;
esac
shown=$(sed -E 's#(://[^/@:]*):[^/@]*@#\1:***@#' <<<"$backend")  # no password in the log

args=(server --backend-store-uri "$backend" --artifacts-destination "$artifacts"
      --host "$host" --port "$port" --workers 1)
[[ -n "$allowed" ]] && args+=(--allowed-hosts "$allowed")

# MLflow's job runner (a dozen worker processes for GenAI evaluation jobs) has no use in
# raymix's tracking; set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have it anyway.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

echo "MLflow: backend $shown, artifacts $artifacts; UI and API at http://$host:$port" >&2
exec mlflow "${args[@]}"
