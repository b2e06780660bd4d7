"""The tracker process (`python -m mnist_exp.tracking.tracker FD`): records one run for `RemoteRun`.

It imports MLflow and opens the store while the training process imports torch, then
records what it is sent over the socket. If the training process dies without a word, the
tracker sees its end of the socket close and marks the run FAILED.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from mnist_exp import names
from mnist_exp.errors import UserError, one_line
from mnist_exp.tracking.messages import ENVIRONMENT_PREFIXES, End, Open, Request, Store

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from mnist_exp.tracking.mlflow_run import MlflowRun

log = logging.getLogger("mnist_exp")

ORPHANED = "the training process ended without closing the run (killed or crashed)"


def _serve(conn: Connection) -> None:
    """The tracker process: for each run in turn, open the store, the run, record what it
    is sent until the run ends; then wait for the next run (a sweep's next job)."""
    # Ctrl-C and a job scheduler's SIGTERM reach the whole process group; the training
    # process handles them and then tells this one how the run ended. So does SLURM's
    # warning of a job's time limit (SIGUSR2, as submitit asks), which would end this one.
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(number, signal.SIG_IGN)
    # What MLflow's import and the opening make lives till the end: the collector's full
    # passes over it would take CPU from training as it starts (as in mnist_exp.train.main).
    gc.disable()
    # MLflow first, whether or not a run is waiting: a tracker started early is ready sooner.
    import mnist_exp.tracking.store  # noqa: F401

    while _record_one(conn):
        pass


def _record_one(conn: Connection) -> bool:
    """Record one run; True when it ended as told and this process may record another."""
    from mnist_exp.tracking.store import open_store, sqlite_path

    try:
        store: Store = conn.recv()
        _take_environment(store.environment)
        if store.early:  # a new SQLite store is made now; a server's exists already
            if sqlite_path(store.tracking_uri) is not None:
                with contextlib.suppress(Exception):  # the run's own opening says what failed
                    open_store(store.tracking_uri, store.experiment_name)
            return True
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
        run = _open(*opened, opening)
    except Exception as exc:
        conn.send((False, _error(exc)))
        return False
    conn.send((True, (run.run_id, run.name, run.experiment_id)))
    if not gc.isenabled():
        gc.freeze()  # left out of later passes, the first of which fell on the first metric
        gc.enable()
    while True:
        try:
            request: Request = conn.recv()
            answer: tuple[bool, Any]
            try:
                answer = (True, request.do(run))
            except Exception as exc:
                answer = (False, _error(exc))
            conn.send(answer)
        except (EOFError, OSError):
            break
        if isinstance(request, End):
            return True
    try:
        run.set_tags({names.ERROR_TAG: ORPHANED})
        run.end("FAILED")
    except Exception as exc:
        if not run.gave_up:  # a server given up on was reported by the training process
            log.error(f"could not mark MLflow run {run.run_id} FAILED: {_error(exc)}")
    return False


def _take_environment(environment: dict[str, str]) -> None:
    """Make this process's MLflow and mnist_exp variables the training process's of now.

    A tracker records one run after another; between them the training process may change
    them (a sweep's parent run, MLflow's HTTP retries, credentials).
    """
    for key in [k for k in os.environ if k.startswith(ENVIRONMENT_PREFIXES)]:
        if key not in environment:
            del os.environ[key]
    os.environ.update(environment)
    # Logging the model downloads a file of it back, and MLflow's progress bar for that would
    # land in the middle of the training process's output (this process's stderr is its).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _open(client: MlflowClient, experiment_id: str, opening: Open) -> MlflowRun:
    """Start or reopen the run and record what it was made from; FAILED if that fails."""
    from mnist_exp.tracking.mlflow_run import MlflowRun, flatten
    from mnist_exp.tracking.store import installed_requirements, source_tags

    tags = opening.tags
    if opening.run_id is not None:
        run = MlflowRun.reopen(client, opening.run_id, opening.retry_for_s)
    else:
        run = MlflowRun.start(
            client,
            experiment_id,
            run_name=opening.run_name,
            params=flatten(opening.params),
            tags=source_tags(opening.project_root) | tags,
            retry_for_s=opening.retry_for_s,
        )
        tags = {}
    try:
        if tags:
            run.set_tags(tags)
        if opening.files:
            run.log_config_files(*opening.files)
        run.log_text(installed_requirements(), names.REQUIREMENTS)
    except Exception as exc:
        run.set_tags({names.ERROR_TAG: str(_error(exc))})
        run.end("FAILED")
        raise
    return run


def _error(exc: Exception) -> UserError:
    """The error to raise in the training process: a `UserError` as it is, others in one line
    with their traceback as `detail`, which the training process logs into the run's log."""
    if isinstance(exc, UserError):
        return exc
    error = UserError(f"MLflow tracking failed ({one_line(exc)})")
    error.detail = traceback.format_exc()  # type: ignore[attr-defined]
    return error


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
    # All is recorded: skip tearing down MLflow's modules, about a second the run waits for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
