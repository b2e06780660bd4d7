"""Sweeps: one MLflow parent per sweep, children per job, failures counted, best run recorded.

The sweeps on the basic launcher run `mnist-train -m` in the test's process; the one on
joblib starts the command, whose two workers open a brand-new store at once.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, in_process, runs_in, stop
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from mnist_exp import compare
from mnist_exp.api import train as api_train
from mnist_exp.config.world import SWEEP_CORES_ENV, available_cores
from mnist_exp.names import PARENT_RUN_ENV, PID_START_TAG, PID_TAG
from mnist_exp.runner.build import job_device, share_of_cores
from mnist_exp.runner.naming import SWEPT_ENV, grid_size
from mnist_exp.runner.sweep import EARLIER_JOBS_ENV, SWEEP_ENV, SweepCallback
from mnist_exp.tracking import processes

pytestmark = pytest.mark.slow  # each test runs a sweep or a run

SMALL = (
    "data.max_train_samples=256",
    "data.max_test_samples=100",
    "trainer.epochs=1",
    "trainer.print_every_n_steps=0",
)


def _sweep(tracking_uri: str):
    """The one parent run and its children, as a user would find them in MLflow."""
    runs = runs_in(tracking_uri)
    (parent,) = [r for r in runs if r.data.tags.get("mnist_exp.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1
    return parent, children


@pytest.mark.new_store
@pytest.mark.process
def test_a_parallel_grid_is_one_parent_with_a_child_per_job(train, tracking_uri, capfd):
    # A brand-new store, opened by two joblib workers at once.
    train(
        "-m", "optimizer.lr=0.001,0.003", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SMALL
    )
    parent, children = _sweep(tracking_uri)
    assert parent.info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == ["lr=0.001", "lr=0.003"]
    assert {c.info.status for c in children} == {"FINISHED"}
    assert "optimizer.lr=0.001,0.003" in parent.data.tags["mnist_exp.sweep.overrides"].split()
    assert parent.data.tags["mnist_exp.sweep.launcher"] == "joblib"
    metrics = parent.data.metrics
    assert (metrics["sweep_jobs"], metrics["sweep_finished"], metrics["sweep_failed"]) == (2, 2, 0)
    best = max(children, key=lambda c: c.data.metrics["test_accuracy"])
    assert parent.data.tags["mnist_exp.best_run_id"] == best.info.run_id
    assert metrics["best_test_accuracy"] == best.data.metrics["test_accuracy"]
    assert best.data.params["optimizer.lr"] in parent.data.tags["mnist_exp.best_overrides"]
    artifacts = [a.path for a in MlflowClient(tracking_uri).list_artifacts(parent.info.run_id)]
    assert "sweep.png" in artifacts
    share = max(1, available_cores() // 2)  # each of 2 jobs takes half the cores
    assert {c.data.tags["mnist_exp.torch_threads"] for c in children} == {str(share)}
    assert {c.data.tags["mnist_exp.device"] for c in children} == {"cpu"}
    # The command stopped joblib's workers and the trackers' forker as it ended: the trackers
    # that recorded the jobs then end too.
    for child in children:
        pid, started = int(child.data.tags[PID_TAG]), child.data.tags[PID_START_TAG]
        deadline = time.monotonic() + 30
        while processes.alive(pid, started):
            assert time.monotonic() < deadline, f"tracker {pid} outlived its sweep"
            time.sleep(0.1)

    shown = in_process(compare.main, ["--tracking-uri", tracking_uri, "--format", "csv"], capfd)
    assert shown.code == 0, shown.err
    header, *rows = shown.out.strip().splitlines()  # stdout: only the CSV
    assert header.split(",")[:4] == ["run_id", "run_name", "status", "optimizer.lr"]
    assert rows[0].split(",")[0] == best.info.run_id
    assert len(rows) == 2


def test_a_failed_job_is_counted_and_the_sweep_goes_on(mnist_train, tracking_uri):
    # SGD's first step at lr 1e38 sends the weights to infinity: that job diverges in training.
    ended = mnist_train("-m", "optimizer=sgd", "optimizer.lr=1e38,0.01", *SMALL)
    assert ended.code == 0, ended.err
    assert "training diverged" in ended.out + ended.err
    parent, children = _sweep(tracking_uri)
    statuses = {float(c.data.params["optimizer.lr"]): c.info.status for c in children}
    assert statuses == {1e38: "FAILED", 0.01: "FINISHED"}
    assert parent.data.metrics["sweep_failed"] == 1
    assert parent.data.metrics["sweep_finished"] == 1
    assert parent.info.status == "FINISHED"
    # Each job prints the name MLflow shows: its swept override, not `optimizer=sgd,...` too.
    for child in children:
        assert f"MLflow run {child.info.run_id} ({child.info.run_name})" in ended.out, ended.out
    assert sorted(c.info.run_name for c in children) == ["lr=0.01", "lr=1e+38"]
    (finished,) = [c for c in children if c.info.status == "FINISHED"]
    assert f"Run {finished.info.run_id} (lr=0.01) finished" in ended.out


# Optuna warns as the sweeper asks for trials outside `Study.optimize`: not in a search's output.
@pytest.mark.filterwarnings("error:Heartbeat of storage:UserWarning")
def test_optuna_optimises_the_validation_accuracy(mnist_train, tracking_uri, tmp_path):
    ended = mnist_train(
        "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "data.val_size=200", *SMALL
    )
    assert ended.code == 0, ended.err
    parent, children = _sweep(tracking_uri)
    assert len(children) == 3
    assert parent.data.tags["mnist_exp.optimized_metric"] == "val_accuracy"
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["data.val_size"] == "200"
        assert child.data.params["optimized_metric"] == "val_accuracy"
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    best = max(children, key=lambda c: c.data.metrics["val_accuracy"])
    # What Optuna optimised is each run's validation accuracy, not its test accuracy.
    assert results["best_value"] == best.data.metrics["val_accuracy"]
    assert parent.data.metrics["best_val_accuracy"] == best.data.metrics["val_accuracy"]
    assert parent.data.tags["mnist_exp.best_run_id"] == best.info.run_id


def test_a_search_space_with_an_unknown_key_fails_at_the_start(mnist_train, tracking_uri, tmp_path):
    (tmp_path / "conf" / "hparams_search").mkdir(parents=True)
    space = {
        "defaults": ["optuna"],
        "hydra": {"sweeper": {"params": {"optimizer.lrr": "interval(0.001, 0.01)"}}},
    }
    text = "# @package _global_\n" + yaml.safe_dump(space)
    (tmp_path / "conf" / "hparams_search" / "typo.yaml").write_text(text)
    ended = mnist_train("-m", "--config-dir", str(tmp_path / "conf"), "hparams_search=typo")
    assert ended.code == 1
    last = ended.err.strip().splitlines()[-1]
    assert last.startswith("error: hydra.sweeper.params names 'optimizer.lrr'"), ended.err
    assert runs_in(tracking_uri) == []


def test_an_optimized_metric_never_logged_fails_at_the_start(mnist_train, tracking_uri):
    for metric, reason in [("val_accuracy", "set data.val_size"), ("accuracy", "must be one of")]:
        ended = mnist_train("-m", f"optimized_metric={metric}", "optimizer.lr=0.001,0.002")
        assert ended.code == 1
        last = ended.err.strip().splitlines()[-1]
        assert last.startswith(f"error: optimized_metric='{metric}'") and reason in last
    assert runs_in(tracking_uri) == []


def test_compare_writes_markdown_for_an_experiment(
    data_root, tracking_uri, tmp_path: Path, capfd, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    api_train(
        [f"data.root={data_root}", f"mlflow.tracking_uri={tracking_uri}",
         f"hydra.run.dir={tmp_path}/run", "mlflow.log_plots=false", "mlflow.log_model=false",
         "optimizer.lr=0.002", *SMALL]
    )  # fmt: skip
    out = tmp_path / "runs.md"
    argv = ["--experiment", "--tracking-uri", tracking_uri, "--format", "markdown"]
    shown = in_process(compare.main, [*argv, "--output", str(out)], capfd)
    assert shown.code == 0, shown.err
    assert str(out) in shown.out
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| run_id | run_name | status | test_accuracy")
    assert lines[1].startswith("| --- |")
    assert len(lines) == 3


def test_each_job_of_a_sequential_sweep_counts_only_its_own_start_up(mnist_train, tracking_uri):
    """`startup_s` of a sweep's later jobs leaves out the jobs before them: each is shorter
    than the time between its run's start and the previous job's. (The first job's counts
    from the process's start, here the test's.)"""
    ended = mnist_train("-m", "trainer.seed=0,1,2,3", *SMALL)
    assert ended.code == 0, ended.err
    _, children = _sweep(tracking_uri)
    by_seed = sorted(children, key=lambda c: int(c.data.params["trainer.seed"]))
    startups = [c.data.metrics["startup_s"] for c in by_seed]
    assert all(s < 10 for s in startups[1:]), startups
    for earlier, later in zip(by_seed, by_seed[1:], strict=False):
        since = (later.info.start_time - earlier.info.start_time) / 1000
        assert later.data.metrics["startup_s"] < since, (startups, since)


def test_parallel_local_jobs_take_a_gpu_each_and_a_share_of_the_cores(monkeypatch) -> None:
    """Job i of a joblib or submitit_local sweep on G GPUs gets GPU i mod G (else all took the
    first); a device asked for by number, a single run and the cluster launchers keep theirs.
    The cores shared are those the process may use, at most the user's OMP_NUM_THREADS."""
    joblib = OmegaConf.create(
        {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
         "n_jobs": 4}
    )  # fmt: skip
    local = OmegaConf.create(
        {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
         "cpus_per_task": 2}
    )  # fmt: skip
    slurm = OmegaConf.create(
        {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
    )
    assert [job_device("auto", joblib, i, 2) for i in range(4)] == ["cuda:0", "cuda:1"] * 2
    assert [job_device("cuda", local, i, 3) for i in range(4)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:0",
    ]  # fmt: skip
    assert job_device("cuda:1", joblib, 0, 2) == "cuda:1"
    assert job_device("cpu", joblib, 1, 2) == "cpu"
    assert job_device("auto", joblib, 1, 1) == "auto"  # one GPU (or none): nothing to choose
    assert job_device("auto", None, 1, 2) == "auto"  # a single run
    assert job_device("auto", slurm, 1, 2) == "auto"  # SLURM gives each job its own GPUs
    joblib.n_jobs = 1
    assert job_device("auto", joblib, 1, 2) == "auto"  # one job at a time

    affinity = len(os.sched_getaffinity(0))
    for limit, expected in (("1", 1), ("999", affinity), ("0", affinity), ("four", affinity)):
        monkeypatch.setenv("OMP_NUM_THREADS", limit)
        assert available_cores() == expected, limit
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = available_cores()
    assert cores == affinity
    assert share_of_cores(None) == cores
    assert share_of_cores(OmegaConf.create({"n_jobs": 2})) == max(1, cores // 2)
    assert share_of_cores(OmegaConf.create({"n_jobs": -1})) == 1  # joblib: one job per core
    assert share_of_cores(local) == min(cores, 2)
    # In a joblib worker of a sweep on 16 cores at n_jobs=4, joblib set OMP_NUM_THREADS to the
    # worker's share (4): that share is the job's, not divided again.
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv(SWEEP_CORES_ENV, "16")
    assert share_of_cores(OmegaConf.create({"n_jobs": 4})) == 4
    assert share_of_cores(OmegaConf.create({"n_jobs": -1})) == 1
    assert share_of_cores(local) == min(cores, 2)  # submitit: the job's own node decides


@pytest.mark.process
def test_a_grid_cut_by_ctrl_c_continues_where_it_stopped(
    train_command, mnist_train, tracking_uri, tmp_path
):
    """Ctrl-C while the second of three jobs trains: it and the parent end KILLED. The same
    command again, its overrides in another order, skips the first job (said in one line),
    resumes the second in its own run from its last complete epoch and runs the third, all
    under the one parent."""
    grid = ("optimizer.lr=0.001,0.002,0.003", "trainer.epochs=3", *SMALL[:2])
    cmd, env = train_command("-m", *grid, "trainer.print_every_n_steps=0")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        second = tmp_path / "sweep" / "1" / "checkpoints" / "last.ckpt"
        while not second.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no second job"
            time.sleep(0.05)
        stop(proc, signal.SIGINT)
    finally:
        proc.kill()
    parent, children = _sweep(tracking_uri)
    assert parent.info.status == "KILLED"
    cut = {c.info.run_name: c for c in children}
    assert {name: c.info.status for name, c in cut.items()} == {
        "lr=0.001": "FINISHED", "lr=0.002": "KILLED"
    }  # fmt: skip

    again = mnist_train("-m", "trainer.print_every_n_steps=0", *reversed(grid))
    assert again.code == 0, again.err
    said = again.out + again.err
    assert (
        "Continuing the sweep: 1 of its jobs FINISHED before and are skipped, 1 cut short" in said
    )
    continued, children = _sweep(tracking_uri)
    assert continued.info.run_id == parent.info.run_id and continued.info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == ["lr=0.001", "lr=0.002", "lr=0.003"]
    assert {c.info.status for c in children} == {"FINISHED"}
    resumed = next(c for c in children if c.info.run_name == "lr=0.002")
    assert resumed.info.run_id == cut["lr=0.002"].info.run_id
    assert int(resumed.data.tags["mnist_exp.resumed_from_epoch"]) >= 1
    history = MlflowClient(tracking_uri).get_metric_history(resumed.info.run_id, "epoch")
    assert [m.value for m in history] == [1, 2, 3]
    assert cut["lr=0.001"].info.run_id in {c.info.run_id for c in children}  # not trained again
    metrics = continued.data.metrics
    assert (metrics["sweep_jobs"], metrics["sweep_finished"], metrics["sweep_failed"]) == (3, 3, 0)

    # The same command while the sweep runs (its parent RUNNING, its process alive: this one)
    # is refused, rather than resuming the jobs in flight a second time.
    client = MlflowClient(tracking_uri)
    client.update_run(parent.info.run_id, status="RUNNING")
    for key, value in processes.process_tags().items():
        client.set_tag(parent.info.run_id, key, value)
    busy = mnist_train("-m", "trainer.print_every_n_steps=0", *grid)
    assert busy.code == 1
    assert (
        busy.err.strip()
        .splitlines()[-1]
        .startswith(f"error: this sweep is running already (parent run {parent.info.run_id}, on ")
    ), busy.err


def test_a_job_takes_its_sweeps_environment_in_any_worker(monkeypatch) -> None:
    """joblib's workers start before the sweep has its parent run (warmed meanwhile), and may
    outlive an earlier sweep: each job takes this sweep's environment from the callback."""
    for key in SWEEP_ENV:  # set first, so that monkeypatch removes what the job sets
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    callback = SweepCallback()
    callback.parent = object()  # the parent run: MLflow's client stays in the sweep's process
    callback.env = {PARENT_RUN_ENV: "new", SWEPT_ENV: "optimizer.lr", SWEEP_CORES_ENV: "2"}
    in_worker = pickle.loads(pickle.dumps(callback))
    assert in_worker.parent is None
    monkeypatch.setenv(PARENT_RUN_ENV, "earlier")  # left by an earlier sweep's job
    monkeypatch.setenv(EARLIER_JOBS_ENV, "{}")
    in_worker.on_job_start(config=OmegaConf.create())
    given = {key: os.environ.get(key) for key in SWEEP_ENV}
    assert given == callback.env | {EARLIER_JOBS_ENV: None}
    SweepCallback().on_job_start(config=OmegaConf.create())  # a single run's: nothing changes
    assert os.environ[PARENT_RUN_ENV] == "new"


def test_a_grids_jobs_are_counted_before_it_starts() -> None:
    """As many joblib workers are warmed as the grid has jobs (at most n_jobs)."""
    swept = ["optimizer.lr=0.1,0.2", "trainer.seed=range(3)", "trainer.epochs=2"]
    assert grid_size({}, swept) == 6
    assert grid_size({"optimizer.lr": "0.1,0.2,0.3"}, ["optimizer.lr=0.1,0.2"]) == 2
    assert grid_size({"trainer.seed": "0,1"}, ["optimizer.lr=0.1,0.2"]) == 4
    assert grid_size({}, ["model=glob(*)"]) is None  # the group's files tell
    assert grid_size({}, ["optimizer.lr=interval(0.1,0.2)"]) is None  # not a grid
    assert grid_size({}, ["optimizer.lr=0.1,"]) is None  # Hydra refuses it, in its words
    assert grid_size({}, []) == 1
