"""What one enforcement rule is made of, and the helpers its units share.

A rule unit holds everything about one rule: its config keys and their bounds, how a
client value and a server value merge (the stricter wins), its wire form, its form in
the console and its row in the docs, and either its stateless check (run before the
store) or the arguments it contributes to the one atomic store step, with the reason
text of its blocks. ``rules/__init__.py`` lists the units; decide, config parsing,
merging, validation, the wire mapping, the console form and the docs iterate that
table instead of naming rules one by one.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from spendgate_server.errors import FieldViolation, InvalidArgument
from spendgate_server.money import NANO_PER_USD, usd_to_nano
from spendgate_server.rule_codes import Rule

if TYPE_CHECKING:
    from spendgate_server.engine.pricing import PriceTable, Usage

__all__ = [
    "MAX_ESTIMATE_NANO_USD",
    "MAX_USD_NANO",
    "Bad",
    "CallFacts",
    "DocRow",
    "Draft",
    "Effect",
    "FormChoice",
    "FormInput",
    "IntegerRule",
    "RuleUnit",
    "Shadowed",
    "StatefulRule",
    "StatelessRule",
    "StoreView",
    "WireChecker",
    "optional_int_from_wire",
    "parse_integer",
    "parse_usd",
    "pick_stricter",
    "usage_estimate",
    "usd_text",
]

# The largest dollar amount a rule accepts: one million USD keeps sums exact in Lua doubles.
MAX_USD_NANO = 1_000_000 * NANO_PER_USD
# A priced max_usage (a large batch's worst case) can exceed any amount a rule accepts. It is
# held at one nano-USD above them: every strict budget and downgrade threshold still fires,
# and the store's sums stay exact.
MAX_ESTIMATE_NANO_USD = MAX_USD_NANO + 1

Bad = Callable[[str, str], None]
"""Records one bad field of a config: ``bad(key, description)``."""

_T = TypeVar("_T")


class Shadowed(Protocol):
    """What every unit asks of a config: whether a rule only reports.

    Each unit states the config fields it reads in a Protocol of its own, derived from
    this one, so a unit depends on no config record: ``EnforcementConfig``
    (engine/config.py) has every unit's fields and is what the engine passes.
    """

    def is_shadow(self, rule: Rule) -> bool:
        """Whether ``rule`` only reports instead of enforcing."""


class CallFacts(Protocol):
    """What a stateful rule reads of the call for its store arguments."""

    @property
    def fingerprint(self) -> bytes:
        """A hash of the canonical request."""

    @property
    def tool_call_count(self) -> int:
        """Tool results this request carries."""


class WireChecker(Protocol):
    """Collects the violations of a wire message (rpc/validation.py provides it)."""

    def integer(self, field: str, value: int, low: int, high: int) -> None:
        """Report ``field`` unless ``low <= value <= high``."""

    def model_name(self, field: str, value: str) -> None:
        """Report ``field`` unless ``value`` is a valid model name."""

    def bad(self, field: str, description: str) -> None:
        """Report ``field`` as bad."""


@dataclass(frozen=True, slots=True)
class FormInput:
    """One text input of the console's rules form.

    ``name`` is the user-facing config key path, dotted for a nested key
    (``model_downgrade.threshold_usd``), so parser errors land beside the input.
    """

    name: str
    label: str
    hint: str
    inputmode: str = "numeric"
    # "int": digits only, converted before parsing; "text": passed through as typed.
    kind: str = "int"


@dataclass(frozen=True, slots=True)
class FormChoice:
    """A select of the console's rules form: ``options`` are (value, label) pairs."""

    name: str
    label: str
    hint: str
    options: tuple[tuple[str, str], ...]
    default: str


@dataclass(frozen=True, slots=True)
class DocRow:
    """One row of the README's rules table."""

    key: str
    meaning: str
    state: str
    merge: str


class Effect(enum.Enum):
    """What a stateless rule does when it fires (and is enforced)."""

    BLOCK = "block"
    DOWNGRADE = "downgrade"


@dataclass(slots=True)
class Draft:
    """The call as the stateless checks see it; a downgrading rule changes model and estimate."""

    input_tokens: int
    max_output_tokens: int
    model: str
    estimate_nano_usd: int
    prices: PriceTable
    # DecideRequest.max_usage: when set, the estimate is its price on ``model`` (usage_estimate).
    max_usage: Usage | None = None


