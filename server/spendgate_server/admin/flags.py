"""Value types for the client commands' flags: each refuses a bad value with one line naming why.

argparse reports an ``ArgumentTypeError`` as ``argument --flag: <message>``, so the messages
here say only what the value must be.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["MAX_TIMEOUT_SECONDS", "count", "seconds"]

MAX_TIMEOUT_SECONDS = 3600.0
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
