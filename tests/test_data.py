"""Datasets load offline from a seeded folder into tensors scaled as the seed's ToTensor."""

from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.transforms.functional import to_tensor

from mnist_exp.errors import UserError
from mnist_exp.training.data import Split, batch_indices, load

MNIST = "torchvision.datasets.MNIST"


def test_mnist_loads_whole_and_scaled_like_to_tensor(data_root: Path) -> None:
    data = load(MNIST, str(data_root))
    assert data.train.images.shape == (60000, 1, 28, 28)
    assert data.test.images.shape == (10000, 1, 28, 28)
    assert data.train.images.dtype == torch.uint8
    assert data.train.labels.dtype == torch.int64
    assert data.val is None
    reference = torchvision.datasets.MNIST(str(data_root), train=True)
    for i in (0, 123, 59999):
        image, label = reference[i]
        scaled = data.train.inputs(torch.tensor([i]))[0]
        torch.testing.assert_close(scaled, to_tensor(image), rtol=0, atol=0)
        assert data.train.labels[i] == label


def test_fashion_mnist_loads(data_root: Path) -> None:
    data = load("torchvision.datasets.FashionMNIST", str(data_root), max_test_samples=10)
    assert len(data.train) == 60000
    assert len(data.test) == 10
    reference = torchvision.datasets.FashionMNIST(str(data_root), train=False)
    image, label = reference[7]
    torch.testing.assert_close(
        data.test.inputs(torch.tensor([7]))[0], to_tensor(image), rtol=0, atol=0
    )
    assert data.test.labels[7] == label


def test_validation_split_is_fixed_by_the_seed_and_disjoint(data_root: Path) -> None:
    a = load(MNIST, str(data_root), val_size=1000, seed=3)
    b = load(MNIST, str(data_root), val_size=1000, seed=3)
    c = load(MNIST, str(data_root), val_size=1000, seed=4)
    assert len(a.val) == 1000 and len(a.train) == 59000
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.images, c.val.images)
    train_rows = {row.tobytes() for row in a.train.images.flatten(1).numpy()}
    val_rows = [row.tobytes() for row in a.val.images.flatten(1).numpy()]
    # MNIST has a handful of duplicate images; all but those must be absent from training.
    assert sum(row in train_rows for row in val_rows) <= 5


def test_max_samples_keep_the_first_images(data_root: Path) -> None:
    whole = load(MNIST, str(data_root))
    small = load(MNIST, str(data_root), max_train_samples=100, max_test_samples=50)
    assert len(small.train) == 100 and len(small.test) == 50
    assert torch.equal(small.train.labels, whole.train.labels[:100])


def test_a_validation_split_as_large_as_the_training_set_is_refused(data_root: Path) -> None:
    with pytest.raises(UserError, match=r"data.val_size=60000"):
        load(MNIST, str(data_root), val_size=60000)


def test_missing_files_are_named_with_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        load(MNIST, str(tmp_path), download=False)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "data.root" in message
    assert "\n" not in message


def test_a_truncated_idx_file_is_refused(data_root: Path, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (data_root / "MNIST" / "raw").glob("*-ubyte"):
        (raw / f.name).write_bytes(f.read_bytes())
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte is truncated"):
        load(MNIST, str(tmp_path), download=False)


def test_batch_indices_cover_every_sample_once_with_a_short_last_batch() -> None:
    batches = batch_indices(10, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert torch.cat(batch_indices(5, 2, None)).tolist() == [0, 1, 2, 3, 4]


def test_shifts_move_each_image_within_bounds_and_repeat_with_the_generator() -> None:
    images = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 14, 14] = 255
    split = Split(images, torch.zeros(3, dtype=torch.int64))

    def bright_pixels(seed: int) -> list[tuple[int, int]]:
        batch = split.inputs(
            torch.arange(3), max_shift=2, generator=torch.Generator().manual_seed(seed)
        )
        return [tuple(int(i) for i in (b[0] == 1).nonzero()[0]) for b in batch]

    moved = bright_pixels(0)
    assert all(12 <= r <= 16 and 12 <= c <= 16 for r, c in moved)
    assert moved == bright_pixels(0)
    assert any(bright_pixels(seed) != moved for seed in range(1, 5))


def test_rotation_and_scale_turn_and_resize_each_image_by_its_own_draw() -> None:
    bar = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    bar[:, 0, 6:22, 13:15] = 255  # a vertical bar through the centre, 16 pixels long
    split = Split(bar, torch.zeros(8, dtype=torch.int64))

    def augmented(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return split.inputs(torch.arange(8), generator=generator, max_rotation=40, max_scale=0.2)

    batch = augmented(0)
    assert torch.equal(batch, augmented(0)) and not torch.equal(batch, augmented(1))
    draws = torch.rand((2, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    angles, scales = (draws * 2 - 1) * torch.tensor([[40.0], [0.2]], dtype=torch.float64) + (
        torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    )
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    for image, angle, scale in zip(batch[:, 0], angles, scales, strict=True):
        mass = image.sum()
        r, c = (image * rows).sum() / mass, (image * cols).sum() / mass
        assert abs(r - 13.5) < 0.5 and abs(c - 13.5) < 0.5  # turned about the centre
        # The bar's long axis leans by the drawn angle; its mass grows with the scale squared.
        rr, cc, rc = (
            (image * (rows - r) ** 2).sum(),
            (image * (cols - c) ** 2).sum(),
            (image * (rows - r) * (cols - c)).sum(),
        )
        lean = 0.5 * torch.atan2(2 * rc, rr - cc)
        assert abs(abs(float(torch.rad2deg(lean))) - abs(float(angle))) < 3
        assert float(mass) / (16 * 2) == pytest.approx(float(scale) ** 2, rel=0.1)
