"""max_tool_calls: count tool results per session, block the call that would exceed N. Stateful."""

from __future__ import annotations

from typing import Any

from spendgate_server.engine.rules._unit import (
    CallFacts,
    DocRow,
    IntegerRule,
    Shadowed,
    StatefulRule,
    StoreView,
)
from spendgate_server.rule_codes import Rule
from spendgate_server.store import ToolCheck

__all__ = ["MAX_TOOL_CALLS", "ToolCallLimit"]

MAX_TOOL_CALLS = 1_000_000


class ToolCallLimit(IntegerRule, StatefulRule):
    """Block the call that would take the session's tool calls above the cap; the lower cap wins."""

    rule = Rule.TOOL_CALL_LIMIT
    low, high, lower_is_stricter = 0, MAX_TOOL_CALLS, True
    client_error = "ToolCallLimitExceeded"
    title = "Tool-call limit"
    summary = "Block the call that would take a session's tool results above the limit."
    form_label = "Most tool calls per session"
    docs = (
        DocRow(
            "`max_tool_calls`",
            "count tool results per session; block the call that would take the count above N",
            "per session",
            "lower wins",
        ),
    )

    def store_args(self, config: Shadowed, call: CallFacts) -> dict[str, Any]:
        cap = self.value(config)
        return {} if cap is None else {"tools": ToolCheck(cap, config.is_shadow(self.rule))}

    def block_reason(self, config: Shadowed, view: StoreView) -> str:
        return (
            f"tool calls would reach {view.tool_calls + view.tool_call_count}, "
            f"above max_tool_calls {self.value(config)}"
        )
