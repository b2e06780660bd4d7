"""Which process of a data-parallel launch this one is, read from the environment (no torch):
torchrun's variables, or a SLURM step's with several tasks; and the cores it may use."""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from mnist_exp.errors import UserError

# Set by a sweep for its jobs: the cores the whole sweep may use (`available_cores` there), as
# joblib's workers find only their own share in OMP_NUM_THREADS.
SWEEP_CORES_ENV = "MNIST_EXP_SWEEP_CORES"
# Where a one-node SLURM step's ranks meet, derived from its job id: two jobs do not meet.
_FIRST_PORT, _PORTS = 20000, 20000


@dataclass(frozen=True)
class World:
    """`size` processes training one model; this one is `rank` (0 records the run), the
    `local_rank`-th of `local_size` sharing this machine's cores and GPUs."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def leader(self) -> bool:
        """Whether this process records the run: rank 0, or the only one."""
        return self.rank == 0


ONE_PROCESS = World()  # a run as it always was: no process group, no DDP


def current_world(environ: Mapping[str, str] | None = None) -> World:
    """torchrun's RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; else, in a SLURM step of
    several tasks (srun, or `hydra.launcher.tasks_per_node`), SLURM_PROCID and the rest, with
    MASTER_ADDR and MASTER_PORT set for torch when one node leaves them to be derived; else one
    process."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return World(
            _whole(env, "RANK", 0),
            _whole(env, "WORLD_SIZE", 1),
            _whole(env, "LOCAL_RANK", 0),
            _whole(env, "LOCAL_WORLD_SIZE", 1),
        )
    tasks = _whole(env, "SLURM_STEP_NUM_TASKS", 1)  # set by srun only, not in a batch script
    if tasks < 2:
        return ONE_PROCESS
    if environ is None:
        _meeting_point(tasks)
    # local_size 1: SLURM gives each task cores of its own (cpus_per_task), none to share.
    return World(_whole(env, "SLURM_PROCID", 0), tasks, _whole(env, "SLURM_LOCALID", 0), 1)


def _meeting_point(tasks: int) -> None:
    """Set MASTER_ADDR and MASTER_PORT, where torch's ranks meet, for a one-node SLURM step."""
    if "MASTER_ADDR" in os.environ:
        return
    if _whole(os.environ, "SLURM_STEP_NUM_NODES", 1) > 1:
        raise UserError(
            f"a SLURM step of {tasks} tasks on several nodes: export MASTER_ADDR (the first "
            f"node's address) and MASTER_PORT for torch.distributed, or run on one node"
        )
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    job = os.environ.get("SLURM_JOB_ID", "")
    os.environ.setdefault("MASTER_PORT", str(_FIRST_PORT + zlib.crc32(job.encode()) % _PORTS))


def _whole(env: Mapping[str, str], name: str, default: int) -> int:
    """The whole number in `env[name]`, `default` when unset; a bad one refused in one line."""
    value = env.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        why = f"{name}={value!r} is not a whole number: unset it or fix the launch"
        raise UserError(why) from None


def available_cores() -> int:
    """The cores this process may use, or fewer where the user set `OMP_NUM_THREADS` (as
    on a shared node), which torch would follow had we not set its threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return min(cores or 1, int(limit)) if limit.isdigit() and int(limit) > 0 else cores or 1
