"""MLflow's own HTTP retries and timeout, set before any MLflow client exists."""

from __future__ import annotations

import os


def configure_requests(max_retries: int | None, timeout_s: int | None) -> None:
    """Set MLflow's own per-request HTTP retries and timeout for this process (and its jobs).

    MLflow's defaults (7 retries with exponential backoff, 120 s timeout) would hold up
    training for minutes on a server that is down; the `Run` retries across outages instead.
    """
    if max_retries is not None:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(max_retries)
    if timeout_s is not None:
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)
