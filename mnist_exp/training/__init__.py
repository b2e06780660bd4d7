"""Training without Hydra or MLflow: models, data in memory, the loop, checkpoints."""
