"""hydra/launcher=slurm against a real one-node SLURM cluster (tests/slurm_cluster.py).

Each job must have run as a job of the cluster: its child run's `mnist_exp.slurm_job_id`
names a submitit job folder of the sweep, and slurmctld reports that job COMPLETED.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import runs_in
from mlflow.entities import Run
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


def _sweep(tracking_uri: str) -> tuple[Run, list[Run]]:
    """The one parent run and its children."""
    runs = runs_in(tracking_uri)
    (parent,) = [r for r in runs if r.data.tags.get(names.SWEEP_TAG) == "true"]
    children = [r for r in runs if r.data.tags.get(names.PARENT_RUN_TAG) == parent.info.run_id]
    assert len(children) == len(runs) - 1
    return parent, children


def _assert_slurm_jobs(cluster: SlurmCluster, children: list[Run], sweep_dir: Path) -> None:
    """Each child ran in its own job of `cluster`, which ended COMPLETED."""
    jobs = [c.data.tags.get(names.SLURM_JOB_TAG) for c in children]
    assert len(set(jobs)) == len(children), jobs
    submitit = {p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()}
    for job in jobs:
        assert job in submitit, (job, submitit)
        info = cluster.job(job)
        assert info["JobState"] == "COMPLETED", info
        assert info["NodeList"] == cluster.node


def test_a_grid_runs_as_jobs_of_the_cluster(slurm_cluster, train, tracking_uri, tmp_path):
    train("-m", *ON_THIS_NODE, "optimizer.lr=0.001,0.003", "data.val_size=0", *SMALL)
    parent, children = _sweep(tracking_uri)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[names.LAUNCHER_TAG] == "slurm"
    assert sorted(c.data.params["optimizer.lr"] for c in children) == ["0.001", "0.003"]
    assert {c.info.status for c in children} == {"FINISHED"}
    _assert_slurm_jobs(slurm_cluster, children, tmp_path / "sweep")


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


def test_a_search_runs_its_trials_as_jobs_of_the_cluster(
    slurm_cluster, train, tracking_uri, tmp_path
):
    # Both trials at once, as one job array; each optimises val_accuracy on 100 images.
    search = ("hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2")
    train("-m", *search, *ON_THIS_NODE, "data.val_size=100", *SMALL)
    parent, children = _sweep(tracking_uri)
    assert parent.data.tags[names.LAUNCHER_TAG] == "slurm"
    assert sorted(c.data.tags[names.TRIAL_TAG] for c in children) == ["0", "1"]
    assert {c.info.status for c in children} == {"FINISHED"}
    assert parent.data.metrics[names.TRIALS_COMPLETE] == 2
    _assert_slurm_jobs(slurm_cluster, children, tmp_path / "sweep")
