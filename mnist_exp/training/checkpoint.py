"""Resume checkpoints on disk: written atomically, read back only if they are ours and whole."""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from mnist_exp.errors import UserError, first_line

FORMAT = "mnist-exp/resume-v1"
KEYS = ("epoch", "step", "model", "optimizer", "rng", "run_id")


def save(state: dict[str, Any], path: Path) -> None:
    """Write a resume checkpoint `state` to `path` atomically (see `write_atomic`)."""
    write_atomic({"format": FORMAT, **state}, path)


def write_atomic(obj: Any, path: Path) -> None:
    """`torch.save` to `path` through a temporary file and a rename: never half a file.

    A full disk or an unwritable folder raises a `UserError` naming the folder. Ctrl-C (or
    SIGTERM) while writing raises `KeyboardInterrupt`, even where torch's zip writer, cut off,
    raises an error of its own instead. Either way the temporary file is removed and an older
    file at `path` stays as it was.
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
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        OSError,  # torch's zip reader on some truncations: "[Errno 22] Invalid argument"
    ) as exc:
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
