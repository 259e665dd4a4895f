"""max_session_usd and budget_mode: cap what one session spends. Stateful (the atomic step)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Protocol

from spendgate_server.engine.rules._unit import (
    MAX_USD_NANO,
    Bad,
    CallFacts,
    DocRow,
    FormChoice,
    FormInput,
    Shadowed,
    StatefulRule,
    StoreView,
    WireChecker,
    optional_int_from_wire,
    parse_usd,
    pick_stricter,
    usd_text,
)
from spendgate_server.money import format_usd
from spendgate_server.rule_codes import Rule
from spendgate_server.store import BudgetCheck

__all__ = ["MAX_SESSION_NANO_USD", "BudgetMode", "SessionBudget"]

MAX_SESSION_NANO_USD = MAX_USD_NANO


class BudgetMode(enum.Enum):
    """How max_session_usd treats the call that would cross the cap."""

    CROSSING = "crossing"
    STRICT = "strict"


# spendgate.v1.BudgetMode wire codes (0, unspecified, means crossing).
_MODE_BY_WIRE = {0: BudgetMode.CROSSING, 1: BudgetMode.CROSSING, 2: BudgetMode.STRICT}
_WIRE_BY_MODE = {BudgetMode.CROSSING: 1, BudgetMode.STRICT: 2}


class _Fields(Shadowed, Protocol):
    """The config fields this rule reads (EnforcementConfig has them)."""

    @property
    def max_session_nano_usd(self) -> int | None: ...
    @property
    def budget_mode(self) -> BudgetMode: ...


class SessionBudget(StatefulRule):
    """The session budget: the lower cap wins, and ``strict`` wins over ``crossing``."""

    rule = Rule.SESSION_BUDGET
    extra_keys = ("budget_mode",)
    client_error = "SessionBudgetExceeded"
    title = "Session budget"
    summary = "Cap what one session id may spend (settled plus reserved); then its calls block."
    form_inputs = (
        FormInput(
            "max_session_usd",
            "Budget per session, US dollars",
            "For example 5 or 0.25. Blank turns the rule off.",
            inputmode="decimal",
            kind="text",
        ),
    )
    form_choice = FormChoice(
        "budget_mode",
        "When a call would cross the budget",
        "Crossing allows calls while spend is below the cap; strict only if the call's estimate still fits.",
        (
            ("crossing", "Crossing: may exceed it by one call"),
            ("strict", "Strict: never exceeds it"),
        ),
        "crossing",
    )
    wire_fields = (
        ("max_session_nano_usd", "max_session_usd"),
        ("budget_mode", "budget_mode"),
    )
    docs = (
        DocRow(
            "`max_session_usd`",
            "cap a session's spend (settled + open reservations); once reached, further calls block: "
            "until a new session id when settled spend alone reached it, else until calls in flight "
            "settle (the block says which: `unblocks_on_settle`)",
            "per session",
            "lower wins",
        ),
        DocRow(
            "`budget_mode`",
            "`crossing` (default: allowed while spend < cap, so a session crosses by at most one call) "
            "or `strict` (allowed only if spend + this estimate ≤ cap)",
            "—",
            "`strict` wins",
        ),
    )

    def enabled(self, config: _Fields) -> bool:
        return config.max_session_nano_usd is not None

    def parse(self, raw: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        value = raw.get("max_session_usd")
        cap = None if value is None else parse_usd("max_session_usd", value, bad)
        mode = BudgetMode.CROSSING
        if raw.get("budget_mode") is not None:
            try:
                mode = BudgetMode(raw["budget_mode"])
            except ValueError:
                bad("budget_mode", f"must be 'crossing' or 'strict', got {raw['budget_mode']!r}")
        return {"max_session_nano_usd": cap, "budget_mode": mode}

    def to_dict(self, config: _Fields) -> dict[str, Any]:
        raw: dict[str, Any] = {}
        if config.max_session_nano_usd is not None:
            raw["max_session_usd"] = usd_text(config.max_session_nano_usd)
        if config.budget_mode is not BudgetMode.CROSSING:
            raw["budget_mode"] = config.budget_mode.value
        return raw

    def merge(self, mine: _Fields, theirs: _Fields, shadow: set[Rule]) -> dict[str, Any]:
        strict = BudgetMode.STRICT in (mine.budget_mode, theirs.budget_mode)
        return {
            **pick_stricter(self.rule, mine, theirs, "max_session_nano_usd", min, shadow),
            "budget_mode": BudgetMode.STRICT if strict else BudgetMode.CROSSING,
        }

    def from_wire(self, message: Any, check: WireChecker, prefix: str) -> dict[str, Any]:
        cap = optional_int_from_wire(message, "max_session_nano_usd", 0, MAX_SESSION_NANO_USD, check, prefix)
        mode = _MODE_BY_WIRE.get(message.budget_mode)
        if mode is None:
            check.bad(prefix + "budget_mode", f"unknown BudgetMode value {message.budget_mode}")
        return {"max_session_nano_usd": cap, "budget_mode": mode or BudgetMode.CROSSING}

    def to_wire(self, config: _Fields) -> dict[str, Any]:
        fields: dict[str, Any] = {"budget_mode": _WIRE_BY_MODE[config.budget_mode]}
        if config.max_session_nano_usd is not None:
            fields["max_session_nano_usd"] = config.max_session_nano_usd
        return fields

    def store_args(self, config: _Fields, call: CallFacts) -> dict[str, Any]:
        cap = config.max_session_nano_usd
        if cap is None:
            return {}
        return {
            "budget": BudgetCheck(cap, config.budget_mode is BudgetMode.STRICT, config.is_shadow(self.rule))
        }

    def block_reason(self, config: _Fields, view: StoreView) -> str:
        settled, reserved = view.spent_nano_usd, view.reserved_nano_usd
        spend = f"session spend {format_usd(settled + reserved)}"
        if reserved:
            spend += f" ({format_usd(settled)} settled + {format_usd(reserved)} reserved by calls in flight)"
        cap = f"max_session_usd {format_usd(config.max_session_nano_usd or 0)}"
        if config.budget_mode is BudgetMode.STRICT:
            reached = (
                f"{spend} plus this call's estimate {format_usd(view.estimate_nano_usd)} would exceed {cap}"
            )
            reached += " (strict mode)"
            settled_alone = "settled spend plus this estimate fits"
        else:
            reached = f"{spend} has reached {cap}"
            settled_alone = "settled spend alone is below the cap"
        # "Start a new session" only when the settled spend alone blocks: settles cannot help then.
        if not self.unblocks_on_settle(config, view):
            return f"{reached}; start a new session id"
        return f"{reached}; {settled_alone}, so waiting for the calls in flight to settle can lift this block"

    def unblocks_on_settle(self, config: _Fields, view: StoreView) -> bool:
        # Settles only replace reservations: they can lift the block only if the settled
        # spend alone (with this call's estimate, in strict mode) stays within the cap.
        cap = config.max_session_nano_usd or 0
        if not view.reserved_nano_usd:
            return False
        if config.budget_mode is BudgetMode.STRICT:
            return view.spent_nano_usd + view.estimate_nano_usd <= cap
        return view.spent_nano_usd < cap
