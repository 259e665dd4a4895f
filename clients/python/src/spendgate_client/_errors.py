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
        spent_nano_usd: what the session's settled calls cost, in nano-USD.
        reserved_nano_usd: what its open reservations (calls in flight, or never
            settled) hold, in nano-USD.
        unblocks_on_settle: True when the block is due to open reservations, so
            waiting for them to settle can lift it; False when settled spend alone
            reached the cap and only a new session id helps.
    """

    rule = "unknown"

    def __init__(
        self,
        reason: str,
        decision_id: str,
        rule: str | None = None,
        *,
        spent_nano_usd: int = 0,
        reserved_nano_usd: int = 0,
        unblocks_on_settle: bool = False,
    ) -> None:
        super().__init__(f"{rule or self.rule}: {reason} (decision {decision_id})")
        if rule is not None:
            self.rule = rule
        self.reason = reason
        self.decision_id = decision_id
        self.spent_nano_usd = spent_nano_usd
        self.reserved_nano_usd = reserved_nano_usd
        self.unblocks_on_settle = unblocks_on_settle


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
    """The decision service could not be reached in time and ``fail_mode`` is ``"closed"``.

    Attributes:
        code: the gRPC status name of the outage (``"UNAVAILABLE"``, ``"DEADLINE_EXCEEDED"``,
            ``"RESOURCE_EXHAUSTED"``, ...); ``"RESOURCE_EXHAUSTED"`` with no ``__cause__``
            when the client refused the call itself, at its ``max_outstanding`` bound.
    """

    def __init__(self, message: str, code: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.code = code


class InvalidRequest(SpendgateError, ValueError):
    """The service refused the request as malformed (a bug in the caller, not an outage).

    Attributes:
        field_violations: ``(field, description)`` pairs from the server.
    """

    def __init__(self, message: str, field_violations: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.field_violations = field_violations
