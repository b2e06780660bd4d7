"""The data a run used, recorded as its MLflow dataset inputs; a rerun or resume whose data
differ from what its run recorded says so in one line."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from mnist_exp import names
from mnist_exp.runner.build import class_count
from mnist_exp.runner.train_eval import class_names
from mnist_exp.tracking.datasets import DataSplit
from mnist_exp.tracking.remote import RemoteRun
from mnist_exp.training import data

log = logging.getLogger("mnist_exp")


def data_splits(cfg: DictConfig, dataset: data.Data) -> list[DataSplit]:
    """Each split of `dataset` as the run used it, after max_*_samples and the validation split."""
    root = Path(cfg.data.root).resolve()
    base = root.name if cfg.data.dataset == data.IMAGE_FOLDER else cfg.data.dataset.rsplit(".")[-1]
    classes = class_names(dataset.classes, class_count(dataset))
    splits = [
        (names.DATA_TRAINING, "train", dataset.train),
        (names.DATA_VALIDATION, "val", dataset.val),
        (names.DATA_TESTING, "test", dataset.test),
    ]
    return [
        DataSplit(
            context=context,
            name=f"{base.lower()}-{suffix}",
            dataset=str(cfg.data.dataset),
            source=str(root),
            digest=data.digest(split),
            images=len(split),
            image_shape=list(split.images.shape[1:]),
            classes=classes,
        )
        for context, suffix, split in splits
        if split is not None
    ]


def record_data(
    cfg: DictConfig, dataset: data.Data, run: RemoteRun, compare_with: str | None
) -> None:
    """Record `dataset`'s splits in `run`; warn when they differ from those run `compare_with`
    recorded (a rerun's original, or the run resumed), unless it recorded none."""
    splits = data_splits(cfg, dataset)
    recorded = run.data_digests(compare_with) if compare_with else {}
    run.log_datasets(splits)
    if not recorded:
        return
    here = {split.context: split.digest for split in splits}
    differ = [
        f"{context} ({here.get(context, 'none')} here, "
        f"{', '.join(recorded.get(context, ['none']))} recorded)"
        for context in (names.DATA_TRAINING, names.DATA_VALIDATION, names.DATA_TESTING)
        if (context in here or context in recorded)
        and here.get(context) not in recorded.get(context, [])
    ]
    if differ:
        log.warning(
            f"warning: the data differ from what run {compare_with} used, by digest: "
            f"{'; '.join(differ)}; results may differ"
        )
