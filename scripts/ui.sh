#!/usr/bin/env bash
# Open the MLflow UI on the project's store: bash scripts/ui.sh [PORT]  -> http://127.0.0.1:PORT
# MLFLOW_TRACKING_URI, when set, names another store (as it does for training).
# MLflow's GenAI job runner stays off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true: the runs
# of this project never use it, and it adds 8 processes of ~190 MB each.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
store=${MLFLOW_TRACKING_URI:-sqlite:///$root/mlruns/mlflow.db}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec "$root/.venv/bin/mlflow" ui --backend-store-uri "$store" --host 127.0.0.1 --port "${1:-5000}"
