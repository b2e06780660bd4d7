"""Resume checkpoints: the state a run continues from (weights, optimizer, schedule, RNGs,
counters, the best epoch so far), written atomically, read back only if ours and whole."""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from pathlib import Path
from pickle import UnpicklingError
from typing import Any, Protocol
from zipfile import BadZipFile

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from mnist_exp.errors import UserError, first_line

FORMAT = "mnist-exp/resume-v1"
KEYS = ("epoch", "step", "model", "optimizer", "rng", "run_id")
# What torch.load raises on a damaged file (OSError: its zip reader on some truncations).
_UNREADABLE = (UnpicklingError, RuntimeError, EOFError, BadZipFile, ValueError, OSError)


class Stateful(Protocol):
    """What keeps a state of its own in the checkpoint: the best epoch's `monitor.Monitor`.
    Named by its methods, not its class: the monitor imports the loop, which imports the data
    module, which imports this one."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    epoch: int,
    step: int,
    monitor: Stateful | None = None,
) -> dict[str, Any]:
    """Everything to continue after `epoch` exactly, in tensors and plain Python values only
    (it loads with `torch.load(weights_only=True)`); `monitor`'s state too, if there is one."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    numpy_state = np.random.get_state()  # the legacy tuple, not the dict of legacy=False
    assert isinstance(numpy_state, tuple)
    kind, keys, pos, has_gauss, gauss = numpy_state
    rng["numpy"] = [kind, keys.tolist(), pos, has_gauss, gauss]
    state: dict[str, Any] = {
        "epoch": epoch,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng,
    }
    if monitor is not None:
        state["monitor"] = monitor.state_dict()
    return state


def restore_training_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    monitor: Stateful | None = None,
) -> tuple[int, int]:
    """Load a `training_state` into model, optimizer, scheduler, RNGs and `monitor` (which a
    checkpoint of older code leaves as it is: it holds no monitor); returns (epoch, step)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _lay_out_like_params(optimizer)
    if (scheduler is None) != (state.get("scheduler") is None):
        raise ValueError("the checkpoint and the config disagree on having an LR scheduler")
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(_tuples(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng:
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if monitor is not None and "monitor" in state:
        monitor.load_state_dict(state["monitor"])
    return state["epoch"], state["step"]


def _lay_out_like_params(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter's optimizer state (Adam's moments) the parameter's strides: saved
    in another memory layout, torch's fused CPU Adam silently pairs the wrong elements."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            same_shape = isinstance(value, Tensor) and value.shape == param.shape
            if same_shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _tuples(value: Any) -> Any:
    """`random.setstate` wants the nested tuples `getstate` gave, which saving may make lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def save(state: dict[str, Any], path: Path) -> None:
    """Write a resume checkpoint `state` to `path` atomically (see `write_atomic`)."""
    write_atomic({"format": FORMAT, **state}, path)


def write_atomic(obj: Any, path: Path) -> None:
    """`torch.save` to `path` through a temporary file and a rename: never half a file.

    A full disk or an unwritable folder raises a `UserError`; Ctrl-C (or SIGTERM) raises
    `KeyboardInterrupt`, even where torch's zip writer, cut off, raises its own error. Either
    way the temporary file is removed and an older file at `path` stays as it was.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        stop = _interrupt_behind(exc)
        if stop is not None and stop is not exc:
            raise stop from None
        if isinstance(exc, OSError):
            raise UserError(
                f"cannot write {path.name} in {path.parent} ({exc.strerror or exc}): free "
                f"space there or set hydra.run.dir to a writable folder"
            ) from exc
        raise


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The `KeyboardInterrupt` that `exc` is, or was raised while handling, if any."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save`; anything else is refused with a clear `UserError`."""
    if not path.is_file():
        raise UserError(f"trainer.resume: no checkpoint file at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as exc:
        reason = first_line(exc).split(". ")[0][:160]
        raise UserError(
            f"trainer.resume: {path} is truncated, corrupt or not a safe tensor file ({reason}): "
            f"resume from an intact checkpoints/last.ckpt or the run id"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or not set(KEYS) <= set(state):
        what = f"keys {sorted(state)[:5]}" if isinstance(state, dict) else type(state).__name__
        raise UserError(
            f"trainer.resume: {path} is not an mnist-exp resume checkpoint ({what}): "
            f"pass a run id or the checkpoints/last.ckpt of a run"
        )
    return state
