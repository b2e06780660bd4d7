"""Finding things in the store: a sweep's children, the latest sweep, a run's model."""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.tracking import MlflowClient

from mnist_exp.errors import UserError
from mnist_exp.names import MODEL, PARENT_RUN_TAG, SWEEP_TAG
from mnist_exp.tracking.store import sqlite_path


def sweep_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """The child runs of a sweep's parent run, in the order they started."""
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )


def latest_sweep(client: MlflowClient, experiment_id: str) -> Run | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def load_model(run_id: str, tracking_uri: str) -> PyFuncModel:
    """The run's logged `model`, or a `UserError` naming what is missing."""
    database = sqlite_path(tracking_uri)
    if database is not None and not database.is_file():
        raise UserError(
            f"no MLflow store at {tracking_uri}: pass --tracking-uri of the store the run is in"
        )
    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise UserError(
            f"no MLflow run {run_id!r} in {tracking_uri}: pass a run id shown by mnist-compare "
            f"or the MLflow UI, or --tracking-uri of the store that holds it"
        ) from exc
    model_file = f"{MODEL}/MLmodel"
    if not any(a.path == model_file for a in client.list_artifacts(run_id, MODEL)):
        raise UserError(
            f"MLflow run {run_id} has no model (trained with mlflow.log_model=false, or "
            f"before runs logged one): rerun it with mnist-rerun {run_id}"
        )
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(f"runs:/{run_id}/{MODEL}")
