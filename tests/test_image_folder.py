"""`data=image_folder`: a folder of one's own images, read as MNIST is, converted once and cached;
the models sized by `data.image_size`, and a model that does not fit the images refused.

The folders are written in each test from MNIST's own images (as PNGs, and a few as other
formats and sizes), so what the loader returns can be checked against MNIST's tensors; the
colour ones from red, green and blue of one gray level, which only colour tells apart.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import in_process, runs_in
from mlflow.tracking import MlflowClient
from PIL import Image

from mnist_exp import api, predict
from mnist_exp.config.checks import check_config
from mnist_exp.config.paths import compose_config
from mnist_exp.errors import UserError
from mnist_exp.report.plots import misclassified_grid
from mnist_exp.runner.build import check_fit, model_arguments
from mnist_exp.training import image_folder
from mnist_exp.training.data import IMAGE_FOLDER, Data, Split, load
from mnist_exp.training.image_folder import FolderOptions
from mnist_exp.training.images import mnist_pixels
from mnist_exp.training.networks import ConvNet

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
        torch.from_numpy(np.stack(expected).astype(np.uint8))
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


@pytest.fixture(scope="module")
def digits(mnist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST's images as PNGs in train/ and test/ class folders; read at 32x32, they are cached
    beside them (`data.cache_dir`), once for the module."""
    folder = tmp_path_factory.mktemp("digits")
    write_pngs(folder / "images" / "train", mnist.train.images, mnist.train.labels)
    write_pngs(folder / "images" / "test", mnist.test.images, mnist.test.labels)
    return folder


def at_32(digits: Path) -> list[str]:
    """The overrides of `data=image_folder` on `digits` converted to 32x32."""
    return [
        "data=image_folder",
        f"data.root={digits / 'images'}",
        f"data.cache_dir={digits / 'cache'}",
        "data.image_size=32",
        "trainer.epochs=1",
    ]


