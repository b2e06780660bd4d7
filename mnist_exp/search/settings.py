"""The sweeper's settings (`hydra.sweeper.*`), checked, and the sampler and pruner they name."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig
from optuna.pruners import BasePruner, HyperbandPruner, MedianPruner, NopPruner
from optuna.samplers import BaseSampler, RandomSampler, TPESampler

from mnist_exp.config.refusals import refusal
from mnist_exp.errors import UserError
from mnist_exp.names import OPTIMIZABLE_METRICS

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = {"max": "maximize", "min": "minimize"}  # OPTIMIZABLE_METRICS' goal -> Optuna's
PER_EPOCH = ("val_accuracy", "val_loss", "train_images_per_s")  # what a trial is pruned on


@dataclass(frozen=True)
class Settings:
    """`hydra.sweeper.*` of conf/hydra/sweeper/optuna.yaml, each value checked."""

    study_name: str
    storage: str
    direction: str  # maximize or minimize, agreeing with optimized_metric
    n_trials: int
    n_jobs: int
    sampler: str
    seed: int
    pruner: str
    pruner_startup_trials: int
    pruner_warmup_epochs: int
    epochs: int  # trainer.epochs: hyperband's largest budget
    heartbeat_s: int
    params: dict[str, str]

    @classmethod
    def of(cls, sweeper: DictConfig, cfg: DictConfig) -> Settings:
        """From `hydra.sweeper` and the sweep's or job's config; `UserError` names a bad value."""
        metric = str(cfg.optimized_metric)
        goal = DIRECTIONS[OPTIMIZABLE_METRICS[metric]] if metric in OPTIMIZABLE_METRICS else None
        direction = sweeper.get("direction") or goal
        if not isinstance(direction, str) or direction not in DIRECTIONS.values():
            raise _refused(sweeper, "direction", "must be maximize, minimize or null")
        if goal is not None and direction != goal:
            raise _refused(
                sweeper, "direction", f"does not suit optimized_metric={metric}: use {goal} or null"
            )
        name = _text(sweeper, "study_name")
        if "'" in name or "\\" in name:  # MLflow finds the study's parent run by a filter on it
            raise _refused(sweeper, "study_name", "must not hold a quote or a backslash")
        settings = cls(
            study_name=name,
            storage=_text(sweeper, "storage"),
            direction=direction,
            n_trials=_whole(sweeper, "n_trials", low=1),
            n_jobs=_whole(sweeper, "n_jobs", low=1),
            sampler=_one_of(sweeper, "sampler", SAMPLERS),
            seed=_whole(sweeper, "seed", low=0),
            pruner=_one_of(sweeper, "pruner", PRUNERS),
            pruner_startup_trials=_whole(sweeper, "pruner_startup_trials", low=0),
            pruner_warmup_epochs=_whole(sweeper, "pruner_warmup_epochs", low=0),
            epochs=int(cfg.trainer.epochs),
            heartbeat_s=_whole(sweeper, "heartbeat_s", low=1),
            params={str(k): str(v) for k, v in (sweeper.get("params") or {}).items()},
        )
        if settings.pruner != "none" and metric not in PER_EPOCH:
            why = (
                f"needs an optimized_metric measured every epoch ({', '.join(PER_EPOCH[:2])}), "
                f"not {metric}: set data.val_size and optimized_metric=val_accuracy, or use none"
            )
            raise _refused(sweeper, "pruner", why)
        return settings

    def sampler_for(self, trial_number: int) -> BaseSampler:
        """Seeded by `seed` and the trial's number: reproducible, and unlike another command's."""
        seed = (self.seed * 1_000_003 + trial_number) % 2**32
        if self.sampler == "random":
            return RandomSampler(seed=seed)
        return TPESampler(seed=seed)

    def make_pruner(self) -> BasePruner:
        """Optuna's pruner by name; a trial reports its metric once an epoch (step = epoch)."""
        first = self.pruner_warmup_epochs + 1  # the first epoch a trial may be stopped after
        if self.pruner == "median":
            return MedianPruner(n_startup_trials=self.pruner_startup_trials, n_warmup_steps=first)
        if self.pruner == "hyperband":
            top = max(self.epochs, first)
            return HyperbandPruner(min_resource=first, max_resource=top, reduction_factor=3)
        return NopPruner()


def _refused(sweeper: DictConfig, key: str, why: str) -> UserError:
    return refusal(f"hydra.sweeper.{key}", sweeper.get(key), why)


def _text(sweeper: DictConfig, key: str) -> str:
    value = sweeper.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _refused(sweeper, key, "must be a non-blank text")
    return value


def _whole(sweeper: DictConfig, key: str, *, low: int) -> int:
    value = sweeper.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _refused(sweeper, key, f"must be a whole number from {low}")
    return value


def _one_of(sweeper: DictConfig, key: str, options: tuple[str, ...]) -> str:
    value = sweeper.get(key)
    if value not in options:
        raise _refused(sweeper, key, f"must be one of {', '.join(options)}")
    return str(value)
