"""`python -m mnist_exp.compare` (also `mnist-compare`): runs side by side, best first.

Shows the runs of a sweep (by its parent run id; by default the latest sweep) or of a whole
experiment: the params that differ between them and the key metrics, sorted by the
optimised metric; as an aligned table, CSV or Markdown. Also draws a sweep's picture.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mnist_exp.validation import OPTIMIZABLE_METRICS

METRICS = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_images_per_s")
SWEEP_TAG = "mnist_exp.sweep"
METRIC_TAG = "mnist_exp.optimized_metric"


def sweep_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """The child runs of a sweep's parent run, in the order they started."""
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )


def latest_sweep(client: MlflowClient, experiment_id: str) -> Run | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def differing_params(runs: Sequence[Run]) -> list[str]:
    """Param keys whose value is not the same in every run, in sorted order."""
    keys = sorted({k for run in runs for k in run.data.params})
    return [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]


def swept_overrides(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, str]]]:
    """The override keys whose values differ between runs, and each run's overrides."""
    given = [
        dict(o.partition("=")[::2] for o in r.data.tags.get("mnist_exp.overrides", "").split())
        for r in runs
    ]
    keys = dict.fromkeys(k for overrides in given for k in overrides)
    return [k for k in keys if len({o.get(k) for o in given}) > 1], given


def rank(runs: Sequence[Run], metric: str) -> list[Run]:
    """Best first by `metric` (its goal from OPTIMIZABLE_METRICS); runs without it last."""
    sign = -1 if OPTIMIZABLE_METRICS.get(metric, "max") == "max" else 1

    def key(run: Run) -> tuple[bool, float]:
        value = run.data.metrics.get(metric)
        missing = value is None or math.isnan(value)
        return missing, 0.0 if missing else sign * value

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
        numbers = [_float(v) for v in values]
        if all(n is not None for n in numbers):
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mnist-compare", description=__doc__.splitlines()[0])
    parser.add_argument("parent", nargs="?", help="a sweep's parent run id (default: latest sweep)")
    parser.add_argument(
        "--experiment", action="store_true", help="all runs of the experiment instead of one sweep"
    )
    parser.add_argument("--experiment-name", help="default: mlflow.experiment_name of the config")
    parser.add_argument("--tracking-uri", help="default: mlflow.tracking_uri of the config")
    parser.add_argument("--metric", help="sort by this metric (default: the sweep's optimized one)")
    parser.add_argument("--format", choices=("table", "csv", "markdown"), default="table")
    parser.add_argument("--output", type=Path, help="write to this file instead of the terminal")
    args = parser.parse_args(argv)

    from mnist_exp.config import compose_config
    from mnist_exp.errors import UserError
    from mnist_exp.tracking import open_store, redact

    cfg = compose_config()
    uri = args.tracking_uri or cfg.mlflow.tracking_uri
    try:
        client, experiment_id = open_store(uri, args.experiment_name or cfg.mlflow.experiment_name)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    parent = None
    if args.experiment:
        runs = [
            r
            for r in client.search_runs([experiment_id], max_results=10000)
            if r.data.tags.get(SWEEP_TAG) != "true"
        ]
    else:
        try:
            parent = (
                client.get_run(args.parent) if args.parent else latest_sweep(client, experiment_id)
            )
        except Exception:
            sys.exit(
                f"error: no run {args.parent!r} in {redact(uri)}: pass a sweep's parent run id"
            )
        if parent is None:
            sys.exit(
                f"error: no sweep in {redact(uri)}: run one with `mnist-train -m ...` "
                f"or use --experiment"
            )
        runs = sweep_runs(client, parent)
    metric = args.metric or (parent and parent.data.tags.get(METRIC_TAG)) or cfg.optimized_metric
    if not runs:
        sys.exit("error: no runs to compare")
    text = render(*table(runs, metric), args.format)
    if args.output:
        args.output.write_text(text)
        print(f"wrote {len(runs)} runs to {args.output}")
    else:
        if parent is not None:
            print(f"sweep {parent.info.run_id} ({parent.info.run_name}), sorted by {metric}")
        print(text, end="")


def _float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


if __name__ == "__main__":
    main()
