"""The training loop: epochs of shuffled mini-batches, evaluation, metrics to `Callback`s."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from mnist_exp.config.world import ONE_PROCESS, World
from mnist_exp.names import EPOCH_SECONDS, TRAIN_IMAGES_PER_S, VAL_ACCURACY, VAL_LOSS
from mnist_exp.training import cuda_graph, distributed
from mnist_exp.training.compute import autocast, step_kernels
from mnist_exp.training.data import Data, Split, batch_indices

log = logging.getLogger(__name__)

# Off the CPU a check of the losses is a wait for every step queued before it: there, the loop
# checks at most this often, so the device keeps steps queued.
DEVICE_CHECK_EVERY = 100


class Callback:
    """Receives what the loop measures. Override what you need; the rest is a no-op."""

    def on_epoch_start(self, epoch: int, num_epochs: int, steps: int) -> None:
        """`epoch` counts from 1; `steps` is the number of batches in this epoch."""

    def on_train_step(self, step: int, epoch: int, batch: int, loss: Tensor) -> None:
        """After each optimizer step. `step` is global, `batch` within the epoch (both from 1);
        `loss` is a detached 0-d tensor still on the device: call `.item()` only when needed."""

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """After each epoch: `train_images_per_s`, `epoch_seconds`, and `val_*` with a split."""


class StopTraining(Exception):
    """Raised by a callback's `on_epoch_end` to end training after this epoch (a search's
    pruning); every other callback still sees the epoch's end (its checkpoint is written)."""


class NonFiniteLossError(FloatingPointError):
    """The loss (or at an epoch's end a weight) became NaN or infinite at global `step`."""

    def __init__(self, step: int, epoch: int, value: float, what: str = "loss") -> None:
        self.step, self.epoch, self.value, self.what = step, epoch, value, what
        super().__init__(f"non-finite {what} {value} at step {step}")


@dataclass(frozen=True)
class EvalResult:
    """Mean loss and accuracy; with `keep_predictions`, each image's predicted class too."""

    loss: float
    accuracy: float
    correct: int
    total: int
    predictions: Tensor | None = None  # int64, one per image in split order, on the CPU
    targets: Tensor | None = None  # the split's labels, on the CPU


