"""`-m hparams_search=optuna`: the sweeper of mnist_exp/search/ on an Optuna study.

A search killed with SIGKILL and run again ends with `n_trials` trials and one parent run; a
bad region of learning rates is pruned; two commands on one study split its trials; bad
input is refused in one line before any run exists; optuna-dashboard reads the study. The
searches run `mnist-train -m` in the test's process unless a process must be killed or two
must run at once.
"""

from __future__ import annotations

import contextlib
import csv
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import PIPE

import optuna
import pytest
import torch
from conftest import ROOT, free_port, in_process, runs_in
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mnist_exp import compare, names
from mnist_exp.config.paths import composed
from mnist_exp.errors import UserError
from mnist_exp.runner.sweep import SweepCallback
from mnist_exp.search.space import parse
from mnist_exp.training import engine
from mnist_exp.training.data import Data, Split
from mnist_exp.training.networks import ConvNet

# Trials of a second or two: 256 images, 2 epochs, validated on 100.
TINY = (
    "data.max_train_samples=256",
    "data.max_test_samples=100",
    "data.val_size=100",
    "trainer.epochs=2",
    "trainer.print_every_n_steps=0",
    "data.batch_size=64",
    "optimizer=adam",
)
SEARCH = ("-m", "hparams_search=optuna", "hydra.sweeper.heartbeat_s=1", *TINY)


def _storage(tracking_uri: str) -> str:
    """The default study storage: optuna.db beside the MLflow store."""
    return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / 'optuna.db'}"


def _study(tracking_uri: str, name: str = "mnist-exp") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_storage(tracking_uri))


def _parents(tracking_uri: str) -> list:
    return [r for r in runs_in(tracking_uri) if r.data.tags.get(names.SWEEP_TAG) == "true"]


def _children(tracking_uri: str, parent_id: str) -> list:
    return [r for r in runs_in(tracking_uri) if r.data.tags.get(names.PARENT_RUN_TAG) == parent_id]


def test_the_search_space_reads_hydras_sweep_syntax() -> None:
    space = parse(
        {"optimizer.lr": "tag(log, interval(0.0001, 0.1))", "data.batch_size": "choice(32, 64)"},
        ["trainer.epochs=range(1, 9, 2)", "data.max_shift=0,2", "trainer.seed=3"],
    )
    assert space.distributions == {
        "optimizer.lr": FloatDistribution(0.0001, 0.1, log=True),
        "data.batch_size": CategoricalDistribution([32, 64]),
        "trainer.epochs": IntDistribution(1, 7, step=2),  # range() stops before 9
        "data.max_shift": CategoricalDistribution([0, 2]),
    }
    assert space.fixed == {"trainer.seed": "3"}


def test_a_callback_stops_training_after_an_epoch_that_all_callbacks_see() -> None:
    """StopTraining from one callback: the others still get that epoch's end, whatever their
    order (the checkpointer writes it), and no epoch follows."""

    class Stop(engine.Callback):
        def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
            if epoch == 2:
                raise engine.StopTraining("pruned")

    class Seen(engine.Callback):
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
            self.epochs.append(epoch)

    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    split = Split(images, torch.randint(0, 10, (64,)))
    seen, model = Seen(), ConvNet()
    step = engine.fit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        Data(train=split, val=None, test=split),
        engine.Schedule(epochs=5, batch_size=32, eval_batch_size=64, seed=0),
        device=torch.device("cpu"),
        callbacks=[Stop(), seen],
    )
    assert seen.epochs == [1, 2] and step == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("hydra.sweeper.pruner=mean", "hydra.sweeper.pruner='mean' must be one of median,"),
        ("hydra.sweeper.sampler=grid", "hydra.sweeper.sampler='grid' must be one of tpe, random"),
        ("hydra.sweeper.storage=nosuchdb://x", "cannot open the Optuna storage nosuchdb://x"),
        ("hydra.sweeper.direction=minimize", "does not suit optimized_metric=val_accuracy"),
        ("optimized_metric=test_accuracy", "pruner='median' needs an optimized_metric measured"),
        ("+hydra.sweeper.params.lrr='choice(1,2)'", "hydra.sweeper.params names 'lrr'"),
        ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials=0 must be a whole number from 1"),
    ],
)
def test_a_search_that_cannot_work_is_refused_in_one_line(
    tracking_uri: str, override: str, message: str
) -> None:
    with pytest.raises(UserError) as refused:
        _check(tracking_uri, override)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_study_of_the_other_direction_is_refused(tracking_uri: str, tmp_path: Path) -> None:
    db = tmp_path / "mlruns" / "optuna.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    optuna.create_study(storage=f"sqlite:///{db}", study_name="mnist-exp", direction="minimize")
    with pytest.raises(UserError, match="study 'mnist-exp' in sqlite:///.* is to minimize"):
        _check(tracking_uri)
    _check(tracking_uri, "hydra.sweeper.study_name=another")  # a new study is fine


