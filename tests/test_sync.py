"""`mnist-sync`: what a run kept in its folder while the tracking server was away reaches the
same MLflow run, once, in order, however often the command is cut short and run again.

The whole path (a server killed mid-run, the run's message, the command) is in
tests/test_server.py; here the kept requests are sent to a SQLite store.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import in_process
from mlflow.tracking import MlflowClient

from mnist_exp import names
from mnist_exp.sync import main as sync_main
from mnist_exp.tracking import messages as m
from mnist_exp.tracking import unsent
from mnist_exp.tracking.mlflow_run import MlflowRun
from mnist_exp.tracking.store import open_store


@pytest.fixture
def kept(tracking_uri: str, tmp_path: Path) -> tuple[str, Path]:
    """A RUNNING run whose first 3 steps reached the store, and the rest of it kept in its
    folder: steps 1-6 again (as a cut-short batch is kept whole), a tag, a file, its end."""
    client, experiment_id = open_store(tracking_uri, "sync")
    run = MlflowRun.start(client, experiment_id, run_name="r", params={"a": 1}, tags={})
    run.log_values([(names.TRAIN_LOSS, 1.0 / s, 0, s) for s in (1, 2, 3)])
    folder = tmp_path / "run" / names.UNSENT
    journal = unsent.Journal(folder, tracking_uri, run.run_id)
    weights = tmp_path / "run" / "model.ckpt"
    weights.write_bytes(b"weights of the last epoch")
    journal.keep(m.LogValues([(names.TRAIN_LOSS, 1.0 / s, 0, s) for s in range(1, 7)]))
    journal.keep(m.SetTags({"kept": "yes"}))
    journal.keep(m.Upload(weights, names.CHECKPOINTS))
    weights.write_bytes(b"overwritten after it was kept")  # the copy kept is what is sent
    journal.keep(m.LogValues([(names.TEST_ACCURACY, 0.9, 0, 6)]))
    journal.keep(m.End("FINISHED"))
    return run.run_id, folder


def test_a_cut_short_sync_run_again_sends_each_request_once(
    kept, tracking_uri, tmp_path, capfd, monkeypatch
):
    run_id, folder = kept
    real = m.SetTags.do

    def server_gone(self: m.SetTags, run: MlflowRun) -> None:
        raise ConnectionError("the server went away again")

    monkeypatch.setattr(m.SetTags, "do", server_gone)
    with pytest.raises(ConnectionError):
        unsent.send(folder)
    monkeypatch.setattr(m.SetTags, "do", real)

    # Given the run folder, as a user may; the kept folder is found inside.
    ended = in_process(sync_main, [str(folder.parent)], capfd)
    assert ended.code == 0, ended.err
    assert ended.out == f"sent 4 kept requests to MLflow run {run_id} in {tracking_uri}: FINISHED\n"
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kept"] == "yes"
    assert run.data.metrics[names.TEST_ACCURACY] == 0.9
    steps = [p.step for p in client.get_metric_history(run_id, names.TRAIN_LOSS)]
    assert steps == [1, 2, 3, 4, 5, 6]  # the first three once, though kept and sent again
    got = client.download_artifacts(run_id, f"{names.CHECKPOINTS}/model.ckpt", str(tmp_path))
    assert Path(got).read_bytes() == b"weights of the last epoch"
    assert not folder.exists()


def test_a_last_request_cut_short_is_left_out(kept, tracking_uri):
    """The training process killed while it wrote: what was whole before is sent."""
    run_id, folder = kept
    requests = folder / unsent.REQUESTS
    requests.write_bytes(requests.read_bytes()[:-5])  # the End, cut
    unsent.send(folder)
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.data.tags["kept"] == "yes"
    assert run.info.status == "FAILED"  # no end was kept: it did not finish


def test_a_folder_with_nothing_kept_is_refused_in_one_line(tmp_path, capfd):
    ended = in_process(sync_main, [str(tmp_path)], capfd)
    assert ended.code == 1
    assert ended.err == (
        f"error: {tmp_path}: nothing kept there to send: give the folder an error named "
        f"({names.UNSENT}/ in a run folder), or that run folder\n"
    )
