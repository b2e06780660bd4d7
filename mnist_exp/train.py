"""`mnist-train [overrides]` (also `python -m mnist_exp.train`): one experiment, or `-m` a sweep.

Parses the command line with Hydra, calls the runner, turns the outcome into an exit code.
torch and MLflow are imported only once Hydra has accepted the command line, so a bad
override is reported at once.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from mnist_exp.config import help as _help  # noqa: F401  (registers --help's resolver)
from mnist_exp.config.checks import check_overrides
from mnist_exp.config.paths import CONF_DIR
from mnist_exp.config.refusals import composition_refusal
from mnist_exp.errors import UserError
from mnist_exp.names import COMMAND_TAG
from mnist_exp.runner.experiment import optimized, run_experiment

log = logging.getLogger("mnist_exp")


@dataclass
class _Invocation:
    """What Hydra's task function needs to know of the command line it runs for."""

    command: str = ""  # as the user typed it, recorded with each run
    # All is recorded once Hydra returns: a run finished in this process (a single run, or
    # a job of a sweep on the basic launcher, whose parent run ends before Hydra returns).
    recorded: bool = False
    owns_full_error: bool = False  # run_command set HYDRA_FULL_ERROR (see _composing)


_invocation = _Invocation()
# Hydra prints a composition error (a wrong type, an unknown key) over several lines, or with
# a stack trace; with HYDRA_FULL_ERROR set it raises the error instead, for run_command to
# refuse in one line. Set only while Hydra composes (before the task, and between a sweep's
# jobs), so that Hydra reports the task's own errors as before; a user's own is left alone.
_FULL_ERROR = "HYDRA_FULL_ERROR"


def main() -> None:
    """`mnist-train`: `run_command`, then a quick exit once everything is recorded.

    Everything is recorded and flushed by then; tearing down torch's and matplotlib's
    modules would only make the command return later.
    """
    # Start-up makes objects that live till the end (modules, config, data and model); the
    # collector's passes over them are wasted. The runner turns it back on once built.
    gc.disable()
    if run_command(sys.argv[1:]):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_command(args: list[str], command: str | None = None) -> bool:
    """Run the command line `args` (already in `sys.argv`, where Hydra reads it).

    `command` is what the user typed, when another command (`mnist-rerun`) calls this.
    True when everything is recorded (see `_Invocation.recorded`). Exits with a one-line
    message on bad input or Ctrl-C.
    """
    try:
        check_overrides(args)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    _invocation.command = command or " ".join([Path(sys.argv[0]).name, *args])
    _invocation.recorded = False
    _invocation.owns_full_error = _FULL_ERROR not in os.environ
    _composing(True)
    try:
        _main()
    except KeyboardInterrupt as exc:
        sys.exit(str(exc) or "interrupted")
    except (HydraException, OmegaConfBaseException) as exc:
        if not _invocation.owns_full_error:
            raise
        sys.exit(f"error: {composition_refusal(exc)}")
    except Exception as exc:
        refusal = _submission_refusal(exc)
        if refusal is None:
            raise
        sys.exit(f"error: {refusal}")
    finally:
        _composing(False)
        _invocation.owns_full_error = False
    return _invocation.recorded


def _submission_refusal(exc: Exception) -> str | None:
    """One line for a cluster that refused a sweep's jobs (submitit's `FailedJobError`: sbatch
    said no, e.g. more CPUs or memory than a node has); None for any other exception."""
    from submitit.core.utils import FailedJobError  # submitit is imported only if it failed

    if not isinstance(exc, FailedJobError):
        return None
    said = "; ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return (
        f"the cluster refused the sweep's jobs ({said}): ask for what its nodes have "
        "(sinfo --Node --long) through hydra.launcher.cpus_per_task, mem_gb, gpus_per_node "
        "or partition"
    )


def _composing(composing: bool) -> None:
    """Whether Hydra's errors are raised (to be refused in one line) or reported by Hydra."""
    if not _invocation.owns_full_error:
        return
    if composing:
        os.environ[_FULL_ERROR] = "1"
    else:
        os.environ.pop(_FULL_ERROR, None)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> float:
    """Train, evaluate, record; returns `cfg.optimized_metric` for sweepers."""
    _composing(False)
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        result = run_experiment(cfg, {COMMAND_TAG: _invocation.command})
        _invocation.recorded = True
        return optimized(result, cfg.optimized_metric)
    except UserError as exc:
        if not in_sweep:
            sys.exit(f"error: {exc}")
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
