"""Reruns repeat a recorded run bit for bit; a killed run resumes to the same end.

Runs and reruns go in the test's process; the runs stopped by a signal are processes.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL, frozen, in_process, loss_history, only_run, runs_in, stop
from mlflow.tracking import MlflowClient

from mnist_exp import api, rerun, train
from mnist_exp.errors import UserError
from mnist_exp.tracking.tracker import ORPHANED
from mnist_exp.training import checkpoint, engine
from mnist_exp.training.networks import ConvNet

# Long enough to be stopped halfway: 3000 steps an epoch, seconds long, so that the buffered
# train_loss values (sent every few seconds and at each epoch's end) reach the store mid-epoch.
STEPS_PER_EPOCH = 3000
LONG = (
    f"data.max_train_samples={2 * STEPS_PER_EPOCH}",
    "data.batch_size=2",
    "trainer.epochs=2",
    "data.max_test_samples=500",
    "trainer.print_every_n_steps=0",
    "mlflow.log_plots=false",
    "mlflow.log_model=false",
)


def _rerun(capfd, *args: str, uri: str):
    """`mnist-rerun ARGS mlflow.tracking_uri=URI`, in this process; how it `Ended`."""
    return in_process(rerun.main, [*args, f"mlflow.tracking_uri={uri}"], capfd)


def test_a_rerun_says_at_once_which_run_it_fetches_from_which_store(tracking_uri, capfd):
    """The store's first answer takes seconds (MLflow's import, the run's files): the command
    says what it is doing before it waits."""
    ended = _rerun(capfd, "0123456789abcdef0123456789abcdef", uri=tracking_uri)
    said = f"fetching the recorded config of 0123456789abcdef0123456789abcdef from {tracking_uri}"
    assert ended.out.splitlines() == [f"{said}..."]
    assert ended.code == 1 and "no MLflow run" in ended.err


@pytest.mark.slow
def test_a_rerun_is_bit_identical_and_tagged_and_takes_overrides_on_top(
    mnist_train, tracking_uri, tmp_path, capfd
):
    assert mnist_train("optimizer=sgd", "optimizer.lr=0.02", *SMALL).code == 0
    (original,) = runs_in(tracking_uri)
    run_id = original.info.run_id
    ended = _rerun(capfd, run_id, f"hydra.run.dir={tmp_path}/rerun", uri=tracking_uri)
    assert ended.code == 0
    assert f"rerunning {run_id} as a new run...\n" in ended.out
    again = only_run(tracking_uri, **{"mnist_exp.rerun_of": run_id})
    assert again.info.status == "FINISHED"
    assert again.info.run_name.startswith("rerun of ")
    assert again.data.params["optimizer._target_"] == "torch.optim.SGD"
    same = {k: v for k, v in original.data.params.items() if not k.startswith("mlflow.")}
    assert {k: again.data.params[k] for k in same} == same
    assert loss_history(tracking_uri, again.info.run_id) == loss_history(tracking_uri, run_id)
    assert again.data.metrics["test_accuracy"] == original.data.metrics["test_accuracy"]
    first = torch.load(tmp_path / "run" / "model.ckpt", weights_only=True)
    second = torch.load(tmp_path / "rerun" / "model.ckpt", weights_only=True)
    assert all(torch.equal(first[k], second[k]) for k in first)

    # From its Hydra run folder, with an override on top.
    folder = [str(tmp_path / "run"), "trainer.epochs=3", f"hydra.run.dir={tmp_path}/longer"]
    assert _rerun(capfd, *folder, uri=tracking_uri).code == 0
    (longer,) = [r for r in runs_in(tracking_uri) if r.data.params["trainer.epochs"] == "3"]
    assert longer.data.tags["mnist_exp.rerun_of"] == run_id
    assert longer.data.tags["mnist_exp.rerun_overrides"].startswith("trainer.epochs=3")
    history = loss_history(tracking_uri, longer.info.run_id)
    assert len(history) == 30
    assert history[:20] == loss_history(tracking_uri, run_id)


def _start(data_root: Path, uri: str, run_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [
        sys.executable,
        "-m",
        "mnist_exp.train",
        f"data.root={data_root}",
        f"mlflow.tracking_uri={uri}",
        f"hydra.run.dir={run_dir}",
        *LONG,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _wait_for(condition, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert proc.poll() is None, "the run ended before the test could stop it"
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    """The LONG config run straight through once, for the resume tests to compare with."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    uri = f"sqlite:///{tmp}/mlflow.db"
    where = [f"data.root={data_root}", f"mlflow.tracking_uri={uri}", f"hydra.run.dir={tmp}/run"]
    result = api.train([*where, *LONG])
    run = MlflowClient(uri).get_run(result.run_id)
    weights = torch.load(tmp / "run" / "model.ckpt", weights_only=True)
    return run, loss_history(uri, run.info.run_id), weights


