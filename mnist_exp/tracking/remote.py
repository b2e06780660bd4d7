"""`RemoteRun`: the training process's side of a run recorded by a tracker process, which
imports MLflow, opens the store and creates the run on another core while this one starts."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, SupportsFloat

from mnist_exp.names import MODEL
from mnist_exp.report.model_spec import ModelSpec
from mnist_exp.tracking import messages as m
from mnist_exp.tracking import tracker
from mnist_exp.tracking.datasets import DataSplit
from mnist_exp.tracking.link import TrackerLink

FLUSH_EVERY_S = 2.0  # metric values sent at least this often: the MLflow UI follows a run


class RemoteRun(TrackerLink):
    """One MLflow run, recorded by a tracker process, which does each request in turn.

    Metric values are sent every `FLUSH_EVERY_S` unless some sent are unanswered (the tracker
    waits out an outage meanwhile), and before any other request. All but a `defer`red upload
    and the model wait for their answer; an error in the tracker is raised by the next call.
    """

    _flush_at = 0.0  # time.time() after which the next metric sends what is kept

    def start(
        self,
        *,
        run_name: str | None,
        config: Mapping[str, Any],
        tags: Mapping[str, str],
        project_root: Path,
        files: tuple[Path, str] | None = None,
        retry_for_s: float = 0.0,
        unsent: Path | None = None,
        system_metrics_s: float | None = None,
    ) -> None:
        """Open a new run with `config` as params, returning at once (see `messages.Open`)."""
        params = dict(config)
        self._opening = m.Open(
            dict(tags), files, retry_for_s, None, run_name, params, project_root, unsent,
            system_metrics_s,
        )  # fmt: skip
        self._write(self._opening)

    def reopen(
        self,
        run_id: str,
        *,
        tags: Mapping[str, str],
        files: tuple[Path, str] | None,
        retry_for_s: float = 0.0,
        unsent: Path | None = None,
        system_metrics_s: float | None = None,
    ) -> None:
        """Continue a stopped run (see `MlflowRun.reopen`), adding tags and files as `start`."""
        self._opening = m.Open(
            dict(tags), files, retry_for_s, run_id, unsent=unsent, system_metrics_s=system_metrics_s
        )
        self._write(self._opening)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def run_id(self) -> str:
        return self._opened()[0]

    @property
    def name(self) -> str:
        return self._opened()[1]

    @property
    def experiment_id(self) -> str:
        return self._opened()[2]

    def log_metric(self, key: str, value: SupportsFloat, step: int) -> None:
        """Keep one value; `value` may be a device tensor, read only when it is sent."""
        now = time.time()
        self._values.append((key, value, int(now * 1000), step))
        if now >= self._flush_at:
            self.flush()

    def log_metrics(self, metrics: Mapping[str, SupportsFloat], step: int) -> None:
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def flush(self) -> None:
        """Read the answers that came; send the values kept, unless some sent are unanswered."""
        self._flush_at = time.time() + FLUSH_EVERY_S
        self._receive(wait=False)
        self._push(send=not self._unanswered)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._send(m.SetTags({k: str(v) for k, v in tags.items()}))

    def log_artifact(
        self, path: Path, artifact_path: str | None = None, *, defer: bool = False
    ) -> None:
        """Upload a file or a folder's files; with `defer`, return at once."""
        self._send(m.Upload(Path(path), artifact_path), wait=not defer)

    def metric_history(self, keys: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
        """(step, value) of every recorded value of each key, by step."""
        return self._send(m.MetricHistory(list(keys)))

    def log_model(self, weights: Path, spec: ModelSpec, name: str = MODEL) -> None:
        """Log the servable model of `weights` as the run's model `name` (see
        `MlflowRun.log_model`), returning at once: the tracker builds it meanwhile."""
        self._send(m.LogModel(Path(weights), spec, name), wait=False)

    def log_datasets(self, splits: Sequence[DataSplit]) -> None:
        """Record the data of each split as the run's dataset inputs, returning at once."""
        self._send(m.LogDatasets(list(splits)), wait=False)

    def data_digests(self, run_id: str) -> dict[str, list[str]]:
        """The digests of the data run `run_id` recorded, by context (`names.DATA_TRAINING`...)."""
        return self._send(m.DataDigests(run_id))

    def end(self, status: str) -> None:
        """Mark the run FINISHED, FAILED or KILLED once all before is recorded; the tracker
        then waits, MLflow imported and the store open, for this process's next run."""
        try:
            self._send(m.End(status))
        finally:
            if self._lost is None and not self._unanswered:
                tracker.idle.append((self._process, self._conn))
