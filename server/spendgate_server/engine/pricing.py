"""Model prices as integers, compiled from the genai-prices catalogue.

A model name resolves once (operator override, then the catalogue by the rules in
:mod:`~spendgate_server.engine.price_catalogue`, then the unknown-model policy) to a
:class:`ModelPricing`: one integer :class:`PriceCard` per service tier the catalogue or
the operator prices. The Decide hot path is a dict lookup and :meth:`ModelPricing.estimate`
(two multiplies, one ceiling division); a Settle prices every dimension the provider
billed (:meth:`PriceTable.cost`).

Never undercount: a model, a service tier or a usage unit with no known price is
priced at the highest price any Anthropic, OpenAI or Google model has for each
dimension (:func:`~spendgate_server.engine.price_catalogue.max_prices`), and reported
through the ``on_unpriced`` hook.
"""

from __future__ import annotations

import enum
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from spendgate_server.engine.price_catalogue import (
    STANDARD_TIERS,
    CatalogueEntry,
    close_prices,
    max_prices,
    resolve,
    tier_prices,
)
from spendgate_server.engine.price_units import (
    REQUESTS_KEY,
    PriceCard,
    PriceValue,
    implied_keys,
    unit_of_price_key,
)
from spendgate_server.errors import ConfigError, FieldViolation, InvalidArgument
from spendgate_server.money import NANO_PER_USD

__all__ = [
    "LEGACY_PRICE_KEYS",
    "ModelPricing",
    "PriceOverride",
    "PriceTable",
    "Quote",
    "RateCard",
    "UnknownModelPolicy",
    "UnpricedHook",
    "Usage",
    "parse_price_overrides",
]

# Distinct model names resolved lazily; bounded so arbitrary names cannot grow memory.
MAX_CACHED_MODELS = 4096
# Distinct (kind, model, name) reported as unpriced; past this they are still counted, no longer logged.
MAX_REPORTED_NAMES = 4096

LEGACY_PRICE_KEYS: Mapping[str, str] = {
    "input_usd_per_mtok": "input_mtok",
    "output_usd_per_mtok": "output_mtok",
    "cache_read_usd_per_mtok": "cache_read_mtok",
    "cache_write_usd_per_mtok": "cache_write_mtok",
}
"""The override keys of earlier releases, still accepted, and the genai-prices price keys they mean."""

_TIER_NAME = re.compile(r"[a-z0-9._-]{1,32}")

UnpricedHook = Callable[[str, str, str, bool], None]
"""Called as ``hook(kind, model, name, first)`` each time something with no known price is
priced at the maximum: ``kind`` is ``"model"``, ``"tier"`` or ``"unit"``, ``name`` the model,
tier or usage key, ``first`` True the first time this (kind, model, name) is seen."""


