"""From Python, as in a notebook: `mnist_exp.api.train` and `runs`, called again and again."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient

from mnist_exp import UserError
from mnist_exp.api import runs, train

TINY = [
    "trainer.epochs=1",
    "data.max_train_samples=256",
    "data.max_test_samples=128",
    "mlflow.log_model=false",
    "mlflow.log_plots=false",
    "optimizer.lr=0.003",
]


@pytest.fixture
def where(tmp_path: Path, data_root: Path, tracking_uri: str):
    """Overrides that put the data, the store and the run folder (`name`) under the test's."""

    def overrides(name: str) -> list[str]:
        return [
            f"data.root={data_root}",
            f"mlflow.tracking_uri={tracking_uri}",
            f"hydra.run.dir={tmp_path / name}",
        ]

    return overrides


# Not slow: the quick tier's happy path, in-process through the Python API.
def test_train_twice_in_one_process_records_two_runs_and_leaves_the_process_as_it_was(
    where, tracking_uri: str
) -> None:
    """A notebook calls train() again: two FINISHED runs, equal results, nothing left behind."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    root_handlers = logging.getLogger().handlers[:]
    environment = dict(os.environ)

    first = train([*TINY, *where("first"), "mlflow.request_timeout_s=7"])
    second = train([*TINY, *where("second")])

    assert first.status == second.status == "FINISHED"
    assert first.run_id != second.run_id
    assert first.metrics["test_accuracy"] == second.metrics["test_accuracy"]
    assert first.checkpoint is not None and first.checkpoint.is_file()
    assert first.output_dir is not None and (first.output_dir / ".hydra/config.yaml").is_file()
    client = MlflowClient(tracking_uri)
    for result in (first, second):
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["mnist_exp.source"] == "python"
        assert run.data.metrics["test_accuracy"] == result.metrics["test_accuracy"]
        assert run.data.params["optimizer.lr"] == "0.003"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert logging.getLogger().handlers == root_handlers
    assert dict(os.environ) == environment  # the first run's settings are not the second's
    assert not GlobalHydra.instance().is_initialized()
    assert not HydraConfig.initialized()  # a later run's job log is not this run's folder

    table = runs(tracking_uri=tracking_uri)
    assert list(table["run_id"]) == [second.run_id, first.run_id]  # newest first
    assert set(table["status"]) == {"FINISHED"}


@pytest.mark.new_store  # runs() on it: no store there yet
def test_bad_values_raise_user_error_in_one_line_and_record_nothing(
    where, tracking_uri: str, tmp_path: Path
) -> None:
    """A bad value or an unknown key is a `UserError` saying what to change; no run exists."""
    with pytest.raises(UserError, match=r"^trainer\.epochs=-1 must be .*: change it") as bad:
        train([*TINY, *where("bad"), "trainer.epochs=-1"])
    with pytest.raises(UserError, match="trainer.epoch") as unknown:
        train([*TINY, *where("unknown"), "trainer.epoch=3"])
    with pytest.raises(UserError, match="mnist-train -m"):
        train(["-m", *TINY])
    for error in (bad, unknown):
        assert "\n" not in str(error.value)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "unknown").exists()  # no folder
    with pytest.raises(UserError, match="no MLflow store"):
        runs(tracking_uri=tracking_uri)
    with pytest.raises(UserError, match=r"^cannot reach the MLflow tracking server http://"):
        runs(tracking_uri=f"http://127.0.0.1:{free_port()}")  # a server that is down


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt, as in a terminal or a notebook: pytest started as a
    shell's background job (`pytest &`) inherits it ignored, and Python leaves it so."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.slow
@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_marks_the_run_killed_and_is_raised_again(where, tracking_uri: str) -> None:
    """Ctrl-C during training: the run is KILLED, KeyboardInterrupt reaches the caller."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    log = Path(where("killed")[-1].partition("=")[2]) / "train.log"

    returned = threading.Event()  # train() is over: nothing left to interrupt

    def interrupt_once_training() -> None:
        # The run's log, not its store: a second opener of a new SQLite store races its creation.
        while not returned.is_set():
            if log.is_file() and "Epoch [1/200] done" in log.read_text():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=interrupt_once_training, daemon=True)
    watcher.start()
    long_run = ["trainer.epochs=200", "data.max_train_samples=512", "trainer.progress_bar=false"]
    try:
        with pytest.raises(KeyboardInterrupt, match="marked KILLED"):
            train([*TINY, *where("killed"), *long_run])
    finally:
        returned.set()
        watcher.join()
    (run,) = MlflowClient(tracking_uri).search_runs(["1"])
    assert run.info.status == "KILLED"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


