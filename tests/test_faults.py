"""Faults: each ends in a clear line, a consistent MLflow store and the last good checkpoint."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, frozen, loss_history, runs_in, stop
from mlflow.tracking import MlflowClient

from mnist_exp.tracking import processes, store
from mnist_exp.training import checkpoint

TINY = ("data.max_train_samples=64", "data.max_test_samples=64", "trainer.print_every_n_steps=0")


def _ckpt_artifact(uri: str, run_id: str, dest: Path) -> Path:
    return Path(MlflowClient(uri).download_artifacts(run_id, "checkpoints/last.ckpt", str(dest)))


@pytest.mark.process
@pytest.mark.slow
def test_ctrl_c_marks_the_run_killed_and_keeps_the_last_checkpoint(
    data_root, tracking_uri, tmp_path
):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "mnist_exp.train", f"data.root={data_root}",
        f"mlflow.tracking_uri={tracking_uri}", f"hydra.run.dir={run_dir}",
        "data.max_train_samples=640", "trainer.epochs=1000",
        "trainer.print_every_n_steps=0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # As in a terminal: a shell's background job (`pytest &`) would pass Ctrl-C on ignored.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint came"
            time.sleep(0.05)
        stopped = time.monotonic()
        stderr = stop(proc, signal.SIGINT)
        took = time.monotonic() - stopped
    finally:
        proc.kill()
    (run,) = runs_in(tracking_uri)
    run_id = run.info.run_id
    assert proc.returncode != 0 and took < 15  # prompt, even on a loaded machine
    last = stderr.strip().splitlines()[-1]
    assert "KILLED" in last and f"mnist-rerun {run_id} --resume" in last, stderr
    assert "Traceback" not in stderr
    assert run.info.status == "KILLED"
    on_disk = checkpoint.load(run_dir / "checkpoints" / "last.ckpt")
    assert on_disk["epoch"] >= 1 and on_disk["run_id"] == run_id
    logged = _ckpt_artifact(tracking_uri, run_id, tmp_path / "dl")
    assert logged.read_bytes() == (run_dir / "checkpoints" / "last.ckpt").read_bytes()


@pytest.mark.slow
def test_a_nan_loss_fails_the_run_at_its_step_and_keeps_the_last_good_checkpoint(
    mnist_train, tracking_uri, tmp_path
):
    # One step an epoch; one-cycle SGD takes its first step at lr 0.01, the next at ~1e38.
    ended = mnist_train(
        *TINY, "trainer.epochs=5", "optimizer=sgd", "scheduler=onecycle",
        "optimizer.lr=1e38", "scheduler.div_factor=1e40",
    )  # fmt: skip
    assert ended.code == 1
    (line,) = ended.err.strip().splitlines()
    found = re.match(
        r"error: training diverged: non-finite (loss|weights) (\S+) at step (\d+)", line
    )
    assert found, line
    (run,) = runs_in(tracking_uri)
    tags = run.data.tags
    assert run.info.status == "FAILED" and run.info.run_id in line
    step = int(tags["mnist_exp.failed_step"])
    epoch = int(tags["mnist_exp.failed_epoch"])
    assert step == int(found[3]) and epoch == step  # one step an epoch
    assert tags["mnist_exp.error"] == f"non-finite {found[1]} {found[2]} at step {step}"
    assert found[2] in ("nan", "inf", "-inf") and epoch >= 2

    good = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert good["epoch"] == epoch - 1
    assert all(torch.isfinite(t).all() for t in good["model"].values() if t.is_floating_point())
    assert f"keeps epoch {epoch - 1}" in line
    logged = _ckpt_artifact(tracking_uri, run.info.run_id, tmp_path / "dl")
    assert logged.read_bytes() == (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()
    assert not (tmp_path / "run" / "model.ckpt").exists()
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, step if found[1] == "loss" else step + 1))
    assert "test_accuracy" not in run.data.metrics


@pytest.mark.slow
def test_a_full_disk_fails_the_run_with_one_line_naming_the_folder(
    mnist_train, tracking_uri, tmp_path
):
    # The checkpoint's temporary file leads to /dev/full: its writes fail with ENOSPC.
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / ".last.ckpt.tmp").symlink_to("/dev/full")
    ended = mnist_train(*TINY, "trainer.epochs=2")
    assert ended.code == 1
    (line,) = ended.err.strip().splitlines()
    assert line.startswith(f"error: cannot write last.ckpt in {folder} (No space left on device)")
    assert "free space" in line
    (run,) = runs_in(tracking_uri)
    assert run.info.status == "FAILED" and f"MLflow run {run.info.run_id} marked FAILED" in line
    assert "No space left on device" in run.data.tags["mnist_exp.error"]
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1]  # what was recorded before the fault stays
    assert os.listdir(folder) == []  # the temporary file is gone


def test_an_unwritable_run_folder_is_one_line_and_no_run(mnist_train, tracking_uri, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    ended = mnist_train(*TINY, f"hydra.run.dir={blocker}/run")
    assert ended.code == 1
    (line,) = ended.err.strip().splitlines()
    assert line.startswith(f"error: cannot write the run folder {blocker}/run (Not a directory)")
    assert "set hydra.run.dir to a writable folder" in line
    assert runs_in(tracking_uri) == []


def _a_pid_no_process_has() -> int:
    """A process id of this host that no process holds now: as a process that has ended."""
    taken = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    highest = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    return next(pid for pid in range(highest, 1, -1) if pid not in taken)


def test_runs_left_running_by_a_dead_process_of_this_host_are_failed(tracking_uri):
    client, experiment_id = store.open_store(tracking_uri, "mnist-exp")
    here = platform.node()
    dead_pid = _a_pid_no_process_has()
    me = processes.process_tags()

    def running(name: str, **tags: str) -> str:
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    ids = {
        "dead": running("dead", **{"mnist_exp.host": here, "mnist_exp.pid": str(dead_pid)}),
        "alive": running("alive", **me),
        "pid reused": running("pid reused", **(me | {"mnist_exp.pid_start": "1"})),
        "other host": running(
            "other host", **{"mnist_exp.host": f"not-{here}", "mnist_exp.pid": str(dead_pid)}
        ),
        "untagged": running("untagged"),
    }
    finished = running("finished", **{"mnist_exp.host": here, "mnist_exp.pid": str(dead_pid)})
    client.set_terminated(finished, "FINISHED")

    store.open_store(tracking_uri, "mnist-exp")
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {
        "dead": "FAILED",
        "alive": "RUNNING",
        "pid reused": "FAILED",
        "other host": "RUNNING",
        "untagged": "RUNNING",
    }
    error = client.get_run(ids["dead"]).data.tags["mnist_exp.error"]
    assert error == f"process {dead_pid} on host {here} ended without closing the run"
    assert client.get_run(finished).info.status == "FINISHED"


@pytest.mark.new_store
@pytest.mark.process
@pytest.mark.slow
def test_three_commands_at_once_on_a_new_store_all_finish(train_command, tracking_uri, tmp_path):
    """Several terminals (or `&` in a loop) on a store that does not exist yet: none is lost."""
    procs, commands = [], 3  # runs were lost before the store's creation was made safe
    for seed in range(commands):
        cmd, env = train_command(*TINY, "trainer.epochs=2", f"trainer.seed={seed}")
        cmd = [c.replace(f"{tmp_path}/run", f"{tmp_path}/run{seed}") for c in cmd]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * commands, "\n".join(errors)
    runs = runs_in(tracking_uri)
    assert sorted(r.data.params["trainer.seed"] for r in runs) == [str(s) for s in range(commands)]
    client = MlflowClient(tracking_uri)
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, 3))  # 64 images at batch 64, two epochs


def _tracker_of(pid: int) -> int:
    """The tracker process a training process started (its child running the tracker module)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and b"mnist_exp.tracking.tracker" in cmdline:
            return int(stat.parent.name)
    raise AssertionError(f"process {pid} has no tracker process")


