"""Redis Cluster: a real cluster of redis-server processes, built by the fixture.

``--redis-url redis+cluster://...`` selects redis-py's cluster client. Every script
touches only its session's keys, all under one hash tag, so each runs on one slot.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from spendgate_client import AsyncDecisionClient, DecisionClient, SpendgateUnavailable
from spendgate_client import Decision as ClientDecision
from spendgate_server.store import SessionKey
from spendgate_server.store.redis import RedisStore, session_keys

from tests.integration.test_reliability import SERVING, health, poll
from tests.processes import RedisClusterNodes, SpendgateServer

pytestmark = pytest.mark.redis

MODEL = "cluster-model"
PRICES = "prices:\n  cluster-model: {input_usd_per_mtok: 1, output_usd_per_mtok: 2}\n"
CAP_USD = "0.01"
CAP_NANO = 10_000_000
SESSIONS = [f"cluster-{i}" for i in range(9)]
CALLERS_PER_SESSION = 4
POLL_SECONDS = 30.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    """Three masters, no replicas: shared by the tests that leave every node running."""
    nodes = RedisClusterNodes.start(masters=3)
    yield nodes
    nodes.stop()


@pytest.fixture
def prices(tmp_path: Path) -> str:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES)
    return str(path)


def hash_key(session: str) -> str:
    return session_keys(SessionKey("default", session), "sg")[0]


async def spend_until_blocked(
    client: AsyncDecisionClient, session: str, mode: str, seed: int
) -> tuple[int, int]:
    """Decide and settle until the budget blocks; return (settled nano-USD, largest estimate)."""
    rng = random.Random(seed)
    spent = largest = 0
    config = {"max_session_usd": CAP_USD, "budget_mode": mode}
    while True:
        tokens = rng.randint(100, 800)
        decision = await client.decide(
            session, MODEL, tokens, 200, uuid.uuid4().bytes, enforcement_config=config
        )
        if not decision.allowed:
            assert decision.rule == "max_session_usd", decision
            return spent, largest
        largest = max(largest, decision.estimated_cost_nano_usd)
        await asyncio.sleep(0)  # let the other callers interleave between decide and settle
        settled = await client.settle(
            session, decision.reservation_id, MODEL, input_tokens=tokens, output_tokens=rng.randint(0, 200)
        )
        assert settled is not None
        spent += settled.cost_nano_usd


async def test_budgets_hold_on_every_master(
    cluster: RedisClusterNodes, spendgate: Callable[..., SpendgateServer], prices: str
) -> None:
    """Sessions land on all three masters; concurrent callers keep each budget within its mode's bound."""
    assert len({cluster.master_of(hash_key(s)).port for s in SESSIONS}) == 3
    server = spendgate("--store", "redis", "--redis-url", cluster.url, "--config", prices)
    client = AsyncDecisionClient(server.target, timeout=5, fail_mode="closed")
    store = RedisStore.from_url(cluster.url)
    try:
        for index, session in enumerate(SESSIONS):
            mode = ("crossing", "strict")[index % 2]
            results = await asyncio.gather(
                *(
                    spend_until_blocked(client, session, mode, seed=index * 100 + caller)
                    for caller in range(CALLERS_PER_SESSION)
                )
            )
            total = sum(spent for spent, _ in results)
            largest = max(estimate for _, estimate in results)
            state = await store.session_state(SessionKey("default", session), 0, 3_600_000)
            assert (state.spent_nano_usd, state.reserved_nano_usd) == (total, 0)
            bound = CAP_NANO if mode == "strict" else CAP_NANO + largest
            assert CAP_NANO // 2 <= total <= bound, (session, mode, total, bound)
    finally:
        await client.close()
        await store.close()


