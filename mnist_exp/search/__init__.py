"""An Optuna search: Hydra's sweeper on a study that survives, resumes, prunes and is shared.

`sweeper` asks the study for trials and launches them as jobs; each job's runner reports to
its trial through `trial`; `study` owns the storage and what counts as done.
"""