@pytest.mark.slow
def test_the_convnet_trains_on_32x32_images_and_its_model_predicts_at_that_size(
    mnist_train, tracking_uri, digits, tmp_path, capfd
):
    ended = mnist_train(*at_32(digits), "mlflow.log_model=true")
    assert ended.code == 0, ended.err
    (run,) = runs_in(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.image_size"] == "32"  # followed data.image_size
    assert 0 <= run.data.metrics["test_accuracy"] <= 1
    weights = torch.load(tmp_path / "run" / "model.ckpt", weights_only=True)
    assert weights["fc.weight"].shape == (10, 8 * 8 * 32)  # 32 -> 16 -> 8 a side

    image = next((digits / "images" / "test" / "seven").iterdir())
    argv = [run.info.run_id, str(image), "--tracking-uri", tracking_uri]
    shown = in_process(predict.main, argv, capfd)
    assert shown.code == 0, shown.err
    assert re.fullmatch(rf"{re.escape(str(image))}: \w+ \(\d+\.\d%\)\n", shown.out), shown.out


# A model of one's own made for 28x28 images, or for five classes, whatever it is told.
FIXED_NET = """
import torch


class Net(torch.nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = torch.nn.Linear(28 * 28, 5)

    def forward(self, x):
        return self.fc(x.flatten(1))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["model._target_=fixed_net.Net"],
            "error: model fixed_net.Net does not fit the data's 1x32x32 images (RuntimeError: "
            "mat1 and mat2 shapes cannot be multiplied (2x1024 and 784x5)): make its layers "
            "fit 32x32 images: take image_size as the ConvNet does (README: Your own model), "
            "or set data.image_size to the size it takes",
        ),
        (
            ["model.image_size=28"],
            "error: model mnist_exp.models.ConvNet does not fit the data's 1x32x32 images "
            "(RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x2048 and 1568x10)): "
            "set model.image_size=32, the data's size",
        ),
        (
            ["model._target_=fixed_net.Net", "data.image_size=28"],
            "error: model fixed_net.Net returns 2x5 for 2 images of 1x28x28, not 2x10 (a score "
            "per image and class): make its last layer give model.num_classes outputs",
        ),
    ],
    ids=["own model for 28x28", "convnet told 28", "too few outputs"],
)
def test_a_model_that_does_not_fit_the_images_is_one_line_without_a_run(
    mnist_train, tracking_uri, digits, tmp_path, monkeypatch, overrides, expected
):
    (tmp_path / "fixed_net.py").write_text(FIXED_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fixed_net", raising=False)  # gone again after the test
    ended = mnist_train(*at_32(digits), *overrides)
    sys.modules.pop("fixed_net", None)
    assert ended.code == 1
    assert ended.err.strip().splitlines()[-1] == expected
    assert runs_in(tracking_uri) == []
    assert not (tmp_path / "run").exists()  # its log had a line: the run folder went all the same


def test_image_size_goes_only_to_a_model_that_takes_it(tmp_path, monkeypatch):
    """A model of one's own written before the key existed is built as it was."""
    (tmp_path / "fixed_net.py").write_text(
        FIXED_NET + "\ndef any_net(**kwargs):\n    return kwargs\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fixed_net", raising=False)
    on_32 = ["data=image_folder", "data.root=x", "data.image_size=32"]
    convnet = model_arguments(compose_config(on_32), channels=1)
    assert convnet == {
        "_target_": "mnist_exp.models.ConvNet",
        "num_classes": 10,
        "image_size": 32,
        "in_channels": 1,  # null: the data's
    }
    own = model_arguments(compose_config([*on_32, "model._target_=fixed_net.Net"]), channels=3)
    assert own == {"_target_": "fixed_net.Net", "num_classes": 10}
    open_ended = model_arguments(
        compose_config([*on_32, "model._target_=fixed_net.any_net"]), channels=3
    )
    assert open_ended["image_size"] == 32 and open_ended["in_channels"] == 3
    assert model_arguments(compose_config([]), channels=1)["image_size"] == 28  # MNIST's
    told = compose_config(["model=wide_convnet", "model.in_channels=1"])
    assert model_arguments(told, channels=3)["in_channels"] == 1  # as told: check_fit refuses


def test_the_check_changes_neither_the_model_nor_the_random_draws():
    """Two images through the model in eval mode: batch norm's statistics, the training mode
    and torch's RNG stay as they were, so a run trains exactly as it would without it."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.tensor([0, 1, 2, 3]))
    cfg = compose_config(["data=image_folder", "data.root=x", "data.image_size=32"])
    model = ConvNet(image_size=32).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_fit(cfg, model, Data(split, None, split), torch.device("cpu"))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(
        UserError, match=r"^model mnist_exp.models.ConvNet does not fit the data's 1x32x32 images"
    ):
        check_fit(cfg, ConvNet(), Data(split, None, split), torch.device("cpu"))


# Red, green and blue of one luminance (L = 0.299 R + 0.587 G + 0.114 B = 100, as Pillow's
# grayscale rounds it): in gray the three classes look alike, so only colour tells them apart.
COLOURS = {"red": (241, 40, 40), "green": (40, 142, 40), "blue": (85, 85, 220)}
NOISE = 10  # each pixel lighter or darker by up to this, alike in R, G and B: L moves with it


def write_colours(folder: Path, per_class: int, rng: np.random.Generator) -> None:
    """`per_class` 28x28 images of each colour as `folder/<colour>/<n>.png`, each its own."""
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for n in range(per_class):
            texture = rng.integers(-NOISE, NOISE + 1, (28, 28, 1))
            pixels = (np.array(rgb) + texture).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{n}.png")


def test_the_colours_differ_only_in_hue():
    """Whatever the texture, a pixel of each colour has the same gray level: 100 + texture."""
    for rgb in COLOURS.values():
        for texture in range(-NOISE, NOISE + 1):
            pixel = tuple(c + texture for c in rgb)
            assert all(0 <= c <= 255 for c in pixel)
            assert Image.new("RGB", (1, 1), pixel).convert("L").getpixel((0, 0)) == 100 + texture


def test_colour_is_kept_when_an_image_has_it_and_a_gray_rgb_image_stays_one_channel(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "test" / name).mkdir(parents=True)
        for n in range(2):
            gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(gray).convert("RGB").save(tmp_path / "train" / name / f"{n}.png")
            Image.fromarray(gray).save(tmp_path / "test" / name / f"{n}.png")
    gray = load(IMAGE_FOLDER, str(tmp_path), folder=FolderOptions(cache_dir=None))
    assert gray.channels == 1 and gray.test.images.shape[1] == 1  # r == g == b: gray

    for part in ("train", "test"):
        (tmp_path / part / "colour").mkdir()
    Image.new("RGB", (28, 28), COLOURS["red"]).save(tmp_path / "test" / "colour" / "0.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "train" / "colour" / "0.png")
    both = load(IMAGE_FOLDER, str(tmp_path), folder=FolderOptions(cache_dir=None))
    assert both.train.images.shape[1:] == both.test.images.shape[1:] == (3, 28, 28)
    gray_ones = both.train.images[both.train.labels != both.classes.index("colour")]
    assert torch.equal(gray_ones, gray_ones[:, :1].expand(-1, 3, -1, -1))  # repeated in R, G, B
    red = both.test.images[both.test.labels == both.classes.index("colour")][0]
    assert red.flatten(1).float().mean(1).argmax() == 0  # kept red: not inverted (dark paper)

    forced = load(IMAGE_FOLDER, str(tmp_path), folder=FolderOptions(cache_dir=None, channels=1))
    assert forced.channels == 1
    rgb = load(
        IMAGE_FOLDER, str(tmp_path / "train"), folder=FolderOptions(channels=3, cache_dir=None)
    )
    assert rgb.channels == 3


def test_colour_is_fitted_as_its_luminance_and_every_channel_alike():
    """Red ink on white paper, larger than 28x28: inverted, boxed and centred by luminance,
    with the red, green and blue planes cut, scaled and moved alike."""
    paper = np.full((90, 60, 3), 255, np.uint8)
    paper[20:70, 25:40] = (220, 20, 20)
    image = Image.fromarray(paper)
    rgb = mnist_pixels(image, channels=None)
    gray = mnist_pixels(image)
    assert rgb.shape == (3, 28, 28) and gray.shape == (1, 28, 28)
    luminance = np.tensordot([0.299, 0.587, 0.114], rgb, axes=1)
    assert np.abs(luminance - gray[0]).max() < 3  # the same box and place as the gray image's
    assert ((rgb > 0).any(0) == (gray[0] > 0)).all()
    assert rgb[0].max() < rgb[1].max()  # inverted: red on white is cyan (R low) on black


def test_data_channels_is_1_3_or_null_and_a_model_told_other_channels_is_refused():
    with pytest.raises(UserError, match=r"^data.channels=2 must be 1 \(gray\), 3 \(RGB\) or null"):
        check_config(compose_config(["data=image_folder", "data.root=x", "data.channels=2"]))
    images = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    split = Split(images, torch.tensor([0, 1]))
    cfg = compose_config(["data=image_folder", "data.root=x", "model.in_channels=1"])
    with pytest.raises(UserError) as info:
        check_fit(cfg, ConvNet(in_channels=1), Data(split, None, split), torch.device("cpu"))
    message = str(info.value)
    assert message.startswith("model mnist_exp.models.ConvNet does not fit the data's 3x28x28")
    assert message.endswith("set model.in_channels=null (the data's channels) or 3")


def test_the_misclassified_images_show_in_colour(tmp_path):
    images = torch.zeros((2, 3, 28, 28), dtype=torch.uint8)
    images[:, 0] = 200  # red: shown as its inverse, cyan, as gray images are shown dark on white
    wrong = misclassified_grid(
        images, torch.tensor([0, 1]), torch.tensor([1, 1]), tmp_path / "g.png"
    )
    assert wrong == 1
    shown = np.asarray(Image.open(tmp_path / "g.png").convert("RGB")).reshape(-1, 3)
    assert ((shown[:, 0] == 55) & (shown[:, 1] == 255)).any()


@pytest.mark.slow
def test_three_colours_of_one_luminance_are_learned_and_the_model_predicts_red(
    tmp_path, tracking_uri, capfd, monkeypatch
):
    """Gray conversion makes the classes alike (a third right, at best); colour keeps them."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rng = np.random.default_rng(0)
    write_colours(tmp_path / "colours" / "train", 40, rng)
    write_colours(tmp_path / "colours" / "test", 20, rng)
    result = api.train(
        [
            "data=image_folder",
            f"data.root={tmp_path / 'colours'}",
            "data.cache_dir=null",
            "data.batch_size=16",
            "model.num_classes=3",
            "trainer.epochs=2",
            f"mlflow.tracking_uri={tracking_uri}",
            f"hydra.run.dir={tmp_path / 'run'}",
            "mlflow.log_plots=false",
        ]
    )
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.data.metrics["test_accuracy"] >= 0.95
    weights = torch.load(tmp_path / "run" / "model.ckpt", weights_only=True)
    assert weights["layer1.0.weight"].shape == (16, 3, 5, 5)  # in_channels followed the data

    red = tmp_path / "red.png"
    Image.new("RGB", (28, 28), COLOURS["red"]).save(red)
    shown = in_process(
        predict.main, [result.run_id, str(red), "--tracking-uri", tracking_uri], capfd
    )
    assert shown.code == 0, shown.err
    assert shown.out.startswith(f"{red}: red ("), shown.out
