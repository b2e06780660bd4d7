"""MLflow's own HTTP retries and timeout, set before any MLflow client exists."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def configure_requests(mlflow: Mapping[str, Any]) -> None:
    """Set the config's `mlflow.request_max_retries` and `request_timeout_s` in the environment,
    for this process and those it starts: MLflow's defaults (7 retries, 120 s) would hold up a
    command for minutes on a server that is down, where runs retry across outages themselves."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(mlflow["request_max_retries"])
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(mlflow["request_timeout_s"])
