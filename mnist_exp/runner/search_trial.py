"""A run as the trial of an Optuna search (`hydra.sweeper.trial`): its metric reported each
epoch, pruned when Optuna says, the trial told how the run ended, even if the sweep is gone."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import optuna
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from mnist_exp import names
from mnist_exp.errors import UserError
from mnist_exp.search.settings import Settings
from mnist_exp.search.study import heartbeat, open_storage, open_study, retry, trial_ids
from mnist_exp.training import engine

log = logging.getLogger("mnist_exp")


class SearchTrial(engine.Callback):
    """The Optuna trial a job runs; as the loop's callback, it reports and prunes."""

    def __init__(self, sweeper: DictConfig, cfg: DictConfig) -> None:
        """The job's trial; `UserError` if it ended already (the search gave up on this job)."""
        settings = Settings.of(sweeper, cfg)
        self.storage = open_storage(settings)
        self.study = open_study(settings, self.storage, create=False)
        self.number = int(sweeper.trial)
        (self.trial_id,) = trial_ids(self.storage, settings.study_name, [self.number])
        state = self.storage.get_trial(self.trial_id).state
        if state != TrialState.RUNNING:
            raise UserError(
                f"Optuna trial {self.number} of study {settings.study_name!r} is {state.name} "
                f"already (its search went on without this job): nothing to do"
            )
        self.trial = optuna.Trial(self.study, self.trial_id)
        self.metric = str(cfg.optimized_metric)
        self.pruned_at: int | None = None  # the epoch training stopped after

    def tags(self) -> dict[str, str]:
        """The run's tags: its trial's number; once pruned, that and the epoch."""
        tags = {names.TRIAL_TAG: str(self.number)}
        if self.pruned_at is not None:
            tags |= {names.PRUNED_TAG: "true", names.PRUNED_AT_EPOCH_TAG: str(self.pruned_at)}
        return tags

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            raise engine.StopTraining(
                f"Optuna trial {self.number} is pruned: its {self.metric} {value:.4f} is not "
                f"promising"
            )

    @contextmanager
    def running(self, run_id: str) -> Iterator[None]:
        """Inside, the trial holds the run's id and beats; an error fails it, a signal retries."""
        self.trial.set_user_attr(names.TRIAL_RUN_ID_ATTR, run_id)
        try:
            with heartbeat(self.storage, [self.trial_id]):
                yield
        except KeyboardInterrupt:
            if (frozen := self._tell(TrialState.FAIL)) is not None:
                retry(self.study, frozen)
            raise
        except BaseException:
            self._tell(TrialState.FAIL)
            raise

    def finish(self, metrics: dict[str, float]) -> None:
        """The run ended FINISHED: the trial is PRUNED, or COMPLETE with the run's metric."""
        value = metrics.get(self.metric)
        if self.pruned_at is not None:
            self._tell(TrialState.PRUNED)
        elif value is None or not math.isfinite(value):
            self._tell(TrialState.FAIL)
        else:
            self._tell(TrialState.COMPLETE, value)

    def _tell(self, state: TrialState, value: float | None = None) -> FrozenTrial | None:
        try:
            return self.study.tell(self.number, value, state, skip_if_finished=True)
        except Exception as exc:  # the sweeper fails a trial its job left running
            log.warning(f"could not tell Optuna trial {self.number} it ended {state.name}: {exc}")
            return None
