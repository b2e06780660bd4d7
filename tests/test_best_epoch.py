"""The best epoch (issue 27): its weights kept, tested and served; early stopping; a resumed run
chooses and stops as the uninterrupted one did. Runs go in the test's process, on 256 images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_store, loss_history, mlflow_uri, runs_in
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from mnist_exp import api, names
from mnist_exp.runner.callbacks import Checkpointer
from mnist_exp.runner.rerun_config import write_rerun_config
from mnist_exp.training import checkpoint, engine
from mnist_exp.training.data import Data, Split
from mnist_exp.training.monitor import Monitor
from mnist_exp.training.networks import ConvNet

# Adam at 0.02 in batches of 16 learns 256 images fast and noisily: the validation accuracy
# peaks at epoch 4, and does not improve on it in the next two epochs.
NOISY = (
    "data.max_train_samples=256",
    "data.val_size=128",
    "data.max_test_samples=200",
    "data.batch_size=16",
    "optimizer.lr=0.02",
    "trainer.print_every_n_steps=0",
)
EPOCHS = 5
STOPPING = (*NOISY, "trainer.epochs=10", "trainer.early_stopping.patience=2")
Weights = dict[str, torch.Tensor]
RECORDED = Path(__file__).resolve().parent / "data" / "recorded_run"  # by older code (02e1143)


def _keep_epochs(patch: pytest.MonkeyPatch) -> dict[int, Weights]:
    """Each epoch's weights, as the run's checkpointer sees them at the epoch's end."""
    kept: dict[int, Weights] = {}
    write = Checkpointer.on_epoch_end

    def keep(self: Checkpointer, epoch: int, step: int, metrics: dict[str, float]) -> None:
        write(self, epoch, step, metrics)
        kept[epoch] = {
            k: v.detach().cpu().clone() for k, v in self.setup.model.state_dict().items()
        }

    patch.setattr(Checkpointer, "on_epoch_end", keep)
    return kept


def _same(a: Weights, b: Weights) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _values(uri: str, run_id: str, key: str) -> list[float]:
    return [
        m.value
        for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("test_best", [True, False])
def test_the_best_epoch_is_kept_and_by_default_tested_saved_and_served(
    test_best: bool, mnist_train, tracking_uri: str, tmp_path: Path, monkeypatch
) -> None:
    epochs = _keep_epochs(monkeypatch)
    serve = f"mlflow.log_model={str(test_best).lower()}"  # the served model: checked once
    ended = mnist_train(*NOISY, f"trainer.epochs={EPOCHS}", f"trainer.test_best={test_best}", serve)
    assert ended.code == 0, ended.err
    (run,) = runs_in(tracking_uri)
    run_id, metrics, folder = run.info.run_id, run.data.metrics, tmp_path / "run"
    accuracy = _values(tracking_uri, run_id, names.VAL_ACCURACY)  # the default monitor
    best = accuracy.index(max(accuracy)) + 1
    assert len(accuracy) == EPOCHS and best < EPOCHS  # the config is noisy enough
    assert metrics[names.BEST_EPOCH] == best
    assert metrics[names.best_metric(names.VAL_ACCURACY)] == max(accuracy)
    assert _same(torch.load(folder / names.BEST_WEIGHTS, weights_only=True), epochs[best])
    files = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run_id, names.CHECKPOINTS)}
    assert names.BEST_WEIGHTS in files
    assert names.EARLY_STOPPED_TAG not in run.data.tags

    tested = best if test_best else EPOCHS
    assert _same(torch.load(folder / names.FINAL_WEIGHTS, weights_only=True), epochs[tested])
    assert (names.TEST_ACCURACY_LAST_EPOCH in metrics) is test_best
    if test_best:
        with mlflow_uri(tracking_uri):
            served = MlflowClient(tracking_uri).download_artifacts(
                run_id, f"{names.MODEL}/artifacts/{names.FINAL_WEIGHTS}", str(tmp_path / "served")
            )
        assert _same(torch.load(served, weights_only=True), epochs[best])


