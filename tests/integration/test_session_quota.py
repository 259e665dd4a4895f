"""A tenant's distinct live sessions are bounded (issue 18, item 4c): in the engine and over gRPC."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import cast

import grpc
import pytest
import redis
from google.rpc import error_details_pb2, status_pb2
from spendgate.v1 import decision_pb2_grpc
from spendgate_server.engine.config import EnforcementConfig
from spendgate_server.engine.decide import DecisionEngine, EngineTimings
from spendgate_server.engine.pricing import PriceTable
from spendgate_server.engine.quota import REGISTRY_RETRY_MS, SessionQuota
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.errors import ResourceExhausted, StoreUnavailable
from spendgate_server.store import SessionKey, Store
from spendgate_server.store.memory import MemoryStore
from spendgate_server.store.redis import RedisStore
from spendgate_server.store.redis_session_registry import RedisSessionRegistry
from spendgate_server.store.session_registry import Admission, MemorySessionRegistry, SessionRegistry

from tests.conftest import STORES, FakeClock
from tests.integration.test_security import bearer, create_key, decide_request
from tests.processes import SpendgateServer, read_ledger
from tests.unit.test_rules import PRICES, call

TTL_MS = 3_600_000


@dataclasses.dataclass
class Quotaed:
    engine: DecisionEngine
    quota: SessionQuota
    store: Store
    clock: FakeClock


async def quotaed(backend: str, redis_url: str, limit: int, clock: FakeClock) -> Quotaed:
    if backend == "memory":
        store: Store = MemoryStore()
        registry: SessionRegistry = MemorySessionRegistry()
    else:
        store = RedisStore.from_url(redis_url, timeout_seconds=5)
        registry = RedisSessionRegistry.from_url(redis_url, timeout_seconds=5)
    quota = SessionQuota(registry, limit, TTL_MS)
    engine = DecisionEngine(
        store,
        PriceTable(PRICES),
        ConfigResolver.static(EnforcementConfig(token_ceiling=1_000)),
        timings=EngineTimings(session_ttl_ms=TTL_MS),
        clock=clock,
        quota=quota,
    )
    return Quotaed(engine, quota, store, clock)


@pytest.fixture(params=STORES)
async def small(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Quotaed]:
    """An engine allowing 3 live sessions per tenant."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    q = await quotaed(request.param, url, 3, clock)
    yield q
    await q.quota.registry.close()
    await q.store.close()


async def test_a_new_session_past_the_limit_is_refused_and_changes_nothing(small: Quotaed) -> None:
    """Three sessions decide; a fourth gets ResourceExhausted naming the quota; known ones go on."""
    for n in range(3):
        assert (await small.engine.decide(call(session=f"s{n}"))).allowed
    with pytest.raises(ResourceExhausted) as info:
        await small.engine.decide(call(session="s3"))
    assert info.value.quota == "max_sessions_per_tenant"
    assert "already has 3 live sessions" in str(info.value) and "--max-sessions-per-tenant 3" in str(
        info.value
    )
    state = await small.store.session_state(SessionKey("t", "s3"), small.clock(), TTL_MS)
    assert (state.spent_nano_usd, state.reserved_nano_usd, state.open_reservations) == (0, 0, 0)
    assert (await small.engine.decide(call(session="s1"))).allowed


