"""The servable model's description from a run (`report.model_spec.ModelSpec`)."""

from __future__ import annotations

import importlib.metadata
import sys
import sysconfig
from pathlib import Path

from omegaconf import DictConfig

from mnist_exp.report.model_spec import ModelSpec
from mnist_exp.runner.build import Setup, model_arguments

EXAMPLES = 3  # test images kept in the model as its input example


def describe(cfg: DictConfig, setup: Setup, step: int) -> ModelSpec:
    """What `report.serving` needs to serve `setup.model`, as trained at global step `step`."""
    # As the model was built: image_size=32 for 32x32 images, in_channels=3 for RGB ones.
    kwargs = model_arguments(cfg, setup.data.channels)
    target = str(kwargs.pop("_target_"))
    images = setup.data.test.images[:EXAMPLES].cpu()
    channels, height, width = images.shape[1:]
    example = images[:, 0] if channels == 1 else images  # one channel: (N, H, W), as MNIST
    code, requirements = own_code(target)
    return ModelSpec(
        target=target,
        kwargs=kwargs,
        input_shape=(channels, height, width),
        example=example.numpy(),
        classes=setup.data.classes,
        code=code,
        requirements=requirements,
        step=step,
    )


def own_code(target: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the model carries of `target`'s top-level module, one's own (a file, a PYTHONPATH
    folder, an editable install), or the `name==version` it requires, one in site-packages."""
    top = target.split(".")[0]
    module = sys.modules.get(top)  # Hydra imported it to build the model
    if top == "mnist_exp" or module is None:
        return (), ()
    file = getattr(module, "__file__", None)
    if file is not None:
        path = Path(file).parent if Path(file).name == "__init__.py" else Path(file)
    else:  # a namespace package: its first folder
        locations = list(getattr(module, "__path__", []))
        if not locations:
            return (), ()  # built in: nothing to carry
        path = Path(locations[0])
    installed = {Path(sysconfig.get_path(k)).resolve() for k in ("stdlib", "purelib", "platlib")}
    if not any(path.resolve().is_relative_to(place) for place in installed):
        return (str(path),), ()
    distributions = importlib.metadata.packages_distributions().get(top, [])
    versions = (importlib.metadata.version(d).split("+")[0] for d in distributions)  # no +cpu
    return (), tuple(f"{d}=={v}" for d, v in zip(distributions, versions, strict=True))
