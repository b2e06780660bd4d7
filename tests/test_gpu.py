"""Training on a CUDA GPU, as a user runs it: skipped where there is none (as in CI)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import CONVNET_NOISE, SMALL, in_process, loss_history, only_run, runs_in
from mlflow.tracking import MlflowClient

from mnist_exp import api, rerun
from mnist_exp.api import RunResult
from mnist_exp.training.compute import seed_everything
from mnist_exp.training.data import Data, Split
from mnist_exp.training.engine import Callback, Schedule, StepOptions, fit
from mnist_exp.training.networks import ConvNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def train_on_gpu(
    data_root: Path, tracking_uri: str, tmp_path: Path, monkeypatch
) -> Iterator[Callable[..., RunResult]]:
    """`api.train` of SMALL on the GPU, in `tmp_path/run` (no plots or MLflow model).

    What a run sets for the whole process (determinism, threads) is put back after.
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark, threads = torch.backends.cudnn.benchmark, torch.get_num_threads()

    def train(*overrides: str) -> RunResult:
        return api.train(
            [
                f"data.root={data_root}",
                f"mlflow.tracking_uri={tracking_uri}",
                f"hydra.run.dir={tmp_path}/run",
                "mlflow.log_plots=false",
                "mlflow.log_model=false",
                "device=cuda",
                *SMALL,
                *overrides,
            ]
        )

    yield train
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_a_gpu_run_records_everything_and_its_checkpoint_loads_without_a_gpu(
    train_on_gpu, tracking_uri: str, capfd, precision: str
):
    result = train_on_gpu(f"trainer.precision={precision}")
    assert "Training on cuda" in "".join(capfd.readouterr())
    (run,) = runs_in(tracking_uri)
    assert run.info.status == result.status == "FINISHED"
    assert run.data.params["device.type"] == "cuda"
    assert run.data.metrics["test_accuracy"] > 0.5  # 640 images, 2 epochs: well above chance
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 21))
    assert result.checkpoint is not None
    weights = torch.load(result.checkpoint, weights_only=True)
    assert {t.device.type for t in weights.values()} == {"cpu"}
    ConvNet().load_state_dict(weights)


@pytest.mark.slow
@pytest.mark.parametrize("graph", ["false", "true"])
def test_a_deterministic_gpu_run_reruns_bit_for_bit(
    train_on_gpu, tracking_uri: str, tmp_path: Path, capfd, graph: str
):
    run_id = train_on_gpu("trainer.deterministic=true", f"trainer.cuda_graph={graph}").run_id
    argv = [run_id, f"hydra.run.dir={tmp_path}/rerun", f"mlflow.tracking_uri={tracking_uri}"]
    ended = in_process(rerun.main, argv, capfd)
    assert ended.code == 0, ended.err
    original = MlflowClient(tracking_uri).get_run(run_id)
    again = only_run(tracking_uri, **{"mnist_exp.rerun_of": run_id})
    assert loss_history(tracking_uri, again.info.run_id) == loss_history(tracking_uri, run_id)
    assert again.data.metrics["test_accuracy"] == original.data.metrics["test_accuracy"]
    first = torch.load(tmp_path / "run" / "model.ckpt", weights_only=True)
    second = torch.load(tmp_path / "rerun" / "model.ckpt", weights_only=True)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "graphed"),
    [(("model=wide_convnet",), True), (("data.max_shift=2", "trainer.epochs=1"), False)],
)
def test_a_gpu_run_says_when_its_step_is_not_replayed_as_a_graph(
    train_on_gpu, capfd, overrides: tuple[str, ...], graphed: bool
):
    """Dropout replays from the graph; augmentation draws on the CPU, so its steps launch."""
    result = train_on_gpu("trainer.cuda_graph=true", *overrides)
    said = "not replayed as a CUDA graph: the augmentation" in "".join(capfd.readouterr())
    assert said != graphed
    assert result.status == "FINISHED"
    assert result.metrics["test_accuracy"] > 0.3


class _Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_step(self, step, epoch, batch, loss):
        self.values.append(loss.item())


def _fit_on_gpu(cuda_graph: bool, optimizer: str) -> tuple[list[float], dict]:
    """Two epochs of 100 images at batch size 32 (3 full batches, then 4 images), one-cycle."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (100, 1, 28, 28), generator=g, dtype=torch.uint8)
    split = Split(images, torch.randint(0, 10, (100,), generator=g))
    seed_everything(0)
    model = ConvNet().cuda()
    if optimizer == "adam":
        optim: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    else:
        optim = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=0.01, total_steps=8)
    losses = _Losses()
    fit(model, optim, Data(split, None, split),
        Schedule(epochs=2, batch_size=32, eval_batch_size=50, seed=0),
        device=torch.device("cuda"), steps=StepOptions(cuda_graph=cuda_graph),
        scheduler=scheduler, callbacks=[losses])  # fmt: skip
    return losses.values, model.state_dict()


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_step_replayed_from_a_cuda_graph_trains_as_the_launched_one(optimizer: str, caplog):
    """Each epoch's short last batch is launched between replays: the graph's gradients and
    the optimizer's state hold. One-cycle moves Adam's lr and beta1 every step: the graph
    replays them (Adam's update is in the graph; SGD's is launched after each replay)."""
    with caplog.at_level(logging.INFO, logger="mnist_exp.training.cuda_graph"):
        replayed, graph_weights = _fit_on_gpu(True, optimizer)
    assert "not replayed" not in caplog.text
    assert ("steps after each replay" in caplog.text) == (optimizer == "sgd")
    launched, weights = _fit_on_gpu(False, optimizer)
    assert replayed == pytest.approx(launched, rel=1e-4)
    # Weights compared as a whole: a few elements part by rounding (max-pool's ties, Adam's
    # tiny second moments), where a missing or doubled update would move them all.
    for key in weights.keys() - CONVNET_NOISE:
        apart = torch.linalg.vector_norm((graph_weights[key] - weights[key]).double())
        assert apart <= 1e-2 * torch.linalg.vector_norm(weights[key].double()) + 1e-6, key
