"""MLflow's limits on one call, for the run and the tracker's proxy (which never imports MLflow)."""

MAX_METRICS_PER_BATCH = 1000  # metrics in one log_batch call
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000  # characters of one param value
