"""Session insights: the aggregate on both stores, the per-server buffer, and SessionService end to end."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import session_pb2 as spb
from spendgate.v1 import session_pb2_grpc
from spendgate_client import DecisionClient
from spendgate_server.engine.config import Rule
from spendgate_server.engine.decide import Decision, Verdict
from spendgate_server.engine.insights import SessionActivity
from spendgate_server.store.insights import (
    MINUTE_MS,
    RETENTION_MS,
    InsightsStore,
    MemoryInsightsStore,
    SessionDelta,
)
from spendgate_server.store.redis_insights import RedisInsightsStore

from tests.conftest import STORES, FakeClock
from tests.processes import SpendgateServer

NOW = 1_800_000_000_000
POLL_SECONDS = 15.0


@pytest.fixture(params=STORES)
async def insights(request: pytest.FixtureRequest) -> AsyncIterator[InsightsStore]:
    """Each insights store, empty."""
    if request.param == "memory":
        store: InsightsStore = MemoryInsightsStore()
    else:
        store = RedisInsightsStore.from_url(request.getfixturevalue("redis_url"), timeout_seconds=5)
    yield store
    await store.close()


def delta(
    spend: int | None,
    project: str = "",
    blocked: dict[Rule, int] | None = None,
    spent_at: dict[int, int] | None = None,
    decisions: int = 1,
    budget: int | None = 1000,
) -> SessionDelta:
    d = SessionDelta(
        project=project,
        committed_nano_usd=spend,
        budget_nano_usd=budget,
        last_seen_ms=NOW,
        decisions=decisions,
    )
    d.blocked.update(blocked or {})
    d.spend_by_minute.update(spent_at or {})
    return d


async def test_top_sessions_rank_by_spend(insights: InsightsStore) -> None:
    """Sessions come back highest spend first, limited, and filtered by project."""
    await insights.record("t", {"a": delta(300, "p1"), "b": delta(900, "p2"), "c": delta(600, "p1")}, NOW)
    top = await insights.top_sessions("t", "", 2, NOW)
    assert [(s.session_id, s.spend_nano_usd) for s in top] == [("b", 900), ("c", 600)]
    assert [s.session_id for s in await insights.top_sessions("t", "p1", 10, NOW)] == ["c", "a"]
    assert await insights.top_sessions("other-tenant", "", 10, NOW) == []


async def test_flushes_from_two_servers_add_up(insights: InsightsStore) -> None:
    """Decision and block counts from several flushes are summed; spend takes the latest; budget shows."""
    await insights.record("t", {"s": delta(100, blocked={Rule.DUPLICATE_REQUEST: 2}, decisions=3)}, NOW)
    await insights.record(
        "t", {"s": delta(250, blocked={Rule.DUPLICATE_REQUEST: 1, Rule.SESSION_BUDGET: 4}, decisions=5)}, NOW
    )
    (s,) = await insights.top_sessions("t", "", 10, NOW)
    assert (s.spend_nano_usd, s.decisions, s.budget_nano_usd) == (250, 8, 1000)
    assert s.blocked == {Rule.DUPLICATE_REQUEST: 3, Rule.SESSION_BUDGET: 4}


async def test_spend_series_per_minute(insights: InsightsStore) -> None:
    """Settled spend is summed per minute and returned oldest first."""
    m0, m1 = NOW - NOW % MINUTE_MS, NOW - NOW % MINUTE_MS + MINUTE_MS
    await insights.record("t", {"s": delta(10, spent_at={m1: 5, m0: 7})}, NOW)
    await insights.record("t", {"s": delta(20, spent_at={m1: 3})}, NOW)
    points = await insights.spend_series("t", "s", NOW)
    assert [(p.minute_start_ms, p.cost_nano_usd) for p in points] == [(m0, 7), (m1, 8)]


async def test_old_sessions_drop_out(insights: InsightsStore) -> None:
    """A session idle for longer than the retention window is no longer listed."""
    await insights.record("t", {"old": delta(999)}, NOW)
    assert await insights.top_sessions("t", "", 10, NOW + RETENTION_MS + 1) == []


def decision(verdict: Verdict, rule: Rule | None, spend: int) -> Decision:
    return Decision(verdict, "m", rule, "", "d", "", 0, spend, None, 0, budget_nano_usd=500)


async def test_activity_buffers_then_flushes() -> None:
    """The buffer records decisions, blocks and settles, and the flush hands them to the store."""
    clock = FakeClock(NOW)
    store = MemoryInsightsStore()
    activity = SessionActivity(store, clock)
    activity.decided("t", "proj", "s", decision(Verdict.ALLOW, None, 100))
    activity.decided("t", "proj", "s", decision(Verdict.BLOCK, Rule.TOOL_CALL_LIMIT, 100))
    # A ceiling block never read the store: its zero spend must not overwrite the known spend.
    activity.decided("t", "proj", "s", decision(Verdict.BLOCK, Rule.TOKEN_CEILING, 0))
    activity.settled("t", "s", 40, 140)
    assert await store.top_sessions("t", "", 10, NOW) == []
    await activity.flush()
    (s,) = await store.top_sessions("t", "", 10, NOW)
    assert (s.project, s.spend_nano_usd, s.decisions, s.budget_nano_usd) == ("proj", 140, 3, 500)
    assert s.blocked == {Rule.TOOL_CALL_LIMIT: 1, Rule.TOKEN_CEILING: 1}
    assert [p.cost_nano_usd for p in await store.spend_series("t", "s", NOW)] == [40]


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_session_service_end_to_end(
    backend: str, spendgate: Callable[..., SpendgateServer], request: pytest.FixtureRequest
) -> None:
    """Decisions and settles through a real server show up in ListSessions and GetSessionSpend."""
    args = (
        ("--store", "redis", "--redis-url", request.getfixturevalue("redis_url"))
        if backend == "redis"
        else ()
    )
    server = spendgate(*args)
    config = {"max_session_usd": 0.05, "dedup_ttl_seconds": 60}
    settled_total = 0
    with DecisionClient(server.target, timeout=5, fail_mode="closed") as client:
        for i in range(3):
            fp = hashlib.sha256(f"call-{i}".encode()).digest()
            d = client.decide("hot", "claude-sonnet-4-5", 1000, 100, fp, enforcement_config=config)
            settled = client.settle(
                "hot", d.reservation_id, d.effective_model, input_tokens=1000, output_tokens=50
            )
            assert settled is not None
            settled_total += settled.cost_nano_usd
        repeat = hashlib.sha256(b"call-0").digest()
        assert not client.decide(
            "hot", "claude-sonnet-4-5", 1000, 100, repeat, enforcement_config=config
        ).allowed
        client.decide("cold", "claude-sonnet-4-5", 10, 10, hashlib.sha256(b"x").digest())
    with grpc.insecure_channel(server.target) as channel:
        stub = session_pb2_grpc.SessionServiceStub(channel)
        deadline = time.monotonic() + POLL_SECONDS
        while True:
            sessions = stub.ListSessions(spb.ListSessionsRequest(page_size=10)).sessions
            if [s.session_id for s in sessions] == ["hot", "cold"] and sessions[0].decision_count == 4:
                break
            assert time.monotonic() < deadline, f"insights never arrived: {sessions}"
            time.sleep(0.1)
        hot = sessions[0]
        assert hot.budget_nano_usd == 50_000_000 and hot.spend_nano_usd == settled_total
        assert [(c.rule, c.count) for c in hot.blocked] == [(pb.RULE_DUPLICATE_REQUEST, 1)]
        series = stub.GetSessionSpend(spb.GetSessionSpendRequest(session_id="hot")).points
        assert sum(p.cost_nano_usd for p in series) == settled_total
        with pytest.raises(grpc.RpcError) as info:
            stub.GetSessionSpend(spb.GetSessionSpendRequest(session_id=""))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
