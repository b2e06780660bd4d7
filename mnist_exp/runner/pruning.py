"""The engine callback that reports a trial's metric after each epoch and stops a pruned one.

Apart from `trial`, since it imports the training loop (torch): a run imports torch only
once Hydra has accepted its command line, and outside a search not for this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mnist_exp.training import engine

if TYPE_CHECKING:
    from mnist_exp.search.trial import JobTrial


class Pruning(engine.Callback):
    """Reports `metric` to the trial after each epoch; stops training when it is pruned."""

    def __init__(self, trial: JobTrial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned_at: int | None = None  # the epoch training stopped after

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        if self.trial.report(epoch, metrics.get(self.metric)):
            self.pruned_at = epoch
            raise engine.StopTraining(
                f"Optuna trial {self.trial.number} is pruned: its {self.metric} "
                f"{metrics[self.metric]:.4f} is not promising"
            )
