"""`mnist-compare` takes a configuration's seeds together: mean, standard deviation, count."""

from __future__ import annotations

import csv
import io
import math
import statistics

import pytest
from conftest import in_process, runs_in
from mlflow.entities import Metric, Param, Run, RunData, RunInfo
from mlflow.tracking import MlflowClient

from mnist_exp import names
from mnist_exp.compare import main as compare_main
from mnist_exp.report.table import render, table
from mnist_exp.tracking.queries import latest_sweep

SMALL = (
    "data.max_train_samples=256",
    "data.max_test_samples=100",
    "data.val_size=0",
    "trainer.epochs=1",
    "trainer.print_every_n_steps=0",
)


def _run(run_id: str, lr: str, seed: str, accuracy: float | None, status: str = "FINISHED") -> Run:
    info = RunInfo(run_id, "1", "me", status, 0, 1, "active", run_name=f"lr={lr},seed={seed}")
    metrics = [] if accuracy is None else [Metric("test_accuracy", accuracy, 0, 0)]
    params = [Param("optimizer.lr", lr), Param("trainer.seed", seed), Param("trainer.epochs", "1")]
    return Run(info, RunData(metrics=metrics, params=params))


def _rows(runs: list[Run], per_seed: bool = False) -> list[dict[str, str]]:
    text = render(*table(runs, "test_accuracy", per_seed), "csv")
    return list(csv.DictReader(io.StringIO(text)))


def test_seeds_of_a_config_are_one_row_ranked_by_their_mean():
    runs = [
        _run("a0", "0.1", "0", 0.99),  # the luckiest seed of all, in the worse config
        _run("a1", "0.1", "1", 0.80),
        _run("a2", "0.1", "2", None, "FAILED"),
        _run("b0", "0.01", "0", 0.95),
        _run("b1", "0.01", "1", 0.97),
    ]
    better, worse = _rows(runs)
    assert list(better) == [
        "run_id", "run_name", "status", "optimizer.lr", "trainer.seed",
        "test_accuracy", "test_accuracy_std", "runs", "seeds",
    ]  # fmt: skip
    assert better["run_id"] == "b1" and better["run_name"] == "lr=0.01,seed=1"  # its best seed
    assert (better["optimizer.lr"], better["trainer.seed"], better["seeds"]) == ("0.01", "0,1", "2")
    assert float(better["test_accuracy"]) == pytest.approx(0.96)
    assert float(better["test_accuracy_std"]) == pytest.approx(
        statistics.stdev([0.95, 0.97]), rel=1e-5
    )
    assert worse["run_id"] == "a0" and worse["trainer.seed"] == "0,1,2" and worse["seeds"] == "3"
    assert better["runs"] == "2" and worse["runs"] == "3"
    assert worse["status"] == "2 FINISHED, 1 FAILED"  # the mean is of the two that finished
    assert float(worse["test_accuracy"]) == pytest.approx(0.895)

    per_seed = _rows(runs, per_seed=True)
    assert [r["run_id"] for r in per_seed] == ["a0", "b1", "b0", "a1", "a2"]
    assert "seeds" not in per_seed[0] and "test_accuracy_std" not in per_seed[0]


def test_a_seed_run_again_counts_as_one_seed():
    """Three runs of seed 0: their mean is over three runs, of one seed."""
    (row,) = _rows([_run(f"a{i}", "0.1", "0", 0.9 + i / 100) for i in range(3)])
    assert (row["runs"], row["seeds"]) == ("3", "1")
    assert float(row["test_accuracy_std"]) == pytest.approx(0.01)


def test_one_seed_a_config_reads_as_a_row_a_run():
    runs = [_run("a", "0.1", "0", 0.9), _run("b", "0.01", "0", 0.95)]
    headers, rows = table(runs, "test_accuracy")
    assert headers == [
        "run_id", "run_name", "status", "optimizer.lr", "test_accuracy", "runs", "seeds",
    ]  # fmt: skip
    assert rows == [
        ["b", "lr=0.01,seed=0", "FINISHED", "0.01", "0.95", "1", "1"],
        ["a", "lr=0.1,seed=0", "FINISHED", "0.1", "0.9", "1", "1"],
    ]
    assert table(runs, "test_accuracy", per_seed=True) == (headers[:-2], [r[:-2] for r in rows])


@pytest.mark.slow
def test_mnist_compare_shows_a_sweeps_seeds_together(mnist_train, tracking_uri: str, capfd):
    ended = mnist_train("-m", "optimizer.lr=0.001,0.01", "trainer.seed=0,1", *SMALL)
    children = [r for r in runs_in(tracking_uri) if "mlflow.parentRunId" in r.data.tags]
    assert [c.info.status for c in children] == ["FINISHED"] * 4, ended.err[-3000:]

    def compare(*args: str) -> list[str]:
        ended = in_process(compare_main, ["--tracking-uri", tracking_uri, *args], capfd)
        assert ended.code == 0, ended.err
        return ended.out.splitlines()

    first, header, *rows = compare()  # the latest sweep, as a table
    assert first.endswith("sorted by test_accuracy; 4 runs, seeds together: their mean and _std")
    assert header.split() == [
        "run_id", "run_name", "status", "optimizer.lr", "trainer.seed",
        "test_accuracy", "test_accuracy_std", "test_loss", "test_loss_std",
        "train_images_per_s", "train_images_per_s_std", "runs", "seeds",
    ]  # fmt: skip
    assert len(rows) == 2
    # CSV on standard output is only CSV (`> file.csv`); the title line goes to standard error.
    as_csv = in_process(compare_main, ["--tracking-uri", tracking_uri, "--format", "csv"], capfd)
    assert as_csv.err.splitlines()[-1] == first
    got = list(csv.DictReader(io.StringIO(as_csv.out)))
    for row in got:
        seeds = [c for c in children if c.data.params["optimizer.lr"] == row["optimizer.lr"]]
        accuracies = [c.data.metrics["test_accuracy"] for c in seeds]
        assert (row["trainer.seed"], row["runs"], row["seeds"]) == ("0,1", "2", "2")
        assert math.isclose(float(row["test_accuracy"]), statistics.fmean(accuracies), rel_tol=1e-5)
        assert math.isclose(
            float(row["test_accuracy_std"]), statistics.stdev(accuracies), abs_tol=1e-6
        )
        best = max(seeds, key=lambda c: c.data.metrics["test_accuracy"])
        assert row["run_id"] == best.info.run_id
    assert float(got[0]["test_accuracy"]) >= float(got[1]["test_accuracy"])

    first, header, *rows = compare("--per-seed")
    assert first.endswith("sorted by test_accuracy") and len(rows) == 4
    assert "seeds" not in header.split()


def test_the_latest_sweep_is_the_one_begun_last_a_resumed_search_included(tracking_uri: str):
    """mnist-compare's default: a search resumed after another sweep is the latest again."""
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("sweeps")

    def sweep(start: int, opened_at: int | None) -> str:
        tags = {names.SWEEP_TAG: "true"}
        if opened_at is not None:
            tags[names.SWEEP_OPENED_TAG] = str(opened_at)
        return client.create_run(experiment, start_time=start, tags=tags).info.run_id

    search = sweep(1000, 1000)
    grid = sweep(2000, None)  # recorded before the tag existed: its start time counts
    assert latest_sweep(client, experiment).info.run_id == grid
    client.set_tag(search, names.SWEEP_OPENED_TAG, "3000")  # its study went on
    assert latest_sweep(client, experiment).info.run_id == search
    assert latest_sweep(client, client.create_experiment("empty")) is None
