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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        values = [overrides.get(param, "") for overrides in given]
        ys = [r.data.metrics[metric] for r in scored]
        numbers = [n for n in map(_float, values) if n is not None]
        if len(numbers) == len(values):
            ax.scatter(numbers, ys)
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 10:
                ax.set_xscale("log")
        else:
            labels = sorted(set(values))
            ax.scatter([labels.index(v) for v in values], ys)
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} of {len(scored)} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None
