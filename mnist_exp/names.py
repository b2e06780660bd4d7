"""The names a run leaves in MLflow: metric keys, tag keys and artifact paths, each defined once.

Users, tools and old runs rely on them; plain constants, which the loop may import too.
"""

from __future__ import annotations

import re

# Metrics. Steps are global optimizer steps.
TRAIN_LOSS = "train_loss"  # every trainer.log_every_n_steps steps
EPOCH = "epoch"  # at each epoch's end, with the epoch's other metrics
EPOCH_SECONDS = "epoch_seconds"
TRAIN_IMAGES_PER_S = "train_images_per_s"
VAL_LOSS = "val_loss"
VAL_ACCURACY = "val_accuracy"
TEST_LOSS = "test_loss"
TEST_ACCURACY = "test_accuracy"  # a fraction in [0, 1]
TEST_ACCURACY_CLASS = "test_accuracy_class_"  # + the class's name (see class_metric)
STARTUP_S = "startup_s"  # from the start of the process to the first optimizer step
TEST_PREFIX = "test_"  # metrics of the test set, measured once, after training
# A run that watches trainer.monitor (a validation split, or early stopping): its best epoch,
# that epoch's value as `<monitor>_best`, and when the best epoch's weights are tested, the
# test accuracy of the last epoch's.
BEST_EPOCH = "best_epoch"
BEST_SUFFIX = "_best"
TEST_ACCURACY_LAST_EPOCH = "test_accuracy_last_epoch"
# What `trainer.monitor` may name, the per-epoch metrics, and whether higher or lower is better.
MONITORABLE_METRICS = {
    VAL_ACCURACY: "max",
    VAL_LOSS: "min",
    TRAIN_IMAGES_PER_S: "max",
    EPOCH_SECONDS: "min",
}
# What `optimized_metric` may name, and whether higher ("max") or lower ("min") is better.
OPTIMIZABLE_METRICS = {
    TEST_ACCURACY: "max",
    TEST_LOSS: "min",
    VAL_ACCURACY: "max",
    VAL_LOSS: "min",
    TRAIN_IMAGES_PER_S: "max",
}
# A sweep's parent run.
SWEEP_JOBS, SWEEP_FINISHED, SWEEP_FAILED = "sweep_jobs", "sweep_finished", "sweep_failed"
BEST_PREFIX = "best_"  # + optimized_metric: the best child's value
# An Optuna search's parent: its study's trials that count towards n_trials, by how they ended.
TRIALS_COMPLETE, TRIALS_PRUNED, TRIALS_FAILED = "trials_complete", "trials_pruned", "trials_failed"

# A param beside the config's: the processes that trained the run (torchrun), only when several.
WORLD_SIZE = "world_size"

# Tags of every run.
OVERRIDES_TAG = "mnist_exp.overrides"  # the Hydra overrides of the command line
OUTPUT_DIR_TAG = "mnist_exp.output_dir"  # the run's Hydra folder, where its checkpoints are
COMMAND_TAG = "mnist_exp.command"
HOST_TAG, PID_TAG, PID_START_TAG = "mnist_exp.host", "mnist_exp.pid", "mnist_exp.pid_start"
SLURM_REQUEUES_TAG = "mnist_exp.slurm_requeues"  # times SLURM requeued the job, once it has
SLURM_JOB_TAG = "mnist_exp.slurm_job_id"  # as squeue and sacct name it (`123_4`: array task 4)
VERSION_TAG = "mnist_exp.version."  # + a package name, or python
DEVICE_TAG = "mnist_exp.device"  # cpu, cuda:0, ...: a parallel sweep's job gets its own GPU
TORCH_THREADS_TAG = "mnist_exp.torch_threads"  # a parallel job's share of the cores
GIT_DIRTY_TAG = "mnist_exp.git.dirty"  # as MLFLOW_GIT_DIRTY_TAG, for runs recorded before it
SOURCE_TAG = "mnist_exp.source"  # "python" on a run started through mnist_exp.api
# Why a run FAILED, and where; a run resumed later drops them.
ERROR_TAG = "mnist_exp.error"
FAILED_STEP_TAG, FAILED_EPOCH_TAG = "mnist_exp.failed_step", "mnist_exp.failed_epoch"
FAILURE_TAGS = (ERROR_TAG, FAILED_STEP_TAG, FAILED_EPOCH_TAG)
RESUMED_FROM_EPOCH_TAG = "mnist_exp.resumed_from_epoch"
TRACKER_RESTARTS_TAG = "mnist_exp.tracker_restarts"  # trackers that took over from a dead one
RERUN_OF_TAG, RERUN_OVERRIDES_TAG = "mnist_exp.rerun_of", "mnist_exp.rerun_overrides"
# A run that early stopping ended before trainer.epochs, and the epoch it stopped after.
EARLY_STOPPED_TAG = "mnist_exp.early_stopped"
EARLY_STOPPED_AT_EPOCH_TAG = "mnist_exp.early_stopped_at_epoch"
# MLflow's own tags.
RUN_NAME_TAG = "mlflow.runName"
PARENT_RUN_TAG = "mlflow.parentRunId"
PARENT_RUN_ENV = "MNIST_EXP_PARENT_RUN_ID"  # set by the sweep callback for the jobs it launches
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_BRANCH_TAG, GIT_REPO_URL_TAG = "mlflow.source.git.branch", "mlflow.source.git.repoURL"
MLFLOW_GIT_DIRTY_TAG = "mlflow.source.git.dirty"  # beside MLflow's: "True" or "False"
# What started the run, as the UI's source column shows it: the user's command or notebook.
SOURCE_NAME_TAG, SOURCE_TYPE_TAG = "mlflow.source.name", "mlflow.source.type"

