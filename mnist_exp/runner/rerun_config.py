"""A recorded run's config made runnable again: `rerun.yaml`, for `mnist-rerun`."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mnist_exp import names
from mnist_exp.config.paths import compose_config
from mnist_exp.errors import UserError
from mnist_exp.runner.naming import describing
from mnist_exp.tracking.http import configure_requests
from mnist_exp.tracking.redaction import redact

# Groups that only matter to a sweep, never replayed into a single run.
_NOT_REPLAYED = ("hydra/", "hparams_search")
# Keys added since, at the value that repeats what a run recorded before them did.
_BEFORE_ADDED = {"trainer.test_best": False}  # it tested its last epoch, not its best


def write_rerun_config(source: str, overrides: list[str], resume: bool, conf_dir: Path) -> str:
    """Write `conf_dir/rerun.yaml`, the recorded choices and values on today's defaults, of
    `source` (a run id or Hydra run folder); returns the run's id (or the folder)."""
    cfg = compose_config([o for o in overrides if o.startswith("mlflow.")])
    configure_requests(cfg.mlflow)
    uri = cfg.mlflow.tracking_uri
    # Said before MLflow's import: it, the store and the run's files take seconds.
    print(f"fetching the recorded config of {source} from {redact(uri)}...", flush=True)
    from mnist_exp.tracking.store import get_run, open_store

    # A run being resumed waits for a tracking server that is briefly away, as its run does.
    retry_for_s = float(cfg.mlflow.get("retry_for_s") or 0) if resume else 0.0
    client, experiment_id = open_store(uri, cfg.mlflow.experiment_name, retry_for_s)
    folder = Path(source)
    if folder.is_dir():
        hydra_dir = folder / ".hydra"
        if not (hydra_dir / "config.yaml").is_file():
            raise UserError(
                f"{folder} has no .hydra/config.yaml: pass a Hydra run folder or run id"
            )
        where = f"tags.`{names.OUTPUT_DIR_TAG}` = '{folder.resolve()}'"
        run = next(iter(client.search_runs([experiment_id], filter_string=where)), None)
        recorded_tags = run.data.tags if run else {}
        run_id = run.info.run_id if run else str(folder.resolve())
    else:
        run = get_run(client, source, uri)
        recorded_tags, run_id = run.data.tags, source
        recorded_dir = str(conf_dir / "recorded")
        hydra_dir = Path(client.download_artifacts(source, names.HYDRA_FILES, recorded_dir))
    if resume and run is None:
        raise UserError(f"--resume: no MLflow run recorded {folder}: pass its run id")
    recorded = OmegaConf.load(hydra_dir / "config.yaml")
    choices = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.choices
    warn_about_environment(recorded_tags)
    defaults: list = ["config"]
    defaults += [
        {f"override /{group}": choice}
        for group, choice in choices.items()
        if choice is not None and not group.startswith(_NOT_REPLAYED)
    ]
    defaults.append("_self_")
    assert isinstance(recorded, DictConfig)
    recorded.trainer.resume = None
    for key, value in _BEFORE_ADDED.items():
        if OmegaConf.select(recorded, key) is None:
            OmegaConf.update(recorded, key, value)
    if "test_fraction" in recorded.data and "channels" not in recorded.data:  # data=image_folder
        recorded.data.channels = 1  # before the key, every image was read as gray
    if not resume:
        name = recorded_tags.get(names.RUN_NAME_TAG) or run_id
        changed = " ".join(describing(overrides))
        recorded.mlflow.run_name = f"rerun of {name}" + (f" ({changed})" if changed else "")
        recorded.mlflow.tags = {
            names.RERUN_OF_TAG: run_id,
            names.RERUN_OVERRIDES_TAG: " ".join(overrides),
        }
    text = OmegaConf.to_yaml(OmegaConf.merge({"defaults": defaults}, recorded))
    (conf_dir / "rerun.yaml").write_text(text)
    return run_id


def warn_about_environment(tags: dict[str, str]) -> None:
    """Say which recorded versions differ from this environment's: results may differ."""
    for key, recorded in sorted(tags.items()):
        package = key.removeprefix(names.VERSION_TAG)
        if package == key or package == "python":
            continue
        try:
            here = metadata.version(package)
        except metadata.PackageNotFoundError:
            here = "not installed"
        if here != recorded:
            why = f"{package} {here} here, {recorded} in the recorded run: results may differ"
            print(f"warning: {why}", file=sys.stderr)
