"""Where the project and its Hydra configs live, and the resolvers they use: `${project_root:}`,
`${study_storage:TRACKING_URI}`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mnist_exp.config import schema
from mnist_exp.config.refusals import composition_refusal

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"

OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)


def study_storage(tracking_uri: str) -> str:
    """An Optuna search's default storage: `optuna.db` beside a SQLite MLflow store, else in
    `<project>/mlruns/` (conf/hydra/sweeper/optuna.yaml: `${study_storage:...}`)."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        return f"{prefix}{Path(tracking_uri.removeprefix(prefix)).parent / 'optuna.db'}"
    return f"{prefix}{PROJECT_ROOT / 'mlruns' / 'optuna.db'}"


OmegaConf.register_new_resolver("study_storage", study_storage, replace=True)
# The option files in conf/ extend these schemas: they must be stored before any composition,
# here or through the `@hydra.main` of mnist_exp.train, which imports this module.
schema.register()


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `mnist-train` would run with these overrides (for tools beside training).

    Raises `UserError` in one line for a value the schema refuses or an unknown key.
    """
    with composed(list(overrides or [])) as cfg:
        try:
            OmegaConf.resolve(cfg)  # a bad ${...}, an environment variable's, say: refused now
        except OmegaConfBaseException as exc:
            raise composition_refusal(exc) from None
        return cfg


@contextmanager
def composed(overrides: list[str], *, with_hydra: bool = False) -> Iterator[DictConfig]:
    """The composed config, while Hydra's global state made for it lasts (a job needs it);
    `with_hydra` keeps the `hydra` node. A refusal is a one-line `UserError`."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="train"):
        try:
            cfg = compose("config", overrides=overrides, return_hydra_config=with_hydra)
        except (HydraException, OmegaConfBaseException) as exc:
            raise composition_refusal(exc) from None
        yield cfg
