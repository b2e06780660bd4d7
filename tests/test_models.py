"""The ConvNet is the seed script's, layer for layer and key for key."""

import pytest
import torch
from torch import nn

from mnist_exp.training.networks import ConvNet, WideConvNet


class SeedConvNet(nn.Module):
    """Copied verbatim from shared/seed/seed-mnist-convnet.md."""

    def __init__(self, num_classes=10):
        super(SeedConvNet, self).__init__()  # noqa: UP008 - as the seed wrote it
        self.layer1 = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=5, stride=1, padding=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.layer2 = nn.Sequential(
            nn.Conv2d(16, 32, kernel_size=5, stride=1, padding=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.fc = nn.Linear(7 * 7 * 32, num_classes)

    def forward(self, x):
        out = self.layer1(x)
        out = self.layer2(out)
        out = out.reshape(out.size(0), -1)
        out = self.fc(out)
        return out


def test_layers_match_the_seed() -> None:
    ours = [(name, repr(m)) for name, m in ConvNet().named_modules() if name]
    seed = [(name, repr(m)) for name, m in SeedConvNet().named_modules() if name]
    assert ours == seed


def test_state_dict_keys_and_shapes_match_the_seed() -> None:
    ours = {k: v.shape for k, v in ConvNet().state_dict().items()}
    seed = {k: v.shape for k, v in SeedConvNet().state_dict().items()}
    assert list(ours) == list(seed)
    assert ours == seed


def test_a_seed_checkpoint_loads_and_predicts_the_same(tmp_path) -> None:
    seed = SeedConvNet().eval()
    torch.save(seed.state_dict(), tmp_path / "model.ckpt")
    ours = ConvNet()
    ours.load_state_dict(torch.load(tmp_path / "model.ckpt", weights_only=True))
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(ours.eval()(x), seed(x))


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_steps_are_the_seeds_bit_for_bit(precision, channels_last) -> None:
    """The ReLU runs after the pool here: outputs, gradients and BN statistics stay identical."""
    torch.manual_seed(0)
    seed, ours = SeedConvNet(), ConvNet()
    ours.load_state_dict(seed.state_dict())
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    for model in (seed, ours):
        model.to(memory_format=layout)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(3):
            with torch.autocast("cpu", dtype=precision or torch.float32, enabled=bool(precision)):
                loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (name, a), b in zip(seed.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(seed.eval()(x), ours.eval()(x))


def test_num_classes_sets_the_output_width() -> None:
    assert ConvNet(num_classes=7)(torch.rand(2, 1, 28, 28)).shape == (2, 7)


def test_the_wide_convnet_has_the_seeds_blocks_with_more_filters() -> None:
    wide = WideConvNet(num_classes=10, channels=(32, 64), dropout=0.25)
    assert wide(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    shapes = {k: tuple(v.shape) for k, v in wide.state_dict().items()}
    assert shapes["layer1.0.weight"] == (32, 1, 5, 5)
    assert shapes["layer2.0.weight"] == (64, 32, 5, 5)
    assert shapes["fc.weight"] == (10, 7 * 7 * 64)
    assert [type(m) for m in wide.layer2] == [type(m) for m in ConvNet().layer2]


@pytest.mark.parametrize("image_size", [32, 30, 16])
def test_image_size_sizes_the_classifier_and_28_is_the_seeds(image_size) -> None:
    """Two 2x2 pools, rounding down: a side of 32 leaves 8x8 features, 30 leaves 7x7."""
    side = image_size // 4
    for net, channels in [
        (ConvNet(image_size=image_size), 32),
        (WideConvNet(image_size=image_size), 64),
    ]:
        assert net.fc.in_features == side * side * channels
        assert net(torch.rand(2, 1, image_size, image_size)).shape == (2, 10)
    seed = {k: v.shape for k, v in SeedConvNet().state_dict().items()}
    assert {k: v.shape for k, v in ConvNet(image_size=28).state_dict().items()} == seed


def test_in_channels_sizes_the_first_convolution_and_1_is_the_seeds(tmp_path) -> None:
    """At in_channels=1 a seed checkpoint loads strictly; at 3 only the first kernel widens."""
    seed = SeedConvNet()
    torch.save(seed.state_dict(), tmp_path / "model.ckpt")
    ConvNet(in_channels=1).load_state_dict(torch.load(tmp_path / "model.ckpt", weights_only=True))
    shapes = {k: v.shape for k, v in seed.state_dict().items()}
    rgb = {k: v.shape for k, v in ConvNet(in_channels=3).state_dict().items()}
    assert {k for k in shapes if rgb[k] != shapes[k]} == {"layer1.0.weight"}
    assert rgb["layer1.0.weight"] == (16, 3, 5, 5)
    for net in (ConvNet(in_channels=3), WideConvNet(in_channels=3)):
        assert net(torch.rand(2, 3, 28, 28)).shape == (2, 10)