def epoch_generator(seed: int, epoch: int, purpose: str = "order") -> torch.Generator:
    """An RNG of one epoch (its order, its augmentation) from (seed, epoch, purpose) only, so
    a resumed run draws exactly the same."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{purpose}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


@dataclass(frozen=True)
class Schedule:
    """How long and in what batches: `epochs` in all, after `start_epoch` (and `start_step`)."""

    epochs: int
    batch_size: int
    eval_batch_size: int
    seed: int  # orders each epoch's batches and draws its augmentation
    start_epoch: int = 0
    start_step: int = 0


@dataclass(frozen=True)
class StepOptions:
    """How each step computes: only `label_smoothing` changes what is learnt beyond rounding."""

    precision: str = "32"
    channels_last: bool = False
    label_smoothing: float = 0.0
    check_every: int = 1  # steps between checks of the losses for NaN (one device sync)
    cuda_graph: bool = False


@dataclass(frozen=True)
class Augmentation:
    """Random moves of each training image, up to these bounds (see `Split.inputs`)."""

    max_shift: int = 0
    max_rotation: float = 0.0
    max_scale: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.max_shift or self.max_rotation or self.max_scale)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Data,
    schedule: Schedule,
    *,
    device: torch.device,
    steps: StepOptions = StepOptions(),
    augmentation: Augmentation = Augmentation(),
    scheduler: LRScheduler | None = None,
    callbacks: Sequence[Callback] = (),
    world: World = ONE_PROCESS,
) -> int:
    """Train until epoch `schedule.epochs`, after `start_epoch` epochs (and steps) done;
    returns the global step.

    `scheduler` steps after every optimizer step; `augmentation` draws from the epoch's own
    generator. Evaluates on the validation split after each epoch (plain cross-entropy, not
    smoothed). A callback raising `StopTraining` at an epoch's end makes that epoch the last.

    Every `steps.check_every` steps (off the CPU, every `DEVICE_CHECK_EVERY` at the least), and
    before an epoch's end is reported, the losses since the last check are read in one device
    sync: a bad one raises `NonFiniteLossError` before the callbacks see the checked step. At
    the epoch's end the weights are checked too, so no listener is handed diverged weights to
    save.

    On CUDA the step is made ready first (`cuda_graph.prepare`: a captured graph or a
    warm-up), so `epoch_seconds` leaves out CUDA's start-up and compiling. On a CPU,
    `compute.step_kernels` picks the steps' convolutions (evaluation keeps oneDNN's).

    In a `world` of several processes, each trains DDP's copy of `model` on its rows of every
    global batch of `schedule.batch_size` (`distributed.sharded`); the losses are the global
    batch's on every rank, and a stop raised on rank 0 ends training on all. Only rank 0
    validates: the others' callbacks see no `val_*`.
    """
    epochs, batch_size, seed = schedule.epochs, schedule.batch_size, schedule.seed
    precision, channels_last = steps.precision, steps.channels_last
    train = data.train.to(device)
    val = data.val.to(device) if data.val is not None else None
    net = distributed.wrap(model, device, world)
    loss_of: Callable[..., Tensor] = functools.partial(
        _loss, net, train, precision, channels_last, steps.label_smoothing
    )
    if world.size > 1:
        loss_of = distributed.sharded(loss_of, world)
    augment = asdict(augmentation)  # max_shift, max_rotation, max_scale
    captured = None
    model.train()
    if device.type == "cuda" and schedule.start_epoch < epochs and world.size == 1:
        captured = cuda_graph.prepare(
            model,
            optimizer,
            loss_of,
            len(train),
            batch_size,
            device,
            steps.cuda_graph,
            bool(augmentation),
        )
    check_every = steps.check_every
    if device.type != "cpu":
        check_every = max(check_every, DEVICE_CHECK_EVERY)
    step = schedule.start_step
    unchecked: list[Tensor] = []  # losses not yet read back from the device
    for epoch in range(schedule.start_epoch + 1, epochs + 1):
        batches = batch_indices(len(train), batch_size, epoch_generator(seed, epoch))
        # Named "shift" as when shifts were the only augmentation: earlier runs resume exactly.
        draws = epoch_generator(seed, epoch, "shift") if augmentation else None
        if world.size > 1:  # dropout's draws from (seed, epoch, rank) only: a resume draws the same
            torch.manual_seed(epoch_generator(seed, epoch, f"rank {world.rank}").initial_seed())
        for cb in callbacks:
            cb.on_epoch_start(epoch, epochs, len(batches))
        model.train()
        start = time.perf_counter()
        with step_kernels(device, batch_size, precision):
            for batch, index in enumerate(_on(device, batches), start=1):
                if captured is not None and len(index) == batch_size:
                    loss = captured(index)  # forward, backward and the optimizer's step
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_of(index, generator=draws, **augment)
                    loss.backward()
                    loss = distributed.batch_loss(loss.detach(), world)
                    optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                unchecked.append(loss)
                if len(unchecked) >= check_every:
                    _check_losses(unchecked, step, epoch)
                for cb in callbacks:
                    cb.on_train_step(step, epoch, batch, loss)
        _check_losses(unchecked, step, epoch)
        _check_weights(model, step, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        metrics = {TRAIN_IMAGES_PER_S: len(train) / seconds, EPOCH_SECONDS: seconds}
        if val is not None and world.leader:
            result = evaluate(
                model,
                val,
                batch_size=schedule.eval_batch_size,
                precision=precision,
                channels_last=channels_last,
            )
            metrics |= {VAL_LOSS: result.loss, VAL_ACCURACY: result.accuracy}
        stop: StopTraining | None = None
        for cb in callbacks:
            try:
                cb.on_epoch_end(epoch, step, metrics)
            except StopTraining as exc:
                stop = stop or exc
        if distributed.leader_decides(stop is not None, world):
            if stop is not None:
                log.info(f"Training stops after epoch {epoch}: {stop}")
            break
    return step


def _check_losses(losses: list[Tensor], step: int, epoch: int) -> None:
    """Raise `NonFiniteLossError` for the first non-finite loss (`step`: the last one's), in
    one sync; empties `losses`."""
    if not losses:
        return
    finite = torch.isfinite(losses[0] if len(losses) == 1 else torch.stack(losses))
    if bool(finite.all()):
        losses.clear()
        return
    first = int((~finite.reshape(-1)).nonzero()[0])
    value = float(losses[first])
    raise NonFiniteLossError(step - len(losses) + 1 + first, epoch, value)


def _check_weights(model: nn.Module, step: int, epoch: int) -> None:
    """Raise `NonFiniteLossError` when the last update left a NaN or infinite weight."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
    bad = next(t for t in tensors if not bool(torch.isfinite(t).all()))
    raise NonFiniteLossError(step, epoch, float(bad[~torch.isfinite(bad)][0]), what="weights")


def evaluate(
    model: nn.Module,
    split: Split,
    *,
    batch_size: int,
    precision: str = "32",
    channels_last: bool = False,
    keep_predictions: bool = False,
) -> EvalResult:
    """Mean cross-entropy and accuracy in eval mode, no grad; with `keep_predictions`, every
    predicted class too (for a confusion matrix or a picture of the mistakes)."""
    model.eval()
    device = split.images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    predicted: list[Tensor] = []
    with torch.inference_mode():
        for index in _on(device, batch_indices(len(split), batch_size, None)):
            with autocast(device, precision):
                outputs = model(split.inputs(index, channels_last))
            labels = split.labels[index]
            classes = outputs.argmax(1)
            loss_sum += F.cross_entropy(outputs.float(), labels, reduction="sum")
            correct += (classes == labels).sum()
            if keep_predictions:
                predicted.append(classes)
    total = len(split)
    n_correct = int(correct)
    return EvalResult(
        loss=float(loss_sum) / max(total, 1),
        accuracy=n_correct / max(total, 1),
        correct=n_correct,
        total=total,
        predictions=torch.cat([*predicted, split.labels[:0]]).cpu() if keep_predictions else None,
        targets=split.labels.cpu() if keep_predictions else None,
    )


def _on(device: torch.device, indices: list[Tensor]) -> Iterator[Tensor]:
    """The batches' indices on `device`: off the CPU, copied there in one transfer an epoch."""
    if device.type == "cpu" or not indices:
        return iter(indices)
    return iter(torch.cat(indices).to(device).split([len(i) for i in indices]))


def _loss(
    model: nn.Module,
    split: Split,
    precision: str,
    channels_last: bool,
    label_smoothing: float,
    index: Tensor,
    *,
    cache: bool = True,
    rows: slice | None = None,
    **augmentation: Any,
) -> Tensor:
    """The training loss of the batch `index`: the loop's, the warm-up's and the graph's.
    `augmentation` goes to `Split.inputs`; `cache=False` for a graph (no autocast cache).
    With `rows`, the loss of those rows only, their images augmented with the whole batch's
    draws (as one process draws them)."""
    with autocast(split.images.device, precision, cache):
        inputs, labels = split.inputs(index, channels_last, **augmentation), split.labels[index]
        if rows is not None:
            inputs, labels = inputs[rows], labels[rows]
        outputs = model(inputs)
        return F.cross_entropy(outputs, labels, label_smoothing=label_smoothing)
