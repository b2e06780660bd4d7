"""What MLflow's system metrics (mlflow.log_system_metrics, on by default) cost a run: the CPU
of one sample, and so its share of an epoch, against the 1% that keeps them on by default.

    python scripts/benchmark_system_metrics.py [--samples 50] [--images N] [--data-root DIR]

A sample is what the tracker's sampling thread does every mlflow.system_metrics_interval_s:
read CPU, memory, disk and network (and an NVIDIA GPU's figures where there is one), ask the
store whether the run still runs, and log the figures, here sent at once (MLflow batches them,
so this is the most one costs). The epoch is a default run's on the first `--images` training
images (all of MNIST's 60,000 unless set), timed with sampling off.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_exp import api  # noqa: E402
from mnist_exp.config.paths import compose_config  # noqa: E402
from mnist_exp.names import EPOCH_SECONDS  # noqa: E402


def sample_seconds(tracking_uri: str, samples: int) -> tuple[float, float]:
    """CPU and wall seconds of one sample, the mean of `samples`, on a run of `tracking_uri`."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("system-metrics")).info.run_id
    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
    monitor.collect_metrics()  # psutil's first CPU reading only starts its clock
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(samples):
        monitor.collect_metrics()
        client.get_run(run_id)
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    return (time.process_time() - cpu) / samples, (time.perf_counter() - wall) / samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--images", type=int, help="training images of the timed epoch")
    parser.add_argument("--data-root", help="data.root of the timed epoch")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        cpu_s, wall_s = sample_seconds(uri, args.samples)
        overrides = [
            "trainer.epochs=1", f"mlflow.tracking_uri={uri}", f"hydra.run.dir={tmp}/run",
            "mlflow.log_system_metrics=false", "mlflow.log_model=false", "mlflow.log_plots=false",
            "trainer.print_every_n_steps=0",
        ]  # fmt: skip
        if args.images:
            overrides.append(f"data.max_train_samples={args.images}")
        if args.data_root:
            overrides.append(f"data.root={args.data_root}")
        epoch_s = api.train(overrides).metrics[EPOCH_SECONDS]
    interval_s = float(compose_config().mlflow.system_metrics_interval_s)
    per_epoch_s = cpu_s * epoch_s / interval_s
    sample = f"{cpu_s * 1000:.1f} ms CPU, {wall_s * 1000:.1f} ms wall"
    print(f"one sample: {sample} (mean of {args.samples})")
    print(f"one epoch: {epoch_s:.1f} s, sampled every {interval_s:g} s")
    share = per_epoch_s / epoch_s
    print(f"sampling costs {per_epoch_s * 1000:.0f} ms CPU per epoch: {share:.3%} of it")


if __name__ == "__main__":
    main()