def usage_estimate(prices: PriceTable, model: str, usage: Usage) -> int:
    """A call's reservation from its ``max_usage``: the exact price of ``usage`` on ``model`` at
    ``usage.service_tier``, in nano-USD, at most :data:`MAX_ESTIMATE_NANO_USD`.

    Raises:
        InvalidArgument: on ``model`` (unknown under the reject policy), or on
            ``max_usage.counts`` when the counts contradict each other.
    """
    try:
        cost = prices.cost(model, usage)
    except InvalidArgument as exc:
        raise InvalidArgument(
            [
                FieldViolation("max_usage.counts" if v.field == "usage.counts" else v.field, v.description)
                for v in exc.violations
            ]
        ) from None
    return min(cost, MAX_ESTIMATE_NANO_USD)


@dataclass(frozen=True, slots=True)
class StoreView:
    """What the atomic step saw when a rule blocked: the inputs of a reason text."""

    spent_nano_usd: int
    reserved_nano_usd: int
    tool_calls: int
    # This request's tool calls and estimate.
    tool_call_count: int
    estimate_nano_usd: int


class RuleUnit(ABC):
    """One enforcement rule. Subclasses set the class attributes and implement the methods.

    The config methods return keyword arguments of ``EnforcementConfig``, so a unit may
    own more than one of its fields (the session budget owns the cap and the mode).
    ``config`` arguments are an ``EnforcementConfig``; each unit types them with its
    own Protocol of the fields it reads.
    """

    rule: ClassVar[Rule]
    # Other user-facing keys this unit owns besides ``rule.key`` (``budget_mode``).
    extra_keys: ClassVar[tuple[str, ...]] = ()
    # The client's exception for a block by this rule (spendgate_client), for the docs.
    client_error: ClassVar[str] = ""
    title: ClassVar[str]
    summary: ClassVar[str]
    form_inputs: ClassVar[tuple[FormInput, ...]]
    form_choice: ClassVar[FormChoice | None] = None
    # The form's message when only some inputs of one nested key are given.
    form_all_or_none: ClassVar[str] = "give all of these, or none"
    # (wire field path inside spendgate.v1.EnforcementConfig, the user-facing key path it sets).
    wire_fields: ClassVar[tuple[tuple[str, str], ...]]
    docs: ClassVar[tuple[DocRow, ...]]

    @property
    def key(self) -> str:
        """The rule's user-facing config key (also its name in shadow lists)."""
        return self.rule.key

    @property
    def config_keys(self) -> tuple[str, ...]:
        """Every user-facing config key this unit reads."""
        return (self.rule.key, *self.extra_keys)

    @abstractmethod
    def enabled(self, config: Any) -> bool:
        """Whether the rule is on in ``config``."""

    @abstractmethod
    def parse(self, raw: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        """The config fields from the user-facing form; report each bad key with ``bad``."""

    @abstractmethod
    def to_dict(self, config: Any) -> dict[str, Any]:
        """The user-facing form of this rule's fields (what ``parse`` reads back)."""

    @abstractmethod
    def merge(self, mine: Any, theirs: Any, shadow: set[Rule]) -> dict[str, Any]:
        """The stricter of two configs' values; add this rule to ``shadow`` when it stays shadowed."""

    @abstractmethod
    def from_wire(self, message: Any, check: WireChecker, prefix: str) -> dict[str, Any]:
        """The config fields of a spendgate.v1.EnforcementConfig, every bound checked."""

    @abstractmethod
    def to_wire(self, config: Any) -> dict[str, Any]:
        """Keyword arguments of spendgate.v1.EnforcementConfig for this rule's fields."""


class IntegerRule(RuleUnit):
    """A rule set by one optional integer key, ``rule.key``, between ``low`` and ``high``.

    The unit gives the bounds and which way is stricter; this class supplies parsing,
    the user-facing and wire forms and the merge, so the unit keeps only its check.
    Mix it in before ``StatelessRule`` or ``StatefulRule``.
    """

    low: ClassVar[int]
    high: ClassVar[int]
    # True: the lower value wins a merge (a cap); False: the higher one (a window).
    lower_is_stricter: ClassVar[bool]
    # The label of the key's one input in the console's rules form.
    form_label: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A concrete unit's one input and wire field follow from its key.
        if "rule" in cls.__dict__:
            key = cls.rule.key
            cls.form_inputs = (FormInput(key, cls.form_label, "Blank turns the rule off."),)
            cls.wire_fields = ((key, key),)

    def value(self, config: Any) -> int | None:
        """The rule's integer in ``config``; None when the rule is off."""
        value: int | None = getattr(config, self.key)
        return value

    def enabled(self, config: Any) -> bool:
        return self.value(config) is not None

    def parse(self, raw: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
        return {self.key: parse_integer(raw, self.key, self.low, self.high, bad)}

    def to_dict(self, config: Any) -> dict[str, Any]:
        value = self.value(config)
        return {} if value is None else {self.key: value}

    def merge(self, mine: Any, theirs: Any, shadow: set[Rule]) -> dict[str, Any]:
        tighter = min if self.lower_is_stricter else max
        return pick_stricter(self.rule, mine, theirs, self.key, tighter, shadow)

    def from_wire(self, message: Any, check: WireChecker, prefix: str) -> dict[str, Any]:
        return {self.key: optional_int_from_wire(message, self.key, self.low, self.high, check, prefix)}

    def to_wire(self, config: Any) -> dict[str, Any]:
        return self.to_dict(config)


class StatelessRule(RuleUnit):
    """A rule decided from the call alone, before the store is asked."""

    effect: ClassVar[Effect]

    @abstractmethod
    def check(self, config: Any, draft: Draft) -> str | None:
        """The reason text when the rule fires on ``draft``, else None. Changes nothing."""

    def apply(self, config: Any, draft: Draft) -> None:
        """Change ``draft`` for a rule that fired and is enforced (a downgrade); blocks do nothing."""
        return


class StatefulRule(RuleUnit):
    """A rule decided inside the one atomic store step."""

    @abstractmethod
    def store_args(self, config: Any, call: CallFacts) -> dict[str, Any]:
        """Keyword arguments this rule contributes to the store's ReserveRequest ({} when off)."""

    @abstractmethod
    def block_reason(self, config: Any, view: StoreView) -> str:
        """Why the store blocked the call, in words the caller can act on."""

    def unblocks_on_settle(self, config: Any, view: StoreView) -> bool:
        """Whether the block can lift once the session's calls in flight settle (no new session)."""
        return False


def pick_stricter(
    rule: Rule,
    mine: Any,
    theirs: Any,
    field: str,
    tighter: Callable[[_T, _T], _T],
    shadow: set[Rule],
) -> dict[str, Any]:
    """Merge one field of two configs: the stricter value, and an enforced side beats a shadow one.

    A rule enforced on one side and shadowed on the other stays enforced with the
    enforcing side's value: a shadow setting can never loosen an enforced rule. The
    rule stays in ``shadow`` only when every side that sets it shadows it.
    """
    a, b = getattr(mine, field), getattr(theirs, field)
    if a is None or b is None:
        chosen, side = (b, theirs) if a is None else (a, mine)
        if chosen is not None and side.is_shadow(rule):
            shadow.add(rule)
        return {field: chosen}
    a_shadow, b_shadow = mine.is_shadow(rule), theirs.is_shadow(rule)
    if a_shadow == b_shadow:
        if a_shadow:
            shadow.add(rule)
        return {field: tighter(a, b)}
    return {field: b if a_shadow else a}


def parse_integer(raw: Mapping[str, Any], key: str, low: int, high: int, bad: Bad) -> int | None:
    """An integer key between ``low`` and ``high``; None when absent or bad."""
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        bad(key, f"must be an integer, got {_described(value)}")
        return None
    if not low <= value <= high:
        bad(key, f"must be between {low} and {high}, got {value}")
        return None
    return value


def _described(value: Any) -> str:
    """A wrong value as a refusal names it: text quoted (cut to 40 characters), else its type."""
    if not isinstance(value, str):
        return type(value).__name__
    shown = value if len(value) <= 40 else value[:40] + "…"
    try:
        float(value)
    except ValueError:
        return f"the text {shown!r}"
    # YAML 1.1 reads 1e20 (no dot, no sign on the exponent) as a string, not a number.
    return f"the text {shown!r} (write the number in digits, not as text or in exponent form)"


def parse_usd(key: str, value: Any, bad: Bad) -> int | None:
    """A dollar amount (number or decimal string) as nano-USD, 0 to one million dollars."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        bad(key, f"must be a number of US dollars, got {type(value).__name__}")
        return None
    bound = f"must be between 0 and {MAX_USD_NANO // NANO_PER_USD}"
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
        nano = -1  # far out of range (1e999999): refused before any arithmetic
    if not 0 <= nano <= MAX_USD_NANO:
        # A huge amount is not echoed whole: it may be thousands of digits.
        bad(key, f"{bound}, got {value}" if len(str(value)) <= 32 else bound)
        return None
    return nano


def usd_text(nano_usd: int) -> str:
    """Exact decimal dollars (``"0.25"``): what ``parse_usd`` reads back unchanged."""
    return format(Decimal(nano_usd).scaleb(-9).normalize(), "f")


def optional_int_from_wire(
    message: Any, field: str, low: int, high: int, check: WireChecker, prefix: str
) -> int | None:
    """An ``optional int64`` wire field: None when unset, else checked against its bounds."""
    if not message.HasField(field):
        return None
    value: int = getattr(message, field)
    check.integer(prefix + field, value, low, high)
    return value
