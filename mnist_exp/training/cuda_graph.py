"""A training step's forward and backward passes, captured once as a CUDA graph and replayed.

A small network's step is a hundred small kernels, each launched from Python: on a GPU the
launches, not the arithmetic, take the time. Replaying the captured passes launches them all
at once. The optimizer still steps as it would without a graph, with whatever learning rate
and momentum the scheduler gives it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def unsupported(model: nn.Module, augmenting: bool) -> str | None:
    """Why this run's passes cannot be captured, or None when they can."""
    if augmenting:
        return "the augmentation draws on the CPU each batch"
    if hasattr(model, "_orig_mod"):
        return "the model is torch.compile'd"
    return None


class CapturedStep:
    """`step(index)`: the forward and backward passes of one full batch, replayed from a graph.

    `loss_of(index)` computes the batch's loss from the model. It runs three times on a side
    stream to warm up, as CUDA requires, then once more to be captured. The warm-up is undone:
    the model's weights and batch-norm statistics are put back, and the RNGs forked. Each
    replay writes the gradients into the graph's own tensors, which the model's parameters
    are pointed at again before every replay, whatever the steps between did with them.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_of: Callable[[Tensor], Tensor],
        batch_size: int,
        device: torch.device,
    ) -> None:
        self._index = torch.zeros(batch_size, dtype=torch.int64, device=device)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            self._graph, self._loss = _capture(model, lambda: loss_of(self._index), device)
        finally:  # captured or not, training goes on from where it was
            model.load_state_dict(weights)
            torch.cuda.synchronize(device)
        self._grads = [(p, p.grad) for p in model.parameters() if p.grad is not None]

    def __call__(self, index: Tensor) -> Tensor:
        """Forward and backward on the batch `index` (of the captured size); its loss, detached."""
        self._index.copy_(index)
        for param, grad in self._grads:
            param.grad = grad
        self._graph.replay()
        return self._loss.clone()


def _capture(
    model: nn.Module, loss: Callable[[], Tensor], device: torch.device
) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Three warm-up passes on a side stream, then one captured; the graph and its loss."""

    def passes() -> Tensor:
        value = loss()
        value.backward()
        return value.detach()

    with torch.random.fork_rng(devices=[device]):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                model.zero_grad(set_to_none=True)
                passes()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Gradients of None: the captured backward creates them in the graph's memory.
        model.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            captured_loss = passes()
    return graph, captured_loss
