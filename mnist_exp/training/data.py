"""Datasets as in-memory tensors, split and batched by index: torchvision's MNIST-style ones,
or a folder of one's own images (`image_folder`)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mnist_exp.errors import UserError
from mnist_exp.training import image_folder
from mnist_exp.training.image_folder import FolderOptions

# The `data.dataset` that names a folder of one's own images rather than IDX files.
IMAGE_FOLDER = "torchvision.datasets.ImageFolder"
DIGEST_CHARS = 8  # hex characters of a split's digest, as MLflow's own dataset digests have


@dataclass(frozen=True)
class Split:
    """Images as uint8 `N x C x H x W` (a quarter of float32's memory; C: 1 gray, 3 RGB), labels
    int64."""

    images: Tensor
    labels: Tensor

    def inputs(
        self,
        index: Tensor,
        channels_last: bool = False,
        max_shift: int = 0,
        generator: torch.Generator | None = None,
        max_rotation: float = 0.0,
        max_scale: float = 0.0,
    ) -> Tensor:
        """Float32 images in [0, 1] per channel, as the seed's ToTensor gives, each moved by up to
        `max_shift` whole pixels, then turned by up to `max_rotation` degrees and resized by up
        to `max_scale` of its size about its centre (bilinear), with draws from `generator`."""
        images = self.images[index]
        if max_shift:
            images = _shift(images, max_shift, generator)
        batch = images.to(torch.float32).div_(255)
        if max_rotation or max_scale:
            batch = _rotate_and_scale(batch, max_rotation, max_scale, generator)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class Data:
    train: Split
    val: Split | None
    test: Split
    classes: tuple[str, ...] = ()  # each label's name where the data names them (folders)

    @property
    def channels(self) -> int:
        """The images' channels: 1 gray, 3 RGB."""
        return int(self.train.images.shape[1])


def load(
    dataset: str,
    root: str,
    *,
    download: bool = True,
    val_size: int = 0,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    seed: int = 0,
    folder: FolderOptions | None = None,
) -> Data:
    """Load the train and test sets of `dataset` (a torchvision class path, or `IMAGE_FOLDER`:
    the folder `root` read as `folder` says). `seed` draws the validation images (one seed
    always holds out the same); `max_*_samples` then keep the first images of each set."""
    classes: tuple[str, ...] = ()
    if dataset == IMAGE_FOLDER:
        own_train, own_test, classes = image_folder.read(Path(root), folder or FolderOptions())
        train = Split(own_train.images, own_train.labels)
        test = Split(own_test.images, own_test.labels)
    else:
        train = _read(dataset, root, train=True, download=download)
        test = _read(dataset, root, train=False, download=download)
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
    return Data(train=train, val=val, test=test, classes=classes)


def digest(split: Split) -> str:
    """A fingerprint of exactly these images and labels, the same on any machine: SHA-256 of
    the images' shape, their uint8 bytes (N x C x H x W, row-major) and the labels as
    little-endian int64, cut to `DIGEST_CHARS` hex characters."""
    images = split.images.cpu().contiguous()
    hashed = hashlib.sha256(repr(tuple(images.shape)).encode())
    hashed.update(images.numpy().data)
    hashed.update(split.labels.cpu().numpy().astype("<i8", copy=False).data)
    return hashed.hexdigest()[:DIGEST_CHARS]


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None) -> list[Tensor]:
    """Index tensors of one epoch's batches: shuffled when a generator is given, last one short."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def _shift(images: Tensor, max_shift: int, generator: torch.Generator | None) -> Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift], zero-filled."""
    n, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(images.device)
    rows = torch.arange(height, device=images.device)[None, :] + offsets[0][:, None]
    cols = torch.arange(width, device=images.device)[None, :] + offsets[1][:, None]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _rotate_and_scale(
    batch: Tensor, max_degrees: float, max_scale: float, generator: torch.Generator | None
) -> Tensor:
    """Turn each image by its own angle in [-max_degrees, max_degrees] and scale it by its own
    factor in [1 - max_scale, 1 + max_scale], about the centre, zero-filled."""
    n = batch.shape[0]
    draws = torch.rand((2, n), generator=generator, dtype=torch.float64).mul_(2).sub_(1)
    angle = torch.deg2rad(draws[0] * max_degrees)
    scale = 1 + draws[1] * max_scale
    # affine_grid maps output to input coordinates: the inverse of the wanted transform.
    cos, sin, zero = torch.cos(angle) / scale, torch.sin(angle) / scale, torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    theta = theta.to(batch.device, torch.float32)
    grid = torch.nn.functional.affine_grid(theta, list(batch.shape), align_corners=False)
    return torch.nn.functional.grid_sample(batch, grid, align_corners=False)


def _take(split: Split, index: Tensor | slice) -> Split:
    return Split(split.images[index], split.labels[index])


def _read(dataset: str, root: str, *, train: bool, download: bool) -> Split:
    """The IDX files torchvision keeps in `root/<Name>/raw/`, read directly when present:
    importing torchvision is slow (torch._dynamo), so it is only imported to download."""
    raw = Path(root) / dataset.rsplit(".", 1)[-1] / "raw"
    prefix = "train" if train else "t10k"
    files = (raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte")
    if not all(f.is_file() for f in files):
        _download(dataset, root, train=train, download=download)
    images, labels = (_idx(f) for f in files)
    return Split(images.unsqueeze(1), labels.to(torch.int64))


def _idx(path: Path) -> Tensor:
    """An IDX file (big-endian header: zero, zero, dtype 0x08 = uint8, rank; then the sizes)."""
    data = path.read_bytes()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise UserError(f"{path} is not an IDX file of bytes: replace it with the original file")
    rank = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    body = data[4 + 4 * rank :]
    if len(body) != math.prod(shape):
        raise UserError(f"{path} is truncated ({len(body)} of {math.prod(shape)} bytes)")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _download(dataset: str, root: str, *, train: bool, download: bool) -> None:
    module, _, name = dataset.rpartition(".")
    try:
        dataset_cls = getattr(importlib.import_module(module), name)
        if not isinstance(dataset_cls, type):
            raise ValueError(f"{dataset} is not a class")
    except (ImportError, ValueError, AttributeError) as exc:
        raise UserError(
            f"data.dataset={dataset!r} is not a dataset class that can be imported: name a "
            f"torchvision dataset such as torchvision.datasets.MNIST, or pick data=mnist"
        ) from exc
    raw_folder = os.path.join(root, dataset_cls.__name__, "raw")
    try:
        # torchvision prints every mirror it tries; only the outcome matters here.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            dataset_cls(root, train=train, download=download)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ...
        missing = [
            os.path.splitext(fname)[0]
            for fname, _ in getattr(dataset_cls, "resources", [])
            if not os.path.isfile(os.path.join(raw_folder, os.path.splitext(fname)[0]))
        ]
        what = f"missing {', '.join(missing)}" if missing else f"unreadable: {exc}"
        how = "could not be downloaded" if download else "download is off (data.download=false)"
        raise UserError(
            f"{dataset_cls.__name__} not found in {raw_folder} ({what}) and {how}: copy the IDX "
            f"files there (for example with shared/data/seed.sh DIR) or set data.root to a "
            f"folder that has them"
        ) from exc