def _resumed_equals(uri: str, run_id: str, run_dir: Path, uninterrupted) -> None:
    reference, history, weights = uninterrupted
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert loss_history(uri, run_id) == history
    assert run.data.metrics["test_accuracy"] == reference.data.metrics["test_accuracy"]
    resumed = torch.load(run_dir / "model.ckpt", weights_only=True)
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)


@pytest.mark.process
@pytest.mark.slow
def test_sigterm_after_an_epoch_then_resume_ends_as_if_never_stopped(
    data_root, tracking_uri, tmp_path, uninterrupted, capfd, monkeypatch
):
    """SIGTERM (a job scheduler's stop): the run is KILLED with its log, and resumes."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    proc = _start(data_root, tracking_uri, tmp_path / "stopped")
    log = tmp_path / "stopped" / "train.log"
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    _wait_for(lambda: last.exists() and "Epoch [1/2] done" in log.read_text(), proc)
    stderr = stop(proc, signal.SIGTERM)
    assert proc.returncode != 0
    said = stderr.strip().splitlines()[-1]
    assert "KILLED" in said and "--resume" in said, stderr
    stopped = only_run(tracking_uri, **{"mnist_exp.output_dir": str(tmp_path / "stopped")})
    assert stopped.info.status == "KILLED"
    run_id = stopped.info.run_id
    client = MlflowClient(tracking_uri)
    assert client.get_metric_history(run_id, "train_loss")
    # What the terminal showed, up to the stop, is the run's logs/train.log.
    assert [a.path for a in client.list_artifacts(run_id, "logs")] == ["logs/train.log"]
    logged = Path(client.download_artifacts(run_id, "logs/train.log", str(tmp_path / "got")))
    assert "Epoch [1/2] done" in logged.read_text()

    resume = [run_id, "--resume", f"hydra.run.dir={tmp_path}/resumed"]
    assert _rerun(capfd, *resume, uri=tracking_uri).code == 0
    _resumed_equals(tracking_uri, run_id, tmp_path / "resumed", uninterrupted)
    assert client.get_run(run_id).data.tags["mnist_exp.resumed_from_epoch"]


@pytest.mark.process
@pytest.mark.slow
def test_kill_9_mid_epoch_resumes_from_the_last_complete_epoch(
    data_root, tracking_uri, tmp_path, uninterrupted, capfd, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    proc = _start(data_root, tracking_uri, tmp_path / "stopped")
    client = MlflowClient(tracking_uri)
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"

    def second_epoch_losses_sent() -> bool:
        runs = runs_in(tracking_uri)
        mine = [r for r in runs if r.data.tags.get("mnist_exp.output_dir", "").endswith("stopped")]
        history = client.get_metric_history(mine[0].info.run_id, "train_loss") if mine else []
        return any(m.step > STEPS_PER_EPOCH for m in history)

    _wait_for(second_epoch_losses_sent, proc)
    # Frozen, it cannot finish the epoch while the test reads which epoch its checkpoint holds.
    frozen(proc)
    saved = checkpoint.load(last)["epoch"]
    proc.kill()
    proc.wait()
    assert saved == 1, "the run finished its second epoch before the test could stop it"
    # Killed without a word; its tracker process sees it gone and closes the run.
    where = {"mnist_exp.output_dir": str(tmp_path / "stopped")}
    deadline = time.monotonic() + 120
    while (stopped := only_run(tracking_uri, **where)).info.status == "RUNNING":
        assert time.monotonic() < deadline, "the run was left RUNNING"
        time.sleep(0.2)
    assert stopped.info.status == "FAILED"
    assert stopped.data.tags["mnist_exp.error"] == ORPHANED
    # A user who repeats the command with trainer.resume continues the same run.
    again = [
        f"data.root={data_root}",
        *LONG,
        f"hydra.run.dir={tmp_path}/resumed",
        f"trainer.resume={stopped.info.run_id}",
        f"mlflow.tracking_uri={tracking_uri}",
    ]
    assert in_process(train.run_command, again, capfd).code == 0
    _resumed_equals(tracking_uri, stopped.info.run_id, tmp_path / "resumed", uninterrupted)
    assert "mnist_exp.error" not in client.get_run(stopped.info.run_id).data.tags


@pytest.mark.slow
def test_bad_resume_sources_are_refused_and_change_nothing(
    mnist_train, data_root, tracking_uri, tmp_path, capfd
):
    assert mnist_train(*SMALL, "trainer.epochs=3").code == 0
    (run,) = runs_in(tracking_uri)
    client = MlflowClient(tracking_uri)
    client.set_terminated(run.info.run_id, "KILLED")  # as if stopped, so resumable
    good = tmp_path / "run" / "checkpoints" / "last.ckpt"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps(_Evil(tmp_path / "pwned")))
    # Another model's resume checkpoint: the run's own, with a 5-way classifier's weights.
    other = tmp_path / "other-model.ckpt"
    state = checkpoint.load(good)
    checkpoint.save(state | {"epoch": 1, "model": ConvNet(num_classes=5).state_dict()}, other)
    before = (loss_history(tracking_uri, run.info.run_id), client.get_run(run.info.run_id).info)
    cases = [  # files that are not whole resume checkpoints: test_checkpoint_load_refuses_...
        (evil, "is truncated, corrupt or not a safe tensor file"),
        (other, f"the checkpoint of run {run.info.run_id} does not fit this model"),
        ("0123456789abcdef0123456789abcdef", "no MLflow run '0123456789abcdef"),
    ]
    # From Python: the command line's one-line refusals are UserError's message
    # (tests/test_api.py).
    where = [f"data.root={data_root}", f"mlflow.tracking_uri={tracking_uri}", *SMALL]
    for n, (source, message) in enumerate(cases):
        with pytest.raises(UserError) as refused:
            api.train([*where, f"hydra.run.dir={tmp_path}/{n}", f"trainer.resume={source}"])
        assert message in str(refused.value) and "\n" not in str(refused.value)
    ended = _rerun(
        capfd, "0123456789abcdef0123456789abcdef", f"hydra.run.dir={tmp_path}/x", uri=tracking_uri
    )
    assert ended.code == 1 and "no MLflow run" in ended.err
    # mnist-rerun --resume reads the run's own checkpoint: one that would run code is refused.
    good.write_bytes(evil.read_bytes())
    ended = _rerun(
        capfd, run.info.run_id, "--resume", f"hydra.run.dir={tmp_path}/y", uri=tracking_uri
    )
    lines = ended.err.strip().splitlines()
    assert ended.code == 1 and len(lines) == 1, ended.err
    assert f"{good} is truncated, corrupt or not a safe tensor file" in lines[0]
    assert not (tmp_path / "pwned").exists()
    pickle.loads(evil.read_bytes())  # the payload is real: an unsafe load runs it
    assert (tmp_path / "pwned").exists()
    after = (loss_history(tracking_uri, run.info.run_id), client.get_run(run.info.run_id).info)
    assert after[0] == before[0]
    assert (after[1].status, after[1].end_time) == (before[1].status, before[1].end_time)
    assert len(runs_in(tracking_uri)) == 1


@pytest.mark.slow
def test_a_run_whose_training_ended_resumes_to_testing_and_recording(
    mnist_train, tracking_uri, tmp_path, capfd, monkeypatch
):
    """Its last epoch's checkpoint written, the run failed before its test was recorded: a
    resume trains nothing again, tests, records and ends FINISHED."""

    def lost(*args: object, **kwargs: object) -> None:
        raise OSError("the test images' disk went away")

    with monkeypatch.context() as patch:
        patch.setattr(engine, "evaluate", lost)
        assert mnist_train(*SMALL, "data.val_size=0").code == 1
    (run,) = runs_in(tracking_uri)
    run_id = run.info.run_id
    assert run.info.status == "FAILED" and "test_accuracy" not in run.data.metrics
    trained = loss_history(tracking_uri, run_id)

    resume = [run_id, "--resume", f"hydra.run.dir={tmp_path}/resumed"]
    ended = _rerun(capfd, *resume, uri=tracking_uri)
    assert ended.code == 0, ended.err
    finished = MlflowClient(tracking_uri).get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert 0 <= finished.data.metrics["test_accuracy"] <= 1
    assert finished.data.tags["mnist_exp.resumed_from_epoch"] == "2"
    assert loss_history(tracking_uri, run_id) == trained  # no step trained again
    assert (tmp_path / "resumed" / "model.ckpt").is_file()


def test_checkpoint_load_refuses_a_truncated_file_and_a_weights_only_one(tmp_path):
    state = {"epoch": 1, "step": 2, "model": ConvNet().state_dict(), "optimizer": {}, "rng": {}}
    whole = tmp_path / "last.ckpt"
    checkpoint.save(state | {"run_id": "r", "scheduler": None}, whole)
    assert checkpoint.load(whole)["step"] == 2
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(UserError, match="is truncated, corrupt or not a safe tensor file"):
        checkpoint.load(truncated)
    weights = tmp_path / "model.ckpt"  # what a run leaves beside its checkpoints
    torch.save(ConvNet().state_dict(), weights)
    with pytest.raises(UserError, match="is not an mnist-exp resume checkpoint"):
        checkpoint.load(weights)


class _Evil:
    """Unpickling it runs `touch PATH`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _disk_full(obj, f) -> None:
    f.write(b"half a checkpoint")
    raise OSError("disk full")


