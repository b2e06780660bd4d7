"""A run's servable model, in plain values that cross to the tracker (see `report.serving`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """The network's class and arguments, the images it takes, its classes and its code."""

    target: str  # the network's class, e.g. mnist_exp.models.ConvNet
    kwargs: dict[str, Any]  # the arguments it is built with
    input_shape: tuple[int, int, int]  # channels, height, width of one image, as the data's
    example: Any  # a few images as the model takes them: float32 NumPy (N, H, W) or (N, C, H, W)
    classes: tuple[str, ...] = ()  # each output's name, where the data names them; else its index
    code: tuple[str, ...] = ()  # files and folders of the class's own code, beside mnist_exp
    requirements: tuple[str, ...] = ()  # installed packages the class's code comes from
    step: int = 0  # the run's metrics at this step (the test's) are linked to the model
