"""The loop on a tiny in-memory set: deterministic, listened to, evaluated without gradients."""

import copy
import dataclasses
import functools
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CONVNET_NOISE

from mnist_exp.training import checkpoint, cuda_graph
from mnist_exp.training.checkpoint import restore_training_state, training_state
from mnist_exp.training.compute import cpu_threads, plain_cpu_convolutions, seed_everything
from mnist_exp.training.data import Data, Split, batch_indices
from mnist_exp.training.engine import (
    Callback,
    NonFiniteLossError,
    Schedule,
    StepOptions,
    _loss,
    epoch_generator,
    evaluate,
    fit,
)
from mnist_exp.training.networks import ConvNet, WideConvNet

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _tiny(n: int = 96) -> Data:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    split = Split(images, labels)
    return Data(train=split, val=Split(images[:32], labels[:32]), test=split)


class Recorder(Callback):
    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []
        self.epochs: list[tuple[int, int, dict]] = []

    def on_train_step(self, step, epoch, batch, loss):
        assert not loss.requires_grad
        self.losses.append((step, loss.item()))

    def on_epoch_end(self, epoch, step, metrics):
        self.epochs.append((epoch, step, metrics))


def _fit(seed: int, precision: str = "32", **steps) -> tuple[Recorder, ConvNet]:
    seed_everything(seed)
    model = ConvNet()
    recorder = Recorder()
    fit(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        _tiny(),
        Schedule(epochs=2, batch_size=32, eval_batch_size=50, seed=seed),
        device=torch.device("cpu"),
        steps=StepOptions(precision=precision, **steps),
        callbacks=[recorder],
    )
    return recorder, model


def test_fit_reports_every_step_and_epoch() -> None:
    recorder, _ = _fit(0)
    assert [s for s, _ in recorder.losses] == [1, 2, 3, 4, 5, 6]
    assert [(e, s) for e, s, _ in recorder.epochs] == [(1, 3), (2, 6)]
    metrics = recorder.epochs[-1][2]
    assert set(metrics) == {"train_images_per_s", "epoch_seconds", "val_loss", "val_accuracy"}
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["train_images_per_s"] > 0


def test_same_seed_same_losses_other_seed_other_losses() -> None:
    a, model_a = _fit(1)
    b, model_b = _fit(1)
    c, _ = _fit(2)
    assert a.losses == b.losses
    assert a.losses != c.losses
    for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_bf16_mixed_trains() -> None:
    recorder, _ = _fit(0, precision="bf16-mixed")
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in recorder.losses)


def test_label_smoothing_softens_the_training_loss_only() -> None:
    recorder, _ = _fit(0, label_smoothing=0.2)
    seed_everything(0)
    model = ConvNet()
    data = _tiny()
    (first, *_) = batch_indices(len(data.train), 32, epoch_generator(0, 1))
    logits = model(data.train.inputs(first))
    smoothed = F.cross_entropy(logits, data.train.labels[first], label_smoothing=0.2)
    plain = F.cross_entropy(logits, data.train.labels[first])
    assert recorder.losses[0][1] == pytest.approx(smoothed.item(), rel=1e-5)
    assert abs(smoothed.item() - plain.item()) > 1e-3
    assert recorder.epochs[-1][2]["val_loss"] == pytest.approx(
        evaluate(_fit(0, label_smoothing=0.2)[1], data.val, batch_size=50).loss
    )


def test_small_cpu_batches_run_on_one_thread() -> None:
    assert [cpu_threads(b, cores=2) for b in (1, 4, 5, 64)] == [1, 1, 2, 2]
    assert cpu_threads(64, cores=0) == 1