@pytest.mark.process
@pytest.mark.slow
def test_a_tracker_killed_mid_epoch_leaves_the_history_of_an_uninterrupted_run(
    train_command, mnist_train, tracking_uri, tmp_path
):
    """The OOM killer picks the tracker: training goes on, and a new tracker loses no step."""
    same = (
        "data.max_train_samples=2048", "data.batch_size=16", "data.max_test_samples=100",
        "data.val_size=0", "trainer.epochs=2", "trainer.print_every_n_steps=64",
        "trainer.seed=3",
    )  # fmt: skip
    cmd, env = train_command(*same)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = tmp_path / "run" / "train.log"
    try:
        deadline = time.monotonic() + 300
        # Halfway through epoch 2 of 128 steps, as the run's log says.
        while "Epoch [2/2], Step [64/128]" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, "no epoch 2 came"
            time.sleep(0.02)
        # Frozen while the tracker is killed, in epoch 2 still, which its checkpoint says.
        frozen(proc)
        last = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.ckpt")
        assert last["epoch"] == 1, "epoch 2 ended before the test stopped it"
        os.kill(_tracker_of(proc.pid), signal.SIGKILL)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert "tracker process ended unexpectedly (exit code -9); a new one" in out + err
    (killed,) = runs_in(tracking_uri)
    assert mnist_train(*same, f"hydra.run.dir={tmp_path}/again").code == 0
    (again,) = [r for r in runs_in(tracking_uri) if r.info.run_id != killed.info.run_id]

    assert killed.info.status == again.info.status == "FINISHED"
    assert killed.data.tags["mnist_exp.tracker_restarts"] == "1"
    history = loss_history(tracking_uri, killed.info.run_id)
    assert [step for step, _ in history] == list(range(1, 2 * 128 + 1))
    assert history == loss_history(tracking_uri, again.info.run_id)
    assert killed.data.metrics["test_accuracy"] == again.data.metrics["test_accuracy"]
