"""`hydra/sweeper=optuna` (chosen by `hparams_search=optuna`): Hydra's `Sweeper` on an Optuna study.

It asks the study for up to `n_jobs` trials at a time, launches them as jobs through the
chosen `hydra/launcher` (each job told its trial in `hydra.sweeper.trial`), and goes on
until `n_trials` trials of the study have ended, whoever ran them: the same command run
again continues the study, and two commands on one study share its trials.
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
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from mnist_exp.config.checks import check_search_space
from mnist_exp.errors import UserError
from mnist_exp.names import STUDY_PARENT_RUN_ATTR
from mnist_exp.search import PLUGIN_NAME
from mnist_exp.search import study as studies
from mnist_exp.search.settings import Settings
from mnist_exp.search.space import SearchSpace, parse
from mnist_exp.search.summary import best_trial
from mnist_exp.tracking.mlflow_run import PARENT_RUN_ENV
from mnist_exp.tracking.redaction import redact

log = logging.getLogger("mnist_exp")
WAIT_S = 2  # between looks at trials that run elsewhere, once none is left to launch here


class OptunaSweeper(Sweeper):
    """Hydra instantiates it with the keys of `hydra.sweeper`; `setup` reads and checks them
    from the whole config, where `${trainer.seed}` and the storage's default resolve."""

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
        """Run trials until the study holds `n_trials` that count (the sweep callback then
        records the outcome on the parent run)."""
        settings = self.settings
        try:
            space = parse(settings.params, arguments)
            storage = studies.open_storage(settings)
            study = studies.open_study(settings, storage, create=True)
        except UserError as exc:
            sys.exit(f"error: {exc}")
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent:
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
        best = best_trial(study)
        if best is not None:
            OmegaConf.save(
                OmegaConf.create(
                    {"name": "optuna", "best_params": best.params, "best_value": best.value}
                ),
                Path(self.sweep_config.hydra.sweep.dir) / "optimization_results.yaml",
            )

    def _batch_size(self, study: optuna.Study) -> tuple[int, int]:
        """How many trials to launch now (up to `n_jobs`, leaving room for the trials other
        commands are running on the same study), and how many those are."""
        studies.fail_stale(study)
        running = [t for t in studies.running(study) if t.state == TrialState.RUNNING]
        left = self.settings.n_trials - len(studies.counted(study)) - len(running)
        return max(0, min(self.settings.n_jobs, left)), len(running)

    def _run_batch(
        self, study: optuna.Study, storage: RDBStorage, space: SearchSpace, size: int
    ) -> None:
        """Ask `size` trials, run them as jobs, and fail any trial its job left running."""
        trials: list[optuna.Trial] = []
        batch: list[Sequence[str]] = []
        for _ in range(size):
            trial = study.ask()  # a trial enqueued again is asked first, with its values
            study.sampler = self.settings.sampler_for(trial.number)
            trials.append(trial)
            batch.append([*space.overrides(trial), f"hydra.sweeper.trial={trial.number}"])
        ids = studies.trial_ids(storage, self.settings.study_name, [t.number for t in trials])
        try:
            # The sweep keeps its trials alive while jobs wait in a queue or start up.
            with studies.heartbeat(storage, ids):
                returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
        except KeyboardInterrupt:
            for trial_id in ids:  # tried again by the next run of the same command
                if (frozen := _fail(study, storage, trial_id)) is not None:
                    studies.retry(study, frozen)
            raise
        self.job_idx += len(returns)
        for trial_id, job in zip(ids, returns, strict=True):
            if (frozen := _fail(study, storage, trial_id)) is not None:
                log.error(f"Optuna trial {frozen.number} failed: {_why(job)}")


def prepare(config: DictConfig) -> Settings:
    """Register the sweeper with Hydra, and refuse (`UserError`) a search that cannot work: its
    settings, its search space, its storage, an existing study's direction."""
    register()
    settings = Settings.of(config.hydra.sweeper, config)
    space = parse(settings.params, list(config.hydra.overrides.task))
    check_search_space(config, [*space.distributions, *space.fixed])
    studies.check_study(settings, studies.open_storage(settings))
    return settings


def register() -> None:
    """Let Hydra instantiate the sweeper by `PLUGIN_NAME`.

    Hydra takes a sweeper only from its plugin namespace (`hydra_plugins.*`): a class it has
    registered under that name, which its `_target_` also imports. Plugins usually ship a
    `hydra_plugins` package; the project's top level being fixed, the class is registered
    under that name, in a module of that name, instead.
    """
    module_name, _, name = PLUGIN_NAME.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None:
        module = types.ModuleType(module_name, "mnist_exp.search.sweeper, as Hydra finds it")
        alias = type(name, (OptunaSweeper,), {"__module__": module_name})
        alias.__doc__ = OptunaSweeper.__doc__
        setattr(module, name, alias)
        sys.modules[module_name] = module
    Plugins.instance().register(getattr(module, name))


def _fail(
    study: optuna.Study, storage: RDBStorage, trial_id: int
) -> optuna.trial.FrozenTrial | None:
    """Fail the trial if its job did not end it; the failed trial, or None if it had ended."""
    trial = storage.get_trial(trial_id)
    if trial.state.is_finished():
        return None
    return study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def _why(job: JobReturn) -> str:
    """What a job that left its trial running returned, in a few words."""
    try:
        return f"its job returned {job.return_value!r} without ending it"
    except Exception as exc:  # JobReturn raises the job's own error
        return f"its job raised {type(exc).__name__}: {exc}"
