"""Tracker processes for a sweep's parallel jobs, forked from one process that imported MLflow
once: a tracker started as a new Python imports it again, seconds of a core for each job's
process, on the cores the jobs start on."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from mnist_exp.tracking import processes

FORKER_ENV = "MNIST_EXP_TRACKER_FORKER"  # the socket at which a job's process asks for a tracker
_REAP_EVERY_S = 1.0  # how often the forker looks for its ended trackers while idle
# An ended tracker is left a zombie this long before the forker collects it: its job's process,
# which is not its parent, reads its exit code meanwhile.
_KEEP_ENDED_S = 30.0
_running: list[tuple[int, int, str]] = []  # this process's forker: pid, control pipe, folder


class Forked:
    """A tracker forked by the forker: not this process's child, so watched by its pid (and
    start time, should the pid be reused); its exit code is the forker's to know."""

    def __init__(self, pid: int, started: str) -> None:
        self.pid, self._started = pid, started
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            ended = processes.exit_code(self.pid, self._started)
            if ended is not None or not processes.alive(self.pid, self._started):
                self.returncode = ended if ended is not None else 0  # reaped: no telling
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"tracker {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def start(serve: Callable[[Connection], NoReturn]) -> bool:
    """Fork the forker from this process, which must have no other thread (the fork copies
    none); jobs started after find it through `FORKER_ENV`, and each tracker forked runs
    `serve` (`tracker.serve`). False where it cannot be."""
    if _running or threading.active_count() > 1 or not hasattr(os, "fork"):
        return False
    _fork(serve)
    return True


def _fork(serve: Callable[[Connection], NoReturn]) -> None:
    folder = tempfile.mkdtemp(prefix="mnist-exp-trackers-")
    address = os.path.join(folder, "socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    control, kept = os.pipe()  # this process holds `kept` open; its end tells the forker
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the forker
        os.close(kept)
        _only(_serve, listener, control, serve, folder)
    os.close(control)
    listener.close()
    _running.append((pid, kept, folder))
    os.environ[FORKER_ENV] = address


def stop() -> None:
    """End this process's forker (its trackers go on till their jobs' processes end)."""
    os.environ.pop(FORKER_ENV, None)
    while _running:
        pid, kept, folder = _running.pop()
        os.close(kept)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        shutil.rmtree(folder, ignore_errors=True)


def connect(address: str) -> tuple[Forked, Connection]:
    """A new tracker from the forker at `address`, and this end of its socket (`OSError` or
    `EOFError` if there is none)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    conn = Connection(sock.detach())
    pid, started = conn.recv()
    return Forked(pid, started), conn


def _serve(
    listener: socket.socket, control: int, serve: Callable[[Connection], NoReturn], folder: str
) -> NoReturn:
    """The forker: import what a tracker needs, then fork one for each connection, until the
    process that started it ends (its pipe closes, also if it was killed); then its socket's
    `folder` goes."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(number, signal.SIG_IGN)  # the jobs' Ctrl-C: their trackers record it
    from mnist_exp.tracking import messages, mlflow_run, store  # noqa: F401  (MLflow, once)

    ended: dict[int, float | None] = {}  # each tracker's pid: since when it is a zombie
    while True:
        ready, _, _ = select.select([listener.fileno(), control], [], [], _REAP_EVERY_S)
        now = time.monotonic()
        for pid, since in list(ended.items()):
            if since is None and processes.start_ticks(pid) is None:
                ended[pid] = now
            elif since is not None and now - since > _KEEP_ENDED_S:
                os.waitpid(pid, 0)
                del ended[pid]
        if control in ready:
            break
        if listener.fileno() in ready:
            sock, _ = listener.accept()
            pid = os.fork()
            if pid == 0:  # a tracker
                listener.close()
                os.close(control)
                conn = Connection(sock.detach())
                conn.send((os.getpid(), str(processes.start_ticks(os.getpid()))))
                _only(serve, conn)
            ended[pid] = None
            sock.close()
    for pid in ended:  # the sweep has ended: no job asks any more (the others still record)
        os.waitpid(pid, os.WNOHANG)
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


def _only(body: Callable[..., object], *args: Any) -> NoReturn:
    """Run `body(*args)` in a forked process, which must never return into its parent's frames."""
    try:
        body(*args)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)
