"""The run folder's log (Hydra's job log: what the terminal showed), uploaded as the run ends."""

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
    """Upload the job's log as `names.RUN_LOG` (a resumed run's under `resumed-<epoch>/`), with
    `error`, what failed the run, written to it first (the command's last line says it on the
    terminal). Never raises; skipped with the tracking server gone or no log file."""
    if not HydraConfig.initialized() or run.gave_up:
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    # Hydra's job log, in the run folder: not a file of the caller's own (the Python API).
    handler = next((h for h in files if run_dir in Path(h.baseFilename).resolve().parents), None)
    if handler is None:
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
