"""A folder of one's own images (`DIR/train/<class>/*` and `DIR/test/<class>/*`, or
`DIR/<class>/*` with a share held out), converted as MNIST's were made (`images.mnist_pixels`)
into uint8 tensors, gray or RGB, cached by the files' names, sizes and times and by the
conversion."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mnist_exp.errors import UserError, first_line
from mnist_exp.training import checkpoint
from mnist_exp.training.images import SIZE, mnist_pixels, read_image

log = logging.getLogger(__name__)

# Bump when the conversion changes: cached tensors of the old one are then not used.
CONVERSION = "mnist_pixels-v2"
HOLD_OUT_SEED = 0  # fixes the held-out images and their order, whatever the trainer.seed
SHOWN = 5  # unreadable images named in the message, at most


@dataclass(frozen=True)
class FolderOptions:
    """How a folder of images is read: see conf/data/image_folder.yaml."""

    test_fraction: float = 0.2  # held out per class when there is no test/ folder
    image_size: int = SIZE
    cache_dir: str | None = None  # None: convert every time
    channels: int | None = None  # 1 gray, 3 RGB; None: 3 if any image has colour, else 1


@dataclass(frozen=True)
class Images:
    """Images uint8 `N x C x size x size` (C: 1 gray, 3 RGB), labels int64 (indices into the
    classes)."""

    images: Tensor
    labels: Tensor


def read(root: Path, options: FolderOptions) -> tuple[Images, Images, tuple[str, ...]]:
    """The training and test images of `root` and the class names (the folders' names)."""
    if not root.is_dir():
        raise UserError(f"data.root={str(root)!r} is not a folder: set it to your image folder")
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        present, absent = (train_dir, test_dir) if train_dir.is_dir() else (test_dir, train_dir)
        raise UserError(
            f"{root} has {present.name}/ but no {absent.name}/: add {absent}/<class>/ folders, "
            f"or put the class folders directly in {root} (data.test_fraction is then held out)"
        )
    if train_dir.is_dir():
        classes = _classes(train_dir)
        others = sorted(set(_classes(test_dir, at_least=1)) - set(classes))
        if others:
            raise UserError(
                f"{test_dir} has class folders that {train_dir} lacks ({', '.join(others)}): "
                f"add them to {train_dir.name}/ or remove them"
            )
        train, test = _same_channels(
            _converted(train_dir, classes, options), _converted(test_dir, classes, options)
        )
    else:
        classes = _classes(root)
        train, test = _hold_out(_converted(root, classes, options), options.test_fraction)
    return _shuffled(train), _shuffled(test), tuple(classes)


def _classes(folder: Path, at_least: int = 2) -> list[str]:
    """The class folders of `folder`, sorted (their order gives each class its index)."""
    from torchvision.datasets.folder import find_classes

    try:
        classes, _ = find_classes(folder)
    except FileNotFoundError:
        classes = []
    if len(classes) < at_least:
        found = f"one class folder ({classes[0]})" if classes else "no class folders"
        raise UserError(
            f"{folder} has {found}: a classifier needs at least two, one folder of images per "
            f"class (<class>/image.png)"
        )
    return classes


def _files(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, class index) of every image under `folder`'s class folders, as ImageFolder lists
    them; a class folder without images is refused."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    present = [c for c in classes if (folder / c).is_dir()]
    index = {c: classes.index(c) for c in present}
    files = make_dataset(folder, index, extensions=IMG_EXTENSIONS, allow_empty=True)
    found = {label for _, label in files}
    empty = [c for c in present if index[c] not in found]
    if empty:
        raise UserError(
            f"class folder {', '.join(str(folder / c) for c in empty)} holds no images "
            f"({', '.join(IMG_EXTENSIONS)}): add images or remove the folder"
        )
    return files


def _converted(folder: Path, classes: list[str], options: FolderOptions) -> Images:
    """Every image of `folder`, converted, from the cache when it holds this folder as it is."""
    files = _files(folder, classes)
    cache = _cache_file(folder, files, classes, options)
    if cache is not None and cache.is_file():
        try:
            cached = torch.load(cache, weights_only=True)
            return Images(cached["images"], cached["labels"])
        except Exception as exc:  # a damaged cache file is converted again
            log.warning(f"ignoring the unreadable cache file {cache} ({first_line(exc)})")
    log.info(f"Converting {len(files)} images of {folder} (once: they are cached)")
    pixels, unreadable = [], []
    for path, _ in files:
        try:
            image = read_image(Path(path))
            pixels.append(mnist_pixels(image, options.image_size, options.channels))
        except UserError as exc:
            unreadable.append(first_line(exc))
    if unreadable:
        more = f" and {len(unreadable) - SHOWN} more" if len(unreadable) > SHOWN else ""
        raise UserError(
            f"{len(unreadable)} of {len(files)} images cannot be read: "
            f"{'; '.join(unreadable[:SHOWN])}{more}: fix or remove them"
        )
    channels = max(len(p) for p in pixels)  # one image in colour makes the folder RGB
    array = np.stack([np.broadcast_to(p, (channels, *p.shape[1:])) for p in pixels])
    images = Images(
        torch.from_numpy(array.round().clip(0, 255).astype(np.uint8)),
        torch.tensor([label for _, label in files], dtype=torch.int64),
    )
    if cache is not None:
        _store(cache, images)
    return images


def _cache_file(
    folder: Path, files: list[tuple[str, int]], classes: list[str], options: FolderOptions
) -> Path | None:
    """Where the converted `folder` is cached: named by the folder and by what it holds."""
    if options.cache_dir is None:
        return None
    content = hashlib.blake2b(digest_size=16)
    content.update(repr((CONVERSION, options.image_size, options.channels, classes)).encode())
    for path, label in files:
        stat = os.stat(path)
        entry = (os.path.relpath(path, folder), label, stat.st_size, stat.st_mtime_ns)
        content.update(repr(entry).encode())
    where = hashlib.blake2b(str(folder.resolve()).encode(), digest_size=8).hexdigest()
    return Path(options.cache_dir) / f"{folder.name}-{where}-{content.hexdigest()}.pt"


def _store(cache: Path, images: Images) -> None:
    """Write the cache file and drop the folder's older ones (one not written costs only time)."""
    try:
        checkpoint.write_atomic({"images": images.images, "labels": images.labels}, cache)
    except UserError as exc:
        log.warning(f"the converted images are not cached: {exc}")
        return
    prefix = cache.name.rsplit("-", 1)[0]
    for old in cache.parent.glob(f"{prefix}-*.pt"):
        if old != cache:
            old.unlink(missing_ok=True)


def _same_channels(train: Images, test: Images) -> tuple[Images, Images]:
    """Both RGB when one is (its gray images repeated in red, green and blue), else as read."""
    channels = max(train.images.shape[1], test.images.shape[1])
    return _with_channels(train, channels), _with_channels(test, channels)


def _with_channels(images: Images, channels: int) -> Images:
    return Images(images.images.expand(-1, channels, -1, -1).contiguous(), images.labels)


def _hold_out(images: Images, fraction: float) -> tuple[Images, Images]:
    """Split off `fraction` of each class's images (at least one of a class of two or more)."""
    generator = torch.Generator().manual_seed(HOLD_OUT_SEED)
    test_index = []
    for label in images.labels.unique().tolist():
        members = torch.nonzero(images.labels == label).flatten()
        n = len(members)
        n_test = min(max(round(n * fraction), 1), n - 1) if n > 1 else 0
        test_index.append(members[torch.randperm(n, generator=generator)[:n_test]])
    is_test = torch.zeros(len(images.labels), dtype=torch.bool)
    is_test[torch.cat(test_index)] = True
    return _take(images, ~is_test), _take(images, is_test)


def _shuffled(images: Images) -> Images:
    """In a fixed random order, so that `data.max_*_samples` keep images of every class."""
    generator = torch.Generator().manual_seed(HOLD_OUT_SEED)
    return _take(images, torch.randperm(len(images.labels), generator=generator))


def _take(images: Images, index: Tensor) -> Images:
    return Images(images.images[index], images.labels[index])
