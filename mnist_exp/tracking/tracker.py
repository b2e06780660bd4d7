"""The tracker process (`python -m mnist_exp.tracking.tracker FD`): records runs for `RemoteRun`,
kept idle between runs; if the training process dies without a word, it marks the run FAILED."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from mnist_exp import names
from mnist_exp.errors import TrackingUnavailable, UserError, one_line
from mnist_exp.tracking import forker, system_metrics
from mnist_exp.tracking.messages import End, Open, Request, SetTags, Store
from mnist_exp.tracking.unsent import Journal

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("mnist_exp")

COMMAND = (sys.executable, "-m", "mnist_exp.tracking.tracker")  # and the socket's descriptor
ORPHANED = "the training process ended without closing the run (killed or crashed)"
# Tracker processes whose run has ended, each with its socket: the next run takes one.
idle: list[tuple[Process, Connection]] = []


def take(store: Store, reuse: bool = True) -> tuple[Process, Connection]:
    """An idle tracker process (or a new one), sent `store`, and this end of its socket."""
    while reuse and idle:
        process, conn = idle.pop()
        with contextlib.suppress(OSError):
            if process.poll() is None:
                conn.send(store)
                return process, conn
        conn.close()
    process, conn = start()
    with contextlib.suppress(OSError):  # one that ended at once is found so when it is used
        conn.send(store)
    return process, conn


class Process(Protocol):
    """A tracker process: started here (`subprocess.Popen`) or by a sweep's `forker`."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def kill(self) -> None: ...


def start() -> tuple[Process, Connection]:
    """A new tracker process and the training process's end of its socket: forked by the
    sweep's forker where there is one (MLflow imported already), else a new Python."""
    if address := os.environ.get(forker.FORKER_ENV):
        with contextlib.suppress(OSError, EOFError):  # gone: the sweep is ending
            return forker.connect(address)
    # A process of its own, not a multiprocessing child: inside a sweep's job the start
    # method may be a launcher's (joblib's loky), which a spawned child cannot take on.
    mine, theirs = socket.socketpair()
    fd = theirs.fileno()
    process = subprocess.Popen([*COMMAND, str(fd)], pass_fds=[fd], stdin=subprocess.DEVNULL)
    theirs.close()
    return process, Connection(mine.detach())


def serve(conn: Connection) -> NoReturn:
    """The tracker process: record runs one after another (a sweep's jobs) while it may."""
    # Ctrl-C, SIGTERM and SLURM's time-limit warning (SIGUSR2) reach the whole process group;
    # the training process handles them and then tells this one how the run ended.
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(number, signal.SIG_IGN)
    # What MLflow's import and the opening make lives till the end: the collector's full
    # passes over it would take CPU from training as it starts (as in mnist_exp.train.main).
    gc.disable()
    while _record_one(conn):
        pass
    # All is recorded: skip tearing down MLflow's modules, about a second the run waits for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _record_one(conn: Connection) -> bool:
    """Record one run; True when it ended as told and this process may record another."""
    from mnist_exp.tracking.store import open_store

    try:
        store: Store = conn.recv()
        store.take_environment()
    except (EOFError, OSError):
        return False
    opened: tuple[MlflowClient, str] | Exception
    try:
        opened = open_store(store.tracking_uri, store.experiment_name)
    except Exception as exc:
        opened = exc
    try:
        opening: Open = conn.recv()
    except (EOFError, OSError):
        return False  # the training process stopped before it began: no run
    try:
        if isinstance(opened, Exception):
            raise opened
        run = opening.do(*opened)
    except Exception as exc:
        conn.send((False, _error(exc)))
        return False
    conn.send((True, (run.run_id, run.name, run.experiment_id)))
    resumed = opening.run_id is not None
    every_s = opening.system_metrics_s
    sampler = system_metrics.start(run.run_id, store.tracking_uri, every_s, resumed)
    if not gc.isenabled():
        gc.freeze()  # left out of later passes, the first of which fell on the first metric
        gc.enable()
    journal: Journal | None = None  # the server stayed away too long: requests kept there
    while True:
        try:
            request: Request = conn.recv()
            if isinstance(request, End) and sampler is not None:
                sampler.finish()  # its last samples while the run is still RUNNING
            answer: tuple[bool, Any]
            try:
                answer = (True, journal.keep(request) if journal else request.do(run))
            except TrackingUnavailable as exc:
                if opening.unsent is None or not run.gave_up:
                    answer = (False, _error(exc))
                else:
                    journal = Journal(opening.unsent, store.tracking_uri, run.run_id)
                    answer = (True, journal.keep(request))
            except Exception as exc:
                answer = (False, _error(exc))
            conn.send(answer)
        except (EOFError, OSError):
            break
        if isinstance(request, End):
            return True
    if sampler is not None:
        sampler.finish()
    try:
        for request in (SetTags({names.ERROR_TAG: ORPHANED}), End("FAILED")):
            if journal:
                journal.keep(request)
            else:
                request.do(run)
    except Exception as exc:
        if not run.gave_up:  # a server given up on was reported by the training process
            log.error(f"could not mark MLflow run {run.run_id} FAILED: {_error(exc)}")
    return False


def _error(exc: Exception) -> UserError:
    """The error to raise in the training process: a `UserError` as it is, others in one line
    with their traceback as `detail`, which the training process logs into the run's log."""
    if isinstance(exc, UserError):
        return exc
    error = UserError(f"MLflow tracking failed ({one_line(exc)})")
    error.detail = traceback.format_exc()  # type: ignore[attr-defined]
    return error


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
