"""Data-parallel training across processes (torchrun): the process group, each rank's share of
a global batch, and what rank 0 decides for all. A world of one uses none of it."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mnist_exp.config.world import World

# How long a rank waits for the others (to start, or in a step) before it gives up: torchrun
# ends the others at once when one dies, so this bounds only a rank that hangs.
TIMEOUT = datetime.timedelta(minutes=10)


def join(world: World, device: torch.device) -> None:
    """Join the process group (once a process): gloo for CPU tensors, NCCL for CUDA's."""
    if dist.is_initialized():
        return
    cuda = device.type == "cuda" and dist.is_nccl_available()
    if cuda:
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=TIMEOUT)


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def from_leader(value: Any) -> Any:
    """Rank 0's `value` on every rank (a checkpoint to resume from, say)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """`model` for training: in a world of several, DDP (rank 0's weights and buffers copied to
    all, the gradients averaged in each backward pass)."""
    if world.size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def rows(batch: int, world: World) -> slice:
    """This rank's rows of a global batch of `batch`: contiguous, sizes differ by at most one."""
    base, extra = divmod(batch, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (world.rank < extra))


def sharded(loss_of: Callable[..., Tensor], world: World) -> Callable[..., Tensor]:
    """`loss_of(index, rows=...)`, the mean loss of some rows of a batch, made this rank's share:
    weighted by its rows so that DDP's mean of the ranks' gradients is the gradient of the
    global batch's mean loss, also when an epoch's last batch splits unevenly."""

    def loss(index: Tensor, **kwargs: Any) -> Tensor:
        mine = rows(len(index), world)
        count = mine.stop - mine.start
        if not count:  # fewer images than ranks: one image's loss, weighted 0, keeps DDP going
            return loss_of(index, rows=slice(0, 1), **kwargs) * 0.0
        return loss_of(index, rows=mine, **kwargs) * (count * world.size / len(index))

    return loss


def batch_loss(loss: Tensor, world: World) -> Tensor:
    """The global batch's mean loss from each rank's `sharded` one (detached), on every rank."""
    if world.size == 1:
        return loss
    total = loss.clone()
    dist.all_reduce(total)
    return total / world.size


def leader_decides(decision: bool, world: World) -> bool:
    """Rank 0's `decision` (to stop training) on every rank, else the others would wait."""
    if world.size == 1:
        return decision
    flag = torch.tensor([int(decision)])
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` says another rank went away (killed) during a collective: NCCL's errors
    are `DistError`s, gloo's a RuntimeError from its transport (a connection reset or closed)."""
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and "gloo/transport/" in str(exc)
    )
