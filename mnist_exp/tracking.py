"""The MLflow side of a run: store, run lifecycle, buffered metrics, params, tags, artifacts.

It knows MLflow and nothing of the training loop: it is handed flat values to record.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, SupportsFloat, TypeVar

from mlflow.entities import Metric, Param, RunInfo, RunTag
from mlflow.entities import Run as MlflowRun
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_exp.errors import TrackingUnavailable, UserError
from mnist_exp.redaction import redact
from mnist_exp.tracker import ERROR_TAG

# MLflow draws a progress bar for every artifact download, prints a link to each run it
# ends (its URI unredacted; the run prints its own), and announces each new SQLite store's
# schema migration; a run's output has no room for these.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# urllib3 warns at each of MLflow's request retries; an outage is reported once, by the `Run`.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
log = logging.getLogger("mnist_exp")

# Set by the sweep callback for the jobs it launches: their runs become children of this run.
PARENT_RUN_ENV = "MNIST_EXP_PARENT_RUN_ID"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
# The MLflow UI opens an experiment of this kind on its table of training runs (else on
# its GenAI overview).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# Which process holds a run open: a RUNNING run whose process is gone is marked FAILED.
HOST_TAG, PID_TAG, PID_START_TAG = "mnist_exp.host", "mnist_exp.pid", "mnist_exp.pid_start"
# Tags saying why a run failed; a run resumed later drops them.
FAILURE_TAGS = (ERROR_TAG, "mnist_exp.failed_step", "mnist_exp.failed_epoch")
RETRY_PAUSE_S = 2.0  # while the server is unreachable, the least time between two attempts
# HTTP statuses that say "try again": overloaded, restarting, or behind a proxy that is.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_T = TypeVar("_T")


def reason(exc: BaseException) -> str:
    """A short, redacted why: `[Errno 111] Connection refused` rather than urllib3's paragraph."""
    text = redact(str(exc).strip())
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text) if unreachable(exc) else None
    if errno:
        return errno.group(0).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:200]


def unreachable(exc: BaseException) -> bool:
    """Whether an error means the server could not be reached or briefly could not answer."""
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, requests.ConnectionError | requests.Timeout):
            return True
        if isinstance(seen, requests.HTTPError) and seen.response is not None:
            return seen.response.status_code in _TRANSIENT_STATUS
        if isinstance(seen, MlflowException) and seen.get_http_status_code() in _TRANSIENT_STATUS:
            # MLflow wraps a failed connection in an exception without a cause.
            from mlflow.exceptions import RestException

            if isinstance(seen, RestException) or str(seen).startswith("API request to"):
                return True
        seen = seen.__cause__ or seen.__context__
    return False


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


def open_store(tracking_uri: str, experiment_name: str) -> tuple[MlflowClient, str]:
    """Open (creating if new) the store and the experiment; returns the client and its id.

    A new experiment on a SQLite store keeps its artifacts in `artifacts/` beside the
    database file, not in MLflow's default of `./mlruns` under whatever the current folder is.
    """
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        artifact_location = (db.parent / "artifacts").resolve().as_uri()
    try:
        if artifact_location:
            db.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            try:
                return client, client.create_experiment(
                    experiment_name, artifact_location, tags=EXPERIMENT_TAGS
                )
            except MlflowException:  # another job created it a moment ago
                experiment = client.get_experiment_by_name(experiment_name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise UserError(
                f"MLflow experiment {experiment_name!r} in {redact(tracking_uri)} is deleted: "
                f"restore it in the MLflow UI or choose another mlflow.experiment_name"
            )
        for key, value in EXPERIMENT_TAGS.items():
            if key not in experiment.tags:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        fail_orphans(client, experiment.experiment_id)
        return client, experiment.experiment_id
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"cannot open the MLflow tracking store {redact(tracking_uri)} ({reason(exc)}): "
            f"fix mlflow.tracking_uri or MLFLOW_TRACKING_URI"
        ) from exc


def fail_orphans(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of this host whose process has ended; returns their ids.

    A process killed without a word (`kill -9`, a power cut) leaves its run RUNNING; the
    next process to open the store closes it. Runs started on other hosts are left alone:
    whether their process lives cannot be told from here. One query, filtered by status.
    """
    host = platform.node()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    failed = []
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or _process_alive(int(pid), run.data.tags.get(PID_START_TAG)):
            continue
        why = f"process {pid} on host {host} ended without closing the run"
        client.set_tag(run.info.run_id, ERROR_TAG, why)
        client.set_terminated(run.info.run_id, "FAILED")
        failed.append(run.info.run_id)
    return failed


def _process_tags() -> dict[str, str]:
    """This process, as `fail_orphans` recognises it: host, pid and (on Linux) start time."""
    return {
        HOST_TAG: platform.node(),
        PID_TAG: str(os.getpid()),
        PID_START_TAG: _process_start(os.getpid()) or "",
    }


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), telling reused pids apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has ended


def _process_alive(pid: int, started: str | None) -> bool:
    if Path("/proc/self/stat").is_file():
        now = _process_start(pid)
        return now is not None and (not started or now == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def source_tags(project_root: Path) -> dict[str, str]:
    """Where a run came from: git commit and dirtiness, user, host, versions, command line."""
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": "mnist_exp.train",
        "mlflow.user": getpass.getuser(),
        "mnist_exp.command": redact(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])),
        HOST_TAG: platform.node(),
        "mnist_exp.version.python": platform.python_version(),
    }
    for package in ("mnist-exp", "torch", "torchvision", "hydra-core", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"mnist_exp.version.{package}"] = metadata.version(package)
    commit = _git(project_root, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["mnist_exp.git.dirty"] = str(bool(_git(project_root, "status", "--porcelain")))
    return tags


def installed_requirements() -> str:
    """`name==version` of every installed distribution, sorted: the run's environment."""
    dists = {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]}
    return "".join(f"{name}=={dists[name]}\n" for name in sorted(dists, key=str.lower))