@pytest.mark.parametrize(
    ("batch_size", "precision", "onednn"),
    [(1, "32", False), (2, "32", True), (1, "bf16-mixed", True)],
)
def test_only_fp32_steps_at_batch_size_1_leave_onednn(batch_size, precision, onednn) -> None:
    seen: dict[str, set[bool]] = {"train": set(), "eval": set()}

    def record(module, inputs) -> None:
        seen["train" if module.training else "eval"].add(torch.backends.mkldnn.enabled)

    model = ConvNet()
    model.register_forward_pre_hook(record)
    fit(
        model,
        torch.optim.Adam(model.parameters()),
        _tiny(8),
        Schedule(epochs=1, batch_size=batch_size, eval_batch_size=8, seed=0),
        device=torch.device("cpu"),
        steps=StepOptions(precision=precision),
    )
    assert plain_cpu_convolutions(torch.device("cpu"), batch_size, precision) is not onednn
    assert seen == {"train": {onednn}, "eval": {True}}
    assert torch.backends.mkldnn.enabled


def test_epoch_generator_depends_on_seed_and_epoch_only() -> None:
    def perm(seed, epoch):
        return torch.randperm(100, generator=epoch_generator(seed, epoch)).tolist()

    assert perm(0, 1) == perm(0, 1)
    assert len({tuple(perm(s, e)) for s in (0, 1) for e in (0, 1)}) == 4


def test_evaluate_counts_correct_predictions_in_eval_mode() -> None:
    data = _tiny(40)
    model = ConvNet().train()
    result = evaluate(model, data.test, batch_size=16)
    assert not model.training
    assert result.total == 40
    with torch.no_grad():
        predicted = model(data.test.inputs(torch.arange(40))).argmax(1)
    assert result.correct == int((predicted == data.test.labels).sum())
    assert result.accuracy == result.correct / 40


def test_resuming_from_a_saved_state_matches_an_uninterrupted_fit(tmp_path) -> None:
    """Stop after epoch 1, save through a weights-only checkpoint, restore, finish epoch 2."""

    def setup(seed: int):
        seed_everything(seed)
        model = ConvNet().to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=6)
        return model, optimizer, scheduler

    kwargs = dict(device=torch.device("cpu"), steps=StepOptions(channels_last=True))
    two = Schedule(epochs=2, batch_size=32, eval_batch_size=50, seed=5)
    straight, recorder = setup(5), Recorder()
    fit(*straight[:2], _tiny(), two, scheduler=straight[2], callbacks=[recorder], **kwargs)

    first, stopped = setup(5), Recorder()
    one = dataclasses.replace(two, epochs=1)
    step = fit(*first[:2], _tiny(), one, scheduler=first[2], callbacks=[stopped], **kwargs)
    checkpoint.save(training_state(*first, epoch=1, step=step) | {"run_id": "r"}, tmp_path / "c")
    torch.manual_seed(123)  # the RNGs must come back from the checkpoint, not from here
    second = setup(99)
    epoch, step = restore_training_state(checkpoint.load(tmp_path / "c"), *second)
    resumed = dataclasses.replace(two, start_epoch=epoch, start_step=step)
    fit(*second[:2], _tiny(), resumed, scheduler=second[2], callbacks=[stopped], **kwargs)
    assert stopped.losses == recorder.losses
    for x, y in zip(
        straight[0].state_dict().values(), second[0].state_dict().values(), strict=True
    ):
        assert torch.equal(x, y)


