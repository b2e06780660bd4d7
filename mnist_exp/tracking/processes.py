"""Which process holds a run open, so that a run whose process is gone can be told apart."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from mnist_exp.names import HOST_TAG, PID_START_TAG, PID_TAG, SLURM_JOB_TAG


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux); None if it has ended."""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):  # a zombie has ended
        return None
    return int(fields[19])


def exit_code(pid: int, started: str) -> int | None:
    """The exit code of the process that started at `started` ticks, ended but not yet reaped
    by its parent (a zombie), as `subprocess` gives it (-N: killed by signal N); None if it
    runs or was reaped (Linux)."""
    fields = _stat(pid)
    if fields is None or fields[0] != "Z" or fields[19] != started or len(fields) < 50:
        return None
    status = int(fields[49])  # field 52, exit_code
    return -(status & 0x7F) if status & 0x7F else status >> 8


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's name, the first its state (Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def age() -> float | None:
    """Seconds since this process started (Linux), or None where /proc cannot tell."""
    ticks = start_ticks(os.getpid())
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None if ticks is None else uptime - ticks / os.sysconf("SC_CLK_TCK")


def process_tags() -> dict[str, str]:
    """This process, as `store.fail_orphans` recognises it (host, pid, start time), and its
    SLURM job if any."""
    ticks = start_ticks(os.getpid())
    job = slurm_job()
    return {
        HOST_TAG: platform.node(),
        PID_TAG: str(os.getpid()),
        PID_START_TAG: "" if ticks is None else str(ticks),
        **({SLURM_JOB_TAG: job} if job else {}),
    }


def slurm_job() -> str | None:
    """The SLURM job this process runs in, as `squeue` shows it and submitit names its log
    folder (`123_4` for task 4 of array job 123); None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def alive(pid: int, started: str | None) -> bool:
    """Whether process `pid` still runs, and (where known) is the one that started then."""
    if Path("/proc/self/stat").is_file():
        now = start_ticks(pid)
        return now is not None and (not started or str(now) == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