def _ctrl_c_in_torch_save(obj, f) -> None:
    """As torch's zip writer, cut off by Ctrl-C: it raises "unexpected pos" on its way out."""
    f.write(b"half a checkpoint")
    try:
        raise KeyboardInterrupt
    finally:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")


@pytest.mark.parametrize(
    ("cut_short", "raised", "message"),
    [
        (_disk_full, UserError, "cannot write last.ckpt in {} (disk full)"),
        (_ctrl_c_in_torch_save, KeyboardInterrupt, ""),  # a Ctrl-C stays one: the run stops
    ],
)
def test_a_checkpoint_write_cut_short_leaves_the_last_one_whole(
    tmp_path, monkeypatch, cut_short, raised, message
):
    path = tmp_path / "last.ckpt"
    state = {"epoch": 1, "step": 2, "model": {}, "optimizer": {}, "rng": {}, "run_id": "r"}
    checkpoint.save(state, path)
    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(raised) as error:
        checkpoint.save(state | {"epoch": 2}, path)
    assert message.format(tmp_path) in str(error.value)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no half-written temporary left


def test_loading_an_absent_checkpoint_says_so(tmp_path):
    with pytest.raises(UserError, match="no checkpoint file"):
        checkpoint.load(tmp_path / "absent.ckpt")
