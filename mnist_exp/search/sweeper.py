"""`hydra/sweeper=optuna` (chosen by `hparams_search=optuna`): Hydra's `Sweeper` on an Optuna study.

It launches `n_jobs` trials at a time through `hydra/launcher` until `n_trials` of the study have
ended, whoever ran them: run again, it continues the study; two commands on one share its trials.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from mnist_exp.config.checks import check_search_space
from mnist_exp.errors import exit_on_user_error
from mnist_exp.names import PARENT_RUN_ENV, STUDY_PARENT_RUN_ATTR
from mnist_exp.search import PLUGIN_NAME
from mnist_exp.search import study as studies
from mnist_exp.search.settings import Settings
from mnist_exp.search.space import SearchSpace, parse
from mnist_exp.search.summary import best_trial
from mnist_exp.tracking.redaction import redact

log = logging.getLogger("mnist_exp")
WAIT_S = 2  # between looks at trials that run elsewhere, once none is left to launch here


class OptunaSweeper(Sweeper):
    """`setup` reads `hydra.sweeper` from the whole config, where its `${...}` resolve."""

    def __init__(self, **_: Any) -> None:
        self.job_idx = 0

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = self.sweep_config = config  # the base class keeps it as Optional
        self.settings = Settings.of(config.hydra.sweeper, config)  # checked by the callback
        self.launcher: Launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> None:
        """Run trials until the study holds `n_trials` that count."""
        settings = self.settings
        with exit_on_user_error():
            space = parse(settings.params, arguments)
            storage = studies.open_storage(settings)
            study = studies.open_study(settings, storage, create=True)
        if parent := os.environ.get(PARENT_RUN_ENV):
            study.set_user_attr(STUDY_PARENT_RUN_ATTR, parent)
        done = len(studies.counted(study))
        log.info(
            f"Optuna study {settings.study_name!r} in {redact(settings.storage)}: "
            f"{done} of {settings.n_trials} trials done; sampler {settings.sampler}, "
            f"pruner {settings.pruner}"
        )
        # A killed sweep's trial still looks RUNNING until its heartbeat is stale: wait that
        # long for trials running elsewhere, to try such a trial again (others' may end first).
        patience = 3 * settings.heartbeat_s + WAIT_S
        waited = 0.0
        while True:
            batch, elsewhere = self._batch_size(study)
            if batch > 0:
                self._run_batch(study, storage, space, batch)
            elif elsewhere and waited < patience:
                time.sleep(WAIT_S)
                waited += WAIT_S
            else:
                break
        if elsewhere:
            log.info(f"{elsewhere} trials of the study are still running elsewhere")
        if (best := best_trial(study)) is not None:
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            folder = Path(self.sweep_config.hydra.sweep.dir)
            OmegaConf.save(OmegaConf.create(results), folder / "optimization_results.yaml")

    def _batch_size(self, study: optuna.Study) -> tuple[int, int]:
        """How many trials to launch now, and how many other commands run on the study."""
        studies.fail_stale(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        left = self.settings.n_trials - len(studies.counted(study)) - len(running)
        return max(0, min(self.settings.n_jobs, left)), len(running)

    def _run_batch(
        self, study: optuna.Study, storage: RDBStorage, space: SearchSpace, size: int
    ) -> None:
        """Ask `size` trials, run them as jobs, and fail any trial its job left running."""
        trials: list[optuna.Trial] = []
        batch: list[Sequence[str]] = []
        for _ in range(size):
            trial = studies.ask(study)  # a trial enqueued again comes first, with its values
            study.sampler = self.settings.sampler_for(trial.number)
            trials.append(trial)
            batch.append([*space.overrides(trial), f"hydra.sweeper.trial={trial.number}"])
        ids = studies.trial_ids(storage, self.settings.study_name, [t.number for t in trials])
        try:
            with studies.heartbeat(storage, ids):  # alive while jobs wait in a queue or start
                returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
        except KeyboardInterrupt:
            for trial_id in ids:  # tried again by the next run of the same command
                if (frozen := _fail(study, storage, trial_id)) is not None:
                    studies.retry(study, frozen)
            raise
        self.job_idx += len(returns)
        for trial_id, job in zip(ids, returns, strict=True):
            if (frozen := _fail(study, storage, trial_id)) is None:
                continue
            try:
                why = f"its job returned {job.return_value!r} without ending it"
            except Exception as exc:  # JobReturn raises the job's own error
                why = f"its job raised {type(exc).__name__}: {exc}"
            log.error(f"Optuna trial {frozen.number} failed: {why}")


def prepare(config: DictConfig) -> Settings:
    """Register the sweeper, and refuse (`UserError`) a search that cannot work."""
    register()
    settings = Settings.of(config.hydra.sweeper, config)
    space = parse(settings.params, list(config.hydra.overrides.task))
    check_search_space(config, [*space.distributions, *space.fixed])
    studies.check_study(settings, studies.open_storage(settings))
    return settings


def register() -> None:
    """Let Hydra instantiate the sweeper by `PLUGIN_NAME`: Hydra takes sweepers only from
    `hydra_plugins.*`, and the project's fixed top level has no such package, so one is made."""
    module_name, _, name = PLUGIN_NAME.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None:
        module = types.ModuleType(module_name, "mnist_exp.search.sweeper, as Hydra finds it")
        body = {"__module__": module_name, "__doc__": OptunaSweeper.__doc__}
        setattr(module, name, type(name, (OptunaSweeper,), body))
        sys.modules[module_name] = module
    Plugins.instance().register(getattr(module, name))


def _fail(study: optuna.Study, storage: RDBStorage, trial_id: int) -> FrozenTrial | None:
    """Fail the trial if its job did not end it; the failed trial, or None if it had ended."""
    trial = storage.get_trial(trial_id)
    if trial.state.is_finished():
        return None
    return study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
