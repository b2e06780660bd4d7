"""Credentials out of what is shown, apart from the MLflow code so that Hydra's logging config
loads the filter cheaply."""

from __future__ import annotations

import logging
import re

# The user:password@ (or token@) part of a URI such as http://user:pass@host:5000.
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """`http://user:secret@host` -> `http://***@host`: what may be shown or logged of a URI."""
    return _USERINFO.sub("***@", text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts credentials in URIs of every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "@" in message:
            record.msg, record.args = redact(message), None
        return True
