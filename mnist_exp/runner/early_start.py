"""The Hydra callback that starts a sweep's first job early, when its jobs run in this process.

Before the sweep's parent run is opened (by the MLflow callback, listed after this one), it
starts the first job's tracker process, which imports MLflow and creates a new SQLite store;
meanwhile this process imports torch. Otherwise all of it came one after another, on one
core, as the sweep and its first job began.
"""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mnist_exp.config.checks import check_config, check_search_space
from mnist_exp.errors import UserError
from mnist_exp.tracking import remote


class EarlyStart(Callback):
    """For a sweep on the basic launcher: the first job's tracker, and torch, at once."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.runtime.choices.get("hydra/launcher") != "basic":
            return  # the jobs run in processes of their own
        try:
            check_config(config)
            check_search_space(config)
        except UserError:
            return  # refused next, by the MLflow callback: nothing to start for it
        remote.start_tracker_early(config.mlflow.tracking_uri, config.mlflow.experiment_name)
        import mnist_exp.runner.build  # noqa: F401  (torch, for the first job)
