"""Where and how training computes: the device, CPU threads, convolution kernels, autocast,
seeds and determinism."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from mnist_exp.errors import UserError
from mnist_exp.names import PRECISIONS

_DTYPES = dict(zip(PRECISIONS, (None, torch.bfloat16), strict=True))  # autocast to
# Up to this batch size a CPU step runs on one thread: a second thread costs more in
# synchronisation than it shares, and the other core is left to the run's MLflow tracker.
ONE_THREAD_UP_TO = 4


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


def cpu_threads(batch_size: int, cores: int) -> int:
    """How many threads a CPU step at `batch_size` runs best on, given `cores` to use."""
    return 1 if batch_size <= ONE_THREAD_UP_TO else max(1, cores)


def plain_cpu_convolutions(device: torch.device, batch_size: int, precision: str) -> bool:
    """Whether training here runs faster on PyTorch's own convolutions, in NCHW: on a CPU at
    batch size 1 in fp32, where oneDNN's repack the weights at every call."""
    return device.type == "cpu" and batch_size == 1 and _DTYPES[precision] is None


def trains_channels_last(
    requested: bool, device: torch.device, batch_size: int, precision: str
) -> bool:
    """Whether a run that asks for channels_last trains (model and images) in it: not where
    `plain_cpu_convolutions` trains in NCHW."""
    return requested and not plain_cpu_convolutions(device, batch_size, precision)


@contextlib.contextmanager
def step_kernels(device: torch.device, batch_size: int, precision: str) -> Iterator[None]:
    """Inside, training steps at this size run on the fastest kernels: oneDNN's or PyTorch's
    (only oneDNN's switch changes: `mkldnn.flags` would reset its other settings, warning)."""
    before = torch.backends.mkldnn.enabled
    if plain_cpu_convolutions(device, batch_size, precision):
        # torch annotates the switch as its descriptor (ContextProp); it takes a bool.
        torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def autocast(
    device: torch.device, precision: str, cache: bool = True
) -> contextlib.AbstractContextManager:
    """Autocast to `precision`'s dtype on `device`; nothing in fp32. `cache=False` for a graph."""
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's and torch's RNGs; `deterministic` also makes CUDA pick
    deterministic kernels (and cuBLAS a fixed workspace; the CPU loop is so already). Set
    either way: a notebook's next run must not inherit the last one's choice."""
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    # Only on a change: setting it imports torch._inductor, seconds of every start-up.
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
