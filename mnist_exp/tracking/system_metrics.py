"""MLflow's own system metrics of a run (CPU, memory, disk, network; an NVIDIA GPU's through
nvidia-ml-py), sampled by a thread of the tracker process, outside the training loop."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor


def start(
    run_id: str, tracking_uri: str, interval_s: float | None, resumed: bool
) -> SystemMetricsMonitor | None:
    """Sample every `interval_s` seconds until `finish()` (None: not at all); a resumed run's
    samples continue at the step after its last."""
    if interval_s is None:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its start and stop are no news in a run's output; a sample it cannot send (the server
    # away) ends the sampling, the run goes on.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=resumed, tracking_uri=tracking_uri
    )
    monitor.start()
    return monitor
