"""Resume checkpoints on disk: written atomically, read back only if they are ours and whole."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from mnist_exp.errors import UserError

FORMAT = "mnist-exp/resume-v1"
KEYS = ("epoch", "step", "model", "optimizer", "rng", "run_id")


def save(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` through a temporary file and a rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save`; anything else is refused with a clear `UserError`."""
    if not path.is_file():
        raise UserError(f"trainer.resume: no checkpoint file at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:160]
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
