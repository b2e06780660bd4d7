"""`mnist-train` end to end, asserting what a user finds in MLflow afterwards.

The command runs in the test's process (`mnist_train`: Hydra's command line, the runner, the
exit status and the one-line error a process would have had); one test starts the commands
as processes, for what only a process shows: their exit status and the last line on stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SMALL, free_port, in_process, runs_in
from mlflow.tracking import MlflowClient
from PIL import Image

from mnist_exp import compare, predict, rerun, train
from mnist_exp.runner import slurm
from mnist_exp.training.networks import ConvNet

NO_RUN = "0123456789abcdef0123456789abcdef"


@pytest.mark.slow
def test_a_small_run_records_everything_in_mlflow(mnist_train, tracking_uri: str, tmp_path: Path):
    ended = mnist_train(*SMALL, "optimizer.lr=0.002", "trainer.print_every_n_steps=5")
    assert ended.code == 0, ended.err
    assert "Epoch [2/2], Step [10/10], Loss: " in ended.out
    assert "Test Accuracy of the model on the 200 test images: " in ended.out

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


@pytest.mark.slow
def test_log_every_n_steps_and_a_validation_split(mnist_train, tracking_uri: str):
    assert mnist_train(*SMALL, "trainer.log_every_n_steps=3", "data.val_size=500").code == 0
    (run,) = runs_in(tracking_uri)
    client = MlflowClient(tracking_uri)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == [3, 6, 9, 12, 15, 18]
    val = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in val] == [10, 20]
    assert all(0 <= m.value <= 1 for m in val)
    assert run.data.params["data.val_size"] == "500"


@pytest.mark.slow
def test_the_seeds_own_setting_trains_one_image_a_step(mnist_train, tracking_uri: str):
    ended = mnist_train("experiment=seed", "data.max_train_samples=24", "data.max_test_samples=50")
    assert ended.code == 0, ended.err
    (run,) = runs_in(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.batch_size"] == "1"
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, 24 * 5 + 1))  # 24 steps x 5 epochs
    assert 0 <= run.data.metrics["test_accuracy"] <= 1


@pytest.mark.slow
def test_an_exception_during_training_marks_the_run_failed(
    mnist_train, tracking_uri: str, tmp_path: Path, monkeypatch
):
    """A model of one's own whose forward pass fails: the run exists by then, and is FAILED."""
    (tmp_path / "faulty_net.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(784, num_classes)\n"
        "    def forward(self, x):\n"
        "        raise RuntimeError('the forward pass failed')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "faulty_net", raising=False)  # gone again after the test
    ended = mnist_train(*SMALL, "model._target_=faulty_net.Net")
    sys.modules.pop("faulty_net", None)
    assert ended.code != 0
    (run,) = runs_in(tracking_uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["mnist_exp.error"] == "RuntimeError: the forward pass failed"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model=resnet999", "error: model=resnet999 is not an option of model"),
        ("optimizer.lrr=1", "error: optimizer.lrr is not a config key"),
    ],
)
def test_unknown_option_or_key_fails_in_hydra_without_a_run(
    mnist_train, tracking_uri, override, expected
):
    ended = mnist_train(override)
    assert ended.code == 1
    (line,) = ended.err.strip().splitlines()  # refused while Hydra composes, in one line
    assert line.startswith(expected), line
    assert runs_in(tracking_uri) == []


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
def test_impossible_values_are_one_clear_line_without_a_run(
    mnist_train, tracking_uri, override, key
):
    ended = mnist_train(override)
    assert ended.code == 1
    lines = ended.err.strip().splitlines()
    assert len(lines) == 1, ended.err
    assert lines[0].startswith(f"error: {key}")
    assert runs_in(tracking_uri) == []


