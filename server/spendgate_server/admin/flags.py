"""Value types for the client commands' flags: each refuses a bad value with one line naming why.

argparse reports an ``ArgumentTypeError`` as ``argument --flag: <message>``, so the messages
here say only what the value must be.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

from spendgate_server.errors import ConfigError, InvalidArgument

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "LIMIT_HELP",
    "MAX_PAGE_SIZE",
    "MAX_TIMEOUT_SECONDS",
    "count",
    "flag_errors",
    "flag_of",
    "limited",
    "seconds",
]

_Item = TypeVar("_Item")

EXIT_FAILED = 1  # the service (or store) could not be reached, or refused or failed the call
EXIT_BAD_INPUT = 2  # a bad flag, value or file, whether the CLI or the service found it

MAX_TIMEOUT_SECONDS = 3600.0
# Every list command's --limit (a count: negative is refused at parse, exit 2).
LIMIT_HELP = "at most this many, over as many pages as it takes; 0: one page of the server's default size"
# The servers' largest page (of revisions, of violations): a longer --limit takes several calls.
MAX_PAGE_SIZE = 500


def limited(limit: int, fetch: Callable[[int, str], tuple[Sequence[_Item], str]]) -> Iterator[_Item]:
    """The items of a paged list as ``--limit`` means them (:data:`LIMIT_HELP`).

    ``fetch(page_size, page_token)`` asks for one page and returns its items and its
    ``next_page_token`` (AIP-158). ``limit`` items at most, over as many pages as it takes;
    ``limit`` 0 is one page of the server's default size (``page_size`` 0).
    """
    token, taken = "", 0
    while True:
        items, token = fetch(min(limit - taken, MAX_PAGE_SIZE) if limit else 0, token)
        for item in items[: limit - taken] if limit else items:
            taken += 1
            yield item
        if not limit or taken >= limit or not token:
            return


_INT64_MAX = 2**63 - 1  # the wire's int64 fields: the server checks the real bounds


def count(text: str) -> int:
    """A whole number ≥ 0 (tokens, tool calls, a limit).

    Raises:
        argparse.ArgumentTypeError: not a whole number, negative, or beyond 64 bits.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    if value > _INT64_MAX:
        raise argparse.ArgumentTypeError(f"is too large, got {text}")
    return value


def seconds(text: str) -> float:
    """A deadline in seconds: finite, above 0 and at most an hour.

    Raises:
        argparse.ArgumentTypeError: not a number, or out of (0, 3600].
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_SECONDS):
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most {MAX_TIMEOUT_SECONDS:g}, got {text}"
        )
    return value


@contextmanager
def flag_errors(flags: Mapping[str, str]) -> Iterator[None]:
    """Run the service's own validation of request fields here, before anything is sent.

    The CLI checks ids, etags, cursors and times with the functions the servicers use
    (rpc/validation.py), so a flag is refused exactly when the service would refuse its
    field, and with no server needed.

    Args:
        flags: Request field → the flag that set it, as for :func:`explain_rpc_error`.

    Raises:
        ConfigError: the validation refused a field; the message names its flag (exit 2).
    """
    try:
        yield
    except InvalidArgument as exc:
        raise ConfigError(
            "; ".join(f"{flag_of(v.field, flags)}: {v.description}" for v in exc.violations)
        ) from exc


def flag_of(field: str, flags: Mapping[str, str]) -> str:
    """The flag that set a request ``field`` (a key ending in ``.`` maps a prefix), else the field."""
    if field in flags:
        return flags[field]
    for prefix, flag in flags.items():
        if prefix.endswith(".") and field.startswith(prefix):
            return f"{flag} {field.removeprefix(prefix)}"
    return field
