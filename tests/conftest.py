"""Shared fixtures: a seeded, offline data root and a fresh MLflow store per test."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
# A run of a few seconds that still learns: 2 epochs of 640 images, tested on 200.
SMALL = ("data.max_train_samples=640", "data.max_test_samples=200", "trainer.epochs=2")
# ConvNet's entries where two runs equal up to rounding part: a convolution's bias before batch
# norm changes no output, so its gradients are rounding noise, which Adam scales up (and the
# running mean follows the bias).
CONVNET_NOISE = {"layer1.0.bias", "layer1.1.running_mean", "layer2.0.bias", "layer2.1.running_mean"}
# The fixture `slurm_cluster`: a one-node SLURM cluster for the tests marked `slurm`.
pytest_plugins = ["slurm_cluster"]


# Programs a test may start without the `process` marker: the run's own tracker, and what
# the libraries run underneath (git for a run's source tags, ldconfig for ctypes).
_HELPERS = ("git", "ldconfig", "ldconfig.real")
_TRACKER = "mnist_exp.tracking.tracker"
_SEED = ROOT.parent / "shared" / "data" / "seed.sh"  # the data root, seeded once a session


_running: list[pytest.Item | None] = []  # the test being set up, run or torn down


_LEFT_ALONE = (ROOT / "outputs", ROOT / "mlruns")  # a user's runs: no test writes there
_before: set[Path] = set()


def _files_left_alone() -> set[Path]:
    return {path for folder in _LEFT_ALONE for path in folder.rglob("*")}


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(_files_left_alone())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite fails if a test wrote into the project's outputs/ or mlruns/: tests keep
    their runs and stores under tmp_path, leaving the checkout as they found it."""
    written = sorted(_files_left_alone() - _before)
    if written and not hasattr(session.config, "workerinput"):  # once, in pytest's own process
        listed = ", ".join(str(p.relative_to(ROOT)) for p in written[:5])
        session.config.get_terminal_writer().line(f"\ntests wrote into the checkout: {listed}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (scripts/test.sh runs more workers than cores), each worker's runs,
    and the commands it starts, take their share of the cores in torch threads
    (`OMP_NUM_THREADS`, which the runner follows): no run's threads spin against another's,
    and a core left idle by a test waiting on a server or a scheduler is another worker's."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") is None or count < 2:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ["OMP_NUM_THREADS"] = str(max(1, (cores or 1) // count))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most process tests first (then the most slow ones): pytest-xdist hands
    files out in this order, so the longest start at once and the short ones fill in after."""
    weight: dict[Path, list[int]] = {}
    for item in items:
        counts = weight.setdefault(item.path, [0, 0])
        counts[0] -= item.get_closest_marker("process") is not None
        counts[1] -= item.get_closest_marker("slow") is not None
    items.sort(key=lambda item: weight[item.path])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _running.append(item)
    yield
    _running.pop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """After the last test, the session's fixtures end in its teardown: the commands they run
    to stop their daemons (`pg_ctl stop`, `scancel`) are no test's."""
    _running.append(None if nextitem is None else item)
    yield
    _running.pop()


@pytest.fixture(autouse=True, scope="session")
def _processes_only_where_marked() -> Iterator[None]:
    """A test that starts a command, server or browser (itself or through a fixture) is marked
    `process`, and tests/test_layout.py counts them; the others run in the test's own process,
    through `mnist_exp.api` or `engine.fit`."""
    start = subprocess.Popen.__init__

    def checked(self, args, *rest, **kwargs) -> None:
        argv = [str(a) for a in (args if isinstance(args, list | tuple) else [args])]
        test = _running[-1] if _running else None
        seeding = argv[:2] == ["bash", _SEED.name]
        allowed = Path(argv[0]).name in _HELPERS or _TRACKER in argv or seeding
        if test is not None and not allowed and not test.get_closest_marker("process"):
            pytest.fail(
                f"{test.name} starts `{' '.join(argv[:4])}`: mark it @pytest.mark.process, "
                f"or run it in the test's process (mnist_exp.api, engine.fit)"
            )
        start(self, args, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", checked)
        yield


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`MNIST_EXP_DATA` when set (`.ci/run` seeds it), else a folder seeded from shared/data."""
    if os.environ.get("MNIST_EXP_DATA"):
        return Path(os.environ["MNIST_EXP_DATA"])
    if not _SEED.is_file():
        pytest.fail("no MNIST data: set MNIST_EXP_DATA to a folder with MNIST/raw/ in it")
    dest = tmp_path_factory.mktemp("data")
    seed = ["bash", _SEED.name, str(dest)]
    subprocess.run(seed, cwd=_SEED.parent, check=True, capture_output=True)
    return dest


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite database with its tables and no runs, made once a session: making
    MLflow's tables takes seconds of CPU, which `tracking_uri` spares each test."""
    database = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{database}").search_experiments()
    return database


def copy_store(empty_store: Path, tracking_uri: str) -> str:
    """`tracking_uri`'s database made a copy of `empty_store`, as a store used before is."""
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_store, database)
    return tracking_uri


@pytest.fixture
def tracking_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The test's SQLite store under `tmp_path`, its tables already made (no runs); one that
    does not exist yet for a test marked `new_store`."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    if request.node.get_closest_marker("new_store"):
        return uri
    return copy_store(request.getfixturevalue("empty_store"), uri)


@pytest.fixture
def train_command(tmp_path: Path, data_root: Path, tracking_uri: str):
    """The `python -m mnist_exp.train` command line a user would type, and its environment.

    Hydra's flags come first (`-m` puts the jobs' folders under `tmp_path/sweep`), then the
    fixture's overrides, then the test's, which win. The fixture turns off the plots and the
    MLflow model (about a second a run); tests/test_artifacts.py checks both.
    """

    def command(*args: str) -> tuple[list[str], dict[str, str]]:
        flags = [a for a in args if "=" not in a]
        sweep = "-m" in flags
        cmd = [
            sys.executable,
            "-m",
            "mnist_exp.train",
            *flags,
            f"data.root={data_root}",
            f"mlflow.tracking_uri={tracking_uri}",
            f"hydra.sweep.dir={tmp_path}/sweep" if sweep else f"hydra.run.dir={tmp_path}/run",
            "mlflow.log_plots=false",
            "mlflow.log_model=false",
            *(a for a in args if "=" in a),
        ]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        return cmd, env

    return command


@pytest.fixture
def train(train_command):
    """Run `python -m mnist_exp.train` as a user would, on a fresh store and run folder."""

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd, env = train_command(*args)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


@dataclass
class Ended:
    """How a command run in the test's process ended, as its user would have seen it."""

    code: int  # the exit status: 0, or 1 for a one-line `error: ...`
    out: str
    err: str  # stderr, the command's last line included


def in_process(main: Callable[[list[str]], object], argv: list[str], capfd) -> Ended:
    """Call a command's `main(argv)` here, as `mnist-train ARGV` would run it in a process of
    its own: its exit status and output, with this process's environment, logging and
    working folder put back after (Hydra configures logging; runs set MLflow variables)."""
    environment, cwd = dict(os.environ), Path.cwd()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    old_argv = sys.argv
    # The command's name, as its console script has it: mnist_exp.rerun -> mnist-rerun.
    sys.argv = [f"mnist-{main.__module__.rsplit('.', 1)[-1]}", *argv]
    capfd.readouterr()
    code: int = 0
    message = ""
    try:
        main(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            code, message = 1, exc.code + "\n"
        else:
            code = exc.code or 0
    finally:
        sys.argv = old_argv
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environment)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
        HydraConfig.instance().cfg = None  # as the command's process would end with it
        GlobalHydra.instance().clear()
    out, err = capfd.readouterr()
    return Ended(code, out, err + message)


class Uncaptured:
    """The `capfd` of `in_process` where there is none (a module's fixture): the command's
    output is left to pytest, which shows it if the fixture fails."""

    def readouterr(self) -> tuple[str, str]:
        return "", ""


@pytest.fixture
def mnist_train(data_root: Path, tracking_uri: str, tmp_path: Path, capfd, monkeypatch):
    """`mnist-train ARGS` in the test's process, with the defaults of `train_command` (the test's
    data, store and folders; no plots or MLflow model): returns how it `Ended`."""
    from mnist_exp import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def run(*args: str) -> Ended:
        flags = [a for a in args if "=" not in a]
        sweep = "-m" in flags
        argv = [
            *flags,
            f"data.root={data_root}",
            f"mlflow.tracking_uri={tracking_uri}",
            f"hydra.sweep.dir={tmp_path}/sweep" if sweep else f"hydra.run.dir={tmp_path}/run",
            "mlflow.log_plots=false",
            "mlflow.log_model=false",
            *(a for a in args if "=" in a),
        ]
        return in_process(train.run_command, argv, capfd)

    return run


def stop(proc: subprocess.Popen, signum: int, timeout: float = 60) -> str:
    """Send `signum` and wait for the process to end; returns its stderr as text.

    One still running after `timeout` is killed and the test fails with the end of its stderr,
    so that a signal that went unheard can be told from a slow shutdown.
    """
    proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=timeout)
        ended = True
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        ended = False
    text = stderr if isinstance(stderr, str) else stderr.decode()
    if not ended:
        pytest.fail(f"still running {timeout:.0f} s after signal {signum}; stderr:\n{text[-3000:]}")
    return text