def test_a_refused_command_leaves_no_folder_but_those_that_were_there(mnist_train, tmp_path):
    """Hydra makes the run's folder (and a new day's) before the value is refused: both go
    again; a day's folder holding another run, and a folder the user made, stay."""
    outputs = tmp_path / "outputs"
    earlier = outputs / "2026-12-01" / "10-00-00"
    earlier.mkdir(parents=True)
    for run_dir in ("2026-12-01/10-00-05", "2026-12-02/09-00-00"):
        refused = mnist_train("trainer.epochs=-1", f"hydra.run.dir={outputs}/{run_dir}")
        assert refused.code == 1 and refused.err.startswith("error: trainer.epochs=-1")
    assert sorted(outputs.rglob("*")) == [earlier.parent, earlier]
    sweep = mnist_train("-m", "trainer.epochs=-1", f"hydra.sweep.dir={outputs}/multirun/day")
    assert sweep.code == 1 and not (outputs / "multirun").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert mnist_train("trainer.epochs=-1", f"hydra.run.dir={mine}").code == 1
    assert mine.is_dir()


@pytest.mark.slow
def test_missing_dataset_is_one_clear_line(mnist_train, tracking_uri, tmp_path: Path):
    ended = mnist_train(f"data.root={tmp_path}/empty", "data.download=false")
    assert ended.code == 1
    lines = ended.err.strip().splitlines()
    assert len(lines) == 1, ended.err
    assert f"{tmp_path}/empty/MNIST/raw" in lines[0] and "train-images-idx3-ubyte" in lines[0]
    assert runs_in(tracking_uri) == []


@pytest.mark.slow
def test_fewer_classes_than_the_data_has_is_one_clear_line(mnist_train, tracking_uri):
    """`model.num_classes=3` on MNIST's 10 digits: refused before any run exists."""
    ended = mnist_train("model.num_classes=3", *SMALL)
    assert ended.code == 1
    assert ended.err.strip().splitlines() == [
        "error: model.num_classes=3 must be at least 10, the classes in data.dataset: "
        "change it on the command line or in conf/"
    ]
    assert runs_in(tracking_uri) == []


@pytest.mark.slow
def test_a_model_that_cannot_be_imported_is_one_line_saying_where_to_put_it(
    mnist_train, tracking_uri, tmp_path
):
    """One's own `_target_` whose module is not on the path: one line instead of Hydra's, no
    run, and no run folder left behind."""
    ended = mnist_train("model._target_=nosuch.Model", *SMALL)
    assert ended.code == 1
    assert ended.err.strip().splitlines() == [
        "error: model._target_=nosuch.Model cannot be imported (No module named 'nosuch'): put "
        "its module on PYTHONPATH (e.g. PYTHONPATH=. mnist-train ...) or install its package"
    ]
    assert "nosuch" not in ended.out  # Hydra logged its own lines of the failed lookup there
    assert runs_in(tracking_uri) == []
    assert not (tmp_path / "run").exists()


# What sbatch writes on a machine with no SLURM configuration (Debian's slurm-wlm 22.05).
SBATCH_NO_CONFIG = """\
sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host
sbatch: error: fetch_config: DNS SRV lookup failed
sbatch: error: _establish_config_source: failed to fetch config
sbatch: fatal: Could not establish a configuration source
"""


def test_sbatch_finding_no_cluster_is_told_so_not_blamed_on_resources() -> None:
    """submitit prints sbatch's lines; the error after them says what they come to, once."""
    assert slurm.refusal(SBATCH_NO_CONFIG) == (
        "SLURM is not configured or reachable on this machine (sbatch: fatal: Could not "
        "establish a configuration source): run the sweep on the cluster's login node, or "
        "set SLURM_CONF to the cluster's slurm.conf"
    )
    refused = (
        "sbatch: error: Batch job submission failed: Requested node configuration is not available"
    )
    assert "hydra.launcher.cpus_per_task" in slurm.refusal(refused + "\n")


