"""The objects a run trains, built from its config: data, model, optimizer, scheduler, device."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn import Module
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mnist_exp.config.refusals import refusal
from mnist_exp.errors import UserError, first_line, one_line
from mnist_exp.training import allocator, checkpoint, compute, data, image_folder

log = logging.getLogger("mnist_exp")


@dataclass
class Setup:
    """What `build` made."""

    model: Module
    optimizer: Optimizer
    scheduler: LRScheduler | None
    data: data.Data
    device: torch.device


def build(cfg: DictConfig, state: dict[str, Any] | None, launcher: DictConfig | None) -> Setup:
    """Data, model, optimizer and scheduler; restored from `state` when resuming.

    `launcher` is the sweep's launcher config inside a multirun (None for a single run): a
    parallel job takes its share of the cores.
    """
    allocator.keep_freed_memory()
    device = compute.resolve_device(cfg.device.type)
    threads = cfg.trainer.num_threads
    if not threads:
        cores = share_of_cores(launcher)
        threads = compute.cpu_threads(cfg.data.batch_size, cores) if device.type == "cpu" else cores
    torch.set_num_threads(threads)
    compute.seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    dataset = data.load(
        cfg.data.dataset,
        cfg.data.root,
        download=cfg.data.download,
        val_size=cfg.data.val_size,
        max_train_samples=cfg.data.max_train_samples,
        max_test_samples=cfg.data.max_test_samples,
        seed=cfg.trainer.seed,
        folder=_folder_options(cfg),
    )
    _check_classes(cfg, dataset)
    model = _instantiate(cfg.model, "model").to(device)
    if channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    optimizer = _instantiate(cfg.optimizer, "optimizer")(model.parameters())
    scheduler = None
    if cfg.get("scheduler"):
        steps_per_epoch = -(-len(dataset.train) // cfg.data.batch_size)
        total_steps = max(1, steps_per_epoch * cfg.trainer.epochs)
        try:
            scheduler = _instantiate(cfg.scheduler, "scheduler")(optimizer, total_steps=total_steps)
        except (ValueError, ZeroDivisionError) as exc:  # e.g. a warm-up of exactly one step
            raise UserError(
                f"scheduler: cannot schedule {total_steps} steps with these settings "
                f"({exc or type(exc).__name__}): change scheduler.pct_start, trainer.epochs or "
                f"data.batch_size"
            ) from exc
    if state is not None:
        try:
            checkpoint.restore_training_state(state, model, optimizer, scheduler)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(
                f"trainer.resume: the checkpoint of run {state['run_id']} does not fit this "
                f"model, optimizer and scheduler ({one_line(exc)[:200]})"
            ) from exc
    return Setup(model, optimizer, scheduler, dataset, device)


def _instantiate(node: DictConfig, key: str) -> Any:
    """`instantiate(node)`; a `_target_` that cannot be imported (one's own model, say) is
    refused in one line, not Hydra's four."""
    try:
        return instantiate(node)
    except InstantiationException as exc:
        if not str(exc).startswith("Error locating target"):
            raise
        cause: BaseException = exc
        while cause.__cause__ is not None:  # Hydra's ImportError, then the import's own
            cause = cause.__cause__
        raise UserError(
            f"{key}._target_={node._target_} cannot be imported ({first_line(cause)}): put its "
            f"module on PYTHONPATH (e.g. PYTHONPATH=. mnist-train ...) or install its package"
        ) from exc


def _folder_options(cfg: DictConfig) -> image_folder.FolderOptions:
    """How data=image_folder reads its folder (its keys; other datasets have none)."""
    if cfg.data.dataset != data.IMAGE_FOLDER:
        return image_folder.FolderOptions()
    cache = cfg.data.cache_dir
    return image_folder.FolderOptions(
        cfg.data.test_fraction, cfg.data.image_size, cache and str(cache)
    )


def _check_classes(cfg: DictConfig, dataset: data.Data) -> None:
    """Refuse a model with fewer outputs than the data has classes: its loss cannot be taken."""
    wanted = cfg.model.get("num_classes")
    labels = [dataset.train.labels, dataset.test.labels]
    classes = int(max(int(split.max()) for split in labels if len(split))) + 1
    classes = max(classes, len(dataset.classes))
    if wanted is not None and wanted < classes:
        raise refusal(
            "model.num_classes", wanted, f"must be at least {classes}, the classes in data.dataset"
        )
    if wanted is not None and dataset.classes and wanted > classes:
        log.warning(
            f"model.num_classes={wanted} but {cfg.data.root} has {classes} classes: the other "
            f"outputs are never trained; set model.num_classes={classes}"
        )


def channels_last(cfg: DictConfig, device: torch.device) -> bool:
    """Whether this run trains in channels_last: see `compute.trains_channels_last`."""
    return compute.trains_channels_last(
        bool(cfg.trainer.channels_last), device, cfg.data.batch_size, str(cfg.trainer.precision)
    )


def share_of_cores(launcher: DictConfig | None) -> int:
    """All cores, or in a parallel sweep this job's share, so jobs do not oversubscribe them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if launcher is None:
        return cores
    n_jobs = launcher.get("n_jobs")
    if not n_jobs:  # submitit and Ray reserve cores per job (SLURM also pins them)
        per_job = launcher.get("cpus_per_task") or OmegaConf.select(launcher, "ray.remote.num_cpus")
        return min(cores, per_job or cores)
    if n_jobs < 0:  # joblib: -1 is all cores, -2 all but one, ...
        n_jobs = max(1, cores + 1 + n_jobs)
    return max(1, cores // n_jobs)
