"""`python -m mnist_exp.train` end to end, asserting what a user finds in MLflow afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SMALL, free_port, runs_in, stop
from mlflow.tracking import MlflowClient
from PIL import Image

from mnist_exp.training.networks import ConvNet


@pytest.mark.process
@pytest.mark.slow
def test_a_small_run_records_everything_in_mlflow(train, tracking_uri: str, tmp_path: Path):
    proc = train(*SMALL, "optimizer.lr=0.002", "trainer.print_every_n_steps=5")
    assert "Epoch [2/2], Step [10/10], Loss: " in proc.stdout
    assert "Test Accuracy of the model on the 200 test images: " in proc.stdout

    (run,) = runs_in(tracking_uri)
    client = MlflowClient(tracking_uri)
    assert run.info.status == "FINISHED"
    # Named after what changes the experiment; display-only overrides are left out.
    assert run.info.run_name == "max_train_samples=640,max_test_samples=200,epochs=2,lr=0.002"

    params = run.data.params
    assert params["optimizer.lr"] == "0.002"
    assert params["data.batch_size"] == "64"
    assert params["model._target_"] == "mnist_exp.models.ConvNet"
    assert params["trainer.epochs"] == "2"
    assert params["mlflow.tracking_uri"] == tracking_uri

    tags = run.data.tags
    assert "optimizer.lr=0.002" in tags["mnist_exp.overrides"]
    assert tags["mnist_exp.version.torch"] == metadata.version("torch")
    assert "mnist_exp.version.mnist-exp" in tags

    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 21))  # 640 / 64 = 10 steps x 2 epochs
    assert 0 <= run.data.metrics["test_accuracy"] <= 1
    assert run.data.metrics["test_loss"] > 0
    assert len(client.get_metric_history(run.info.run_id, "train_images_per_s")) == 2
    assert "val_accuracy" not in run.data.metrics

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert artifacts == {"hydra/config.yaml", "hydra/overrides.yaml", "hydra/hydra.yaml"}
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    model = ConvNet()
    model.load_state_dict(torch.load(local / "checkpoints" / "model.ckpt", weights_only=True))
    recorded = yaml.safe_load((local / "hydra" / "config.yaml").read_text())
    assert recorded["optimizer"]["lr"] == 0.002
    assert (tmp_path / "run" / "model.ckpt").is_file()


@pytest.mark.process
@pytest.mark.slow
def test_log_every_n_steps_and_a_validation_split(train, tracking_uri: str):
    train(*SMALL, "trainer.log_every_n_steps=3", "data.val_size=500")
    (run,) = runs_in(tracking_uri)
    client = MlflowClient(tracking_uri)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == [3, 6, 9, 12, 15, 18]
    val = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in val] == [10, 20]
    assert all(0 <= m.value <= 1 for m in val)
    assert run.data.params["data.val_size"] == "500"


@pytest.mark.process
@pytest.mark.slow
def test_the_seeds_own_setting_trains_one_image_a_step(train, tracking_uri: str):
    train("experiment=seed", "data.max_train_samples=24", "data.max_test_samples=50")
    (run,) = runs_in(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.batch_size"] == "1"
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 24 * 5 + 1))  # 24 steps x 5 epochs
    assert 0 <= run.data.metrics["test_accuracy"] <= 1


@pytest.mark.process
@pytest.mark.slow
def test_an_exception_during_training_marks_the_run_failed(
    train_command, tracking_uri: str, tmp_path: Path
):
    """A model of one's own whose forward pass fails: the run exists by then, and is FAILED."""
    (tmp_path / "faulty.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(784, num_classes)\n"
        "    def forward(self, x):\n"
        "        raise RuntimeError('the forward pass failed')\n"
    )
    cmd, env = train_command(*SMALL, "model._target_=faulty.Net")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    (run,) = runs_in(tracking_uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["mnist_exp.error"] == "RuntimeError: the forward pass failed"


@pytest.mark.process
@pytest.mark.slow
def test_sigterm_marks_the_run_killed(data_root: Path, tracking_uri: str, tmp_path: Path):
    cmd = [
        sys.executable, "-m", "mnist_exp.train", f"data.root={data_root}",
        f"mlflow.tracking_uri={tracking_uri}", f"hydra.run.dir={tmp_path}/run",
        "data.max_train_samples=2000", "data.batch_size=8", "trainer.epochs=100",
    ]  # fmt: skip
    MlflowClient(tracking_uri).search_experiments()  # create the store before polling it
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = runs_in(tracking_uri)
            if runs and MlflowClient(tracking_uri).get_metric_history(
                runs[0].info.run_id, "train_loss"
            ):
                break
            time.sleep(0.5)
        stderr = stop(proc, signal.SIGTERM)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "KILLED" in stderr
    (run,) = runs_in(tracking_uri)
    assert run.info.status == "KILLED"
    assert MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train_loss")


@pytest.mark.process
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model=resnet999", "error: model=resnet999 is not an option of model"),
        ("optimizer.lrr=1", "error: optimizer.lrr is not a config key"),
    ],
)
def test_unknown_option_or_key_fails_in_hydra_without_a_run(
    train, tracking_uri, override, expected
):
    proc = train(override, check=False)
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()  # refused while Hydra composes, in one line
    assert line.startswith(expected), line
    assert runs_in(tracking_uri) == []