def test_submitits_repeated_sacct_warning_is_shown_once(monkeypatch, caplog) -> None:
    """Where sacct fails (no accounting), submitit warns at each look at the sweep's jobs."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    def sacct(command, **kwargs):
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(subprocess, "check_output", sacct)
    slurm.warn_once()
    watcher = SlurmInfoWatcher()
    watcher.register_job("12345")
    for _ in range(3):
        watcher.update()
    warned = [r.getMessage() for r in caplog.records if "sacct error" in r.getMessage()]
    assert len(warned) == 1, warned
    assert warned[0].startswith("Call #1 - Bypassing sacct error")


@pytest.mark.slow
def test_a_store_that_cannot_be_opened_is_named(mnist_train, tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    uri = f"sqlite:///{blocker}/mlflow.db"
    ended = mnist_train(f"mlflow.tracking_uri={uri}", *SMALL)
    assert ended.code == 1
    last = ended.err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot open the MLflow tracking store {uri}")


@pytest.mark.slow
def test_a_tracking_server_that_is_down_is_one_line_from_every_command(
    tmp_path: Path, capfd, monkeypatch
):
    """MLFLOW_TRACKING_URI names a server that is not running: each command says so in a line
    within seconds, rather than after MLflow's own 7 retries of each request (minutes)."""
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    down = f"error: cannot reach the MLflow tracking server {uri} ([Errno 111] Connection refused)"
    commands = [
        (compare.main, []),
        (predict.main, [NO_RUN, str(image)]),
        (rerun.main, [NO_RUN]),
        (train.run_command, ["mlflow.retry_for_s=0", f"hydra.run.dir={tmp_path}/run"]),
    ]
    for main, args in commands:
        ended = in_process(main, args, capfd)
        assert ended.code == 1, main.__module__
        assert ended.err.strip().splitlines()[-1].startswith(down), (main.__module__, ended.err)
        assert "Traceback" not in ended.err, main.__module__
    assert not (tmp_path / "run").exists()  # no run holds the folder the command made


@pytest.mark.slow
def test_a_bad_value_from_the_environment_is_one_line_from_the_tools(
    tmp_path: Path, capfd, monkeypatch
):
    """Config values that come from environment variables are checked by the tools too."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "soon")
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    for main, args in ((compare.main, []), (predict.main, [NO_RUN, str(tmp_path / "digit.png")])):
        ended = in_process(main, args, capfd)
        assert ended.code == 1
        assert ended.err.strip().splitlines() == [
            "error: mlflow.request_timeout_s='soon' must be a whole number: "
            "change it on the command line or in conf/"
        ]


@pytest.mark.process
@pytest.mark.slow  # the refusals themselves are tested in this process, above
def test_each_command_exits_1_with_one_line_on_stderr(tmp_path: Path, tracking_uri: str):
    """What only a process shows: the exit status and stderr of the commands a user types,
    refusing bad input (started together: each spends its time importing)."""
    bin_dir = Path(sys.executable).parent
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    down = f"http://127.0.0.1:{free_port()}"
    train_module = [sys.executable, "-m", "mnist_exp.train", f"mlflow.tracking_uri={tracking_uri}"]
    where = f"hydra.run.dir={tmp_path}/run"
    cases = [  # (command, environment, the start of the line)
        (
            [*train_module, "trainer.epochs=abc", "--cfg", "job"],
            {},
            "error: trainer.epochs='abc' must be a whole number: change it",
        ),
        ([str(bin_dir / "mnist-train"), "optimizer.lr=0", where], {}, "error: optimizer.lr=0"),
        (
            [str(bin_dir / "mnist-rerun"), NO_RUN, f"mlflow.tracking_uri={tracking_uri}"],
            {},
            f"error: no MLflow run '{NO_RUN}'",
        ),
        (
            [str(bin_dir / "mnist-predict"), NO_RUN, str(image)],
            {"MLFLOW_TRACKING_URI": down},
            f"error: cannot reach the MLflow tracking server {down}",
        ),
        (
            [str(bin_dir / "mnist-compare")],
            {"MLFLOW_HTTP_REQUEST_TIMEOUT": "soon"},
            "error: mlflow.request_timeout_s='soon' must be a whole number",
        ),
    ]
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=base | env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd, env, _ in cases
    ]
    for proc, (cmd, _, start) in zip(procs, cases, strict=True):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, (cmd, err)
        (line,) = err.strip().splitlines()
        assert line.startswith(start), (cmd, line)
        assert "--cfg" not in cmd or out == "", out  # nothing printed of the config
    assert runs_in(tracking_uri) == []
