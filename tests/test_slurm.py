"""hydra/launcher=slurm against a real one-node SLURM cluster (tests/slurm_cluster.py).

Each job must have run as a job of the cluster: its child run's `mnist_exp.slurm_job_id`
names a submitit job folder of the sweep, and slurmctld reports that job COMPLETED.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, runs_in
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from slurm_cluster import SlurmCluster

from mnist_exp import names

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SMALL = (
    "data.max_train_samples=256",
    "data.max_test_samples=100",
    "trainer.epochs=1",
    "trainer.print_every_n_steps=0",
)
# Sized for a node of 2 CPUs, so that both jobs run at once.
ON_THIS_NODE = ("hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1")


def _sweep(tracking_uri: str, experiment: str = "mnist-exp") -> tuple[Run, list[Run]]:
    """The one parent run of the experiment and its children."""
    runs = runs_in(tracking_uri, experiment)
    (parent,) = [r for r in runs if r.data.tags.get(names.SWEEP_TAG) == "true"]
    children = [r for r in runs if r.data.tags.get(names.PARENT_RUN_TAG) == parent.info.run_id]
    assert len(children) == len(runs) - 1
    return parent, children


def _assert_slurm_jobs(cluster: SlurmCluster, children: list[Run], sweep_dir: Path) -> None:
    """Each child ran in its own job of `cluster`, which ended COMPLETED.

    The sweep has its results once a job's function returned; the job itself ends a little
    later (its Python process exits), so each is waited for, for up to a minute.
    """
    jobs = [c.data.tags.get(names.SLURM_JOB_TAG) for c in children]
    assert len(set(jobs)) == len(children), jobs
    submitit = {p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()}
    for job in jobs:
        assert job in submitit, (job, submitit)
        info = cluster.job(job)
        deadline = time.monotonic() + 60
        while info["JobState"] in ("RUNNING", "COMPLETING") and time.monotonic() < deadline:
            time.sleep(0.2)
            info = cluster.job(job)
        assert info["JobState"] == "COMPLETED", info
        assert info["NodeList"] == cluster.node


@pytest.mark.process
def test_a_search_runs_as_jobs_of_the_cluster(slurm_cluster, train, tracking_uri, tmp_path):
    """Both trials at once, as one job array; each optimises val_accuracy on 100 images. (A
    grid goes through the same submitit executor; the refusal test below sends one.)"""
    search = ("hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2")
    train("-m", *search, *ON_THIS_NODE, "data.val_size=100", *SMALL)
    parent, children = _sweep(tracking_uri)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[names.LAUNCHER_TAG] == "slurm"
    assert sorted(c.data.tags[names.TRIAL_TAG] for c in children) == ["0", "1"]
    assert {c.info.status for c in children} == {"FINISHED"}
    assert parent.data.metrics[names.TRIALS_COMPLETE] == 2
    _assert_slurm_jobs(slurm_cluster, children, tmp_path / "sweep")


@pytest.mark.process
def test_jobs_no_node_can_run_are_refused_in_one_line(slurm_cluster, train, tracking_uri):
    lrs = "optimizer.lr=0.001,0.003"
    proc = train("-m", *ON_THIS_NODE, "hydra.launcher.cpus_per_task=1000", lrs, *SMALL, check=False)
    assert proc.returncode == 1
    *said, line = proc.stderr.strip().splitlines()  # sbatch's own lines, then ours
    assert all(s.startswith("sbatch: error: ") for s in said), said
    assert line.startswith("error: the cluster refused the sweep's jobs (sbatch: error:"), line
    assert "hydra.launcher.cpus_per_task" in line
    (parent,) = runs_in(tracking_uri)
    assert parent.info.status == "FAILED"


@pytest.mark.process
def test_a_job_warned_of_its_time_limit_ends_killed_and_resumable(
    slurm_cluster, train_command, tracking_uri, tmp_path
):
    # Long enough to be running when warned. timeout_min=10 keeps SLURM's own warning (USR2,
    # signal_delay_s=120 before the limit) minutes away, yet counts as timed out to submitit.
    long_run = ("data.max_train_samples=512", "data.val_size=0", "trainer.epochs=200")
    no_requeue = "hydra.launcher.max_num_timeout=0"  # its requeues used up
    cmd, env = train_command(
        "-m", *ON_THIS_NODE, "hydra.launcher.timeout_min=10", no_requeue, *long_run
    )
    sweep = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        job = _job_after_an_epoch(sweep, tmp_path / "sweep")
        slurm_cluster.run("scancel", "--signal=USR2", job)  # as SLURM warns of the limit
        _, stderr = sweep.communicate(timeout=60)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, stderr
    (child,) = [r for r in runs_in(tracking_uri) if r.data.tags.get(names.PARENT_RUN_TAG)]
    assert child.info.status == "KILLED"
    assert child.data.tags[names.SLURM_JOB_TAG] == job
    assert names.TRACKER_RESTARTS_TAG not in child.data.tags  # the signal reached it too
    logs = tmp_path / "sweep" / ".submitit" / job
    log = "".join(p.read_text() for p in sorted(logs.glob(f"{job}_0_log.*")))
    assert f"mnist-rerun {child.info.run_id} --resume" in log
    assert "hydra.launcher.timeout_min" in log


@pytest.mark.process
def test_a_job_warned_of_its_time_limit_is_requeued_and_finishes_in_its_own_run(
    slurm_cluster, train_command, tracking_uri, tmp_path
):
    """SLURM's warning of the time limit with requeues left: submitit requeues the job, which
    resumes from its last complete epoch in the same MLflow run; requeued again mid-epoch by
    `scontrol requeue` (SIGTERM, as a preemption), it resumes once more and FINISHES, every
    step of its loss history there once."""
    run = ("data.max_train_samples=2048", "data.val_size=0", "trainer.epochs=6")
    cmd, env = train_command("-m", *ON_THIS_NODE, "hydra.launcher.timeout_min=10", *run)
    sweep = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    last = tmp_path / "sweep" / "0" / names.RESUME_CHECKPOINT
    try:
        job = _job_after_an_epoch(sweep, tmp_path / "sweep")
        slurm_cluster.run("scancel", "--signal=USR2", job)
        _start_again(slurm_cluster, job, sweep)
        written = last.stat().st_mtime_ns
        _wait_for(last, sweep, 120, after=written)  # the job, started again, did an epoch
        slurm_cluster.run("scontrol", "requeue", job)
        _start_again(slurm_cluster, job, sweep)
        _, stderr = sweep.communicate(timeout=300)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, stderr
    parent, (child,) = _sweep(tracking_uri)
    assert (parent.info.status, child.info.status) == ("FINISHED", "FINISHED")
    assert child.data.tags["mnist_exp.slurm_requeues"] == "2"
    assert int(child.data.tags[names.RESUMED_FROM_EPOCH_TAG]) >= 2
    history = MlflowClient(tracking_uri).get_metric_history(child.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 6 * 32 + 1))  # 32 steps an epoch


def _job_after_an_epoch(sweep: subprocess.Popen, sweep_dir: Path) -> str:
    """The SLURM job id of a one-job sweep, once the job has completed an epoch (written its
    resume checkpoint)."""
    _wait_for(sweep_dir / "0" / names.RESUME_CHECKPOINT, sweep)
    (job,) = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()]
    return job


def _start_again(cluster, job: str, sweep: subprocess.Popen) -> None:
    """Once SLURM has requeued `job`, start it now: SLURM holds a requeued job back for about
    two minutes (Reason=BeginTime)."""
    deadline = time.monotonic() + 120
    while cluster.job(job).get("JobState") != "PENDING":
        assert time.monotonic() < deadline and sweep.poll() is None, "not requeued"
        time.sleep(0.5)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")


def _wait_for(path: Path, sweep: subprocess.Popen, timeout: float = 60, after: int = 0) -> None:
    """Until `path` exists (written after `after`, in ns); fails if the sweep ends first or
    time runs out."""
    deadline = time.monotonic() + timeout
    while not path.exists() or path.stat().st_mtime_ns <= after:
        if sweep.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {path} within {timeout} s: {sweep.communicate()[1]}")
        time.sleep(0.5)
