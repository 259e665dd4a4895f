"""dedup_ttl_seconds: block a request identical to one admitted within the TTL. Stateful."""

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
from spendgate_server.store import DedupCheck

__all__ = ["MAX_DEDUP_TTL_SECONDS", "DuplicateRequest"]

MAX_DEDUP_TTL_SECONDS = 7 * 24 * 3600


class _Fields(Shadowed, Protocol):
    """The config fields this rule reads (EnforcementConfig has them)."""

    @property
    def dedup_ttl_seconds(self) -> int | None: ...


class DuplicateRequest(StatefulRule):
    """Block a fingerprint admitted in this session within the TTL; the longer TTL wins."""

    rule = Rule.DUPLICATE_REQUEST
    client_error = "DuplicateRequest"
    title = "Duplicate requests"
    summary = "Block a request identical to one admitted in the same session within the window."
    form_inputs = (FormInput("dedup_ttl_seconds", "Window, seconds", "Blank turns the rule off."),)
    wire_fields = (("dedup_ttl_seconds", "dedup_ttl_seconds"),)
    docs = (
        DocRow(
            "`dedup_ttl_seconds`",
            "block a request whose fingerprint was admitted in this session within the TTL",
            "per fingerprint",
            "longer wins",
        ),
    )

    def enabled(self, config: _Fields) -> bool:
        return config.dedup_ttl_seconds is not None

    def parse(self, raw: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        return {"dedup_ttl_seconds": parse_integer(raw, "dedup_ttl_seconds", 1, MAX_DEDUP_TTL_SECONDS, bad)}

    def to_dict(self, config: _Fields) -> dict[str, Any]:
        return {} if config.dedup_ttl_seconds is None else {"dedup_ttl_seconds": config.dedup_ttl_seconds}

    def merge(self, mine: _Fields, theirs: _Fields, shadow: set[Rule]) -> dict[str, Any]:
        return pick_stricter(self.rule, mine, theirs, "dedup_ttl_seconds", max, shadow)

    def from_wire(self, message: Any, check: WireChecker, prefix: str) -> dict[str, Any]:
        return {
            "dedup_ttl_seconds": optional_int_from_wire(
                message, "dedup_ttl_seconds", 1, MAX_DEDUP_TTL_SECONDS, check, prefix
            )
        }

    def to_wire(self, config: _Fields) -> dict[str, Any]:
        return self.to_dict(config)

    def store_args(self, config: _Fields, call: CallFacts) -> dict[str, Any]:
        ttl = config.dedup_ttl_seconds
        if ttl is None:
            return {}
        return {"dedup": DedupCheck(call.fingerprint.hex(), ttl * 1000, config.is_shadow(self.rule))}

    def block_reason(self, config: _Fields, view: StoreView) -> str:
        return (
            "an identical request was admitted in this session within "
            f"dedup_ttl_seconds {config.dedup_ttl_seconds}"
        )
