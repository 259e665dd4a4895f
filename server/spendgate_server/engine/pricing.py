"""Model prices as integers, compiled from the genai-prices database.

Rates are nano-USD per million tokens, so every price genai-prices lists (down to
$0.001/MTok) is an exact integer and a call's cost is one multiply and one
ceiling division. The hot path is a dict lookup; genai-prices is consulted only
the first time a model name is seen.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from spendgate_server.errors import ConfigError, FieldViolation, InvalidArgument
from spendgate_server.money import usd_to_nano

__all__ = ["ModelPricing", "PriceTable", "RateCard", "UnknownModelPolicy", "Usage"]

TOKENS_PER_MTOK = 1_000_000
# Providers whose whole catalogue is compiled at start-up; other names resolve on first use.
PRECOMPILED_PROVIDERS = ("anthropic", "openai", "google")
# Distinct model names resolved lazily; bounded so arbitrary names cannot grow memory.
MAX_CACHED_MODELS = 4096


def _cost(tokens: int, nano_per_mtok: int) -> int:
    return -(-tokens * nano_per_mtok // TOKENS_PER_MTOK)  # ceiling: never under-count


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a provider billed. ``input_tokens`` excludes cache reads and writes."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_write_input_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        """All input tokens, cached or not: what selects a long-context tier."""
        return self.input_tokens + self.cache_read_input_tokens + self.cache_write_input_tokens


@dataclass(frozen=True, slots=True)
class RateCard:
    """Prices of one tier, in nano-USD per million tokens."""

    input: int
    output: int
    cache_read: int
    cache_write: int

    def cost(self, usage: Usage) -> int:
        """Cost of ``usage`` in nano-USD, each part rounded up."""
        return (
            _cost(usage.input_tokens, self.input)
            + _cost(usage.output_tokens, self.output)
            + _cost(usage.cache_read_input_tokens, self.cache_read)
            + _cost(usage.cache_write_input_tokens, self.cache_write)
        )


@dataclass(frozen=True, slots=True)
class ModelPricing:
    """A model's rates: a base card and long-context tiers keyed by prompt size."""

    name: str
    base: RateCard
    # (first prompt size the tier applies to, card), ascending. Like the providers,
    # a prompt past a threshold pays that tier's rate on all its tokens.
    tiers: tuple[tuple[int, RateCard], ...] = ()
    known: bool = True

    def card_for(self, prompt_tokens: int) -> RateCard:
        """The rate card that applies to a prompt of this size."""
        card = self.base
        for start, tier in self.tiers:
            if prompt_tokens > start:
                card = tier
        return card

    def estimate(self, input_tokens: int, max_output_tokens: int) -> int:
        """Worst-case cost of a call: every input token uncached, every output token used."""
        card = self.card_for(input_tokens)
        return _cost(input_tokens, card.input) + _cost(max_output_tokens, card.output)

    def actual(self, usage: Usage) -> int:
        """What the provider bills for ``usage``."""
        return self.card_for(usage.prompt_tokens).cost(usage)


class UnknownModelPolicy(enum.Enum):
    """What to do with a model genai-prices does not know and no override names."""

    # Price it like the most expensive model of the precompiled providers: budgets
    # still hold, and the operator sees a warning and adds an override.
    MAX = "max"
    # Refuse the call with INVALID_ARGUMENT naming the model.
    REJECT = "reject"


def _nano_per_mtok(value: Any) -> int:
    return usd_to_nano(Decimal(value))


def _compile(name: str, prices: Any) -> ModelPricing | None:
    """Turn a genai-prices ModelPrice into integer rate cards; None when it has no token prices."""
    fields = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")
    raw = {f: getattr(prices, f, None) for f in fields}
    if raw["input_mtok"] is None or raw["output_mtok"] is None:
        return None
    # A missing cache price is charged as plain input: over-, never under-counting.
    raw["cache_read_mtok"] = raw["cache_read_mtok"] or raw["input_mtok"]
    raw["cache_write_mtok"] = raw["cache_write_mtok"] or raw["input_mtok"]

    def at(value: Any, prompt_tokens: int) -> int:
        tiers = getattr(value, "tiers", None)
        if tiers is None:
            return _nano_per_mtok(value)
        price = value.base
        for tier in tiers:
            if prompt_tokens > tier.start:
                price = tier.price
        return _nano_per_mtok(price)

    def card(prompt_tokens: int) -> RateCard:
        return RateCard(*(at(raw[f], prompt_tokens) for f in fields))

    starts = sorted({t.start for v in raw.values() for t in getattr(v, "tiers", None) or ()})
    return ModelPricing(name, card(0), tuple((s, card(s + 1)) for s in starts))


