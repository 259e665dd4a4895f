"""structlog set-up: JSON lines in production, a console renderer on a terminal; secret redaction.

Credentials inside URLs (``redis://user:password@host``, ``?password=``) never reach a log
line or an error message: :func:`redact_secrets` rewrites them, every message that quotes
a URL calls it, and a log processor applies it to every string of every event as a net.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

__all__ = ["Outage", "configure_logging", "redact_secrets"]

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
        # One write per line, newline included (print() writes the newline apart, and stderr is
        # unbuffered): a server and its evaluator child share stderr, and their lines must not
        # interleave.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class Outage:
    """The outage of one retrying loop, logged twice: when it starts and when it ends.

    A loop that retries a store (a pub/sub listener, a poll, a flush, the evaluator) calls
    :meth:`failed` on every failed try and :meth:`succeeded` on every good one. The first
    failure logs ``lost`` (a warning, with the error); the retries that follow log it only
    at debug level (with the running ``failures``); the first success after them logs
    ``restored`` (info) with ``outage_seconds`` and ``failures``. So a Redis down for an
    hour is two lines per loop, not one per retry.

    Args:
        logger: the loop's structlog logger.
        lost: event of the outage's start (``config_pubsub_lost``).
        restored: event of its end (``config_pubsub_restored``).
        clock: monotonic seconds; injected in tests.
        **context: fields added to both events.
    """

    def __init__(
        self,
        logger: Any,
        lost: str,
        restored: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        **context: Any,
    ) -> None:
        self._logger = logger
        self._lost = lost
        self._restored = restored
        self._clock = clock
        self._context = context
        self._since: float | None = None
        self.failures = 0

    @property
    def down(self) -> bool:
        """Whether the last try failed."""
        return self._since is not None

    def failed(self, error: BaseException | str, **fields: Any) -> None:
        """One failed try: logs ``lost`` if it is the first of an outage."""
        self.failures += 1
        if self._since is None:
            self._since = self._clock()
            self._logger.warning(self._lost, error=str(error), **self._context, **fields)
        else:  # a retry within the outage: seen only at --log-level debug
            self._logger.debug(
                self._lost, error=str(error), failures=self.failures, **self._context, **fields
            )

    def succeeded(self) -> None:
        """One good try: logs ``restored`` if it ends an outage."""
        if self._since is None:
            return
        seconds = self._clock() - self._since
        self._logger.info(
            self._restored, outage_seconds=round(seconds, 3), failures=self.failures, **self._context
        )
        self._since = None
        self.failures = 0
