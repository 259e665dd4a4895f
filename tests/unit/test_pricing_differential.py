"""Differential: a settled cost is ``genai_prices.calc_price`` of the same usage, rounded up to the nano-USD.

Random usages over every dimension a model prices (each count the sum of the parts
below it, as providers report them), in every service tier the catalogue prices, over
every Anthropic, OpenAI and Google catalogue entry, settled through the engine on the
memory store. One real server does the same over the wire (tests/integration/test_pricing_server.py).
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from decimal import ROUND_CEILING

from genai_prices import Usage as GenaiUsage
from genai_prices import data_snapshot
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from spendgate_server.engine.config import EnforcementConfig
from spendgate_server.engine.decide import Call, DecisionEngine, SettleCall
from spendgate_server.engine.price_catalogue import (
    MAX_PRICE_PROVIDERS,
    CatalogueEntry,
    resolve,
    tier_context,
    tier_prices,
)
from spendgate_server.engine.price_units import (
    ANCESTORS,
    JOINS,
    REGISTRY,
    REQUESTS_KEY,
    USAGE_KEYS,
    PriceCard,
)
from spendgate_server.engine.pricing import PriceTable, Usage
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.store.memory import MemoryStore

from tests.conftest import FakeClock

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
TABLE = PriceTable(now=NOW)


def _entries() -> list[tuple[str, CatalogueEntry]]:
    """Every catalogue entry of the three providers, under a name that resolves to it."""
    found: dict[str, tuple[str, CatalogueEntry]] = {}
    for provider in data_snapshot.get_snapshot().providers:
        if provider.id not in MAX_PRICE_PROVIDERS:
            continue
        for model in provider.models:
            # Google's catalogue repeats Claude models at Vertex's prices: reach them by their Vertex form.
            for name in (model.id, f"publishers/{provider.id}/models/{model.id}"):
                entry = resolve(name)
                if entry is not None and entry.model is model:
                    found.setdefault(entry.key, (name, entry))
    return [found[key] for key in sorted(found)]


ENTRIES = _entries()
# Entries with long-context prices, drawn as often again so their thresholds get crossed.
LONG_CONTEXT = [(n, e) for n, e in ENTRIES if PriceCard.compile(tier_prices(e.model, NOW)[""]).starts]


def _closed(keys: set[str]) -> set[str]:
    """``keys`` with every total they belong to and every overlap of two of them."""
    out = set(keys)
    while True:
        more = {a for k in out for a in ANCESTORS[k]}
        more |= {j for a in out for b in out if a < b and (j := JOINS.get(frozenset((a, b)))) is not None}
        if more <= out:
            return out
        out |= more


def _leaf(key: str) -> st.SearchStrategy[int]:
    if REGISTRY.units[key].dimensions.get("family") == "tokens":
        # Past 200,000 and 272,000 prompt tokens the long-context tiers apply.
        return st.one_of(st.just(0), st.integers(0, 2_000), st.integers(0, 300_000))
    return st.one_of(st.just(0), st.integers(0, 50), st.integers(0, 1_000_000))


@st.composite
def priced_calls(draw: st.DrawFn) -> tuple[str, CatalogueEntry, str, dict[str, int]]:
    """A catalogue entry, one of its tiers, and a consistent usage over dimensions it prices."""
    name, entry = draw(st.one_of(st.sampled_from(ENTRIES), st.sampled_from(LONG_CONTEXT)))
    tiers = tier_prices(entry.model, NOW)
    tier = draw(st.sampled_from(sorted(tiers)))
    card = PriceCard.compile(tiers[tier])
    # genai-prices bills exactly one request per call: its Usage cannot report requests.
    covered = sorted(card.covered & USAGE_KEYS - {REQUESTS_KEY})
    extra = draw(st.sets(st.sampled_from(covered), max_size=4)) if covered else set()
    keys = _closed(set(card.keys) | extra)
    assume(keys <= card.covered)
    leaves = {key: draw(_leaf(key)) for key in sorted(keys)}
    if card.starts and "input_tokens" in leaves and draw(st.booleans()):
        # Land on a long-context threshold, just below it or just past it.
        leaves["input_tokens"] += draw(st.sampled_from([s + d for s in card.starts for d in (-1, 0, 1)]))
    counts = {k: sum(v for part, v in leaves.items() if part == k or k in ANCESTORS[part]) for k in keys}
    event("standard tier" if not tier else "another tier")
    event("past a long-context threshold" if card.band(counts.get("input_tokens", 0)) else "base prices")
    event("beyond input and output" if keys - {"input_tokens", "output_tokens"} else "input and output only")
    return name, entry, tier, counts


async def _settled_cost(name: str, tier: str, counts: dict[str, int]) -> int:
    engine = DecisionEngine(
        MemoryStore(), TABLE, ConfigResolver.static(EnforcementConfig()), clock=FakeClock()
    )
    decision = await engine.decide(Call("t", "s", name, 1_000, 1_000, hashlib.sha256(b"x").digest()))
    settled = await engine.settle(
        SettleCall("t", "s", decision.reservation_id, name, Usage(counts=counts, service_tier=tier), True)
    )
    return settled.cost_nano_usd


def reference_cost(entry: CatalogueEntry, tier: str, counts: dict[str, int]) -> int:
    """calc_price of the entry in that tier, rounded up to the nano-USD."""
    context = tier_context(entry.model, tier, NOW) if tier else None
    price = entry.model.calc_price(
        GenaiUsage(**counts), entry.provider, genai_request_timestamp=NOW, price_context=context
    ).total_price
    return int((price * 1_000_000_000).to_integral_value(rounding=ROUND_CEILING))


def test_the_population_is_the_whole_catalogue_of_three_providers() -> None:
    """Hundreds of entries, with audio, image, per-request and tiered prices among them."""
    assert len(ENTRIES) > 200
    priced = {k for _, e in ENTRIES for prices in tier_prices(e.model, NOW).values() for k in prices}
    assert {
        "cache_write_1h_mtok",
        "input_audio_mtok",
        "output_audio_mtok",
        "cache_audio_read_mtok",
        "input_image_mtok",
        "output_image_mtok",
        "input_video_mtok",
        "web_searches_kcount",
        "storage_searches_kcount",
        "input_mchars",
        "audio_hours",
        "input_audio_hours",
    } <= priced


@settings(max_examples=400, deadline=None)
@given(priced_calls())
def test_settled_cost_equals_calc_price(call: tuple[str, CatalogueEntry, str, dict[str, int]]) -> None:
    """The engine settles exactly what genai-prices charges, rounded up once."""
    name, entry, tier, counts = call
    assert asyncio.run(_settled_cost(name, tier, counts)) == reference_cost(entry, tier, counts)
