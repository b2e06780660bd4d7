"""Finding things in the store: a sweep's children, the latest sweep, a run's model."""

from __future__ import annotations

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mnist_exp.names import MODEL, PARENT_RUN_TAG, SWEEP_OPENED_TAG, SWEEP_TAG


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
