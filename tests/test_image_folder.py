"""`data=image_folder`: a folder of one's own images, read as MNIST is, converted once and cached.

The folders are written in each test from MNIST's own images (as PNGs, and a few as other
formats and sizes), so what the loader returns can be checked against MNIST's tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_exp.config.checks import check_config
from mnist_exp.config.paths import compose_config
from mnist_exp.errors import UserError
from mnist_exp.training import image_folder
from mnist_exp.training.data import IMAGE_FOLDER, load
from mnist_exp.training.image_folder import FolderOptions
from mnist_exp.training.images import mnist_pixels

# pytest-xdist runs the file on one worker: its image folders, made once.
pytestmark = pytest.mark.xdist_group("image_folder")

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def mnist(data_root: Path):
    return load(
        "torchvision.datasets.MNIST", str(data_root), max_train_samples=200, max_test_samples=60
    )


def write_pngs(folder: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Each image as `folder/<its digit's name>/<n>.png`."""
    for n, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / NAMES[int(label)] / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(path)


def rows(images: torch.Tensor) -> list[bytes]:
    """The images as a sorted list of their bytes: equal lists, the same images."""
    return sorted(row.tobytes() for row in images.flatten(1).numpy())


def test_train_and_test_folders_load_as_mnist_with_the_folders_as_classes(mnist, tmp_path):
    write_pngs(tmp_path / "train", mnist.train.images, mnist.train.labels)
    write_pngs(tmp_path / "test", mnist.test.images, mnist.test.labels)
    data = load(IMAGE_FOLDER, str(tmp_path), folder=FolderOptions(cache_dir=None))
    assert data.classes == tuple(sorted(NAMES))  # ImageFolder's order: the folders' names
    assert data.train.images.shape == (200, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert data.train.labels.dtype == torch.int64 and len(data.test) == 60
    assert rows(data.train.images) == rows(mnist.train.images)  # 28x28 PNGs stay as they are
    assert rows(data.test.images) == rows(mnist.test.images)
    # Each image keeps its digit, now by the folder's name.
    digit = {
        bytes(r): int(label)
        for r, label in zip(mnist.train.images.flatten(1).numpy(), mnist.train.labels, strict=True)
    }
    for row, label in zip(data.train.images.flatten(1).numpy(), data.train.labels, strict=True):
        assert data.classes[label] == NAMES[digit[bytes(row)]]


def test_class_folders_alone_hold_out_test_fraction_of_each_class(mnist, tmp_path):
    write_pngs(tmp_path, mnist.train.images, mnist.train.labels)
    options = FolderOptions(test_fraction=0.25, cache_dir=None)
    data = load(IMAGE_FOLDER, str(tmp_path), folder=options)
    again = load(IMAGE_FOLDER, str(tmp_path), folder=options, seed=7)  # not the trainer's seed
    assert torch.equal(data.test.images, again.test.images)
    assert rows(torch.cat([data.train.images, data.test.images])) == rows(mnist.train.images)
    for name in NAMES:
        held = int((data.test.labels == data.classes.index(name)).sum())
        whole = int((mnist.train.labels == NAMES.index(name)).sum())
        assert abs(held - 0.25 * whole) <= 1, (name, held, whole)
    # In a mixed order: the first images of a max_*_samples subset hold several classes.
    assert len(data.train.labels[:20].unique()) > 3


def test_any_format_and_size_is_converted_as_mnist_predict_does_and_at_image_size(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for n in range(3):
            ink = (rng.random((60, 40)) > 0.7) * 255
            Image.fromarray((255 - ink).astype(np.uint8)).convert("RGB").save(
                tmp_path / name / f"{n}.jpg"
            )
    data = load(
        IMAGE_FOLDER, str(tmp_path), folder=FolderOptions(test_fraction=0.4, cache_dir=None)
    )
    expected = [mnist_pixels(Image.open(p)).round() for p in sorted(tmp_path.rglob("*.jpg"))]
    assert rows(torch.cat([data.train.images, data.test.images])) == rows(
        torch.from_numpy(np.stack(expected).astype(np.uint8))[:, None]
    )
    small = load(IMAGE_FOLDER, str(tmp_path), folder=FolderOptions(image_size=16, cache_dir=None))
    assert small.train.images.shape[1:] == (1, 16, 16)


def test_a_second_load_reads_the_cache_and_a_changed_file_is_converted_again(
    mnist, tmp_path, monkeypatch
):
    write_pngs(tmp_path / "images", mnist.test.images, mnist.test.labels)
    options = FolderOptions(cache_dir=str(tmp_path / "cache"))
    first = load(IMAGE_FOLDER, str(tmp_path / "images"), folder=options)
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(image_folder, "mnist_pixels", fail)
    second = load(IMAGE_FOLDER, str(tmp_path / "images"), folder=options)
    assert torch.equal(first.train.images, second.train.images)
    monkeypatch.undo()

    changed = next((tmp_path / "images" / "seven").iterdir())
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    third = load(IMAGE_FOLDER, str(tmp_path / "images"), folder=options)
    assert rows(torch.cat([third.train.images, third.test.images])) != rows(
        torch.cat([first.train.images, first.test.images])
    )
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the stale file went


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unreadable", "2 of 8 images cannot be read: {root}/one/bad.png is not an image file"),
        ("empty class", "class folder {root}/two holds no images (.jpg, "),
        ("one class", "{root} has one class folder (one): a classifier needs at least two"),
        ("train only", "{root} has train/ but no test/: add {root}/test/<class>/ folders"),
        ("no folder", "data.root='{root}/nothing' is not a folder"),
    ],
)
def test_what_cannot_be_a_dataset_is_refused_in_one_line(tmp_path, case, expected):
    root = tmp_path
    pixels = Image.fromarray(np.zeros((28, 28), np.uint8))
    for name in ("zero", "one"):
        (root / name).mkdir()
        for n in range(3):
            pixels.save(root / name / f"{n}.png")
    if case == "unreadable":
        (root / "one" / "bad.png").write_text("not a picture")
        (root / "zero" / "half.png").write_bytes((root / "zero" / "0.png").read_bytes()[:40])
    elif case == "empty class":
        (root / "two").mkdir()
    elif case == "one class":
        for path in (root / "zero").iterdir():
            path.unlink()
        (root / "zero").rmdir()
    elif case == "train only":
        (root / "train").mkdir()
        (root / "zero").rename(root / "train" / "zero")
    elif case == "no folder":
        root = tmp_path / "nothing"
    with pytest.raises(UserError) as info:
        load(IMAGE_FOLDER, str(root), folder=FolderOptions(cache_dir=None))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected.format(root=tmp_path)), message


def test_data_image_folder_needs_a_root_and_a_test_fraction_below_one():
    with pytest.raises(UserError, match=r"^data.root='\?\?\?' must name the folder of your images"):
        check_config(compose_config(["data=image_folder"]))
    with pytest.raises(
        UserError, match=r"^data.test_fraction=1.0 must be a number between 0 and 1"
    ):
        check_config(compose_config(["data=image_folder", "data.root=x", "data.test_fraction=1.0"]))
