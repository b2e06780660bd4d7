"""The best epoch of one per-epoch metric: its weights kept, and training stopped early once the
metric has not improved for `patience` epochs. Its state goes into the resume checkpoint."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from mnist_exp.training import engine


class Monitor(engine.Callback):
    """Watches `metric` at each epoch's end, higher better with `mode` "max", lower with "min".

    The best epoch is the one of the best value (the first, among equals); its weights are
    copied to the CPU. Early stopping (`patience` epochs, None: never) counts the epochs since
    the metric last improved by at least `min_delta`.
    """

    def __init__(
        self,
        model: nn.Module,
        metric: str,
        mode: str,
        *,
        patience: int | None = None,
        min_delta: float = 0.0,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be max or min, not {mode!r}")
        self.model, self.metric, self.mode = model, metric, mode
        self.patience, self.min_delta = patience, min_delta
        self.epoch = 0  # the last epoch observed
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.best_weights: dict[str, Tensor] | None = None  # a state_dict on the CPU
        self.reference: float | None = None  # the value of the last improvement by min_delta
        self.stale = 0  # epochs observed since then

    def observe(self, epoch: int, metrics: dict[str, float]) -> None:
        """Take the end of `epoch` into account, once: whichever callback calls this first
        (this one, or the checkpointer saving its state), the order of callbacks is free."""
        if epoch <= self.epoch:
            return
        self.epoch = epoch
        value = metrics.get(self.metric, math.nan)
        if self._improves(value, self.best_value, 0.0):
            self.best_epoch, self.best_value = epoch, value
            weights = self.model.state_dict()
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
        if self._improves(value, self.reference, self.min_delta):
            self.reference, self.stale = value, 0
        else:
            self.stale += 1

    @property
    def stopped_at(self) -> int | None:
        """The epoch after which early stopping ends training, once it does; else None."""
        stop = self.patience is not None and self.stale >= self.patience
        return self.epoch if stop else None

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.observe(epoch, metrics)
        if self.stopped_at is not None:
            by = f" by {self.min_delta:g} or more" if self.min_delta else ""
            known = self.best_epoch is not None
            best = f"{self.best_value:.4g} at epoch {self.best_epoch}" if known else "none"
            raise engine.StopTraining(
                f"early stopping: {self.metric} has not improved{by} for {self.patience} epochs "
                f"(best: {best})"
            )

    def state_dict(self) -> dict[str, Any]:
        """Everything observed so far, in tensors and plain values (`weights_only` loads it)."""
        return {
            "metric": self.metric,
            "epoch": self.epoch,
            "best_epoch": self.best_epoch,
            "best_value": self.best_value,
            "best_weights": self.best_weights,
            "reference": self.reference,
            "stale": self.stale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` of a monitor of the same metric."""
        if state["metric"] != self.metric:
            raise ValueError(f"the checkpoint watched {state['metric']}, not {self.metric}")
        self.epoch, self.stale = state["epoch"], state["stale"]
        self.best_epoch, self.best_value = state["best_epoch"], state["best_value"]
        self.best_weights, self.reference = state["best_weights"], state["reference"]

    def _improves(self, value: float, than: float | None, by: float) -> bool:
        """Whether `value` is better than `than` (None: nothing yet) by `by` or more."""
        if not math.isfinite(value):
            return False
        if than is None:
            return True
        gain = value - than if self.mode == "max" else than - value
        return gain > 0 and gain >= by
