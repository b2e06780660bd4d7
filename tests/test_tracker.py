"""The tracker process behind `RemoteRun`: what the training process sees when it fails or dies."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import loss_history
from mlflow.entities import Run, RunData, RunInfo
from mlflow.tracking import MlflowClient

from mnist_exp import UserError
from mnist_exp.errors import TrackerLost
from mnist_exp.runner.lifecycle import recording
from mnist_exp.tracking import forker, store, tracker
from mnist_exp.tracking.messages import Store
from mnist_exp.tracking.remote import RemoteRun
from mnist_exp.tracking.store import created, open_store


def test_a_run_ended_on_a_tracking_server_gets_no_view_run_lines_of_mlflows(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """MLflow prints `View run NAME at: URL` and `View experiment at: URL` as it ends a run on
    a server. The tracker takes on the variables of the training process, which imports no
    MLflow and so lacks store.py's defaults: the summary is still the output's last word."""
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    sent = Store("http://127.0.0.1:5000", "mnist-exp")  # in the training process
    environment = dict(os.environ)
    try:
        sent.take_environment()  # in the tracker
        client = MlflowClient(sent.tracking_uri)
        server = client._tracking_client.store  # answers as a server would, without one
        info = RunInfo("r1", "1", "me", "RUNNING", 0, None, "active", run_name="lr=0.001")
        monkeypatch.setattr(server, "get_run", lambda run_id: Run(info, RunData()))
        monkeypatch.setattr(server, "update_run_info", lambda *args, **kwargs: None)
        client.set_terminated("r1", "FINISHED")
    finally:
        os.environ.clear()
        os.environ.update(environment)
    assert "View run" not in capfd.readouterr().out


@pytest.mark.slow  # starts a tracker process, which imports MLflow
def test_an_unexpected_error_in_the_tracker_is_one_line_with_its_traceback_in_the_log(
    tmp_path: Path, tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller gets a one-line UserError; the run's log keeps the tracker's traceback."""
    open_store(tracking_uri, "mnist-exp")  # as a sweep does: one opener of a new store
    run = RemoteRun(tracking_uri, "mnist-exp")
    run.start(run_name="t", config={"a": 1}, tags={}, project_root=tmp_path)
    with caplog.at_level(logging.ERROR, "mnist_exp"), pytest.raises(UserError) as error:
        run.log_artifact(tmp_path / "no such file", "x")  # MLflow's own error, not ours
    run.end("FINISHED")

    assert str(error.value).startswith("MLflow tracking failed (")
    assert "\n" not in str(error.value)
    assert "Traceback (most recent call last)" in caplog.text
    assert MlflowClient(tracking_uri).get_run(run.run_id).info.status == "FINISHED"


