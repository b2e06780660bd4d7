"""What the runner and its callbacks need of a run's recorder, whoever records it.

Satisfied by `mlflow_run.MlflowRun` (in this process) and `remote.RemoteRun` (its proxy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, SupportsFloat


class Recorder(Protocol):
    """One MLflow run being recorded. Metrics may be buffered; `sync` waits until all are in."""

    @property
    def run_id(self) -> str: ...

    @property
    def gave_up(self) -> bool:
        """Whether the tracking server stayed away longer than the run was told to wait."""
        ...

    def opened(self) -> bool:
        """Whether the run exists in MLflow (False if it could not be opened)."""
        ...

    def log_metric(self, key: str, value: SupportsFloat, step: int) -> None: ...

    def log_metrics(self, metrics: Mapping[str, SupportsFloat], step: int) -> None: ...

    def sync(self) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(
        self, path: Path, artifact_path: str | None = None, *, defer: bool = False
    ) -> None: ...

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None: ...

    def metric_history(self, keys: Sequence[str]) -> dict[str, list[tuple[int, float]]]: ...

    def log_model(self, weights: Path, spec: ModelSpec) -> None: ...

    def end(self, status: str) -> None: ...


if TYPE_CHECKING:
    from mnist_exp.report.model_spec import ModelSpec

if TYPE_CHECKING:  # mypy checks that both recorders have every method, with its signature
    from mnist_exp.tracking.mlflow_run import MlflowRun
    from mnist_exp.tracking.remote import RemoteRun

    _RECORDERS: tuple[type[Recorder], ...] = (MlflowRun, RemoteRun)
