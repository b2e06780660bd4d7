"""Hydra callback refusing an Optuna search that cannot work, in one line, before the sweep's
MLflow parent run exists (conf/config.yaml lists it before `mlflow_sweep`): its settings, its
search space, its storage and an existing study's direction. It also registers the sweeper
with Hydra, which instantiates it next."""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mnist_exp.errors import UserError

# conf/hydra/sweeper/optuna.yaml's `_target_`: the sweeper these checks are for (its
# `mnist_exp.search.sweeper.PLUGIN_NAME`, kept here so other commands need not import Optuna).
SWEEPER = "hydra_plugins.mnist_exp_search.OptunaSweeper"


class SearchChecks(Callback):
    """Instantiated for every command; Optuna is imported only when a search starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.sweeper.get("_target_") != SWEEPER:
            return
        from mnist_exp.config.checks import check_search_space
        from mnist_exp.search.settings import Settings
        from mnist_exp.search.space import parse
        from mnist_exp.search.study import check_study, open_storage
        from mnist_exp.search.sweeper import register

        register()
        try:
            settings = Settings.of(config.hydra.sweeper, config)
            space = parse(settings.params, list(config.hydra.overrides.task))
            check_search_space(config, [*space.distributions, *space.fixed])
            check_study(settings, open_storage(settings))
        except UserError as exc:
            sys.exit(f"error: {exc}")
