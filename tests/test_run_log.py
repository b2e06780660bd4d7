"""The run folder's log (what the terminal showed) reaches MLflow as `logs/train.log`, however
the run ends: finished, diverged, or started from Python; stopped by SIGTERM in
tests/test_rerun.py, whose run is stopped and resumed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import runs_in
from mlflow.tracking import MlflowClient

from mnist_exp.errors import UserError
from mnist_exp.runner import job_log

TINY = (
    "data.max_train_samples=256",
    "data.max_test_samples=100",
    "data.val_size=0",
    "trainer.epochs=1",
)


def _logged(uri: str, run_id: str, tmp_path: Path) -> str:
    """The run's `logs/train.log`, downloaded as a user would."""
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(run_id, "logs")] == ["logs/train.log"]
    return Path(client.download_artifacts(run_id, "logs/train.log", str(tmp_path))).read_text()


@pytest.mark.slow
def test_a_finished_run_holds_its_whole_log(mnist_train, tracking_uri: str, tmp_path: Path):
    assert mnist_train(*TINY).code == 0
    (run,) = runs_in(tracking_uri)
    logged = _logged(tracking_uri, run.info.run_id, tmp_path / "got")
    local = (tmp_path / "run" / "train.log").read_text()
    assert local.startswith(logged)  # nothing is logged after the upload but, maybe, errors
    assert "Epoch [1/1] done" in logged
    assert f"Run {run.info.run_id} " in logged and "finished" in logged  # the summary too


@pytest.mark.slow
def test_a_diverged_run_holds_its_log(mnist_train, tracking_uri: str, tmp_path: Path):
    ended = mnist_train(*TINY, "optimizer=sgd", "optimizer.lr=1e38")
    assert "training diverged" in ended.err
    (run,) = runs_in(tracking_uri)
    assert run.info.status == "FAILED"
    logged = _logged(tracking_uri, run.info.run_id, tmp_path)
    assert f"MLflow run {run.info.run_id}" in logged
    assert logged.strip().splitlines()[-1].endswith(run.data.tags["mnist_exp.error"])  # why


@pytest.mark.slow
def test_a_run_from_python_holds_its_log(data_root: Path, tracking_uri: str, tmp_path: Path):
    from mnist_exp.api import train

    result = train(
        [*TINY, f"data.root={data_root}", f"mlflow.tracking_uri={tracking_uri}",
         f"hydra.run.dir={tmp_path / 'run'}", "mlflow.log_model=false", "mlflow.log_plots=false"]
    )  # fmt: skip
    logged = _logged(tracking_uri, result.run_id, tmp_path / "got")
    assert f"Run {result.run_id} " in logged and "finished" in logged


class _Recorder:
    """What `job_log.upload` uses of a run: its id, whether the server is gone, uploads."""

    run_id = "r1"

    def __init__(self, fails: bool = False, gave_up: bool = False) -> None:
        self.fails, self.gave_up = fails, gave_up
        self.uploaded: list[tuple[str, str, str | None]] = []

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.fails:
            raise OSError("the store is read-only")
        self.uploaded.append((path.name, path.read_text(), artifact_path))


def test_a_failed_upload_is_one_line_and_the_run_goes_on(monkeypatch, tmp_path, caplog):
    log = tmp_path / "job.log"  # Hydra names it after the job; the artifact is train.log
    log.write_text("Epoch [1/1] done\n")
    handler = logging.FileHandler(log)
    monkeypatch.setattr(job_log, "_job_log_handler", lambda: handler)

    ok = _Recorder()
    job_log.upload(ok, 0)  # type: ignore[arg-type]
    job_log.upload(ok, 3, UserError("cannot write /x"))  # type: ignore[arg-type]
    assert ok.uploaded == [
        ("train.log", "Epoch [1/1] done\n", "logs"),
        ("train.log", "Epoch [1/1] done\ncannot write /x\n", "logs/resumed-3"),
    ]  # a resumed run's next part; what failed the run is the log's last line

    with caplog.at_level(logging.ERROR, logger="mnist_exp"):
        job_log.upload(_Recorder(fails=True), 0)  # type: ignore[arg-type]
    (line,) = caplog.messages
    assert line == f"could not log {log} to MLflow run r1: OSError: the store is read-only"

    gone = _Recorder(gave_up=True)
    job_log.upload(gone, 0)  # type: ignore[arg-type]  # the server is away: no second wait
    assert gone.uploaded == []
    handler.close()
