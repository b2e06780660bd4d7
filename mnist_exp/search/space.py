"""The search space: Hydra's sweep syntax read as Optuna distributions, and a trial as overrides.

hydra-optuna-sweeper's syntax: `choice(a, b)` and `a,b` are categorical, `range(1, 9, 2)` steps,
`interval(0.1, 1)` is uniform, `tag(log, interval(1e-4, 0.1))` log-uniform; other values fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import Trial

from mnist_exp.errors import UserError


@dataclass(frozen=True)
class SearchSpace:
    """What each trial draws (`distributions`) and what every trial sets alike (`fixed`)."""

    distributions: dict[str, BaseDistribution]
    fixed: dict[str, str]  # key -> the override's value, as typed

    def overrides(self, trial: Trial) -> list[str]:
        """Draw the trial's values (a retried trial gets its earlier ones) as overrides."""
        drawn = [f"{k}={_as_override(suggest(trial, k, d))}" for k, d in self.distributions.items()]
        return drawn + [f"{k}={v}" for k, v in self.fixed.items()]


def parse(params: dict[str, str], arguments: list[str]) -> SearchSpace:
    """`hydra.sweeper.params` and the command line's overrides (which win), or a `UserError`."""
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except HydraException as exc:
        raise UserError(
            f"the search space does not parse ({exc}): fix hydra.sweeper.params"
        ) from None
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in parsed:
        key = override.get_key_element()
        distributions.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            distributions[key] = _distribution(override)
        else:
            fixed[key] = override.get_value_element_as_str()
    return SearchSpace(distributions, fixed)


def suggest(trial: Trial, name: str, dist: BaseDistribution) -> Any:
    """`trial.suggest_*` for `dist`: what the study's sampler draws for `name`."""
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, FloatDistribution)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def _distribution(override: Override) -> BaseDistribution:
    """One sweep override as the distribution hydra-optuna-sweeper made of it."""
    line = override.input_line
    value = override.value()
    try:
        # choice(...) and a,b,c; shuffle(range(...)) is a set of choices too
        if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
            choices = list(override.sweep_iterator(transformer=Transformer.encode))
            plain = [c for c in choices if isinstance(c, str | int | float | bool)]
            if not choices or len(plain) < len(choices):
                raise ValueError("a choice needs at least one plain value")
            return CategoricalDistribution(plain)
        if isinstance(value, RangeSweep):
            assert value.start is not None and value.stop is not None
            # Like Python's range(), Hydra's stops before `stop`; Optuna's `high` is drawn too.
            count = math.ceil((value.stop - value.start) / value.step)
            if count < 1:
                raise ValueError("the range is empty")
            high = value.start + (count - 1) * value.step
            if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
                return FloatDistribution(value.start, high, step=value.step)
            return IntDistribution(int(value.start), int(high), step=int(value.step))
        if isinstance(value, IntervalSweep):
            assert value.start is not None and value.end is not None
            log = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                return IntDistribution(value.start, value.end, log=log)
            return FloatDistribution(value.start, value.end, log=log)
    except (ValueError, TypeError) as exc:
        raise UserError(
            f"{line}: Optuna cannot search this ({exc}): use choice(...), range(...), "
            f"interval(low, high) or tag(log, interval(low, high))"
        ) from None
    raise UserError(
        f"{line}: Optuna cannot search a glob: use choice(...), range(...) or interval(...)"
    )


def _as_override(value: Any) -> str:
    """A drawn value as Hydra reads it back: floats in full, strings as they were."""
    return repr(value) if isinstance(value, float) else str(value)
