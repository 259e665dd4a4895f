"""A Redis that loses its data (restart without persistence, FLUSHALL, a failover to a replica that
lagged) under a running RedisLogStore: the tenant registry and the consumer groups come back.

Found by a user: after a restart of Redis, empty, a server kept appending to the journal but had
written each tenant to the registry "once per process", so the evaluator and the journal sweeper,
which find tenants there, saw none until the server restarted. Real redis-server; the refresh
interval is driven by the callers' ``now_ms``, never by waiting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spendgate_server.store.keyspace import log_registry_key
from spendgate_server.store.redis import RedisConnection
from spendgate_server.store.redis_logs import REGISTRY_REFRESH_MS, RedisLogStore

pytestmark = pytest.mark.redis

NOW = 1_800_000_000_000
LOG = "journal"
TTL = 3_600_000
GROUP = "g"


@pytest.fixture(params=["pooled", "pipelined"])
async def logs(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[RedisLogStore]:
    """A Redis log store over an emptied Redis, its appends on the pool or the pipelined connection."""
    if request.param == "pooled":
        store = RedisLogStore.from_url(redis_url, poll_seconds=0.01)
        yield store
        await store.close()
        return
    connection = RedisConnection(redis_url, timeout_seconds=2)
    assert connection.hot_path is not None
    store = RedisLogStore(connection.client, owns_client=False, hot_path=connection.hot_path)
    yield store
    await store.close()
    await connection.aclose()


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the same Redis, to lose data behind the store's back."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def append(logs: RedisLogStore, tenant: str, *uids: str, now: int = NOW) -> list[str]:
    result = await logs.append(
        LOG, tenant, [(u, f"p-{u}") for u in uids], max_entries=1000, unique_ttl_ms=TTL, now_ms=now
    )
    return list(result.entry_ids)


async def test_after_flushall_the_next_append_registers_the_tenant_at_once(
    logs: RedisLogStore, admin: aioredis.Redis
) -> None:
    """The reported case: everything lost; the first append recreates the stream and the registry
    lists the tenant again, with no time passing (the evaluator finds it on its next round)."""
    await append(logs, "t", "a")
    assert await logs.tenants(LOG) == ["t"]
    await admin.flushall()
    assert await logs.tenants(LOG) == []
    [entry_id] = await append(logs, "t", "b", now=NOW + 1)
    assert entry_id
    assert await logs.tenants(LOG) == ["t"]


async def test_a_lost_registry_alone_is_rewritten_within_the_refresh_interval(
    logs: RedisLogStore, admin: aioredis.Redis
) -> None:
    """Only the registry lost (its own slot, e.g. on another cluster node): appends within the
    interval cost no registry write; the first at or after it writes the tenant again."""
    await append(logs, "t", "a")
    await admin.delete(log_registry_key(LOG))
    await append(logs, "t", "b", now=NOW + REGISTRY_REFRESH_MS - 1)
    assert await logs.tenants(LOG) == []
    await append(logs, "t", "c", now=NOW + REGISTRY_REFRESH_MS)
    assert await logs.tenants(LOG) == ["t"]


async def test_an_intent_rewrites_a_lost_registry_within_the_refresh_interval(
    logs: RedisLogStore, admin: aioredis.Redis
) -> None:
    """The sweeper finds intents through the registry: an intent written after the interval
    lists its tenant again, so an intent whose append never comes is still swept."""
    await logs.put_intent(LOG, "t", "u1", "x", now_ms=NOW, ttl_ms=TTL)
    assert await logs.tenants(LOG) == ["t"]
    await admin.flushall()
    await logs.put_intent(LOG, "t", "u2", "y", now_ms=NOW + REGISTRY_REFRESH_MS - 1, ttl_ms=TTL)
    assert await logs.tenants(LOG) == []
    await logs.put_intent(LOG, "t", "u3", "z", now_ms=NOW + REGISTRY_REFRESH_MS, ttl_ms=TTL)
    assert await logs.tenants(LOG) == ["t"]
    stale = await logs.stale_intents(LOG, ["t"], before_ms=NOW + REGISTRY_REFRESH_MS + 1, count=10)
    assert [i.uid for i in stale["t"]] == ["u2", "u3"]


async def test_a_clock_that_went_back_registers_again(logs: RedisLogStore, admin: aioredis.Redis) -> None:
    """Callers' clocks differ: an append stamped before the last registration is not trusted as fresh."""
    await append(logs, "t", "a")
    await admin.delete(log_registry_key(LOG))
    await append(logs, "t", "b", now=NOW - 1)
    assert await logs.tenants(LOG) == ["t"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.integers(0, 2 * REGISTRY_REFRESH_MS), st.booleans()), max_size=8))
async def test_a_writing_tenant_is_never_missing_longer_than_the_interval(
    admin: aioredis.Redis, steps: list[tuple[int, bool]]
) -> None:
    """Whatever the registry losses between appends, once an append at time ``t`` came at least
    ``REGISTRY_REFRESH_MS`` after the loss, the tenant is listed again."""
    await admin.flushall()
    # A fresh store each example: the registration memory is the store's.
    store = RedisLogStore(admin, owns_client=False)
    now, lost_at = NOW, None
    await append(store, "t", "first", now=now)
    for index, (advance_ms, lose) in enumerate(steps):
        if lose:
            await admin.delete(log_registry_key(LOG))
            lost_at = now if lost_at is None else lost_at
        now += advance_ms
        await append(store, "t", f"e{index}", now=now)
        if lost_at is not None and now - lost_at >= REGISTRY_REFRESH_MS:
            assert await store.tenants(LOG) == ["t"]
        if await store.tenants(LOG):
            lost_at = None


async def test_a_lost_group_is_created_again_from_the_start(
    logs: RedisLogStore, admin: aioredis.Redis
) -> None:
    """Every entry in the stream after the loss is delivered to the recreated group (at least
    once), and its pending count and lag read again without an error."""
    await append(logs, "t", "a")
    [first] = await logs.read_group(LOG, "t", GROUP, "c", 10, NOW)
    await logs.ack(LOG, "t", GROUP, [first.entry_id])
    await admin.flushall()
    ids = await append(logs, "t", "b", "c", now=NOW + 1)
    assert [e.entry_id for e in await logs.read_group(LOG, "t", GROUP, "c", 10, NOW + 1)] == ids
    assert await logs.pending(LOG, "t", GROUP) == 2
    await admin.flushall()
    assert await logs.pending(LOG, "t", GROUP) == 0
    await admin.flushall()
    assert await logs.claim(LOG, "t", GROUP, "c", 0, 10, NOW + 2) == []
    await admin.flushall()
    assert await logs.oldest_unacked_ms(LOG, "t", GROUP) is None
    await admin.xgroup_destroy(logs.stream_key(LOG, "t"), GROUP)
    later = await append(logs, "t", "d", now=NOW + 3)
    assert [e.entry_id for e in await logs.read_group(LOG, "t", GROUP, "c", 10, NOW + 3)] == later
