"""What the training process sends its tracker process, pickled without MLflow: `Store` and
`Open` begin a run; each request after them is done (`do`) on the `MlflowRun` opened."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnist_exp import names
from mnist_exp.errors import one_line
from mnist_exp.tracking.datasets import DataSplit
from mnist_exp.tracking.redaction import redact

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from mnist_exp.report.model_spec import ModelSpec
    from mnist_exp.tracking.mlflow_run import MlflowRun

ENVIRONMENT_PREFIXES = ("MLFLOW_", "MNIST_EXP_")  # the variables a tracker takes on each run


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENVIRONMENT_PREFIXES)}


@dataclass
class Store:
    """The store to open, with the training process's MLflow settings and credentials (not on
    the tracker's command line, where other users would see them)."""

    tracking_uri: str
    experiment_name: str
    environment: dict[str, str] = field(default_factory=_environment)

    def take_environment(self) -> None:
        """Take on the training process's variables of now (they may change between runs)."""
        for key in _environment().keys() - self.environment.keys():
            del os.environ[key]
        os.environ.update(self.environment)
        from mnist_exp.tracking.store import quiet_mlflow  # imported already, in the tracker

        # Its defaults, which the training process (importing no MLflow) lacks: the tracker's
        # output is the run's.
        quiet_mlflow()


@dataclass
class Open:
    """Start a run with `params` (as dotted keys), source tags and `tags`, or add `tags` to the
    stopped run `run_id`; then log the installed packages and the folder `files[0]` under
    `files[1]`. A run that opened but could not be recorded so is FAILED."""

    tags: dict[str, str]
    files: tuple[Path, str] | None
    retry_for_s: float
    run_id: str | None = None
    run_name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    project_root: Path = Path()  # the source tags' git repository
    unsent: Path | None = None  # where requests are kept once the server stayed away too long
    system_metrics_s: float | None = None  # MLflow's system metrics sampled this often (None: off)

    def do(self, client: MlflowClient, experiment_id: str) -> MlflowRun:
        from mnist_exp.tracking.mlflow_run import MlflowRun, flatten
        from mnist_exp.tracking.store import installed_requirements, source_tags

        if self.run_id is not None:
            run = MlflowRun.reopen(client, self.run_id, self.retry_for_s)
        else:
            tags = source_tags(self.project_root) | self.tags
            run = MlflowRun.start(
                client, experiment_id, run_name=self.run_name, params=flatten(self.params),
                tags=tags, retry_for_s=self.retry_for_s,
            )  # fmt: skip
        try:
            if self.run_id is not None:
                run.set_tags(self.tags)
            if self.files:  # Hydra's config files, with credentials in URIs redacted
                folder, artifact_path = self.files
                for path in sorted(p for p in folder.iterdir() if p.is_file()):
                    run.log_text(redact(path.read_text()), f"{artifact_path}/{path.name}")
            run.log_text(installed_requirements(), names.REQUIREMENTS)
        except Exception as exc:
            run.set_tags({names.ERROR_TAG: one_line(exc)})
            run.end("FAILED")
            raise
        return run


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
    path: Path  # a file, or a folder whose files are uploaded
    artifact_path: str | None

    def do(self, run: MlflowRun) -> None:
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
    name: str = names.MODEL  # the run's servable model, or an epoch's (CHECKPOINT_MODEL)

    def do(self, run: MlflowRun) -> None:
        run.log_model(self.weights, self.spec, self.name)


@dataclass
class LogDatasets:
    splits: list[DataSplit]

    def do(self, run: MlflowRun) -> None:
        run.log_datasets(self.splits)


@dataclass
class DataDigests:
    """The digests of the data `run_id` recorded, by context (none for a run older than them,
    or one not in the store)."""

    run_id: str

    def do(self, run: MlflowRun) -> dict[str, list[str]]:
        return run.data_digests(self.run_id)


@dataclass
class End:
    status: str

    def do(self, run: MlflowRun) -> None:
        run.end(self.status)


Request = LogValues | SetTags | Upload | MetricHistory | LogModel | LogDatasets | DataDigests | End


@dataclass
class Kept:
    """The answer to a request kept in `folder` (see `unsent.Journal`), not sent."""

    folder: Path


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Defer Ctrl-C, SIGTERM and SLURM's warning of a time limit (SIGUSR2, whose submitit
    handler raises) while a message goes through: half of one garbles the pipe."""
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    previous = [signal.signal(s, lambda number, _: caught.append(number)) for s in held]
    try:
        yield
    finally:
        for number, handler in zip(held, previous, strict=True):
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for signum in caught:
            signal.raise_signal(signum)
