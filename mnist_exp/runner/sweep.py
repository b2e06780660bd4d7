"""The one Hydra callback (conf/config.yaml): a sweep's folder, config and search checked once,
the MLflow parent run opened, and after the last job its outcome recorded; a single run's folder
checked writable. A refused command's folder, made for nothing, is removed again."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mnist_exp import names
from mnist_exp.config.checks import check_config, check_search_space
from mnist_exp.config.world import SWEEP_CORES_ENV, available_cores
from mnist_exp.errors import UserError, exit_on_user_error
from mnist_exp.names import OPTUNA_PLOTS, PARENT_RUN_ENV
from mnist_exp.runner import slurm, workers
from mnist_exp.runner.naming import SWEPT_ENV, grid_size, swept_keys
from mnist_exp.runner.source import command_source, program
from mnist_exp.search import PLUGIN_NAME
from mnist_exp.tracking.http import configure_requests
from mnist_exp.tracking.redaction import redact

if TYPE_CHECKING:
    from mnist_exp.search.settings import Settings
    from mnist_exp.tracking.mlflow_run import MlflowRun

log = logging.getLogger("mnist_exp")
# The folders this command made for its run or sweep (that folder first, then the parents made
# with it), until an MLflow run holds them: `refusals_leave_no_folder` removes them again.
_made: list[list[Path]] = []
# Whether the MLflow run that records this command's folder was opened (`hold_folder`).
_held: list[Callable[[], bool]] = []
_interrupted: list[bool] = []  # set once Ctrl-C or SIGTERM stopped the command (`interrupted`)
_finished: list[bool] = []  # set once this command's sweep has wholly ended (`finished`)
# A continued grid sweep's earlier jobs, for its jobs' processes (`earlier_job`).
EARLIER_JOBS_ENV = "MNIST_EXP_EARLIER_JOBS"
SWEEP_ENV = (PARENT_RUN_ENV, SWEEP_CORES_ENV, SWEPT_ENV, EARLIER_JOBS_ENV)  # what jobs are given


def keep_folder() -> None:
    """An MLflow run was opened for this command's folder: it stays, refused or not."""
    _made.clear()


def hold_folder(opened: Callable[[], bool]) -> None:
    """An MLflow run is being opened for this command's folder: it stays, refused or not, once
    `opened()` says the run exists (a server down from the start leaves no run to hold it)."""
    _held[:] = [opened]


