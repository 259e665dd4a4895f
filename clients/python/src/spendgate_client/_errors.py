"""Exceptions of the spendgate client; every one derives from SpendgateError."""

from __future__ import annotations

__all__ = [
    "DuplicateRequest",
    "EnforcementError",
    "InvalidRequest",
    "SessionBudgetExceeded",
    "SpendgateError",
    "SpendgateUnavailable",
    "TokenCeilingExceeded",
    "ToolCallLimitExceeded",
]


class SpendgateError(Exception):
    """Root of every error the spendgate client raises."""


class EnforcementError(SpendgateError):
    """The call was blocked by a rule; it never reached the provider.

    Attributes:
        rule: the config key of the rule that fired (``"token_ceiling"`` …).
        reason: why, in words a developer can act on.
        decision_id: the server's id of the decision, for logs and support.
    """

    rule = "unknown"

    def __init__(self, reason: str, decision_id: str, rule: str | None = None) -> None:
        super().__init__(f"{rule or self.rule}: {reason} (decision {decision_id})")
        if rule is not None:
            self.rule = rule
        self.reason = reason
        self.decision_id = decision_id


class TokenCeilingExceeded(EnforcementError):
    """The request's input tokens exceed ``token_ceiling``."""

    rule = "token_ceiling"


class SessionBudgetExceeded(EnforcementError):
    """The session's ``max_session_usd`` is used up."""

    rule = "max_session_usd"


class DuplicateRequest(EnforcementError):
    """An identical request was admitted within ``dedup_ttl_seconds``."""

    rule = "dedup_ttl_seconds"


class ToolCallLimitExceeded(EnforcementError):
    """The session's tool-call count would exceed ``max_tool_calls``."""

    rule = "max_tool_calls"


class SpendgateUnavailable(SpendgateError):
    """The decision service could not be reached in time and ``fail_mode`` is ``"closed"``."""


class InvalidRequest(SpendgateError, ValueError):
    """The service refused the request as malformed (a bug in the caller, not an outage).

    Attributes:
        field_violations: ``(field, description)`` pairs from the server.
    """

    def __init__(self, message: str, field_violations: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.field_violations = field_violations
