"""Wall time of one 4-job grid sweep run with joblib's n_jobs=1 and n_jobs=2, side by side.

    python scripts/benchmark_sweep.py [--data-root DIR] [--train-samples N] [--json FILE]

Each sweep writes to a brand-new SQLite store in a temporary folder. With n_jobs=2 each job
gets its share of the cores (trainer.num_threads defaults to cores // n_jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(n_jobs: int, data_root: str | None, train_samples: int, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "mnist_exp.train", "-m",
            "optimizer.lr=0.0005,0.001,0.002,0.004",
            "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}",
            f"data.max_train_samples={train_samples}", f"trainer.epochs={epochs}",
            "trainer.print_every_n_steps=0",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"hydra.sweep.dir={tmp}/sweep",
        ]  # fmt: skip
        if data_root:
            cmd.append(f"data.root={data_root}")
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MNIST_EXP_DATA"))
    parser.add_argument("--train-samples", type=int, default=15000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    figures = {
        "cores": cores,
        "jobs": 4,
        "train_samples": args.train_samples,
        "epochs": args.epochs,
    }
    for n_jobs in (1, 2):
        figures[f"wall_s_n_jobs_{n_jobs}"] = round(
            sweep(n_jobs, args.data_root, args.train_samples, args.epochs), 2
        )
        print(
            f"4-job sweep, n_jobs={n_jobs}: {figures[f'wall_s_n_jobs_{n_jobs}']:.1f} s", flush=True
        )
    figures["speedup"] = round(figures["wall_s_n_jobs_1"] / figures["wall_s_n_jobs_2"], 2)
    print(f"n_jobs=2 is {figures['speedup']:.2f}x the speed of n_jobs=1 on {cores} cores")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
