"""The loop's listeners that record: metrics to the run, and a resume checkpoint each epoch.

Each stands alone: neither depends on the other, nor on their order in the list.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from mnist_exp import names
from mnist_exp.report.model_spec import ModelSpec
from mnist_exp.runner.build import Setup
from mnist_exp.tracking.remote import RemoteRun
from mnist_exp.training import checkpoint, engine


class MetricsLogger(engine.Callback):
    """`train_loss` every `every` steps, the epoch's metrics, and `startup_s` at the first step.

    `latest` holds the last value of each metric it logged, for the run's optimized metric.
    """

    def __init__(self, run: RemoteRun, every: int, startup_s: Callable[[], float]) -> None:
        self.run = run
        self.every = every
        self.startup_s = startup_s
        self.latest: dict[str, float] = {}
        self._started = False

    def on_train_step(self, step: int, epoch: int, batch: int, loss: Tensor) -> None:
        if not self._started:
            self._started = True
            self.run.log_metric(names.STARTUP_S, self.startup_s(), step)
        if step % self.every == 0:
            self.run.log_metric(names.TRAIN_LOSS, loss, step)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        epoch_metrics = {**metrics, names.EPOCH: float(epoch)}
        self.run.log_metrics(epoch_metrics, step)
        self.latest |= epoch_metrics


class Checkpointer(engine.Callback):
    """After each epoch, an atomic resume checkpoint, kept in the run folder and in MLflow;
    with a monitor, the best epoch's weights beside it (`best`) whenever an epoch is the best.

    The upload follows every loss logged so far (the recorder keeps its requests in order),
    so MLflow's copy never claims steps whose losses MLflow does not hold. While the tracking
    server is away the local copy is written all the same and the upload waits (`defer`).
    """

    def __init__(self, setup: Setup, run: RemoteRun, path: Path, best: Path) -> None:
        self.setup, self.run, self.path, self.best = setup, run, path, best
        self.best_written: int | None = None  # the epoch whose weights this wrote to `best`

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        s = self.setup
        monitor = s.monitor
        if monitor is not None:
            monitor.observe(epoch, metrics)  # maybe before its own callback: it takes each once
            # Before the resume checkpoint, and again after a resume: a run cut short between
            # the two files, resumed, never leaves `best` holding other weights than its own.
            if monitor.best_weights is not None and monitor.best_epoch != self.best_written:
                checkpoint.write_atomic(monitor.best_weights, self.best)
                self.run.log_artifact(self.best, names.CHECKPOINTS, defer=True)
                self.best_written = monitor.best_epoch
        state = checkpoint.training_state(s.model, s.optimizer, s.scheduler, epoch, step, monitor)
        checkpoint.save(state | {"run_id": self.run.run_id}, self.path)
        self.run.log_artifact(self.path, names.CHECKPOINTS, defer=True)


class CheckpointModels(engine.Callback):
    """Each improving epoch's weights (`improved`: by the run's monitor) or every epoch's, as an
    MLflow 3 LoggedModel `checkpoint` at the epoch's step with that step's metrics linked, so
    that `mlflow.search_logged_models(order_by=...)` ranks a run's checkpoints.

    MLflow links the metrics already recorded at the step: a model is sent at the next epoch's
    start, or by `flush` after training, once every listener has logged its epoch.
    """

    def __init__(
        self,
        setup: Setup,
        run: RemoteRun,
        folder: Path,
        which: str,
        spec: Callable[[int], ModelSpec],
    ) -> None:
        self.setup, self.run, self.folder, self.which, self.spec = setup, run, folder, which, spec
        self._due: tuple[Path, int] | None = None

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        monitor = self.setup.monitor
        if self.which == "improved":
            if monitor is None:
                return
            monitor.observe(epoch, metrics)
            if monitor.best_epoch != epoch or monitor.best_weights is None:
                return
            state = monitor.best_weights  # this epoch's, already copied to the CPU
        elif self.which == "every":
            state = {k: v.detach().cpu() for k, v in self.setup.model.state_dict().items()}
        else:
            return
        path = self.folder / f"epoch-{epoch}.ckpt"
        checkpoint.write_atomic(state, path)
        self._due = (path, step)

    def on_epoch_start(self, epoch: int, num_epochs: int, steps: int) -> None:
        self.flush()

    def flush(self) -> None:
        """Send the model of the last kept epoch, if not sent yet."""
        if self._due is not None:
            path, step = self._due
            self._due = None
            self.run.log_model(path, self.spec(step), names.CHECKPOINT_MODEL)
