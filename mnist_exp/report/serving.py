"""The run's MLflow model: an image's pixels in, the class and its probabilities out.

This file is also the model's code ("models from code"): MLflow copies it into the logged
model and runs it on loading, so it imports only torch, numpy, pandas and MLflow; the
network's class comes from the code logged beside it (the mnist_exp package, and the
module or package of a model of one's own). Torch is imported only when the model is
loaded: saving or logging it (in the tracker process) imports no torch.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import logging
import tempfile
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.types.schema import Array

if TYPE_CHECKING:
    import torch

    from mnist_exp.report.model_spec import ModelSpec

# The model's own artifacts: the network's weights, and what to build it from (a file, not
# MLflow's model_config, which MLflow would also log as params of the run).
WEIGHTS, CONFIG = "weights", "config"


class MnistClassifier(PythonModel):
    """Predicts on float32 images of pixel values in [0, 255], shaped `(N, H, W)` (one
    channel; MNIST's are 28x28) or `(N, C, H, W)`.

    Pixels as the MNIST files hold them: 0 is the dark background, 255 the brightest ink.
    Returns one row per image: `label` (the predicted class: its name where the training
    data named its classes, else its index), `probability` (its softmax probability) and
    `probabilities` (every class's, summing to 1).
    """

    def __init__(self) -> None:
        self.net: torch.nn.Module | None = None
        self.input_shape: tuple[int, ...] = (1, 28, 28)
        self.classes: list[str] = []

    def load_context(self, context: PythonModelContext) -> None:
        """Build the network class named in the config and load the logged weights."""
        import torch

        config = json.loads(Path(context.artifacts[CONFIG]).read_text())
        module, _, name = config["target"].rpartition(".")
        net = getattr(importlib.import_module(module), name)(**config["kwargs"])
        state = torch.load(context.artifacts[WEIGHTS], map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        self.net = net.eval()
        self.input_shape = tuple(config["input_shape"])
        self.classes = list(config["classes"])

    def predict(
        self,
        context: PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Label, probability and probabilities for each image of `model_input`."""
        import torch

        if self.net is None:
            raise RuntimeError("MnistClassifier.load_context has not run")
        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32) / 255.0)
        with torch.inference_mode():
            logits = self.net(batch.reshape(-1, *self.input_shape))
        probabilities = torch.softmax(logits.float(), dim=1).double().numpy()
        best = probabilities.argmax(1)
        labels = [self._name(int(k)) for k in best] if self.classes else best
        return pd.DataFrame(
            {
                "label": labels,
                "probability": probabilities.max(1),
                "probabilities": list(probabilities),
            }
        )

    def _name(self, index: int) -> str:
        """The class's name; an output beyond the named classes is called by its index."""
        return self.classes[index] if index < len(self.classes) else str(index)


def signature(input_shape: tuple[int, int, int], classes: tuple[str, ...] = ()) -> ModelSignature:
    """Input: float32 tensors `(-1, H, W)` (`(-1, C, H, W)` for more than one channel);
    output: label (text where the classes have names), probability, probabilities."""
    channels, height, width = input_shape
    shape = (-1, height, width) if channels == 1 else (-1, channels, height, width)
    inputs = Schema([TensorSpec(np.dtype(np.float32), shape)])
    outputs = Schema(
        [
            ColSpec("string" if classes else "long", "label"),
            ColSpec("double", "probability"),
            ColSpec(Array("double"), "probabilities"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def save(path: Path, weights: Path, spec: ModelSpec) -> None:
    """Write the MLflow model of the `state_dict` in `weights` to the new folder `path`."""
    with _flavor(weights, spec) as flavor, _quiet("mlflow"):
        mlflow.pyfunc.save_model(str(path), **flavor)


def log(
    run_id: str, name: str, weights: Path, spec: ModelSpec, tags: Mapping[str, str] | None = None
) -> str:
    """Log the model of the `state_dict` in `weights` as the run's model `name`, with `tags`
    (they win over MLflow's guesses from this process); its id.

    MLflow 3 makes it a LoggedModel of the run (listed by `mlflow.search_logged_models`,
    loaded as `runs:/RUN_ID/name` or `models:/MODEL_ID`) and links to it the run's metrics
    at `spec.step`. This is what `mlflow.pyfunc.log_model` does, given the run by its id:
    the tracker keeps no active run (`mlflow.start_run` would, and ending it would mark the
    run FINISHED before its end). MLflow's global store and experiment must be the run's.
    """
    with _flavor(weights, spec) as flavor, _quiet("mlflow"):
        info = Model.log(
            artifact_path=None,  # deprecated for `name`, yet a required argument
            name=name,
            flavor=_UNCHECKED_PYFUNC,
            run_id=run_id,
            step=spec.step,
            tags=dict(tags or {}),
            # Else MLflow loads the model to predict on the input example, importing torch
            # into the tracker process, which more than doubles its memory.
            validate_serving_input=False,
            **flavor,
        )
    return str(info.model_id)


# mlflow.pyfunc as `Model.log` uses it (its name and `save_model`), but for the keyword
# `validate_serving_input`, which `Model.log` reads and `pyfunc.save_model` refuses.
_UNCHECKED_PYFUNC = types.SimpleNamespace(
    __name__=mlflow.pyfunc.__name__,
    save_model=lambda validate_serving_input, **kwargs: mlflow.pyfunc.save_model(**kwargs),
)


@contextlib.contextmanager
def _flavor(weights: Path, spec: ModelSpec) -> Iterator[dict[str, Any]]:
    """The arguments of `mlflow.pyfunc.save_model` (and `log_model`) for this model."""
    requirements = [
        f"mlflow=={mlflow.__version__}",
        f"torch=={importlib.metadata.version('torch').split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        *spec.requirements,
    ]
    config = {
        "target": spec.target,
        "kwargs": spec.kwargs,
        "input_shape": list(spec.input_shape),
        "classes": list(spec.classes),
    }
    with tempfile.TemporaryDirectory() as scratch:
        config_file = Path(scratch) / "model.json"
        config_file.write_text(json.dumps(config, indent=1))
        yield {
            "python_model": Path(__file__),
            "artifacts": {WEIGHTS: str(weights), CONFIG: str(config_file)},
            # The mnist_exp package, and the model's own code when it lives elsewhere.
            "code_paths": [str(Path(__file__).parents[1]), *spec.code],
            "signature": signature(spec.input_shape, spec.classes),
            "input_example": np.asarray(spec.example, dtype=np.float32),
            "pip_requirements": requirements,
        }


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


mlflow.models.set_model(MnistClassifier())