class PriceTable:
    """Resolves a model name to integer pricing: overrides, then genai-prices, then the unknown policy."""

    def __init__(
        self,
        overrides: Mapping[str, ModelPricing] | None = None,
        unknown: UnknownModelPolicy = UnknownModelPolicy.MAX,
        on_unknown: Callable[[str], None] | None = None,
    ) -> None:
        from genai_prices import data_snapshot  # heavy import, kept off module import

        self._snapshot = data_snapshot.get_snapshot()
        self._now = datetime.now(UTC)
        self._unknown = unknown
        self._on_unknown = on_unknown
        self._lock = threading.Lock()
        self._table: dict[str, ModelPricing] = {}
        for provider in self._snapshot.providers:
            if provider.id in PRECOMPILED_PROVIDERS:
                for model in provider.models:
                    pricing = _compile(model.id, model.get_prices(self._now))
                    if pricing is not None:
                        self._table.setdefault(model.id, pricing)
        self._most_expensive = max(self._table.values(), key=lambda p: (p.base.output, p.base.input))
        self._table.update({name.lower(): p for name, p in (overrides or {}).items()})
        self._precompiled = len(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def lookup(self, model: str, field: str = "model") -> ModelPricing:
        """Pricing of ``model``.

        Raises:
            InvalidArgument: the model is unknown and the policy is REJECT (names ``field``).
        """
        key = model.lower()
        pricing = self._table.get(key)
        if pricing is None:
            pricing = self._resolve(key)
        if not pricing.known and self._unknown is UnknownModelPolicy.REJECT:
            raise InvalidArgument(
                [FieldViolation(field, f"no price is known for model {model!r}; add a price override")]
            )
        return pricing

    def _resolve(self, key: str) -> ModelPricing:
        try:
            _, info = self._snapshot.find_provider_model(key, None, None, None)
            pricing = _compile(info.id, info.get_prices(self._now))
        except LookupError:
            pricing = None
        if pricing is None:
            pricing = ModelPricing(key, self._most_expensive.base, self._most_expensive.tiers, False)
            if self._on_unknown is not None:
                self._on_unknown(key)
        with self._lock:
            if len(self._table) - self._precompiled < MAX_CACHED_MODELS:
                self._table[key] = pricing
        return pricing


def parse_price_overrides(raw: Mapping[str, Any]) -> dict[str, ModelPricing]:
    """Parse ``{model: {input_usd_per_mtok, output_usd_per_mtok, [cache_read_…, cache_write_…]}}``.

    Raises:
        ConfigError: naming the model and key that are wrong.
    """
    required = ("input_usd_per_mtok", "output_usd_per_mtok")
    optional = ("cache_read_usd_per_mtok", "cache_write_usd_per_mtok")
    table: dict[str, ModelPricing] = {}
    for model, spec in raw.items():
        if not isinstance(spec, Mapping) or not set(required) <= set(spec) <= set(required + optional):
            raise ConfigError(
                f"prices.{model}: needs {', '.join(required)} and may have {', '.join(optional)}"
            )
        try:
            rates = {k: _nano_per_mtok(str(v)) for k, v in spec.items()}
        except (ArithmeticError, ValueError) as exc:
            raise ConfigError(f"prices.{model}: every price must be a number of USD") from exc
        if any(v < 0 for v in rates.values()):
            raise ConfigError(f"prices.{model}: prices cannot be negative")
        base = RateCard(
            rates["input_usd_per_mtok"],
            rates["output_usd_per_mtok"],
            rates.get("cache_read_usd_per_mtok", rates["input_usd_per_mtok"]),
            rates.get("cache_write_usd_per_mtok", rates["input_usd_per_mtok"]),
        )
        table[str(model)] = ModelPricing(str(model), base)
    return table
