"""`python -m mnist_exp.rerun RUN_ID_OR_RUN_DIR [--resume] [overrides]` (also `mnist-rerun`).

Runs a recorded run's config again, exactly, as a new MLflow run tagged
`mnist_exp.rerun_of=<RUN_ID>`; overrides apply on top. With `--resume` it continues the
stopped run itself from its last complete epoch instead.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mnist_exp.errors import UserError

USAGE = "usage: mnist-rerun RUN_ID_OR_RUN_DIR [--resume] [key=value ...]"
# Groups that only matter to a sweep, never replayed into a single run.
_NOT_REPLAYED = ("hydra/", "hparams_search")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        sys.exit(0 if args else 2)
    source, rest = args[0], args[1:]
    resume = "--resume" in rest
    overrides = [a for a in rest if a != "--resume"]
    with tempfile.TemporaryDirectory() as conf_dir:
        try:
            run_id = _write_rerun_config(source, overrides, resume, Path(conf_dir))
        except UserError as exc:
            sys.exit(f"error: {exc}")
        if resume:
            overrides.append(f"trainer.resume={run_id}")
        from mnist_exp import train

        sys.argv = ["mnist-train", "--config-dir", conf_dir, "--config-name", "rerun", *overrides]
        train.run_command()


def _write_rerun_config(source: str, overrides: list[str], resume: bool, conf_dir: Path) -> str:
    """Write `rerun.yaml`: today's defaults, the recorded group choices and values on top."""
    from mnist_exp.config import compose_config
    from mnist_exp.tracking import get_run, open_store

    cfg = compose_config([o for o in overrides if o.startswith("mlflow.")])
    uri = cfg.mlflow.tracking_uri
    client, experiment_id = open_store(uri, cfg.mlflow.experiment_name)
    folder = Path(source)
    if folder.is_dir():
        hydra_dir = folder / ".hydra"
        if not (hydra_dir / "config.yaml").is_file():
            raise UserError(
                f"{folder} has no .hydra/config.yaml: pass a Hydra run folder or run id"
            )
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`mnist_exp.output_dir` = '{folder.resolve()}'"
        )
        run = found[0] if found else None
        recorded_tags = run.data.tags if run else {}
        run_id = run.info.run_id if run else str(folder.resolve())
    else:
        run = get_run(client, source, uri)
        recorded_tags, run_id = run.data.tags, source
        hydra_dir = Path(client.download_artifacts(source, "hydra", str(conf_dir / "recorded")))
    if resume and run is None:
        raise UserError(f"--resume: no MLflow run recorded {folder}: pass its run id")
    recorded = OmegaConf.load(hydra_dir / "config.yaml")
    choices = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.choices
    _warn_about_environment(recorded_tags)

    defaults: list = ["config"]
    defaults += [
        {f"override /{group}": choice}
        for group, choice in choices.items()
        if choice is not None and not group.startswith(_NOT_REPLAYED)
    ]
    defaults.append("_self_")
    assert isinstance(recorded, DictConfig)
    recorded.trainer.resume = None
    if not resume:
        name = recorded_tags.get("mlflow.runName") or run_id
        recorded.mlflow.run_name = f"rerun of {name}" + (
            f" ({' '.join(overrides)})" if overrides else ""
        )
        recorded.mlflow.tags = {
            "mnist_exp.rerun_of": run_id,
            "mnist_exp.rerun_overrides": " ".join(overrides),
        }
    text = OmegaConf.to_yaml(OmegaConf.merge({"defaults": defaults}, recorded))
    (conf_dir / "rerun.yaml").write_text(text)
    return run_id


def _warn_about_environment(tags: dict[str, str]) -> None:
    """Say which recorded versions differ from this environment's: results may differ."""
    for key, recorded in sorted(tags.items()):
        package = key.removeprefix("mnist_exp.version.")
        if package == key or package == "python":
            continue
        try:
            here = metadata.version(package)
        except metadata.PackageNotFoundError:
            here = "not installed"
        if here != recorded:
            print(
                f"warning: {package} {here} here, {recorded} in the recorded run: "
                f"results may differ",
                file=sys.stderr,
            )


if __name__ == "__main__":
    main()
