"""The run's MLflow model: raw 28x28 pixels in, the class and its probabilities out.

This file is also the model's code ("models from code"): MLflow copies it into the logged
model and runs it on loading, so it imports only torch, numpy, pandas and MLflow; the
network's class comes from the package copy logged beside it. Torch is imported only when
the model is loaded: saving it (in the tracker process) then costs no torch import.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.types.schema import Array

if TYPE_CHECKING:
    import torch

IMAGE_SIZE = 28


class MnistClassifier(PythonModel):
    """Predicts on float32 images of pixel values in [0, 255], shaped `(N, 28, 28)`.

    Pixels as the MNIST files hold them: 0 is the dark background, 255 the brightest ink.
    Returns one row per image: `label` (the predicted class), `probability` (its softmax
    probability) and `probabilities` (every class's, summing to 1).
    """

    def __init__(self) -> None:
        self.net: torch.nn.Module | None = None

    def load_context(self, context: PythonModelContext) -> None:
        """Build the network class named in the model config and load the logged weights."""
        import torch

        config = context.model_config
        module, _, name = config["model_target"].rpartition(".")
        net = getattr(importlib.import_module(module), name)(**config["model_kwargs"])
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        self.net = net.eval()

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
            logits = self.net(batch.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE))
        probabilities = torch.softmax(logits.float(), dim=1).double().numpy()
        return pd.DataFrame(
            {
                "label": probabilities.argmax(1),
                "probability": probabilities.max(1),
                "probabilities": list(probabilities),
            }
        )


def signature() -> ModelSignature:
    """Input: float32 tensors `(-1, 28, 28)`; output: label, probability, probabilities."""
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, IMAGE_SIZE, IMAGE_SIZE))])
    outputs = Schema(
        [
            ColSpec("long", "label"),
            ColSpec("double", "probability"),
            ColSpec(Array("double"), "probabilities"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def save(
    path: Path,
    weights: Path,
    model_target: str,
    model_kwargs: Mapping[str, Any],
    example: np.ndarray,
) -> None:
    """Write the MLflow model of the `state_dict` in `weights` to the new folder `path`.

    `model_target` names the network's class (e.g. `mnist_exp.models.ConvNet`), built with
    `model_kwargs`; `example` is a few images, float32 `(N, 28, 28)`, kept as input example.
    The mnist_exp package goes along as code, so loading needs no installed mnist-exp.
    """
    requirements = [
        f"mlflow=={mlflow.__version__}",
        f"torch=={importlib.metadata.version('torch').split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
    ]
    with _quiet("mlflow"):  # its note on validating the input example
        mlflow.pyfunc.save_model(
            str(path),
            python_model=Path(__file__),
            model_config={"model_target": model_target, "model_kwargs": dict(model_kwargs)},
            artifacts={"weights": str(weights)},
            code_paths=[str(Path(__file__).parents[1])],  # the whole mnist_exp package
            signature=signature(),
            input_example=example.astype(np.float32),
            pip_requirements=requirements,
        )


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


mlflow.models.set_model(MnistClassifier())
