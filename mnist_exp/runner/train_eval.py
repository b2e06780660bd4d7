"""The run's middle: train with the callbacks, test, save the weights, record what users look at."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.nn import Module
from tqdm.contrib.logging import logging_redirect_tqdm

from mnist_exp import names
from mnist_exp.config.world import ONE_PROCESS, World
from mnist_exp.report import plots
from mnist_exp.report.console import Console, accuracy_line, wants_progress_bar
from mnist_exp.runner import servable
from mnist_exp.runner.build import Setup, channels_last
from mnist_exp.runner.callbacks import Checkpointer, CheckpointModels, MetricsLogger
from mnist_exp.tracking.remote import RemoteRun
from mnist_exp.training import checkpoint, engine

log = logging.getLogger("mnist_exp")


def train_and_evaluate(
    cfg: DictConfig,
    setup: Setup,
    run: RemoteRun,
    out_dir: Path,
    start: tuple[int, int],
    in_sweep: bool,
    startup_s: Callable[[], float],
    *,
    callbacks: Sequence[engine.Callback] = (),
    world: World = ONE_PROCESS,
) -> tuple[engine.EvalResult, dict[str, float]]:
    """Train after `start` (epoch, step), checkpointing each epoch; test; save `model.ckpt`.

    `callbacks` listen to the loop beside the run's own (a search's pruning). With a monitor
    (`setup.monitor`), training may stop early, and what is tested, saved and served are the
    best epoch's weights (`trainer.test_best`), the last epoch's test accuracy recorded too.

    Then per-class test accuracy, the pictures (`mlflow.log_plots`) and the servable model
    (`mlflow.log_model`). Returns the test result and the last value of each metric logged.
    In a `world` of several processes this is rank 0's part (`follow`: the others').
    """
    # torch.compile makes an OptimizedModule, a Module, which torch annotates as a callable.
    net = cast(Module, torch.compile(setup.model)) if cfg.trainer.compile else setup.model
    steps = _step_options(cfg, setup)
    logger = MetricsLogger(run, cfg.trainer.log_every_n_steps, startup_s)
    progress_bar = wants_progress_bar(cfg.trainer.progress_bar, in_sweep)
    monitor = setup.monitor
    models = CheckpointModels(
        setup,
        run,
        out_dir / names.CHECKPOINT_MODEL_WEIGHTS,
        cfg.mlflow.log_checkpoints if cfg.mlflow.log_model else "none",
        lambda at: servable.describe(cfg, setup, at),
    )
    listeners = [
        logger,
        Console(cfg.trainer.print_every_n_steps, cfg.data.batch_size, progress_bar),
        Checkpointer(setup, run, out_dir / names.RESUME_CHECKPOINT, out_dir / names.BEST_WEIGHTS),
        *([monitor] if monitor is not None else []),
        models,
        *callbacks,
    ]
    with logging_redirect_tqdm():
        step = _fit(cfg, setup, net, start, listeners, world)
    models.flush()  # the last kept epoch's model, its metrics all logged
    if monitor is not None and monitor.stopped_at is not None:
        stopped = {names.EARLY_STOPPED_TAG: "true"}
        run.set_tags(stopped | {names.EARLY_STOPPED_AT_EPOCH_TAG: str(monitor.stopped_at)})
    test = _test(net, setup, cfg.data.eval_batch_size, steps)
    best: dict[str, float] = {}
    if monitor is not None and monitor.best_epoch is not None:
        test, best = _best_epoch(net, setup, cfg, steps, test)
    log.info(accuracy_line(test))
    assert test.targets is not None and test.predictions is not None
    confusion = plots.confusion_matrix(test.targets, test.predictions, cfg.model.num_classes)
    classes = class_names(setup.data.classes, len(confusion))
    per_class = {
        names.class_metric(classes[k]): v for k, v in plots.per_class_accuracy(confusion).items()
    }
    test_metrics = {
        names.TEST_LOSS: test.loss,
        names.TEST_ACCURACY: test.accuracy,
        **per_class,
        **best,
    }
    run.log_metrics(test_metrics, step)
    weights = out_dir / names.FINAL_WEIGHTS
    # Saved from the CPU whatever the device, so that it loads on a machine without a GPU.
    checkpoint.write_atomic({k: v.cpu() for k, v in setup.model.state_dict().items()}, weights)
    run.log_artifact(weights, names.CHECKPOINTS)
    if cfg.mlflow.log_model:  # the tracker builds the model while this process draws
        run.sync()  # the test metrics first: they are linked to the model
        run.log_model(weights, servable.describe(cfg, setup, step))
    if cfg.mlflow.log_plots:
        _record_plots(run, test, confusion, setup.data.test.images, classes, out_dir / names.PLOTS)
    return test, logger.latest | test_metrics


def follow(cfg: DictConfig, setup: Setup, start: tuple[int, int], world: World) -> None:
    """Train as rank `world.rank` (not 0) of a data-parallel run: the same steps as rank 0,
    which records, tests and saves; this rank records and writes nothing."""
    _fit(cfg, setup, setup.model, start, [], world)


def _fit(
    cfg: DictConfig,
    setup: Setup,
    net: Module,
    start: tuple[int, int],
    listeners: Sequence[engine.Callback],
    world: World,
) -> int:
    """`engine.fit` as `cfg` says, after `start` (epoch, step); returns the global step."""
    epochs = cfg.trainer.epochs
    if setup.monitor is not None and setup.monitor.stopped_at is not None:
        epochs = start[0]  # it had stopped early when it was cut short: only test and record
    return engine.fit(
        net,
        setup.optimizer,
        setup.data,
        engine.Schedule(
            epochs=epochs,
            batch_size=cfg.data.batch_size,
            eval_batch_size=cfg.data.eval_batch_size,
            seed=cfg.trainer.seed,
            start_epoch=start[0],
            start_step=start[1],
        ),
        device=setup.device,
        steps=_step_options(cfg, setup),
        augmentation=engine.Augmentation(
            max_shift=cfg.data.max_shift,
            max_rotation=cfg.data.max_rotation,
            max_scale=cfg.data.max_scale,
        ),
        scheduler=setup.scheduler,
        callbacks=listeners,
        world=world,
    )


def _step_options(cfg: DictConfig, setup: Setup) -> engine.StepOptions:
    """How each step computes, as `cfg` says, on `setup.device`."""
    return engine.StepOptions(
        precision=str(cfg.trainer.precision),
        channels_last=channels_last(cfg, setup.device),
        label_smoothing=cfg.trainer.label_smoothing,
        check_every=cfg.trainer.log_every_n_steps,
        cuda_graph=cfg.trainer.cuda_graph,
    )


def _test(
    net: Module, setup: Setup, batch_size: int, steps: engine.StepOptions
) -> engine.EvalResult:
    """The test set's loss, accuracy and predictions, with `net`'s weights as they are now."""
    return engine.evaluate(
        net,
        setup.data.test.to(setup.device),
        batch_size=batch_size,
        precision=steps.precision,
        channels_last=steps.channels_last,
        keep_predictions=True,
    )


def _best_epoch(
    net: Module,
    setup: Setup,
    cfg: DictConfig,
    steps: engine.StepOptions,
    last: engine.EvalResult,
) -> tuple[engine.EvalResult, dict[str, float]]:
    """The test result to record, `last` (the last epoch's) or with `trainer.test_best` the best
    epoch's, its weights loaded into the model; and the best epoch's metrics."""
    monitor = setup.monitor
    assert monitor is not None and monitor.best_epoch is not None
    assert monitor.best_value is not None and monitor.best_weights is not None
    best = {
        names.BEST_EPOCH: float(monitor.best_epoch),
        names.best_metric(monitor.metric): monitor.best_value,
    }
    if not cfg.trainer.test_best:
        return last, best
    best[names.TEST_ACCURACY_LAST_EPOCH] = last.accuracy
    if monitor.best_epoch == monitor.epoch:
        return last, best
    log.info(
        f"Last epoch ({monitor.epoch}): {accuracy_line(last)}; testing epoch "
        f"{monitor.best_epoch}, the best {monitor.metric} ({monitor.best_value:.4f})"
    )
    setup.model.load_state_dict(monitor.best_weights)  # in place: `net` (compiled) follows
    return _test(net, setup, cfg.data.eval_batch_size, steps), best


def class_names(named: Sequence[str], num_classes: int) -> list[str]:
    """Each output's name: the data's class names (folders), else (and beyond them) its index."""
    return [named[k] if k < len(named) else str(k) for k in range(num_classes)]


def _record_plots(
    run: RemoteRun,
    test: engine.EvalResult,
    confusion: Tensor,
    images: Tensor,
    classes: list[str],
    folder: Path,
) -> None:
    """Learning curves (read back from the run, so a resumed run's too), confusion, mistakes."""
    assert test.targets is not None and test.predictions is not None
    history = run.metric_history(plots.CURVES)
    folder.mkdir(parents=True, exist_ok=True)
    plots.learning_curves(history, folder / "learning_curves.png")
    plots.confusion_plot(confusion, folder / "confusion_matrix.png", classes)
    plots.misclassified_grid(
        images, test.targets, test.predictions, folder / "misclassified.png", classes
    )
    run.log_artifact(folder, names.PLOTS)
