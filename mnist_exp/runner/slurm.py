"""What SLURM's tools say to a sweep, in one line each: sbatch's refusal, submitit's warnings."""

from __future__ import annotations

import logging
import os
import re

# What sbatch says on a machine that is not part of a SLURM cluster (or cannot reach it).
NO_CLUSTER = (
    "Could not establish a configuration source",
    "slurm.conf",
    "Unable to contact slurm controller",
)


def refusal(said: str) -> str:
    """The error for sbatch's stderr `said` (which submitit printed above) when it refused
    a sweep's jobs."""
    lines = [line.strip() for line in said.strip().splitlines() if line.strip()] or ["no reason"]
    if any(marker in said for marker in NO_CLUSTER):
        return (
            f"SLURM is not configured or reachable on this machine ({lines[-1]}): run the sweep "
            f"on the cluster's login node, or set SLURM_CONF to the cluster's slurm.conf"
        )
    return (
        f"the cluster refused the sweep's jobs ({'; '.join(lines)}): ask for what its nodes "
        f"have (sinfo --Node --long) through hydra.launcher.cpus_per_task, mem_gb, "
        f"gpus_per_node or partition"
    )


class Once(logging.Filter):
    """Lets each message through once, its count aside: submitit warns `Call #N - Bypassing
    sacct error ...` at every look at the jobs where sacct fails (no accounting)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = re.sub(r"^Call #\d+ - ", "", record.getMessage())
        new = text not in self.seen
        self.seen.add(text)
        return new


def warn_once() -> None:
    """From now on, each of submitit's messages once (a new sweep's again)."""
    logger = logging.getLogger("submitit")
    for old in [f for f in logger.filters if isinstance(f, Once)]:
        logger.removeFilter(old)
    logger.addFilter(Once())


def restarts() -> int:
    """How many times SLURM has requeued the job this process runs in (0 outside SLURM)."""
    count = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(count) if count.isdigit() else 0
