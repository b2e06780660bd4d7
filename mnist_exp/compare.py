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
from mnist_exp.tracking.datasets import data_digests
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
    aliased = "with --register: point this alias of NAME at the new version (models:/NAME@ALIAS)"
    parser.add_argument("--alias", help=aliased)
    parser.add_argument("--format", choices=("table", "csv", "markdown"), default="table")
    parser.add_argument("--output", type=Path, help="write to this file instead of the terminal")
    args = parser.parse_args(argv)
    if args.alias is not None and not args.register:
        parser.error("--alias names an alias of the version --register NAME makes: add --register")
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
        with exit_on_user_error():
            parent = find_sweep(client, experiment_id, args.parent)
        runs = sweep_runs(client, parent)
    metric = args.metric or sweep_metric(parent) or cfg.optimized_metric
    if not runs:
        sys.exit("error: no runs to compare")
    if name := args.register:
        with exit_on_user_error():
            best, version = register_best(client, runs, metric, name, args.alias)
        alias = f", models:/{name}@{args.alias}" if args.alias else ""
        print(
            f"registered {name} version {version.version}: the model of run {best.info.run_id} "
            f"({best.info.run_name}), {metric} {best.data.metrics[metric]:.4g}; "
            f"load it as models:/{name}/{version.version}{alias} or models:/{name}/latest"
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


def find_sweep(client: MlflowClient, experiment_id: str, parent_id: str | None) -> Run:
    """The sweep whose parent run is `parent_id`, else the one begun last in the experiment."""
    uri = redact(str(client.tracking_uri))
    try:
        parent = client.get_run(parent_id) if parent_id else latest_sweep(client, experiment_id)
    except Exception as exc:
        raise UserError(f"no run {parent_id!r} in {uri}: pass a sweep's parent run id") from exc
    if parent is None:
        raise UserError(
            f"no sweep in {uri}: run one with `mnist-train -m ...`, or compare the experiment's "
            f"runs (mnist-compare --experiment)"
        )
    return parent


def sweep_metric(parent: Run | None) -> str | None:
    """The metric the sweep optimised, as its parent run records it."""
    return parent.data.tags.get(names.METRIC_TAG) if parent else None


def register_best(
    client: MlflowClient, runs: list[Run], metric: str, name: str, alias: str | None = None
) -> tuple[Run, ModelVersion]:
    """A new version of the registered model `name` (made if new): the model of the best
    finished run of `runs` by `metric`, tagged with the run, `metric` and its value, the run's
    test accuracy and its training data's digest; `alias` (e.g. champion) then points at it."""
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
    if names.TEST_ACCURACY in best.data.metrics:
        tags[names.REGISTERED_TEST_ACCURACY_TAG] = str(best.data.metrics[names.TEST_ACCURACY])
    if trained_on := data_digests(best).get(names.DATA_TRAINING):  # none: recorded before them
        tags[names.REGISTERED_DATA_DIGEST_TAG] = " ".join(trained_on)
    mlflow.set_tracking_uri(client.tracking_uri)  # register_model works on the global store
    version = mlflow.register_model(source, name, await_registration_for=0, tags=tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
        version = client.get_model_version(name, version.version)  # with its alias
    return best, version


if __name__ == "__main__":
    main()
