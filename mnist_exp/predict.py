"""`mnist-predict MODEL IMAGE...` (also `python -m mnist_exp.predict`): a model on image files.

Prints `IMAGE: LABEL (PROBABILITY)` for each image, LABEL the class's name where it has one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnist_exp.config.paths import compose_config
from mnist_exp.errors import UserError, exit_on_user_error
from mnist_exp.tracking.http import configure_requests
from mnist_exp.tracking.queries import input_shape, load_model
from mnist_exp.training.images import mnist_pixels, read_image


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
        *channels, height, width = input_shape(model)
        if channels not in ([], [1]) or height != width:
            raise UserError(f"{args.model} takes images {input_shape(model)}: not grayscale")
        predictions = model.predict(np.stack([mnist_pixels(image, width) for image in images]))
    import pandas as pd  # loaded with MLflow by now

    assert isinstance(predictions, pd.DataFrame)  # what our classifier (serving.py) returns
    rows = zip(args.images, predictions["label"], predictions["probability"], strict=True)
    for path, label, probability in rows:
        print(f"{path}: {label} ({probability:.1%})")


if __name__ == "__main__":
    main()
