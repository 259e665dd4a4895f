"""token_ceiling: block a call whose input tokens exceed N (exactly N is allowed). Stateless."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from spendgate_server.engine.rules._unit import (
    Bad,
    DocRow,
    Draft,
    Effect,
    FormInput,
    Shadowed,
    StatelessRule,
    WireChecker,
    optional_int_from_wire,
    parse_integer,
    pick_stricter,
)
from spendgate_server.rule_codes import Rule

__all__ = ["MAX_TOKEN_CEILING", "TokenCeiling"]

MAX_TOKEN_CEILING = 10_000_000


class _Fields(Shadowed, Protocol):
    """The config fields this rule reads (EnforcementConfig has them)."""

    @property
    def token_ceiling(self) -> int | None: ...


class TokenCeiling(StatelessRule):
    """Block when the request's input tokens exceed the ceiling; the lower ceiling wins."""

    rule = Rule.TOKEN_CEILING
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

    def enabled(self, config: _Fields) -> bool:
        return config.token_ceiling is not None

    def parse(self, raw: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        return {"token_ceiling": parse_integer(raw, "token_ceiling", 1, MAX_TOKEN_CEILING, bad)}

    def to_dict(self, config: _Fields) -> dict[str, Any]:
        return {} if config.token_ceiling is None else {"token_ceiling": config.token_ceiling}

    def merge(self, mine: _Fields, theirs: _Fields, shadow: set[Rule]) -> dict[str, Any]:
        return pick_stricter(self.rule, mine, theirs, "token_ceiling", min, shadow)

    def from_wire(self, message: Any, check: WireChecker, prefix: str) -> dict[str, Any]:
        return {
            "token_ceiling": optional_int_from_wire(
                message, "token_ceiling", 1, MAX_TOKEN_CEILING, check, prefix
            )
        }

    def to_wire(self, config: _Fields) -> dict[str, Any]:
        return self.to_dict(config)

    def check(self, config: _Fields, draft: Draft) -> str | None:
        ceiling = config.token_ceiling
        if ceiling is None or draft.input_tokens <= ceiling:
            return None
        return f"input tokens {draft.input_tokens} exceed token_ceiling {ceiling}"
