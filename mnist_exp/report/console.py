"""What a run prints: a progress bar on a terminal, the seed's lines otherwise, a summary."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path

from torch import Tensor
from tqdm import tqdm

from mnist_exp.config.paths import PROJECT_ROOT
from mnist_exp.training.engine import Callback, EvalResult

log = logging.getLogger("mnist_exp")
_POSTFIX_EVERY_S = 0.25  # how often the bar's loss and images/s are brought up to date


def wants_progress_bar(setting: bool | None, in_sweep: bool) -> bool:
    """`setting` when given; else a bar only for one run whose stdout and stderr are terminals."""
    if setting is not None:
        return setting
    return not in_sweep and sys.stdout.isatty() and sys.stderr.isatty()


class Console(Callback):
    """A bar per epoch, or the seed's `Epoch [e/E], Step [s/S], Loss: x`; then the epoch's metrics.
    With the bar, run the loop in tqdm's `logging_redirect_tqdm()`: log lines print above it."""

    def __init__(self, every: int, batch_size: int, progress_bar: bool) -> None:
        self.every = every
        self.batch_size = batch_size
        self.progress_bar = progress_bar
        self._bar: tqdm | None = None
        self._epochs = self._steps = 0
        self._updated = 0.0

    def on_epoch_start(self, epoch: int, num_epochs: int, steps: int) -> None:
        self._epochs, self._steps = num_epochs, steps
        if self.progress_bar:
            self._bar = tqdm(
                total=steps,
                desc=f"epoch {epoch}/{num_epochs}",
                unit="step",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )
            self._updated = time.monotonic()

    def on_train_step(self, step: int, epoch: int, batch: int, loss: Tensor) -> None:
        bar = self._bar
        if bar is not None:
            bar.update()
            now = time.monotonic()
            if now - self._updated >= _POSTFIX_EVERY_S:
                self._updated = now
                images_per_s = batch * self.batch_size / max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(f"loss {loss.item():.4f}, {images_per_s:,.0f} images/s")
        elif self.every and batch % self.every == 0:
            log.info(
                f"Epoch [{epoch}/{self._epochs}], Step [{batch}/{self._steps}], "
                f"Loss: {loss.item():.4f}"
            )

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        shown = ", ".join(f"{k} {number(v)}" for k, v in metrics.items())
        log.info(f"Epoch [{epoch}/{self._epochs}] done: {shown}")


def number(value: float) -> str:
    """A metric as the lines show it: `10,070` from a thousand up (not `1.007e+04`), else
    four significant digits (`0.9556`)."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def accuracy_line(test: EvalResult) -> str:
    """The seed's line, its percentage to two decimals (`95.56 %`, not `95.55555555555556 %`)."""
    return (
        f"Test Accuracy of the model on the {test.total} test images: {100 * test.accuracy:.2f} %"
    )


def summary(
    *,
    run_id: str,
    run_name: str | None,
    test: EvalResult,
    checkpoint: Path,
    tracking_uri: str,
    experiment_id: str,
    has_model: bool,
) -> str:
    """The block a finished run ends with: result, checkpoint, model, the run in the UI."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        ui = f"{tracking_uri.rstrip('/')}/{page}"
    else:
        ui = f"{ui_command(tracking_uri)}, then http://127.0.0.1:5000/{page}"
    lines = [
        f"Run {run_id}" + (f" ({run_name})" if run_name else "") + " finished",
        f"  test accuracy  {test.accuracy:.2%} ({test.correct} of {test.total} test images)",
        f"  checkpoint     {checkpoint}",
    ]
    if has_model:
        lines.append(f"  model          runs:/{run_id}/model (try: mnist-predict {run_id} IMAGE)")
    lines.append(f"  MLflow UI      {ui}")
    return "\n".join(lines)


def ui_command(tracking_uri: str) -> str:
    """scripts/ui.sh on this store (`mlflow` is on the PATH only in the active virtualenv),
    in full but from the project's folder."""
    script = Path("scripts", "ui.sh")
    shown = script if Path.cwd() == PROJECT_ROOT else PROJECT_ROOT / script
    default = f"sqlite:///{PROJECT_ROOT / 'mlruns' / 'mlflow.db'}"
    store = "" if tracking_uri == default else f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} "
    return f"{store}bash {shlex.quote(str(shown))}"
