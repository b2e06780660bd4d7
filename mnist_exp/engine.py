"""The training loop: epochs of shuffled mini-batches, evaluation, metrics to listeners.

Nothing here knows about Hydra or MLflow. Whoever wants the numbers passes a `Callback`.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnist_exp.data import Data, Split, batch_indices
from mnist_exp.errors import UserError

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16}


class Callback:
    """Receives what the loop measures. Override what you need; the rest is a no-op."""

    def on_epoch_start(self, epoch: int, num_epochs: int, steps: int) -> None:
        """`epoch` counts from 1; `steps` is the number of batches in this epoch."""

    def on_train_step(self, step: int, epoch: int, batch: int, loss: Tensor) -> None:
        """After each optimizer step. `step` is global (from 1), `batch` within the epoch (from 1).

        `loss` is a detached 0-d tensor still on the device: call `.item()` only when needed.
        """

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """After each epoch with `train_images_per_s` and, with a validation split, `val_*`."""


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    correct: int
    total: int


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for `cuda` without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"device={name} but this machine has no usable CUDA GPU "
            f"(torch {torch.__version__}): use device=auto or device=cpu"
        )
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's (when installed) and torch's RNGs; optionally force determinism."""
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling RNG of one epoch, a function of (seed, epoch) only, so resuming is exact."""
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Data,
    *,
    epochs: int,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    device: torch.device,
    precision: str = "32",
    callbacks: Sequence[Callback] = (),
) -> int:
    """Train for `epochs` epochs; evaluate on the validation split after each. Returns the step."""
    train = data.train.to(device)
    val = data.val.to(device) if data.val is not None else None
    step = 0
    for epoch in range(1, epochs + 1):
        batches = batch_indices(len(train), batch_size, epoch_generator(seed, epoch))
        for cb in callbacks:
            cb.on_epoch_start(epoch, epochs, len(batches))
        model.train()
        start = time.perf_counter()
        for batch, index in enumerate(_on(device, batches), start=1):
            with _autocast(device, precision):
                loss = F.cross_entropy(model(train.images[index]), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss = loss.detach()
            for cb in callbacks:
                cb.on_train_step(step, epoch, batch, loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        metrics = {"train_images_per_s": len(train) / (time.perf_counter() - start)}
        if val is not None:
            result = evaluate(model, val, batch_size=eval_batch_size, precision=precision)
            metrics |= {"val_loss": result.loss, "val_accuracy": result.accuracy}
        for cb in callbacks:
            cb.on_epoch_end(epoch, step, metrics)
    return step


def evaluate(
    model: nn.Module, split: Split, *, batch_size: int, precision: str = "32"
) -> EvalResult:
    """Mean cross-entropy and accuracy in eval mode (BatchNorm's running statistics), no grad."""
    model.eval()
    device = split.images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.inference_mode():
        for index in _on(device, batch_indices(len(split), batch_size, None)):
            with _autocast(device, precision):
                outputs = model(split.images[index])
            labels = split.labels[index]
            loss_sum += F.cross_entropy(outputs.float(), labels, reduction="sum")
            correct += (outputs.argmax(1) == labels).sum()
    total = len(split)
    n_correct = int(correct)
    return EvalResult(
        loss=float(loss_sum) / max(total, 1),
        accuracy=n_correct / max(total, 1),
        correct=n_correct,
        total=total,
    )


def _on(device: torch.device, indices: list[Tensor]) -> Iterator[Tensor]:
    if device.type == "cpu":
        return iter(indices)
    return iter(i.to(device, non_blocking=True) for i in indices)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
