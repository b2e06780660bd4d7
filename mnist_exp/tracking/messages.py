"""What the training process sends its tracker process: plain objects, no MLflow in them.

`Store` and `Open` begin a run; each request after them says what the tracker does for it
(`do`, on the `mlflow_run.MlflowRun` it opened) and is answered in turn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mnist_exp.report.model_spec import ModelSpec
    from mnist_exp.tracking.mlflow_run import MlflowRun

# The training process's environment variables that the tracker takes on for each run.
ENVIRONMENT_PREFIXES = ("MLFLOW_", "MNIST_EXP_")


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENVIRONMENT_PREFIXES)}


@dataclass
class Store:
    """The store to open, with this process's MLflow settings and credentials (not on the
    tracker's command line, where other users would see them). `early`: sent to a tracker
    started ahead of its run, which then only makes a new SQLite store."""

    tracking_uri: str
    experiment_name: str
    early: bool = False
    environment: dict[str, str] = field(default_factory=_environment)


@dataclass
class Open:
    """Start a new run, or with `run_id` continue a stopped one (see `RemoteRun.start`)."""

    tags: dict[str, str]
    files: tuple[Path, str] | None
    retry_for_s: float
    run_id: str | None = None
    run_name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    project_root: Path = Path()  # the source tags' git repository


@dataclass
class LogValues:
    values: list[tuple[str, float, int, int]]  # key, value, timestamp (ms), step

    def do(self, run: MlflowRun) -> None:
        run.log_values(self.values)


@dataclass
class SetTags:
    tags: dict[str, str]

    def do(self, run: MlflowRun) -> None:
        run.set_tags(self.tags)


@dataclass
class Upload:
    """A file, or the files of a folder, into `artifact_path`."""

    path: Path
    artifact_path: str | None

    def do(self, run: MlflowRun) -> None:
        if self.path.is_dir():
            run.log_artifacts(self.path, self.artifact_path)
        else:
            run.log_artifact(self.path, self.artifact_path)


@dataclass
class MetricHistory:
    keys: list[str]

    def do(self, run: MlflowRun) -> dict[str, list[tuple[int, float]]]:
        return run.metric_history(self.keys)


@dataclass
class LogModel:
    weights: Path
    spec: ModelSpec

    def do(self, run: MlflowRun) -> None:
        run.log_model(self.weights, self.spec)


@dataclass
class End:
    status: str

    def do(self, run: MlflowRun) -> None:
        run.end(self.status)


Request = LogValues | SetTags | Upload | MetricHistory | LogModel | End
