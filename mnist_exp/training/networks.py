"""The networks. `ConvNet` is the seed script's model, layer for layer."""

from collections.abc import Sequence

from torch import Tensor, nn


class ConvNet(nn.Module):
    """Two conv-BN-ReLU-pool blocks and a linear classifier, exactly as the seed script.

    The attribute names and layer order are part of the contract: a `model.ckpt` written by
    the seed loads into this class and the other way round. `image_size` (the images' side)
    sizes the classifier and `in_channels` (1 gray, 3 RGB) the first convolution; at 28 and 1,
    MNIST's, every parameter has the seed's shape.
    """

    def __init__(self, num_classes: int = 10, image_size: int = 28, in_channels: int = 1) -> None:
        super().__init__()
        self.layer1 = _block(in_channels, 16)
        self.layer2 = _block(16, 32)
        self.fc = nn.Linear(features(image_size, 32), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = _run_block(self.layer2, _run_block(self.layer1, x))
        return self.fc(out.reshape(out.size(0), -1))


class WideConvNet(nn.Module):
    """The seed's design with the two blocks' widths `channels` (the seed's: 16 and 32) and
    dropout (the share of features zeroed in training) before the classifier; `image_size` and
    `in_channels` as the ConvNet's."""

    def __init__(
        self,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64),
        dropout: float = 0.25,
        image_size: int = 28,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        first, second = channels
        self.layer1 = _block(in_channels, first)
        self.layer2 = _block(first, second)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(features(image_size, second), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = _run_block(self.layer2, _run_block(self.layer1, x))
        return self.fc(self.dropout(out.reshape(out.size(0), -1)))


def features(image_size: int, channels: int) -> int:
    """The flattened features after two blocks on `image_size` x `image_size` images: each
    2x2 pool halves the side, rounding down (28 -> 14 -> 7: the seed's 7 * 7 * 32)."""
    side = image_size // 2 // 2
    return side * side * channels


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv 5x5 (size kept), batch norm, ReLU, 2x2 max-pool (size halved): the seed's block."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=5, stride=1, padding=2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2, stride=2),
    )


def _run_block(block: nn.Sequential, x: Tensor) -> Tensor:
    """The block's layers with the ReLU after the pool, on a quarter of the values: the same
    numbers bit for bit, as both keep order (ties too) and pass no gradient to a negative."""
    conv, norm, relu, pool = block
    return relu(pool(norm(conv(x))))
