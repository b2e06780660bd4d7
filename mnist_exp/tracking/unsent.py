"""What a run could not send to a tracking server that stayed away longer than
`mlflow.retry_for_s`: kept in order in the run's folder, and sent later to the same run
(`mnist-sync`), as W&B's offline mode and `wandb sync` do."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from mnist_exp import names
from mnist_exp.errors import UserError
from mnist_exp.tracking import messages as m

if TYPE_CHECKING:
    from mnist_exp.tracking.mlflow_run import MlflowRun

RUN = "run.json"  # the store and run the requests are for
REQUESTS = "requests.pickle"  # the requests, pickled one after another
SENT = "sent"  # how many of them a sync has sent already
FILES = "files"  # copies of the files to upload, as they were when kept


class Journal:
    """The requests of one run, from the first that could not be sent, in `folder`."""

    def __init__(self, folder: Path, tracking_uri: str, run_id: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        run = {"tracking_uri": tracking_uri, "run_id": run_id}
        (folder / RUN).write_text(json.dumps(run, indent=1) + "\n")
        self._count = sum(1 for _ in _read(folder))

    def keep(self, request: m.Request) -> Any:
        """Write `request` (its files copied) durably; what the training process is answered."""
        if isinstance(request, m.MetricHistory):  # nothing to send: what is kept here
            return {key: [] for key in request.keys}
        if isinstance(request, m.DataDigests):  # nothing to send, nothing to compare with
            return {}
        if isinstance(request, m.Upload | m.LogModel):
            path = request.path if isinstance(request, m.Upload) else request.weights
            copy = self.folder / FILES / str(self._count) / path.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, copy)
            else:
                shutil.copyfile(path, copy)
            if isinstance(request, m.Upload):
                request = replace(request, path=copy)
            else:
                request = replace(request, weights=copy)
        with open(self.folder / REQUESTS, "ab") as file:
            pickle.dump(request, file)
            file.flush()
            os.fsync(file.fileno())
        self._count += 1
        return m.Kept(self.folder)


def _read(folder: Path) -> Iterator[m.Request]:
    """The requests kept, in order; a last one cut short (the process killed) is left out."""
    path = folder / REQUESTS
    if not path.is_file():
        return
    with open(path, "rb") as file:
        while True:
            try:
                yield pickle.load(file)
            except (EOFError, pickle.UnpicklingError):
                return


def send(folder: Path, retry_for_s: float = 0.0) -> tuple[MlflowRun, list[m.Request]]:
    """Send what `folder` keeps to its run, which ends as the training process ended it; the
    folder is removed once all is sent. Returns the run and the requests this call sent."""
    lock = folder.parent / f"{folder.name}.lock"  # beside it: two syncs at once send once
    with FileLock(lock) if folder.parent.is_dir() else contextlib.nullcontext():
        try:
            run_file = json.loads((folder / RUN).read_text())
        except (OSError, ValueError):
            raise UserError(
                f"{folder}: nothing kept there to send: give the folder an error named "
                f"({names.UNSENT}/ in a run folder), or that run folder"
            ) from None
        run, requests = _send(folder, run_file["tracking_uri"], run_file["run_id"], retry_for_s)
        shutil.rmtree(folder)
        lock.unlink()
    return run, requests


def _send(
    folder: Path, tracking_uri: str, run_id: str, retry_for_s: float
) -> tuple[MlflowRun, list[m.Request]]:
    from mlflow.tracking import MlflowClient

    from mnist_exp.tracking.mlflow_run import MlflowRun

    requests = list(_read(folder))
    sent = int((folder / SENT).read_text()) if (folder / SENT).is_file() else 0
    run = MlflowRun.reopen(MlflowClient(tracking_uri), run_id, retry_for_s)
    for number, request in enumerate(requests[sent:], sent + 1):
        request.do(run)
        (folder / SENT).write_text(str(number))
    if not any(isinstance(r, m.End) for r in requests):  # its tracker was killed
        run.end("FAILED")
    return run, requests[sent:]
