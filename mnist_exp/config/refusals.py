"""One-line refusals, `key=value must be ...: change it on the command line or in conf/`, for
every config error: a range check's, or the schema's while Hydra composes the config."""

from __future__ import annotations

import difflib
import re
import types
from dataclasses import is_dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    ConfigTypeError,
    OmegaConfBaseException,
    ValidationError,
)

from mnist_exp.config import schema
from mnist_exp.errors import UserError

WHAT_TO_DO = "change it on the command line or in conf/"
MAX_SHOWN = 80  # characters of a refused value quoted in the message
# What a value of each type is called in a refusal.
_KINDS: dict[Any, str] = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "text",
}


def refusal(key: str, value: Any, why: str) -> UserError:
    """`key=value why: change it ...`; `why` says what the value must be ("must be ...")."""
    shown = repr(value)
    if len(shown) > MAX_SHOWN:
        shown = shown[: MAX_SHOWN - 3] + "..."
    return UserError(f"{key}={shown} {why}: {WHAT_TO_DO}")


def composition_refusal(exc: HydraException | OmegaConfBaseException) -> UserError:
    """What Hydra or OmegaConf raised while composing the config, as one line naming the key."""
    if isinstance(exc, MissingConfigException) and exc.options:
        group, _, option = (exc.missing_cfg_file or "").rpartition("/")
        choices = [o for o in exc.options if o not in schema.schema_names()]
        if group:
            return UserError(
                f"{group}={option} is not an option of {group}: name one of {', '.join(choices)}"
            )
    message = str(exc)
    if isinstance(exc, OverrideParseException):
        reason = _squeezed(message.partition("See https:")[0])
        return UserError(
            f"{exc.override}: Hydra cannot parse this override ({reason}): fix it, quoting "
            f"a value with special characters as in \"key='a b'\""
        )
    cause = _cause(exc)
    override = _override(message)
    source = re.match(r"In '([^']+)'", message)
    where = f" (in {source.group(1)})" if source and not override else ""
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        key = str(cause.full_key)
        head = f"{override.input_line}: " if override and override.key_or_group != key else ""
        return UserError(f"{head}{key} is not a config key{_hint(key, cause)}{where}: {WHAT_TO_DO}")
    if override and override.is_delete() and isinstance(cause, ConfigTypeError):
        key = override.key_or_group
        return UserError(
            f"{override.input_line}: {key} cannot be removed, its group's schema needs it: "
            f"set it to another value instead"
        )
    if isinstance(cause, ValidationError | ConfigTypeError) and cause.full_key:
        key = re.sub(r"\[\d+\]$", "", str(cause.full_key))  # a list's item: the list
        why = f"must be {_kind(key)}{where}"
        if override and override.key_or_group == key:
            return refusal(key, override.value(), why)
        if override:
            return UserError(f"{override.input_line}: {key} {why}: {WHAT_TO_DO}")
        return refusal(key, cause.value, why)
    reason = f" ({_squeezed(str(cause))})" if cause else ""
    return UserError(f"{_squeezed(message)}{reason}: fix the command line or the file in conf/")


def _cause(exc: BaseException) -> OmegaConfBaseException | None:
    """The OmegaConf error behind Hydra's (Hydra chains it, or raises inside its handler)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _override(message: str) -> Override | None:
    """The command-line override Hydra's message names, parsed, if it names one."""
    found = re.search(r"Error merging override (.+)$|To append to your config use \+(.+)$", message)
    if not found:
        return None
    try:
        (override,) = OverridesParser.create().parse_overrides([found.group(1) or found.group(2)])
    except HydraException:
        return None
    return override


def _hint(key: str, cause: OmegaConfBaseException) -> str:
    """A close key of the same node, and for a `_target_` group how to pass a new argument."""
    parent = cause.parent_node
    prefix, _, name = key.rpartition(".")
    hint = ""
    if isinstance(parent, DictConfig):
        close = difflib.get_close_matches(name, [str(k) for k in parent], n=1)
        if close:
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)"
    if prefix in schema.TARGET_GROUPS:
        hint += f"; an argument of your own {prefix}._target_ is added with +{key}=..."
    elif prefix and _kind(prefix).startswith("a mapping"):
        hint += f"; a new entry is added with +{key}=..."
    return hint


def _kind(key: str) -> str:
    """What the schemas say `key` holds, in words ("a whole number or null"), also a key of a
    schema inside a group's (`trainer.early_stopping.patience`)."""
    for (group, _), schema_type in schema.SCHEMAS.items():
        if group and not key.startswith(f"{group}."):
            continue
        hint: Any = schema_type
        for name in key.removeprefix(f"{group}." if group else "").split("."):
            hints = get_type_hints(hint) if is_dataclass(hint) else {}
            if name not in hints:
                break
            hint = hints[name]
        else:
            return _describe(hint)
    return "of the type its schema gives"


def _describe(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_describe(inner)} or null"
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ')}s"
    if origin is dict:
        return "a mapping such as {team: vision}"
    return _KINDS.get(annotation, str(annotation))


def _squeezed(text: str) -> str:
    """Hydra's message on one line: its lines joined, whitespace runs made single spaces."""
    return " ".join(text.split())[: MAX_SHOWN * 3]
