"""A run's default name, from the overrides that say what the experiment is."""

from __future__ import annotations

from mnist_exp.report.table import short_name

# Override prefixes that say where things are, not what the experiment is; left out of names.
_NOT_IN_NAME = (
    "hydra.",
    "mlflow.",
    "data.root",
    "device",
    "trainer.print_every_n_steps",
    "trainer.progress_bar",
)


def describing(overrides: list[str]) -> list[str]:
    """The overrides that change the experiment, not where it runs or records."""
    return [o for o in overrides if not o.lstrip("+~").startswith(_NOT_IN_NAME)]


def name_from(overrides: list[str]) -> str | None:
    """`optimizer.lr=0.003 data.batch_size=128` -> `lr=0.003,batch_size=128`; None if none."""
    pairs = dict(o.lstrip("+~").partition("=")[::2] for o in describing(overrides))
    return short_name(pairs) or None
