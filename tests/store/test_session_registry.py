"""The SessionRegistry contract: memory and Redis count live sessions per tenant alike."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from spendgate_server.store.redis_session_registry import RedisSessionRegistry
from spendgate_server.store.session_registry import Admission, MemorySessionRegistry, SessionRegistry

from tests.conftest import STORES

NOW = 1_800_000_000_000
TTL = 60_000


@pytest.fixture(params=STORES)
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[SessionRegistry]:
    if request.param == "memory":
        backend: SessionRegistry = MemorySessionRegistry()
    else:
        backend = RedisSessionRegistry.from_url(request.getfixturevalue("redis_url"), timeout_seconds=5)
    yield backend
    await backend.close()


async def test_new_sessions_past_the_limit_are_refused_and_known_ones_refreshed(
    registry: SessionRegistry,
) -> None:
    """Three of three admitted, a fourth refused; a known session is still admitted at the limit."""
    for n in range(3):
        assert await registry.admit("t", f"s{n}", NOW, NOW + TTL, 3) == Admission(True, n + 1)
    assert await registry.admit("t", "s3", NOW, NOW + TTL, 3) == Admission(False, 3)
    assert await registry.admit("t", "s1", NOW + 10, NOW + 10 + TTL, 3) == Admission(True, 3)
    assert await registry.admit("other", "s3", NOW, NOW + TTL, 3) == Admission(True, 1)


async def test_expired_sessions_free_their_places(registry: SessionRegistry) -> None:
    """A session is live until its expiry; a refreshed one lives on, an idle one frees its place."""
    await registry.admit("t", "idle", NOW, NOW + TTL, 2)
    await registry.admit("t", "busy", NOW, NOW + TTL, 2)
    await registry.admit("t", "busy", NOW + TTL - 1, NOW + 2 * TTL, 2)
    assert await registry.admit("t", "new", NOW + TTL - 1, NOW + 2 * TTL, 2) == Admission(False, 2)
    assert await registry.admit("t", "new", NOW + TTL, NOW + 2 * TTL, 2) == Admission(True, 2)


@pytest.mark.redis
async def test_an_idle_tenant_leaves_no_key_behind(redis_url: str) -> None:
    """The tenant's set expires with its newest member (the caller's clock, not Redis's)."""
    registry = RedisSessionRegistry.from_url(redis_url, timeout_seconds=5)
    try:
        await registry.admit("t", "a", 0, 5_000, 10)
        await registry.admit("t", "b", 1_000, 61_000, 10)
        ttl_ms = redis.Redis.from_url(redis_url).pttl(registry.key("t"))
        assert 59_000 < ttl_ms <= 60_000
    finally:
        await registry.close()


# (session index, milliseconds later); a reference model decides what each admission returns.
_STEPS = st.lists(st.tuples(st.integers(0, 7), st.integers(0, 30_000)), max_size=40)


@settings(max_examples=40, deadline=None)
@given(steps=_STEPS, limit=st.integers(1, 5))
@pytest.mark.redis
def test_both_registries_agree_with_a_reference_model(
    redis_server: object, steps: list[tuple[int, int]], limit: int
) -> None:
    """Differential: random admissions over time give the model's answers on memory and on Redis."""
    import asyncio

    from tests.processes import RedisServer

    assert isinstance(redis_server, RedisServer)
    redis.Redis(port=redis_server.port).flushall()

    async def run() -> None:
        backends = [
            MemorySessionRegistry(),
            RedisSessionRegistry.from_url(redis_server.url, timeout_seconds=5),
        ]
        model: dict[str, int] = {}
        now = NOW
        try:
            for index, later in steps:
                now += later
                session = f"s{index}"
                model = {s: due for s, due in model.items() if due > now}
                admitted = session in model or len(model) < limit
                if admitted:
                    model[session] = now + TTL
                expected = Admission(admitted, len(model))
                for backend in backends:
                    assert await backend.admit("t", session, now, now + TTL, limit) == expected
        finally:
            for backend in backends:
                await backend.close()

    asyncio.run(run())
