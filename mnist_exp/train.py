"""`python -m mnist_exp.train [overrides]` (also `mnist-train`): one experiment, tracked in MLflow.

The one place that turns the config into objects and wires the loop to the tracker.
Heavy imports (torch, MLflow) wait until Hydra has accepted the command line, so a bad
override is reported at once.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mnist_exp.config import CONF_DIR, PROJECT_ROOT
from mnist_exp.errors import TrackingUnavailable, UserError, one_line

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor
    from torch.nn import Module
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler

    from mnist_exp.data import Data
    from mnist_exp.engine import EvalResult
    from mnist_exp.tracker import RemoteRun

log = logging.getLogger("mnist_exp")
_LOADED = time.perf_counter()
_finished_alone = False  # set by a single run (not a sweep's job) that finished
CHECKPOINT = Path("checkpoints") / "last.ckpt"  # the resume checkpoint, in the run folder
# What an OSError says when the disk is full or a folder cannot be written.
_CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}

# Override prefixes that say where things are, not what the experiment is; left out of run names.
_NOT_IN_NAME = (
    "hydra.",
    "mlflow.",
    "data.root",
    "device",
    "trainer.print_every_n_steps",
    "trainer.progress_bar",
)


def main() -> None:
    """`mnist-train`: `run_command`, then a quick exit once a single run has finished.

    Everything is recorded and flushed by then; tearing down torch's and matplotlib's
    modules would only make the command return about 0.8 s later.
    """
    # Start-up makes objects that live till the end (modules, the config, data and model);
    # the collector's full passes over them cost 0.5 s of a 4 s start-up for nothing.
    # `_startup_done` turns it back on once the run is built.
    gc.disable()
    if run_command():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_command() -> bool:
    """Run the command line in `sys.argv`; True when it was a single run that finished.

    Overrides Hydra would answer with a stack trace are refused in one line first.
    """
    from mnist_exp.validation import check_overrides

    global _finished_alone
    try:
        check_overrides(sys.argv[1:])
    except UserError as exc:
        sys.exit(f"error: {exc}")
    _finished_alone = False
    _main()
    return _finished_alone


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> float:
    """Train, evaluate, record; returns `cfg.optimized_metric` for sweepers."""
    from mnist_exp.validation import check_config

    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    global _finished_alone
    try:
        check_config(cfg)
        metric = _run(cfg)
        _finished_alone = not in_sweep
        return metric
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


class RunFolderCallback(Callback):
    """Hydra callback: a run or sweep folder that cannot be written is refused in one line.

    Hydra creates the folder before `main` runs, and would answer with a stack trace.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def _check_writable(folder: Path, key: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        sys.exit(
            f"error: cannot write the run folder {folder} ({exc.strerror or exc}): "
            f"set {key} to a writable folder, or free space on its disk"
        )


def _startup_done() -> None:
    """Turn the garbage collector back on (see `main`), leaving out what start-up made."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


@dataclass
class _Setup:
    """The objects a run trains, built from the config."""

    model: Module
    optimizer: Optimizer
    scheduler: LRScheduler | None
    data: Data
    device: torch.device


def _build(cfg: DictConfig, state: dict | None) -> _Setup:
    """Data, model, optimizer and scheduler; restored from `state` when resuming."""
    import torch
    from hydra.utils import instantiate

    from mnist_exp import allocator, data, engine

    allocator.keep_freed_memory()
    device = engine.resolve_device(cfg.device.type)
    threads = cfg.trainer.num_threads
    if not threads:
        cores = _share_of_cores()
        threads = engine.cpu_threads(cfg.data.batch_size, cores) if device.type == "cpu" else cores
    torch.set_num_threads(threads)
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
    if _channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    scheduler = None
    if cfg.get("scheduler"):
        steps_per_epoch = -(-len(dataset.train) // cfg.data.batch_size)
        total_steps = max(1, steps_per_epoch * cfg.trainer.epochs)
        try:
            scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=total_steps)
        except (ValueError, ZeroDivisionError) as exc:  # e.g. a warm-up of exactly one step
            raise UserError(
                f"scheduler: cannot schedule {total_steps} steps with these settings "
                f"({exc or type(exc).__name__}): change scheduler.pct_start, trainer.epochs or "
                f"data.batch_size"
            ) from exc
    if state is not None:
        try:
            engine.restore_training_state(state, model, optimizer, scheduler)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(
                f"trainer.resume: the checkpoint of run {state['run_id']} does not fit this "
                f"model, optimizer and scheduler ({str(exc).strip().splitlines()[0][:160]})"
            ) from exc
    return _Setup(model, optimizer, scheduler, dataset, device)


def _run(cfg: DictConfig) -> float:
    from mnist_exp.redaction import redact
    from mnist_exp.tracker import ERROR_TAG, OUTPUT_DIR_TAG, RemoteRun, configure_requests

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    uri = cfg.mlflow.tracking_uri
    config = OmegaConf.to_container(cfg, resolve=True)
    configure_requests(cfg.mlflow.get("request_max_retries"), cfg.mlflow.get("request_timeout_s"))
    retry_for_s = float(cfg.mlflow.get("retry_for_s") or 0)
    tags = {
        "mnist_exp.overrides": " ".join(overrides),
        OUTPUT_DIR_TAG: str(out_dir),
        **{str(k): str(v) for k, v in cfg.mlflow.tags.items()},
    }
    state, start = None, (0, 0)
    if cfg.trainer.resume:
        state, run_id = _resumable(cfg, config)
        start = (state["epoch"], state["step"])
    # The tracker process imports MLflow and opens the store while this one imports torch.
    run = RemoteRun(uri, cfg.mlflow.experiment_name)
    try:
        setup = _build(cfg, state)
    except BaseException:
        run.close()
        raise
    _startup_done()
    from mnist_exp.engine import NonFiniteLossError

    log.info(f"Training on {setup.device}; recording in {redact(uri)}")
    if state is None:
        files = (out_dir / hydra_cfg.output_subdir, "hydra")
        run_name = cfg.mlflow.run_name or _name_from(overrides)
        run.start(
            run_name=run_name,
            config=config,
            tags=tags,
            project_root=PROJECT_ROOT,
            files=files,
            retry_for_s=retry_for_s,
        )
    else:
        tags["mnist_exp.resumed_from_epoch"] = str(start[0])
        files = (out_dir / hydra_cfg.output_subdir, f"hydra/resumed-{start[0]}")
        run.reopen(run_id, tags=tags, files=files, retry_for_s=retry_for_s)
        log.info(f"Resuming MLflow run {run_id} after epoch {start[0]} (step {start[1]})")
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        test = _train_and_test(cfg, setup, run, out_dir, start)
        metric = _latest_metric(run, cfg.optimized_metric)
    except KeyboardInterrupt:
        # A second Ctrl-C must not cut the recording of the first short; the process exits next.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not run.opened():
            raise
        _log_again(run, out_dir / CHECKPOINT)
        _end_quietly(run, "KILLED")
        sys.exit(
            f"interrupted: MLflow run {run.run_id} marked KILLED; continue it from its last "
            f"complete epoch with: mnist-rerun {run.run_id} --resume"
        )
    except NonFiniteLossError as exc:
        if not run.opened():
            raise
        failure = {
            ERROR_TAG: str(exc),
            "mnist_exp.failed_step": str(exc.step),
            "mnist_exp.failed_epoch": str(exc.epoch),
        }
        _end_quietly(run, "FAILED", failure)
        if exc.epoch > start[0] + 1:
            kept = f"{out_dir / CHECKPOINT} keeps epoch {exc.epoch - 1}"
        elif start[0]:
            kept = f"the checkpoint of epoch {start[0]} it resumed from is unchanged"
        else:
            kept = "no epoch of this run completed, so it wrote no checkpoint"
        raise UserError(
            f"training diverged: {exc} (epoch {exc.epoch}); MLflow run {run.run_id} marked "
            f"FAILED; {kept}: lower optimizer.lr (or add a warm-up: scheduler=onecycle)"
        ) from exc
    except BaseException as exc:
        if not run.opened():
            raise
        _end_quietly(run, "FAILED", {ERROR_TAG: one_line(exc)})
        if isinstance(exc, OSError) and exc.errno in _CANNOT_WRITE:
            raise UserError(
                f"cannot write {exc.filename or 'to disk'} ({exc.strerror}): free space there "
                f"or set hydra.run.dir / mlflow.tracking_uri to a writable folder; MLflow run "
                f"{run.run_id} marked FAILED"
            ) from exc
        if isinstance(exc, TrackingUnavailable):
            last = out_dir / CHECKPOINT
            kept = (
                f"the checkpoint of the last complete epoch is {last} (continue with "
                f"trainer.resume={last} once the server is back)"
                if last.is_file()
                else "no epoch was complete, so there is no checkpoint"
            )
            raise TrackingUnavailable(f"{exc}; {kept}") from exc
        if isinstance(exc, UserError):
            raise UserError(f"{exc}; MLflow run {run.run_id} marked FAILED") from exc
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    run.end("FINISHED")
    from mnist_exp.console import summary

    log.info(
        summary(
            run_id=run.run_id,
            run_name=run.name,
            test=test,
            checkpoint=out_dir / "model.ckpt",
            tracking_uri=redact(uri),
            experiment_id=run.experiment_id,
            has_model=cfg.mlflow.log_model,
        )
    )
    return metric


def _resumable(cfg: DictConfig, config: dict) -> tuple[dict, str]:
    """The checkpoint `trainer.resume` points at and its run, checked before the slow part."""
    from mnist_exp import resume, tracking

    uri = cfg.mlflow.tracking_uri
    client, _ = tracking.open_store(uri, cfg.mlflow.experiment_name)
    state, run_id = resume.find(str(cfg.trainer.resume), client, uri)
    resume.check_resumable(run_id, state, client, tracking.flatten(config))
    return state, run_id


def _train_and_test(
    cfg: DictConfig, setup: _Setup, run: RemoteRun, out_dir: Path, start: tuple[int, int]
) -> EvalResult:
    """Train (checkpointing each epoch), test, and save the final weights as the seed does.

    Then record what a user looks at: per-class test accuracy, the pictures
    (`mlflow.log_plots`) and the servable model (`mlflow.log_model`).
    """
    import torch
    from tqdm.contrib.logging import logging_redirect_tqdm

    from mnist_exp import checkpoint, engine, plots
    from mnist_exp.console import Console, wants_progress_bar

    net = torch.compile(setup.model) if cfg.trainer.compile else setup.model
    precision = str(cfg.trainer.precision)
    channels_last = _channels_last(cfg, setup.device)
    callbacks = [
        MlflowLogger(run, cfg.trainer.log_every_n_steps),
        Console(
            cfg.trainer.print_every_n_steps,
            cfg.data.batch_size,
            wants_progress_bar(
                cfg.trainer.progress_bar, HydraConfig.get().mode == RunMode.MULTIRUN
            ),
        ),
        _Checkpointer(setup, run, out_dir / CHECKPOINT),
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
            max_rotation=cfg.data.max_rotation,
            max_scale=cfg.data.max_scale,
            label_smoothing=cfg.trainer.label_smoothing,
            scheduler=setup.scheduler,
            callbacks=callbacks,
            start_epoch=start[0],
            start_step=start[1],
            check_every=cfg.trainer.log_every_n_steps,
            cuda_graph=cfg.trainer.cuda_graph,
        )
    test = engine.evaluate(
        net,
        setup.data.test.to(setup.device),
        batch_size=cfg.data.eval_batch_size,
        precision=precision,
        channels_last=channels_last,
        keep_predictions=True,
    )
    log.info(
        f"Test Accuracy of the model on the {test.total} test images: "
        f"{100 * test.correct / max(test.total, 1)} %"
    )
    confusion = plots.confusion_matrix(test.targets, test.predictions, cfg.model.num_classes)
    per_class = {
        f"test_accuracy_class_{k}": v for k, v in plots.per_class_accuracy(confusion).items()
    }
    run.log_metrics({"test_loss": test.loss, "test_accuracy": test.accuracy, **per_class}, step)
    weights = out_dir / "model.ckpt"
    # Saved from the CPU whatever the device, so that it loads on a machine without a GPU.
    checkpoint.write_atomic({k: v.cpu() for k, v in setup.model.state_dict().items()}, weights)
    run.log_artifact(weights, "checkpoints")
    if cfg.mlflow.log_model:  # the tracker builds the model while this process draws
        example = setup.data.test.images[:3, 0].numpy()
        _record_model(cfg, run, weights, example, out_dir / "mlflow_model")
    if cfg.mlflow.log_plots:
        _record_plots(run, test, confusion, setup.data.test.images, out_dir / "plots")
    return test


def _record_plots(
    run: RemoteRun, test: EvalResult, confusion: Tensor, images: Tensor, folder: Path
) -> None:
    """Learning curves (read back from the run, so a resumed run's too), confusion, mistakes."""
    from mnist_exp import plots

    history = run.metric_history(plots.CURVES)
    folder.mkdir(parents=True, exist_ok=True)
    plots.learning_curves(history, folder / "learning_curves.png")
    plots.confusion_plot(confusion, folder / "confusion_matrix.png")
    plots.misclassified_grid(images, test.targets, test.predictions, folder / "misclassified.png")
    run.log_artifacts(folder, "plots")


def _record_model(
    cfg: DictConfig, run: RemoteRun, weights: Path, example: np.ndarray, folder: Path
) -> None:
    """The servable MLflow model of the final weights, as the run's `model` artifact."""
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    target = kwargs.pop("_target_")
    run.log_model(folder, weights, target, kwargs, example)


class _Checkpointer:
    """Engine callback: after each epoch, an atomic resume checkpoint, kept locally and in MLflow.

    It runs after the MLflow logger has flushed the epoch's metrics; the upload is queued
    behind them, so MLflow's copy never claims steps whose losses MLflow does not hold.
    While the tracking server is unreachable the local copy is written all the same.
    """

    def __init__(self, setup: _Setup, run: RemoteRun, path: Path) -> None:
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

    def __init__(self, run: RemoteRun, every: int) -> None:
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
        self.run.sync()


def _channels_last(cfg: DictConfig, device: torch.device) -> bool:
    """Whether this run trains in channels_last: see `engine.trains_channels_last`."""
    from mnist_exp import engine

    return engine.trains_channels_last(
        bool(cfg.trainer.channels_last), device, cfg.data.batch_size, str(cfg.trainer.precision)
    )


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


def _latest_metric(run: RemoteRun, key: str) -> float:
    value = run.metric(key)
    if value is None:
        raise UserError(f"optimized_metric={key!r} was never logged by this run")
    return value


def _log_again(run: RemoteRun, path: Path) -> None:
    """Log the (atomically written) checkpoint again: a stop may have cut its upload short."""
    if path.is_file():
        try:
            run.log_artifact(path, str(CHECKPOINT.parent))
        except Exception as exc:
            log.error(f"could not log {path} to MLflow run {run.run_id}: {exc}")


def _end_quietly(run: RemoteRun, status: str, tags: dict[str, str] | None = None) -> None:
    """Record the end of a failed run without hiding the original error behind a new one."""
    failed = None
    try:
        if tags:
            run.set_tags(tags)
    except Exception as exc:
        failed = exc
    try:
        run.end(status)  # also when the tags failed: it lets the tracker process exit
    except Exception as exc:
        failed = failed or exc
    if failed and not run.gave_up:  # else the error that follows says the server is gone
        log.error(f"could not mark MLflow run {run.run_id} {status}: {failed}")


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
