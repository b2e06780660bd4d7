"""A sweep's MLflow parent run (a search's study keeps one, reopened each time it goes on), and
at the end what the jobs came to: counts, the best child, a picture."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from mnist_exp import names
from mnist_exp.errors import UserError
from mnist_exp.report import table
from mnist_exp.report.sweep_plot import plot_sweep
from mnist_exp.tracking import store
from mnist_exp.tracking.mlflow_run import MlflowRun
from mnist_exp.tracking.queries import sweep_runs
from mnist_exp.tracking.redaction import redact


def open_parent(config: DictConfig, source: Mapping[str, str]) -> MlflowRun:
    """Start the sweep's parent run, or reopen the one of the study a search continues;
    `source`: the tags naming the command that started it."""
    client, experiment_id = store.open_store(
        config.mlflow.tracking_uri, config.mlflow.experiment_name
    )
    sweep_dir = Path(config.hydra.sweep.dir)
    sweeper = config.hydra.sweeper
    study_name, storage = sweeper.get("study_name"), sweeper.get("storage")
    study: dict[str, str] = {}  # the study a sweeper keeps, if any
    if study_name and storage:
        study = {names.STUDY_TAG: str(study_name), names.STORAGE_TAG: redact(str(storage))}
    params = sweeper.get("params") or {}
    tags = store.source_tags(Path.cwd()) | dict(source) | study
    tags |= {
        names.SWEEP_TAG: "true",
        names.METRIC_TAG: config.optimized_metric,
        names.SWEEP_OVERRIDES_TAG: " ".join(config.hydra.overrides.task),
        names.SWEEP_PARAMS_TAG: " ".join(f"{k}={v}" for k, v in params.items()),
        names.SWEEPER_TAG: str(config.hydra.runtime.choices.get("hydra/sweeper")),
        names.LAUNCHER_TAG: str(config.hydra.runtime.choices.get("hydra/launcher")),
        names.SWEEP_DIR_TAG: str(sweep_dir),
        names.SWEEP_OPENED_TAG: str(time.time_ns() // 1_000_000),
    }
    retry_for_s = float(config.mlflow.retry_for_s)
    if study:
        earlier = _study_parent(client, experiment_id, study)
    elif config.mlflow.get("continue_sweeps"):
        earlier = _grid_parent(client, experiment_id, tags)
    else:
        earlier = None
    if earlier is None:
        name = f"study {study_name}" if study else f"sweep {sweep_dir.parent.name}/{sweep_dir.name}"
        parent = MlflowRun.start(
            client, experiment_id, run_name=name, params={}, tags=tags, retry_for_s=retry_for_s
        )
        if not study:
            return parent
        # Two commands starting one study at once each made one: the earlier stays.
        earlier = _study_parent(client, experiment_id, study)
        if earlier == parent.run_id:
            return parent
        client.delete_run(parent.run_id)
    assert earlier is not None
    parent = MlflowRun.reopen(client, earlier, retry_for_s)
    parent.set_tags(tags)
    return parent


def record_outcome(parent: MlflowRun, config: DictConfig) -> str:
    """Record on the parent how many jobs finished and failed, the best child by
    `optimized_metric` and the sweep's picture; returns the summary line."""
    children = _jobs(parent)
    # A job that failed before it could open a run left only its folder behind.
    jobs = max(len(list(Path(config.hydra.sweep.dir).glob("*/.hydra"))), len(children))
    finished = [r for r in children if r.info.status == "FINISHED"]
    failed = jobs - len(finished)
    counts = {names.SWEEP_JOBS: jobs, names.SWEEP_FINISHED: len(finished)}
    parent.log_metrics(counts | {names.SWEEP_FAILED: failed}, step=0)
    metric = config.optimized_metric
    summary = f"Sweep {parent.run_id}: {jobs} jobs, {len(finished)} finished, {failed} failed"
    unpruned = [r for r in finished if r.data.tags.get(names.PRUNED_TAG) != "true"]
    scored = [r for r in unpruned if not math.isnan(r.data.metrics.get(metric, math.nan))]
    if scored:
        best = table.rank(scored, metric)[0]
        parent.set_tags(
            {
                names.BEST_RUN_ID_TAG: best.info.run_id,
                names.BEST_RUN_NAME_TAG: best.info.run_name or "",
                names.BEST_OVERRIDES_TAG: best.data.tags.get(names.OVERRIDES_TAG, ""),
            }
        )
        value = best.data.metrics[metric]
        parent.log_metrics({names.BEST_PREFIX + metric: value}, step=0)
        goal = names.OPTIMIZABLE_METRICS[metric]
        summary += f"; best {metric} ({goal}) {value:.4f} by run {best.info.run_id} "
        summary += f"({best.info.run_name})"
    with tempfile.TemporaryDirectory() as tmp:
        picture = Path(tmp) / "sweep.png"
        if plot_sweep(children, metric, picture):
            parent.log_artifact(picture)
    return summary


