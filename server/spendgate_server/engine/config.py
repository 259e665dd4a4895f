"""Enforcement configuration: the five rules, their user-facing form and the tighten-only merge."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

from spendgate_server.errors import FieldViolation, InvalidArgument
from spendgate_server.money import NANO_PER_USD, usd_to_nano
from spendgate_server.rule_codes import Rule

__all__ = [
    "CONFIG_KEYS",
    "BudgetMode",
    "EnforcementConfig",
    "ModelDowngrade",
    "Rule",
    "config_to_dict",
    "parse_enforcement_config",
]

# Bounds shared by the user-facing parser and the wire validator.
MAX_TOKEN_CEILING = 10_000_000
MAX_SESSION_NANO_USD = 1_000_000 * NANO_PER_USD  # one million USD: keeps sums exact in Lua doubles
MAX_DEDUP_TTL_SECONDS = 7 * 24 * 3600
MAX_TOOL_CALLS = 1_000_000


_RULES_BY_KEY = {rule.key: rule for rule in Rule}


class BudgetMode(enum.Enum):
    """How max_session_usd treats the call that would cross the cap."""

    CROSSING = "crossing"
    STRICT = "strict"


@dataclass(frozen=True, slots=True)
class ModelDowngrade:
    """Run a call on ``fallback_model`` when its estimate on the requested model exceeds the threshold."""

    threshold_nano_usd: int
    fallback_model: str


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
        """Merge two configs key by key, keeping the stricter value of each rule.

        A rule enforced on one side and shadowed on the other stays enforced with the
        enforcing side's value: a shadow setting can never loosen an enforced rule.
        """
        shadow: set[Rule] = set()

        def pick(
            rule: Rule, mine: _T | None, theirs: _T | None, tighter: Callable[[_T, _T], _T]
        ) -> _T | None:
            if mine is None or theirs is None:
                chosen, side = (theirs, other) if mine is None else (mine, self)
                if chosen is not None and side.is_shadow(rule):
                    shadow.add(rule)
                return chosen
            my_shadow, their_shadow = self.is_shadow(rule), other.is_shadow(rule)
            if my_shadow == their_shadow:
                if my_shadow:
                    shadow.add(rule)
                return tighter(mine, theirs)
            return theirs if my_shadow else mine

        merged = EnforcementConfig(
            token_ceiling=pick(Rule.TOKEN_CEILING, self.token_ceiling, other.token_ceiling, min),
            max_session_nano_usd=pick(
                Rule.SESSION_BUDGET, self.max_session_nano_usd, other.max_session_nano_usd, min
            ),
            dedup_ttl_seconds=pick(
                Rule.DUPLICATE_REQUEST, self.dedup_ttl_seconds, other.dedup_ttl_seconds, max
            ),
            max_tool_calls=pick(Rule.TOOL_CALL_LIMIT, self.max_tool_calls, other.max_tool_calls, min),
            model_downgrade=pick(
                Rule.MODEL_DOWNGRADE, self.model_downgrade, other.model_downgrade, _lower_threshold
            ),
        )
        strict = BudgetMode.STRICT in (self.budget_mode, other.budget_mode)
        return replace(
            merged,
            budget_mode=BudgetMode.STRICT if strict else BudgetMode.CROSSING,
            shadow_rules=frozenset(shadow),
        )


_T = TypeVar("_T")


def _lower_threshold(mine: ModelDowngrade, theirs: ModelDowngrade) -> ModelDowngrade:
    # On a tie the first (server-side) downgrade keeps its fallback.
    return theirs if theirs.threshold_nano_usd < mine.threshold_nano_usd else mine


CONFIG_KEYS = (
    "token_ceiling",
    "max_session_usd",
    "budget_mode",
    "dedup_ttl_seconds",
    "max_tool_calls",
    "model_downgrade",
    "shadow",
)


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

    def integer(key: str, low: int, high: int) -> int | None:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            bad(key, f"must be an integer, got {type(value).__name__}")
            return None
        if not low <= value <= high:
            bad(key, f"must be between {low} and {high}, got {value}")
            return None
        return value

    def usd(key: str, value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
            bad(key, f"must be a number of US dollars, got {type(value).__name__}")
            return None
        bound = f"must be between 0 and {MAX_SESSION_NANO_USD // NANO_PER_USD}"
        try:
            amount = Decimal(str(value))
        except InvalidOperation:
            bad(key, f"must be a number of US dollars, got {str(value)[:64]!r}")
            return None
        if not amount.is_finite():
            bad(key, f"{bound}, got {value}")
            return None
        try:
            nano = usd_to_nano(amount)
        except ValueError:
            # Far out of range (1e999999): the amount is not echoed, it may be thousands of digits.
            nano = -1
        if not 0 <= nano <= MAX_SESSION_NANO_USD:
            shown = f", got {value}" if nano >= 0 or len(str(value)) <= 32 else ""
            bad(key, f"{bound}{shown}")
            return None
        return nano

    budget = None if raw.get("max_session_usd") is None else usd("max_session_usd", raw["max_session_usd"])

    mode = BudgetMode.CROSSING
    if raw.get("budget_mode") is not None:
        try:
            mode = BudgetMode(raw["budget_mode"])
        except ValueError:
            bad("budget_mode", f"must be 'crossing' or 'strict', got {raw['budget_mode']!r}")

    downgrade = None
    if raw.get("model_downgrade") is not None:
        spec = raw["model_downgrade"]
        if not isinstance(spec, Mapping) or set(spec) != {"threshold_usd", "fallback"}:
            bad("model_downgrade", "must be a mapping with exactly 'threshold_usd' and 'fallback'")
        else:
            threshold = usd("model_downgrade.threshold_usd", spec["threshold_usd"])
            fallback = spec["fallback"]
            if not isinstance(fallback, str) or not fallback:
                bad("model_downgrade.fallback", "must be a model name")
            elif threshold is not None:
                downgrade = ModelDowngrade(threshold, fallback)

    shadow: frozenset[Rule] = frozenset()
    raw_shadow = raw.get("shadow")
    if raw_shadow is True:
        shadow = frozenset(Rule)
    elif isinstance(raw_shadow, list | tuple) and all(
        isinstance(r, str) and r in _RULES_BY_KEY for r in raw_shadow
    ):
        shadow = frozenset(_RULES_BY_KEY[r] for r in raw_shadow)
    elif raw_shadow not in (None, False):
        bad("shadow", f"must be true, false or a list of rule keys from: {', '.join(_RULES_BY_KEY)}")

    config = EnforcementConfig(
        token_ceiling=integer("token_ceiling", 1, MAX_TOKEN_CEILING),
        max_session_nano_usd=budget,
        budget_mode=mode,
        dedup_ttl_seconds=integer("dedup_ttl_seconds", 1, MAX_DEDUP_TTL_SECONDS),
        max_tool_calls=integer("max_tool_calls", 0, MAX_TOOL_CALLS),
        model_downgrade=downgrade,
        shadow_rules=shadow,
    )
    if errors:
        raise InvalidArgument(errors)
    return config


def config_to_dict(config: EnforcementConfig) -> dict[str, Any]:
    """The user-facing form of ``config`` (what parse_enforcement_config reads back).

    Dollar amounts are exact decimal strings, so a round trip loses nothing.
    """
    raw: dict[str, Any] = {}
    if config.token_ceiling is not None:
        raw["token_ceiling"] = config.token_ceiling
    if config.max_session_nano_usd is not None:
        raw["max_session_usd"] = _nano_to_usd_text(config.max_session_nano_usd)
    if config.budget_mode is not BudgetMode.CROSSING:
        raw["budget_mode"] = config.budget_mode.value
    if config.dedup_ttl_seconds is not None:
        raw["dedup_ttl_seconds"] = config.dedup_ttl_seconds
    if config.max_tool_calls is not None:
        raw["max_tool_calls"] = config.max_tool_calls
    if config.model_downgrade is not None:
        raw["model_downgrade"] = {
            "threshold_usd": _nano_to_usd_text(config.model_downgrade.threshold_nano_usd),
            "fallback": config.model_downgrade.fallback_model,
        }
    if config.shadow_rules == frozenset(Rule):
        raw["shadow"] = True
    elif config.shadow_rules:
        raw["shadow"] = sorted(rule.key for rule in config.shadow_rules)
    return raw


def _nano_to_usd_text(nano_usd: int) -> str:
    return format(Decimal(nano_usd).scaleb(-9).normalize(), "f")
