"""The project from Python (README.md, "From Python"): `train(overrides)`, `runs()` and
`register(name)`.

`train` runs a Hydra job through `mnist-train`'s runner (the same MLflow run, tagged
`mnist_exp.source=python`), never exits, and puts back Hydra's state, logging and signals.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from hydra._internal.callbacks import Callbacks
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobStatus, run_job
from hydra.types import HydraContext
from omegaconf import DictConfig, open_dict

from mnist_exp import names
from mnist_exp.config.checks import check_overrides
from mnist_exp.config.paths import compose_config, composed
from mnist_exp.errors import UserError
from mnist_exp.runner.experiment import RunResult, run_experiment
from mnist_exp.runner.source import caller_source
from mnist_exp.runner.sweep import check_writable, refusals_leave_no_folder

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities.model_registry import ModelVersion

__all__ = ["RunResult", "register", "runs", "train"]


def train(overrides: Sequence[str] = ()) -> RunResult:
    """Run one experiment with these overrides (as `mnist-train`'s); the finished run. Raises
    `UserError` for bad input (the run, once it exists, FAILED), `KeyboardInterrupt` (KILLED)."""
    overrides = list(overrides)
    if any(o.startswith("-") for o in overrides):
        raise UserError(
            f"{' '.join(o for o in overrides if o.startswith('-'))}: train() takes overrides "
            f"only (key=value); for a sweep, use mnist-train -m"
        )
    check_overrides(overrides)
    failures: list[Exception] = []  # what the job raised: Hydra's job keeps only a wrapper
    tags = {
        names.SOURCE_TAG: "python",
        names.COMMAND_TAG: f"mnist_exp.api.train({overrides!r})",
        **caller_source(),  # the script or notebook calling
    }

    def task(cfg: DictConfig) -> RunResult:
        try:
            return run_experiment(cfg, tags)
        except Exception as exc:
            failures.append(exc)
            raise

    with composed(overrides, with_hydra=True) as cfg, refusals_leave_no_folder():
        _unique_run_dir(cfg, overrides)
        check_writable(Path(str(cfg.hydra.run.dir)), "hydra.run.dir")
        loader = GlobalHydra.instance().config_loader()
        context = HydraContext(config_loader=loader, callbacks=Callbacks(cfg))
        with _logging_restored(), _environment_restored():
            job = run_job(task, cfg, "hydra.run.dir", None, context, configure_logging=True)
        if job.status == JobStatus.FAILED:
            raise failures[0]
    result = job.return_value
    assert isinstance(result, RunResult)
    return result


def runs(
    experiment_name: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> pd.DataFrame:
    """The experiment's runs, or a sweep's children, newest first (`mlflow.search_runs`)."""
    import mlflow

    from mnist_exp.tracking.http import configure_requests
    from mnist_exp.tracking.outage import Outage
    from mnist_exp.tracking.redaction import redact
    from mnist_exp.tracking.store import sqlite_path

    cfg = compose_config()
    uri = tracking_uri or str(cfg.mlflow.tracking_uri)
    name = experiment_name or str(cfg.mlflow.experiment_name)
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise UserError(f"no MLflow store at {redact(uri)}: train a run first or pass tracking_uri")
    parent = f"tags.`{names.PARENT_RUN_TAG}` = '{parent_run_id}'" if parent_run_id else ""
    previous = mlflow.get_tracking_uri()
    with _environment_restored():
        configure_requests(cfg.mlflow)
        client = mlflow.MlflowClient(uri)
        experiment = Outage(uri, 0).call(lambda: client.get_experiment_by_name(name))
        if experiment is None:
            raise UserError(
                f"no MLflow experiment {name!r} in {redact(uri)}: pass experiment_name of one there"
            )
        mlflow.set_tracking_uri(uri)
        ids = [experiment.experiment_id]
        try:
            found = mlflow.search_runs(ids, filter_string=parent, order_by=["start_time DESC"])
        finally:
            mlflow.set_tracking_uri(previous)
    assert not isinstance(found, list)
    return found


def register(
    name: str,
    parent_run_id: str | None = None,
    alias: str | None = None,
    metric: str | None = None,
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
) -> ModelVersion:
    """`mnist-compare [PARENT] --register NAME [--alias ALIAS]`: the best run of a sweep (the
    latest by default; best by `metric`, else the sweep's) as a new version of the registered
    model `name`, which `alias` then names (`models:/NAME@ALIAS`)."""
    import mlflow

    from mnist_exp.compare import find_sweep, register_best, sweep_metric
    from mnist_exp.tracking.http import configure_requests
    from mnist_exp.tracking.queries import sweep_runs
    from mnist_exp.tracking.store import open_store

    cfg = compose_config()
    uri = tracking_uri or str(cfg.mlflow.tracking_uri)
    previous = mlflow.get_tracking_uri()
    with _environment_restored():
        configure_requests(cfg.mlflow)
        client, experiment_id = open_store(uri, experiment_name or cfg.mlflow.experiment_name)
        parent = find_sweep(client, experiment_id, parent_run_id)
        chosen_by = metric or sweep_metric(parent) or str(cfg.optimized_metric)
        try:
            return register_best(client, sweep_runs(client, parent), chosen_by, name, alias)[1]
        finally:
            mlflow.set_tracking_uri(previous)


def _unique_run_dir(cfg: DictConfig, overrides: list[str]) -> None:
    """Two calls in the same second would share the default folder (named by the time)."""
    if any(o.startswith("hydra.run.dir=") for o in overrides):
        return
    folder = Path(str(cfg.hydra.run.dir))
    unique, n = folder, 1
    while unique.exists():
        unique, n = folder.with_name(f"{folder.name}-{n}"), n + 1
    with open_dict(cfg):
        cfg.hydra.run.dir = str(unique)


@contextmanager
def _logging_restored() -> Iterator[None]:
    """Hydra's job logging replaces the root logger's handlers; the caller's come back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    ours = logging.getLogger("mnist_exp")
    our_handlers, our_level, our_propagate = ours.handlers[:], ours.level, ours.propagate
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
        ours.handlers[:], ours.level, ours.propagate = our_handlers, our_level, our_propagate


@contextmanager
def _environment_restored() -> Iterator[None]:
    """The variables a run sets (MLflow's HTTP settings, say) are not the caller's next run's."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)
