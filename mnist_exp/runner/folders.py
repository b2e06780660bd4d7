"""The Hydra callback that refuses, in one line, a run or sweep folder that cannot be written.

Hydra creates the folder before the task runs and would answer with a stack trace.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class RunFolderCallback(Callback):
    """Checks `hydra.run.dir` before a run and `hydra.sweep.dir` before a sweep."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def _check_writable(folder: Path, key: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        sys.exit(
            f"error: cannot write the run folder {folder} ({exc.strerror or exc}): "
            f"set {key} to a writable folder, or free space on its disk"
        )
