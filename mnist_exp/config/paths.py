"""Where the project and its Hydra configs live, and the resolvers they use: `${project_root:}`,
`${study_storage:TRACKING_URI}`, `${mnist_exp_groups:}`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mnist_exp.config import schema
from mnist_exp.config.refusals import composition_refusal

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)


def study_storage(tracking_uri: str) -> str:
    """A search's default storage: `optuna.db` beside a SQLite MLflow store, else in mlruns/."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        return f"{prefix}{Path(tracking_uri.removeprefix(prefix)).parent / 'optuna.db'}"
    return f"{prefix}{PROJECT_ROOT / 'mlruns' / 'optuna.db'}"


def groups_help(*, _root_: DictConfig) -> str:
    """`mnist-train --help`'s groups, a line each: `model  convnet (in use), wide_convnet`
    (unlike Hydra's `$APP_CONFIG_GROUPS`: no `base_*` schema, and the option in use first)."""
    if not GlobalHydra.instance().is_initialized():
        return "(see conf/: a folder per group, a file per option)"
    loader = GlobalHydra.instance().config_loader()
    # Hydra's own groups worth choosing from on the command line come after the project's.
    groups = [g for g in sorted(loader.list_groups("")) if g != "hydra"] + ["hydra/launcher"]
    choices: dict[str, Any] = dict(_root_.hydra.runtime.choices)
    hidden = schema.schema_names()
    width = max(len(g) for g in groups) + 2
    lines = []
    for group in groups:
        options = [o for o in sorted(loader.get_group_options(group)) if o not in hidden]
        chosen = choices.get(group)
        if chosen in options:
            options.remove(chosen)
            options.insert(0, f"{chosen} (in use)")
        elif chosen is None:  # a group off by default: scheduler, experiment, hparams_search
            options.insert(0, "none (in use)")
        lines.append(f"{group.ljust(width)}{', '.join(options)}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("study_storage", study_storage, replace=True)
OmegaConf.register_new_resolver("mnist_exp_groups", groups_help, replace=True)
# conf/'s option files extend the schemas: stored before any composition (train's too).
schema.register()


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `mnist-train` would run with these overrides; a refusal is a `UserError`."""
    with composed(list(overrides or [])) as cfg:
        try:
            OmegaConf.resolve(cfg)  # a bad ${...}, an environment variable's, say: refused now
        except OmegaConfBaseException as exc:
            raise composition_refusal(exc) from None
        return cfg


@contextmanager
def composed(overrides: list[str], *, with_hydra: bool = False) -> Iterator[DictConfig]:
    """The composed config (`with_hydra`: its `hydra` node too), while Hydra's state lasts."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="train"):
        try:
            cfg = compose("config", overrides=overrides, return_hydra_config=with_hydra)
        except (HydraException, OmegaConfBaseException) as exc:
            raise composition_refusal(exc) from None
        yield cfg
