"""genai-prices' unit registry, and price cards compiled from it into integer arithmetic.

A usage is a mapping from genai-prices usage key to count. The keys nest: a key's
count includes the counts of every key below it (``input_tokens`` counts all input,
cached or not, of every modality; ``cache_write_tokens`` includes
``cache_write_1h_tokens``). A model prices some of these keys; each priced key is
charged for the part of its count that no more specific priced key claims (its
*leaf*), exactly as ``genai_prices.calc_price`` does.

A :class:`PriceCard` holds one model's prices in one service tier as integers over a
common denominator, so a cost is a few multiplies and one ceiling division: the
exact cost rounded up to the nano-USD, never under it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from itertools import combinations

from genai_prices.data_units import unit_data
from genai_prices.types import TieredPrices
from genai_prices.units import UnitDef, UnitRegistry

from spendgate_server.errors import FieldViolation, InvalidArgument
from spendgate_server.money import NANO_PER_USD

__all__ = [
    "ANCESTORS",
    "JOINS",
    "REGISTRY",
    "REQUESTS_KEY",
    "USAGE_KEYS",
    "PriceCard",
    "PriceValue",
    "flat_max",
    "implied_keys",
    "unit_of_price_key",
]

PriceValue = Decimal | TieredPrices
"""A genai-prices price: USD per the unit's ``per`` (MTok, K requests, hour), maybe tiered by prompt size."""

REGISTRY = UnitRegistry(unit_data)
"""genai-prices' unit registry: every usage key, its price key, its ``per`` and its dimensions."""

REQUESTS_KEY = "requests"
"""The per-request fee unit: one per call unless reported (a DALL·E call bills one per image)."""

USAGE_KEYS: frozenset[str] = frozenset(REGISTRY.units)
"""Every usage key a Usage may report (``requests`` included: absent, it counts as one)."""

ANCESTORS: Mapping[str, frozenset[str]] = {k: REGISTRY.ancestor_usage_keys(k) for k in REGISTRY.units}
"""For each usage key, the keys whose counts include it (``input_tokens`` ⊇ ``cache_read_tokens``)."""


def _nested(a: UnitDef, b: UnitDef) -> bool:
    return a.dimensions.items() <= b.dimensions.items() or b.dimensions.items() <= a.dimensions.items()


# For each pair of overlapping usage keys neither of which includes the other (cached and
# audio, say), the registered key counting their overlap (cached audio).
JOINS: Mapping[frozenset[str], str] = {
    frozenset((a.usage_key, b.usage_key)): join.usage_key
    for a, b in combinations(REGISTRY.units.values(), 2)
    if a.is_compatible_with(b) and not _nested(a, b) and (join := REGISTRY.find_join(a, b)) is not None
}


def unit_of_price_key(price_key: str) -> UnitDef | None:
    """The registered unit a genai-prices price key prices, or None for a key the registry lacks."""
    try:
        return REGISTRY.unit_for_price_key(price_key)
    except KeyError:
        return None


def implied_keys(counts: Mapping[str, int]) -> frozenset[str]:
    """Keys a usage implies but does not report: genai-prices refuses to guess their counts.

    A key is implied when a key it includes is reported with a positive count
    (``cache_write_1h_tokens`` implies ``cache_write_tokens``), or when two reported keys
    overlap in it (cached tokens and audio tokens imply cached audio tokens). Pricing
    such a usage on a card that prices an implied key is refused.
    """
    positive = frozenset(k for k, v in counts.items() if v > 0)
    implied = _implied_by.get(positive)
    if implied is None:
        found: set[str] = set()
        for key in positive:
            found |= ANCESTORS[key]
        for pair in combinations(positive, 2):
            join = JOINS.get(frozenset(pair))
            if join is not None:
                found.add(join)
        implied = frozenset(found)
        if len(_implied_by) < _MAX_SHAPES:
            _implied_by[positive] = implied
    return implied.difference(counts) if implied else implied


# Usages come in few shapes (the same keys call after call): what each shape implies is kept.
_MAX_SHAPES = 4096
_implied_by: dict[frozenset[str], frozenset[str]] = {}


def flat_max(value: PriceValue) -> Decimal:
    """The highest rate a price can charge: its base, or its highest long-context tier."""
    if isinstance(value, TieredPrices):
        return max([value.base, *(t.price for t in value.tiers)])
    return value


def _at(value: PriceValue, prompt_tokens: int) -> Decimal:
    """The rate of ``value`` for a prompt of this many input tokens (a tier applies above its start)."""
    if not isinstance(value, TieredPrices):
        return value
    rate = value.base
    for tier in value.tiers:
        if prompt_tokens > tier.start:
            rate = tier.price
    return rate


