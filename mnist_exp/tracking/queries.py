"""Finding runs in the store: a sweep's children, the latest sweep."""

from __future__ import annotations

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mnist_exp.names import PARENT_RUN_TAG, SWEEP_TAG


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
