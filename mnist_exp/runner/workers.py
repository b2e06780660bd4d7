"""A joblib sweep's worker processes: started while the sweep opens its parent run, with what a
job imports, and stopped once the sweep has ended."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("mnist_exp")

JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def warm(launcher: DictConfig, jobs: int | None) -> Callable[[], None]:
    """Start a joblib launcher's worker processes (no others), as many as will have `jobs` to
    run (None: not known), each importing torch and the runner and starting a tracker; returns
    what waits for them. The launcher's `Parallel` then reuses them: joblib keeps its executor
    while the arguments stay the same, as built here from the launcher's config."""
    settings = _in_workers(launcher)
    if settings is None:
        return lambda: None
    from joblib import Parallel, delayed

    from mnist_exp.tracking import forker, tracker

    forker.start(tracker.serve)  # before the workers, which find it through the environment

    # Ctrl-C before they are ready cancels them: nothing a user should read about.
    warnings.filterwarnings("ignore", r"\d+ tasks which were still being processed", UserWarning)
    workers = min(settings["n_jobs"], jobs or settings["n_jobs"])
    started = Parallel(**settings, return_as="generator_unordered")(
        delayed(_prepare)() for _ in range(workers)
    )
    return lambda: _wait(started)


def _in_workers(launcher: DictConfig) -> dict[str, Any] | None:
    """The arguments of the `joblib.Parallel` that runs a joblib launcher's jobs (`n_jobs` made
    a count), as the launcher builds them; None for another launcher, or for jobs that joblib
    runs in this process (one at a time)."""
    if launcher.get("_target_") != JOBLIB_LAUNCHER:
        return None
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from joblib import effective_n_jobs

    settings: dict[str, Any] = OmegaConf.to_container(launcher, resolve=True)  # type: ignore[assignment]
    settings.pop("_target_")
    settings["backend"] = "loky"  # as the launcher sets it
    process_joblib_cfg(settings)
    settings["n_jobs"] = effective_n_jobs(settings["n_jobs"])
    return settings if settings["n_jobs"] > 1 else None


def _wait(started: Iterable[None]) -> None:
    try:
        for _ in started:
            pass
    except Exception as exc:  # the jobs meet it again, each in its own run
        log.warning(f"joblib's workers could not prepare for the jobs ({exc}); they start cold")


def _prepare() -> None:
    """In a worker: the imports of a job's first seconds, an idle tracker (from the sweep's
    forker, meanwhile importing MLflow), and a quick exit once the sweep stops it."""
    gc.disable()  # as mnist-train starts: what the imports make lives on; the job's run turns it on
    atexit.register(_exit_at_once)
    import torch._dynamo  # noqa: F401  (the first optimizer imports it)

    from mnist_exp.runner import build, train_eval  # noqa: F401
    from mnist_exp.tracking import tracker

    if not tracker.idle:
        tracker.idle.append(tracker.start())


def _exit_at_once() -> None:
    """A stopped worker has recorded all (its runs ended, multiprocessing's resources released
    before Python's exit began): it skips tearing torch's modules down (a second or more)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stop(launcher: DictConfig) -> bool:
    """Stop a joblib launcher's workers, idle once the sweep has ended: left to Python's exit,
    it would wait for each to tear torch down (seconds), with nothing left to record. True
    when there were such workers: then nothing of the sweep runs any more."""
    if _in_workers(launcher) is None:
        return False
    from joblib.externals.loky import get_reusable_executor

    from mnist_exp.tracking import forker

    get_reusable_executor(reuse=True).terminate()
    forker.stop()
    return True
