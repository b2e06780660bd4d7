"""`mnist-compare`: runs side by side, best first.

A sweep's runs (by default the latest's) or an experiment's, sorted by the optimised metric, as
a table, CSV or Markdown; a configuration's seeds are one row (mean, standard deviation, how many
runs and distinct seeds).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from mnist_exp import names
from mnist_exp.config.paths import compose_config
from mnist_exp.errors import UserError, exit_on_user_error
from mnist_exp.report.table import rank, render, table
from mnist_exp.tracking.http import configure_requests
from mnist_exp.tracking.queries import latest_sweep, run_model, sweep_runs
from mnist_exp.tracking.redaction import redact
from mnist_exp.tracking.store import open_store


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mnist-compare", description=__doc__.splitlines()[0])
    parser.add_argument("parent", nargs="?", help="a sweep's parent run id (default: latest sweep)")
    parser.add_argument("--experiment", action="store_true", help="all its runs, not one sweep")
    parser.add_argument("--experiment-name", help="default: mlflow.experiment_name of the config")
    parser.add_argument("--tracking-uri", help="default: mlflow.tracking_uri of the config")
    parser.add_argument("--metric", help="sort by this metric (default: the sweep's optimized one)")
    parser.add_argument("--per-seed", action="store_true", help="a row a run, not a configuration")
    registry = "register the best run's model as a new version of NAME in MLflow's Model Registry"
    parser.add_argument("--register", metavar="NAME", help=registry)
    parser.add_argument("--format", choices=("table", "csv", "markdown"), default="table")
    parser.add_argument("--output", type=Path, help="write to this file instead of the terminal")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        cfg = compose_config()
        configure_requests(cfg.mlflow)
        uri = args.tracking_uri or cfg.mlflow.tracking_uri
        client, experiment_id = open_store(uri, args.experiment_name or cfg.mlflow.experiment_name)
    parent = None
    if args.experiment:
        found = client.search_runs([experiment_id], max_results=10000)
        runs = [r for r in found if r.data.tags.get(names.SWEEP_TAG) != "true"]
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
    swept = parent and parent.data.tags.get(names.METRIC_TAG)  # the sweep's optimized metric
    metric = args.metric or swept or cfg.optimized_metric
    if not runs:
        sys.exit("error: no runs to compare")
    if name := args.register:
        with exit_on_user_error():
            best, version = register_best(client, runs, metric, name)
        print(
            f"registered {name} version {version.version}: the model of run {best.info.run_id} "
            f"({best.info.run_name}), {metric} {best.data.metrics[metric]:.4g}; "
            f"load it as models:/{name}/{version.version} or models:/{name}/latest"
        )
    headers, rows = table(runs, metric, args.per_seed)
    text = render(headers, rows, args.format)
    together = len(rows) < len(runs)  # said only then: else a row is a run, as with --per-seed
    if args.output:
        args.output.write_text(text)
        of = f" ({len(runs)} runs, seeds together)" if together else ""
        print(f"wrote {len(rows)} rows{of} to {args.output}")
        return
    note = f"; {len(runs)} runs, seeds together: their mean and _std" if together else ""
    # A table reads with its title; CSV and Markdown on standard output are only that.
    title = sys.stdout if args.format == "table" else sys.stderr
    if parent is not None:
        print(
            f"sweep {parent.info.run_id} ({parent.info.run_name}), sorted by {metric}{note}",
            file=title,
        )
    elif note:
        print(f"sorted by {metric}{note}", file=title)
    print(text, end="")


def register_best(
    client: MlflowClient, runs: list[Run], metric: str, name: str
) -> tuple[Run, ModelVersion]:
    """A new version of the registered model `name` (made if new): the model of the best
    finished run of `runs` by `metric`, tagged with the run, `metric` and its value."""
    finished = [r for r in runs if r.info.status == "FINISHED" and metric in r.data.metrics]
    if not finished:
        raise UserError(f"no finished run has {metric}: nothing to register")
    best = rank(finished, metric)[0]
    source = run_model(client, best)
    if source is None:
        raise UserError(
            f"run {best.info.run_id} ({best.info.run_name}) has no model to register (trained "
            f"with mlflow.log_model=false): rerun it with mnist-rerun {best.info.run_id}"
        )
    tags = {
        names.REGISTERED_RUN_TAG: best.info.run_id,
        names.REGISTERED_METRIC_TAG: metric,
        names.REGISTERED_VALUE_TAG: str(best.data.metrics.get(metric)),
    }
    mlflow.set_tracking_uri(client.tracking_uri)  # register_model works on the global store
    return best, mlflow.register_model(source, name, await_registration_for=0, tags=tags)


if __name__ == "__main__":
    main()
