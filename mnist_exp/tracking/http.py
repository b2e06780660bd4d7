"""MLflow's own HTTP retries and timeout, set before any MLflow client exists."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def configure_requests(mlflow: Mapping[str, Any]) -> None:
    """Set the config's `mlflow.request_max_retries` and `request_timeout_s` for this process.

    MLflow reads them from the environment, so the processes it starts (trackers, a sweep's
    jobs) take them too. MLflow's defaults (7 retries with exponential backoff, 120 s timeout)
    would hold up a command for minutes on a server that is down; runs retry across outages
    themselves instead.
    """
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(mlflow["request_max_retries"])
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(mlflow["request_timeout_s"])
