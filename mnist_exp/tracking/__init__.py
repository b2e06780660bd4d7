"""MLflow: the store, the run and its recorder, the tracker process, the sweep's parent run."""
