"""A search job's trial: the job reports its metric after each epoch, asks whether to stop, and
tells the study how the trial ended, so a trial ends with its job even if the sweep is gone.

The sweeper names the trial in the job's `hydra.sweeper.trial`; a job outside an Optuna
search has none, and never prunes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import optuna
from omegaconf import DictConfig
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from mnist_exp.errors import UserError
from mnist_exp.names import TRIAL_RUN_ID_ATTR
from mnist_exp.search.settings import Settings
from mnist_exp.search.study import heartbeat, open_storage, open_study, retry, trial_ids

log = logging.getLogger("mnist_exp")


class JobTrial:
    """The Optuna trial one job runs."""

    def __init__(self, study: optuna.Study, storage: RDBStorage, trial_id: int) -> None:
        self.study, self.storage, self.trial_id = study, storage, trial_id
        self.trial = optuna.Trial(study, trial_id)
        self.number: int = self.trial.number

    @classmethod
    def of_job(cls, sweeper: DictConfig, cfg: DictConfig) -> JobTrial | None:
        """The trial `sweeper` (the job's `hydra.sweeper`) names; None outside a search.

        Raises `UserError` when the trial has ended already (the search gave up waiting for
        this job and tried its parameters again), so it is not trained twice.
        """
        number = sweeper.get("trial")
        if number is None:
            return None
        settings = Settings.of(sweeper, cfg)
        storage = open_storage(settings)
        study = open_study(settings, storage, create=False)
        (trial_id,) = trial_ids(storage, settings.study_name, [int(number)])
        state = storage.get_trial(trial_id).state
        if state != TrialState.RUNNING:
            raise UserError(
                f"Optuna trial {number} of study {settings.study_name!r} is {state.name} "
                f"already (its search went on without this job): nothing to do"
            )
        return cls(study, storage, trial_id)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Inside, the trial's heartbeat; an error fails the trial, and an interruption
        (Ctrl-C, SIGTERM) fails it and enqueues its parameters again, like a killed sweep's."""
        try:
            with heartbeat(self.storage, [self.trial_id]):
                yield
        except KeyboardInterrupt:
            frozen = self._tell(TrialState.FAIL)
            if frozen is not None:
                retry(self.study, frozen)
            raise
        except BaseException:
            self._tell(TrialState.FAIL)
            raise

    def attach_run(self, run_id: str) -> None:
        """Keep the job's MLflow run id in the trial's user attributes."""
        self.trial.set_user_attr(TRIAL_RUN_ID_ATTR, run_id)

    def report(self, epoch: int, value: float | None) -> bool:
        """Report the metric after `epoch` (a missing or non-finite one is left out); whether
        the pruner says to stop here."""
        if value is None or not math.isfinite(value):
            return False
        self.trial.report(value, step=epoch)
        return self.trial.should_prune()

    def complete(self, value: float | None) -> None:
        """The job finished: the trial's value is the run's optimized metric."""
        if value is None or not math.isfinite(value):
            self._tell(TrialState.FAIL)
        else:
            self._tell(TrialState.COMPLETE, value)

    def pruned(self) -> None:
        """The job stopped early: the trial's value is the last one reported."""
        self._tell(TrialState.PRUNED)

    def _tell(
        self, state: TrialState, value: float | None = None
    ) -> optuna.trial.FrozenTrial | None:
        try:
            return self.study.tell(self.number, value, state, skip_if_finished=True)
        except Exception as exc:  # the sweeper fails a trial its job left running
            log.warning(f"could not tell Optuna trial {self.number} it ended {state.name}: {exc}")
            return None