class _PoisonedFrom(torch.nn.Module):
    """The ConvNet, but every output from the `bad`-th training step's forward pass on is NaN."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.net, self.bad, self.calls = ConvNet(), bad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        out = self.net(x)
        return out * float("nan") if self.calls >= self.bad else out


def _diverge(model, lr: float, split, recorder, epochs: int, **steps) -> NonFiniteLossError:
    """Train with SGD at `lr` at batch size 32 until `fit` raises; returns its error."""
    with pytest.raises(NonFiniteLossError) as info:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        schedule = Schedule(epochs, batch_size=32, eval_batch_size=50, seed=0)
        cpu, options = torch.device("cpu"), StepOptions(**steps)
        fit(model, optimizer, split, schedule, device=cpu, steps=options, callbacks=[recorder])
    return info.value


def test_a_checkpoint_saved_in_another_layout_resumes_the_same_fused_adam_step() -> None:
    """Torch's fused CPU Adam misreads moments whose strides differ from their parameter's."""
    seed_everything(0)
    saved = ConvNet().to(memory_format=torch.channels_last)
    adam = torch.optim.Adam(saved.parameters(), lr=0.01, fused=True)
    one = Schedule(epochs=1, batch_size=32, eval_batch_size=50, seed=0)
    cpu = torch.device("cpu")
    step = fit(saved, adam, _tiny(), one, device=cpu, steps=StepOptions(channels_last=True))
    state = training_state(saved, adam, None, epoch=1, step=step)
    grads = [torch.randn(p.shape) for p in saved.parameters()]
    stepped = []
    for layout in (torch.channels_last, torch.contiguous_format):  # as saved; as batch 1 trains
        model = ConvNet().to(memory_format=layout)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
        restore_training_state(copy.deepcopy(state), model, optimizer, None)
        for param, grad in zip(model.parameters(), grads, strict=True):
            param.grad = torch.empty_like(param).copy_(grad)
        optimizer.step()
        stepped.append([param.detach() for param in model.parameters()])
    for as_saved, other_layout in zip(*stepped, strict=True):
        torch.testing.assert_close(other_layout, as_saved)


@pytest.mark.parametrize("check_every", [1, 4, 1000])
def test_a_nan_loss_stops_training_at_its_first_step(check_every: int) -> None:
    model, recorder = _PoisonedFrom(bad=5), Recorder()
    # 3 steps an epoch: the 5th step is in epoch 2
    error = _diverge(model, 0.01, _tiny(), recorder, epochs=3, check_every=check_every)
    assert (error.step, error.epoch, error.what) == (5, 2, "loss")
    assert math.isnan(error.value) and str(error) == "non-finite loss nan at step 5"
    assert model.calls <= 5 + check_every  # stopped within one check window
    assert [e for e, _, _ in recorder.epochs] == [1]  # epoch 2 never reported as done
    if check_every == 1:  # checked before the listeners hear of the step
        assert [s for s, _ in recorder.losses] == [1, 2, 3, 4]


def test_weights_diverged_by_an_epochs_last_update_are_never_reported_done() -> None:
    model, recorder = ConvNet(), Recorder()
    # One step: its loss is finite, the update it makes is not.
    error = _diverge(model, float("inf"), _tiny(32), recorder, epochs=2)
    assert (error.step, error.epoch, error.what) == (1, 1, "weights")
    assert recorder.epochs == [] and len(recorder.losses) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_the_warm_up_leaves_the_model_and_the_rngs_as_they_were(device: str):
    """fit runs it on CUDA before the clock starts; the run must train exactly as without it.

    96 images at batch size 64: both the full and the short last batch are warmed up.
    """
    seed_everything(0)
    model = WideConvNet().to(device)  # batch norm's statistics and dropout's draws
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if device == "cuda" else None
    split = _tiny().train.to(torch.device(device))
    loss_of = functools.partial(_loss, model, split, "bf16-mixed", True, 0.1)
    cuda_graph.warm_up(model, loss_of, len(split), 64, torch.device(device))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    if cuda_rng is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)


class _CpuGraph:
    """A CUDA graph's replay, on the CPU: the step runs again, and its loss and gradients land
    in the tensors the capture made, whatever the parameters' `.grad` point at meanwhile."""

    def __init__(self, model: torch.nn.Module, step) -> None:
        self.params, self.step = list(model.parameters()), step
        self.loss = step()
        self.grads = [p.grad for p in self.params]

    def replay(self) -> None:
        pointed = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        self.loss.copy_(self.step())
        for p, grad, before in zip(self.params, self.grads, pointed, strict=True):
            grad.copy_(p.grad)
            p.grad = before


def _cpu_capture(model, loss, update, device):
    def step():
        value = loss()
        value.backward()
        if update is not None:
            update.step()
        return value.detach()

    for _ in range(3):  # the warm-up moves weights and statistics: CapturedStep must undo it
        model.zero_grad(set_to_none=True)
        step()
    model.zero_grad(set_to_none=True)
    graph = _CpuGraph(model, step)
    return graph, graph.loss


