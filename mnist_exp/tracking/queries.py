"""Finding things in the store: a sweep's children, the latest sweep, a run's model."""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.tracking import MlflowClient
from mlflow.types import TensorSpec

from mnist_exp.errors import UserError, first_line
from mnist_exp.names import MODEL, PARENT_RUN_TAG, SWEEP_OPENED_TAG, SWEEP_TAG
from mnist_exp.tracking.outage import Outage
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
    """The sweep begun last, a search's reopened parent counted from when its study went on."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    return max(runs, key=_opened, default=None)


def _opened(run: Run) -> int:
    return int(run.data.tags.get(SWEEP_OPENED_TAG, run.info.start_time))


def run_model(client: MlflowClient, run: Run) -> str | None:
    """The URI of the run's servable `model`: its MLflow 3 LoggedModel (`models:/MODEL_ID`),
    or for a run logged before those, its `model/` artifacts; None when it has none."""
    found = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"name = '{MODEL}' AND source_run_id = '{run.info.run_id}'",
        max_results=1,
    )
    if found:
        return f"models:/{found[0].model_id}"
    if any(a.path == f"{MODEL}/MLmodel" for a in client.list_artifacts(run.info.run_id, MODEL)):
        return f"runs:/{run.info.run_id}/{MODEL}"
    return None


def load_model(model: str, tracking_uri: str) -> PyFuncModel:
    """The model `model` names: a run's (its id), or a model URI (`runs:/RUN_ID/model`,
    `models:/NAME/latest`, `models:/NAME/3`, ...); a `UserError` naming what is missing."""
    database = sqlite_path(tracking_uri)
    if database is not None and not database.is_file():
        raise UserError(
            f"no MLflow store at {tracking_uri}: pass --tracking-uri of the store the run is in"
        )
    mlflow.set_tracking_uri(tracking_uri)
    if ":/" in model:
        try:
            return Outage(tracking_uri, 0).call(lambda: mlflow.pyfunc.load_model(model))
        except MlflowException as exc:
            raise UserError(
                f"no model {model} in {tracking_uri} ({first_line(exc)}): pass a run id or a "
                f"model URI such as models:/NAME/latest"
            ) from exc
    client = MlflowClient(tracking_uri)
    try:
        run = Outage(tracking_uri, 0).call(lambda: client.get_run(model))
    except MlflowException as exc:
        raise UserError(
            f"no MLflow run {model!r} in {tracking_uri}: pass a run id shown by mnist-compare "
            f"or the MLflow UI, or --tracking-uri of the store that holds it"
        ) from exc
    uri = run_model(client, run)
    if uri is None:
        raise UserError(
            f"MLflow run {model} has no model (trained with mlflow.log_model=false, or "
            f"before runs logged one): rerun it with mnist-rerun {model}"
        )
    return mlflow.pyfunc.load_model(uri)


def input_shape(model: PyFuncModel) -> tuple[int, ...]:
    """`(H, W)` or `(C, H, W)`: one image as the model takes it, from its signature."""
    schema = model.metadata.get_input_schema()
    spec = schema.inputs[0] if schema is not None and schema.inputs else None
    if not isinstance(spec, TensorSpec):
        return (28, 28)  # not one of ours: MNIST's
    return tuple(spec.shape[1:])
