"""A run as a trial of an Optuna search: its metric reported after each epoch, training stopped
when the pruner says so, the trial told how the run ended. Outside a search, nothing happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from hydra.conf import HydraConf
from hydra.types import RunMode
from omegaconf import DictConfig

from mnist_exp import names

if TYPE_CHECKING:
    from mnist_exp.runner.pruning import Pruning
    from mnist_exp.search.trial import JobTrial
    from mnist_exp.training import engine


class SearchJob:
    """What a run does as a trial: see the module's docstring. `trial` None: not a trial."""

    def __init__(self, trial: JobTrial | None, metric: str) -> None:
        self.trial = trial
        self.pruning: Pruning | None = None
        if trial is not None:
            from mnist_exp.runner.pruning import Pruning  # imports torch: only in a search

            self.pruning = Pruning(trial, metric)
        self.metric = metric

    @classmethod
    def of(cls, cfg: DictConfig, hydra_cfg: HydraConf) -> SearchJob:
        """The job's trial, when an Optuna search launched it (`hydra.sweeper.trial` set)."""
        if hydra_cfg.mode != RunMode.MULTIRUN or hydra_cfg.sweeper.get("trial") is None:
            return cls(None, cfg.optimized_metric)
        from mnist_exp.search.trial import JobTrial  # imports Optuna: only in a search

        return cls(JobTrial.of_job(hydra_cfg.sweeper, cfg), cfg.optimized_metric)

    @property
    def callbacks(self) -> list[engine.Callback]:
        return [self.pruning] if self.pruning is not None else []

    def tags(self) -> dict[str, str]:
        """The run's tags: its trial's number; once pruned, that and the epoch."""
        if self.trial is None:
            return {}
        tags = {names.TRIAL_TAG: str(self.trial.number)}
        if self.pruning is not None and self.pruning.pruned_at is not None:
            tags |= {
                names.PRUNED_TAG: "true",
                names.PRUNED_AT_EPOCH_TAG: str(self.pruning.pruned_at),
            }
        return tags

    @contextlib.contextmanager
    def training(self, run_id: str) -> Iterator[None]:
        """Inside, the trial holds the run's id and its heartbeat is recorded; an error fails
        the trial (an interruption also enqueues it again)."""
        if self.trial is None:
            yield
            return
        self.trial.attach_run(run_id)
        with self.trial.running():
            yield

    def finish(self, metrics: dict[str, float]) -> None:
        """The run ended FINISHED: the trial is PRUNED, or COMPLETE with the run's metric."""
        if self.trial is None:
            return
        if self.pruning is not None and self.pruning.pruned_at is not None:
            self.trial.pruned()
        else:
            self.trial.complete(metrics.get(self.metric))
