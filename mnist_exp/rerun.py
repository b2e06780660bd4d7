"""`mnist-rerun RUN_ID_OR_RUN_DIR [--resume] [overrides]` (also `python -m mnist_exp.rerun`).

Runs a recorded run's config again, exactly, as a new MLflow run tagged
`mnist_exp.rerun_of=<RUN_ID>`; overrides apply on top. With `--resume` it continues the
stopped run itself from its last complete epoch instead.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mnist_exp import train
from mnist_exp.config.world import current_world
from mnist_exp.errors import exit_on_user_error
from mnist_exp.runner.rerun_config import write_rerun_config
from mnist_exp.runner.source import program

USAGE = "usage: mnist-rerun RUN_ID_OR_RUN_DIR [--resume] [key=value ...]"


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{(__doc__ or '').strip()}")
        sys.exit(0 if args else 2)
    command = " ".join([program(), *args])  # mnist-rerun, or python -m mnist_exp.rerun
    source, rest = args[0], args[1:]
    resume = "--resume" in rest
    overrides = [a for a in rest if a != "--resume"]
    with exit_on_user_error():
        leader = current_world().leader
    # Under torchrun, rank 0 says what is fetched and done; the others do the same silently.
    said = contextlib.nullcontext() if leader else contextlib.redirect_stdout(io.StringIO())
    with tempfile.TemporaryDirectory() as conf_dir:
        with exit_on_user_error(), said:
            run_id = write_rerun_config(source, overrides, resume, Path(conf_dir))
            if resume:
                overrides.append(f"trainer.resume={run_id}")
            doing = (
                f"resuming MLflow run {run_id}" if resume else f"rerunning {run_id} as a new run"
            )
            print(f"{doing}...", flush=True)
        sys.argv = ["mnist-train", "--config-dir", conf_dir, "--config-name", "rerun", *overrides]
        train.run_command(overrides, command)


if __name__ == "__main__":
    main()