@pytest.fixture(scope="module")
def stopped_early(data_root: Path, empty_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A run that early stopping ends before its 10 epochs, uninterrupted: its run, its
    train_loss history and its model.ckpt."""
    tmp = tmp_path_factory.mktemp("stopped-early")
    uri = copy_store(empty_store, f"sqlite:///{tmp}/mlruns/mlflow.db")
    where = [f"data.root={data_root}", f"mlflow.tracking_uri={uri}", f"hydra.run.dir={tmp}/run"]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = api.train([*where, *STOPPING, "mlflow.log_plots=false", "mlflow.log_model=false"])
    run = MlflowClient(uri).get_run(result.run_id)
    return (
        run,
        loss_history(uri, result.run_id),
        torch.load(tmp / "run" / names.FINAL_WEIGHTS, weights_only=True),
    )


@pytest.mark.slow
def test_early_stopping_ends_the_run_before_its_epochs_and_says_so(stopped_early) -> None:
    run, history, _ = stopped_early
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags[names.EARLY_STOPPED_TAG] == "true"
    stopped = int(tags[names.EARLY_STOPPED_AT_EPOCH_TAG])
    assert stopped < 10 and metrics[names.EPOCH] == stopped
    assert metrics[names.BEST_EPOCH] == stopped - 2  # patience 2: two epochs without a better one
    assert len(history) == stopped * 256 // 16  # the steps of the epochs it trained, no more
    assert names.PRUNED_TAG not in tags  # not a search's pruning


@pytest.mark.slow
def test_a_run_cut_short_resumes_to_the_same_early_stop(
    stopped_early, mnist_train, tracking_uri: str, tmp_path: Path, monkeypatch
) -> None:
    """Cut after the epoch before the stop, one epoch of patience used up: the resumed run
    stops where the uninterrupted one did, with its best epoch's weights from the checkpoint."""
    reference, history, weights = stopped_early
    stopped = int(reference.data.tags[names.EARLY_STOPPED_AT_EPOCH_TAG])
    write = Checkpointer.on_epoch_end

    def cut(self: Checkpointer, epoch: int, step: int, metrics: dict[str, float]) -> None:
        write(self, epoch, step, metrics)
        if epoch == stopped - 1:
            raise RuntimeError("the machine went away")

    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "on_epoch_end", cut)
        assert mnist_train(*STOPPING).code == 1
    (run,) = runs_in(tracking_uri)
    assert run.info.status == "FAILED"

    resume = (f"trainer.resume={run.info.run_id}", f"hydra.run.dir={tmp_path}/resumed")
    ended = mnist_train(*STOPPING, *resume)
    assert ended.code == 0, ended.err
    resumed = MlflowClient(tracking_uri).get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert loss_history(tracking_uri, run.info.run_id) == history
    for key in (names.EARLY_STOPPED_TAG, names.EARLY_STOPPED_AT_EPOCH_TAG):
        assert resumed.data.tags[key] == reference.data.tags[key]
    for key in (names.BEST_EPOCH, names.TEST_ACCURACY, names.TEST_ACCURACY_LAST_EPOCH):
        assert resumed.data.metrics[key] == reference.data.metrics[key]
    assert _same(torch.load(tmp_path / "resumed" / names.FINAL_WEIGHTS, weights_only=True), weights)


def test_a_test_metric_to_monitor_is_refused_in_one_line_before_any_run(
    mnist_train, tracking_uri: str
) -> None:
    ended = mnist_train("data.val_size=100", "trainer.monitor=test_accuracy")
    assert ended.code == 1 and ended.err.count("\n") == 1, ended.err
    assert ended.err.startswith("error: trainer.monitor='test_accuracy' must be a metric of")
    assert "val_accuracy" in ended.err and ended.err.rstrip().endswith("conf/")
    assert runs_in(tracking_uri) == []


def _fit(model: ConvNet, callbacks: list[engine.Callback]) -> int:
    """Up to 6 epochs on random images and labels: nothing to learn, so the validation loss
    soon stops improving. Returns the global step."""
    draw = torch.Generator().manual_seed(0)

    def split() -> Split:
        images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=draw)
        return Split(images, torch.randint(0, 10, (64,), generator=draw))

    train, val = split(), split()
    return engine.fit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        Data(train=train, val=val, test=val),
        engine.Schedule(epochs=6, batch_size=32, eval_batch_size=64, seed=0),
        device=torch.device("cpu"),
        callbacks=callbacks,
    )


