"""The data a run used, as MLflow dataset inputs: one per split, in its context (`training`,
`validation`, `testing`), named, with its source folder, size, classes and digest.

`DataSplit` travels to the tracker without MLflow, which the functions import when called.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput, Run


@dataclass
class DataSplit:
    """One split of the data a run used."""

    context: str  # names.DATA_TRAINING, DATA_VALIDATION or DATA_TESTING
    name: str  # e.g. mnist-train, or the image folder's name and the split's
    dataset: str  # data.dataset: a torchvision class, or ImageFolder
    source: str  # the folder read: data.root
    digest: str  # of exactly the images and labels used (`training.data.digest`)
    images: int
    image_shape: list[int]  # one image's channels, height, width (uint8)
    classes: list[str]  # each label's name (folders), or the labels' indices


def dataset_input(split: DataSplit) -> DatasetInput:
    """`split` as `mlflow.log_input(dataset, context=split.context)` records it: its folder as
    the source, its images' and labels' tensor schema, a profile of its class, size and classes."""
    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():  # MLflow registers its local source twice and says so
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(split.source)
    schema = TensorDatasetSchema(
        features=Schema([TensorSpec(np.dtype(np.uint8), (-1, *split.image_shape), "image")]),
        targets=Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")]),
    )
    profile = {"dataset": split.dataset, "images": split.images, "classes": split.classes}
    dataset = Dataset(
        name=split.name,
        digest=split.digest,
        source_type=source._get_source_type(),
        source=source.to_json(),
        schema=json.dumps(schema.to_dict()),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, split.context)])


def data_digests(run: Run) -> dict[str, list[str]]:
    """The digests of the data `run` recorded, by context: one each, or more for a run resumed
    on other data; none for a run recorded before datasets were."""
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    found: dict[str, list[str]] = {}
    for given in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in given.tags if t.key == MLFLOW_DATASET_CONTEXT), None)
        if context is not None:
            found.setdefault(context, []).append(given.dataset.digest)
    return found