class SweepCallback(Callback):
    """Hydra instantiates it for every command; MLflow and Optuna load only for a sweep."""

    def __init__(self) -> None:
        self.parent: MlflowRun | None = None
        self.search: Settings | None = None
        self.env: dict[str, str] = {}  # what the sweep's jobs find in their environment

    def __getstate__(self) -> dict[str, Any]:
        """What a job in another process gets: the environment, not the parent run, whose MLflow
        client would import MLflow there, on the cores the other jobs start on."""
        return {"parent": None, "search": None, "env": self.env}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep's job gets the sweep's environment, also in a process started before it was
        set (`workers.warm`) or left from an earlier sweep (joblib keeps its workers)."""
        if self.env:
            for key in SWEEP_ENV:
                os.environ.pop(key, None)
            os.environ.update(self.env)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with exit_on_user_error():
            check_writable(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with exit_on_user_error():
            self.check(config)
        slurm.warn_once()
        from mnist_exp.tracking.parent import open_parent

        params = config.hydra.sweeper.get("params") or {}
        overrides = list(config.hydra.overrides.task)
        at_once = self.search.n_jobs if self.search else grid_size(params, overrides)
        ready = workers.warm(config.hydra.launcher, at_once)  # on cores the parent leaves idle
        try:
            with exit_on_user_error():
                self.parent = open_parent(config, command_source(program()))
        except SystemExit:
            workers.stop(config.hydra.launcher)
            raise
        keep_folder()
        self.env = {
            PARENT_RUN_ENV: self.parent.run_id,
            SWEEP_CORES_ENV: str(available_cores()),
            SWEPT_ENV: " ".join(swept_keys(params, overrides)),
        }
        atexit.register(self._abandon)
        log.info(f"Sweep parent run {self.parent.run_id} in {redact(config.mlflow.tracking_uri)}")
        if self.search is None:  # a search continues its study instead
            self._continue(config)
        os.environ.update(self.env)
        ready()

    def _continue(self, config: DictConfig) -> None:
        """Hand the jobs of the grid's earlier commands to this one's (`earlier_job`)."""
        from mnist_exp.tracking.parent import earlier_jobs

        assert self.parent is not None
        jobs = earlier_jobs(self.parent, config.optimized_metric)
        if not jobs:
            return
        self.env[EARLIER_JOBS_ENV] = json.dumps(jobs)
        done = sum(job["status"] == "FINISHED" for job in jobs.values())
        log.info(
            f"Continuing the sweep: {done} of its jobs FINISHED before and are skipped, "
            f"{len(jobs) - done} cut short resume from their last complete epoch, the rest run "
            f"(mlflow.continue_sweeps=false starts a new sweep)"
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mnist_exp.tracking.parent import record_outcome

        parent, self.parent = self.parent, None
        for key in self.env:
            os.environ.pop(key, None)
        self.env = {}
        if parent is None:
            return
        lines = [record_outcome(parent, config)]
        if self.search is not None:
            from mnist_exp.search.summary import outcome

            with tempfile.TemporaryDirectory() as tmp:
                found = outcome(self.search, config.optimized_metric, Path(tmp))
                parent.log_metrics(found.metrics, step=0)
                parent.set_tags(found.tags)
                for picture in found.pictures:
                    parent.log_artifact(picture, OPTUNA_PLOTS)
            lines.insert(0, found.line)
        parent.end("FINISHED")
        log.info("\n".join([*lines, f"Compare them: mnist-compare {parent.run_id}"]))
        if workers.stop(config.hydra.launcher):  # (Ray's own processes end at Python's exit)
            _finished.append(True)

    def check(self, config: DictConfig) -> None:
        """Refuse (`UserError`) a sweep that cannot work, before anything of it exists."""
        check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")
        check_config(config)
        configure_requests(config.mlflow)
        if config.hydra.sweeper.get("_target_") == PLUGIN_NAME:
            from mnist_exp.search.sweeper import prepare

            self.search = prepare(config)
        else:
            check_search_space(config)

    def _abandon(self) -> None:
        """At exit, a parent the sweep never closed is KILLED (Ctrl-C, SIGTERM) or FAILED."""
        if self.parent is not None:
            self.parent.end("KILLED" if _interrupted else "FAILED")


def interrupted() -> None:
    """The command was stopped from outside: a sweep's parent ends KILLED, as its job."""
    _interrupted.append(True)


def finished() -> bool:
    """Whether this command's sweep has ended recorded, with its workers (joblib's) stopped:
    then nothing of it runs any more, and the command may end without tearing down."""
    return bool(_finished)


def earlier_job(overrides: list[str]) -> dict[str, Any] | None:
    """In a continued grid sweep, what an earlier command's job with these overrides left (see
    `tracking.parent.earlier_jobs`); None for a new job, or outside such a sweep."""
    jobs = os.environ.get(EARLIER_JOBS_ENV)
    return json.loads(jobs).get(names.job_key(overrides)) if jobs else None


def check_writable(folder: Path, key: str) -> None:
    """Hydra creates the run folder before the run and would answer with a stack trace; the
    folders made here are `refusals_leave_no_folder`'s to remove."""
    made = [path for path in (folder, *folder.parents) if not path.exists()]
    _made[:] = [made] if made else []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise UserError(
            f"cannot write the run folder {folder} ({exc.strerror or exc}): "
            f"set {key} to a writable folder, or free space on its disk"
        ) from exc


@contextlib.contextmanager
def refusals_leave_no_folder() -> Iterator[None]:
    """A command refused in one line (`SystemExit`, or `UserError` from Python) before any
    MLflow run was opened removes the run or sweep folder it made (Hydra's copy of the config,
    the log of what the terminal showed): each refusal had left an outputs/DATE/TIME/. A
    folder that was there before, or that a run holds (`keep_folder`, `hold_folder`), stays."""
    _made.clear()
    _held.clear()
    _finished.clear()
    try:
        yield
    except (SystemExit, UserError):
        if _made and not (_held and _held[0]()):
            _remove(_made.pop())
        raise


def _remove(made: list[Path]) -> None:
    folder, *parents = made
    shutil.rmtree(folder, ignore_errors=True)
    for parent in parents:
        with contextlib.suppress(OSError):  # not empty: another command's folder is in it
            parent.rmdir()
