"""`python -m mnist_exp.train [overrides]` (also `mnist-train`): one experiment, tracked in MLflow.

The one place that turns the config into objects and wires the loop to the tracker.
Heavy imports (torch, MLflow) wait until Hydra has accepted the command line, so a bad
override is reported at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mnist_exp.config import CONF_DIR, PROJECT_ROOT
from mnist_exp.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from torch.nn import Module
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler

    from mnist_exp.data import Data
    from mnist_exp.engine import EvalResult
    from mnist_exp.tracking import Run

log = logging.getLogger("mnist_exp")
_LOADED = time.perf_counter()

# Override prefixes that say where things are, not what the experiment is; left out of run names.
_NOT_IN_NAME = ("hydra.", "mlflow.", "data.root", "device", "trainer.print_every_n_steps")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Train, evaluate, record; returns `cfg.optimized_metric` for sweepers."""
    from mnist_exp.validation import check_config

    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        check_config(cfg)
        return _run(cfg)
    except UserError as exc:
        if not in_sweep:
            sys.exit(f"error: {exc}")
        log.error(f"error: {exc}")
    except Exception:
        if not in_sweep:
            raise
        log.exception("this job failed; the sweep goes on")
    # A failed job in a sweep: its run is FAILED; NaN tells Optuna the trial failed, and
    # Hydra's sweepers go on with the other jobs instead of stopping at the first failure.
    return float("nan")


@dataclass
class _Setup:
    """The objects a run trains, built from the config."""

    model: Module
    optimizer: Optimizer
    scheduler: LRScheduler | None
    data: Data
    device: torch.device


