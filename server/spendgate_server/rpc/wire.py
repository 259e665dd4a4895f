"""Domain → wire: the proto form of decisions and configs (validation.py is the other way)."""

from __future__ import annotations

from typing import Any

from spendgate.v1 import decision_pb2 as pb

from spendgate_server.engine.config import EnforcementConfig
from spendgate_server.engine.decide import Decision
from spendgate_server.engine.rules import RULE_UNITS

__all__ = ["config_to_proto", "decision_to_proto"]


def decision_to_proto(d: Decision) -> pb.DecideResponse:
    """Wire form of a Decision."""
    response = pb.DecideResponse(
        verdict=int(d.verdict),  # type: ignore[arg-type]  # Verdict values are the wire codes
        effective_model=d.effective_model,
        rule=int(d.rule or 0),  # type: ignore[arg-type]  # Rule values are the wire codes
        reason=d.reason,
        decision_id=d.decision_id,
        reservation_id=d.reservation_id,
        estimated_cost_nano_usd=d.estimated_cost_nano_usd,
        session_spend_nano_usd=d.session_spend_nano_usd,
        config_version=d.config_version,
        would_block=d.would_block,
        shadow_rules=sorted(int(r) for r in d.shadow_rules),  # type: ignore[misc]
        settled_spend_nano_usd=d.settled_spend_nano_usd,
        reserved_nano_usd=d.reserved_nano_usd,
        unblocks_on_settle=d.unblocks_on_settle,
    )
    if d.remaining_budget_nano_usd is not None:
        response.remaining_budget_nano_usd = d.remaining_budget_nano_usd
    return response


def config_to_proto(config: EnforcementConfig) -> pb.EnforcementConfig:
    """Wire form of an EnforcementConfig (each rule's unit gives its fields)."""
    fields: dict[str, Any] = {}
    for unit in RULE_UNITS:
        fields.update(unit.to_wire(config))
    shadow = sorted(int(r) for r in config.shadow_rules)
    return pb.EnforcementConfig(shadow_rules=shadow, **fields)  # type: ignore[arg-type]  # Rule values are the wire codes
