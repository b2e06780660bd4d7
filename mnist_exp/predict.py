"""`mnist-predict MODEL IMAGE...` (also `python -m mnist_exp.predict`): a model on image files.

Prints `IMAGE: LABEL (PROBABILITY)` for each image, LABEL the class's name where it has one.
Each image is converted to the model's channels: grayscale for a gray model, RGB for a colour one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.tracking import MlflowClient
from mlflow.types import TensorSpec

from mnist_exp.config.paths import compose_config
from mnist_exp.errors import UserError, exit_on_user_error, first_line
from mnist_exp.names import IMAGE_CHANNELS
from mnist_exp.tracking.http import configure_requests
from mnist_exp.tracking.outage import Outage
from mnist_exp.tracking.queries import run_model
from mnist_exp.tracking.store import sqlite_path
from mnist_exp.training.images import SIZE, mnist_pixels, read_image


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, predict, print one line per image; errors are one line."""
    parser = argparse.ArgumentParser(
        prog="mnist-predict", description="Classify image files with a run's logged model."
    )
    parser.add_argument("model", help="a run id (its `model`), or a model URI: models:/NAME/latest")
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    store = "the MLflow store (default: mlflow.tracking_uri; MLFLOW_TRACKING_URI wins when set)"
    parser.add_argument("--tracking-uri", help=store)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        images = [read_image(path) for path in args.images]
        mlflow = compose_config().mlflow  # the default store, and how to talk to a server
        configure_requests(mlflow)
        model = load_model(args.model, args.tracking_uri or str(mlflow.tracking_uri))
        shape = input_shape(model)
        *channels, height, width = shape
        channel_count = channels[0] if channels else 1  # (H, W): one channel, as MNIST's
        if len(channels) > 1 or channel_count not in IMAGE_CHANNELS or height != width:
            raise UserError(f"{args.model} takes images {shape}: neither gray nor RGB squares")
        pixels = np.stack([mnist_pixels(image, width, channel_count) for image in images])
        predictions = model.predict(pixels.reshape(-1, *shape))
    import pandas as pd  # loaded with MLflow by now

    assert isinstance(predictions, pd.DataFrame)  # what our classifier (serving.py) returns
    rows = zip(args.images, predictions["label"], predictions["probability"], strict=True)
    for path, label, probability in rows:
        print(f"{path}: {label} ({probability:.1%})")


def load_model(model: str, tracking_uri: str) -> PyFuncModel:
    """The model `model` names: a run's (its id), or a model URI (`runs:/RUN_ID/model`,
    `models:/NAME/latest`, `models:/NAME/3`, ...); a `UserError` naming what is missing."""
    database = sqlite_path(tracking_uri)
    if database is not None and not database.is_file():
        raise UserError(
            f"no MLflow store at {tracking_uri}: pass --tracking-uri of the store the run is in"
        )
    mlflow.set_tracking_uri(tracking_uri)
    if ":/" in model:
        try:
            return Outage(tracking_uri, 0).call(lambda: mlflow.pyfunc.load_model(model))
        except MlflowException as exc:
            raise UserError(
                f"no model {model} in {tracking_uri} ({first_line(exc)}): pass a run id or a "
                f"model URI such as models:/NAME/latest"
            ) from exc
    client = MlflowClient(tracking_uri)
    try:
        run = Outage(tracking_uri, 0).call(lambda: client.get_run(model))
    except MlflowException as exc:
        raise UserError(
            f"no MLflow run {model!r} in {tracking_uri}: pass a run id shown by mnist-compare "
            f"or the MLflow UI, or --tracking-uri of the store that holds it"
        ) from exc
    uri = run_model(client, run)
    if uri is None:
        raise UserError(
            f"MLflow run {model} has no model (trained with mlflow.log_model=false, or "
            f"before runs logged one): rerun it with mnist-rerun {model}"
        )
    return mlflow.pyfunc.load_model(uri)


def input_shape(model: PyFuncModel) -> tuple[int, ...]:
    """`(H, W)` or `(C, H, W)`: one image as the model takes it, from its signature."""
    schema = model.metadata.get_input_schema()
    spec = schema.inputs[0] if schema is not None and schema.inputs else None
    if not isinstance(spec, TensorSpec):
        return (SIZE, SIZE)  # not one of ours: MNIST's
    return tuple(spec.shape[1:])


if __name__ == "__main__":
    main()
