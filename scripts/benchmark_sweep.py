"""What a sweep's jobs cost besides training: an 8-job sequential sweep against 8 single commands.

    python scripts/benchmark_sweep.py [--data-root DIR] [--train-samples N] [--test-samples N]
                                      [--jobs 8] [--parallel] [--json FILE]

Runs `mnist-train -m experiment=fast optimizer.lr=0.01,0.02,0.03,0.05 trainer.seed=0,1` (one
process, jobs one after another) and the same 8 configurations as 8 single commands, 4
before the sweep and 4 after, and prints per job: training images/s, start-up (job start to
first step), the epoch, what came after it (testing and recording), the job's wall time and
its overhead (wall - epoch). The
targets: every job within 5% of a single run's images/s, and the sweep's wall time at most
8 x (epoch + 1.5 s). `--parallel` also times a 4-job grid with joblib's n_jobs=1 and 2, on
`--train-samples` images (default 15,000).
Each sweep and command writes to a new SQLite store in a temporary folder; the machine
should be otherwise idle. `--jobs 2`, 4 or 6 sweeps the first 1, 2 or 3 learning rates only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mnist_exp import names  # noqa: E402  (after the path: a checkout need not be installed)

LRS = ("0.01", "0.02", "0.03", "0.05")
SEEDS = ("0", "1")
QUIET = ("mlflow.log_plots=false", "trainer.print_every_n_steps=0")


def _train(args: list[str], tmp: str, data_root: str | None) -> float:
    """Run mnist-train with `args` on the store in `tmp`; returns its wall time."""
    cmd = [
        sys.executable, "-m", "mnist_exp.train", *args, *QUIET,
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        f"hydra.sweep.dir={tmp}/sweep", f"hydra.run.dir={tmp}/run-{time.time_ns()}",
    ]  # fmt: skip
    if data_root:
        cmd.append(f"data.root={data_root}")
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def _jobs(tmp: str) -> list[dict[str, float]]:
    """Each training run of the store, in the order they ended, with its figures."""
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(experiments) if names.EPOCH_SECONDS in r.data.metrics]
    jobs = []
    for run in sorted(runs, key=lambda r: r.info.end_time):
        epoch_end = client.get_metric_history(run.info.run_id, names.EPOCH)[-1].timestamp
        m = run.data.metrics
        jobs.append(
            {
                "images_per_s": m[names.TRAIN_IMAGES_PER_S],
                "startup_s": m[names.STARTUP_S],
                "epoch_s": m[names.EPOCH_SECONDS],
                "after_s": (run.info.end_time - epoch_end) / 1000,
                "end": run.info.end_time / 1000,
                "test_accuracy": m[names.TEST_ACCURACY],
            }
        )
    return jobs


def sequential(
    data_root: str | None, train_samples: int | None, test_samples: int | None, jobs: int
) -> dict[str, object]:
    """The `jobs` single commands, half before the sweep of as many jobs and half after it (so
    that the machine's drift falls on both); per-job and total figures."""
    subset = [f"data.max_train_samples={train_samples}"] if train_samples else []
    subset += [f"data.max_test_samples={test_samples}"] if test_samples else []
    lrs = LRS[: jobs // len(SEEDS)]
    configs = [(lr, seed) for lr in lrs for seed in SEEDS]
    singles, single_walls = [], []

    def single(lr: str, seed: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            args = ["experiment=fast", f"optimizer.lr={lr}", f"trainer.seed={seed}", *subset]
            single_walls.append(_train(args, tmp, data_root))
            singles.extend(_jobs(tmp))

    for lr, seed in configs[::2]:
        single(lr, seed)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        wall = _train(
            ["-m", "experiment=fast", f"optimizer.lr={','.join(lrs)}",
             f"trainer.seed={','.join(SEEDS)}", *subset],
            tmp, data_root,
        )  # fmt: skip
        jobs = _jobs(tmp)
    for lr, seed in configs[1::2]:
        single(lr, seed)
    previous = start
    for job in jobs:
        job["wall_s"] = job["end"] - previous
        job["overhead_s"] = job["wall_s"] - job["epoch_s"]
        previous = job["end"]
    rates = [j["images_per_s"] for j in singles]
    single_rate = statistics.median(rates)
    epoch = statistics.median(j["epoch_s"] for j in jobs)
    return {
        "jobs": [
            {k: round(v, 3) for k, v in job.items() if k != "end"}
            | {"vs_single": round(job["images_per_s"] / single_rate, 3)}
            for job in jobs
        ],
        "sweep_wall_s": round(wall, 2),
        "target_s": round(len(jobs) * (epoch + 1.5), 2),
        "single_images_per_s": round(single_rate),
        "single_images_per_s_range": [round(min(rates)), round(max(rates))],
        "singles_wall_s": round(sum(single_walls), 2),
    }


def parallel(data_root: str | None, train_samples: int, epochs: int) -> dict[str, float]:
    """A 4-job grid with joblib's n_jobs=1 and n_jobs=2: wall times and the speed-up."""
    figures = {}
    for n_jobs in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            figures[f"wall_s_n_jobs_{n_jobs}"] = round(
                _train(
                    ["-m", "optimizer.lr=0.0005,0.001,0.002,0.004", "hydra/launcher=joblib",
                     f"hydra.launcher.n_jobs={n_jobs}", f"data.max_train_samples={train_samples}",
                     f"trainer.epochs={epochs}"],
                    tmp, data_root,
                ),
                2,
            )  # fmt: skip
    figures["speedup"] = round(figures["wall_s_n_jobs_1"] / figures["wall_s_n_jobs_2"], 2)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MNIST_EXP_DATA"))
    parser.add_argument("--train-samples", type=int, help="a subset (default: all 60,000)")
    parser.add_argument("--test-samples", type=int, help="a subset (default: all 10,000)")
    parser.add_argument(
        "--jobs", type=int, choices=(2, 4, 6, 8), default=8, help="2 a learning rate (default: 8)"
    )
    parser.add_argument("--parallel", action="store_true", help="also joblib n_jobs 1 vs 2")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    jobs, half = args.jobs, args.jobs // 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    figures: dict[str, object] = {"cores": cores, "train_samples": args.train_samples or 60000}
    seq = sequential(args.data_root, args.train_samples, args.test_samples, jobs)
    figures["sequential"] = seq
    print(f"{jobs}-job sequential sweep of experiment=fast on {cores} cores")
    print("job  images/s  vs single  start-up s  epoch s  after s  wall s  overhead s")
    for i, job in enumerate(seq["jobs"], 1):  # type: ignore[arg-type]
        print(
            f"{i:>3}  {job['images_per_s']:>8.0f}  {job['vs_single']:>9.3f}  "
            f"{job['startup_s']:>10.2f}  {job['epoch_s']:>7.2f}  {job['after_s']:>7.2f}  "
            f"{job['wall_s']:>6.2f}  {job['overhead_s']:>10.2f}"
        )
    low, high = seq["single_images_per_s_range"]  # type: ignore[misc]
    print(
        f"single commands, {half} before the sweep and {half} after: "
        f"{seq['single_images_per_s']} images/s (median; from {low} to {high}); "
        f"the {jobs} took {seq['singles_wall_s']:.1f} s"
    )
    print(
        f"sweep: {seq['sweep_wall_s']:.1f} s against a target of {jobs} x (epoch + 1.5 s) = "
        f"{seq['target_s']:.1f} s; {seq['singles_wall_s'] / seq['sweep_wall_s']:.2f}x the "
        f"speed of {jobs} single commands"
    )
    if args.parallel:
        grid_samples = args.train_samples or 15000
        par = parallel(args.data_root, grid_samples, 1)
        figures["parallel"] = par
        print(
            f"4-job grid ({grid_samples:,} images, 1 epoch): "
            f"n_jobs=1 {par['wall_s_n_jobs_1']:.1f} s, "
            f"n_jobs=2 {par['wall_s_n_jobs_2']:.1f} s: {par['speedup']:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
