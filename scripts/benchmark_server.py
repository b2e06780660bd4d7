"""Figures for a shared tracking server: how many runs a minute it takes from parallel jobs,
and how long one epoch of per-step losses takes to log to it and to the SQLite store.

    python scripts/benchmark_server.py --server http://127.0.0.1:5000 [--processes 2] [--runs 20]
                                       [--rounds 3]

Each "run" is what a job sends besides training: create the run, its ~60 params in one
batch, tags, 100 metric values, end it. Several processes do this at once (as joblib or
SLURM jobs would), and the server's rate is runs finished per minute of wall time. The
epoch figure sends 938 `train_loss` values (an MNIST epoch at batch 64) the way the tracker
does: buffered, then `log_batch` with up to 1000 values (best of `--rounds`). `--server`
takes any tracking URI (`sqlite:///...` too); HTTP retries and timeout are the config's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from mnist_exp import names  # noqa: E402
from mnist_exp.config.paths import compose_config  # noqa: E402
from mnist_exp.tracking.http import configure_requests  # noqa: E402
from mnist_exp.tracking.mlflow_run import MlflowRun, flatten  # noqa: E402
from mnist_exp.tracking.store import open_store  # noqa: E402

STEPS_PER_EPOCH = 938  # 60,000 images at batch 64


def _losses(steps: int) -> list[tuple[str, float, int, int]]:
    """`steps` train_loss values as a run buffers them: (key, value, timestamp_ms, step)."""
    return [
        (names.TRAIN_LOSS, 1.0 / step, int(time.time() * 1000), step)
        for step in range(1, steps + 1)
    ]


def _runs(uri: str, experiment: str, count: int) -> float:
    """Create and finish `count` runs as jobs do; returns the seconds it took."""
    client, experiment_id = open_store(uri, experiment)
    params = flatten(OmegaConf.to_container(compose_config(), resolve=True))
    started = time.perf_counter()
    for _ in range(count):
        run = MlflowRun.start(
            client, experiment_id, run_name=None, params=params, tags={"mnist_exp.bench": "1"}
        )
        run.log_values(_losses(100))
        run.end("FINISHED")
    return time.perf_counter() - started


def runs_per_minute(uri: str, processes: int, runs: int) -> float:
    experiment = f"benchmark-runs-{int(time.time())}"
    open_store(uri, experiment)  # create it once, before the processes race to
    started = time.perf_counter()
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_runs, [uri] * processes, [experiment] * processes, [runs] * processes))
    return processes * runs / (time.perf_counter() - started) * 60


def epoch_seconds(uri: str, rounds: int) -> float:
    """Best of `rounds`: one epoch of per-step losses, buffered, then sent in batches."""
    client, experiment_id = open_store(uri, f"benchmark-epoch-{int(time.time())}")
    best = float("inf")
    for _ in range(rounds):
        run = MlflowRun.start(client, experiment_id, run_name=None, params={}, tags={})
        started = time.perf_counter()
        run.log_values(_losses(STEPS_PER_EPOCH))
        best = min(best, time.perf_counter() - started)
        run.end("FINISHED")
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="the tracking server's (or any) URI")
    parser.add_argument("--processes", type=int, default=2, help="jobs logging at once")
    parser.add_argument("--runs", type=int, default=20, help="runs per process")
    parser.add_argument("--rounds", type=int, default=3, help="epochs logged; the best is kept")
    args = parser.parse_args(argv)
    configure_requests(compose_config().mlflow)  # as every command sets them
    rate = runs_per_minute(args.server, args.processes, args.runs)
    print(f"server: {rate:.0f} runs/min from {args.processes} processes ({args.runs} runs each)")
    server_s = epoch_seconds(args.server, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_s = epoch_seconds(f"sqlite:///{tmp}/mlflow.db", args.rounds)
        sqlite_rate = runs_per_minute(f"sqlite:///{tmp}/mlflow.db", 1, args.runs)
    print(f"sqlite: {sqlite_rate:.0f} runs/min from 1 process ({args.runs} runs)")
    print(
        f"one epoch of train_loss ({STEPS_PER_EPOCH} values): server {server_s * 1000:.0f} ms, "
        f"sqlite {sqlite_s * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
