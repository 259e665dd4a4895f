"""structlog set-up: JSON lines in production, a console renderer on a terminal; secret redaction.

Credentials inside URLs (``redis://user:password@host``, ``?password=``) never reach a log
line or an error message: :func:`redact_secrets` rewrites them, every message that quotes
a URL calls it, and a log processor applies it to every string of every event as a net.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["configure_logging", "redact_secrets"]

# scheme://userinfo@ : everything up to the last "@" before the path (a raw "@" in a password
# stays inside the redacted part).
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")
_SECRET_QUERY = re.compile(r"([?&](?:password|passwd|pass|token|secret|auth)=)[^&\s#]*", re.IGNORECASE)


def redact_secrets(text: str) -> str:
    """``text`` with the userinfo of every URL and credential query values replaced by ``***``.

    ``redis://app:hunter2@cache:6379/0`` becomes ``redis://***@cache:6379/0``.
    """
    if "://" not in text and "=" not in text:
        return text
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def _redact_event(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact_secrets(value)
    return event


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog to write to stderr.

    Args:
        log_format: ``json``, ``console``, or ``auto`` (console when stderr is a TTY).
        level: minimum level name (``debug``, ``info``, ``warning``, ``error``).
    """
    console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