# Tags of a sweep's parent run.
SWEEP_TAG = "mnist_exp.sweep"  # "true"
METRIC_TAG = "mnist_exp.optimized_metric"
SWEEP_OVERRIDES_TAG = "mnist_exp.sweep.overrides"
SWEEP_PARAMS_TAG = "mnist_exp.sweep.params"
SWEEPER_TAG, LAUNCHER_TAG = "mnist_exp.sweep.sweeper", "mnist_exp.sweep.launcher"
SWEEP_DIR_TAG = "mnist_exp.sweep.dir"
# When the sweep last began (ms since the epoch): a search's reopened parent keeps its first start.
SWEEP_OPENED_TAG = "mnist_exp.sweep.opened_at"
BEST_RUN_ID_TAG, BEST_RUN_NAME_TAG = "mnist_exp.best_run_id", "mnist_exp.best_run_name"
BEST_OVERRIDES_TAG = "mnist_exp.best_overrides"
# An Optuna search's parent: its study, storage (redacted), best trial and its `key=value ...`.
STUDY_TAG, STORAGE_TAG = "mnist_exp.sweep.study", "mnist_exp.sweep.storage"
BEST_TRIAL_TAG, BEST_PARAMS_TAG = "mnist_exp.best_trial", "mnist_exp.best_params"
# A search job's run: its trial's number; a pruned one, and the epoch it stopped after.
TRIAL_TAG = "mnist_exp.trial"
PRUNED_TAG, PRUNED_AT_EPOCH_TAG = "mnist_exp.pruned", "mnist_exp.pruned_at_epoch"
# User attributes of the Optuna study and its trials: the MLflow parent run, each trial's run.
STUDY_PARENT_RUN_ATTR, TRIAL_RUN_ID_ATTR = "mlflow_parent_run_id", "mlflow_run_id"

# The `mlflow.data.context` of each split's dataset input (MLflow's usual values); each input's
# digest is `training.data.digest` of exactly the images and labels the run used.
DATA_TRAINING, DATA_VALIDATION, DATA_TESTING = "training", "validation", "testing"

# Params (the resolved config, dotted) that tools read.
SEED_PARAM = "trainer.seed"  # mnist-compare takes runs that differ only in it together

# Artifact paths.
CHECKPOINTS = "checkpoints"  # model.ckpt (the final state_dict) and last.ckpt (for resuming)
FINAL_WEIGHTS = "model.ckpt"  # also its name in the run folder
RESUME_CHECKPOINT = "checkpoints/last.ckpt"  # also its path inside the run folder
BEST_WEIGHTS = "checkpoints/best.ckpt"  # the best epoch's state_dict; also in the run folder
HYDRA_FILES = "hydra"  # config.yaml, overrides.yaml, hydra.yaml; resumed-N/ for each resume
REQUIREMENTS = "environment/requirements.txt"
MODEL = "model"
# Each kept epoch's weights, a LoggedModel at its step (mlflow.log_checkpoints).
CHECKPOINT_MODEL = "checkpoint"
CHECKPOINT_MODEL_WEIGHTS = "checkpoints/epochs"  # their files in the run folder, epoch-N.ckpt
LOG_CHECKPOINTS = ("improved", "every", "none")  # values of mlflow.log_checkpoints
PLOTS = "plots"
OPTUNA_PLOTS = "optuna"  # an Optuna search's parent: Optuna's pictures of its study
# Hydra's job log (what the terminal showed); a resumed run's next part in logs/resumed-<epoch>/.
RUN_LOG = "logs/train.log"
# In the run folder: what could not be sent to a server that stayed away (`mnist-sync` sends it).
UNSENT = "mlflow-unsent"

# Tags of a model version that `mnist-compare --register` registers: where it came from.
REGISTERED_RUN_TAG = "mnist_exp.run_id"
REGISTERED_METRIC_TAG = "mnist_exp.metric"  # the metric the run was chosen by ...
REGISTERED_VALUE_TAG = "mnist_exp.metric_value"  # ... and its value
REGISTERED_TEST_ACCURACY_TAG = "mnist_exp.test_accuracy"  # the run's, whatever it was chosen by
REGISTERED_DATA_DIGEST_TAG = "mnist_exp.train_data_digest"  # its training data's (see DATA_*)

# Values of trainer.precision: fp32, as the seed, or bfloat16 autocast.
PRECISIONS = ("32", "bf16-mixed")
# Values of data.channels (null beside them: from the images) and what images they are.
IMAGE_CHANNELS = {1: "gray", 3: "RGB"}


def class_metric(name: str) -> str:
    """`test_accuracy_class_<name>` (index or folder name), characters MLflow refuses made `_`."""
    return TEST_ACCURACY_CLASS + re.sub(r"[^\w\-. /:]", "_", name)


def best_metric(monitor: str) -> str:
    """`<monitor>_best` (`val_accuracy_best`): the best epoch's value of `trainer.monitor`."""
    return monitor + BEST_SUFFIX


def job_key(overrides: list[str]) -> str:
    """A sweep's or a job's overrides (`OVERRIDES_TAG`, split) as a continued sweep matches
    them: in any order."""
    return " ".join(sorted(overrides))
