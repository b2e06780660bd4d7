"""The tracker process behind `RemoteRun`: what reaches the training process when it fails."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mnist_exp import UserError
from mnist_exp.tracking.recorder import Recorder
from mnist_exp.tracking.remote import RemoteRun
from mnist_exp.tracking.run import Run
from mnist_exp.tracking.store import open_store


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


def test_both_recorders_satisfy_the_protocol_the_callbacks_use() -> None:
    """The run in this process and the tracker's proxy are interchangeable for the runner."""
    for recorder in (Run, RemoteRun):  # mypy checks their signatures (see tracking/recorder.py)
        methods = [
            m for m in dir(Recorder) if not m.startswith("_") and callable(getattr(Recorder, m))
        ]
        missing = [m for m in methods if not callable(getattr(recorder, m, None))]
        assert missing == [], f"{recorder.__name__} lacks {missing}"
