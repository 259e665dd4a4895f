"""The enforcement rules, one unit each, and the table that drives everything else.

``RULE_UNITS`` is the only list of rules: decide (engine/decide.py), config parsing,
merging and the user-facing form (engine/config.py), wire validation and mapping
(rpc/validation.py, rpc/wire.py), the console's rules form and the README's rules
table all iterate it. Its order is the user-facing order (the wire codes); stateless
units run in that order, so the ceiling is checked before a downgrade reprices the call.

Adding a rule: its code in ``rule_codes.Rule`` and the contract (.proto), one module
here with its unit, one entry below, its field in ``EnforcementConfig``; when it has
state, its check in the store (store/base.py, memory.py, decide.lua and the declared
ARGV list in store/redis.py); its tests; the README table (``python -m
spendgate_server.engine.rules`` prints it; a test keeps the two equal).
"""

from __future__ import annotations

from spendgate_server.engine.rules._unit import (
    DocRow,
    Draft,
    Effect,
    FormChoice,
    FormInput,
    RuleUnit,
    StatefulRule,
    StatelessRule,
    StoreView,
    WireChecker,
    usage_estimate,
)
from spendgate_server.engine.rules.dedup import DuplicateRequest
from spendgate_server.engine.rules.model_downgrade import ModelDowngrade, ModelDowngradeRule
from spendgate_server.engine.rules.session_budget import BudgetMode, SessionBudget
from spendgate_server.engine.rules.token_ceiling import TokenCeiling
from spendgate_server.engine.rules.tool_calls import ToolCallLimit
from spendgate_server.rule_codes import Rule

__all__ = [
    "RULE_UNITS",
    "SESSION_BUDGET",
    "SHADOW_DOC",
    "STATEFUL_RULES",
    "STATELESS_RULES",
    "BudgetMode",
    "DocRow",
    "Draft",
    "Effect",
    "FormChoice",
    "FormInput",
    "ModelDowngrade",
    "RuleUnit",
    "StatefulRule",
    "StatelessRule",
    "StoreView",
    "WireChecker",
    "rules_table_markdown",
    "unit_for",
    "usage_estimate",
]

SESSION_BUDGET = SessionBudget()

RULE_UNITS: tuple[RuleUnit, ...] = (
    TokenCeiling(),
    SESSION_BUDGET,
    DuplicateRequest(),
    ToolCallLimit(),
    ModelDowngradeRule(),
)

STATELESS_RULES = tuple(u for u in RULE_UNITS if isinstance(u, StatelessRule))
STATEFUL_RULES = tuple(u for u in RULE_UNITS if isinstance(u, StatefulRule))
_BY_RULE = {unit.rule: unit for unit in RULE_UNITS}

# The one key that is not a rule: it applies to all of them.
SHADOW_DOC = DocRow(
    "`shadow`",
    "`true` or a list of rule keys: evaluate, report `would_block`, allow",
    "—",
    "an enforced rule stays enforced",
)


def unit_for(rule: Rule) -> RuleUnit:
    """The unit of ``rule``."""
    return _BY_RULE[rule]


def rules_table_markdown() -> str:
    """The README's rules table, generated from the units."""
    rows = [row for unit in RULE_UNITS for row in unit.docs] + [SHADOW_DOC]
    lines = [
        "| key | meaning | state | client value vs server value |",
        "|---|---|---|---|",
        *(f"| {r.key} | {r.meaning} | {r.state} | {r.merge} |" for r in rows),
    ]
    return "\n".join(lines)


assert set(_BY_RULE) == set(Rule), "every Rule needs exactly one unit in RULE_UNITS"