@dataclass(frozen=True, slots=True)
class Usage:
    """What a provider billed for one call.

    Either ``counts`` (genai-prices usage keys to counts: the whole usage, each count
    including the counts of the keys below it, so ``input_tokens`` counts every input
    token, cached or not) or the four token fields of earlier clients, where
    ``input_tokens`` excludes cache reads and writes. Given ``counts``, the four
    fields are derived from it (for the journal); given only the four fields,
    ``counts`` is derived from them.

    Attributes:
        service_tier: the tier that ran, as the provider reported it; lowercased. Empty,
            ``standard`` and ``default`` mean the standard prices.
        implied: keys the counts imply without reporting (see
            :func:`~spendgate_server.engine.price_units.implied_keys`).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)
    service_tier: str = ""
    implied: frozenset[str] = field(default=frozenset(), init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.counts:
            counts = dict(self.counts)
            read, write = counts.get("cache_read_tokens", 0), counts.get("cache_write_tokens", 0)
            set_(self, "input_tokens", max(0, counts.get("input_tokens", 0) - read - write))
            set_(self, "output_tokens", counts.get("output_tokens", 0))
            set_(self, "cache_read_input_tokens", read)
            set_(self, "cache_write_input_tokens", write)
        else:
            counts = {
                "input_tokens": self.input_tokens
                + self.cache_read_input_tokens
                + self.cache_write_input_tokens,
                "output_tokens": self.output_tokens,
            }
            if self.cache_read_input_tokens:
                counts["cache_read_tokens"] = self.cache_read_input_tokens
            if self.cache_write_input_tokens:
                counts["cache_write_tokens"] = self.cache_write_input_tokens
        set_(self, "counts", counts)
        set_(self, "service_tier", self.service_tier.strip().lower())
        set_(self, "implied", implied_keys(counts))

    @property
    def prompt_tokens(self) -> int:
        """All input tokens, cached or not: what selects a long-context tier."""
        return self.counts.get("input_tokens", 0)


@dataclass(frozen=True, slots=True)
class RateCard:
    """Four token prices in nano-USD per million tokens: the simplest price override."""

    input: int
    output: int
    cache_read: int
    cache_write: int

    def prices(self) -> dict[str, PriceValue]:
        """The same prices as genai-prices price keys, in USD per million tokens."""
        usd = (
            Decimal(v) / NANO_PER_USD for v in (self.input, self.output, self.cache_read, self.cache_write)
        )
        return dict(
            zip(("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok"), usd, strict=True)
        )


class ModelPricing:
    """A model's compiled prices: one card per service tier, ``""`` the standard one.

    Attributes:
        name: the catalogue model id, override or unknown name it resolved to.
        cards: tier name to card.
        known: False for the never-undercount price of an unknown model.
        entry: ``provider/model id`` of the catalogue entry, empty when there is none.
        rule: how the name resolved (``catalogue``, ``bedrock``, ``router-prefix``,
            ``vertex``, ``override``, ``unknown``, ...).
    """

    __slots__ = ("_den", "_rates", "_starts", "cards", "entry", "known", "name", "rule")

    def __init__(
        self,
        name: str,
        cards: RateCard | PriceCard | Mapping[str, PriceCard],
        *,
        known: bool = True,
        entry: str = "",
        rule: str = "override",
        estimate_card: PriceCard | None = None,
    ) -> None:
        """``estimate_card`` prices the Decide estimate when the standard card has no token prices."""
        if isinstance(cards, RateCard):
            cards = {"": PriceCard.compile(cards.prices())}
        elif isinstance(cards, PriceCard):
            cards = {"": cards}
        self.name = name
        self.cards: Mapping[str, PriceCard] = dict(cards)
        self.known = known
        self.entry = entry
        self.rule = rule
        card = self.cards[""]
        if card.input_index < 0 or card.output_index < 0:
            if estimate_card is None:
                raise ValueError(f"{name}: no input and output token prices to estimate with")
            card = estimate_card
        self._starts = card.starts
        self._rates = tuple((w[card.input_index], w[card.output_index]) for w in card.weights)
        self._den = card.denominator

    @property
    def tiers(self) -> tuple[str, ...]:
        """The service tiers with a price, standard (``""``) first."""
        return tuple(sorted(self.cards))

    def card(self, tier: str) -> PriceCard | None:
        """The card of service tier ``tier`` (lowercase); None when the tier has no known price."""
        card = self.cards.get(tier)
        if card is None and tier in STANDARD_TIERS:
            return self.cards[""]
        return card

    def estimate(self, input_tokens: int, max_output_tokens: int) -> int:
        """Worst-case cost of a call in nano-USD at standard prices: every input token uncached,
        every output token used."""
        rates = self._rates
        w_in, w_out = rates[0]
        if self._starts:
            band = 0
            for start in self._starts:
                if input_tokens > start:
                    band += 1
            w_in, w_out = rates[band]
        return -(-(input_tokens * w_in + max_output_tokens * w_out) // self._den)


class UnknownModelPolicy(enum.Enum):
    """What to do with a model genai-prices does not know and no override names."""

    # Price it at the never-undercount maximum: budgets still hold, and the operator
    # sees a warning and adds an override.
    MAX = "max"
    # Refuse the call with INVALID_ARGUMENT naming the model.
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """An operator's prices for one model (settings ``prices:``), in genai-prices price keys.

    Attributes:
        prices: price key (``input_mtok``, ``cache_write_1h_mtok``, ``web_searches_kcount``,
            ...) to USD per that key's unit. They replace the catalogue's, in every tier.
        tiers: tier name to prices that apply on top in that tier only.
    """

    prices: Mapping[str, Decimal]
    tiers: Mapping[str, Mapping[str, Decimal]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Quote:
    """How a usage was priced, for people (``spendgate price``).

    Attributes:
        pricing: what the model name resolved to.
        tier: the tier asked for; ``tier_known`` False when it had no price and the maximum applied.
        card: the card that priced the usage.
        lines: (usage key, count charged at its price, nano-USD rounded up) per priced key.
        unpriced: usage keys with no price on the card, charged at the maximum.
        cost_nano_usd: what a Settle counts.
    """

    pricing: ModelPricing
    tier: str
    tier_known: bool
    card: PriceCard
    lines: tuple[tuple[str, int, int], ...]
    unpriced: tuple[str, ...]
    cost_nano_usd: int


# Cards compiled from the catalogue, shared by every table, keyed by (provider, model, day).
_catalogue_cards: dict[tuple[str, str, date], dict[str, PriceCard]] = {}
_max_cards: dict[date, PriceCard] = {}


def _max_card(now: datetime) -> PriceCard:
    card = _max_cards.get(now.date())
    if card is None:
        card = _max_cards[now.date()] = PriceCard.compile(max_prices(now))
    return card


class PriceTable:
    """Resolves a model name to integer pricing: overrides, then the catalogue, then the unknown policy."""

    def __init__(
        self,
        overrides: Mapping[str, PriceOverride | ModelPricing] | None = None,
        unknown: UnknownModelPolicy = UnknownModelPolicy.MAX,
        on_unpriced: UnpricedHook | None = None,
        *,
        now: datetime | None = None,
    ) -> None:
        """Compile the never-undercount card and every override.

        Args:
            overrides: model name (or catalogue model id) to prices.
            unknown: the unknown-model policy.
            on_unpriced: see :data:`UnpricedHook`.
            now: the time whose catalogue prices apply (default: now).

        Raises:
            ConfigError: an override names a model the catalogue lacks without both
                ``input_mtok`` and ``output_mtok`` (a Decide estimate needs them).
        """
        self._now = now or datetime.now(UTC)
        self._unknown = unknown
        self._hook = on_unpriced
        self._lock = threading.Lock()
        self._reported: set[tuple[str, str, str]] = set()
        self._max = _max_card(self._now)
        self._overrides = {name.lower(): o for name, o in (overrides or {}).items()}
        self._table: dict[str, ModelPricing] = {}
        for name, override in self._overrides.items():
            self._table[name] = self._override(name, resolve(name), override)
        self._precompiled = len(self._table)

    def __len__(self) -> int:
        return len(self._table)

    @property
    def max_card(self) -> PriceCard:
        """The never-undercount card: what a model, tier or unit with no known price is charged."""
        return self._max

    def lookup(self, model: str, field: str = "model") -> ModelPricing:
        """Pricing of ``model``.

        Raises:
            InvalidArgument: the model is unknown and the policy is REJECT (names ``field``).
        """
        key = model.lower()
        pricing = self._table.get(key)
        if pricing is None:
            pricing = self._resolve(key)
        if not pricing.known:
            if self._unknown is UnknownModelPolicy.REJECT:
                raise InvalidArgument(
                    [FieldViolation(field, f"no price is known for model {model!r}; add a price override")]
                )
            self._report("model", key, key)
        return pricing

    def cost(self, model: str, usage: Usage) -> int:
        """What the provider bills for ``usage`` on ``model``, in nano-USD, rounded up.

        Raises:
            InvalidArgument: the model is unknown under the REJECT policy (``model``), or
                the counts contradict each other (``usage.counts``).
        """
        return self._price(self.lookup(model), usage)[0]

    def quote(self, model: str, usage: Usage) -> Quote:
        """:meth:`cost`, with how it was reached.

        Raises:
            InvalidArgument: as :meth:`cost`.
        """
        pricing = self.lookup(model)
        cost, card, tier_known, unpriced = self._price(pricing, usage)
        lines = tuple(line for line in card.leaves(usage.counts) if line[1] or line[0] == REQUESTS_KEY)
        return Quote(pricing, usage.service_tier, tier_known, card, lines, unpriced, cost)

    def _price(self, pricing: ModelPricing, usage: Usage) -> tuple[int, PriceCard, bool, tuple[str, ...]]:
        counts = usage.counts
        tier_known = True
        if pricing.known:
            card = pricing.card(usage.service_tier)
            if card is None:
                tier_known = False
                self._report("tier", pricing.name, usage.service_tier)
                card = self._max
        else:
            card = pricing.cards[""]
        cost = card.cost(counts, usage.implied)
        unpriced: tuple[str, ...] = ()
        if not card.covered.issuperset(counts):
            unpriced = tuple(k for k, v in counts.items() if v > 0 and k not in card.covered)
        if unpriced:
            # Counts the card has no price for (nor for any total they belong to): the maximum.
            extra = {k: counts[k] for k in unpriced}
            cost += self._max.cost(extra, implied_keys(extra))
            for key in unpriced:
                self._report("unit", pricing.name, key)
        return cost, card, tier_known, unpriced

    def _report(self, kind: str, model: str, name: str) -> None:
        if self._hook is None:
            return
        key = (kind, model, name)
        first = key not in self._reported and len(self._reported) < MAX_REPORTED_NAMES
        if first:
            with self._lock:
                self._reported.add(key)
        self._hook(kind, model, name, first)

    def _resolve(self, key: str) -> ModelPricing:
        entry = resolve(key)
        override = self._overrides.get(key)
        if override is None and entry is not None:
            override = self._overrides.get(entry.model.id.lower())
        if override is not None:
            pricing = self._override(key, entry, override)
        elif entry is not None:
            pricing = self._catalogue(entry)
        else:
            pricing = ModelPricing(key, self._max, known=False, rule="unknown")
        with self._lock:
            if len(self._table) - self._precompiled < MAX_CACHED_MODELS:
                self._table[key] = pricing
        return pricing

    def _catalogue(self, entry: CatalogueEntry) -> ModelPricing:
        cache_key = (entry.provider.id, entry.model.id, self._now.date())
        cards = _catalogue_cards.get(cache_key)
        if cards is None:
            cards = {t: PriceCard.compile(p) for t, p in tier_prices(entry.model, self._now).items()}
            if len(_catalogue_cards) < MAX_CACHED_MODELS:
                _catalogue_cards[cache_key] = cards
        return ModelPricing(entry.model.id, cards, entry=entry.key, rule=entry.rule, estimate_card=self._max)

    def _override(
        self, name: str, entry: CatalogueEntry | None, override: PriceOverride | ModelPricing
    ) -> ModelPricing:
        if isinstance(override, ModelPricing):
            return override
        if entry is None and not {"input_mtok", "output_mtok"} <= set(override.prices):
            raise ConfigError(
                f"prices.{name}: the genai-prices catalogue has no such model, so its prices need "
                "input_mtok and output_mtok (USD per million tokens)"
            )
        catalogue = tier_prices(entry.model, self._now) if entry is not None else {"": {}}
        merged: dict[str, dict[str, PriceValue]] = {
            tier: {**prices, **override.prices} for tier, prices in catalogue.items()
        }
        for tier, prices in override.tiers.items():
            merged[tier] = {**merged.get(tier, merged[""]), **prices}
        cards = {tier: PriceCard.compile(close_prices(prices)) for tier, prices in merged.items()}
        return ModelPricing(
            entry.model.id if entry is not None else name,
            cards,
            entry=entry.key if entry is not None else "",
            rule="override",
            estimate_card=self._max,
        )


def _usd(where: str, value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ConfigError(f"{where}: must be a number of USD, got {value!r}")
    try:
        usd = Decimal(str(value))
    except (InvalidOperation, ValueError) as exc:
        raise ConfigError(f"{where}: must be a number of USD, got {value!r}") from exc
    if not usd.is_finite() or usd < 0:
        raise ConfigError(f"{where}: must be a finite, non-negative number of USD, got {value!r}")
    return usd


def _prices(where: str, raw: Mapping[Any, Any]) -> dict[str, Decimal]:
    prices: dict[str, Decimal] = {}
    for key, value in raw.items():
        price_key = LEGACY_PRICE_KEYS.get(str(key), str(key))
        if unit_of_price_key(price_key) is None:
            raise ConfigError(
                f"{where}.{key}: not a genai-prices price key; use e.g. input_mtok, output_mtok, "
                "cache_read_mtok, cache_write_mtok, cache_write_1h_mtok, input_audio_mtok, "
                "output_audio_mtok, web_searches_kcount, input_audio_hours, input_mchars, or tiers"
            )
        if price_key in prices:
            raise ConfigError(f"{where}.{key}: {price_key} is given twice")
        prices[price_key] = _usd(f"{where}.{key}", value)
    return prices


def parse_price_overrides(raw: Mapping[Any, Any]) -> dict[str, PriceOverride]:
    """Parse settings ``prices:``.

    Shape: ``{model: {<price key>: usd, ..., tiers: {<tier>: {<price key>: usd, ...}}}}``,
    where a price key is genai-prices' (``input_mtok``, ``cache_write_1h_mtok``,
    ``web_searches_kcount``, ...; :data:`LEGACY_PRICE_KEYS` too), in USD per its unit.

    Raises:
        ConfigError: naming the model and key that are wrong.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError("prices: must be a mapping of model name to prices")
    table: dict[str, PriceOverride] = {}
    for model, spec in raw.items():
        where = f"prices.{model}"
        if not isinstance(spec, Mapping) or not spec:
            raise ConfigError(
                f"{where}: must map genai-prices price keys (input_mtok, output_mtok, ...) to USD, "
                "and may have tiers"
            )
        tiers_raw = spec.get("tiers", {})
        if not isinstance(tiers_raw, Mapping):
            raise ConfigError(f"{where}.tiers: must map tier names (priority, flex, batch, ...) to prices")
        tiers: dict[str, dict[str, Decimal]] = {}
        for tier, prices in tiers_raw.items():
            name = str(tier).lower()
            if not _TIER_NAME.fullmatch(name) or name in STANDARD_TIERS:
                raise ConfigError(
                    f"{where}.tiers.{tier}: a tier name is 1-32 characters of [a-z0-9._-], not "
                    "standard or default (the model's own prices are the standard tier's)"
                )
            if not isinstance(prices, Mapping) or not prices:
                raise ConfigError(f"{where}.tiers.{tier}: must map price keys to USD")
            tiers[name] = _prices(f"{where}.tiers.{tier}", prices)
        table[str(model)] = PriceOverride(
            _prices(where, {k: v for k, v in spec.items() if k != "tiers"}), tiers
        )
    return table