def _build(cfg: DictConfig, device: torch.device) -> _Setup:
    import torch
    from hydra.utils import instantiate

    from mnist_exp import data, engine

    torch.set_num_threads(cfg.trainer.num_threads or _share_of_cores())
    engine.seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    dataset = data.load(
        cfg.data.dataset,
        cfg.data.root,
        download=cfg.data.download,
        val_size=cfg.data.val_size,
        max_train_samples=cfg.data.max_train_samples,
        max_test_samples=cfg.data.max_test_samples,
        seed=cfg.trainer.seed,
    )
    model = instantiate(cfg.model).to(device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    scheduler = None
    if cfg.get("scheduler"):
        steps_per_epoch = -(-len(dataset.train) // cfg.data.batch_size)
        total_steps = max(1, steps_per_epoch * cfg.trainer.epochs)
        scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=total_steps)
    return _Setup(model, optimizer, scheduler, dataset, device)


def _run(cfg: DictConfig) -> float:
    from mnist_exp import engine, resume, tracking

    device = engine.resolve_device(cfg.device.type)
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    uri = cfg.mlflow.tracking_uri
    tracking.configure_requests(
        cfg.mlflow.get("request_max_retries"), cfg.mlflow.get("request_timeout_s")
    )
    client, experiment_id = tracking.open_store(uri, cfg.mlflow.experiment_name)
    retry_for_s = float(cfg.mlflow.get("retry_for_s") or 0)
    params = tracking.flatten(OmegaConf.to_container(cfg, resolve=True))
    if cfg.trainer.resume:  # checked before the slow part, so a bad source is refused at once
        state, run_id = resume.find(str(cfg.trainer.resume), client, uri)
        resume.check_resumable(run_id, state, client, params)
    setup = _build(cfg, device)

    tags = tracking.source_tags(PROJECT_ROOT) | {
        "mnist_exp.overrides": " ".join(overrides),
        resume.OUTPUT_DIR_TAG: str(out_dir),
        **{str(k): str(v) for k, v in cfg.mlflow.tags.items()},
    }
    start = (0, 0)
    if cfg.trainer.resume:
        try:
            start = engine.restore_training_state(
                state, setup.model, setup.optimizer, setup.scheduler
            )
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(
                f"trainer.resume: the checkpoint of run {run_id} does not fit this model, "
                f"optimizer and scheduler ({str(exc).strip().splitlines()[0][:160]})"
            ) from exc
        run = tracking.Run.reopen(client, run_id, retry_for_s)
        run.set_tags(tags | {"mnist_exp.resumed_from_epoch": str(start[0])})
        log.info(f"Resuming MLflow run {run_id} after epoch {start[0]} (step {start[1]})")
    else:
        name = cfg.mlflow.run_name or _name_from(overrides)
        run = tracking.Run.start(
            client, experiment_id, run_name=name, params=params, tags=tags, retry_for_s=retry_for_s
        )
        log.info(f"MLflow run {run.run_id} ({run.name}) in {tracking.redact(uri)}; device {device}")
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        hydra_files = "hydra" if not cfg.trainer.resume else f"hydra/resumed-{start[0]}"
        run.log_config_files(out_dir / hydra_cfg.output_subdir, hydra_files)
        run.log_text(tracking.installed_requirements(), "environment/requirements.txt")
        test = _train_and_test(cfg, setup, run, out_dir, start)
        metric = _latest_metric(run, cfg.optimized_metric)
    except KeyboardInterrupt:
        _end_quietly(run, "KILLED")
        sys.exit(
            f"interrupted: MLflow run {run.run_id} marked KILLED; continue it from its last "
            f"complete epoch with: mnist-rerun {run.run_id} --resume"
        )
    except BaseException as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        _end_quietly(run, "FAILED", {"mnist_exp.error": f"{type(exc).__name__}: {first_line}"})
        if isinstance(exc, tracking.TrackingUnavailable):
            last = out_dir / "checkpoints" / "last.ckpt"
            kept = (
                f"the checkpoint of the last complete epoch is {last} (continue with "
                f"trainer.resume={last} once the server is back)"
                if last.is_file()
                else "no epoch was complete, so there is no checkpoint"
            )
            raise tracking.TrackingUnavailable(f"{exc}; {kept}") from exc
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    run.end("FINISHED")
    where = (
        f"{tracking.redact(uri)}/#/experiments/{experiment_id}/runs/{run.run_id}"
        if uri.startswith(("http://", "https://"))
        else f"mlflow ui --backend-store-uri {uri}"
        f"  (then #/experiments/{experiment_id}/runs/{run.run_id})"
    )
    log.info(
        f"Run {run.run_id} finished: test_accuracy {test.accuracy:.4f}; "
        f"checkpoint {out_dir / 'model.ckpt'}\n"
        f"Open it in the MLflow UI: {where}"
    )
    return metric


def _train_and_test(
    cfg: DictConfig, setup: _Setup, run: Run, out_dir: Path, start: tuple[int, int]
) -> EvalResult:
    """Train (checkpointing each epoch), test, and save the final weights as the seed does."""
    import torch
    from tqdm.contrib.logging import logging_redirect_tqdm

    from mnist_exp import engine
    from mnist_exp.console import Console

    net = torch.compile(setup.model) if cfg.trainer.compile else setup.model
    precision = str(cfg.trainer.precision)
    channels_last = bool(cfg.trainer.channels_last)
    callbacks = [
        MlflowLogger(run, cfg.trainer.log_every_n_steps),
        Console(cfg.trainer.print_every_n_steps),
        _Checkpointer(setup, run, out_dir / "checkpoints" / "last.ckpt"),
    ]
    with logging_redirect_tqdm():
        step = engine.fit(
            net,
            setup.optimizer,
            setup.data,
            epochs=cfg.trainer.epochs,
            batch_size=cfg.data.batch_size,
            eval_batch_size=cfg.data.eval_batch_size,
            seed=cfg.trainer.seed,
            device=setup.device,
            precision=precision,
            channels_last=channels_last,
            max_shift=cfg.data.max_shift,
            scheduler=setup.scheduler,
            callbacks=callbacks,
            start_epoch=start[0],
            start_step=start[1],
        )
    test = engine.evaluate(
        net,
        setup.data.test.to(setup.device),
        batch_size=cfg.data.eval_batch_size,
        precision=precision,
        channels_last=channels_last,
    )
    log.info(
        f"Test Accuracy of the model on the {test.total} test images: "
        f"{100 * test.correct / max(test.total, 1)} %"
    )
    run.log_metrics({"test_loss": test.loss, "test_accuracy": test.accuracy}, step)
    weights = out_dir / "model.ckpt"
    torch.save(setup.model.state_dict(), weights)
    run.log_artifact(weights, "checkpoints")
    return test


class _Checkpointer:
    """Engine callback: after each epoch, an atomic resume checkpoint, kept locally and in MLflow.

    It runs after the MLflow logger has flushed the epoch's metrics; the upload is queued
    behind them, so MLflow's copy never claims steps whose losses MLflow does not hold.
    While the tracking server is unreachable the local copy is written all the same.
    """

    def __init__(self, setup: _Setup, run: Run, path: Path) -> None:
        self.setup, self.run, self.path = setup, run, path

    def on_epoch_start(self, epoch: int, num_epochs: int, steps: int) -> None:
        pass

    def on_train_step(self, step: int, epoch: int, batch: int, loss: Tensor) -> None:
        pass

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        from mnist_exp import checkpoint, engine

        s = self.setup
        state = engine.training_state(s.model, s.optimizer, s.scheduler, epoch, step)
        checkpoint.save(state | {"run_id": self.run.run_id}, self.path)
        self.run.log_artifact(self.path, "checkpoints", defer=True)


class MlflowLogger:
    """Engine callback: `train_loss` every `every` steps, the epoch metrics, and `startup_s`.

    `startup_s` is the time from the start of the process to the first optimizer step.
    """

    def __init__(self, run: Run, every: int) -> None:
        self.run = run
        self.every = every
        self._started = False

    def on_epoch_start(self, epoch: int, num_epochs: int, steps: int) -> None:
        pass

    def on_train_step(self, step: int, epoch: int, batch: int, loss: Tensor) -> None:
        if not self._started:
            self._started = True
            self.run.log_metric("startup_s", _process_age(), step)
        if step % self.every == 0:
            self.run.log_metric("train_loss", loss, step)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.run.log_metrics({**metrics, "epoch": epoch}, step)
        self.run.flush()


def _process_age() -> float:
    """Seconds since this process started (from /proc on Linux; else since this module loaded)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _LOADED


def _share_of_cores() -> int:
    """All cores, or in a parallel sweep this job's share, so jobs do not oversubscribe them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return cores or 1
    n_jobs = hydra_cfg.launcher.get("n_jobs")
    if not n_jobs:  # submitit and Ray reserve cores per job (SLURM also pins them)
        launcher = hydra_cfg.launcher
        per_job = launcher.get("cpus_per_task") or OmegaConf.select(launcher, "ray.remote.num_cpus")
        return min(cores or 1, per_job or cores or 1)
    if n_jobs < 0:  # joblib: -1 is all cores, -2 all but one, ...
        n_jobs = max(1, (cores or 1) + 1 + n_jobs)
    return max(1, (cores or 1) // n_jobs)


def _latest_metric(run: Run, key: str) -> float:
    value = run.metrics().get(key)
    if value is None:
        raise UserError(f"optimized_metric={key!r} was never logged by this run")
    return value


def _end_quietly(run: Run, status: str, tags: dict[str, str] | None = None) -> None:
    """Record the end of a failed run without hiding the original error behind a new one."""
    try:
        if tags:
            run.set_tags(tags)
        run.end(status)
    except Exception as exc:
        if not run.gave_up:  # else the error that follows says the server is gone
            log.error(f"could not mark MLflow run {run.run_id} {status}: {exc}")


def _name_from(overrides: list[str]) -> str | None:
    """`optimizer.lr=0.003 data.batch_size=128` -> `lr=0.003,batch_size=128`."""
    parts = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if not key.startswith(_NOT_IN_NAME):
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return ",".join(parts) or None


if __name__ == "__main__":
    main()
