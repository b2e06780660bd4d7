"""`mnist-compare`: runs side by side, best first.

Shows the runs of a sweep (by its parent run id; by default the latest sweep) or of a whole
experiment: the params that differ between them and the key metrics, sorted by the
optimised metric; as an aligned table, CSV or Markdown. Runs that differ only in
`trainer.seed` are one row, their metrics' mean, standard deviation and count of seeds
(`--per-seed`: a row a run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mnist_exp.config.paths import compose_config
from mnist_exp.errors import UserError
from mnist_exp.names import METRIC_TAG, SWEEP_TAG
from mnist_exp.report.table import render, table
from mnist_exp.tracking.http import configure_requests
from mnist_exp.tracking.queries import latest_sweep, sweep_runs
from mnist_exp.tracking.redaction import redact
from mnist_exp.tracking.store import open_store


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mnist-compare", description=__doc__.splitlines()[0])
    parser.add_argument("parent", nargs="?", help="a sweep's parent run id (default: latest sweep)")
    parser.add_argument(
        "--experiment", action="store_true", help="all runs of the experiment instead of one sweep"
    )
    parser.add_argument("--experiment-name", help="default: mlflow.experiment_name of the config")
    parser.add_argument("--tracking-uri", help="default: mlflow.tracking_uri of the config")
    parser.add_argument("--metric", help="sort by this metric (default: the sweep's optimized one)")
    parser.add_argument(
        "--per-seed", action="store_true", help="a row a run, not a row a configuration"
    )
    parser.add_argument(
        "--register",
        metavar="NAME",
        help="register the best run's model as a new version of NAME in MLflow's Model Registry",
    )
    parser.add_argument("--format", choices=("table", "csv", "markdown"), default="table")
    parser.add_argument("--output", type=Path, help="write to this file instead of the terminal")
    args = parser.parse_args(argv)

    try:
        cfg = compose_config()
        configure_requests(cfg.mlflow)
        uri = args.tracking_uri or cfg.mlflow.tracking_uri
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
    if args.register:
        _register(client, runs, metric, args.register)
    headers, rows = table(runs, metric, args.per_seed)
    text = render(headers, rows, args.format)
    # Said only where seeds were taken together: else a row is a run, as with --per-seed.
    together = len(rows) < len(runs)
    if args.output:
        args.output.write_text(text)
        of = f" ({len(runs)} runs, seeds together)" if together else ""
        print(f"wrote {len(rows)} rows{of} to {args.output}")
        return
    note = f"; {len(runs)} runs, seeds together: their mean, _std, count" if together else ""
    if parent is not None:
        print(f"sweep {parent.info.run_id} ({parent.info.run_name}), sorted by {metric}{note}")
    elif note:
        print(f"sorted by {metric}{note}")
    print(text, end="")


def _register(client: MlflowClient, runs: list[Run], metric: str, name: str) -> None:
    """Register the best run's model as a new version of `name`; one line says which."""
    from mnist_exp.tracking.registry import register_best

    try:
        best, version = register_best(client, runs, metric, name)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    print(
        f"registered {name} version {version.version}: the model of run {best.info.run_id} "
        f"({best.info.run_name}), {metric} {best.data.metrics[metric]:.4g}; "
        f"load it as models:/{name}/{version.version} or models:/{name}/latest"
    )


if __name__ == "__main__":
    main()
