"""What a run prints on a terminal, and what it leaves out when told to."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from conftest import ROOT, in_process, runs_in
from mlflow.tracking import MlflowClient
from PIL import Image

from mnist_exp import predict
from mnist_exp.config.paths import PROJECT_ROOT
from mnist_exp.report.console import Console, accuracy_line, summary
from mnist_exp.training.engine import EvalResult

QUICK = ("trainer.epochs=1", "data.max_train_samples=1500", "data.max_test_samples=200")
RUN_ID = "c6812e6687c341d481a75af614b1ae55"


def test_an_epoch_and_the_test_print_plain_numbers(caplog) -> None:
    """86 of 90 images of one's own folder, 10,070 images a second on a GPU: no `1.007e+04`,
    no `95.55555555555556 %`."""
    console = Console(every=0, batch_size=64, progress_bar=False)
    console.on_epoch_start(1, 2, steps=10)
    with caplog.at_level("INFO", "mnist_exp"):
        console.on_epoch_end(1, 10, {"train_images_per_s": 10070.3, "epoch_seconds": 0.1303})
    assert caplog.messages == ["Epoch [1/2] done: train_images_per_s 10,070, epoch_seconds 0.1303"]
    test = EvalResult(loss=0.2, accuracy=86 / 90, correct=86, total=90)
    assert accuracy_line(test) == "Test Accuracy of the model on the 90 test images: 95.56 %"


@pytest.mark.parametrize(
    ("folder", "store", "command"),
    [
        (PROJECT_ROOT, f"sqlite:///{PROJECT_ROOT}/mlruns/mlflow.db", "bash scripts/ui.sh"),
        (
            PROJECT_ROOT,
            "sqlite:////tmp/my runs/mlflow.db",
            "MLFLOW_TRACKING_URI='sqlite:////tmp/my runs/mlflow.db' bash scripts/ui.sh",
        ),
        (
            Path("/"),
            f"sqlite:///{PROJECT_ROOT}/mlruns/mlflow.db",
            f"bash {PROJECT_ROOT}/scripts/ui.sh",
        ),
    ],
)
def test_the_summary_opens_the_ui_with_the_projects_script(
    folder: Path, store: str, command: str, monkeypatch
) -> None:
    """`mlflow` is on the PATH only in the active virtualenv; scripts/ui.sh always works."""
    monkeypatch.chdir(folder)
    test = EvalResult(loss=0.2, accuracy=0.98, correct=98, total=100)
    shown = summary(
        run_id=RUN_ID, run_name="lr=0.001", test=test, checkpoint=Path("model.ckpt"),
        tracking_uri=store, experiment_id="1", has_model=False,
    )  # fmt: skip
    ui = f"{command}, then http://127.0.0.1:5000/#/experiments/1/runs/{RUN_ID}"
    assert shown.splitlines()[-1] == f"  MLflow UI      {ui}"


@pytest.mark.process
@pytest.mark.slow
def test_a_terminal_gets_a_progress_bar_with_loss_and_images_per_second(
    data_root: Path, tracking_uri: str, tmp_path: Path
):
    cmd = [
        sys.executable, "-m", "mnist_exp.train", f"data.root={data_root}",
        f"mlflow.tracking_uri={tracking_uri}", f"hydra.run.dir={tmp_path}/run",
        *QUICK, "data.max_train_samples=2000", "data.batch_size=32",
        "mlflow.log_plots=false", "mlflow.log_model=false",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    parent, child = pty.openpty()
    # A terminal of 120 columns: a pty's size is 0x0 until set, and tqdm then draws nothing.
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=child, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    assert proc.wait(timeout=300) == 0
    out = b"".join(chunks).decode(errors="replace")
    assert "epoch 1/1" in out, out
    assert " images/s" in out and "loss " in out, out
    assert "Epoch [1/1], Step [" not in out  # the bar replaces the seed's step lines
    assert "Epoch [1/1] done: " in out
    (run,) = runs_in(tracking_uri)
    assert f"Run {run.info.run_id} " in out


@pytest.mark.slow
def test_log_plots_and_log_model_off_leave_them_out(
    mnist_train, tracking_uri: str, tmp_path: Path, capfd
):
    ended = mnist_train(*QUICK, "mlflow.log_plots=false", "mlflow.log_model=false")
    assert ended.code == 0, ended.err
    assert "Epoch [1/1], Step [" not in ended.out  # 24 steps, printed every 100
    (run,) = runs_in(tracking_uri)
    client = MlflowClient(tracking_uri)
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "checkpoints" in top and "plots" not in top and "model" not in top
    assert "test_accuracy_class_3" in run.data.metrics  # metrics do not depend on either key
    assert "mnist-predict" not in ended.out

    image = tmp_path / "blank.png"
    Image.new("L", (28, 28)).save(image)
    answer = in_process(
        predict.main, [run.info.run_id, str(image), "--tracking-uri", tracking_uri], capfd
    )
    assert answer.code == 1
    assert answer.err.strip() == (
        f"error: MLflow run {run.info.run_id} has no model (trained with mlflow.log_model=false, "
        f"or before runs logged one): rerun it with mnist-rerun {run.info.run_id}"
    )