def earlier_jobs(parent: MlflowRun, metric: str) -> dict[str, dict[str, Any]]:
    """The jobs a continued grid ran before, by their overrides: each one's run id, status,
    run folder and `metric` (a finished job is skipped, a cut one resumed: `runner.sweep`)."""
    return {
        _job_key(run): {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "output_dir": run.data.tags.get(names.OUTPUT_DIR_TAG),
            "metrics": {metric: run.data.metrics[metric]} if metric in run.data.metrics else {},
        }
        for run in _jobs(parent)
    }


def _jobs(parent: MlflowRun) -> list[Run]:
    """The sweep's children, but of a job run again (a continued sweep's cut job that had no
    epoch to resume from) its last run only, matched as `names.job_key`; in start order."""
    client = parent.client
    children = sweep_runs(client, client.get_run(parent.run_id))
    latest = {_job_key(r): r.info.run_id for r in children}
    kept = set(latest.values())
    return [r for r in children if r.info.run_id in kept]


def _job_key(run: Run) -> str:
    overrides = run.data.tags.get(names.OVERRIDES_TAG)
    return names.job_key(overrides.split(" ")) if overrides is not None else run.info.run_id


def _grid_parent(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The id of the last parent of a grid sweep with these overrides, sweeper and kind, which
    the same command continues (`mlflow.continue_sweeps`)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{names.SWEEP_TAG}` = 'true'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    overrides = names.job_key(tags[names.SWEEP_OVERRIDES_TAG].split(" "))
    found = [
        r for r in runs
        if names.STUDY_TAG not in r.data.tags
        and r.data.tags.get(names.SWEEPER_TAG) == tags[names.SWEEPER_TAG]
        and names.job_key(r.data.tags.get(names.SWEEP_OVERRIDES_TAG, "").split(" ")) == overrides
    ]  # fmt: skip
    if not found:
        return None
    if found[0].info.status == "RUNNING":  # its process is alive: open_store failed the dead
        where = (
            f"{found[0].data.tags.get(names.HOST_TAG)}, pid {found[0].data.tags.get(names.PID_TAG)}"
        )
        raise UserError(
            f"this sweep is running already (parent run {found[0].info.run_id}, on {where}): "
            f"wait for it to end and run the command again to continue it, or start a new "
            f"sweep with mlflow.continue_sweeps=false"
        )
    return found[0].info.run_id


def _study_parent(client: MlflowClient, experiment_id: str, study: dict[str, str]) -> str | None:
    """The id of the study's parent run in the experiment: the earliest, if there are two."""
    runs = client.search_runs(
        [experiment_id],
        # The sweeper refuses a study name holding a quote, which a filter string cannot hold.
        filter_string=f"tags.`{names.STUDY_TAG}` = '{study[names.STUDY_TAG]}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    found = [r for r in runs if all(r.data.tags.get(k) == v for k, v in study.items())]
    return found[0].info.run_id if found else None