@dataclass(frozen=True, slots=True)
class PriceCard:
    """One model's prices in one service tier, compiled to integers.

    ``weights[band][i]`` is the price of one unit of ``keys[i]`` in nano-USD times
    ``denominator``; ``band`` is the number of long-context thresholds (``starts``)
    the prompt's input tokens exceed. ``keys`` run from the most specific to the
    least, and ``inner[i]`` lists the priced keys inside ``keys[i]``, whose leaves
    are taken out of its count.
    """

    prices: Mapping[str, PriceValue]
    keys: tuple[str, ...]
    inner: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]
    weights: tuple[tuple[int, ...], ...]
    request_fee: tuple[int, ...]
    denominator: int
    # Usage keys this card charges for, itself or through a key that includes them.
    covered: frozenset[str]
    # Index of input_tokens / output_tokens in keys, -1 when the card does not price them.
    input_index: int
    output_index: int

    @classmethod
    def compile(cls, prices: Mapping[str, PriceValue]) -> PriceCard:
        """Compile genai-prices price keys (``input_mtok``, ``web_searches_kcount``, ...) to a card.

        Price keys the registry does not know are ignored, as genai-prices ignores them.
        """
        units = {u.usage_key: (u, v) for k, v in prices.items() if (u := unit_of_price_key(k)) is not None}
        fee = units.pop(REQUESTS_KEY, None)
        keys = tuple(sorted(units, key=lambda k: (-len(units[k][0].dimensions), k)))
        inner = tuple(
            tuple(j for j, other in enumerate(keys) if j < i and key in ANCESTORS[other])
            for i, key in enumerate(keys)
        )
        priced = [units[k] for k in keys] + ([fee] if fee is not None else [])
        starts = tuple(sorted({t.start for _, v in priced if isinstance(v, TieredPrices) for t in v.tiers}))
        # The prompt size that selects each band: the base (0), then just past each threshold.
        sizes = (0, *(s + 1 for s in starts))
        rates = [[Fraction(_at(v, size)) * NANO_PER_USD / u.per for u, v in priced] for size in sizes]
        denominator = math.lcm(*(r.denominator for band in rates for r in band)) if priced else 1
        weights = tuple(tuple(int(r * denominator) for r in band[: len(keys)]) for band in rates)
        request_fee = tuple(int(band[-1] * denominator) if fee is not None else 0 for band in rates)
        # Requests are always covered: a card without a per-request fee charges none, as genai-prices.
        covered = frozenset(
            k for k in REGISTRY.units if k in units or k == REQUESTS_KEY or not ANCESTORS[k].isdisjoint(units)
        )
        return cls(
            prices=dict(prices),
            keys=keys,
            inner=inner,
            starts=starts,
            weights=weights,
            request_fee=request_fee,
            denominator=denominator,
            covered=covered,
            input_index=keys.index("input_tokens") if "input_tokens" in units else -1,
            output_index=keys.index("output_tokens") if "output_tokens" in units else -1,
        )

    def band(self, prompt_tokens: int) -> int:
        """Which long-context band a prompt of this many input tokens falls in."""
        band = 0
        for start in self.starts:
            if prompt_tokens > start:
                band += 1
        return band

    def cost(self, counts: Mapping[str, int], implied: frozenset[str] = frozenset()) -> int:
        """Cost of ``counts`` in nano-USD: the exact sum, rounded up once.

        ``implied`` is :func:`implied_keys` of ``counts``.

        Raises:
            InvalidArgument: on ``usage.counts`` when the counts contradict each other
                (a part larger than its whole), or leave a key this card prices to be guessed.
        """
        if implied and not implied.isdisjoint(self.keys):
            missing = ", ".join(sorted(implied.intersection(self.keys)))
            raise InvalidArgument(
                [
                    FieldViolation(
                        "usage.counts",
                        f"{missing} must be given: a reported count is part of it, or two reported "
                        "counts overlap in it (give 0 if they do not)",
                    )
                ]
            )
        band = self.band(counts.get("input_tokens", 0)) if self.starts else 0
        get = counts.get
        total = self.request_fee[band] * get(REQUESTS_KEY, 1)
        leaves: list[int] = []
        for key, inner, weight in zip(self.keys, self.inner, self.weights[band], strict=True):
            leaf = get(key, 0)
            for j in inner:
                leaf -= leaves[j]
            if leaf < 0:
                parts = ", ".join(self.keys[j] for j in inner if get(self.keys[j], 0))
                raise InvalidArgument(
                    [
                        FieldViolation(
                            "usage.counts",
                            f"{parts} add up to more than {key} ({get(key, 0)}), which includes them",
                        )
                    ]
                )
            leaves.append(leaf)
            total += leaf * weight
        return -(-total // self.denominator)

    def leaves(self, counts: Mapping[str, int]) -> list[tuple[str, int, int]]:
        """(key, leaf count, cost in nano-USD rounded up) per priced key: a bill's lines, for people.

        The lines can add up to a few nano-USD more than :meth:`cost`, which rounds once.
        """
        band = self.band(counts.get("input_tokens", 0)) if self.starts else 0
        lines: list[tuple[str, int, int]] = []
        leaves: list[int] = []
        for i, key in enumerate(self.keys):
            leaf = counts.get(key, 0) - sum(leaves[j] for j in self.inner[i])
            leaves.append(leaf)
            lines.append((key, leaf, -(-leaf * self.weights[band][i] // self.denominator)))
        return lines
