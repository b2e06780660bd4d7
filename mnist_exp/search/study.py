"""The study a search keeps in its storage: opening it, what counts as done, trials left behind
(a trial whose heartbeat stopped is failed and enqueued again, counting no more)."""

from __future__ import annotations

import importlib.util
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import optuna
from filelock import FileLock
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from mnist_exp.errors import UserError, first_line
from mnist_exp.search.settings import Settings
from mnist_exp.tracking.redaction import redact
from mnist_exp.tracking.store import sqlite_path

log = logging.getLogger("mnist_exp")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweeper says what matters itself
ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
SQLITE_WAIT_S = 60  # a write waits this long for another process's (SQLite locks the file)


def open_storage(settings: Settings) -> RDBStorage:
    """The study's storage, with heartbeats; `UserError` when the URL cannot be opened."""
    url = settings.storage
    db, sqlite = sqlite_path(url), url.startswith("sqlite")
    # SQLAlchemy 2.1 opens `postgresql://` with psycopg 3; the project installs psycopg2 (the
    # `server` extra, as MLflow's server uses): a bare URL takes it where psycopg 3 is absent.
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        url = "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    try:
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        # Optuna makes a new database's tables on first use: one process at a time, as MLflow's.
        with FileLock(f"{db}.lock") if db is not None else nullcontext(), _quietly():
            return RDBStorage(
                url,
                engine_kwargs={"connect_args": {"timeout": SQLITE_WAIT_S}} if sqlite else None,
                heartbeat_interval=settings.heartbeat_s,
                grace_period=3 * settings.heartbeat_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
            )
    except Exception as exc:
        raise UserError(
            f"cannot open the Optuna storage {redact(settings.storage)} ({first_line(exc)}): "
            f"fix hydra.sweeper.storage (an SQLAlchemy URL such as sqlite:///path/optuna.db)"
        ) from None


def check_study(settings: Settings, storage: RDBStorage) -> bool:
    """Whether the study exists; refuses (`UserError`) one whose direction is not the config's."""
    direction = StudyDirection[settings.direction.upper()]
    studies = {s.study_name: s for s in storage.get_all_studies()}
    found = studies.get(settings.study_name)
    if found is not None and found.directions != [direction]:
        theirs = ", ".join(d.name.lower() for d in found.directions)
        raise UserError(
            f"study {settings.study_name!r} in {redact(settings.storage)} is to {theirs}, "
            f"this search to {settings.direction}: choose another hydra.sweeper.study_name, "
            f"or a direction and optimized_metric that agree with the study"
        )
    return found is not None


def open_study(settings: Settings, storage: RDBStorage, *, create: bool) -> optuna.Study:
    """The study named in `settings`, created when `create` and absent (see `check_study`)."""
    if not check_study(settings, storage) and not create:
        raise UserError(f"no study {settings.study_name!r} in {redact(settings.storage)}")
    return optuna.create_study(
        storage=storage,
        study_name=settings.study_name,
        direction=StudyDirection[settings.direction.upper()],
        pruner=settings.make_pruner(),
        load_if_exists=True,
    )


def counted(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count to `n_trials`: ended, less those failed as stale and retried."""
    trials = study.get_trials(deepcopy=False)
    with _quietly():
        retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return [t for t in trials if t.state in ENDED and t.number not in retried]


def trial_ids(storage: RDBStorage, study_name: str, numbers: Sequence[int]) -> list[int]:
    """The storage's ids of the study's trials `numbers` (what heartbeats are recorded by)."""
    study_id = storage.get_study_id_from_name(study_name)
    return [storage.get_trial_id_from_study_id_trial_number(study_id, n) for n in numbers]


def ask(study: optuna.Study) -> optuna.Trial:
    """The study's next trial (one enqueued again first). Optuna warns when a storage with
    heartbeats is asked outside `Study.optimize`; the sweeper beats them itself (`heartbeat`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
        return study.ask()


def fail_stale(study: optuna.Study) -> None:
    """Fail the running trials whose heartbeat stopped, enqueuing each again (see above)."""
    with _quietly():
        fail_stale_trials(study)


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue the parameters of a trial that was cut short again, as a stale trial's are."""
    with _quietly():
        RetryHeartbeatStaleTrialCallback()(study, trial)


@contextmanager
def _quietly() -> Iterator[None]:
    """Heartbeats and retries are marked experimental (since Optuna 2.8): we rely on them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@contextmanager
def heartbeat(storage: RDBStorage, trial_ids: Sequence[int]) -> Iterator[None]:
    """Inside, a thread records every `heartbeat_interval` seconds that these trials live."""
    interval = storage.get_heartbeat_interval()
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial_id in trial_ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception as exc:  # a storage away for a moment: the next beat may do
                    log.warning(f"could not record the heartbeat of Optuna trial: {exc}")
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
