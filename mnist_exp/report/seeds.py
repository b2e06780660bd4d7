"""Runs of one configuration: params alike but for `trainer.seed`, taken together.

`mnist-compare` shows a group's metrics as mean, standard deviation and count, and ranks the
groups by the mean, so that a lucky seed does not decide which configuration comes first.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mnist_exp import names

if TYPE_CHECKING:
    from mlflow.entities import Run


def best_first(value: float | None, metric: str) -> tuple[bool, float]:
    """Sort key: best first by `metric`'s goal (`OPTIMIZABLE_METRICS`, else higher is
    better); a missing or NaN value last."""
    if value is None or math.isnan(value):
        return True, 0.0
    return False, -value if names.OPTIMIZABLE_METRICS.get(metric, "max") == "max" else value


@dataclass(frozen=True)
class Group:
    """The runs of one configuration, best seed first."""

    runs: tuple[Run, ...]

    @property
    def best(self) -> Run:
        return self.runs[0]

    def values(self, metric: str) -> list[float]:
        """The metric's value in each run that has one (NaN included: a seed that diverged)."""
        return [v for r in self.runs if (v := r.data.metrics.get(metric)) is not None]

    def mean(self, metric: str) -> float | None:
        values = self.values(metric)
        return math.fsum(values) / len(values) if values else None

    def std(self, metric: str) -> float | None:
        """The sample standard deviation; None under two values."""
        values, mean = self.values(metric), self.mean(metric)
        if len(values) < 2 or mean is None:
            return None
        return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))

    def param(self, key: str) -> str:
        """The runs' value of `key`; for the seed, each seed's, as `0,1,2`."""
        values = {r.data.params.get(key, "") for r in self.runs}
        return ",".join(sorted(values, key=lambda v: (len(v), v)))  # 2 before 10

    def status(self) -> str:
        """`FINISHED`, or how many ended each way: `2 FINISHED, 1 FAILED`."""
        counts = Counter(r.info.status for r in self.runs)
        if len(counts) == 1:
            return next(iter(counts))
        return ", ".join(f"{n} {status}" for status, n in counts.most_common())


def grouped(runs: Sequence[Run], metric: str, per_seed: bool = False) -> list[Group]:
    """The runs by configuration (or one group a run, `per_seed`), best mean first."""
    if per_seed:
        configs: dict[object, list[Run]] = {i: [run] for i, run in enumerate(runs)}
    else:
        configs = {}
        for run in runs:
            params = run.data.params.items()
            config = frozenset((k, v) for k, v in params if k != names.SEED_PARAM)
            configs.setdefault(config, []).append(run)
    groups = [
        Group(tuple(sorted(found, key=lambda r: best_first(r.data.metrics.get(metric), metric))))
        for found in configs.values()
    ]
    return sorted(groups, key=lambda g: best_first(g.mean(metric), metric))
