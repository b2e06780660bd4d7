"""The one exception type for problems the user can fix."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Bad input: the command says in one line what was wrong and what to do, and exits non-zero."""


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Inside, a `UserError` ends the command with its one line, `error: ...`."""
    try:
        yield
    except UserError as exc:
        sys.exit(f"error: {exc}")


def first_line(exc: BaseException) -> str:
    """The first line of the exception's message, or its type's name when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, as a failed run's error tag shows an exception."""
    return f"{type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}"


class TrackingUnavailable(UserError):
    """The tracking server stayed unreachable longer than the run was told to wait."""


class TrackerLost(UserError):
    """The process recording the run died, and no new one could take the run over."""


class RankLost(UserError):
    """Another process of a data-parallel run (torchrun) ended, so this one cannot go on."""
