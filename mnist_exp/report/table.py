"""Runs side by side: the params that differ, the metrics, best first; as text, CSV or Markdown.

A row is a configuration, its seeds' metrics as mean, standard deviation and count (see
`seeds`), or with `per_seed` a run. Each column is a `Column`: a header and how its cell is
read from a row's runs.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from mnist_exp import names
from mnist_exp.report.seeds import Group, best_first, grouped

if TYPE_CHECKING:
    from mlflow.entities import Run

# The metrics shown beside the one runs are sorted by, when any run has them.
METRICS = (
    names.TEST_ACCURACY,
    names.TEST_LOSS,
    names.VAL_ACCURACY,
    names.VAL_LOSS,
    names.TRAIN_IMAGES_PER_S,
)


def differing_params(runs: Sequence[Run]) -> list[str]:
    """Param keys whose value is not the same in every run, in sorted order."""
    keys = sorted({k for run in runs for k in run.data.params})
    return [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]


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


def rank(runs: Sequence[Run], metric: str) -> list[Run]:
    """Best first by `metric` (its goal from OPTIMIZABLE_METRICS); runs without it last."""
    return sorted(runs, key=lambda run: best_first(run.data.metrics.get(metric), metric))


@dataclass(frozen=True)
class Column:
    """One column: its header, and its cell in a row (a configuration's runs, best first)."""

    header: str
    cell: Callable[[Group], str]


def table(
    runs: Sequence[Run], metric: str, per_seed: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Headers and rows, best first: a row per configuration (per run with `per_seed`)."""
    groups = grouped(runs, metric, per_seed)
    shown = columns_for(runs, groups, metric, per_seed)
    return [c.header for c in shown], [[c.cell(g) for c in shown] for g in groups]


def columns_for(
    runs: Sequence[Run], groups: list[Group], metric: str, per_seed: bool
) -> list[Column]:
    """The best seed's run id and name, the runs' status, the params that differ, the metrics
    any run has (a row's mean), each with its standard deviation where a row has several
    seeds, and how many seeds a row has (not `per_seed`: a row is a run there)."""
    metrics = [
        m for m in dict.fromkeys([metric, *METRICS]) if any(m in r.data.metrics for r in runs)
    ]
    spread = any(len(g.runs) > 1 for g in groups)
    shown = [
        Column("run_id", lambda g: g.best.info.run_id),
        Column("run_name", lambda g: g.best.info.run_name or ""),
        Column("status", Group.status),
        *(Column(p, partial(Group.param, key=p)) for p in differing_params(runs)),
    ]
    if any(names.TRIAL_TAG in r.data.tags for r in runs):  # an Optuna search's trials
        shown += [
            Column("trial", lambda g: g.best.data.tags.get(names.TRIAL_TAG, "")),
            Column("trial_state", lambda g: trial_state(g.best)),
            Column("stopped_at_epoch", lambda g: stopped_at_epoch(g.best)),
        ]
    for m in metrics:
        shown.append(Column(m, _metric(Group.mean, m)))
        if spread:
            shown.append(Column(f"{m}_std", _metric(Group.std, m)))
    if not per_seed:
        shown.append(Column("seeds", lambda g: str(len(g.runs))))
    return shown


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


def _metric(read: Callable[[Group, str], float | None], metric: str) -> Callable[[Group], str]:
    """A cell showing `read(row, metric)`: its mean, or its standard deviation."""
    return lambda group: _number(read(group, metric))


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
