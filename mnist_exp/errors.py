"""The one exception type for problems the user can fix."""


class UserError(Exception):
    """Bad input (a config value, a missing dataset, an unreachable store).

    The entry point reports it as a single line and exits non-zero; the message must say
    what was wrong and what to do.
    """


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
