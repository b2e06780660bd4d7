"""Runs side by side: the params that differ, the metrics, best first; as text, CSV or Markdown.

Runs of one configuration (params alike but for `trainer.seed`) are one row, ranked by their
mean, so that a lucky seed does not decide which configuration comes first.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from mnist_exp import names

if TYPE_CHECKING:
    from mlflow.entities import Run

# The metrics shown beside the one runs are sorted by, when any run has them.
METRICS = tuple(names.OPTIMIZABLE_METRICS)


def best_first(value: float | None, metric: str) -> tuple[bool, float]:
    """Sort key: best first by `metric`'s goal (else higher is better), missing or NaN last."""
    if value is None or math.isnan(value):
        return True, 0.0
    return False, -value if names.OPTIMIZABLE_METRICS.get(metric, "max") == "max" else value


def rank(runs: Sequence[Run], metric: str) -> list[Run]:
    """Best first by `metric` (its goal from OPTIMIZABLE_METRICS); runs without it last."""
    return sorted(runs, key=lambda run: best_first(run.data.metrics.get(metric), metric))


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

    def seed_count(self) -> str:
        """How many distinct seeds the runs trained with (a seed run twice counts once)."""
        return str(len({r.data.params.get(names.SEED_PARAM) for r in self.runs}))

    def status(self) -> str:
        """`FINISHED`, or how many ended each way: `2 FINISHED, 1 FAILED`."""
        counts = Counter(r.info.status for r in self.runs)
        if len(counts) == 1:
            return next(iter(counts))
        return ", ".join(f"{n} {status}" for status, n in counts.most_common())


def grouped(runs: Sequence[Run], metric: str, per_seed: bool = False) -> list[Group]:
    """The runs by configuration (or one group a run, `per_seed`), best mean first."""
    configs: dict[object, list[Run]] = {}
    for i, run in enumerate(runs):
        params = run.data.params.items()
        config = i if per_seed else frozenset((k, v) for k, v in params if k != names.SEED_PARAM)
        configs.setdefault(config, []).append(run)
    groups = [Group(tuple(rank(found, metric))) for found in configs.values()]
    return sorted(groups, key=lambda g: best_first(g.mean(metric), metric))


def swept_overrides(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, str]]]:
    """The override keys whose values differ between runs, and each run's overrides."""
    given = [
        dict(o.partition("=")[::2] for o in r.data.tags.get(names.OVERRIDES_TAG, "").split())
        for r in runs
    ]
    keys = dict.fromkeys(k for overrides in given for k in overrides)
    return [k for k in keys if len({o.get(k) for o in given}) > 1], given


def short_name(overrides: dict[str, str]) -> str:
    """`{"optimizer.lr": "0.003", "data.batch_size": "128"}` -> `lr=0.003,batch_size=128`."""
    return ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides.items())


Cell = Callable[[Group], str]  # a column's cell in a row (a configuration's runs, best first)


def table(
    runs: Sequence[Run], metric: str, per_seed: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Headers and rows, best first, a row per configuration (per run with `per_seed`): the best
    seed's run id and name, status, the params that differ, the metrics any run has (a row's
    mean, and `_std` where a row has several runs), how many runs and distinct seeds a row has."""
    groups = grouped(runs, metric, per_seed)
    keys = sorted({k for run in runs for k in run.data.params})
    differing = [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]
    shown = dict.fromkeys([metric, *METRICS])  # the sorting metric first, once
    metrics = [m for m in shown if any(m in r.data.metrics for r in runs)]
    columns: list[tuple[str, Cell]] = [
        ("run_id", lambda g: g.best.info.run_id),
        ("run_name", lambda g: g.best.info.run_name or ""),
        ("status", Group.status),
        *((p, partial(Group.param, key=p)) for p in differing),
    ]
    if any(names.TRIAL_TAG in r.data.tags for r in runs):  # an Optuna search's trials
        columns += [
            ("trial", lambda g: g.best.data.tags.get(names.TRIAL_TAG, "")),
            ("trial_state", lambda g: trial_state(g.best)),
            ("stopped_at_epoch", lambda g: stopped_at_epoch(g.best)),
        ]
    spread = any(len(g.runs) > 1 for g in groups)
    for m in metrics:
        columns.append((m, _metric(Group.mean, m)))
        if spread:
            columns.append((f"{m}_std", _metric(Group.std, m)))
    if not per_seed:
        columns.append(("runs", lambda g: str(len(g.runs))))
        columns.append(("seeds", Group.seed_count))
    return [h for h, _ in columns], [[cell(g) for _, cell in columns] for g in groups]


def trial_state(run: Run) -> str:
    """How the run's Optuna trial ended, as the study says it: COMPLETE, PRUNED or FAIL."""
    if run.info.status == "FINISHED":
        return "PRUNED" if run.data.tags.get(names.PRUNED_TAG) == "true" else "COMPLETE"
    return "RUNNING" if run.info.status == "RUNNING" else "FAIL"


def stopped_at_epoch(run: Run) -> str:
    """The last epoch the run trained: where it was pruned, else its last epoch logged."""
    epoch = run.data.tags.get(names.PRUNED_AT_EPOCH_TAG) or run.data.metrics.get(names.EPOCH)
    return "" if epoch is None else str(int(float(epoch)))


def render(columns: list[str], rows: list[list[str]], fmt: str) -> str:
    """`fmt` is table (aligned columns), csv or markdown."""
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([columns, *rows])
        return out.getvalue()
    if fmt == "markdown":
        lines = [columns, ["---"] * len(columns), *rows]
        return "".join("| " + " | ".join(cells) + " |\n" for cells in lines)
    widths = [max(len(str(c)) for c in col) for col in zip(columns, *rows, strict=True)]
    return "".join(
        "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() + "\n"
        for cells in [columns, *rows]
    )


def _metric(read: Callable[[Group, str], float | None], metric: str) -> Cell:
    """A cell showing `read(row, metric)`, its mean or standard deviation, to 6 digits."""

    def cell(group: Group) -> str:
        value = read(group, metric)
        return "" if value is None else f"{value:.6g}"

    return cell
