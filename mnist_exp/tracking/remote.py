"""`RemoteRun`: the training process's side of a run recorded by a tracker process.

Importing MLflow, opening the store and creating the run take seconds of Python work; in a
second process they run on another core while the training process imports torch and
starts training, instead of before it. The training process sends what to record over a
socket and never imports MLflow.
"""

from __future__ import annotations

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
from typing import Any, SupportsFloat

from mnist_exp.errors import TrackingUnavailable, UserError
from mnist_exp.tracking.limits import MAX_METRICS_PER_BATCH as BATCH

log = logging.getLogger("mnist_exp")

# Buffered metrics are sent at least this often: the MLflow UI follows a run within seconds,
# and an epoch's end (`sync`) waits for a few seconds' worth only. More often costs the
# tracker more CPU than it saves: each message is a store transaction.
FLUSH_EVERY_S = 2.0


class RemoteRun:
    """One MLflow run, recorded by a tracker process; the methods of `run.Run`.

    Creating it starts the tracker, which imports MLflow and opens the store; `start` or
    `reopen` then opens the run, and `close` instead leaves no run. Metrics are buffered
    here (values may be device tensors, converted only when sent) and sent without waiting;
    every other call waits for the tracker's answer. An error in the tracker, such as a
    store that cannot be opened, is raised by the next call.
    """

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        # A process of its own, not a multiprocessing child: inside a sweep's job the start
        # method may be a launcher's (joblib's loky), which a spawned child cannot take on.
        mine, theirs = socket.socketpair()
        self._conn = Connection(mine.detach())
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mnist_exp.tracking.tracker", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._conn.send((tracking_uri, experiment_name))  # not on the command line: credentials
        self._unanswered = 0
        self._pending: list[tuple[str, SupportsFloat, int, int]] = []
        self._flush_at = 0.0  # time.time() after which the next metric sends the buffer
        self._info: tuple[str, str, str] | None = None
        self._open_error: UserError | None = None
        self.gave_up = False  # the tracking server stayed away longer than retry_for_s

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
        the folder `files[0]` as artifacts under `files[1]` (see `run.Run.log_config_files`).
        The tracker waits out a server outage of up to `retry_for_s` (see `run.Run`).
        """
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
        """Continue a stopped run (see `run.Run.reopen`), adding tags and files as `start`."""
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
        if self._info is None and self._unanswered and self._conn.poll():
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
        while self._unanswered and self._conn.poll():
            self._answer()

    def sync(self) -> None:
        """Send the buffered metrics and wait until the tracker has recorded all of them."""
        self.flush()
        while self._unanswered:
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

    def log_model(
        self,
        folder: Path,
        weights: Path,
        model_target: str,
        model_kwargs: Mapping[str, Any],
        example: Any,
    ) -> None:
        """Build the servable model (see `serving.save`) in `folder` and log it as `model`.

        Returns at once: the tracker builds it while this process goes on.
        """
        self._send("log_model", Path(folder), Path(weights), model_target, model_kwargs, example)

    def end(self, status: str) -> None:
        """Send what is buffered, mark the run FINISHED, FAILED or KILLED; the tracker exits."""
        try:
            self.flush()
        finally:
            self._call("end", status)
            self._process.wait(timeout=30)

    def opened(self) -> bool:
        """Wait until the tracker has opened the run; False if it could not or was not asked."""
        if self._info is None and not self._unanswered:
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
        try:
            # The count moves with the message: a signal re-raised as the block ends must not
            # leave an answer uncounted (a later call would wait for it for ever).
            with _signals_held():
                self._conn.send((method, args))
                self._unanswered += 1
        except (BrokenPipeError, ConnectionResetError, EOFError) as exc:
            raise self._lost() from exc

    def _call(self, method: str, *args: Any) -> Any:
        self._send(method, *args)
        value = None
        while self._unanswered:
            value = self._answer()
        return value

    def _answer(self) -> Any:
        """Read the tracker's oldest unread answer; raise the error it reports."""
        try:
            self._conn.poll(None)  # waiting may be interrupted; reading half a message may not
            with _signals_held():  # nor what the answer says, once it is read
                ok, value = self._conn.recv()
                self._unanswered -= 1
                opening = self._info is None and self._open_error is None
                if opening and ok:
                    self._info = value
                elif opening:
                    self._open_error = value
                if not ok:
                    self.gave_up = self.gave_up or isinstance(value, TrackingUnavailable)
        except (EOFError, ConnectionResetError) as exc:
            raise self._lost() from exc
        if not ok:
            if getattr(value, "detail", None):
                log.error(f"the MLflow tracker process failed:\n{value.detail}")
            raise value
        if opening:
            log.info(f"MLflow run {value[0]} ({value[1]})")
            return None
        return value

    def _lost(self) -> UserError:
        self._process.wait(timeout=5)
        code = self._process.returncode
        return UserError(
            f"the MLflow tracker process ended unexpectedly (exit code {code}): see the lines above"
        )


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer Ctrl-C and SIGTERM while a message goes through: half of one garbles the pipe."""
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(s, lambda number, _: caught.append(number)) for s in held]
    try:
        yield
    finally:
        for number, handler in zip(held, previous, strict=True):
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for signum in caught:
            signal.raise_signal(signum)
