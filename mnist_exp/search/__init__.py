"""An Optuna search: Hydra's sweeper on a study that survives, resumes, prunes and is shared.

`sweeper` asks the study for trials and launches them as jobs (each job's runner reports to
its trial through `runner.search_trial`); `study` owns the storage and what counts as done;
`summary` is what the sweep's parent run records of it.
"""

# conf/hydra/sweeper/optuna.yaml's `_target_`: the name Hydra instantiates the sweeper by (see
# `sweeper.register`); here, so that other commands can tell a search without importing Optuna.
PLUGIN_NAME = "hydra_plugins.mnist_exp_search.OptunaSweeper"
