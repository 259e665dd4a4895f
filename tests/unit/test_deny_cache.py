"""The deny cache: a session out of budget is answered from memory, and never more permissively."""

from __future__ import annotations

import hashlib

import pytest
from spendgate_server.engine.config import BudgetMode, EnforcementConfig
from spendgate_server.engine.decide import Call, DecisionEngine, SettleCall, Verdict
from spendgate_server.engine.deny_cache import DenyCache
from spendgate_server.engine.pricing import ModelPricing, PriceTable, RateCard, Usage
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.store import ReserveOutcome, ReserveRequest, Store

from tests.conftest import FakeClock

PRICES = {"m": ModelPricing("m", RateCard(1_000_000_000, 1_000_000_000, 0, 0))}  # 1,000 nano-USD a token
CAP = EnforcementConfig(max_session_nano_usd=150_000)  # one call of 100+100 tokens crosses it


class CountingStore:
    """Counts reserve round trips of the real store it wraps (the cache exists to save them)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.reserves = 0

    async def reserve(self, request: ReserveRequest) -> ReserveOutcome:
        self.reserves += 1
        return await self.inner.reserve(request)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def call(prompt: str, config: EnforcementConfig = CAP, request_id: str = "") -> Call:
    return Call("t", "s", "m", 100, 100, hashlib.sha256(prompt.encode()).digest(), 0, request_id, config)


@pytest.fixture
def counting(store: Store) -> CountingStore:
    return CountingStore(store)


@pytest.fixture
def engine(counting: CountingStore, clock: FakeClock) -> DecisionEngine:
    return DecisionEngine(
        counting,  # type: ignore[arg-type]  # a counting proxy around a real Store
        PriceTable(PRICES),
        ConfigResolver.static(EnforcementConfig()),
        clock=clock,
        deny_cache=DenyCache(ttl_ms=250),
    )


async def exhaust(engine: DecisionEngine) -> str:
    """Spend the budget and get blocked once by the store; return the admitted reservation."""
    first = await engine.decide(call("a"))
    assert first.verdict is Verdict.ALLOW
    assert (await engine.decide(call("b"))).verdict is Verdict.BLOCK
    return first.reservation_id


async def test_blocked_session_is_answered_from_memory(
    engine: DecisionEngine, counting: CountingStore
) -> None:
    """After the store blocks a session's budget, the next calls are blocked without a store round trip."""
    await exhaust(engine)
    before = counting.reserves
    for prompt in "cdef":
        decision = await engine.decide(call(prompt))
        assert (decision.verdict, decision.rule.key if decision.rule else None) == (
            Verdict.BLOCK,
            "max_session_usd",
        )
    assert counting.reserves == before


async def test_the_store_is_asked_again_after_ttl_settle_or_a_higher_cap(
    engine: DecisionEngine, counting: CountingStore, clock: FakeClock
) -> None:
    """The memory lapses after its TTL, after a local settle, and when the cap was raised."""
    rid = await exhaust(engine)
    clock.advance(250)
    before = counting.reserves
    await engine.decide(call("x"))
    assert counting.reserves == before + 1
    await engine.settle(SettleCall("t", "s", rid, "m", Usage(10, 10), True))  # frees budget: 20,000 spent
    assert (await engine.decide(call("y"))).verdict is Verdict.ALLOW
    assert (await engine.decide(call("z"))).verdict is Verdict.BLOCK
    raised = EnforcementConfig(max_session_nano_usd=10_000_000)
    assert (await engine.decide(call("w", raised))).verdict is Verdict.ALLOW


async def test_request_ids_and_strict_mode_always_reach_the_store(
    engine: DecisionEngine, counting: CountingStore
) -> None:
    """A retried request id must replay from the store; strict-mode blocks are not remembered."""
    await exhaust(engine)
    before = counting.reserves
    await engine.decide(call("r", request_id="req-1"))
    strict = EnforcementConfig(max_session_nano_usd=150_000, budget_mode=BudgetMode.STRICT)
    await engine.decide(call("s", strict))
    await engine.decide(call("s2", strict))
    assert counting.reserves == before + 3


def test_the_cache_is_bounded() -> None:
    """Past its size bound the cache starts over instead of growing."""
    cache = DenyCache(ttl_ms=1000, max_entries=3)
    for n in range(10):
        cache.remember("t", f"s{n}", 1, 1, 0)
    assert sum(cache.blocked("t", f"s{n}", 1, 1) is not None for n in range(10)) <= 3
