"""What `trainer.resume` points at, a run id or a checkpoint file, checked (read only) first."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from mnist_exp.errors import UserError
from mnist_exp.names import OUTPUT_DIR_TAG
from mnist_exp.names import RESUME_CHECKPOINT as CHECKPOINT_ARTIFACT
from mnist_exp.tracking.mlflow_run import flatten, param_value
from mnist_exp.tracking.store import get_run, open_store
from mnist_exp.training import checkpoint

# Keys that may differ from the stopped run's without changing what it computes.
MAY_DIFFER = (
    "trainer.resume",
    "trainer.epochs",
    "trainer.print_every_n_steps",
    "trainer.progress_bar",
    "trainer.num_threads",
    "data.root",
    "data.download",
    "mlflow.",
    "device.",
)


def find(resume: str, client: MlflowClient, tracking_uri: str) -> tuple[dict[str, Any], Run]:
    """The checkpoint to continue from and the run it belongs to."""
    path = Path(resume).expanduser()
    if path.suffix == ".ckpt" or path.exists() or "/" in resume:
        state = checkpoint.load(path)
        return state, get_run(client, state["run_id"], tracking_uri)
    run = get_run(client, resume, tracking_uri)
    local = Path(run.data.tags.get(OUTPUT_DIR_TAG, "/nonexistent")) / CHECKPOINT_ARTIFACT
    if local.is_file():
        return checkpoint.load(local), run
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fetched = client.download_artifacts(resume, CHECKPOINT_ARTIFACT, tmp)
        except Exception as exc:
            raise UserError(
                f"trainer.resume: run {resume} has no {CHECKPOINT_ARTIFACT} (it stopped before "
                f"its first epoch ended): start it again with mnist-rerun {resume}"
            ) from exc
        return checkpoint.load(Path(fetched)), run


def check_resumable(state: Mapping[str, Any], run: Run, params: Mapping[str, Any]) -> None:
    """Refuse a finished run, a checkpoint past the last epoch, or a config that differs; a
    checkpoint of the last epoch resumes to testing and recording."""
    run_id = run.info.run_id
    if run.info.status == "FINISHED":
        raise UserError(
            f"trainer.resume: run {run_id} already FINISHED; nothing to resume "
            f"(to train again or longer: mnist-rerun {run_id} trainer.epochs=N)"
        )
    epochs = params.get("trainer.epochs")
    if isinstance(epochs, int) and state["epoch"] > epochs:
        raise UserError(
            f"trainer.resume: the checkpoint is at epoch {state['epoch']}, past trainer.epochs="
            f"{epochs}: set trainer.epochs to {state['epoch']} or more"
        )
    recorded = run.data.params
    differ = [
        f"{key} ({param_value(value)} here, {recorded[key]} in the run)"
        for key, value in params.items()
        if key in recorded
        and not key.startswith(MAY_DIFFER)
        and param_value(value) != recorded[key]
    ]
    if differ:
        raise UserError(
            f"trainer.resume: this config differs from run {run_id}'s in {'; '.join(differ[:3])}: "
            f"resume with its own config: mnist-rerun {run_id} --resume"
        )


def resumable(cfg: DictConfig, config: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The checkpoint `trainer.resume` points at and its run, checked before the slow part."""
    uri = cfg.mlflow.tracking_uri
    retry_for_s = float(cfg.mlflow.get("retry_for_s") or 0)
    client, _ = open_store(uri, cfg.mlflow.experiment_name, retry_for_s)
    state, run = find(str(cfg.trainer.resume), client, uri)
    check_resumable(state, run, flatten(config))
    return state, run.info.run_id
