"""`mnist-predict RUN_ID IMAGE...` (also `python -m mnist_exp.predict`): a run's model on files.

Prints `IMAGE: DIGIT (PROBABILITY)` for each image (see `report.predictions` for how any
image is made to look like MNIST's).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnist_exp.errors import UserError
from mnist_exp.report.predictions import mnist_pixels, read_image
from mnist_exp.tracking.queries import load_model


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, predict, print one line per image; errors are one line."""
    parser = argparse.ArgumentParser(
        prog="mnist-predict", description="Classify image files with a run's logged model."
    )
    parser.add_argument("run_id", help="the MLflow run whose `model` to use")
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    parser.add_argument(
        "--tracking-uri",
        help="the MLflow store (default: mnist-train's, mlflow.tracking_uri; "
        "MLFLOW_TRACKING_URI wins when set)",
    )
    args = parser.parse_args(argv)
    try:
        pixels = np.stack([mnist_pixels(read_image(path)) for path in args.images])
        model = load_model(args.run_id, args.tracking_uri or _default_tracking_uri())
        predictions = model.predict(pixels)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    import pandas as pd  # loaded with MLflow by now

    # Any model's output may be many things; the classifier's (serving.py) is a DataFrame.
    assert isinstance(predictions, pd.DataFrame)
    for path, label, probability in zip(
        args.images, predictions["label"], predictions["probability"], strict=True
    ):
        print(f"{path}: {label} ({probability:.1%})")


def _default_tracking_uri() -> str:
    from mnist_exp.config.paths import compose_config  # Hydra: only when no URI was given

    return str(compose_config().mlflow.tracking_uri)