def _check(tracking_uri: str, *overrides: str) -> None:
    """What `mnist-train -m hparams_search=optuna OVERRIDES` checks before its parent run."""
    folder = Path(tracking_uri.removeprefix("sqlite:///")).parents[1] / "sweep"
    args = ["hparams_search=optuna", f"mlflow.tracking_uri={tracking_uri}", *overrides]
    args.append(f"hydra.sweep.dir={folder}")
    with composed(args, with_hydra=True) as cfg:
        SweepCallback().check(cfg)


@pytest.mark.slow
def test_a_refused_search_leaves_no_run(mnist_train, tracking_uri: str) -> None:
    ended = mnist_train(*SEARCH, "hydra.sweeper.pruner=mean")
    assert ended.code == 1
    assert ended.err.strip().splitlines()[-1].startswith("error: hydra.sweeper.pruner='mean'")
    assert runs_in(tracking_uri) == []


@pytest.mark.process
@pytest.mark.slow
def test_a_killed_search_resumes_its_study_and_parent(train_command, mnist_train, tracking_uri):
    """SIGKILL once two trials have ended and a third is training; the same command then
    finishes the study, trying the third's parameters again; optuna-dashboard shows it."""
    args = (*SEARCH, "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner=none")
    cmd, env = train_command(*args)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 300
        watched = None  # loaded once: a load a poll took a busy machine a second, a trial's length
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                watched = watched or _study(tracking_uri)
                trials = watched.get_trials()
            except Exception:  # no study yet
                trials = []
            ended = sum(t.state.is_finished() for t in trials)
            if ended >= 2 and any(names.TRIAL_RUN_ID_ATTR in t.user_attrs for t in trials[2:]):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait()
    with _dashboard(_storage(tracking_uri)) as dashboard:  # it starts while the search goes on
        again = mnist_train(*args)  # it waits for the cut trial's heartbeat (1 s) to go stale
        assert again.code == 0, again.err
        studies = dashboard()
    study = _study(tracking_uri)
    assert [(s["study_name"], s["directions"]) for s in studies] == [("mnist-exp", ["maximize"])]
    trials = study.get_trials()
    cut = [t for t in trials if t.state == TrialState.FAIL]
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    assert len(cut) == 1 and cut[0].number in retried  # tried again, not counted
    ended = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(ended) == 3
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == cut[0].number)
    assert retry.params == cut[0].params
    (parent,) = _parents(tracking_uri)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[names.STUDY_TAG] == "mnist-exp"
    assert parent.data.tags[names.STORAGE_TAG].endswith("/mlruns/optuna.db")
    assert parent.data.metrics[names.TRIALS_COMPLETE] == 3
    # Begun again by the second command: mnist-compare's latest sweep (test_compare.py).
    assert int(parent.data.tags[names.SWEEP_OPENED_TAG]) > parent.info.start_time + 1000
    children = {
        c.data.tags[names.TRIAL_TAG]: c for c in _children(tracking_uri, parent.info.run_id)
    }
    assert set(children) == {str(t.number) for t in [*ended, *cut]}
    for trial in ended:
        child = children[str(trial.number)]
        assert child.info.status == "FINISHED"
        assert trial.user_attrs[names.TRIAL_RUN_ID_ATTR] == child.info.run_id
    assert children[str(cut[0].number)].info.status == "FAILED"  # its process died
    pictures = MlflowClient(tracking_uri).list_artifacts(parent.info.run_id, names.OPTUNA_PLOTS)
    assert {Path(p.path).name for p in pictures} >= {"optimization_history.png", "slice.png"}


