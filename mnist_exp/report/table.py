"""Runs side by side: the params that differ, the metrics, best first; as text, CSV or Markdown."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mnist_exp import names

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
    sign = -1 if names.OPTIMIZABLE_METRICS.get(metric, "max") == "max" else 1

    def key(run: Run) -> tuple[bool, float]:
        value = run.data.metrics.get(metric)
        if value is None or math.isnan(value):
            return True, 0.0
        return False, sign * value

    return sorted(runs, key=key)


def table(runs: Sequence[Run], metric: str) -> tuple[list[str], list[list[str]]]:
    """Columns and rows: run, name, status, the differing params, the metrics any run has."""
    params = differing_params(runs)
    metrics = [
        m for m in dict.fromkeys([metric, *METRICS]) if any(m in r.data.metrics for r in runs)
    ]
    columns = ["run_id", "run_name", "status", *params, *metrics]
    rows = [
        [
            run.info.run_id,
            run.info.run_name or "",
            run.info.status,
            *(run.data.params.get(p, "") for p in params),
            *(_number(run.data.metrics.get(m)) for m in metrics),
        ]
        for run in rank(runs, metric)
    ]
    return columns, rows


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


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