class _Seen(engine.Callback):
    """The epochs whose end it saw; with a monitor, what the monitor knew then, asked first as
    the checkpointer asks it."""

    def __init__(self, monitor: Monitor | None = None) -> None:
        self.monitor = monitor
        self.epochs: list[int] = []
        self.states: list[tuple[int | None, int]] = []

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.epochs.append(epoch)
        if self.monitor is not None:
            self.monitor.observe(epoch, metrics)
            self.states.append((self.monitor.best_epoch, self.monitor.stale))


def _net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet()


def test_a_monitor_stops_training_and_its_state_does_not_depend_on_the_callbacks_order() -> None:
    states = []
    for monitor_first in (True, False):
        model = _net()
        monitor = Monitor(model, names.VAL_LOSS, "min", patience=1)
        seen = _Seen(monitor)
        step = _fit(model, [monitor, seen] if monitor_first else [seen, monitor])
        assert monitor.stopped_at == seen.epochs[-1] < 6 and step == 2 * seen.epochs[-1]
        states.append(seen.states)
    assert states[0] == states[1]


def test_a_searchs_pruning_and_early_stopping_end_training_whichever_comes_first() -> None:
    class Prune(engine.Callback):
        def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
            if epoch == 1:
                raise engine.StopTraining("pruned")

    model = _net()
    monitor, seen = Monitor(model, names.VAL_LOSS, "min", patience=3), _Seen()
    assert _fit(model, [monitor, Prune(), seen]) == 2  # pruned first: one epoch of 2 steps
    assert seen.epochs == [1] and monitor.stopped_at is None and monitor.best_epoch == 1


def test_a_checkpoint_of_older_code_leaves_the_monitor_fresh() -> None:
    """Resume checkpoints written before the best epoch hold no monitor: they still load."""
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    state = checkpoint.training_state(model, optimizer, None, epoch=1, step=2)  # no monitor
    monitor = Monitor(model, names.VAL_ACCURACY, "max")
    assert checkpoint.restore_training_state(state, model, optimizer, None, monitor) == (1, 2)
    assert monitor.epoch == 0 and monitor.best_epoch is None


def test_a_run_recorded_before_the_best_epoch_reruns_testing_its_last_epoch(
    tracking_uri: str, tmp_path: Path
) -> None:
    """Its recorded config has no trainer.test_best: the rerun tests the last epoch, as it did."""
    folder = tmp_path / "recorded"
    shutil.copytree(RECORDED / "artifacts" / names.HYDRA_FILES, folder / ".hydra")
    write_rerun_config(str(folder), [f"mlflow.tracking_uri={tracking_uri}"], False, tmp_path)
    assert OmegaConf.load(tmp_path / "rerun.yaml").trainer.test_best is False


@pytest.mark.slow
def test_each_improving_epoch_is_a_logged_model_ranked_by_its_validation_metrics(
    mnist_train, tracking_uri: str, tmp_path: Path
) -> None:
    import mlflow

    ended = mnist_train(*NOISY, f"trainer.epochs={EPOCHS}", "mlflow.log_model=true")
    assert ended.code == 0, ended.err
    (run,) = runs_in(tracking_uri)
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, names.VAL_ACCURACY)
    improving, best = [], -1.0
    for point in sorted(history, key=lambda m: m.step):
        if point.value > best:
            improving.append(point)
            best = point.value
    with mlflow_uri(tracking_uri):
        ranked = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"name = 'checkpoint' AND source_run_id = '{run.info.run_id}'",
            order_by=[{"field_name": "metrics.val_accuracy", "ascending": False}],
            output_format="list",
        )
        linked = [{m.key: (m.value, m.step) for m in model.metrics} for model in ranked]
        assert [v[names.VAL_ACCURACY] for v in linked] == [
            (p.value, p.step) for p in sorted(improving, key=lambda p: -p.value)
        ]
        assert all(names.VAL_LOSS in v for v in linked)
        best_model = mlflow.pyfunc.load_model(f"models:/{ranked[0].model_id}")
    kept = torch.load(tmp_path / "run" / names.BEST_WEIGHTS, weights_only=True)
    served = best_model.unwrap_python_model().net.state_dict()
    assert _same({k: v.cpu() for k, v in served.items()}, kept)
