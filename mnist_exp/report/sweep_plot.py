"""A sweep's picture: the optimised metric against each swept override, one panel each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mnist_exp.report.table import swept_overrides

if TYPE_CHECKING:
    from mlflow.entities import Run


def plot_sweep(runs: Sequence[Run], metric: str, path: Path) -> bool:
    """Save `metric` against each swept override, one panel each, as a PNG; False if none."""
    scored = [r for r in runs if metric in r.data.metrics]
    params, given = swept_overrides(scored)
    if not params:
        return False
    from matplotlib.figure import Figure  # no pyplot: no global state to close

    fig = Figure(figsize=(4 * len(params), 3.5))
    axes = fig.subplots(1, len(params), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        values = [overrides.get(param, "") for overrides in given]
        ys = [r.data.metrics[metric] for r in scored]
        try:
            numbers = [float(v) for v in values]
        except ValueError:  # not all numbers: a tick each
            labels = sorted(set(values))
            ax.scatter([labels.index(v) for v in values], ys)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        else:
            ax.scatter(numbers, ys)
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 10:
                ax.set_xscale("log")
        ax.set(xlabel=param, ylabel=metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} of {len(scored)} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True
