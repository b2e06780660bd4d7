"""Refuse config values that cannot work, before torch is imported and before any run exists."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from mnist_exp.errors import UserError

PRECISIONS = ("32", "bf16-mixed")
DEVICES = ("auto", "cpu", "cuda")
# What `optimized_metric` may name, and whether higher ("max") or lower ("min") is better.
OPTIMIZABLE_METRICS = {
    "test_accuracy": "max",
    "test_loss": "min",
    "val_accuracy": "max",
    "val_loss": "min",
    "train_images_per_s": "max",
}


def check_config(cfg: DictConfig) -> None:
    """Raise `UserError` naming the first key whose value cannot work."""
    _number(cfg, "optimizer.lr", low=0.0, strict=True)
    _integer(cfg, "data.batch_size", low=1)
    _integer(cfg, "data.eval_batch_size", low=1)
    _integer(cfg, "data.val_size", low=0)
    _integer(cfg, "data.max_shift", low=0)
    _integer(cfg, "data.max_train_samples", low=1, optional=True)
    _integer(cfg, "data.max_test_samples", low=1, optional=True)
    _integer(cfg, "trainer.epochs", low=0)
    _integer(cfg, "trainer.seed", low=0)
    _integer(cfg, "trainer.log_every_n_steps", low=1)
    _integer(cfg, "trainer.print_every_n_steps", low=0)
    _integer(cfg, "model.num_classes", low=2)
    precision = str(_get(cfg, "trainer.precision"))
    if precision not in PRECISIONS:
        _refuse("trainer.precision", precision, f"must be one of {', '.join(PRECISIONS)}")
    device = str(_get(cfg, "device.type"))
    if device.split(":")[0] not in DEVICES:
        _refuse("device.type", device, "must be auto, cpu, cuda or cuda:N")
    _integer(cfg, "trainer.num_threads", low=1, optional=True)
    for key in (
        "trainer.deterministic",
        "trainer.channels_last",
        "trainer.compile",
        "data.download",
        "mlflow.log_plots",
        "mlflow.log_model",
    ):
        if not isinstance(_get(cfg, key), bool):
            _refuse(key, _get(cfg, key), "must be true or false")
    if not isinstance(_get(cfg, "trainer.progress_bar"), bool | None):
        _refuse(
            "trainer.progress_bar", _get(cfg, "trainer.progress_bar"), "must be true, false or null"
        )
    metric = _get(cfg, "optimized_metric")
    if metric not in OPTIMIZABLE_METRICS:
        _refuse("optimized_metric", metric, f"must be one of {', '.join(OPTIMIZABLE_METRICS)}")
    if str(metric).startswith("val_") and not _get(cfg, "data.val_size"):
        _refuse("optimized_metric", metric, "is never logged without a split: set data.val_size")


def check_search_space(cfg: DictConfig) -> None:
    """Refuse a sweep whose `hydra.sweeper.params` names a key or group the config lacks."""
    groups = set(_get(cfg, "hydra.runtime.choices") or {})
    for key in _get(cfg, "hydra.sweeper.params") or {}:
        name = str(key).lstrip("+~")
        if name in groups or str(key).startswith("+"):
            continue
        if OmegaConf.select(cfg, name, default=_ABSENT) is _ABSENT:
            raise UserError(
                f"hydra.sweeper.params names {name!r}, which is not a config key or group: "
                f"fix the search space (see `mnist-train --cfg job` for the keys)"
            )


_ABSENT = object()


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _refuse(key: str, value: Any, why: str) -> None:
    raise UserError(f"{key}={value!r} {why}: change it on the command line or in conf/")


def _number(cfg: DictConfig, key: str, *, low: float, strict: bool = False) -> None:
    value = _get(cfg, key)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or value < low or (strict and value == low):
        _refuse(key, value, f"must be a number {'>' if strict else '>='} {low:g}")


def _integer(cfg: DictConfig, key: str, *, low: int, optional: bool = False) -> None:
    value = _get(cfg, key)
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        suffix = " or null" if optional else ""
        _refuse(key, value, f"must be a whole number >= {low}{suffix}")
