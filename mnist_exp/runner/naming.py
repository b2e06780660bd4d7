"""A run's default name, from the overrides that say what the experiment is (in a sweep's job,
those the sweep varies: the name it prints is the one MLflow shows)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override
from hydra.errors import OverrideParseException

from mnist_exp.report.table import short_name

# The keys a sweep varies, space-separated: set by the sweep callback for the jobs it launches.
SWEPT_ENV = "MNIST_EXP_SWEPT_KEYS"
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


def name_from(overrides: list[str], swept: Collection[str] = ()) -> str | None:
    """`optimizer.lr=0.003 data.batch_size=128` -> `lr=0.003,batch_size=128`, only the `swept`
    keys when it has any; None if none."""
    pairs = dict(o.lstrip("+~").partition("=")[::2] for o in describing(overrides))
    return short_name({k: v for k, v in pairs.items() if k in swept} or pairs) or None


def swept_keys(params: Mapping[str, str], overrides: list[str]) -> list[str]:
    """The keys a sweep varies: its `hydra.sweeper.params` and command line (which wins) that
    hold a sweep (`0.1,0.2`, `choice(...)`, `interval(...)`)."""
    parsed = _overrides(params, overrides) or {}
    return [key for key, o in parsed.items() if o.is_sweep_override()]


def grid_size(params: Mapping[str, str], overrides: list[str]) -> int | None:
    """How many jobs a grid sweep of these runs; None where the overrides alone do not tell (a
    glob over a group's files) or do not parse."""
    parsed = _overrides(params, overrides)
    if parsed is None:
        return None
    size = 1
    for o in parsed.values():
        if o.is_sweep_override():
            if not o.is_discrete_sweep() or isinstance(o.value(), Glob):
                return None
            size *= len(list(o.sweep_iterator()))
    return size


def _overrides(params: Mapping[str, str], overrides: list[str]) -> dict[str, Override] | None:
    """The sweep's `hydra.sweeper.params` and command line by key (the command line wins); None
    if they do not parse (the sweeper refuses them, in its words)."""
    lines = [f"{k}={v}" for k, v in params.items()] + overrides
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except OverrideParseException:
        return None
    return {o.key_or_group: o for o in parsed}
