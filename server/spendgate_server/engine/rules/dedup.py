"""dedup_ttl_seconds: block a request identical to one admitted within the TTL. Stateful."""

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
from spendgate_server.store import DedupCheck

__all__ = ["MAX_DEDUP_TTL_SECONDS", "DuplicateRequest"]

MAX_DEDUP_TTL_SECONDS = 7 * 24 * 3600


class DuplicateRequest(IntegerRule, StatefulRule):
    """Block a fingerprint admitted in this session within the TTL; the longer TTL wins."""

    rule = Rule.DUPLICATE_REQUEST
    low, high, lower_is_stricter = 1, MAX_DEDUP_TTL_SECONDS, False
    client_error = "DuplicateRequest"
    title = "Duplicate requests"
    summary = "Block a request identical to one admitted in the same session within the window."
    form_label = "Window, seconds"
    docs = (
        DocRow(
            "`dedup_ttl_seconds`",
            "block a request whose fingerprint was admitted in this session within the TTL",
            "per fingerprint",
            "longer wins",
        ),
    )

    def store_args(self, config: Shadowed, call: CallFacts) -> dict[str, Any]:
        ttl = self.value(config)
        if ttl is None:
            return {}
        return {"dedup": DedupCheck(call.fingerprint.hex(), ttl * 1000, config.is_shadow(self.rule))}

    def block_reason(self, config: Shadowed, view: StoreView) -> str:
        return (
            f"an identical request was admitted in this session within dedup_ttl_seconds {self.value(config)}"
        )
