"""The run folder's log (Hydra's job log: what the terminal showed), uploaded as the run ends."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from mnist_exp import names
from mnist_exp.errors import UserError, first_line, one_line
from mnist_exp.tracking.remote import RemoteRun

log = logging.getLogger("mnist_exp")


def upload(run: RemoteRun, start_epoch: int, error: BaseException | None = None) -> None:
    """Upload the job's log as `names.RUN_LOG` (a resumed run's in `resumed-<epoch>/`), `error`
    written to it first; never raises, skipped with the tracking server gone or no log file."""
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
            run.log_artifact(shutil.copyfile(path, Path(tmp) / name), folder)
    except Exception as exc:
        log.error(f"could not log {path} to MLflow run {run.run_id}: {one_line(exc)}")


def _job_log_handler() -> logging.FileHandler | None:
    """The handler of Hydra's job log file in the run folder, if there is one."""
    if not HydraConfig.initialized():
        return None
    folder = Path(HydraConfig.get().runtime.output_dir).resolve()
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    # In the run folder: not a file of the caller's own (the Python API).
    return next((h for h in files if folder in Path(h.baseFilename).resolve().parents), None)
