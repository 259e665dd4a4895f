"""max_tool_calls: count tool results per session, block the call that would exceed N. Stateful."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from spendgate_server.engine.rules._unit import (
    Bad,
    CallFacts,
    DocRow,
    FormInput,
    Shadowed,
    StatefulRule,
    StoreView,
    WireChecker,
    optional_int_from_wire,
    parse_integer,
    pick_stricter,
)
from spendgate_server.rule_codes import Rule
from spendgate_server.store import ToolCheck

__all__ = ["MAX_TOOL_CALLS", "ToolCallLimit"]

MAX_TOOL_CALLS = 1_000_000


class _Fields(Shadowed, Protocol):
    """The config fields this rule reads (EnforcementConfig has them)."""

    @property
    def max_tool_calls(self) -> int | None: ...


class ToolCallLimit(StatefulRule):
    """Block the call that would take the session's tool calls above the cap; the lower cap wins."""

    rule = Rule.TOOL_CALL_LIMIT
    client_error = "ToolCallLimitExceeded"
    title = "Tool-call limit"
    summary = "Block the call that would take a session's tool results above the limit."
    form_inputs = (FormInput("max_tool_calls", "Most tool calls per session", "Blank turns the rule off."),)
    wire_fields = (("max_tool_calls", "max_tool_calls"),)
    docs = (
        DocRow(
            "`max_tool_calls`",
            "count tool results per session; block the call that would take the count above N",
            "per session",
            "lower wins",
        ),
    )

    def enabled(self, config: _Fields) -> bool:
        return config.max_tool_calls is not None

    def parse(self, raw: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        return {"max_tool_calls": parse_integer(raw, "max_tool_calls", 0, MAX_TOOL_CALLS, bad)}

    def to_dict(self, config: _Fields) -> dict[str, Any]:
        return {} if config.max_tool_calls is None else {"max_tool_calls": config.max_tool_calls}

    def merge(self, mine: _Fields, theirs: _Fields, shadow: set[Rule]) -> dict[str, Any]:
        return pick_stricter(self.rule, mine, theirs, "max_tool_calls", min, shadow)

    def from_wire(self, message: Any, check: WireChecker, prefix: str) -> dict[str, Any]:
        return {
            "max_tool_calls": optional_int_from_wire(
                message, "max_tool_calls", 0, MAX_TOOL_CALLS, check, prefix
            )
        }

    def to_wire(self, config: _Fields) -> dict[str, Any]:
        return self.to_dict(config)

    def store_args(self, config: _Fields, call: CallFacts) -> dict[str, Any]:
        cap = config.max_tool_calls
        return {} if cap is None else {"tools": ToolCheck(cap, config.is_shadow(self.rule))}

    def block_reason(self, config: _Fields, view: StoreView) -> str:
        return (
            f"tool calls would reach {view.tool_calls + view.tool_call_count}, "
            f"above max_tool_calls {config.max_tool_calls}"
        )
