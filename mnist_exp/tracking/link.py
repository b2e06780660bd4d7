"""`TrackerLink`: the training process's socket to its tracker process, for `RemoteRun`.
Metric values are kept until stored. A tracker that dies is replaced (`_take_over`); when
none can go on, the run is opened here for the runner to end it."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from mnist_exp.errors import TrackerLost, TrackingUnavailable, UserError
from mnist_exp.names import TRACKER_RESTARTS_TAG
from mnist_exp.tracking import messages as m
from mnist_exp.tracking import tracker

if TYPE_CHECKING:
    from mnist_exp.tracking.mlflow_run import MlflowRun

log = logging.getLogger("mnist_exp")

MAX_TRACKER_RESTARTS = 3  # trackers replaced in one run, at most


class TrackerLink:
    """A tracker process (opening the store from now) and the requests it has not answered."""

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        self._store = m.Store(tracking_uri, experiment_name)
        self._opening: m.Open | None = None
        self._info: tuple[str, str, str] | UserError | None = None  # the opening's answer
        self._values: list[tuple[str, Any, int, int]] = []  # key, value, time (ms), step
        self._sent = 0  # the first of `_values` are in unanswered requests
        self._unanswered: list[m.Open | m.Request] = []
        self._restarts = 0
        # No tracker could take the run over: requests are done on the run opened here, if any.
        self._lost: TrackerLost | None = None
        self._local: MlflowRun | None = None
        self.gave_up = False  # the tracking server stayed away longer than retry_for_s
        self.unsent: Path | None = None  # ... and the tracker keeps the run's requests here
        self._process, self._conn = tracker.take(self._store)

    def close(self) -> None:
        """Stop the tracker before a run was opened: nothing is recorded."""
        self._conn.close()
        self._process.wait(timeout=30)

    def opened(self) -> bool:
        """Wait until the tracker has opened the run; False if it could not or was not asked."""
        with contextlib.suppress(UserError):
            return self._opening is not None and bool(self._opened())
        return False

    def sync(self) -> None:
        """Wait until the tracker has recorded every value and done every request."""
        self._push()
        self._receive(wait=True)

    def _opened(self) -> tuple[str, str, str]:
        while self._info is None:
            self._answer()
        if isinstance(self._info, UserError):
            raise self._info
        return self._info

    def _push(self, send: bool = True) -> None:
        """Send the values kept, read as floats now (a device tensor is read once, here)."""
        kept = [(k, float(v), t, s) for k, v, t, s in self._values[self._sent :]]
        self._values[self._sent :] = kept
        if kept and send:
            self._write(m.LogValues(kept))

    def _send(self, request: m.Request, wait: bool = True) -> Any:
        """Send `request` after the values kept; with `wait`, its answer."""
        self._push()
        done_here = self._write(request)
        return self._receive(wait=True) if wait and self._lost is None else done_here

    def _write(self, request: m.Open | m.Request) -> Any:
        if self._lost is not None:
            if self._local is None or isinstance(request, m.Open):
                raise self._lost
            self._values.clear()
            return request.do(self._local)
        with m.signals_held():  # counted as sent: a signal re-raised after must not undo it
            self._unanswered.append(request)
            self._sent += len(request.values) if isinstance(request, m.LogValues) else 0
            try:
                return self._conn.send(request)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                pass
        self._take_over()

    def _receive(self, wait: bool) -> Any:
        """The last of the answers that came (with `wait`, of all); an error is raised."""
        value = None
        while self._unanswered and (wait or self._conn.poll()):
            ok, value = self._answer()
            if not ok:
                raise value
        return value

    def _answer(self) -> tuple[bool, Any]:
        """Read the tracker's answer to the oldest unanswered request."""
        while True:
            try:
                self._conn.poll(None)  # waiting may be interrupted; reading half a message may not
                with m.signals_held():  # nor what the answer says, once it is read
                    ok, value = self._conn.recv()
                    request = self._unanswered.pop(0)
                    if isinstance(request, m.LogValues):  # stored, or failed for good
                        del self._values[: len(request.values)]
                        self._sent -= len(request.values)
                    elif isinstance(request, m.Open):
                        self._info = value
                    self.gave_up = self.gave_up or isinstance(value, TrackingUnavailable)
                    if isinstance(value, m.Kept):
                        self.unsent = value.folder
                break
            except (EOFError, ConnectionResetError):
                self._take_over()
        if isinstance(request, m.Open) and ok:
            log.info(f"MLflow run {value[0]} ({value[1]})")
        elif not ok and getattr(value, "detail", None):
            log.error(f"the MLflow tracker process failed:\n{value.detail}")
        return ok, value

    def _take_over(self) -> None:
        """A new tracker reopens the run and is sent again what was unanswered (the store
        skips a step it holds)."""
        code = self._process.wait(timeout=30)
        if isinstance(self._info, UserError):
            raise self._info  # it exits after a failed opening; that error is the news
        died = f"the MLflow tracker process ended unexpectedly (exit code {code})"
        self._conn.close()
        self._restarts += 1
        again = [r for r in self._unanswered if not isinstance(r, m.Open | m.LogValues)]
        self._unanswered, self._sent = [], 0
        try:
            if self._restarts > MAX_TRACKER_RESTARTS:
                raise UserError(f"trackers died {self._restarts} times in this run")
            self._process, self._conn = tracker.take(self._store, reuse=False)
            if self._opening is not None and isinstance(self._info, tuple):  # reopen it, noting why
                tags = {TRACKER_RESTARTS_TAG: str(self._restarts)}
                opening = self._opening
                self._conn.send(
                    m.Open(tags, None, opening.retry_for_s, self._info[0], unsent=opening.unsent)
                )
                ok, value = self._conn.recv()
                if not ok:
                    raise value
        except UserError as exc:  # it could not reopen the run, or no more restarts
            self._give_up(died, exc)
        except (OSError, EOFError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
            ended = self._process.returncode
            why = "it stopped answering" if ended is None else f"it ended too, exit code {ended}"
            self._give_up(died, why)
        log.warning(
            f"{died}; a new one (process {self._process.pid}) continues the run and records "
            f"again the {len(self._values)} metric values not confirmed"
        )
        if self._opening is not None and self._info is None:
            self._write(self._opening)
        for request in again:
            self._send(request, wait=False)
        self._push()

    def _give_up(self, died: str, why: object) -> NoReturn:
        """Open the run in this process, for the runner to end it FAILED; raise `TrackerLost`."""
        with contextlib.suppress(Exception):
            self._process.kill()
        self._values.clear()  # no tracker will record them; the error says what is lost
        if not isinstance(self._info, tuple):
            self._lost = TrackerLost(f"{died} before the MLflow run was opened ({why})")
            raise self._lost
        run_id = self._info[0]
        self._lost = TrackerLost(
            f"{died} and a new one could not continue MLflow run {run_id} ({why}); continue "
            f"it from its last complete epoch with: mnist-rerun {run_id} --resume"
        )
        try:
            from mlflow.tracking import MlflowClient

            from mnist_exp.tracking.mlflow_run import MlflowRun

            client = MlflowClient(self._store.tracking_uri)
            retry_for_s = self._opening.retry_for_s if self._opening else 0.0
            run = client.get_run(run_id)
            self._local = MlflowRun(client, run.info, {}, retry_for_s, run.data.tags)
        except Exception as exc:
            log.error(f"cannot open MLflow run {run_id} from the training process: {exc}")
        raise self._lost