def get_run(client: MlflowClient, run_id: str, tracking_uri: str) -> MlflowRun:
    """The run with this id, or a `UserError` saying there is none in this store."""
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise UserError(
            f"no MLflow run {run_id!r} in {redact(tracking_uri)}: pass a run id shown by "
            f"mnist-compare or the MLflow UI (or set mlflow.tracking_uri to the store holding it)"
        ) from exc


def _git(cwd: Path, *args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


class _Outage:
    """Calls to a tracking server that may be away for a while: retried up to `retry_for_s`.

    `unsent` describes what would be lost, for the error that ends the wait.
    """

    def __init__(
        self, tracking_uri: str, retry_for_s: float, unsent: Callable[[], str] = lambda: ""
    ) -> None:
        self.tracking_uri = redact(tracking_uri)
        self.retry_for_s = retry_for_s
        self.unsent = unsent
        self.gave_up = False  # an outage outlasted retry_for_s: no more waiting for the server
        self.since: float | None = None  # monotonic time of the first failed call
        self.next_try = 0.0  # while away, no new attempt before this time

    def call(self, op: Callable[[], _T]) -> _T:
        """`op()`, retried every `RETRY_PAUSE_S` while the server is unreachable."""
        while True:
            try:
                return op()
            except Exception as exc:
                if not unreachable(exc) or self.gave_up:
                    raise
                self.failed(exc)
                time.sleep(RETRY_PAUSE_S)

    def failed(self, exc: BaseException) -> None:
        """Note a failed attempt; raise `TrackingUnavailable` once the outage is too long."""
        now = time.monotonic()
        self.next_try = now + RETRY_PAUSE_S
        if self.since is None:
            self.since = now
            log.warning(
                f"MLflow tracking server unreachable ({reason(exc)}); training goes on, metrics "
                f"are kept and retried for up to {self.retry_for_s:g} s"
            )
        if now - self.since > self.retry_for_s:
            self.gave_up = True
            raise self.error()

    def error(self) -> TrackingUnavailable:
        return TrackingUnavailable(
            f"the MLflow tracking server {self.tracking_uri} was unreachable for more than "
            f"{self.retry_for_s:g} s (mlflow.retry_for_s){self.unsent()}"
        )

    def over(self) -> None:
        """Everything queued has been sent: the outage, if any, is over."""
        if self.since is not None:
            log.warning(
                f"MLflow tracking server back after {time.monotonic() - self.since:.0f} s; "
                f"every queued metric was sent"
            )
        self.since = None
        self.next_try = 0.0


class Run:
    """One MLflow run. Metrics are buffered and sent `MAX_METRICS_PER_BATCH` at a time.

    Inside a sweep (`PARENT_RUN_ENV` set) a new run is a child of the sweep's parent run.
    When the server cannot be reached, metrics stay queued (training goes on) and are sent
    once it answers again; other calls wait for it. An outage longer than `retry_for_s`
    raises `TrackingUnavailable`.
    """

    def __init__(
        self,
        client: MlflowClient,
        info: RunInfo,
        recorded: dict[str, int],
        retry_for_s: float = 0.0,
    ) -> None:
        self.client = client
        self.run_id: str = info.run_id
        self.experiment_id: str = info.experiment_id
        self.artifact_uri: str = info.artifact_uri
        self.name: str = info.run_name
        self.experiment_id: str = info.experiment_id
        self._recorded = recorded  # the last step already in MLflow, by metric key
        self._pending: list[tuple[str, SupportsFloat, int, int]] = []
        self._held_artifacts: dict[tuple[Path, str | None], None] = {}  # uploads for later
        self._outage = _Outage(
            str(client.tracking_uri),
            retry_for_s,
            lambda: (
                f": {len(self._pending)} metric values and {len(self._held_artifacts)} artifact "
                f"files of run {self.run_id} were not sent"
            ),
        )

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
    ) -> Run:
        """Create the run with its params (credentials in values are redacted) and tags."""
        tags = {k: redact(str(v)) for k, v in tags.items()} | _process_tags()
        if os.environ.get(PARENT_RUN_ENV):
            tags.setdefault("mlflow.parentRunId", os.environ[PARENT_RUN_ENV])
        outage = _Outage(str(client.tracking_uri), retry_for_s)
        info = outage.call(lambda: client.create_run(experiment_id, run_name=run_name, tags=tags))
        run = cls(client, info.info, {}, retry_for_s)
        items = [Param(k, param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_PER_BATCH]
            run._call(lambda chunk=chunk: client.log_batch(run.run_id, params=chunk))
        return run

    @classmethod
    def reopen(cls, client: MlflowClient, run_id: str, retry_for_s: float = 0.0) -> Run:
        """Continue a stopped run: RUNNING again, and steps it already holds are not re-sent.

        The run now belongs to this process, and the tags of an earlier failure are dropped.
        """
        info = client.get_run(run_id)
        recorded = {
            key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in info.data.metrics
        }
        for key in FAILURE_TAGS:
            if key in info.data.tags:
                client.delete_tag(run_id, key)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _process_tags().items()])
        client.update_run(run_id, status="RUNNING")
        return cls(client, info.info, recorded, retry_for_s)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        items = [RunTag(k, redact(str(v))) for k, v in tags.items()]
        self._call(lambda: self.client.log_batch(self.run_id, tags=items))

    def log_metric(self, key: str, value: SupportsFloat, step: int) -> None:
        """Queue one value; `value` may be a device tensor, converted only when sent."""
        if step <= self._recorded.get(key, -1):
            return
        self._pending.append((key, value, int(time.time() * 1000), step))
        if (
            len(self._pending) >= MAX_METRICS_PER_BATCH
            and time.monotonic() >= self._outage.next_try
        ):
            self.flush()

    def log_metrics(self, metrics: Mapping[str, SupportsFloat], step: int) -> None:
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def log_values(self, values: list[tuple[str, float, int, int]]) -> None:
        """Record `(key, value, timestamp_ms, step)` items, as a tracker process sends them."""
        self._pending += [v for v in values if v[3] > self._recorded.get(v[0], -1)]
        self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send the queued metrics, then the artifacts held back by an outage.

        While the server is unreachable they stay queued for a later call; with `wait` this
        call retries until all is sent. Either way an outage longer than `retry_for_s`
        raises `TrackingUnavailable`.
        """
        while True:
            try:
                self._send_held()
            except Exception as exc:
                if not unreachable(exc):
                    raise
                self._outage.failed(exc)
                if not wait:
                    return
                time.sleep(RETRY_PAUSE_S)
            else:
                self._outage.over()
                return

    def metrics(self) -> dict[str, float]:
        """The latest value of each metric, as MLflow holds it after a flush."""
        self.flush(wait=True)
        return self._call(lambda: self.client.get_run(self.run_id).data.metrics)

    def metric_history(self, keys: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
        """(step, value) of every value of each key MLflow holds, by step, after a flush."""
        self.flush(wait=True)
        return {
            key: sorted(
                (m.step, m.value)
                for m in self._call(
                    lambda key=key: self.client.get_metric_history(self.run_id, key)
                )
            )
            for key in keys
        }

    def log_artifact(
        self, path: Path, artifact_path: str | None = None, *, defer: bool = False
    ) -> None:
        """Upload a file; with `defer`, during an outage it is uploaded (as it is then) later."""
        if defer:
            self._held_artifacts[(path, artifact_path)] = None
            self.flush()
        else:
            self._call(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self.client.log_artifacts(self.run_id, str(folder), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_config_files(self, folder: Path, artifact_path: str) -> None:
        """Upload the text files of `folder` (Hydra's), with credentials in URIs redacted."""
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            self.log_text(redact(path.read_text()), f"{artifact_path}/{path.name}")

    def end(self, status: str) -> None:
        """Send what is buffered, then mark the run FINISHED, FAILED or KILLED."""
        try:
            self.flush(wait=True)
            if self.gave_up and (self._pending or self._held_artifacts):
                raise self._outage.error()
        finally:
            self._call(lambda: self.client.set_terminated(self.run_id, status))

    def _send_held(self) -> None:
        while self._pending:
            chunk = self._pending[:MAX_METRICS_PER_BATCH]
            metrics = [Metric(k, float(v), t, s) for k, v, t, s in chunk]
            self.client.log_batch(self.run_id, metrics=metrics)
            del self._pending[: len(chunk)]
        for path, artifact_path in list(self._held_artifacts):
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            del self._held_artifacts[(path, artifact_path)]

    def _call(self, op: Callable[[], _T]) -> _T:
        """`op()`, retried while the server is unreachable; an outage stays open while
        metrics or artifacts wait to be sent."""
        result = self._outage.call(op)
        if not self._pending and not self._held_artifacts:
            self._outage.over()
        return result


def param_value(value: Any) -> str:
    """A value as MLflow stores it as a param: text, redacted, cut to MLflow's length limit."""
    text = redact(str(value))
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
