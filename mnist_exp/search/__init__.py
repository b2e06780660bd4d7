"""An Optuna search: Hydra's sweeper on a study that survives, resumes, prunes and is shared."""

# conf/hydra/sweeper/optuna.yaml's `_target_`: the name Hydra instantiates the sweeper by (see
# `sweeper.register`); here, so that other commands can tell a search without importing Optuna.
PLUGIN_NAME = "hydra_plugins.mnist_exp_search.OptunaSweeper"
