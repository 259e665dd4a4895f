"""Enforcement configuration: the rules' settings, their user-facing form and the tighten-only merge.

Every rule's keys, bounds and merge live in its unit (engine/rules/); this module holds
the config record and loops over the units' table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spendgate_server.engine.rules import RULE_UNITS, BudgetMode, ModelDowngrade
from spendgate_server.engine.rules.dedup import MAX_DEDUP_TTL_SECONDS
from spendgate_server.engine.rules.session_budget import MAX_SESSION_NANO_USD
from spendgate_server.engine.rules.token_ceiling import MAX_TOKEN_CEILING
from spendgate_server.engine.rules.tool_calls import MAX_TOOL_CALLS
from spendgate_server.errors import FieldViolation, InvalidArgument
from spendgate_server.rule_codes import Rule

__all__ = [
    "CONFIG_KEYS",
    "MAX_DEDUP_TTL_SECONDS",
    "MAX_SESSION_NANO_USD",
    "MAX_TOKEN_CEILING",
    "MAX_TOOL_CALLS",
    "BudgetMode",
    "EnforcementConfig",
    "ModelDowngrade",
    "Rule",
    "config_to_dict",
    "parse_enforcement_config",
]

SHADOW_KEY = "shadow"
_RULES_BY_KEY = {rule.key: rule for rule in Rule}


@dataclass(frozen=True, slots=True)
class EnforcementConfig:
    """The rules for a call; ``None`` means the rule is off.

    ``shadow_rules`` are evaluated and reported (would_block) but never enforced.
    """

    token_ceiling: int | None = None
    max_session_nano_usd: int | None = None
    budget_mode: BudgetMode = BudgetMode.CROSSING
    dedup_ttl_seconds: int | None = None
    max_tool_calls: int | None = None
    model_downgrade: ModelDowngrade | None = None
    shadow_rules: frozenset[Rule] = field(default_factory=frozenset)

    def is_shadow(self, rule: Rule) -> bool:
        """Whether ``rule`` only reports instead of enforcing."""
        return rule in self.shadow_rules

    def stricter(self, other: EnforcementConfig) -> EnforcementConfig:
        """Merge two configs key by key, keeping the stricter value of each rule (see each unit).

        A rule enforced on one side and shadowed on the other stays enforced with the
        enforcing side's value: a shadow setting can never loosen an enforced rule.
        """
        shadow: set[Rule] = set()
        fields: dict[str, Any] = {}
        for unit in RULE_UNITS:
            fields.update(unit.merge(self, other, shadow))
        return EnforcementConfig(**fields, shadow_rules=frozenset(shadow))


CONFIG_KEYS = (*(key for unit in RULE_UNITS for key in unit.config_keys), SHADOW_KEY)


def parse_enforcement_config(raw: Mapping[str, Any], prefix: str = "") -> EnforcementConfig:
    """Build a config from its user-facing form (the keys of the README's rules table).

    Args:
        raw: A mapping such as ``{"token_ceiling": 8000, "max_session_usd": 5}``.
        prefix: Prepended to field names in errors (``"enforcement_config."``).

    Raises:
        InvalidArgument: naming every bad key; nothing is built from a config with one.
    """
    errors: list[FieldViolation] = []

    def bad(key: str, description: str) -> None:
        errors.append(FieldViolation(prefix + key, description))

    if not isinstance(raw, Mapping):
        raise InvalidArgument([FieldViolation(prefix.rstrip(".") or "config", "must be a mapping")])
    for key in raw:
        if key not in CONFIG_KEYS:
            bad(str(key), f"unknown key; accepted keys: {', '.join(CONFIG_KEYS)}")

    fields: dict[str, Any] = {}
    for unit in RULE_UNITS:
        fields.update(unit.parse(raw, bad))

    shadow: frozenset[Rule] = frozenset()
    raw_shadow = raw.get(SHADOW_KEY)
    if raw_shadow is True:
        shadow = frozenset(Rule)
    elif isinstance(raw_shadow, list | tuple) and all(
        isinstance(r, str) and r in _RULES_BY_KEY for r in raw_shadow
    ):
        shadow = frozenset(_RULES_BY_KEY[r] for r in raw_shadow)
    elif raw_shadow not in (None, False):
        bad(SHADOW_KEY, f"must be true, false or a list of rule keys from: {', '.join(_RULES_BY_KEY)}")

    if errors:
        raise InvalidArgument(errors)
    return EnforcementConfig(**fields, shadow_rules=shadow)


def config_to_dict(config: EnforcementConfig) -> dict[str, Any]:
    """The user-facing form of ``config`` (what parse_enforcement_config reads back).

    Dollar amounts are exact decimal strings, so a round trip loses nothing.
    """
    raw: dict[str, Any] = {}
    for unit in RULE_UNITS:
        raw.update(unit.to_dict(config))
    if config.shadow_rules == frozenset(Rule):
        raw[SHADOW_KEY] = True
    elif config.shadow_rules:
        raw[SHADOW_KEY] = sorted(rule.key for rule in config.shadow_rules)
    return raw
