#!/usr/bin/env bash
# Open the MLflow UI on the project's store: bash scripts/ui.sh [PORT]  -> http://127.0.0.1:PORT
# MLFLOW_TRACKING_URI, when set, names another store (as it does for training).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
store=${MLFLOW_TRACKING_URI:-sqlite:///$root/mlruns/mlflow.db}
exec "$root/.venv/bin/mlflow" ui --backend-store-uri "$store" --host 127.0.0.1 --port "${1:-5000}"