def test_a_step_is_captured_as_a_cuda_graph_only_where_it_can_be(monkeypatch, caplog) -> None:
    """Where it cannot be, or CUDA refuses, the run says why and warms up instead; where the
    optimizer's update cannot join the graph, the run says so and launches it after each replay."""
    monkeypatch.setattr(cuda_graph, "_capture", _cpu_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    model, split = ConvNet(), _tiny(8).train
    loss_of = functools.partial(_loss, model, split, "32", False, 0.0)
    adam = torch.optim.Adam(model.parameters())

    def prepare(graph: bool, augmenting: bool, optimizer=adam) -> cuda_graph.CapturedStep | None:
        cpu = torch.device("cpu")
        return cuda_graph.prepare(model, optimizer, loss_of, len(split), 8, cpu, graph, augmenting)

    def refuse(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level(logging.INFO, logger="mnist_exp"):
        assert isinstance(prepare(graph=True, augmenting=False), cuda_graph.CapturedStep)
        assert prepare(graph=False, augmenting=False) is None and not caplog.records
        assert prepare(graph=True, augmenting=True) is None
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        assert isinstance(prepare(True, False, sgd), cuda_graph.CapturedStep)
        monkeypatch.setattr(cuda_graph, "_capture", refuse)
        assert prepare(graph=True, augmenting=False) is None
    said = [r.getMessage().partition(": ")[2] for r in caplog.records]
    assert said == [
        "the augmentation draws on the CPU each batch",
        "SGD is not Adam or AdamW",
        "capturing it failed (RuntimeError: operation not permitted when stream is capturing)",
    ]
    assert "compile" in cuda_graph.unsupported(torch.compile(model), augmenting=False)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_captured_step_undoes_its_warm_up_and_replays_on_the_batch_it_is_given(
    monkeypatch, optimizer: str
):
    """CapturedStep's bookkeeping around the graph, with a stand-in graph on the CPU: the whole
    step (Adam's update in the graph, SGD's launched after it) as a launched one."""
    monkeypatch.setattr(cuda_graph, "_capture", _cpu_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    seed_everything(0)
    model, split = ConvNet(), _tiny().train
    launched = copy.deepcopy(model)

    def make(net: torch.nn.Module) -> torch.optim.Optimizer:
        if optimizer == "adam":
            return torch.optim.Adam(net.parameters(), lr=0.01)
        return torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    graph_optimizer, launched_optimizer = make(model), make(launched)
    # SGD steps by the same kernels either way; Adam's formula in foreach kernels rounds apart
    # from torch's, by far less than a step (lr 0.01): a missing or doubled update fails.
    close = {"rtol": 0.0, "atol": 0.0} if optimizer == "sgd" else {"rtol": 1e-4, "atol": 1e-4}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    step = cuda_graph.CapturedStep(
        model,
        graph_optimizer,
        functools.partial(_loss, model, split, "32", False, 0.1),
        32,
        torch.device("cpu"),
    )
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(not t.any() for s in graph_optimizer.state.values() for t in s.values())
    for index in (torch.arange(32, 64), torch.arange(64, 96), torch.arange(0, 32)):
        loss = step(index)
        launched_optimizer.zero_grad(set_to_none=True)
        expected = _loss(launched, split, "32", False, 0.1, index)
        expected.backward()
        launched_optimizer.step()
        torch.testing.assert_close(loss, expected.detach(), **close)
        got, want = model.state_dict(), launched.state_dict()
        for key in want.keys() - CONVNET_NOISE:
            torch.testing.assert_close(got[key], want[key], **close)
        model.zero_grad(set_to_none=True)  # as fit does before a short batch's launched step


def test_a_deterministic_run_leaves_the_next_one_free_to_choose() -> None:
    """A notebook's second run (api.train) does not inherit the first one's determinism."""
    seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    seed_everything(0)
    assert not torch.are_deterministic_algorithms_enabled()