@pytest.mark.process
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optimizer.lr=0", "optimizer.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.epochs=-1", "trainer.epochs"),
        # Refused only once torch is imported (and the data loaded): seconds, not a fraction.
        pytest.param("data.val_size=60000", "data.val_size", marks=pytest.mark.slow),
    ]
    + (
        []
        if torch.cuda.is_available()
        else [pytest.param("device=cuda", "device=cuda", marks=pytest.mark.slow)]
    ),
)
def test_impossible_values_are_one_clear_line_without_a_run(train, tracking_uri, override, key):
    proc = train(override, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {key}")
    assert runs_in(tracking_uri) == []


@pytest.mark.process
@pytest.mark.slow
def test_missing_dataset_is_one_clear_line(train, tracking_uri, tmp_path: Path):
    proc = train(f"data.root={tmp_path}/empty", "data.download=false", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{tmp_path}/empty/MNIST/raw" in lines[0] and "train-images-idx3-ubyte" in lines[0]
    assert runs_in(tracking_uri) == []


@pytest.mark.process
@pytest.mark.slow
def test_fewer_classes_than_the_data_has_is_one_clear_line(train, tracking_uri):
    """`model.num_classes=3` on MNIST's 10 digits: refused before any run exists."""
    proc = train("model.num_classes=3", *SMALL, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: model.num_classes=3 must be at least 10, the classes in data.dataset: "
        "change it on the command line or in conf/"
    ]
    assert runs_in(tracking_uri) == []


@pytest.mark.process
@pytest.mark.slow
def test_a_store_that_cannot_be_opened_is_named(train, tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    uri = f"sqlite:///{blocker}/mlflow.db"
    proc = train(f"mlflow.tracking_uri={uri}", *SMALL, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot open the MLflow tracking store {uri}")


@pytest.mark.process
@pytest.mark.slow
def test_a_tracking_server_that_is_down_is_one_line_from_every_command(tmp_path: Path):
    """MLFLOW_TRACKING_URI names a server that is not running: each command says so in a line
    within seconds, rather than after MLflow's own 7 retries of each request (minutes)."""
    uri = f"http://127.0.0.1:{free_port()}"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri}
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    run_id = "0123456789abcdef0123456789abcdef"
    down = f"error: cannot reach the MLflow tracking server {uri} ([Errno 111] Connection refused)"
    commands = [
        ("compare", []),
        ("predict", [run_id, str(image)]),
        ("rerun", [run_id]),
        ("train", ["mlflow.retry_for_s=0", f"hydra.run.dir={tmp_path}/run"]),
    ]
    for command, args in commands:
        proc = subprocess.run(
            [sys.executable, "-m", f"mnist_exp.{command}", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode != 0, command
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith(down), (command, proc.stderr)
        assert "Traceback" not in proc.stderr, command


@pytest.mark.process
@pytest.mark.slow
def test_a_bad_value_from_the_environment_is_one_line_from_the_tools(tmp_path: Path):
    """Config values that come from environment variables are checked by the tools too."""
    env = os.environ | {"MLFLOW_HTTP_REQUEST_TIMEOUT": "soon"}
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    for command in (["compare"], ["predict", "0123456789abcdef", str(tmp_path / "digit.png")]):
        proc = subprocess.run(
            [sys.executable, "-m", f"mnist_exp.{command[0]}", *command[1:]],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode != 0
        assert proc.stderr.strip().splitlines() == [
            "error: mlflow.request_timeout_s='soon' must be a whole number: "
            "change it on the command line or in conf/"
        ]