@pytest.mark.slow  # starts three tracker processes
def test_a_killed_tracker_is_replaced_and_every_unconfirmed_value_recorded_once(
    tmp_path: Path, tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 of the tracker (the OOM killer's pick) while it holds values it never confirmed."""
    open_store(tracking_uri, "mnist-exp")
    run = RemoteRun(tracking_uri, "mnist-exp")
    run.start(run_name="t", config={"a": 1}, tags={}, project_root=tmp_path)
    _log_losses(run, range(1, 301))
    run.sync()
    old = run.pid
    os.kill(old, signal.SIGSTOP)  # what is sent now stays unconfirmed
    _log_losses(run, range(301, 601))
    run.flush()
    os.kill(old, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, "mnist_exp"):
        _log_losses(run, range(601, 901))
        run.set_tags({"after": "yes"})
    run.end("FINISHED")

    assert "ended unexpectedly (exit code -9); a new one" in caplog.text
    recorded = MlflowClient(tracking_uri).get_run(run.run_id)
    assert recorded.info.status == "FINISHED"
    assert recorded.data.tags["mnist_exp.tracker_restarts"] == "1"
    assert recorded.data.tags["after"] == "yes"
    assert recorded.data.tags["mnist_exp.pid"] == str(run.pid) != str(old)
    assert loss_history(tracking_uri, run.run_id) == [(s, 1 / s) for s in range(1, 901)]


@pytest.mark.slow
def test_a_tracker_that_cannot_be_replaced_fails_the_run_from_the_training_process(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run ends FAILED, saying why and how to resume, and the message claims only that."""
    open_store(tracking_uri, "mnist-exp")
    run = RemoteRun(tracking_uri, "mnist-exp")
    run.start(run_name="t", config={"a": 1}, tags={}, project_root=tmp_path)
    run.log_metric("train_loss", 1.0, 1)
    run.sync()
    # A tracker that ends at once (named as the run's own, which conftest lets a test start).
    dies = (sys.executable, "-c", "raise SystemExit(3)", "mnist_exp.tracking.tracker")
    monkeypatch.setattr(tracker, "COMMAND", dies)
    os.kill(run.pid, signal.SIGKILL)
    with pytest.raises(TrackerLost) as error, recording(run, tmp_path / "last.ckpt", 0):
        run.log_metric("train_loss", 0.5, 2)
        run.sync()

    message = str(error.value)
    assert message.startswith("the MLflow tracker process ended unexpectedly (exit code -9)")
    assert f"; MLflow run {run.run_id} marked FAILED; " in message
    assert message.endswith(f"with: mnist-rerun {run.run_id} --resume")
    recorded = MlflowClient(tracking_uri).get_run(run.run_id)
    assert recorded.info.status == "FAILED"
    assert "a new one could not continue" in recorded.data.tags["mnist_exp.error"]


def test_a_stores_tables_are_made_once_then_it_opens_in_many_processes_at_once(
    tmp_path: Path,
) -> None:
    """open_store holds the lock beside a SQLite store only while it is without its tables: a
    sweep's parallel jobs then open it at once, not one after another."""
    db = tmp_path / "store" / "mlflow.db"
    assert not created(db) and not db.exists()  # asked, not made
    db.parent.mkdir()
    db.write_bytes(b"")  # a file that MLflow has not filled yet
    assert not created(db)
    client, experiment_id = open_store(f"sqlite:///{db}", "mnist-exp")
    assert created(db)
    assert open_store(f"sqlite:///{db}", "mnist-exp")[1] == experiment_id


def test_ctrl_c_while_a_new_store_is_made_waits_till_it_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep's process makes a new store itself: Ctrl-C in the middle of MLflow's migrations
    left tables half made, and every later command on that store failed."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    making = store._open

    def interrupted(*args: object) -> object:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as MLflow starts on the tables
        return making(*args)

    monkeypatch.setattr(store, "_open", interrupted)
    # As in a command (pytest-xdist's workers ignore Ctrl-C, which reaches the controller).
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            open_store(uri, "mnist-exp")
    finally:
        signal.signal(signal.SIGINT, ignored)
    monkeypatch.undo()
    assert created(tmp_path / "mlflow.db")
    open_store(uri, "mnist-exp")


@pytest.mark.slow  # forks a forker, which forks two trackers
def test_a_tracker_forked_for_a_sweeps_job_records_the_run_and_a_dead_one_is_replaced(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A joblib sweep's jobs take their trackers from one forker, which imported MLflow once:
    each records its run as a tracker of its own would, and one killed is replaced."""
    open_store(tracking_uri, "mnist-exp")
    monkeypatch.setattr(tracker, "idle", [])  # none kept from an earlier test
    monkeypatch.setattr(forker, "_running", [])
    forker._fork(tracker.serve)  # forker.start() refuses: this process runs other threads
    try:
        (forker_pid, _, _), *_ = forker._running
        run = RemoteRun(tracking_uri, "mnist-exp")
        run.start(run_name="t", config={"a": 1}, tags={}, project_root=tmp_path)
        first = run.pid
        assert _parent_of(first) == forker_pid
        _log_losses(run, range(1, 101))
        run.sync()
        os.kill(first, signal.SIGKILL)
        with caplog.at_level(logging.WARNING, "mnist_exp"):
            _log_losses(run, range(101, 201))
            run.end("FINISHED")
        assert "ended unexpectedly (exit code -9); a new one" in caplog.text
        assert _parent_of(run.pid) == forker_pid != _parent_of(os.getpid())
    finally:
        forker.stop()
    recorded = MlflowClient(tracking_uri).get_run(run.run_id)
    assert recorded.info.status == "FINISHED"
    assert recorded.data.tags["mnist_exp.pid"] == str(run.pid) != str(first)
    assert loss_history(tracking_uri, run.run_id) == [(s, 1 / s) for s in range(1, 201)]
    for process, conn in tracker.idle:  # the idle tracker ends with its socket
        conn.close()
        assert process.wait(timeout=30) == 0


def _log_losses(run: RemoteRun, steps: range) -> None:
    for step in steps:
        run.log_metric("train_loss", 1 / step, step)


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