@pytest.mark.process
@pytest.mark.slow
def test_python_and_the_command_line_record_the_same_run(
    where, train_command, tracking_uri: str
) -> None:
    """The same overrides through train() and mnist-train: the same keys and test accuracy."""
    from conftest import ROOT

    from_python = train([*TINY, *where("python")])
    cmd, env = train_command(*TINY)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    client = MlflowClient(tracking_uri)
    python_run = client.get_run(from_python.run_id)
    (cli_run,) = [r for r in client.search_runs(["1"]) if r.info.run_id != from_python.run_id]

    assert python_run.data.params.keys() == cli_run.data.params.keys()
    sampled = "system/"  # MLflow's system metrics, every 10 s: a slower start has more
    keys = [{k for k in r.data.metrics if not k.startswith(sampled)} for r in (python_run, cli_run)]
    assert keys[0] == keys[1]
    assert python_run.data.tags.keys() - cli_run.data.tags.keys() == {"mnist_exp.source"}
    assert cli_run.data.tags.keys() <= python_run.data.tags.keys()
    assert python_run.data.metrics["test_accuracy"] == cli_run.data.metrics["test_accuracy"]
    # Each records how it was started: the command line, or the call.
    assert cli_run.data.tags["mnist_exp.command"] == " ".join(["python", *cmd[1:]])
    assert cli_run.data.tags["mlflow.source.name"] == "python -m mnist_exp.train"
    assert python_run.data.tags["mnist_exp.command"].startswith("mnist_exp.api.train([")

    def artifacts(run_id: str, path: str = "") -> set[str]:
        found = set()
        for item in client.list_artifacts(run_id, path):
            found |= artifacts(run_id, item.path) if item.is_dir else {item.path}
        return found

    assert artifacts(python_run.info.run_id) == artifacts(cli_run.info.run_id)
    assert runs(tracking_uri=tracking_uri)["run_id"].tolist()[0] == cli_run.info.run_id


@pytest.mark.slow
def test_runs_lists_one_sweeps_children(mnist_train, tracking_uri: str) -> None:
    """`runs(parent_run_id=...)`: the jobs of that sweep only, not the sweep's parent."""
    assert mnist_train("-m", *TINY, "trainer.seed=0,1").code == 0
    everything = runs(tracking_uri=tracking_uri)
    (parent,) = everything.loc[everything["tags.mnist_exp.sweep"] == "true", "run_id"]

    children = runs(parent_run_id=parent, tracking_uri=tracking_uri)
    assert len(children) == 2
    assert set(children["params.trainer.seed"]) == {"0", "1"}
    assert set(children["tags.mlflow.parentRunId"]) == {parent}


def _git(*args: str) -> str:
    from conftest import ROOT

    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def test_a_run_shows_its_source_git_state_and_system_metrics_in_mlflows_own_names(
    where, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What MLflow's UI shows of a run: the script that called train() as the source of the run
    and of its model (not the tracker's file), the checkout under mlflow.source.git.*, and the
    CPU and memory sampled while it trained."""
    script = tmp_path / "experiment.py"  # the user's script calling train()
    script.write_text("from mnist_exp.api import train\n")
    monkeypatch.setattr(sys, "argv", [str(script)])
    result = train([
        *TINY, *where("run"), "mlflow.log_model=true", "mlflow.system_metrics_interval_s=0.1",
    ])  # fmt: skip
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["mlflow.source.name"] == str(script)
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.tags["mlflow.source.name"] == str(script)

    commit = _git("rev-parse", "HEAD")
    if commit:  # CI's checkout is a clone: on its branch, with its origin
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == commit
        assert tags.get("mlflow.source.git.branch", "") == _git("symbolic-ref", "--short", "HEAD")
        assert tags.get("mlflow.source.git.repoURL", "") == _git("remote", "get-url", "origin")
        assert tags["mlflow.source.git.dirty"] == tags["mnist_exp.git.dirty"]
        assert tags["mlflow.source.git.dirty"] in ("True", "False")

    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert client.get_metric_history(result.run_id, key), key


def test_a_run_from_a_notebook_names_the_notebook(monkeypatch) -> None:
    """In a Jupyter kernel the source is the notebook, where Jupyter says which it is."""
    import types

    from mnist_exp.runner.source import caller_source

    shell = types.SimpleNamespace(config={"IPKernelApp": {}}, user_ns={})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/me/explore.ipynb")
    assert caller_source() == {
        "mlflow.source.name": "/home/me/explore.ipynb",
        "mlflow.source.type": "NOTEBOOK",
    }
    monkeypatch.delenv("JPY_SESSION_NAME")
    shell.user_ns["__vsc_ipynb_file__"] = "/home/me/vscode.ipynb"
    assert caller_source()["mlflow.source.name"] == "/home/me/vscode.ipynb"
