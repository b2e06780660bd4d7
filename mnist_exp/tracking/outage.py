"""Calls to a tracking server that may be away for a while: what counts as away, and the wait."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

import requests
from mlflow.exceptions import MlflowException, RestException

from mnist_exp.errors import TrackingUnavailable, first_line
from mnist_exp.tracking.redaction import redact

log = logging.getLogger("mnist_exp")

RETRY_PAUSE_S = 2.0  # while the server is unreachable, the least time between two attempts
# HTTP statuses that say "try again": overloaded, restarting, or behind a proxy that is.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_T = TypeVar("_T")


def reason(exc: BaseException) -> str:
    """A short, redacted why: `[Errno 111] Connection refused` rather than urllib3's paragraph."""
    text = redact(str(exc).strip())
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text) if unreachable(exc) else None
    return errno.group(0).strip() if errno else redact(first_line(exc))[:200]


def unreachable(exc: BaseException) -> bool:
    """Whether an error means the server could not be reached or briefly could not answer."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, requests.ConnectionError | requests.Timeout):
            return True
        if isinstance(seen, requests.HTTPError) and seen.response is not None:
            return seen.response.status_code in _TRANSIENT_STATUS
        # MLflow wraps a failed connection in an exception without a cause.
        if (
            isinstance(seen, MlflowException)
            and seen.get_http_status_code() in _TRANSIENT_STATUS
            and (isinstance(seen, RestException) or str(seen).startswith("API request to"))
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Outage:
    """Calls to a tracking server that may be away for a while: retried up to `retry_for_s`."""

    def __init__(
        self,
        tracking_uri: str,
        retry_for_s: float,
        meanwhile: str = "training goes on, metrics are kept and retried",
    ) -> None:
        self.tracking_uri = redact(tracking_uri)
        self.retry_for_s = retry_for_s
        self.meanwhile = meanwhile  # what the warning says happens while the server is away
        self.gave_up = False  # an outage outlasted retry_for_s: no more waiting for the server
        self.since: float | None = None  # monotonic time of the first failed call

    def call(self, op: Callable[[], _T]) -> _T:
        """`op()`, retried every `RETRY_PAUSE_S` while the server is unreachable."""
        while True:
            try:
                result = op()
            except Exception as exc:
                if not unreachable(exc) or self.gave_up:
                    raise
                self._failed(exc)
                time.sleep(RETRY_PAUSE_S)
                continue
            if self.since is not None:
                log.warning(
                    f"MLflow tracking server back after {time.monotonic() - self.since:.0f} s"
                )
                self.since = None
            return result

    def _failed(self, exc: BaseException) -> None:
        """Note a failed attempt; raise `TrackingUnavailable` once the outage is too long."""
        now, why = time.monotonic(), reason(exc)
        if self.retry_for_s <= 0:  # nothing to wait for: no warning of a wait, just the error
            self.gave_up = True
            raise TrackingUnavailable(
                f"cannot reach the MLflow tracking server {self.tracking_uri} ({why}): start "
                f"it, or fix mlflow.tracking_uri or MLFLOW_TRACKING_URI"
            )
        if self.since is None:
            self.since = now
            log.warning(
                f"MLflow tracking server unreachable ({why}); {self.meanwhile} "
                f"for up to {self.retry_for_s:g} s"
            )
        if now - self.since > self.retry_for_s:
            self.gave_up = True
            raise TrackingUnavailable(
                f"the MLflow tracking server {self.tracking_uri} was unreachable for more than "
                f"{self.retry_for_s:g} s (mlflow.retry_for_s)"
            )
