"""How a run ends when training does not: KILLED on Ctrl-C or SIGTERM, FAILED on an error.

One wrapper, so that every way out records the run's end truthfully and says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from mnist_exp import names
from mnist_exp.errors import TrackerLost, UserError, one_line
from mnist_exp.runner import job_log
from mnist_exp.tracking.remote import RemoteRun

log = logging.getLogger("mnist_exp")
# What an OSError says when the disk is full or a folder cannot be written.
_CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


@contextlib.contextmanager
def recording(run: RemoteRun, checkpoint: Path, start_epoch: int) -> Iterator[None]:
    """Record the end of `run` if the block does not finish; signal handlers restored after.

    SIGTERM (a job scheduler's stop) is treated as Ctrl-C. `checkpoint` is the resume
    checkpoint of the run folder; `start_epoch` the epoch a resumed run started after.
    """
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ending = False  # torchrun is ending this rank: SIGTERM stays ignored after the block
    try:
        yield
    except KeyboardInterrupt:
        if not run.opened():
            raise
        raise KeyboardInterrupt(f"interrupted: {_stopped(run, checkpoint, start_epoch)}") from None
    except BaseException as exc:
        if not run.opened():
            raise
        if _lost_peer(exc):  # torchrun ends this rank next: it was stopped, as by SIGTERM
            stopped = _stopped(run, checkpoint, start_epoch)
            # torchrun's SIGTERM comes any moment: at its default it would kill this rank
            # before the command says how the run resumes.
            ending = True
            raise KeyboardInterrupt(f"interrupted: another rank ended: {stopped}") from None
        if _requeued(exc):
            log.warning(
                f"requeued by SLURM: {_stopped(run, checkpoint, start_epoch, requeued=True)}"
            )
            raise
        if _out_of_time(exc):
            raise UserError(
                f"SLURM is ending the job ({exc}): {_stopped(run, checkpoint, start_epoch)}; "
                "give jobs more time with hydra.launcher.timeout_min"
            ) from None
        job_log.upload(run, start_epoch, exc)
        error = _failed(run, exc, checkpoint, start_epoch)
        if error is exc:
            raise
        raise error from exc
    finally:
        for number, handler in previous.items():
            if not (ending and number == signal.SIGTERM):
                signal.signal(number, handler)


def _stopped(run: RemoteRun, checkpoint: Path, start_epoch: int, requeued: bool = False) -> str:
    """Mark the run KILLED, stopped from outside; what became of it and how it resumes."""
    # A second Ctrl-C must not cut the recording of the first short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _log_again(run, checkpoint)
    job_log.upload(run, start_epoch)
    marked = _end_quietly(run, "KILLED")
    if requeued:
        return f"{marked}; the job continues it from its last complete epoch when it starts again"
    return (
        f"{marked}; continue it from its last complete epoch with: "
        f"mnist-rerun {run.run_id} --resume"
    )


def _lost_peer(exc: BaseException) -> bool:
    """Whether another rank of a data-parallel run went away (killed) during a collective."""
    distributed = sys.modules.get("mnist_exp.training.distributed")  # loaded with the loop
    return distributed is not None and distributed.lost_peer(exc)


def _requeued(exc: BaseException) -> bool:
    """Whether submitit requeued this SLURM job (warned of its time limit or preempted, with
    `hydra.launcher.max_num_timeout` left) and is ending it: `sys.exit(-1)` from its handler."""
    return isinstance(exc, SystemExit) and exc.code == -1 and "submitit" in sys.modules


def _out_of_time(exc: BaseException) -> bool:
    """Whether submitit raised it on SLURM's warning of the time limit (SIGUSR2,
    `hydra.launcher.signal_delay_s` before it) in a job it will not requeue."""
    utils = sys.modules.get("submitit.core.utils")  # loaded in every submitit job
    return utils is not None and isinstance(exc, utils.UncompletedJobError)


def _failed(run: RemoteRun, exc: BaseException, last: Path, start_epoch: int) -> BaseException:
    """Mark the run FAILED with why; the error to raise in place of `exc`."""
    from mnist_exp.training.engine import NonFiniteLossError  # torch is loaded by now

    if isinstance(exc, NonFiniteLossError):
        failure = {
            names.ERROR_TAG: str(exc),
            names.FAILED_STEP_TAG: str(exc.step),
            names.FAILED_EPOCH_TAG: str(exc.epoch),
        }
        marked = _end_quietly(run, "FAILED", failure)
        if exc.epoch > start_epoch + 1:
            kept = f"{last} keeps epoch {exc.epoch - 1}"
        elif start_epoch:
            kept = f"the checkpoint of epoch {start_epoch} it resumed from is unchanged"
        else:
            kept = "no epoch of this run completed, so it wrote no checkpoint"
        return UserError(
            f"training diverged: {exc} (epoch {exc.epoch}); {marked}; {kept}: lower "
            f"optimizer.lr (or add a warm-up: scheduler=onecycle)"
        )
    marked = _end_quietly(run, "FAILED", {names.ERROR_TAG: one_line(exc)})
    if isinstance(exc, OSError) and exc.errno in _CANNOT_WRITE:
        return UserError(
            f"cannot write {exc.filename or 'to disk'} ({exc.strerror}): free space there "
            f"or set hydra.run.dir / mlflow.tracking_uri to a writable folder; {marked}"
        )
    if isinstance(exc, TrackerLost):
        # Its message ends with the resume command, which the run's state comes before.
        why, resume = str(exc).rsplit("; ", 1)
        return TrackerLost(f"{why}; {marked}; {resume}")
    if isinstance(exc, UserError):
        return UserError(f"{exc}; {marked}")
    return exc


def _log_again(run: RemoteRun, path: Path) -> None:
    """Log the (atomically written) checkpoint again: a stop may have cut its upload short."""
    if path.is_file():
        try:
            run.log_artifact(path, names.CHECKPOINTS)
        except Exception as exc:
            log.error(f"could not log {path} to MLflow run {run.run_id}: {exc}")


def _end_quietly(run: RemoteRun, status: str, tags: dict[str, str] | None = None) -> str:
    """Record the end of a failed run without hiding the original error behind a new one.

    Returns what became of the run, for the error message: marked, or could not be.
    """
    failed = None
    try:
        if tags:
            run.set_tags(tags)
    except Exception as exc:
        failed = exc
    try:
        run.end(status)  # also when the tags failed: it lets the tracker process exit
    except Exception as exc:
        failed = failed or exc
    if failed and not run.gave_up:  # else the error that follows says the server is gone
        log.error(f"could not mark MLflow run {run.run_id} {status}: {failed}")
    if failed:
        return f"MLflow run {run.run_id} could not be marked {status} (see above)"
    if run.unsent:  # the server stayed away: its end is kept with what it could not send
        return (
            f"MLflow run {run.run_id} is marked {status} once what it could not send, kept "
            f"in {run.unsent}, is sent with: mnist-sync {run.unsent}"
        )
    return f"MLflow run {run.run_id} marked {status}"
