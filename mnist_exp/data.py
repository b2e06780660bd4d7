"""torchvision's MNIST-style datasets as in-memory tensors, split and batched by index."""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.datasets import VisionDataset

from mnist_exp.errors import UserError


@dataclass(frozen=True)
class Split:
    """Images as float32 `N x 1 x 28 x 28` in [0, 1] (the seed's ToTensor scaling), labels int64."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class Data:
    train: Split
    val: Split | None
    test: Split


def load(
    dataset_cls: type[VisionDataset],
    root: str,
    *,
    download: bool = True,
    val_size: int = 0,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    seed: int = 0,
) -> Data:
    """Load the train and test sets once, carve a validation split off the training set.

    The validation images are drawn with a generator seeded from `seed`, so one seed always
    holds out the same images; `max_*_samples` then keep the first images of each set.
    """
    train = _read(dataset_cls, root, train=True, download=download)
    test = _read(dataset_cls, root, train=False, download=download)
    val = None
    if val_size:
        if val_size >= len(train):
            raise UserError(
                f"data.val_size={val_size} leaves no training images "
                f"({len(train)} in the training set): choose a smaller data.val_size"
            )
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        val = _take(train, order[:val_size])
        train = _take(train, order[val_size:])
    if max_train_samples is not None:
        train = _take(train, slice(0, max_train_samples))
    if max_test_samples is not None:
        test = _take(test, slice(0, max_test_samples))
    return Data(train=train, val=val, test=test)


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None) -> list[Tensor]:
    """Index tensors of one epoch's batches: shuffled when a generator is given, last one short."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def _take(split: Split, index: Tensor | slice) -> Split:
    return Split(split.images[index], split.labels[index])


def _read(dataset_cls: type[VisionDataset], root: str, *, train: bool, download: bool) -> Split:
    name = dataset_cls.__name__
    raw_folder = os.path.join(root, name, "raw")
    try:
        # torchvision prints every mirror it tries; only the outcome matters here.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            dataset = dataset_cls(root, train=train, download=download)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ...
        missing = [
            os.path.splitext(fname)[0]
            for fname, _ in getattr(dataset_cls, "resources", [])
            if not os.path.isfile(os.path.join(raw_folder, os.path.splitext(fname)[0]))
        ]
        what = f"missing {', '.join(missing)}" if missing else f"unreadable: {exc}"
        how = "could not be downloaded" if download else "download is off (data.download=false)"
        raise UserError(
            f"{name} not found in {raw_folder} ({what}) and {how}: copy the IDX files there "
            f"(for example with shared/data/seed.sh DIR) or set data.root to a folder that has them"
        ) from exc
    images = dataset.data.unsqueeze(1).to(torch.float32).div_(255)
    return Split(images, torch.as_tensor(dataset.targets, dtype=torch.int64))
