"""The training step on CUDA, made ready before the clock starts: captured as a graph, or
warmed up. A small network's step is a hundred kernel launches from Python, which take more
time than the arithmetic; a graph's replay launches them at once. Where `graph_adam` can do the
optimizer's update, the graph holds the whole step (forward, backward and update); else the
optimizer steps as ever after each replay.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mnist_exp.errors import one_line
from mnist_exp.training import graph_adam

log = logging.getLogger(__name__)


def prepare(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[..., Tensor],
    samples: int,
    batch_size: int,
    device: torch.device,
    graph: bool,
    augmenting: bool,
) -> CapturedStep | None:
    """The step captured as a graph if `graph` asks and it can be (else the reason is logged),
    or None after `warm_up`. `loss_of(index, cache=...)` is a batch's loss, `samples` the
    training split's size."""
    why_not = unsupported(model, augmenting) if graph else None
    if graph and why_not is None:
        try:
            loss = functools.partial(loss_of, cache=False)
            return CapturedStep(model, optimizer, loss, batch_size, device)
        except RuntimeError as exc:  # CUDA refused to capture: model and optimizer are as they were
            why_not = f"capturing it failed ({one_line(exc)})"
    if why_not is not None:
        log.info(f"The training step is not replayed as a CUDA graph: {why_not}")
    warm_up(model, loss_of, samples, batch_size, device)
    return None


def warm_up(
    model: nn.Module,
    loss_of: Callable[[Tensor], Tensor],
    samples: int,
    batch_size: int,
    device: torch.device,
) -> None:
    """Forward and backward passes at the epoch's batch shapes (CUDA's kernel loading and
    choice, `torch.compile`'s compiling), then undone: weights and statistics put back,
    gradients dropped, the RNGs forked, so the run trains exactly as without it."""
    shapes = [min(batch_size, samples)]
    if samples > batch_size and samples % batch_size:
        shapes.append(samples % batch_size)  # the epoch's last, short batch
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for size in shapes * 3:
            loss_of(torch.arange(size, device=device)).backward()
    model.load_state_dict(saved)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unsupported(model: nn.Module, augmenting: bool) -> str | None:
    """Why this run's passes cannot be captured, or None when they can."""
    if augmenting:
        return "the augmentation draws on the CPU each batch"
    if hasattr(model, "_orig_mod"):
        return "the model is torch.compile'd"
    return None


class CapturedStep:
    """`step(index)`: one full batch's forward and backward passes and the optimizer's update,
    replayed from one graph (the update launched after it where `graph_adam` cannot do it).

    Captured after three warm-up steps, which are undone: weights, statistics and the
    optimizer's state put back in place, the RNGs forked. A replay writes the gradients into
    the graph's own tensors, which the parameters are pointed at again before each replay.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_of: Callable[[Tensor], Tensor],
        batch_size: int,
        device: torch.device,
    ) -> None:
        self._index = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self._optimizer = optimizer
        why_not = graph_adam.unsupported(optimizer)
        if why_not is not None:
            log.info(f"The optimizer steps after each replay of the CUDA graph: {why_not}")
        self._update = graph_adam.GraphAdam(optimizer) if why_not is None else None
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        state = _tensors(optimizer)
        saved = [t.clone() for t in state]
        try:
            self._graph, self._loss = _capture(
                model, lambda: loss_of(self._index), self._update, device
            )
        finally:  # captured or not, training goes on from where it was
            model.load_state_dict(weights)
            if state:
                with torch.no_grad():
                    torch._foreach_copy_(state, saved)
            torch.cuda.synchronize(device)
        self._grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]

    def __call__(self, index: Tensor) -> Tensor:
        """The whole step on the batch `index` (of the captured size); its loss, detached."""
        self._index.copy_(index)
        for param, grad in self._grads:
            param.grad = grad
        if self._update is not None:
            self._update.load_hyperparameters()
        self._graph.replay()
        if self._update is None:
            self._optimizer.step()
        return self._loss.clone()


def _tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The tensors of `optimizer`'s state, which a warm-up step changes."""
    return [t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]


def _capture(
    model: nn.Module,
    loss: Callable[[], Tensor],
    update: graph_adam.GraphAdam | None,
    device: torch.device,
) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Three warm-up steps on a side stream, then one captured; the graph and its loss."""

    def step() -> Tensor:
        value = loss()
        value.backward()
        if update is not None:
            update.step()
        return value.detach()

    with torch.random.fork_rng(devices=[device]):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                model.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Gradients of None: the captured backward creates them in the graph's memory.
        model.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            captured_loss = step()
    return graph, captured_loss
