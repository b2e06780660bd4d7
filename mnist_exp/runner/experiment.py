"""One experiment from its composed config, in a Hydra job: build, train, test, record."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from mnist_exp import names
from mnist_exp.config.checks import check_config
from mnist_exp.config.paths import PROJECT_ROOT
from mnist_exp.config.world import World, current_world
from mnist_exp.errors import RankLost, TrackingUnavailable
from mnist_exp.runner import job_log, lifecycle, slurm
from mnist_exp.runner.naming import SWEPT_ENV, name_from
from mnist_exp.runner.sweep import earlier_job, hold_folder
from mnist_exp.tracking import processes
from mnist_exp.tracking.http import configure_requests
from mnist_exp.tracking.redaction import redact
from mnist_exp.tracking.remote import RemoteRun

log = logging.getLogger("mnist_exp")
_LOADED = time.perf_counter()
_runs_started: list[float] = []  # when each run of this process began (perf_counter)


@dataclass
class RunResult:
    """What a finished run left: its MLflow run, its metrics and files."""

    run_id: str  # "" on a rank other than 0 of a data-parallel run, which records nothing
    status: str
    metrics: dict[str, float] = field(default_factory=dict)  # the last value of each
    checkpoint: Path | None = None  # the final weights (a state_dict)
    output_dir: Path | None = None  # the run's Hydra folder


def run_experiment(cfg: DictConfig, extra_tags: dict[str, str] | None = None) -> RunResult:
    """Train, test and record `cfg`'s experiment as an MLflow run. Raises `UserError` (the run,
    once it exists, FAILED) for what the user can fix, `KeyboardInterrupt` (KILLED) on a signal.

    Launched as several processes (torchrun), all train one model and rank 0 records it."""
    check_config(cfg)
    world = current_world()
    try:
        return _record(cfg, extra_tags, world) if world.leader else _follow(cfg, world)
    finally:
        if world.size > 1:
            from mnist_exp.training import distributed

            distributed.leave()


def _follow(cfg: DictConfig, world: World) -> RunResult:
    """Rank `world.rank`'s part: rank 0's objects, restored from rank 0's checkpoint when it
    resumes; trained without recording or writing anything."""
    from mnist_exp.runner.build import build
    from mnist_exp.runner.train_eval import follow
    from mnist_exp.training import distributed

    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    launcher, job_num = (hydra_cfg.launcher, hydra_cfg.job.num) if in_sweep else (None, 0)
    try:
        state = _join(cfg, None, launcher, job_num, world)
        setup = build(cfg, state, launcher, job_num, world)
        follow(cfg, setup, (state["epoch"], state["step"]) if state else (0, 0), world)
    except Exception as exc:
        if not distributed.lost_peer(exc):
            raise
        raise RankLost(f"rank {world.rank} stops: another process of this run ended") from exc
    return RunResult("", "FINISHED")


def _join(
    cfg: DictConfig,
    state: dict[str, Any] | None,
    launcher: DictConfig | None,
    job_num: int,
    world: World,
) -> dict[str, Any] | None:
    """Join the data-parallel run's process group on this rank's device; returns rank 0's
    `state` (the checkpoint it resumes from, or None) on every rank."""
    from mnist_exp.runner.build import device_of
    from mnist_exp.training import distributed

    distributed.join(world, device_of(cfg, launcher, job_num, world))
    return distributed.from_leader(state)


def _record(cfg: DictConfig, extra_tags: dict[str, str] | None, world: World) -> RunResult:
    """Rank 0's part, or the only process's: `run_experiment`'s run."""
    _runs_started.append(time.perf_counter())
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    swept = os.environ.get(SWEPT_ENV, "").split()  # in a sweep's job, the keys it varies
    earlier = earlier_job(overrides) if in_sweep else None  # a continued grid's
    if earlier is not None and earlier["status"] == "FINISHED":
        name = name_from(overrides, swept)
        log.info(f"Job {name}: FINISHED before as MLflow run {earlier['run_id']}, skipped")
        folder = Path(earlier["output_dir"] or out_dir)
        return RunResult(earlier["run_id"], "FINISHED", earlier["metrics"], None, folder)
    if earlier is not None and not cfg.trainer.resume:
        last = Path(earlier["output_dir"] or out_dir) / names.RESUME_CHECKPOINT
        if last.is_file():  # cut short after an epoch; else it starts again, in a new run
            with open_dict(cfg):
                cfg.trainer.resume = earlier["run_id"]
    requeues = slurm.restarts() if in_sweep else 0
    own = out_dir / names.RESUME_CHECKPOINT
    if requeues and not cfg.trainer.resume and own.is_file():  # this job before its requeue
        with open_dict(cfg):
            cfg.trainer.resume = str(own)
    uri = cfg.mlflow.tracking_uri
    tree = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(tree, dict)
    config = {str(k): v for k, v in tree.items()}
    configure_requests(cfg.mlflow)
    retry_for_s = float(cfg.mlflow.get("retry_for_s") or 0)
    sampled = cfg.mlflow.get("log_system_metrics")  # absent in configs recorded before it
    system_metrics_s = float(cfg.mlflow.system_metrics_interval_s) if sampled else None
    tags = {
        **({names.SLURM_REQUEUES_TAG: str(requeues)} if requeues else {}),
        names.OVERRIDES_TAG: " ".join(overrides),
        names.OUTPUT_DIR_TAG: str(out_dir),
        **{str(k): str(v) for k, v in cfg.mlflow.tags.items()},
        **(extra_tags or {}),
    }
    trial = None
    if in_sweep and hydra_cfg.sweeper.get("trial") is not None:  # an Optuna search's job
        from mnist_exp.runner.search_trial import SearchTrial

        trial = SearchTrial(hydra_cfg.sweeper, cfg)
        tags |= trial.tags()
    state, start = None, (0, 0)
    if cfg.trainer.resume:
        from mnist_exp.runner.resume import resumable  # imports MLflow: only when resuming

        state, run_id = resumable(cfg, config)
        start = (state["epoch"], state["step"])
    # The tracker process imports MLflow and opens the store while this one imports torch.
    recorder = RemoteRun(uri, cfg.mlflow.experiment_name)
    try:
        from mnist_exp.runner.build import build

        launcher = hydra_cfg.launcher if in_sweep else None
        job_num = hydra_cfg.job.num if in_sweep else 0
        if world.size > 1:  # the other ranks start from the same checkpoint
            _join(cfg, state, launcher, job_num, world)
        setup = build(cfg, state, launcher, job_num, world)
    except BaseException:
        recorder.close()
        raise
    if not gc.isenabled():  # the CLI turns it off while starting: what it made lives on
        gc.freeze()
        gc.enable()
    log.info(f"Training on {setup.device}; recording in {redact(uri)}")
    tags |= setup.tags()
    # hydra.output_subdir=null: Hydra kept no copy of the config, so there is none to record.
    files = out_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None
    hold_folder(recorder.opened)  # the run about to be opened records it as its output_dir
    if state is None:
        recorder.start(
            run_name=cfg.mlflow.run_name or name_from(overrides, swept),
            config=config | ({names.WORLD_SIZE: world.size} if world.size > 1 else {}),
            tags=tags,
            project_root=PROJECT_ROOT,
            files=(files, names.HYDRA_FILES) if files else None,
            retry_for_s=retry_for_s,
            unsent=out_dir / names.UNSENT,
            system_metrics_s=system_metrics_s,
        )
    else:
        tags[names.RESUMED_FROM_EPOCH_TAG] = str(start[0])
        resumed = (files, f"{names.HYDRA_FILES}/resumed-{start[0]}") if files else None
        recorder.reopen(
            run_id, tags=tags, files=resumed, retry_for_s=retry_for_s,
            unsent=out_dir / names.UNSENT, system_metrics_s=system_metrics_s,
        )  # fmt: skip
        log.info(f"Resuming MLflow run {run_id} after epoch {start[0]} (step {start[1]})")
    with (
        lifecycle.recording(recorder, out_dir / names.RESUME_CHECKPOINT, start[0]),
        trial.running(recorder.run_id) if trial else contextlib.nullcontext(),
    ):
        from mnist_exp.runner.data_inputs import record_data
        from mnist_exp.runner.train_eval import train_and_evaluate

        # A rerun's data are compared with its original's, a resumed run's with its own.
        compare_with = (
            recorder.run_id if state is not None else cfg.mlflow.tags.get(names.RERUN_OF_TAG)
        )
        record_data(cfg, setup.data, recorder, compare_with)
        callbacks = [trial] if trial else []
        test, metrics = train_and_evaluate(
            cfg,
            setup,
            recorder,
            out_dir,
            start,
            in_sweep,
            _startup_s,
            callbacks=callbacks,
            world=world,
        )
        if trial:
            recorder.set_tags(trial.tags())  # pruned, and after which epoch
    from mnist_exp.report.console import summary

    # All recorded (the model too) before the summary says so: their errors are raised here.
    recorder.sync()
    weights = out_dir / names.FINAL_WEIGHTS
    log.info(
        summary(
            run_id=recorder.run_id,
            run_name=recorder.name,
            test=test,
            checkpoint=weights,
            tracking_uri=redact(uri),
            experiment_id=recorder.experiment_id,
            has_model=cfg.mlflow.log_model,
        )
    )
    job_log.upload(recorder, start[0])  # after the summary, so that the log holds it too
    recorder.end("FINISHED")
    if trial:
        trial.finish(metrics)
    if recorder.unsent:
        raise TrackingUnavailable(
            f"the MLflow tracking server {redact(uri)} was unreachable for more than "
            f"{retry_for_s:g} s (mlflow.retry_for_s): what run {recorder.run_id} could not send "
            f"(metrics, tags, test results, files) is kept in {recorder.unsent}; once the "
            f"server is back, send it with: mnist-sync {recorder.unsent}"
        )
    return RunResult(recorder.run_id, "FINISHED", metrics, weights, out_dir)


def _startup_s() -> float:
    """Seconds since the process (or this module) started for its first run, else the job."""
    if len(_runs_started) > 1:
        return time.perf_counter() - _runs_started[-1]
    age = processes.age()
    return age if age is not None else time.perf_counter() - _LOADED
