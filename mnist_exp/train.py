"""`mnist-train [overrides]` (also `python -m mnist_exp.train`): one experiment, or `-m` a sweep.

torch and MLflow load only once Hydra has accepted the command line: a bad override is told at once.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import tempfile
from dataclasses import dataclass

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mnist_exp.config.checks import check_launch, check_overrides
from mnist_exp.config.paths import CONF_DIR
from mnist_exp.config.refusals import composition_refusal
from mnist_exp.config.world import ONE_PROCESS, World, current_world
from mnist_exp.errors import RankLost, UserError, exit_on_user_error
from mnist_exp.names import COMMAND_TAG
from mnist_exp.runner import slurm
from mnist_exp.runner.experiment import run_experiment
from mnist_exp.runner.source import command_source, program
from mnist_exp.runner.sweep import finished, interrupted, refusals_leave_no_folder

log = logging.getLogger("mnist_exp")


@dataclass
class _Invocation:
    """What Hydra's task function needs to know of the command line it runs for."""

    command: str = ""  # as the user typed it, recorded with each run
    # All recorded once Hydra returns: a run or a sweep job in this process, or a whole sweep.
    recorded: bool = False
    owns_full_error: bool = False  # run_command set HYDRA_FULL_ERROR (see _composing)
    world: World = ONE_PROCESS  # this process's place in a data-parallel run (torchrun)


_invocation = _Invocation()
# The Hydra job of a data-parallel run's rank other than 0: in the temporary folder, which
# exists (nothing made, nothing left if torchrun kills it), no copy of the config, no log file.
_WRITING_NOTHING = [
    f"hydra.run.dir={tempfile.gettempdir()}",
    "hydra.output_subdir=null",
    f"hydra.job_logging.handlers.file.filename={os.devnull}",
    "hydra.job_logging.root.level=WARNING",
]
# Set, Hydra raises a composition error for run_command to refuse in one line (else it prints
# it over lines, or a stack trace); set only while Hydra composes, a user's own left alone.
_FULL_ERROR = "HYDRA_FULL_ERROR"


def main() -> None:
    """`mnist-train`: `run_command`, then a quick exit (no tearing down of torch's modules)."""
    gc.disable()  # start-up's objects live till the end; the runner turns it on once built
    if run_command(sys.argv[1:]):
        if finished():  # the exit handlers of joblib's workers: its temporary folders removed
            atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_command(args: list[str], command: str | None = None) -> bool:
    """Run `args` (also in `sys.argv`, for Hydra); `command` is what the user typed, when
    `mnist-rerun` calls. True when all is recorded; a one-line exit on bad input or Ctrl-C."""
    with exit_on_user_error():
        check_overrides(args)
        world = current_world()
    try:
        check_launch(args, world)
    except UserError as exc:
        sys.exit(_refused(exc, world))
    _invocation.world = world
    _invocation.command = command or " ".join([program(), *args])
    if not world.leader:  # rank 0 records; the others' Hydra jobs write no file anywhere
        sys.argv += _WRITING_NOTHING
    _invocation.recorded = False
    _invocation.owns_full_error = _FULL_ERROR not in os.environ
    _composing(True)
    try:
        with refusals_leave_no_folder():
            _main()
        _invocation.recorded |= finished()  # a sweep's jobs ran in other processes (joblib)
    except KeyboardInterrupt as exc:
        interrupted()  # a sweep's parent, closed at exit, is KILLED as its job
        sys.exit(str(exc) or "interrupted")
    except (HydraException, OmegaConfBaseException) as exc:
        if not _invocation.owns_full_error:
            raise
        sys.exit(f"error: {composition_refusal(exc)}")
    except Exception as exc:
        from submitit.core.utils import FailedJobError  # submitit is imported only if it failed

        if not isinstance(exc, FailedJobError):
            raise
        # sbatch refused the sweep's jobs: more CPUs or memory than a node has, or no cluster.
        sys.exit(f"error: {slurm.refusal(str(exc))}")
    finally:
        _composing(False)
        _invocation.owns_full_error = False
    return _invocation.recorded


def _refused(exc: UserError, world: World) -> str | int:
    """How a refusal ends the command: its line, but on a rank other than 0 only the status, as
    rank 0 says the same (unless this rank's own: another rank ended)."""
    return f"error: {exc}" if world.leader or isinstance(exc, RankLost) else 1


def _composing(composing: bool) -> None:
    """Whether Hydra's errors are raised (to be refused in one line) or reported by Hydra."""
    if _invocation.owns_full_error and composing:
        os.environ[_FULL_ERROR] = "1"
    elif _invocation.owns_full_error:
        os.environ.pop(_FULL_ERROR, None)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> float:
    """Train, evaluate, record; returns `cfg.optimized_metric` for sweepers."""
    _composing(False)
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        cmd = _invocation.command
        result = run_experiment(cfg, {COMMAND_TAG: cmd, **command_source(cmd)})
        _invocation.recorded = True
        if not result.run_id:  # a data-parallel run's rank other than 0: rank 0 recorded it
            return float("nan")
        metrics = result.metrics
        key = cfg.optimized_metric
        if key not in metrics:
            raise UserError(f"optimized_metric={key!r} was never logged by this run")
        return metrics[key]
    except UserError as exc:
        if not in_sweep:
            sys.exit(_refused(exc, _invocation.world))
        log.error(f"error: {exc}")
    except Exception:
        if not in_sweep:
            raise
        log.exception("this job failed; the sweep goes on")
    finally:
        _composing(in_sweep)  # the sweep's next job is composed next
    # A failed job in a sweep: its run is FAILED; NaN tells Optuna the trial failed, and
    # Hydra's sweepers go on with the other jobs instead of stopping at the first failure.
    return float("nan")


if __name__ == "__main__":
    main()
