"""token_ceiling: block a call whose input tokens exceed N (exactly N is allowed). Stateless."""

from __future__ import annotations

from typing import Protocol

from spendgate_server.engine.rules._unit import (
    DocRow,
    Draft,
    Effect,
    FormInput,
    IntegerRule,
    Shadowed,
    StatelessRule,
)
from spendgate_server.rule_codes import Rule

__all__ = ["MAX_TOKEN_CEILING", "TokenCeiling"]

MAX_TOKEN_CEILING = 10_000_000


class _Fields(Shadowed, Protocol):
    """The config fields this rule reads (EnforcementConfig has them)."""

    @property
    def token_ceiling(self) -> int | None: ...


class TokenCeiling(IntegerRule, StatelessRule):
    """Block when the request's input tokens exceed the ceiling; the lower ceiling wins."""

    rule = Rule.TOKEN_CEILING
    low, high, lower_is_stricter = 1, MAX_TOKEN_CEILING, True
    effect = Effect.BLOCK
    client_error = "TokenCeilingExceeded"
    title = "Token ceiling"
    summary = "Block a call whose input tokens exceed the ceiling."
    form_inputs = (FormInput("token_ceiling", "Most input tokens per call", "Blank turns the rule off."),)
    wire_fields = (("token_ceiling", "token_ceiling"),)
    docs = (
        DocRow(
            "`token_ceiling`",
            "block when the request's input tokens exceed N (exactly N is allowed)",
            "none",
            "lower wins",
        ),
    )

    def check(self, config: _Fields, draft: Draft) -> str | None:
        ceiling = config.token_ceiling
        if ceiling is None or draft.input_tokens <= ceiling:
            return None
        return f"input tokens {draft.input_tokens} exceed token_ceiling {ceiling}"