def frozen(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGSTOP `proc` and wait until it is stopped: from then on, what it wrote stays as read."""
    proc.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + timeout
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {proc.pid} did not stop"
        time.sleep(0.01)


def runs_in(tracking_uri: str, experiment: str = "mnist-exp") -> list:
    """All runs of an experiment, newest first; none when the store or experiment is absent."""
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if not db.exists():
        return []
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def only_run(uri: str, **tags: str):
    """The one run whose tags include `tags`; fails when there are none or several."""
    runs = [r for r in runs_in(uri) if all(r.data.tags.get(k) == v for k, v in tags.items())]
    assert len(runs) == 1, [r.data.tags for r in runs]
    return runs[0]


def loss_history(uri: str, run_id: str) -> list[tuple[int, float]]:
    """(step, value) of every `train_loss` the run recorded."""
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "train_loss")]


def cli(module: str, *args: str, uri: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m module args mlflow.tracking_uri=uri` as a user runs it: no MLFLOW_TRACKING_URI."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, f"mlflow.tracking_uri={uri}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


@contextlib.contextmanager
def mlflow_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to `uri` meanwhile, then put back: what MLflow reads
    only there (`runs:/` model URIs, a logged model's files listed through its run) would
    otherwise keep the store of one test for the rest of the session."""
    import mlflow

    previous, variable = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # it sets the variable too
        if variable is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_predictions(model_uri: str, env: dict[str, str], inputs: Any) -> list[dict[str, Any]]:
    """What `mlflow models serve -m MODEL_URI`, started with `env`, answers for `inputs` (an
    array) over HTTP; the server and its workers are stopped after."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    # As in an activated virtual environment: the server runs `uvicorn` from the PATH.
    path = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    cmd = [
        str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri,
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    server = subprocess.Popen(
        cmd,
        env=env | {"PATH": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "the model server did not start in 90 s"
                time.sleep(0.3)
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": inputs.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["predictions"]
    finally:
        with contextlib.suppress(ProcessLookupError):  # the server and the workers it started
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