async def test_journal_intents_and_settle_records_on_every_master(cluster: RedisClusterNodes) -> None:
    """Tenants on all three masters: intents are written, found stale in one pipelined read across
    the nodes, removed by appends and drops; a settle record is read from its session's node."""
    from spendgate_server.store import ReserveRequest, SettleRecord, SettleRequest
    from spendgate_server.store.keyspace import log_stream_key
    from spendgate_server.store.logs import Intent
    from spendgate_server.store.redis_logs import RedisLogStore

    tenants = [f"intents-{uuid.uuid4().hex[:8]}-{i}" for i in range(12)]
    assert len({cluster.master_of(log_stream_key("journal", t)).port for t in tenants}) == 3
    logs = RedisLogStore.from_url(cluster.url)
    store = RedisStore.from_url(cluster.url)
    try:
        for n, tenant in enumerate(tenants):
            for uid in ("a", "b"):
                await logs.put_intent(
                    "journal", tenant, uid, f"{tenant}-{uid}", now_ms=1000 + n, ttl_ms=60_000
                )
        assert set(await logs.tenants("journal")) >= set(tenants)
        stale = await logs.stale_intents("journal", tenants, before_ms=2000, count=10)
        assert stale == {
            t: [Intent("a", 1000 + n, f"{t}-a"), Intent("b", 1000 + n, f"{t}-b")]
            for n, t in enumerate(tenants)
        }
        for n, tenant in enumerate(tenants):
            await logs.append(
                "journal", tenant, [("a", "event")], max_entries=10, unique_ttl_ms=60_000, now_ms=0
            )
            assert await logs.drop_intents("journal", tenant, [("b", 1000 + n)]) == 1
        assert await logs.stale_intents("journal", tenants, before_ms=2000, count=10) == {}
        session = SessionKey("default", SESSIONS[0])
        await store.reserve(ReserveRequest(session, 0, "1" * 32, 500, 60_000, 3_600_000))
        await store.settle(SettleRequest(session, 0, "1" * 32, 321, 60_000, 3_600_000))
        assert await store.settle_record(session, "1" * 32, 0) == SettleRecord(321, None)
    finally:
        await logs.close()
        await store.close()


def test_master_failover_is_survived(spendgate: Callable[..., SpendgateServer], prices: str) -> None:
    """A killed master's sessions get only UNAVAILABLE until its replica takes over, then spend is intact."""
    cluster = RedisClusterNodes.start(masters=3, replicas=1)
    try:
        server = spendgate(
            *("--store", "redis", "--redis-url", cluster.url, "--config", prices),
            *("--health-interval-millis", "100"),
        )
        # Strict $0.004: two calls (estimate $0.002, settled at $0.0012) fit, a third does not.
        config = {"max_session_usd": "0.004", "budget_mode": "strict"}
        with DecisionClient(server.target, timeout=2, fail_mode="closed") as client:

            def call(session: str) -> ClientDecision:
                return client.decide(session, MODEL, 1000, 500, uuid.uuid4().bytes, enforcement_config=config)

            for _ in range(2):
                decision = call("failover")
                assert decision.allowed
                client.settle(
                    "failover", decision.reservation_id, MODEL, input_tokens=1000, output_tokens=100
                )
            assert call("failover").rule == "max_session_usd"
            cluster.wait_replicated()
            victim = cluster.master_of(hash_key("failover"))
            victim.process.kill()
            victim.process.wait()

            outages = 0
            until = time.monotonic() + POLL_SECONDS
            while True:
                try:
                    after = call("failover")
                    break
                except SpendgateUnavailable:  # anything else fails the test: outages are reported cleanly
                    outages += 1
                    assert time.monotonic() < until, "the replica never took over"
                    time.sleep(0.05)
            assert outages >= 1  # the dead master's sessions were refused, not hidden
            # The replica kept the settled spend: the budget still blocks at the same figure.
            assert after.rule == "max_session_usd"
            assert after.session_spend_nano_usd == 2 * 1_200_000
            assert cluster.master_of(hash_key("failover")) is not victim
            fresh = call("after-failover")
            assert fresh.allowed
            assert client.settle("after-failover", fresh.reservation_id, MODEL, input_tokens=1000) is not None
        poll("health SERVING after the failover", lambda: health(server.target) == SERVING)
    finally:
        cluster.stop()
