"""The Hydra callback that owns a sweep's MLflow parent run.

Before any job starts it checks the sweep, opens the store and a parent run; each job's run
becomes its child through an environment variable, so the training code never knows it is in
a sweep. At the end the parent records how many jobs finished and failed, the best child, and
a picture of the metric against each swept param.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mnist_exp import names
from mnist_exp.config.checks import check_config, check_search_space
from mnist_exp.errors import UserError
from mnist_exp.tracking.redaction import redact

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from mnist_exp.tracking.mlflow_run import MlflowRun

log = logging.getLogger("mnist_exp")


class MlflowSweepCallback(Callback):
    """Hydra instantiates it for every command; MLflow is imported only when a sweep starts."""

    def __init__(self) -> None:
        self.parent: MlflowRun | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mnist_exp.tracking import http, store
        from mnist_exp.tracking.mlflow_run import PARENT_RUN_ENV, MlflowRun

        try:
            check_config(config)
            check_search_space(config)
            http.configure_requests(config.mlflow)
            client, experiment_id = store.open_store(
                config.mlflow.tracking_uri, config.mlflow.experiment_name
            )
        except UserError as exc:
            sys.exit(f"error: {exc}")
        choices = config.hydra.runtime.choices
        sweep_dir = Path(config.hydra.sweep.dir)
        study = _study_tags(config)
        tags = (
            store.source_tags(Path.cwd())
            | study
            | {
                names.SWEEP_TAG: "true",
                names.METRIC_TAG: config.optimized_metric,
                names.SWEEP_OVERRIDES_TAG: " ".join(config.hydra.overrides.task),
                names.SWEEP_PARAMS_TAG: " ".join(
                    f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()
                ),
                names.SWEEPER_TAG: str(choices.get("hydra/sweeper")),
                names.LAUNCHER_TAG: str(choices.get("hydra/launcher")),
                names.SWEEP_DIR_TAG: str(sweep_dir),
                names.SWEEP_OPENED_TAG: str(time.time_ns() // 1_000_000),
            }
        )
        retry_for_s = float(config.mlflow.get("retry_for_s") or 0)
        # A search keeping a study has one parent run, reopened each time the study goes on.
        earlier = _study_parent(client, experiment_id, study) if study else None
        if earlier is None:
            name = f"study {study[names.STUDY_TAG]}" if study else None
            self.parent = MlflowRun.start(
                client,
                experiment_id,
                run_name=name or f"sweep {sweep_dir.parent.name}/{sweep_dir.name}",
                params={},
                tags=tags,
                retry_for_s=retry_for_s,
            )
            if study:  # two commands starting one study at once each made one: the earlier stays
                earlier = _study_parent(client, experiment_id, study)
                if earlier == self.parent.run_id:
                    earlier = None
                else:
                    client.delete_run(self.parent.run_id)
        if earlier is not None:
            self.parent = MlflowRun.reopen(client, earlier, retry_for_s)
            self.parent.set_tags(tags)
        assert self.parent is not None
        os.environ[PARENT_RUN_ENV] = self.parent.run_id
        atexit.register(self._abandon)
        uri = redact(config.mlflow.tracking_uri)
        log.info(f"Sweep parent run {self.parent.run_id} in {uri}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mnist_exp.report import table
        from mnist_exp.report.sweep_plot import plot_sweep
        from mnist_exp.tracking.mlflow_run import PARENT_RUN_ENV
        from mnist_exp.tracking.queries import sweep_runs

        parent, self.parent = self.parent, None
        os.environ.pop(PARENT_RUN_ENV, None)
        if parent is None:
            return
        metric = config.optimized_metric
        parent_run = parent.client.get_run(parent.run_id)
        _name_by_swept_overrides(parent.client, sweep_runs(parent.client, parent_run))
        children = sweep_runs(parent.client, parent_run)
        # A job that failed before it could open a run left only its folder behind.
        jobs = max(len(list(Path(config.hydra.sweep.dir).glob("*/.hydra"))), len(children))
        finished = [r for r in children if r.info.status == "FINISHED"]
        failed = jobs - len(finished)
        parent.log_metrics(
            {
                names.SWEEP_JOBS: jobs,
                names.SWEEP_FINISHED: len(finished),
                names.SWEEP_FAILED: failed,
            },
            step=0,
        )
        candidates = [r for r in finished if r.data.tags.get(names.PRUNED_TAG) != "true"]
        best = next(
            (
                r
                for r in table.rank(candidates, metric)
                if not math.isnan(r.data.metrics.get(metric, math.nan))
            ),
            None,
        )
        if best is not None:
            parent.set_tags(
                {
                    names.BEST_RUN_ID_TAG: best.info.run_id,
                    names.BEST_RUN_NAME_TAG: best.info.run_name or "",
                    names.BEST_OVERRIDES_TAG: best.data.tags.get(names.OVERRIDES_TAG, ""),
                }
            )
            parent.log_metrics({names.BEST_PREFIX + metric: best.data.metrics[metric]}, step=0)
        with tempfile.TemporaryDirectory() as tmp:
            picture = Path(tmp) / "sweep.png"
            if plot_sweep(children, metric, picture):
                parent.log_artifact(picture)
        parent.end("FINISHED")
        goal = names.OPTIMIZABLE_METRICS[metric]
        summary = f"Sweep {parent.run_id}: {jobs} jobs, {len(finished)} finished, {failed} failed"
        if best is not None:
            summary += (
                f"; best {metric} ({goal}) {best.data.metrics[metric]:.4f} "
                f"by run {best.info.run_id} ({best.info.run_name})"
            )
        log.info(summary + f"\nCompare them: mnist-compare {parent.run_id}")

    def _abandon(self) -> None:
        """At exit, a parent the sweep never closed (it crashed or was interrupted) is FAILED."""
        if self.parent is not None:
            self.parent.end("FAILED")


def _study_tags(config: DictConfig) -> dict[str, str]:
    """The study a sweeper keeps (name, storage with credentials redacted); {} for none."""
    sweeper = config.hydra.sweeper
    name, storage = sweeper.get("study_name"), sweeper.get("storage")
    if not name or not storage:
        return {}
    return {names.STUDY_TAG: str(name), names.STORAGE_TAG: redact(str(storage))}


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


def _name_by_swept_overrides(client: MlflowClient, children: list[Run]) -> None:
    """Rename each child after the overrides that differ between jobs: `lr=0.003,batch_size=128`."""
    from mnist_exp.report.table import short_name, swept_overrides

    keys, given = swept_overrides(children)
    for run, overrides in zip(children, given, strict=True):
        name = short_name({k: overrides[k] for k in keys if k in overrides})
        if name and name != run.info.run_name:
            client.set_tag(run.info.run_id, names.RUN_NAME_TAG, name)
