#!/usr/bin/env bash
# Start an MLflow tracking server for many users: runs, params and metrics in PostgreSQL,
# artifacts uploaded through the server into a folder it serves (--serve-artifacts).
# Settings, from the environment:
#   MLFLOW_BACKEND_STORE_URI      the database (default postgresql://mlflow@127.0.0.1:5432/mlflow;
#                                 keep its password in PGPASSWORD or ~/.pgpass, not in the URI)
#   MLFLOW_ARTIFACTS_DESTINATION  the artifact folder (default <project>/mlruns/server-artifacts)
#   MLFLOW_SERVER_HOST            the interface to bind (default 127.0.0.1: this machine only;
#                                 0.0.0.0 for every interface, behind a proxy that authenticates)
#   MLFLOW_SERVER_PORT            default 5000
#   MLFLOW_SERVER_WORKERS         server processes (default 4)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's GenAI job runner (default false here: tracking
#                                 does not use it, and it adds 8 processes of ~240 MB each)
# Further arguments go to `mlflow server`, e.g. --allowed-hosts mlflow.lab.example.org
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
db=${MLFLOW_BACKEND_STORE_URI:-postgresql://mlflow@127.0.0.1:5432/mlflow}
artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-$root/mlruns/server-artifacts}
host=${MLFLOW_SERVER_HOST:-127.0.0.1}
port=${MLFLOW_SERVER_PORT:-5000}
workers=${MLFLOW_SERVER_WORKERS:-4}
python=$root/.venv/bin/python
[[ -x $python ]] || python=$(command -v python3)

fail() { echo "error: $*" >&2; exit 2; }
[[ $db == postgresql://* || $db == postgresql+psycopg2://* ]] ||
  fail "MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI (got '${db%%://*}://...')"
[[ $port =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) ||
  fail "MLFLOW_SERVER_PORT must be a port number (got '$port')"
[[ $workers =~ ^[1-9][0-9]*$ ]] || fail "MLFLOW_SERVER_WORKERS must be a positive number (got '$workers')"
"$python" -c "import mlflow, psycopg2" 2>/dev/null ||
  fail "mlflow or psycopg2 is missing: run bash scripts/setup.sh server"
# A database that cannot be reached is named in one line here, not in a server traceback.
"$python" - "$db" <<'PY' || exit 2
import re, sys
import psycopg2
uri = re.sub(r"^postgresql\+psycopg2://", "postgresql://", sys.argv[1])
try:
    psycopg2.connect(uri, connect_timeout=10).close()
except psycopg2.Error as exc:
    where = re.sub(r"(?<=://)[^/@]+@", "***@", sys.argv[1])
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    sys.exit(f"error: cannot connect to the database {where} ({reason}): "
             "set MLFLOW_BACKEND_STORE_URI (and PGPASSWORD)")
PY
mkdir -p "$artifacts"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
# SQLAlchemy 2.1 reads a plain postgresql:// as psycopg 3; the driver installed here is psycopg2.
exec "$python" -m mlflow server \
  --backend-store-uri "postgresql+psycopg2://${db#*://}" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host "$host" --port "$port" --workers "$workers" "$@"
