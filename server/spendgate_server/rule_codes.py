"""The enforcement rules' identities: wire codes (spendgate.v1.Rule), Lua codes and config keys.

The foundation every layer shares: the store reports which of its checks blocked by these
codes, the engine holds each rule's behaviour, the RPC layer maps them to the wire enum.
"""

from __future__ import annotations

import enum

__all__ = ["Rule"]


class Rule(enum.IntEnum):
    """The enforcement rules. Values are the wire codes (spendgate.v1.Rule) and the Lua codes."""

    TOKEN_CEILING = 1
    SESSION_BUDGET = 2
    DUPLICATE_REQUEST = 3
    TOOL_CALL_LIMIT = 4
    MODEL_DOWNGRADE = 5

    @property
    def key(self) -> str:
        """The user-facing config key of this rule."""
        return _RULE_KEYS[self]


_RULE_KEYS = {
    Rule.TOKEN_CEILING: "token_ceiling",
    Rule.SESSION_BUDGET: "max_session_usd",
    Rule.DUPLICATE_REQUEST: "dedup_ttl_seconds",
    Rule.TOOL_CALL_LIMIT: "max_tool_calls",
    Rule.MODEL_DOWNGRADE: "model_downgrade",
}
