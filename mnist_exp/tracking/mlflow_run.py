"""One MLflow run: params, tags, metrics and artifacts, each call waiting out a server outage."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsFloat

from mlflow.entities import Metric, Param, RunInfo, RunTag
from mlflow.tracking import MlflowClient

from mnist_exp import names
from mnist_exp.tracking import datasets, processes
from mnist_exp.tracking.outage import Outage
from mnist_exp.tracking.redaction import redact

if TYPE_CHECKING:
    from mnist_exp.report.model_spec import ModelSpec
    from mnist_exp.tracking.datasets import DataSplit

# MLflow's limits on one call.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000  # characters of one param value
SOURCE_TAGS = (names.SOURCE_NAME_TAG, names.SOURCE_TYPE_TAG)
# A sweep's parallel jobs store the same dataset at once: MLflow looks for it, then inserts it,
# and all but the first fail on its key; tried again, each finds it.
DATASET_ATTEMPTS = 3


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


class MlflowRun:
    """One MLflow run (in a sweep, `names.PARENT_RUN_ENV` set, a child of its parent run); a call is
    retried while the server is away, up to `retry_for_s` (then `TrackingUnavailable`)."""

    def __init__(
        self,
        client: MlflowClient,
        info: RunInfo,
        recorded: dict[str, int],
        retry_for_s: float = 0.0,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.client = client
        self.run_id: str = info.run_id
        self.experiment_id: str = info.experiment_id
        self.name: str = info.run_name
        self._recorded = recorded  # the last step already in MLflow, by metric key
        # What started the run, also its logged models' source (MLflow would name the tracker).
        self._source = {k: v for k, v in (tags or {}).items() if k in SOURCE_TAGS}
        self._outage = Outage(str(client.tracking_uri), retry_for_s)
        self._call = self._outage.call

    @property
    def gave_up(self) -> bool:
        """Whether an outage outlasted `retry_for_s` (calls are then tried once, not retried)."""
        return self._outage.gave_up

    @classmethod
    def start(
        cls,
        client: MlflowClient,
        experiment_id: str,
        *,
        run_name: str | None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        retry_for_s: float = 0.0,
    ) -> MlflowRun:
        """Create the run with its params (credentials in values are redacted) and tags."""
        tags = {k: redact(str(v)) for k, v in tags.items()} | processes.process_tags()
        if os.environ.get(names.PARENT_RUN_ENV):
            tags.setdefault(names.PARENT_RUN_TAG, os.environ[names.PARENT_RUN_ENV])
        outage = Outage(str(client.tracking_uri), retry_for_s)
        info = outage.call(lambda: client.create_run(experiment_id, run_name=run_name, tags=tags))
        run = cls(client, info.info, {}, retry_for_s, tags)
        items = [Param(k, param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_PER_BATCH]
            run._call(functools.partial(client.log_batch, run.run_id, params=chunk))
        return run

    @classmethod
    def reopen(cls, client: MlflowClient, run_id: str, retry_for_s: float = 0.0) -> MlflowRun:
        """Continue a stopped run, now this process's: RUNNING again, the tags of an earlier
        failure dropped, and steps it already holds not sent again."""
        outage = Outage(str(client.tracking_uri), retry_for_s)
        info = outage.call(lambda: client.get_run(run_id))
        recorded: dict[str, int] = {}
        for key in info.data.metrics:
            history = outage.call(functools.partial(client.get_metric_history, run_id, key))
            recorded[key] = max(m.step for m in history)
        for key in names.FAILURE_TAGS:
            if key in info.data.tags:
                outage.call(functools.partial(client.delete_tag, run_id, key))
        tags = [RunTag(k, v) for k, v in processes.process_tags().items()]
        outage.call(lambda: client.log_batch(run_id, tags=tags))
        outage.call(lambda: client.update_run(run_id, status="RUNNING"))
        return cls(client, info.info, recorded, retry_for_s, info.data.tags)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        items = [RunTag(k, redact(str(v))) for k, v in tags.items()]
        self._call(lambda: self.client.log_batch(self.run_id, tags=items))

    def log_metrics(self, metrics: Mapping[str, SupportsFloat], step: int) -> None:
        now = int(time.time() * 1000)
        self.log_values([(key, float(value), now, step) for key, value in metrics.items()])

    def log_values(self, values: Sequence[tuple[str, float, int, int]]) -> None:
        """Record `(key, value, timestamp_ms, step)` items, but for steps MLflow holds already."""
        new = [Metric(*v) for v in values if v[3] > self._recorded.get(v[0], -1)]
        for i in range(0, len(new), MAX_METRICS_PER_BATCH):
            chunk = new[i : i + MAX_METRICS_PER_BATCH]
            self._call(functools.partial(self.client.log_batch, self.run_id, metrics=chunk))

    def metric_history(self, keys: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
        """(step, value) of every value of each key MLflow holds, by step."""
        history = functools.partial(self.client.get_metric_history, self.run_id)
        values = {key: self._call(functools.partial(history, key)) for key in keys}
        return {key: sorted((m.step, m.value) for m in found) for key, found in values.items()}

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's files."""
        upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._call(lambda: upload(self.run_id, str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_model(self, weights: Path, spec: ModelSpec, name: str = names.MODEL) -> None:
        """Log the servable model of `weights` as the run's MLflow 3 model `name`, with the
        run's metrics at `spec.step` linked to it (see `serving.log`)."""
        import mlflow

        from mnist_exp.report import serving

        # serving.log works on MLflow's global store and experiment, as mlflow.pyfunc does.
        mlflow.set_tracking_uri(str(self.client.tracking_uri))
        mlflow.set_experiment(experiment_id=self.experiment_id)
        self._call(lambda: serving.log(self.run_id, name, weights, spec, self._source))

    def log_datasets(self, splits: Sequence[DataSplit]) -> None:
        """Record each split as a dataset input of the run (one recorded already, once)."""
        from mlflow.exceptions import MlflowException

        log = functools.partial(
            self.client.log_inputs, self.run_id, [datasets.dataset_input(s) for s in splits]
        )
        for attempt in range(1, DATASET_ATTEMPTS + 1):
            try:
                self._call(log)
                return
            except MlflowException:
                if attempt == DATASET_ATTEMPTS:
                    raise

    def data_digests(self, run_id: str) -> dict[str, list[str]]:
        """The digests of the data run `run_id` recorded, by context; none if no such run."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

        try:
            return datasets.data_digests(self._call(lambda: self.client.get_run(run_id)))
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            return {}

    def end(self, status: str) -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        self._call(lambda: self.client.set_terminated(self.run_id, status))


def param_value(value: Any) -> str:
    """A value as MLflow stores it as a param: text, redacted, cut to MLflow's length limit."""
    text = redact(str(value))
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
