"""Refuse config values that cannot work, before torch loads: what no type of the schema says."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mnist_exp.config import schema
from mnist_exp.config.paths import CONF_DIR
from mnist_exp.config.refusals import MAX_SHOWN, composition_refusal, refusal
from mnist_exp.config.world import World, current_world
from mnist_exp.errors import UserError, first_line
from mnist_exp.names import (
    IMAGE_CHANNELS,
    LOG_CHECKPOINTS,
    MONITORABLE_METRICS,
    OPTIMIZABLE_METRICS,
    PRECISIONS,
    TEST_PREFIX,
)


def check_config(cfg: DictConfig) -> None:
    """Raise `UserError` naming the first key whose value cannot work."""
    _resolve(cfg)
    _fits_schema(cfg)
    _number(cfg, "optimizer.lr", lambda v: v > 0, "must be a finite number > 0")
    _integer(cfg, "data.batch_size", low=1)
    _integer(cfg, "data.eval_batch_size", low=1)
    _integer(cfg, "data.val_size", low=0)
    _integer(cfg, "data.max_shift", low=0, high=MAX_SHIFT)
    _integer(cfg, "data.max_train_samples", low=1, optional=True)
    _integer(cfg, "data.max_test_samples", low=1, optional=True)
    _integer(cfg, "trainer.epochs", low=0)
    _integer(cfg, "trainer.seed", low=0, high=2**64 - 1)  # what torch.manual_seed takes
    _integer(cfg, "trainer.log_every_n_steps", low=1)
    _integer(cfg, "trainer.print_every_n_steps", low=0)
    # A user's own model file need not extend the schema: its keys are checked whatever their type.
    _integer(cfg, "model.num_classes", low=2, high=MAX_CLASSES)
    channels = _get(cfg, "model.channels")
    if channels is not None and not (
        isinstance(channels, ListConfig)
        and len(channels) == 2
        and all(type(c) is int and 1 <= c <= MAX_CHANNELS for c in channels)
    ):
        raise refusal(
            "model.channels", channels, f"must be two whole numbers from 1 to {MAX_CHANNELS}"
        )
    share = "must be a number from 0 to below 1"
    _number(cfg, "model.dropout", lambda v: 0 <= v < 1, share, optional=True)
    _number(cfg, "data.max_scale", lambda v: 0 <= v < 1, share)
    _number(cfg, "trainer.label_smoothing", lambda v: 0 <= v < 1, share)
    degrees = "must be a number of degrees from 0 to 180"
    _number(cfg, "data.max_rotation", lambda v: 0 <= v <= 180, degrees)
    precision = _get(cfg, "trainer.precision")
    if str(precision) not in PRECISIONS:
        raise refusal("trainer.precision", precision, f"must be one of {', '.join(PRECISIONS)}")
    device = _get(cfg, "device.type")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device)):
        raise refusal("device.type", device, "must be auto, cpu, cuda or cuda:N")
    _integer(cfg, "trainer.num_threads", low=1, high=MAX_THREADS, optional=True)
    checkpoints = _get(cfg, "mlflow.log_checkpoints")
    if str(checkpoints) not in LOG_CHECKPOINTS:
        raise refusal(
            "mlflow.log_checkpoints", checkpoints, f"must be one of {', '.join(LOG_CHECKPOINTS)}"
        )
    seconds = "must be a number of seconds above 0"
    _number(cfg, "mlflow.system_metrics_interval_s", lambda v: v > 0, seconds)
    _integer(cfg, "mlflow.retry_for_s", low=0)
    _integer(cfg, "mlflow.request_max_retries", low=0)
    _integer(cfg, "mlflow.request_timeout_s", low=1)
    metric = _get(cfg, "optimized_metric")
    if not isinstance(metric, str) or metric not in OPTIMIZABLE_METRICS:
        why = f"must be one of {', '.join(OPTIMIZABLE_METRICS)}"
        raise refusal("optimized_metric", metric, why)
    if metric.startswith("val_") and not _get(cfg, "data.val_size"):
        why = "is never logged without a split: set data.val_size"
        raise refusal("optimized_metric", metric, why)
    _check_monitor(cfg)
    between = "must be a number between 0 and 1"
    if _get(cfg, "scheduler"):
        _number(cfg, "scheduler.pct_start", lambda v: 0 < v < 1, between, optional=True)
    if OmegaConf.is_missing(cfg.data, "root"):
        raise refusal("data.root", "???", "must name the folder of your images (data.root=DIR)")
    if _get(cfg, "data.test_fraction") is not None:  # data=image_folder
        _number(cfg, "data.test_fraction", lambda v: 0 < v < 1, between)
        _integer(cfg, "data.image_size", low=MIN_IMAGE_SIZE, high=MAX_IMAGE_SIZE)
        channels = _get(cfg, "data.channels")
        if channels is not None and (type(channels) is not int or channels not in IMAGE_CHANNELS):
            allowed = ", ".join(f"{n} ({kind})" for n, kind in IMAGE_CHANNELS.items())
            why = f"must be {allowed} or null (3 if any image has colour, else 1)"
            raise refusal("data.channels", channels, why)
    if "image_size" in cfg.model:  # after data.image_size, which it follows (own models: optional)
        _integer(cfg, "model.image_size", low=MIN_IMAGE_SIZE, high=MAX_IMAGE_SIZE)
    if "in_channels" in cfg.model:  # null: the data's
        _integer(cfg, "model.in_channels", low=1, high=MAX_CHANNELS, optional=True)
    for key in ("data.dataset", "data.root", "mlflow.experiment_name", "mlflow.tracking_uri"):
        if not str(_get(cfg, key)).strip():
            raise refusal(key, _get(cfg, key), "must not be blank")
    name = _get(cfg, "mlflow.run_name")
    if name is not None and not str(name).strip():
        why = "must not be blank (null: named after the overrides)"
        raise refusal("mlflow.run_name", name, why)
    _check_world(cfg, current_world())


def _check_monitor(cfg: DictConfig) -> None:
    """`trainer.monitor` names a metric of every epoch, not the test set's; with early stopping,
    one that this run logs."""
    metric = _get(cfg, "trainer.monitor")
    if isinstance(metric, str) and metric.startswith(TEST_PREFIX):
        why = (
            "must be a metric of every epoch, not the test set's (measured once, after training, "
            "it must not choose the model): monitor val_accuracy or val_loss, with data.val_size"
        )
        raise refusal("trainer.monitor", metric, why)
    if not isinstance(metric, str) or metric not in MONITORABLE_METRICS:
        why = f"must be a metric of every epoch: one of {', '.join(MONITORABLE_METRICS)}"
        raise refusal("trainer.monitor", metric, why)
    _integer(cfg, "trainer.early_stopping.patience", low=1, optional=True)
    _number(cfg, "trainer.early_stopping.min_delta", lambda v: v >= 0, "must be a number >= 0")
    patience = _get(cfg, "trainer.early_stopping.patience")
    if patience is not None and metric.startswith("val_") and not _get(cfg, "data.val_size"):
        why = f"must watch a metric that is logged: trainer.monitor={metric} needs data.val_size"
        raise refusal("trainer.early_stopping.patience", patience, why)


def check_launch(args: list[str], world: World) -> None:
    """Refuse a sweep launched as several processes (torchrun): each would run all of it."""
    if world.size > 1 and {"-m", "--multirun"} & set(args):
        raise UserError(
            f"-m: a sweep cannot run as {world.size} processes (torchrun), each would run all "
            f"of it: run the sweep without torchrun, or one run with torchrun"
        )


def _check_world(cfg: DictConfig, world: World) -> None:
    """Refuse what a data-parallel run of `world.size` processes cannot do."""
    if world.size == 1:
        return
    batch = _get(cfg, "data.batch_size")
    if batch % world.size:
        why = f"must be a multiple of {world.size}, to split among torchrun's processes"
        raise refusal("data.batch_size", batch, why)
    device = _get(cfg, "device.type")
    if str(device).startswith("cuda:"):
        why = f"would put all {world.size} processes (torchrun) on one GPU: set device=cuda"
        raise refusal("device.type", device, why)
    if _get(cfg, "trainer.compile"):
        raise UserError(
            f"trainer.compile=true cannot run as {world.size} processes (torchrun): set it false"
        )


def check_overrides(args: list[str]) -> None:
    """Refuse what Hydra would take or answer with a stack trace: a group set to a non-name or a
    schema (`device=null`, `data=base_data`), a flag to other than true or false (`=2`)."""
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException:
            continue
        if override.is_delete() or override.is_sweep_override():
            continue
        key, value = override.key_or_group, override.value()
        if key in GROUPS and (not isinstance(value, str | list) or value in schema.schema_names()):
            raise UserError(
                f"{key}={override.get_value_element_as_str()} is not an option of {key}: "
                f"name one of {', '.join(GROUPS[key])}"
            )
        interpolation = isinstance(value, str) and "${" in value
        if key in FLAGS and not isinstance(value, bool | None) and not interpolation:
            raise refusal(key, value, "must be true or false" + (" or null" if FLAGS[key] else ""))


def check_search_space(cfg: DictConfig, keys: Iterable[str] | None = None) -> None:
    """Refuse a sweep whose `hydra.sweeper.params` (or a search's `keys`) name no key or group."""
    groups = set(_get(cfg, "hydra.runtime.choices") or {})
    for key in _get(cfg, "hydra.sweeper.params") or {} if keys is None else keys:
        name = str(key).lstrip("+~")
        if name in groups or str(key).startswith("+"):
            continue
        if OmegaConf.select(cfg, name, default=_ABSENT) is _ABSENT:
            raise UserError(
                f"hydra.sweeper.params names {name!r}, which is not a config key or group: "
                f"fix the search space (see `mnist-train --cfg job` for the keys)"
            )


_ABSENT = object()
# The config groups and their options, as the files in conf/ say.
GROUPS = {
    group.name: sorted(f.stem for f in group.glob("*.yaml"))
    for group in sorted(CONF_DIR.iterdir())
    if group.is_dir()
}
FLAGS = schema.bool_keys()  # `group.key` -> whether null is allowed too
MAX_SHIFT = 27  # pixels: a larger shift moves every 28x28 image out of its frame
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024  # pixels a side of data=image_folder's images (model's)
MAX_CLASSES, MAX_CHANNELS, MAX_THREADS = 10_000, 1024, 1024
MAX_INT = 2**31 - 1  # counts beyond this are typos, and overflow torch's index arithmetic


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _resolve(cfg: DictConfig) -> None:
    """Refuse an interpolation (`${...}`) that does not resolve, naming its key."""
    for key in cfg:
        if key == "hydra":
            continue
        try:
            node = cfg[key]
            if isinstance(node, DictConfig | ListConfig):
                OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as exc:
            reason = first_line(exc)[: MAX_SHOWN * 2]
            where = exc.full_key if isinstance(exc.full_key, str) and exc.full_key else str(key)
            raise UserError(
                f"{where}: the config does not resolve ({reason}): fix the ${{...}} value"
            ) from exc


def _fits_schema(cfg: DictConfig) -> None:
    """Each closed group fits its schema, keys added with `+` and a user's own option file too."""
    for group, group_schema in schema.CLOSED_GROUPS.items():
        node = _get(cfg, group)
        if not isinstance(node, DictConfig):
            continue  # a group not chosen: the range checks name the key it lacks
        try:
            # As plain values: a node typed by a narrower schema cannot merge into a wider one.
            values = OmegaConf.to_container(node, resolve=False)
            OmegaConf.merge({group: OmegaConf.structured(group_schema)}, {group: values})
        except OmegaConfBaseException as exc:
            raise composition_refusal(exc) from None


def _is_number(value: Any) -> bool:
    """A real, finite number (not a bool, nor an int too large to be a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _number(
    cfg: DictConfig, key: str, fits: Callable[[Any], bool], why: str, *, optional: bool = False
) -> None:
    value = _get(cfg, key)
    if not (optional and value is None) and not (_is_number(value) and fits(value)):
        raise refusal(key, value, why)


def _integer(
    cfg: DictConfig, key: str, *, low: int, high: int = MAX_INT, optional: bool = False
) -> None:
    value = _get(cfg, key)
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        suffix = " or null" if optional else ""
        raise refusal(key, value, f"must be a whole number from {low} to {high}{suffix}")
