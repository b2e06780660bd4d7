"""What a run prints: the seed's progress lines, a progress bar on a terminal, the result."""

from __future__ import annotations

import logging
import sys

from torch import Tensor
from tqdm import tqdm

from mnist_exp.engine import Callback

log = logging.getLogger("mnist_exp")


class Console(Callback):
    """Logs `Epoch [e/E], Step [s/S], Loss: x` every `every` steps, as the seed prints.

    On a terminal an epoch also gets a progress bar with the latest loss; run the loop inside
    `tqdm.contrib.logging.logging_redirect_tqdm()` so that log lines print above the bar.
    """

    def __init__(self, every: int, progress_bar: bool | None = None) -> None:
        self.every = every
        self.progress_bar = sys.stdout.isatty() if progress_bar is None else progress_bar
        self._bar: tqdm | None = None
        self._epochs = self._steps = 0

    def on_epoch_start(self, epoch: int, num_epochs: int, steps: int) -> None:
        self._epochs, self._steps = num_epochs, steps
        if self.progress_bar:
            self._bar = tqdm(
                total=steps,
                desc=f"epoch {epoch}/{num_epochs}",
                unit="step",
                leave=False,
                dynamic_ncols=True,
            )

    def on_train_step(self, step: int, epoch: int, batch: int, loss: Tensor) -> None:
        if self._bar is not None:
            self._bar.update()
        if self.every and batch % self.every == 0:
            value = loss.item()
            line = (
                f"Epoch [{epoch}/{self._epochs}], Step [{batch}/{self._steps}], Loss: {value:.4f}"
            )
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            log.info(line)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log.info(f"Epoch [{epoch}/{self._epochs}] done: {shown}")
