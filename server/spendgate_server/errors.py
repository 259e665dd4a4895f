"""Exceptions of the spendgate server; every one derives from SpendgateError.

Status mapping (status.py) turns these into gRPC codes in exactly one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "DeadlineExceeded",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "SpendgateError",
    "StoreUnavailable",
]


class SpendgateError(Exception):
    """Root of every error the server raises on purpose."""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: its path in the request (``enforcement_config.token_ceiling``) and why."""

    field: str
    description: str


class InvalidArgument(SpendgateError):
    """A request or config failed validation; nothing was changed."""

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class NotFound(SpendgateError):
    """The named object (a reservation, a session) does not exist or has expired."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class ResourceExhausted(SpendgateError):
    """A per-tenant or per-process quota is used up; nothing was changed.

    Args:
        quota: the quota's name (its flag without dashes, e.g. ``max_watch_streams_per_tenant``).
        message: what is used up, the limit and its flag, and what the caller can do.
    """

    def __init__(self, quota: str, message: str) -> None:
        self.quota = quota
        super().__init__(message)


class DeadlineExceeded(SpendgateError):
    """The call's deadline has passed, or too little of it is left to answer in time; nothing was done."""


class StoreUnavailable(SpendgateError):
    """The state store could not be reached or answered with an error."""


class ConfigError(SpendgateError):
    """A setting (flag, environment variable or file) is invalid; the message names it."""
