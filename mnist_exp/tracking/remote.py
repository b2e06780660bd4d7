"""`RemoteRun`: the training process's side of a run recorded by a tracker process.

Importing MLflow, opening the store and creating the run take seconds of Python work; in a
second process they run on another core while the training process imports torch and
starts training, instead of before it. The training process sends what to record over a
socket and never imports MLflow.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, SupportsFloat

from mnist_exp.errors import TrackerLost, TrackingUnavailable, UserError
from mnist_exp.names import TRACKER_RESTARTS_TAG
from mnist_exp.report.model_spec import ModelSpec
from mnist_exp.tracking import messages as m

if TYPE_CHECKING:
    from mnist_exp.tracking.mlflow_run import MlflowRun

log = logging.getLogger("mnist_exp")

# Metric values are sent at least this often: the MLflow UI follows a run within seconds.
# More often costs the tracker more CPU than it saves: each message is a store transaction.
FLUSH_EVERY_S = 2.0
# A tracker that dies is replaced this many times in a run at most (each is a new process).
MAX_TRACKER_RESTARTS = 3
# How a tracker process is started, with the socket's file descriptor appended.
TRACKER_COMMAND = (sys.executable, "-m", "mnist_exp.tracking.tracker")
# Tracker processes whose run has ended, each with its socket: the next run takes one.
_idle: list[tuple[subprocess.Popen[bytes], Connection]] = []


class RemoteRun:
    """One MLflow run, recorded by a tracker process, which does each request in turn and
    answers it, waiting out a server outage of up to `retry_for_s`.

    Creating it starts the tracker, which imports MLflow and opens the store; `start` or
    `reopen` then opens the run, and `close` instead leaves no run. Metric values are kept
    here until the tracker has stored them: sent every `FLUSH_EVERY_S` unless values sent
    before are unanswered (the server is away: training goes on), and before any other
    request, which thus finds them in MLflow. Requests but a `defer`red upload and the model
    wait for their answer. An error in the tracker is raised by the next call.
    """

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        self._store = (tracking_uri, experiment_name)
        self._retry_for_s = 0.0
        self._values: list[tuple[str, Any, int, int]] = []  # key, value, time (ms), step
        self._sent = 0  # the first of `_values` are in unanswered requests
        self._unanswered: collections.deque[m.Open | m.Request] = collections.deque()
        self._flush_at = 0.0  # time.time() after which the next metric sends what is kept
        self._info: tuple[str, str, str] | UserError | None = None  # the opening's answer
        self._restarts = 0
        # Once no tracker could take the run over: the run opened in this process to end it,
        # or None when even that failed; every later request then raises `_lost`.
        self._lost: TrackerLost | None = None
        self._local: MlflowRun | None = None
        self.gave_up = False  # the tracking server stayed away longer than retry_for_s
        self._spawn()

    def _spawn(self, reuse: bool = True) -> None:
        """Take an idle tracker process (or start one) and send it the store to open."""
        while reuse and _idle:
            self._process, self._conn = _idle.pop()
            with contextlib.suppress(OSError):
                if self._process.poll() is None:
                    self._conn.send(m.Store(*self._store))
                    return
            self._conn.close()
        self._process, self._conn = _start_tracker()
        self._conn.send(m.Store(*self._store))

    def start(
        self,
        *,
        run_name: str | None,
        config: Mapping[str, Any],
        tags: Mapping[str, str],
        project_root: Path,
        files: tuple[Path, str] | None = None,
        retry_for_s: float = 0.0,
    ) -> None:
        """Open a new run with `config` as params, returning at once (see `tracker._open`)."""
        self._retry_for_s = retry_for_s
        params = dict(config)
        self._write(m.Open(dict(tags), files, retry_for_s, None, run_name, params, project_root))

    def reopen(
        self,
        run_id: str,
        *,
        tags: Mapping[str, str],
        files: tuple[Path, str] | None,
        retry_for_s: float = 0.0,
    ) -> None:
        """Continue a stopped run (see `MlflowRun.reopen`), adding tags and files as `start`."""
        self._retry_for_s = retry_for_s
        self._write(m.Open(dict(tags), files, retry_for_s, run_id))

    def close(self) -> None:
        """Stop the tracker before any run was opened: nothing is recorded."""
        self._conn.close()
        self._process.wait(timeout=30)

    @property
    def pid(self) -> int:
        """The tracker process's id (to measure what recording costs)."""
        return self._process.pid

    @property
    def run_id(self) -> str:
        return self._opened()[0]

    @property
    def name(self) -> str:
        return self._opened()[1]

    @property
    def experiment_id(self) -> str:
        return self._opened()[2]

    def log_metric(self, key: str, value: SupportsFloat, step: int) -> None:
        """Keep one value; `value` may be a device tensor, read only when it is sent."""
        now = time.time()
        self._values.append((key, value, int(now * 1000), step))
        if now >= self._flush_at:
            self.flush()

    def log_metrics(self, metrics: Mapping[str, SupportsFloat], step: int) -> None:
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def flush(self) -> None:
        """Read the answers that came; send the values kept, unless some sent are unanswered."""
        self._flush_at = time.time() + FLUSH_EVERY_S
        self._receive(wait=False)
        self._push(send=not self._unanswered)

    def sync(self) -> None:
        """Wait until the tracker has recorded every value and done every request."""
        self._push()
        self._receive(wait=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call(m.SetTags({k: str(v) for k, v in tags.items()}))

    def log_artifact(
        self, path: Path, artifact_path: str | None = None, *, defer: bool = False
    ) -> None:
        """Upload a file; with `defer`, return at once (an outage is waited out meanwhile)."""
        (self._send if defer else self._call)(m.Upload(Path(path), artifact_path))

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self._call(m.Upload(Path(folder), artifact_path))

    def metric_history(self, keys: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
        """(step, value) of every recorded value of each key, by step."""
        return self._call(m.MetricHistory(list(keys)))

    def log_model(self, weights: Path, spec: ModelSpec) -> None:
        """Log the servable model of `weights` as the run's model (see `MlflowRun.log_model`),
        returning at once: the tracker builds it while this process goes on."""
        self._send(m.LogModel(Path(weights), spec))

    def end(self, status: str) -> None:
        """Mark the run FINISHED, FAILED or KILLED, once all before it is recorded.

        The tracker then waits, idle, to record this process's next run (a sweep's next job, a
        second `train()` from Python): MLflow is imported and the store open already.
        """
        try:
            self._call(m.End(status))
        finally:
            if self._lost is None and not self._unanswered:
                _idle.append((self._process, self._conn))

    def opened(self) -> bool:
        """Wait until the tracker has opened the run; False if it could not or was not asked."""
        asked = self._info is not None or any(isinstance(r, m.Open) for r in self._unanswered)
        with contextlib.suppress(UserError):
            return asked and bool(self._opened())
        return False

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

    def _call(self, request: m.Request) -> Any:
        """Send `request` and wait for its answer (and those of all sent before it)."""
        done_here = self._send(request)
        return done_here if self._lost is not None else self._receive(wait=True)

    def _send(self, request: m.Request) -> Any:
        self._push()  # the values logged before it go first
        return self._write(request)

    def _write(self, request: m.Open | m.Request) -> Any:
        if self._lost is not None:  # no tracker is left: done on the run opened here
            if self._local is None or isinstance(request, m.Open):
                raise self._lost
            self._values.clear()
            return request.do(self._local)
        with _signals_held():
            # Counted as it is sent: a signal re-raised as the block ends must not leave an
            # answer uncounted (a later call would wait for it for ever).
            self._unanswered.append(request)
            self._sent += len(request.values) if isinstance(request, m.LogValues) else 0
            try:
                return self._conn.send(request)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                pass
        self._take_over()

    def _receive(self, wait: bool) -> Any:
        """Read the answers that came (with `wait`, all); raise the first error once all are
        read (logging the tracker's traceback of it), else return the last answer."""
        errors, value = [], None
        while self._unanswered and (wait or self._conn.poll()):
            ok, value = self._answer()
            errors += [] if ok else [value]
        for error in errors[:1]:
            if getattr(error, "detail", None):
                log.error(f"the MLflow tracker process failed:\n{error.detail}")
            raise error
        return value

    def _answer(self) -> tuple[bool, Any]:
        """Read the tracker's answer to the oldest unanswered request."""
        while True:
            try:
                self._conn.poll(None)  # waiting may be interrupted; reading half a message may not
                with _signals_held():  # nor what the answer says, once it is read
                    ok, value = self._conn.recv()
                    request = self._unanswered.popleft()
                    if isinstance(request, m.LogValues):  # stored, or failed for good
                        del self._values[: len(request.values)]
                        self._sent -= len(request.values)
                    elif isinstance(request, m.Open):
                        self._info = value
                    self.gave_up = self.gave_up or isinstance(value, TrackingUnavailable)
                if isinstance(request, m.Open) and ok:
                    log.info(f"MLflow run {value[0]} ({value[1]})")
                return ok, value
            except (EOFError, ConnectionResetError):
                self._take_over()

    def _take_over(self) -> None:
        """The tracker died: a new one reopens the run and is sent again the values kept and
        the requests unanswered (the store keeps a value once: a recorded step is skipped).
        If that fails too, the run is ended FAILED from here and `TrackerLost` raised."""
        code = self._process.wait(timeout=30)
        if isinstance(self._info, UserError):
            raise self._info  # it exits after a failed opening; that error is the news
        died = f"the MLflow tracker process ended unexpectedly (exit code {code})"
        self._conn.close()
        self._restarts += 1
        again = [r for r in self._unanswered if not isinstance(r, m.LogValues)]
        self._unanswered.clear()
        self._sent = 0
        if self._restarts > MAX_TRACKER_RESTARTS:
            self._give_up(died, f"trackers died {self._restarts} times in this run")
        try:
            self._spawn(reuse=False)
            if self._info is not None:
                tags = {TRACKER_RESTARTS_TAG: str(self._restarts)}
                self._conn.send(m.Open(tags, None, self._retry_for_s, self._info[0]))
                ok, value = self._conn.recv()
                if not ok:
                    raise value
        except UserError as exc:  # it could not open the run
            self._give_up(died, exc)
        except (OSError, EOFError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
            code = self._process.returncode
            self._give_up(died, "it stopped answering" if code is None else f"it ended too, {code}")
        log.warning(
            f"{died}; a new one (process {self._process.pid}) continues the run and records "
            f"again the {len(self._values)} metric values not confirmed"
        )
        for request in again:
            if isinstance(request, m.Open):
                self._write(request)
            else:
                self._send(request)
        self._push()

    def _give_up(self, died: str, why: object) -> NoReturn:
        """End the run FAILED from this process, then raise `TrackerLost`."""
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
            from mnist_exp.tracking.mlflow_run import MlflowRun
            from mnist_exp.tracking.store import open_store

            client, _ = open_store(*self._store)
            self._local = MlflowRun(client, client.get_run(run_id).info, {}, self._retry_for_s)
        except Exception as exc:
            log.error(f"cannot open MLflow run {run_id} from the training process: {exc}")
        raise self._lost


def start_tracker_early(tracking_uri: str, experiment_name: str) -> None:
    """Start a tracker process now, for this process's next run to take (a sweep's first
    job): meanwhile it imports MLflow and creates a new SQLite store, not as that run starts."""
    if not _idle:
        process, conn = _start_tracker()
        conn.send(m.Store(tracking_uri, experiment_name, early=True))
        _idle.append((process, conn))


def _start_tracker() -> tuple[subprocess.Popen[bytes], Connection]:
    """A new tracker process and this process's end of its socket."""
    # A process of its own, not a multiprocessing child: inside a sweep's job the start
    # method may be a launcher's (joblib's loky), which a spawned child cannot take on.
    mine, theirs = socket.socketpair()
    command = [*TRACKER_COMMAND, str(theirs.fileno())]
    process = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
    theirs.close()
    return process, Connection(mine.detach())


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer Ctrl-C, SIGTERM and SLURM's warning of a time limit (SIGUSR2, whose submitit
    handler raises) while a message goes through: half of one garbles the pipe."""
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    previous = [signal.signal(s, lambda number, _: caught.append(number)) for s in held]
    try:
        yield
    finally:
        for number, handler in zip(held, previous, strict=True):
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for signum in caught:
            signal.raise_signal(signum)
