"""What a run leaves in MLflow, and that a run recorded by older code still reruns and resumes.

Both are pinned by files captured from the code at commit 02e1143, before the package was
split into sub-packages: `data/default_run_keys.json` (the keys of a default run) and
`data/recorded_run/` (a run stopped by Ctrl-C after its first epoch). The tests run the
commands a user runs (in the test's process: their `main`) and read MLflow as a user would.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
from conftest import in_process, runs_in
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from mnist_exp import rerun
from mnist_exp.names import SLURM_JOB_TAG
from mnist_exp.tracking.processes import slurm_job

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test starts runs
DATA = Path(__file__).resolve().parent / "data"
KEYS = json.loads((DATA / "default_run_keys.json").read_text())
RECORDED = DATA / "recorded_run"
# Small enough for 2 cores; 256 test images hold all ten classes, so all ten per-class metrics.
SUBSET = ("trainer.epochs=1", "data.max_train_samples=512", "data.max_test_samples=256")


def _artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    files: set[str] = set()
    for entry in client.list_artifacts(run_id, path):
        files |= _artifact_files(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return files


def _in_a_git_checkout() -> bool:
    # The run tags its git commit only where `git rev-parse HEAD` works in the project root.
    try:
        subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


def test_a_default_run_records_the_same_params_metrics_tags_and_artifacts(
    mnist_train, tracking_uri
):
    """A default run (plots and model on) records the keys and files today's users rely on.

    Guards the MLflow side of a run (param names, metric names, tags, artifact paths) against
    a restructuring of the package, whose layout only the model's own code copy may follow.
    """
    ended = mnist_train("mlflow.log_plots=true", "mlflow.log_model=true", *SUBSET)
    assert ended.code == 0, ended.err
    assert "Downloading artifacts" not in ended.err  # MLflow's bar, from the tracker
    (run,) = runs_in(tracking_uri)
    client = MlflowClient(tracking_uri)

    # Sets, so that a failure lists the keys missing and the keys added.
    assert set(run.data.params) == set(KEYS["params"])
    sampled = {key for key in run.data.metrics if key.startswith("system/")}  # every 10 s
    assert set(run.data.metrics) - sampled == set(KEYS["metrics"])
    git_tags = KEYS["tags_in_a_git_checkout"] if _in_a_git_checkout() else []
    git_tags += [t for t in KEYS["tags_where_git_has_them"] if t in run.data.tags]
    slurm_tags = [SLURM_JOB_TAG] if slurm_job() else []  # the suite itself run by sbatch
    assert set(run.data.tags) == set(KEYS["tags"] + git_tags + slurm_tags)

    copy = KEYS["package_copy"]
    # The model is an MLflow 3 LoggedModel of the run: its files are not among the run's own,
    # and MLflow lists them through the run under the model's name, as runs:/RUN_ID/model.
    # MLflow 3.17 finds the model's files through the global store, whatever the client's.
    mlflow.set_tracking_uri(tracking_uri)
    files = _artifact_files(client, run.info.run_id) | _artifact_files(
        client, run.info.run_id, "model"
    )
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert (model.name, model.source_run_id) == ("model", run.info.run_id)
    assert {f for f in files if not f.startswith(copy)} == {
        f for f in KEYS["artifacts"] if not f.startswith(copy)
    }
    # The model imports its code from this copy, so it must be the whole package as it is on
    # disk (MLflow leaves out __pycache__), wherever inside the package the serving code lives.
    package = ROOT / "mnist_exp"
    on_disk = {
        copy + p.relative_to(package).as_posix()
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert {f for f in files if f.startswith(copy)} == on_disk


def _rerun(capfd, *args: str, tracking_uri: str) -> None:
    """`mnist-rerun ARGS` as a user types it, in this process; fails on an error, and on a
    warning that the data differ: a run recorded before datasets were has none to compare."""
    ended = in_process(rerun.main, [*args, f"mlflow.tracking_uri={tracking_uri}"], capfd)
    assert ended.code == 0, f"mnist-rerun {' '.join(args)} failed:\n{ended.out}\n{ended.err}"
    assert "data differ" not in ended.out + ended.err


def _steps(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    history = client.get_metric_history(run_id, "train_loss")
    return sorted((m.step, m.value) for m in history)


@pytest.fixture
def recorded(tracking_uri: str, tmp_path: Path) -> tuple[str, dict]:
    """The run in data/recorded_run/, rebuilt in this test's fresh store; its id and record.

    It was recorded at 02e1143 by `python -m mnist_exp.train data.root=... mlflow.tracking_uri=...
    mlflow.log_plots=false mlflow.log_model=false trainer.epochs=2 data.max_train_samples=512
    data.max_test_samples=256`, stopped with Ctrl-C once epoch 1's checkpoint was written.
    """
    record = json.loads((RECORDED / "run.json").read_text())
    client = MlflowClient(tracking_uri)
    # Its artifacts beside the store, as open_store puts them: not in the project's ./mlruns.
    where = (tmp_path / "artifacts").as_uri()
    experiment_id = client.create_experiment(record["experiment_name"], artifact_location=where)
    tags = dict(record["tags"])
    # Its run folder was on the recording machine: pointing the tag at a folder that does not
    # exist here makes the resume fetch checkpoints/last.ckpt from MLflow, as on another host.
    # Host and pid stay as recorded: only RUNNING runs are checked for a vanished process.
    tags["mnist_exp.output_dir"] = str(tmp_path / "folder-of-the-recording-machine")
    run = client.create_run(experiment_id, start_time=record["start_time"], tags=tags)
    run_id = run.info.run_id
    metrics = [
        Metric(key, value, timestamp, step)
        for key, history in record["metrics"].items()
        for step, value, timestamp in history
    ]
    params = [Param(k, v) for k, v in record["params"].items()]
    client.log_batch(run_id, metrics=metrics, params=params)
    for path in sorted((RECORDED / "artifacts").rglob("*")):
        if path.is_file():
            folder = path.parent.relative_to(RECORDED / "artifacts").as_posix()
            client.log_artifact(run_id, str(path), folder)
    client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    return run_id, record


def test_a_run_recorded_by_older_code_reruns_as_a_new_run(
    recorded, tracking_uri, data_root, tmp_path, capfd
):
    """`mnist-rerun RUN_ID` replays a run recorded before the restructuring.

    Guards the recorded `hydra/*.yaml` (which names classes by their module path, e.g.
    `model._target_`) staying replayable: the rerun is a new FINISHED run with the same model.
    """
    run_id, record = recorded
    _rerun(
        capfd,
        run_id,
        f"data.root={data_root}",
        f"hydra.run.dir={tmp_path}/rerun",
        tracking_uri=tracking_uri,
    )
    (again,) = [r for r in runs_in(tracking_uri) if r.info.run_id != run_id]
    assert again.info.status == "FINISHED"
    assert again.data.tags["mnist_exp.rerun_of"] == run_id
    model = {k: v for k, v in record["params"].items() if k.startswith("model.")}
    # The keys added since (issues 26, 28) at the values that build the recorded model: the seed's.
    model["model.image_size"] = "28"
    model["model.in_channels"] = "1"
    assert {k: v for k, v in again.data.params.items() if k.startswith("model.")} == model
    # Both of the recorded config's epochs: 512 images in batches of 64, a loss per step.
    assert [s for s, _ in _steps(MlflowClient(tracking_uri), again.info.run_id)] == list(
        range(1, 17)
    )


def test_a_run_stopped_under_older_code_resumes_to_the_end(
    recorded, tracking_uri, data_root, tmp_path, capfd
):
    """`mnist-rerun RUN_ID --resume` finishes a run that older code stopped after epoch 1.

    Guards the resume checkpoint format and the recorded config being accepted as the run's
    own, and the losses already in MLflow being kept and continued, not sent again.
    """
    run_id, record = recorded
    _rerun(
        capfd,
        run_id,
        "--resume",
        f"data.root={data_root}",
        f"hydra.run.dir={tmp_path}/resumed",
        tracking_uri=tracking_uri,
    )
    client = MlflowClient(tracking_uri)
    (run,) = runs_in(tracking_uri)  # the same run, no new one
    assert run.info.run_id == run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["mnist_exp.resumed_from_epoch"] == "1"
    assert "test_accuracy" in run.data.metrics
    before = [(step, value) for step, value, _ in record["metrics"]["train_loss"]]
    after = _steps(client, run_id)
    assert after[: len(before)] == before
    # Epoch 2 continues at the step after the recorded ones, each step logged once.
    assert [s for s, _ in after] == list(range(1, 17))
