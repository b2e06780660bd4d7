"""The objects a run trains, built from its config: data, model, optimizer, scheduler, device."""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn import Module
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mnist_exp import names
from mnist_exp.config.refusals import refusal
from mnist_exp.config.world import ONE_PROCESS, SWEEP_CORES_ENV, World, available_cores
from mnist_exp.errors import UserError, first_line, one_line
from mnist_exp.training import allocator, checkpoint, compute, data, image_folder
from mnist_exp.training.monitor import Monitor

log = logging.getLogger("mnist_exp")


@dataclass
class Setup:
    """What `build` made."""

    model: Module
    optimizer: Optimizer
    scheduler: LRScheduler | None
    data: data.Data
    device: torch.device
    monitor: Monitor | None  # the best epoch's: with a validation split or early stopping
    threads: int  # torch's CPU threads

    def tags(self) -> dict[str, str]:
        """What the run records of where it trains: a sweep's jobs get a GPU, a share of cores."""
        return {names.DEVICE_TAG: str(self.device), names.TORCH_THREADS_TAG: str(self.threads)}


def build(
    cfg: DictConfig,
    state: dict[str, Any] | None,
    launcher: DictConfig | None,
    job_num: int = 0,
    world: World = ONE_PROCESS,
) -> Setup:
    """Data, model, optimizer, scheduler and the best epoch's monitor; restored from `state`
    when resuming.

    `launcher` is the sweep's launcher config inside a multirun (None for a single run): a
    parallel job takes its share of the cores, and job `job_num` its GPU (`job_device`). So
    does each rank of a data-parallel `world` on its machine (its `local_rank`).
    """
    allocator.keep_freed_memory()
    device = device_of(cfg, launcher, job_num, world)
    threads = cfg.trainer.num_threads
    if not threads:
        cores = max(1, share_of_cores(launcher) // world.local_size)
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
    model = _instantiate(model_arguments(cfg, dataset.channels), "model").to(device)
    if channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    check_fit(cfg, model, dataset, device)
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
    monitor = _monitor(cfg, model)
    if state is not None:
        try:
            checkpoint.restore_training_state(state, model, optimizer, scheduler, monitor)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(
                f"trainer.resume: the checkpoint of run {state['run_id']} does not fit this "
                f"model, optimizer and scheduler ({one_line(exc)[:200]})"
            ) from exc
        if monitor is not None and "monitor" not in state:
            log.warning(
                f"the checkpoint of run {state['run_id']} was written by older code, without a "
                f"best epoch: the best {monitor.metric} is looked for after epoch {state['epoch']}"
            )
    return Setup(model, optimizer, scheduler, dataset, device, monitor, threads)


def device_of(
    cfg: DictConfig, launcher: DictConfig | None, job_num: int, world: World
) -> torch.device:
    """The device this process trains on: `device.type`, a parallel job's GPU (`job_device`),
    or the GPU of a data-parallel rank on its machine (its `local_rank`)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = str(cfg.device.type)
    if world.size > 1 and name in ("auto", "cuda") and gpus:
        if world.local_size > gpus:  # NCCL refuses two ranks on one GPU, and says so obscurely
            raise UserError(
                f"{world.local_size} processes on this machine but {gpus} GPU(s): start at most "
                f"{gpus} (torchrun --nproc_per_node), or set device=cpu"
            )
        name = f"cuda:{world.local_rank % gpus}"
    return compute.resolve_device(job_device(name, launcher, job_num, gpus))


def _monitor(cfg: DictConfig, model: Module) -> Monitor | None:
    """The monitor of `trainer.monitor`, for a run with a validation split or early stopping:
    without either, a run keeps no best epoch, as before there were any."""
    stopping = cfg.trainer.early_stopping
    if not cfg.data.val_size and stopping.patience is None:
        return None
    metric = str(cfg.trainer.monitor)
    mode = names.MONITORABLE_METRICS[metric]
    return Monitor(model, metric, mode, patience=stopping.patience, min_delta=stopping.min_delta)


def _instantiate(node: Mapping[str, Any], key: str) -> Any:
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
            f"{key}._target_={node['_target_']} cannot be imported ({first_line(cause)}): put its "
            f"module on PYTHONPATH (e.g. PYTHONPATH=. mnist-train ...) or install its package"
        ) from exc


def _folder_options(cfg: DictConfig) -> image_folder.FolderOptions:
    """How data=image_folder reads its folder (its keys; other datasets have none)."""
    if cfg.data.dataset != data.IMAGE_FOLDER:
        return image_folder.FolderOptions()
    cache = cfg.data.cache_dir
    return image_folder.FolderOptions(
        cfg.data.test_fraction, cfg.data.image_size, cache and str(cache), cfg.data.channels
    )


IMAGE_SIZE = "image_size"  # the model key that follows data.image_size
IN_CHANNELS = "in_channels"  # the model key that follows the data's channels when null


def model_arguments(cfg: DictConfig, channels: int) -> dict[str, Any]:
    """The model's `_target_` and arguments: the `model` keys, resolved, `in_channels` null made
    the data's `channels`; but `image_size` and `in_channels` for a class of one's own whose
    `__init__` does not take them (the project's files give every model the keys, and such a
    model was built without them before the ConvNet was sized by them)."""
    tree = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(tree, dict)
    arguments = {str(k): v for k, v in tree.items()}
    for key in (IMAGE_SIZE, IN_CHANNELS):
        if key in arguments and not _takes(str(arguments["_target_"]), key):
            del arguments[key]
    if arguments.get(IN_CHANNELS, channels) is None:
        arguments[IN_CHANNELS] = channels
    return arguments


def _takes(target: str, argument: str) -> bool:
    """Whether `target` (a class or function) takes `argument`; yes when it cannot be told."""
    hydra_log = logging.getLogger("hydra.utils")  # get_object logs a failure before raising it
    level = hydra_log.level
    hydra_log.setLevel(logging.CRITICAL)
    try:
        parameters = inspect.signature(get_object(target)).parameters.values()
    except Exception:  # not importable, or no signature: instantiate says what is wrong
        return True
    finally:
        hydra_log.setLevel(level)
    return any(p.name == argument or p.kind is p.VAR_KEYWORD for p in parameters)


# What torch says when a tensor's shape does not fit a layer (a linear layer's inputs, a
# convolution's channels, a view, a pool on too small an image); other errors are the model's.
_SHAPE_ERROR = re.compile(r"shape|size|channel|dimension|\bdim\b", re.IGNORECASE)


def check_fit(cfg: DictConfig, model: Module, dataset: data.Data, device: torch.device) -> None:
    """Refuse a model that does not fit the data, in one line before any run exists: two
    training images through it on `device`, without gradients or RNG draws, must give one
    score per class each. Its errors other than a shape's are left for the run to record."""
    if not len(dataset.train):
        return
    batch = dataset.train.inputs(torch.arange(min(2, len(dataset.train)))).to(device)
    image = "x".join(map(str, batch.shape[1:]))  # channels x height x width
    target = cfg.model._target_
    was_training = model.training
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    try:
        with torch.no_grad(), rng:
            outputs = model.eval()(batch)
    except (RuntimeError, ValueError, IndexError) as exc:
        if isinstance(exc, torch.OutOfMemoryError) or not _SHAPE_ERROR.search(str(exc)):
            return
        raise UserError(
            f"model {target} does not fit the data's {image} images ({one_line(exc)[:160]}): "
            f"{_fit_fix(cfg, batch.shape[1], batch.shape[-1])}"
        ) from exc
    finally:
        model.train(was_training)
    classes = class_count(dataset)
    shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else None
    if shape is None or len(shape) != 2 or shape[0] != len(batch) or shape[1] < classes:
        got = "x".join(map(str, shape)) if shape is not None else f"a {type(outputs).__name__}"
        raise UserError(
            f"model {target} returns {got} for {len(batch)} images of {image}, not "
            f"{len(batch)}x{classes} (a score per image and class): make its last layer give "
            f"model.num_classes outputs"
        )


def _fit_fix(cfg: DictConfig, channels: int, side: int) -> str:
    """How to make the model fit the data's images, `channels` x `side` x `side` pixels."""
    arguments = model_arguments(cfg, channels)
    if arguments.get(IN_CHANNELS, channels) != channels:
        return f"set model.{IN_CHANNELS}=null (the data's channels) or {channels}"
    if IN_CHANNELS not in arguments and channels != 1:
        return (
            f"make its first layer take {channels} channels (take {IN_CHANNELS} as the ConvNet "
            f"does), or set data.channels=1"
        )
    if IMAGE_SIZE in arguments:
        if cfg.model.get(IMAGE_SIZE) != side:
            return f"set model.{IMAGE_SIZE}={side}, the data's size"
        return f"make its layers fit {side}x{side} images (it was given {IMAGE_SIZE}={side})"
    also = ", or set data.image_size to the size it takes" if IMAGE_SIZE in cfg.data else ""
    return (
        f"make its layers fit {side}x{side} images: take {IMAGE_SIZE} as the ConvNet does "
        f"(README: Your own model){also}"
    )


def class_count(dataset: data.Data) -> int:
    """The classes in the data: its labels' largest index plus one, or its named classes."""
    labels = [dataset.train.labels, dataset.test.labels]
    classes = int(max(int(split.max()) for split in labels if len(split))) + 1
    return max(classes, len(dataset.classes))


def _check_classes(cfg: DictConfig, dataset: data.Data) -> None:
    """Refuse a model with fewer outputs than the data has classes: its loss cannot be taken."""
    wanted = cfg.model.get("num_classes")
    classes = class_count(dataset)
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


# Hydra's launchers that run a sweep's jobs side by side on this machine, seeing every GPU
# (SLURM and Ray give each job its own GPUs, through CUDA_VISIBLE_DEVICES).
LOCAL_LAUNCHERS = ("JoblibLauncher", "submitit_launcher.LocalLauncher")


def job_device(name: str, launcher: DictConfig | None, job_num: int, gpus: int) -> str:
    """The device of sweep job `job_num` on a machine with `gpus` GPUs: in parallel local jobs,
    GPU `job_num mod gpus` for `device=auto` or `cuda` (else all would share the first);
    `name` as asked otherwise (`cuda:N`, `cpu`, a single run, one GPU)."""
    if launcher is None or gpus < 2 or name not in ("auto", "cuda"):
        return name
    target = str(launcher.get("_target_", ""))
    if not target.endswith(LOCAL_LAUNCHERS) or launcher.get("n_jobs") == 1:
        return name
    return f"cuda:{job_num % gpus}"


def share_of_cores(launcher: DictConfig | None) -> int:
    """All cores, or in a parallel sweep this job's share, so jobs do not oversubscribe them."""
    cores = available_cores()
    if launcher is None:
        return cores
    n_jobs = launcher.get("n_jobs")
    if not n_jobs:  # submitit and Ray reserve cores per job (SLURM also pins them)
        per_job = launcher.get("cpus_per_task") or OmegaConf.select(launcher, "ray.remote.num_cpus")
        return min(cores, per_job or cores)
    # joblib's workers see their share already in OMP_NUM_THREADS: divide the sweep's cores.
    cores = int(os.environ.get(SWEEP_CORES_ENV) or cores)
    if n_jobs < 0:  # joblib: -1 is all cores, -2 all but one, ...
        n_jobs = max(1, cores + 1 + n_jobs)
    return max(1, cores // n_jobs)
