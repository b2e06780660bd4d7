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
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn, SupportsFloat

from mnist_exp.errors import TrackerLost, TrackingUnavailable, UserError
from mnist_exp.names import TRACKER_RESTARTS_TAG
from mnist_exp.report.model_spec import ModelSpec
from mnist_exp.tracking.limits import MAX_METRICS_PER_BATCH as BATCH
from mnist_exp.tracking.tracker import ENVIRONMENT_PREFIXES, handle

log = logging.getLogger("mnist_exp")

# Buffered metrics are sent at least this often: the MLflow UI follows a run within seconds,
# and an epoch's end (`sync`) waits for a few seconds' worth only. More often costs the
# tracker more CPU than it saves: each message is a store transaction.
FLUSH_EVERY_S = 2.0
# A tracker that dies is replaced this many times in a run at most (each is a new process).
MAX_TRACKER_RESTARTS = 3
# How a tracker process is started, with the socket's file descriptor appended.
TRACKER_COMMAND = (sys.executable, "-m", "mnist_exp.tracking.tracker")
# Tracker processes whose run has ended, each with its socket: the next run takes one.
_idle: list[tuple[subprocess.Popen[bytes], Connection]] = []


class RemoteRun:
    """One MLflow run, recorded by a tracker process; the methods of `mlflow_run.MlflowRun`.

    Creating it starts the tracker, which imports MLflow and opens the store; `start` or
    `reopen` then opens the run, and `close` instead leaves no run. Metrics are buffered
    here (values may be device tensors, converted only when sent) and sent without waiting;
    every other call waits for the tracker's answer. An error in the tracker, such as a
    store that cannot be opened, is raised by the next call.
    """

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        self._store = (tracking_uri, experiment_name)
        self._retry_for_s = 0.0
        # Sent and not yet answered, oldest first: what a new tracker is sent again.
        self._unconfirmed: collections.deque[tuple[str, tuple[Any, ...]]] = collections.deque()
        self._pending: list[tuple[str, SupportsFloat, int, int]] = []
        self._flush_at = 0.0  # time.time() after which the next metric sends the buffer
        self._info: tuple[str, str, str] | None = None
        self._open_error: UserError | None = None
        self._restarts = 0
        # Once no tracker could take the run over: the run opened in this process to end it,
        # or None when even that failed; every later call then raises `_lost_error`.
        self._lost_error: TrackerLost | None = None
        self._local: Any = None
        self.gave_up = False  # the tracking server stayed away longer than retry_for_s
        self._spawn()

    def _spawn(self, reuse: bool = True) -> None:
        """Take an idle tracker process (or start one) and send it the store to open."""
        while reuse and _idle:
            self._process, self._conn = _idle.pop()
            if self._process.poll() is None and self._hand_over():
                return
            self._conn.close()
        self._process, self._conn = _start_tracker()
        self._hand_over()

    def _hand_over(self) -> bool:
        """Tell the tracker the store and this process's MLflow settings; False if it is gone."""
        try:
            # Not on the command line, where other users would see credentials.
            self._conn.send((*self._store, _environment()))
        except OSError:
            return False
        return True

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
        """Open a new run (and its experiment if new); returns at once.

        Its params are `config` flattened to dotted keys; the tracker adds
        `store.source_tags(project_root)` to `tags` and logs the installed packages and
        the folder `files[0]` as artifacts under `files[1]` (see `MlflowRun.log_config_files`).
        The tracker waits out a server outage of up to `retry_for_s` (see `mlflow_run.MlflowRun`).
        """
        self._retry_for_s = retry_for_s
        opening = {"run_name": run_name, "params": dict(config), "project_root": project_root}
        self._send("open", opening | {"tags": dict(tags), "files": files, "retry": retry_for_s})

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
        opening = {"run_id": run_id, "tags": dict(tags), "files": files, "retry": retry_for_s}
        self._send("open", opening)

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
        if self._info is None and self._unconfirmed and self._conn.poll():
            self._answer()  # the opening's answer: a store that cannot be opened stops training
        now = time.time()
        self._pending.append((key, value, int(now * 1000), step))
        if len(self._pending) >= BATCH or now >= self._flush_at:
            self.flush()

    def log_metrics(self, metrics: Mapping[str, SupportsFloat], step: int) -> None:
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def flush(self) -> None:
        """Send the buffered metrics; the tracker records them while training goes on."""
        pending, self._pending = self._pending, []
        self._flush_at = time.time() + FLUSH_EVERY_S
        for i in range(0, len(pending), BATCH):
            chunk = [(k, float(v), t, s) for k, v, t, s in pending[i : i + BATCH]]
            self._send("log_values", chunk)
        while self._unconfirmed and self._conn.poll():
            self._answer()

    def sync(self) -> None:
        """Send the buffered metrics and wait until the tracker has recorded all of them."""
        self.flush()
        while self._unconfirmed:
            self._answer()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call("set_tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(
        self, path: Path, artifact_path: str | None = None, *, defer: bool = False
    ) -> None:
        """Upload a file; with `defer`, during a server outage it is uploaded later."""
        self._call("log_artifact", Path(path), artifact_path, defer)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", Path(folder), artifact_path)

    def metric_history(self, keys: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
        """(step, value) of every recorded value of each key, by step (all sent first)."""
        self.sync()
        return self._call("metric_history", list(keys))

    def log_model(self, weights: Path, spec: ModelSpec) -> None:
        """Log the servable model of `weights` as the run's model (see `MlflowRun.log_model`).

        Returns at once: the tracker builds it while this process goes on.
        """
        self._send("log_model", Path(weights), spec)

    def end(self, status: str) -> None:
        """Send what is buffered, mark the run FINISHED, FAILED or KILLED.

        The tracker then waits, idle, to record this process's next run (a sweep's next job, a
        second `train()` from Python): MLflow is imported and the store open already.
        """
        try:
            self.flush()
        finally:
            self._call("end", status)
            if self._local is None:
                _idle.append((self._process, self._conn))

    def opened(self) -> bool:
        """Wait until the tracker has opened the run; False if it could not or was not asked."""
        if self._info is None and not self._unconfirmed:
            return False
        try:
            self._opened()
        except UserError:
            return False
        return True

    def _opened(self) -> tuple[str, str, str]:
        while self._info is None:
            if self._open_error:
                raise self._open_error
            self._answer()
        return self._info

    def _send(self, method: str, *args: Any) -> None:
        if self._lost_error is not None:
            self._here(method, args)
            return
        with _signals_held():
            # Counted as it is sent: a signal re-raised as the block ends must not leave an
            # answer uncounted (a later call would wait for it for ever).
            self._unconfirmed.append((method, args))
            try:
                self._conn.send((method, args))
                return
            except (BrokenPipeError, ConnectionResetError, EOFError):
                pass
        self._take_over()

    def _call(self, method: str, *args: Any) -> Any:
        if self._lost_error is not None:
            return self._here(method, args)
        self._send(method, *args)
        value = None
        while self._unconfirmed:
            value = self._answer()
        return value

    def _answer(self) -> Any:
        """Read the tracker's oldest unread answer; raise the error it reports."""
        while True:
            try:
                self._conn.poll(None)  # waiting may be interrupted; reading half a message may not
                with _signals_held():  # nor what the answer says, once it is read
                    ok, value = self._conn.recv()
                    self._unconfirmed.popleft()
                    opening = self._info is None and self._open_error is None
                    if opening and ok:
                        self._info = value
                    elif opening:
                        self._open_error = value
                    if not ok:
                        self.gave_up = self.gave_up or isinstance(value, TrackingUnavailable)
                break
            except (EOFError, ConnectionResetError):
                self._take_over()
                if self._lost_error is not None or not self._unconfirmed:
                    return None
        if not ok:
            if getattr(value, "detail", None):
                log.error(f"the MLflow tracker process failed:\n{value.detail}")
            raise value
        if opening:
            log.info(f"MLflow run {value[0]} ({value[1]})")
            return None
        return value

    def _take_over(self) -> None:
        """The tracker died: a new one reopens the run and is sent again all it had not
        confirmed (the store keeps a value once: what was recorded is skipped). If that fails
        too, the run is ended FAILED from this process and `TrackerLost` raised."""
        self._process.wait(timeout=30)
        code = self._process.returncode
        died = f"the MLflow tracker process ended unexpectedly (exit code {code})"
        if self._open_error is not None:
            raise self._open_error  # it exits after a failed opening; that error is the news
        self._conn.close()
        self._restarts += 1
        if self._restarts > MAX_TRACKER_RESTARTS:
            self._give_up(died, f"trackers died {self._restarts} times in this run")
        try:
            self._spawn(reuse=False)
            if self._info is not None:
                self._reopen()
            for message in self._unconfirmed:
                self._conn.send(message)
        except UserError as exc:  # it could not open the run
            self._give_up(died, exc)
        except (OSError, EOFError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
            ended = self._process.returncode
            self._give_up(
                died,
                "it stopped answering" if ended is None else f"it ended too, exit code {ended}",
            )
        values = sum(len(args[0]) for method, args in self._unconfirmed if method == "log_values")
        log.warning(
            f"{died}; a new one (process {self._process.pid}) continues the run and records "
            f"again the {values} metric values the old one had not confirmed"
        )

    def _reopen(self) -> None:
        """Have the new tracker open the run this one had opened, noting the take-over."""
        run_id = self.run_id
        tags = {TRACKER_RESTARTS_TAG: str(self._restarts)}
        opening = {"run_id": run_id, "tags": tags, "files": None, "retry": self._retry_for_s}
        self._conn.send(("open", (opening,)))
        ok, value = self._conn.recv()
        if not ok:
            raise value

    def _give_up(self, died: str, why: object) -> NoReturn:
        """End the run FAILED from this process, then raise `TrackerLost`."""
        with contextlib.suppress(Exception):
            self._process.kill()
        self._unconfirmed.clear()  # no tracker will answer them; the error says what is lost
        if self._info is None:
            self._lost_error = TrackerLost(f"{died} before the MLflow run was opened ({why})")
            raise self._lost_error
        run_id = self.run_id
        self._lost_error = TrackerLost(
            f"{died} and a new one could not continue MLflow run {run_id} ({why}); continue "
            f"it from its last complete epoch with: mnist-rerun {run_id} --resume"
        )
        try:
            self._local = _open_here(*self._store, run_id, self._retry_for_s)
        except Exception as exc:
            log.error(f"cannot open MLflow run {run_id} from the training process: {exc}")
        raise self._lost_error

    def _here(self, method: str, args: tuple[Any, ...]) -> Any:
        """A request once no tracker is left: done on the run opened in this process."""
        if self._local is None or self._lost_error is None:
            raise self._lost_error or UserError("no MLflow run")
        return handle(self._local, method, args)


def _open_here(tracking_uri: str, experiment_name: str, run_id: str, retry_for_s: float) -> Any:
    """The run, opened in this process (which then imports MLflow) to record its end."""
    from mnist_exp.tracking.mlflow_run import MlflowRun
    from mnist_exp.tracking.store import open_store

    client, _ = open_store(tracking_uri, experiment_name)
    return MlflowRun(client, client.get_run(run_id).info, {}, retry_for_s)


def start_tracker_early(tracking_uri: str, experiment_name: str, model: bool) -> None:
    """Start a tracker process now, for this process's next run to take (a sweep's first
    job): meanwhile it imports MLflow, creates a new SQLite store and, if that run will log a
    `model`, imports torch for it, instead of while that run starts, trains or ends."""
    if _idle:
        return
    process, conn = _start_tracker()
    store = {"tracking_uri": tracking_uri, "experiment_name": experiment_name}
    conn.send(store | {"environment": _environment(), "model": model})
    _idle.append((process, conn))


def _environment() -> dict[str, str]:
    """This process's MLflow settings and credentials, for a tracker to take on."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENVIRONMENT_PREFIXES)}


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
