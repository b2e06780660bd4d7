"""What a search leaves on its parent run: trials by how they ended, the best, Optuna's plots."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from mnist_exp import names
from mnist_exp.search.settings import Settings
from mnist_exp.search.study import ENDED, counted, open_storage, open_study

log = logging.getLogger("mnist_exp")


@dataclass(frozen=True)
class Outcome:
    """Metrics and tags for the parent run, Optuna's pictures, and the line that says it all."""

    metrics: dict[str, int]  # trials by how they ended
    tags: dict[str, str]
    pictures: list[Path]
    line: str


def outcome(settings: Settings, metric: str, folder: Path) -> Outcome:
    """What the study holds now, its pictures drawn into `folder`, for the sweep's parent run."""
    study = open_study(settings, open_storage(settings), create=False)
    trials = counted(study)
    by_state = Counter(t.state for t in trials)
    complete, pruned, failed = (by_state[state] for state in ENDED)
    metrics = {
        names.TRIALS_COMPLETE: complete,
        names.TRIALS_PRUNED: pruned,
        names.TRIALS_FAILED: failed,
    }
    tags = {}
    line = (
        f"Optuna study {settings.study_name!r}: {len(trials)} trials, {complete} complete, "
        f"{pruned} pruned, {failed} failed"
    )
    if (best := best_trial(study)) is not None:
        params = " ".join(f"{k}={v}" for k, v in best.params.items())
        tags = {names.BEST_TRIAL_TAG: str(best.number), names.BEST_PARAMS_TAG: params}
        line += f"; best trial {best.number}: {metric} {best.value:.4f} ({params})"
    line += f"\nDashboard: optuna-dashboard {settings.storage}"
    return Outcome(metrics, tags, _pictures(study, folder), line)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no trial completed
        return None


def _pictures(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's history, importances and slice plots, as far as the trials allow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # It says at INFO that it plots numbers given as strings (the categorical choices) as such.
    logging.getLogger("matplotlib.category").setLevel(logging.WARNING)
    from optuna.visualization import matplotlib as plots

    drawers: dict[str, Callable[[optuna.Study], Any]] = {
        "optimization_history.png": plots.plot_optimization_history,
        "param_importances.png": plots.plot_param_importances,
        "slice.png": plots.plot_slice,
    }
    saved = []
    for name, draw in drawers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks these experimental
                axes = draw(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.savefig(folder / name, dpi=100, bbox_inches="tight")
            plt.close(figure)
            saved.append(folder / name)
        except Exception as exc:  # too few trials for this picture
            log.info(f"No {name}: {exc}")
    return saved
