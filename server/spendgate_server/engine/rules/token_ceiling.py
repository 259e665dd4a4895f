"""token_ceiling: block a call whose input tokens exceed N (exactly N is allowed). Stateless."""

from __future__ import annotations

from spendgate_server.engine.rules._unit import (
    DocRow,
    Draft,
    Effect,
    IntegerRule,
    Shadowed,
    StatelessRule,
)
from spendgate_server.rule_codes import Rule

__all__ = ["MAX_TOKEN_CEILING", "TokenCeiling"]

MAX_TOKEN_CEILING = 10_000_000


class TokenCeiling(IntegerRule, StatelessRule):
    """Block when the request's input tokens exceed the ceiling; the lower ceiling wins."""

    rule = Rule.TOKEN_CEILING
    low, high, lower_is_stricter = 1, MAX_TOKEN_CEILING, True
    effect = Effect.BLOCK
    client_error = "TokenCeilingExceeded"
    title = "Token ceiling"
    summary = "Block a call whose input tokens exceed the ceiling."
    form_label = "Most input tokens per call"
    docs = (
        DocRow(
            "`token_ceiling`",
            "block when the request's input tokens exceed N (exactly N is allowed)",
            "none",
            "lower wins",
        ),
    )

    def check(self, config: Shadowed, draft: Draft) -> str | None:
        ceiling = self.value(config)
        if ceiling is None or draft.input_tokens <= ceiling:
            return None
        return f"input tokens {draft.input_tokens} exceed token_ceiling {ceiling}"
