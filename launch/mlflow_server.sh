#!/usr/bin/env bash
# An MLflow tracking server for raymix sweeps: runs, params and metrics in a SQL database,
# checkpoints and plots in an artifact store that the server proxies (so workers on other
# nodes upload through it and need no access of their own).
#
#   launch/mlflow_server.sh                          # 127.0.0.1:5000, state in ./mlflow-server
#   launch/mlflow_server.sh --dir /shared/mlflow     # database and artifacts elsewhere
#   launch/mlflow_server.sh --host 0.0.0.0 --allowed-hosts head.internal:5000
#   launch/mlflow_server.sh --backend-store-uri postgresql://user:pw@db/mlflow \
#                           --artifacts-destination s3://bucket/mlflow
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

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
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

args=(server --backend-store-uri "$backend" --artifacts-destination "$artifacts"
      --host "$host" --port "$port" --workers 1)
[[ -n "$allowed" ]] && args+=(--allowed-hosts "$allowed")

# MLflow's job runner (a dozen worker processes for GenAI evaluation jobs) has no use in
# raymix's tracking; set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have it anyway.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

echo "MLflow: backend $backend, artifacts $artifacts; UI and API at http://$host:$port" >&2
exec mlflow "${args[@]}"
