"""The MLflow store: opening it (and the experiment), runs left behind, where a run came from."""

from __future__ import annotations

import contextlib
import functools
import getpass
import logging
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from filelock import FileLock
from mlflow.entities import Run as MlflowRun
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_exp import names
from mnist_exp.errors import UserError
from mnist_exp.tracking import processes
from mnist_exp.tracking.outage import Outage, reason
from mnist_exp.tracking.redaction import redact


def quiet_mlflow() -> None:
    """A run's output has no room for MLflow's download bars or its "View run" link to each run
    it ends on a server (the URI unredacted): off unless the user's environment says."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


quiet_mlflow()
# Nor for each new SQLite store's migration, or urllib3's warning at each retry.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

# The MLflow UI opens an experiment of this kind on its table of runs, not its GenAI overview.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def open_store(
    tracking_uri: str, experiment_name: str, retry_for_s: float = 0.0
) -> tuple[MlflowClient, str]:
    """Open (creating if new) the store and the experiment; returns the client and its id.

    A server away is waited for up to `retry_for_s`. A new experiment on a SQLite store keeps
    its artifacts in `artifacts/` beside the database, not in `./mlruns` of the current folder.
    """
    quiet_mlflow()  # again: a notebook's earlier call may have restored the environment since
    db = sqlite_path(tracking_uri)
    artifact_location = (db.parent / "artifacts").resolve().as_uri() if db else None
    try:
        if db is None:
            outage = Outage(tracking_uri, retry_for_s, meanwhile="opening the store is retried")
            return outage.call(lambda: _open(tracking_uri, experiment_name, artifact_location))
        db.parent.mkdir(parents=True, exist_ok=True)
        # MLflow creates a new SQLite store's tables on first use, and two processes doing
        # that at once fail: one process at a time, by a lock file beside the database. Once
        # they exist, the store opens in many processes at once (a sweep's parallel jobs).
        with FileLock(f"{db}.lock"):
            if not created(db):
                with _uninterrupted():
                    return _open(tracking_uri, experiment_name, artifact_location)
        return _open(tracking_uri, experiment_name, artifact_location)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"cannot open the MLflow tracking store {redact(tracking_uri)} ({reason(exc)}): "
            f"fix mlflow.tracking_uri or MLFLOW_TRACKING_URI"
        ) from exc


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` store; None for any other kind of store."""
    prefix = "sqlite:///"
    return Path(tracking_uri.removeprefix(prefix)) if tracking_uri.startswith(prefix) else None


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait till MLflow has made a new store's tables: cut halfway, they
    left a store that no command could open ("table ... already exists"). Only the main
    thread handles signals; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda number, _: caught.append(number)) for s in stops}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
        for number in caught:
            signal.raise_signal(number)  # now to the handler it was meant for


def created(db: Path) -> bool:
    """Whether MLflow has created the tables of the SQLite store `db` (their schema's version
    is recorded); asked while no process creates them."""
    read_only = f"{db.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(read_only, uri=True)) as con:
            return con.execute("SELECT 1 FROM alembic_version").fetchone() is not None
    except sqlite3.Error:
        return False


def _open(
    tracking_uri: str, experiment_name: str, artifact_location: str | None
) -> tuple[MlflowClient, str]:
    """`open_store`'s work, once the store is this process's to open."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        try:
            return client, client.create_experiment(
                experiment_name, artifact_location, tags=EXPERIMENT_TAGS
            )
        except MlflowException:  # another process created it a moment ago
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


def fail_orphans(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of this host whose process has ended (`kill -9`, a power
    cut); returns their ids. Another host's processes cannot be seen from here."""
    host = platform.node()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{names.HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    failed = []
    for run in runs:
        pid = run.data.tags.get(names.PID_TAG, "")
        if not pid.isdigit() or processes.alive(int(pid), run.data.tags.get(names.PID_START_TAG)):
            continue
        # Its process may have ended the run since the query; now it is gone, that is final.
        if client.get_run(run.info.run_id).info.status != "RUNNING":
            continue
        why = f"process {pid} on host {host} ended without closing the run"
        client.set_tag(run.info.run_id, names.ERROR_TAG, why)
        client.set_terminated(run.info.run_id, "FAILED")
        failed.append(run.info.run_id)
    return failed


def source_tags(project_root: Path) -> dict[str, str]:
    """Where a run came from: git commit, branch, remote and dirtiness, user, host, versions,
    command line (the training process's tags name its command: `runner.source`)."""
    tags = {
        names.SOURCE_TYPE_TAG: "LOCAL",
        names.SOURCE_NAME_TAG: "mnist_exp.train",
        "mlflow.user": getpass.getuser(),
        names.COMMAND_TAG: redact(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])),
        names.HOST_TAG: platform.node(),
        names.VERSION_TAG + "python": platform.python_version(),
    }
    for package in ("mnist-exp", "torch", "torchvision", "hydra-core", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[names.VERSION_TAG + package] = metadata.version(package)
    commit = _git(project_root, "rev-parse", "HEAD")
    if commit:
        tags[names.GIT_COMMIT_TAG] = commit
        dirty = str(bool(_git(project_root, "status", "--porcelain")))
        tags[names.GIT_DIRTY_TAG] = tags[names.MLFLOW_GIT_DIRTY_TAG] = dirty
        branch = _git(project_root, "symbolic-ref", "--short", "-q", "HEAD")  # none: detached
        remote = _git(project_root, "remote", "get-url", "origin")
        for key, value in ((names.GIT_BRANCH_TAG, branch), (names.GIT_REPO_URL_TAG, remote)):
            if value:
                tags[key] = redact(value)
    return tags


@functools.cache  # a tracker records several runs; what is installed stays the same
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
