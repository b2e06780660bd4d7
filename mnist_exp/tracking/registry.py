"""Registering a run's servable model in MLflow's Model Registry, tagged with why it was chosen."""

from __future__ import annotations

import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from mnist_exp.errors import UserError
from mnist_exp.names import REGISTERED_METRIC_TAG, REGISTERED_RUN_TAG, REGISTERED_VALUE_TAG
from mnist_exp.report.table import rank
from mnist_exp.tracking.queries import run_model


def register_best(
    client: MlflowClient, runs: list[Run], metric: str, name: str
) -> tuple[Run, ModelVersion]:
    """Register the model of the best finished run of `runs` by `metric` (see `register`)."""
    finished = [r for r in runs if r.info.status == "FINISHED" and metric in r.data.metrics]
    if not finished:
        raise UserError(f"no finished run has {metric}: nothing to register")
    best = rank(finished, metric)[0]
    return best, register(client, best, metric, name)


def register(client: MlflowClient, run: Run, metric: str, name: str) -> ModelVersion:
    """A new version of the registered model `name` (made if new): `run`'s model, tagged with
    the run, `metric` and the run's value of it."""
    source = run_model(client, run)
    if source is None:
        raise UserError(
            f"run {run.info.run_id} ({run.info.run_name}) has no model to register (trained "
            f"with mlflow.log_model=false): rerun it with mnist-rerun {run.info.run_id}"
        )
    tags = {
        REGISTERED_RUN_TAG: run.info.run_id,
        REGISTERED_METRIC_TAG: metric,
        REGISTERED_VALUE_TAG: str(run.data.metrics.get(metric)),
    }
    mlflow.set_tracking_uri(client.tracking_uri)  # register_model works on the global store
    return mlflow.register_model(source, name, await_registration_for=0, tags=tags)