async def test_a_ceiling_block_takes_no_place_and_idle_sessions_free_theirs(small: Quotaed) -> None:
    """A stateless block never counts; after the session TTL an idle session's place is free."""
    blocked = await small.engine.decide(call(5_000, session="huge"))
    assert not blocked.allowed
    for n in range(3):
        await small.engine.decide(call(session=f"s{n}"))
    small.clock.advance(TTL_MS // 2)
    await small.engine.decide(call(session="s0"))  # s0 stays live; s1 and s2 idle out
    small.clock.advance(TTL_MS // 2)
    assert (await small.engine.decide(call(session="n1"))).allowed
    assert (await small.engine.decide(call(session="n2"))).allowed
    with pytest.raises(ResourceExhausted):
        await small.engine.decide(call(session="n3"))


@pytest.mark.redis
async def test_far_from_the_limit_new_sessions_are_registered_in_the_background(
    redis_url: str, clock: FakeClock
) -> None:
    """With room to spare the registry is written after the decision; the count still ends exact."""
    q = await quotaed("redis", redis_url, 10_000, clock)
    try:
        await q.engine.decide(call(session="first"))
        for n in range(200):
            assert (await q.engine.decide(call(session=f"s{n}"))).allowed
        await q.quota.drain()
        assert isinstance(q.quota.registry, RedisSessionRegistry)
        assert redis.Redis.from_url(redis_url).zcard(q.quota.registry.key("t")) == 201
    finally:
        await q.quota.registry.close()
        await q.store.close()


def quota_subject(error: grpc.RpcError) -> str:
    metadata = cast("Sequence[tuple[str, bytes]]", error.trailing_metadata())
    for key, value in metadata:
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                failure = error_details_pb2.QuotaFailure()
                if detail.Unpack(failure):
                    return str(failure.violations[0].subject)
    return ""


@pytest.mark.parametrize("store", STORES)
def test_a_server_refuses_a_tenants_sessions_past_its_quota_and_not_anothers(
    spendgate: Callable[..., SpendgateServer], tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    """`--max-sessions-per-tenant 5`: acme's sixth session is RESOURCE_EXHAUSTED; globex still decides."""
    if store == "redis":
        url = request.getfixturevalue("redis_url")
        from tests.integration.test_watch_fanout import redis_key

        acme, globex = redis_key(url, "acme"), redis_key(url, "globex")
        server = spendgate("--store", "redis", "--redis-url", url, "--max-sessions-per-tenant", "5")
    else:
        keys = tmp_path / "keys.json"
        acme, globex = create_key(keys, "acme", "client", "a"), create_key(keys, "globex", "client", "g")
        server = spendgate("--keys-file", str(keys), "--max-sessions-per-tenant", "5")
    with grpc.insecure_channel(server.target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        for n in range(5):
            stub.Decide(decide_request(f"s{n}", prompt=f"p{n}"), metadata=bearer(acme))
        with pytest.raises(grpc.RpcError) as info:
            stub.Decide(decide_request("s5", prompt="p5"), metadata=bearer(acme))
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert quota_subject(info.value) == "max_sessions_per_tenant"
        assert "tenant 'acme' already has 5 live sessions" in (info.value.details() or "")
        stub.Decide(decide_request("s0", prompt="again"), metadata=bearer(acme))
        stub.Decide(decide_request("s5", prompt="p5"), metadata=bearer(globex))
    if store == "redis":
        ledger = read_ledger(redis.Redis.from_url(url), "s5", tenant="acme")
        assert (ledger.spent, ledger.reserved, ledger.open) == (0, 0, {})


class DownRegistry(MemorySessionRegistry):
    """A registry whose store does not answer."""

    local = False

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    async def admit(
        self, tenant: str, session_id: str, now_ms: int, expires_ms: int, limit: int
    ) -> Admission:
        self.asked += 1
        raise StoreUnavailable("redis: Timeout reading from socket")


async def test_an_unreachable_registry_admits_and_is_asked_again_only_after_a_second(
    clock: FakeClock,
) -> None:
    """The quota guards memory, not spend: a registry outage never fails a Decide; one try a second."""
    registry = DownRegistry()
    quota = SessionQuota(registry, 3, TTL_MS)
    engine = DecisionEngine(
        MemoryStore(),
        PriceTable(PRICES),
        ConfigResolver.static(EnforcementConfig()),
        clock=clock,
        quota=quota,
    )
    for n in range(10):
        assert (await engine.decide(call(session=f"s{n}"))).allowed
    assert (registry.asked, quota.unchecked) == (1, 10)
    clock.advance(REGISTRY_RETRY_MS)
    await engine.decide(call(session="later"))
    assert registry.asked == 2