@contextlib.contextmanager
def _dashboard(storage: str) -> Iterator[Callable[[], list]]:
    """`optuna-dashboard STORAGE` on a free port, started now; yields what reads its studies,
    once it answers."""
    port = free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    proc = subprocess.Popen(
        [str(dashboard), storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def studies() -> list:
        deadline = time.monotonic() + 60
        while True:
            try:
                url = f"http://127.0.0.1:{port}/api/studies"
                with urllib.request.urlopen(url, timeout=2) as response:
                    return json.load(response)["study_summaries"]
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.3)

    try:
        yield studies
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_bad_region_of_learning_rates_is_pruned(mnist_train, tracking_uri, capfd):
    ended = mnist_train(
        *SEARCH,
        "hydra.sweeper.n_trials=5",
        "hydra.sweeper.pruner_startup_trials=1",
        "trainer.epochs=3",
        "optimizer.lr=tag(log, interval(0.001, 10))",
    )
    assert ended.code == 0, ended.err
    study = _study(tracking_uri)
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert pruned
    runs = {r.info.run_id: r for r in runs_in(tracking_uri)}
    for trial in pruned:
        run = runs[trial.user_attrs[names.TRIAL_RUN_ID_ATTR]]
        epoch = int(run.data.tags[names.PRUNED_AT_EPOCH_TAG])
        assert run.info.status == "FINISHED" and run.data.tags[names.PRUNED_TAG] == "true"
        assert epoch == max(trial.intermediate_values) < 3
        folder = Path(run.data.tags[names.OUTPUT_DIR_TAG])
        saved = torch.load(folder / names.RESUME_CHECKPOINT, weights_only=True)
        assert saved["epoch"] == epoch  # the epoch it stopped after was checkpointed
    (parent,) = _parents(tracking_uri)
    assert parent.data.metrics[names.TRIALS_PRUNED] == len(pruned)
    best = study.best_trial
    assert parent.data.tags[names.BEST_TRIAL_TAG] == str(best.number)
    assert parent.data.tags[names.BEST_RUN_ID_TAG] == best.user_attrs[names.TRIAL_RUN_ID_ATTR]
    argv = [parent.info.run_id, "--format", "csv", "--tracking-uri", tracking_uri]
    shown = in_process(compare.main, argv, capfd)
    assert shown.code == 0, shown.err
    table = list(csv.DictReader(shown.out.strip().splitlines()))  # stdout: only the CSV
    rows = {row["trial"]: (row["trial_state"], row["stopped_at_epoch"]) for row in table}
    for trial in study.get_trials():
        stopped = str(max(trial.intermediate_values, default=0) or "")
        assert rows[str(trial.number)] == (trial.state.name, stopped)


@pytest.mark.new_store
@pytest.mark.process
@pytest.mark.slow
def test_two_commands_on_one_study_split_its_trials(train_command, tracking_uri, tmp_path):
    procs = []
    for name in ("a", "b"):
        cmd, env = train_command(
            *SEARCH, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={tmp_path}/{name}"
        )
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=PIPE, stderr=PIPE, text=True))
    for proc in procs:  # on a brand-new store, which both open at once
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    trials = _study(tracking_uri).get_trials()
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    (parent,) = _parents(tracking_uri)  # one parent: the study's
    children = _children(tracking_uri, parent.info.run_id)
    assert sorted(int(c.data.tags[names.TRIAL_TAG]) for c in children) == [0, 1, 2, 3]
    folders = {Path(c.data.tags[names.OUTPUT_DIR_TAG]).parent.name for c in children}
    assert folders == {"a", "b"}  # each command ran some of them
