"""`mnist-train --help`: the `${mnist_exp_groups:}` resolver that conf/hydra/help/ uses.

Hydra's own `$APP_CONFIG_GROUPS` lists the `base_*` schemas of `config.schema` among each
group's options, and says nothing of which option is the default; this lists what a user
can choose, the one in use first. Registered on import (by `mnist_exp.train`).
"""

from __future__ import annotations

from typing import Any

from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from mnist_exp.config import schema

# Hydra's own groups worth choosing from on the command line, after the project's.
HYDRA_GROUPS = ("hydra/launcher",)


def groups_help(*, _root_: DictConfig) -> str:
    """One line per group, `model  convnet (in use), wide_convnet`; the groups Hydra lists."""
    if not GlobalHydra.instance().is_initialized():
        return "(see conf/: a folder per group, a file per option)"
    loader = GlobalHydra.instance().config_loader()
    groups = [g for g in sorted(loader.list_groups("")) if g != "hydra"] + list(HYDRA_GROUPS)
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


OmegaConf.register_new_resolver("mnist_exp_groups", groups_help, replace=True)
