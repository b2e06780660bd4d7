"""The run folder's log (Hydra's job log: what the terminal showed), uploaded to the run.

Called as the run ends, however it ends: finished, failed or killed (`lifecycle.recording`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from mnist_exp import names
from mnist_exp.errors import UserError, first_line, one_line
from mnist_exp.tracking.recorder import Recorder

log = logging.getLogger("mnist_exp")


def upload(run: Recorder, start_epoch: int, error: BaseException | None = None) -> None:
    """Upload the job's log file as `names.RUN_LOG` (a resumed run's under `resumed-<epoch>/`).

    `error`, what failed the run, is written to the file first (not to the terminal, where
    the command's last line says it). Never raises: a failed upload is one line in the log,
    and the run's end is recorded as if it had not been tried. Skipped when the tracking
    server is gone (the run's end says so) or when the job writes no log file
    (`hydra/job_logging=none`).
    """
    handler = _job_log_handler()
    if handler is None or run.gave_up:
        return
    if error is not None:
        why = first_line(error) if isinstance(error, UserError) else one_line(error)
        handler.handle(logging.LogRecord(log.name, logging.ERROR, __file__, 0, why, (), None))
    handler.flush()
    path = Path(handler.baseFilename)
    folder, _, name = names.RUN_LOG.rpartition("/")
    if start_epoch:  # the same run's earlier part keeps its own log
        folder = f"{folder}/resumed-{start_epoch}"
    try:
        # A copy under the artifact's name: Hydra names the file after the job, and lines
        # logged while it uploads would otherwise land in a half-sent file.
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / name
            shutil.copyfile(path, copy)
            run.log_artifact(copy, folder)
    except Exception as exc:
        log.error(f"could not log {path} to MLflow run {run.run_id}: {one_line(exc)}")


def _job_log_handler() -> logging.FileHandler | None:
    """The handler of Hydra's job log file in the run folder, if there is one."""
    if not HydraConfig.initialized():
        return None
    folder = Path(HydraConfig.get().runtime.output_dir).resolve()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            path = Path(handler.baseFilename).resolve()
            if folder in path.parents:  # not a file of the caller's own (the Python API)
                return handler
    return None
