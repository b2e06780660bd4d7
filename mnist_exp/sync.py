"""`mnist-sync FOLDER...`: send what runs kept in their folders while the tracking server was
away (`mlflow-unsent/`, named by the command that kept it) to the same MLflow runs.

Each run gets every metric value, tag, test result and file it could not send, and ends as its
training ended (FINISHED, or FAILED / KILLED). A sync cut short can be run again: what was
sent is not sent twice.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mnist_exp import names
from mnist_exp.errors import exit_on_user_error
from mnist_exp.tracking import messages as m
from mnist_exp.tracking.redaction import redact


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mnist-sync", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "folders", nargs="+", type=Path, help=f"run folders, or their {names.UNSENT}/"
    )
    parser.add_argument(
        "--retry-for-s",
        type=float,
        default=60.0,
        help="seconds to wait for a tracking server that is still away (default 60)",
    )
    args = parser.parse_args(argv)
    with exit_on_user_error():
        for folder in args.folders:
            print(sync(folder, args.retry_for_s))


def sync(folder: Path, retry_for_s: float = 60.0) -> str:
    """Send what `folder` (a run folder or its `mlflow-unsent/`) keeps; what was done."""
    # store: its settings for MLflow's output (no download bars, no "View run" lines).
    from mnist_exp.tracking import store  # noqa: F401
    from mnist_exp.tracking.unsent import send

    if (folder / names.UNSENT).is_dir():
        folder = folder / names.UNSENT
    run, sent = send(folder, retry_for_s)
    if any(isinstance(r, m.Upload) and r.artifact_path == names.PLOTS for r in sent):
        # Drawn while the server was away, the learning curves lacked the values it held.
        from mnist_exp.report import plots

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "learning_curves.png"
            plots.learning_curves(run.metric_history(plots.CURVES), path)
            run.log_artifact(path, names.PLOTS)
    status = run.client.get_run(run.run_id).info.status
    uri = redact(str(run.client.tracking_uri))
    return f"sent {len(sent)} kept requests to MLflow run {run.run_id} in {uri}: {status}"


if __name__ == "__main__":
    main()
