"""WatchViolations: one reader per tenant and process, bounded streams (issue 18, item 4b)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from spendgate.v1 import violation_pb2 as vpb
from spendgate.v1 import violation_pb2_grpc
from spendgate_server.errors import ResourceExhausted, StoreUnavailable
from spendgate_server.policy.violations import (
    PolicyType,
    Violation,
    ViolationFeed,
    ViolationHub,
    Watch,
    WatchLimits,
    violation_id,
)
from spendgate_server.store.logs import LogStore, MemoryLogStore
from spendgate_server.store.redis import connect
from spendgate_server.store.redis_logs import RedisLogStore

from tests.conftest import STORES
from tests.fake_provider import PRICES_YAML
from tests.integration.test_alerts_service import set_policies
from tests.integration.test_security import bearer, spendgate_cli
from tests.processes import SpendgateServer

WAIT_SECONDS = 20.0
_appended = 0


def violation(decision: str) -> Violation:
    return Violation(
        violation_id("t", decision, PolicyType.APPROVED_MODELS),
        PolicyType.APPROVED_MODELS,
        "model x ran and is not in approved_models",
        1,
        decision,
        "s",
        "",
        "x",
        "x",
        "",
        "",
        "",
        1,
        1,
    )


@pytest.fixture(params=STORES)
async def feed(request: pytest.FixtureRequest) -> AsyncIterator[ViolationFeed]:
    """The feed over each log store; Redis with a pool of two connections, far fewer than watchers."""
    if request.param == "memory":
        logs: LogStore = MemoryLogStore()
    else:
        client = connect(request.getfixturevalue("redis_url"), timeout_seconds=5, max_connections=2)
        logs = RedisLogStore(client, poll_seconds=0.01)
    yield ViolationFeed(logs, max_entries=100_000, dedup_window_ms=60_000)
    await logs.close()


async def append(feed: ViolationFeed, tenant: str, count: int) -> list[str]:
    """Append ``count`` new violations to ``tenant``'s feed; returns their decision ids."""
    global _appended
    decisions = [f"{_appended + n:032x}" for n in range(count)]
    _appended += count
    await feed.add(tenant, [violation(d) for d in decisions], 0)
    return decisions


async def collect(watch: Watch, count: int) -> list[Violation]:
    got: list[Violation] = []
    while len(got) < count:
        got += await asyncio.wait_for(watch.next_batch(), WAIT_SECONDS)
    return got


async def test_many_watchers_from_any_cursor_each_get_every_violation_once_over_one_reader(
    feed: ViolationFeed,
) -> None:
    """200 watchers (live, from the start, from a middle cursor) over a 2-connection pool: all complete."""
    limits = WatchLimits(per_tenant=1000, per_process=1000, batch_size=7, messages_per_second_per_tenant=1e9)
    hub = ViolationHub(feed, limits, 0.05)
    old = await append(feed, "t", 10)
    middle = (await feed.after("t", "0-0", 5))[-1].cursor
    live = [hub.open("t", "") for _ in range(100)]
    start = [hub.open("t", "0-0") for _ in range(50)]
    resumed = [hub.open("t", middle) for _ in range(50)]
    assert hub.readers() == 1 and hub.open_streams("t") == 200
    readers = [asyncio.create_task(collect(w, 40)) for w in live]
    readers += [asyncio.create_task(collect(w, 50)) for w in start]
    readers += [asyncio.create_task(collect(w, 45)) for w in resumed]
    await asyncio.wait_for(hub.wait_ready("t"), WAIT_SECONDS)
    new: list[str] = []
    for _ in range(8):
        new += await append(feed, "t", 5)
    results = await asyncio.gather(*readers)
    for got in results[:100]:
        assert [v.decision_id for v in got] == new
    for got in results[100:150]:
        assert [v.decision_id for v in got] == old + new
    for got in results[150:]:
        assert [v.decision_id for v in got] == old[5:] + new
    for w in live + start + resumed:
        w.close()
    assert hub.readers() == 0 and hub.open_streams() == 0


async def test_a_slow_watcher_drops_its_buffer_and_catches_up_from_the_feed(feed: ViolationFeed) -> None:
    """A watcher that stops reading holds at most queued_per_watch violations, and still misses none."""
    hub = ViolationHub(feed, WatchLimits(queued_per_watch=5, batch_size=3), 0.05)
    slow, fast = hub.open("t", ""), hub.open("t", "")
    await asyncio.wait_for(hub.wait_ready("t"), WAIT_SECONDS)
    fast_task = asyncio.create_task(collect(fast, 30))
    sent: list[str] = []
    for _ in range(10):
        sent += await append(feed, "t", 3)
        await asyncio.sleep(0.02)  # gives the reader turns; the slow watcher does not read
    assert [v.decision_id for v in await fast_task] == sent
    assert len(slow._queue) <= 5
    assert [v.decision_id for v in await collect(slow, 30)] == sent
    slow.close()
    fast.close()


async def test_a_tenants_message_budget_paces_its_watchers_and_loses_nothing(feed: ViolationFeed) -> None:
    """With a budget of a few messages at a time, every watcher still gets each violation once, in order."""
    hub = ViolationHub(feed, WatchLimits(messages_per_second_per_tenant=400, batch_size=9), 0.05)
    watches = [hub.open("t", "") for _ in range(3)] + [hub.open("t", "0-0")]
    await asyncio.wait_for(hub.wait_ready("t"), WAIT_SECONDS)
    readers = [asyncio.create_task(collect(w, 60)) for w in watches]
    sent: list[str] = []
    for _ in range(6):
        sent += await append(feed, "t", 10)
    for got in await asyncio.gather(*readers):
        assert [v.decision_id for v in got] == sent
    for w in watches:
        w.close()


async def test_limits_per_tenant_and_per_process_refuse_with_the_quota_named(feed: ViolationFeed) -> None:
    """Past either limit open() raises ResourceExhausted naming its flag; closing frees a place."""
    hub = ViolationHub(feed, WatchLimits(per_tenant=3, per_process=5))
    a = [hub.open("a", "") for _ in range(3)]
    with pytest.raises(ResourceExhausted) as info:
        hub.open("a", "")
    assert info.value.quota == "max_watch_streams_per_tenant"
    assert "--max-watch-streams-per-tenant 3" in str(info.value)
    b = [hub.open("b", "") for _ in range(2)]
    with pytest.raises(ResourceExhausted) as info:
        hub.open("c", "")
    assert info.value.quota == "max_watch_streams" and "--max-watch-streams 5" in str(info.value)
    a[0].close()
    a[0].close()  # idempotent
    c = hub.open("c", "")
    assert (hub.open_streams("a"), hub.open_streams("c"), hub.open_streams()) == (2, 1, 5)
    for w in [*a[1:], *b, c]:
        w.close()
    assert hub.open_streams() == 0 and hub.readers() == 0


class FailingFeed(ViolationFeed):
    """A feed whose store is down after ``healthy`` reads."""

    def __init__(self, healthy: int) -> None:
        super().__init__(MemoryLogStore(), max_entries=100, dedup_window_ms=60_000)
        self.healthy = healthy

    async def after(self, tenant: str, cursor: str, count: int) -> list[Violation]:
        self.healthy -= 1
        if self.healthy < 0:
            raise StoreUnavailable("redis: connection refused")
        return await super().after(tenant, cursor, count)


async def test_a_store_outage_ends_the_tenants_watches_and_a_new_one_starts_a_new_reader() -> None:
    """The shared reader's failure reaches every watcher as StoreUnavailable; later watchers work."""
    feed = FailingFeed(healthy=0)
    hub = ViolationHub(feed, recheck_seconds=0.01)
    watches = [hub.open("t", ""), hub.open("t", "0-0")]
    for w in watches:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(w.next_batch(), WAIT_SECONDS)
        w.close()
    feed.healthy = 100
    with hub.open("t", "") as again:
        await asyncio.wait_for(hub.wait_ready("t"), WAIT_SECONDS)
        sent = await append(feed, "t", 2)
        assert [v.decision_id for v in await collect(again, 2)] == sent


# --- a real Redis-backed server ----------------------------------------------------------------


def redis_key(redis_url: str, tenant: str) -> str:
    result = spendgate_cli(
        *("keys", "create", "--redis-url", redis_url, "--tenant", tenant, "--scope", "admin"),
        *("--name", "ops"),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0]


def quota_of(error: grpc.aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            for detail in status_pb2.Status.FromString(value).details:
                failure = error_details_pb2.QuotaFailure()
                if detail.Unpack(failure):
                    return str(failure.violations[0].subject)
    return ""


def violate(target: str, metadata: Any, session: str) -> str:
    """Decide and settle on an unapproved model; returns the decision id."""
    from spendgate_client import DecisionClient

    with DecisionClient(target, timeout=5, api_key=dict(metadata)["authorization"][7:]) as client:
        decision = client.decide(session, "claude-test-small", 10, 10, b"f" * 32)
        client.settle(session, decision.reservation_id, "claude-test-small", input_tokens=10, output_tokens=1)
        return decision.decision_id


@pytest.mark.redis
@pytest.mark.parametrize(
    ("limit", "opened"), [(20, 100), (300, 300)], ids=["past-the-limit", "past-the-pool"]
)
def test_one_tenants_many_streams_neither_kill_anothers_watcher_nor_take_the_pool(
    spendgate: Callable[..., SpendgateServer], redis_url: str, tmp_path: Path, limit: int, opened: int
) -> None:
    """Tenant A opens many streams (past its limit, or past the 64-connection pool): B still gets its alert.

    The issue's 1,000 streams (512-607 aborted with "No connection available", and
    another tenant's watcher with them), scaled to this machine.
    """
    config = tmp_path / "prices.yaml"
    config.write_text(PRICES_YAML)
    noisy, quiet = bearer(redis_key(redis_url, "noisy")), bearer(redis_key(redis_url, "quiet"))
    server = spendgate(
        *("--store", "redis", "--redis-url", redis_url, "--evaluator", "on", "--config", str(config)),
        *("--evaluator-poll-millis", "20", "--max-watch-streams-per-tenant", str(limit)),
        *("--insecure",),
    )
    for metadata in (noisy, quiet):
        set_policies(server.target, metadata, approved_models=["claude-test-big"])

    async def scenario() -> None:
        # Four real connections (channels to one target share one by default): each stays
        # within the streams one connection may carry (README, Overload).
        local = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(server.target, options=local) for _ in range(4)]
        try:
            stubs = [violation_pb2_grpc.ViolationServiceStub(c) for c in channels]
            quiet_stream = stubs[0].WatchViolations(vpb.WatchViolationsRequest(), metadata=quiet)
            streams = [
                stubs[i % 4].WatchViolations(vpb.WatchViolationsRequest(), metadata=noisy)
                for i in range(opened)
            ]
            # The first read of each stream: a violation, or the refusal past the limit.
            reads = [asyncio.ensure_future(s.read()) for s in [quiet_stream, *streams]]
            expected = opened - min(limit, opened)
            deadline = time.monotonic() + WAIT_SECONDS
            while len(refused := [r for r in reads if r.done() and r.exception() is not None]) < expected:
                assert time.monotonic() < deadline, f"{len(refused)} of {expected} refused"
                await asyncio.sleep(0.01)
            assert len(refused) == expected
            for r in refused:
                error = r.exception()
                assert isinstance(error, grpc.aio.AioRpcError)
                assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert quota_of(error) == "max_watch_streams_per_tenant"
                assert f"--max-watch-streams-per-tenant {limit}" in (error.details() or "")
            quiet_id = await asyncio.to_thread(violate, server.target, quiet, "q1")
            noisy_id = await asyncio.to_thread(violate, server.target, noisy, "n1")
            got = await asyncio.wait_for(reads[0], WAIT_SECONDS)
            assert isinstance(got, vpb.WatchViolationsResponse) and got.violation.decision_id == quiet_id
            live = [r for r in reads[1:] if r not in refused]
            assert len(live) == min(limit, opened)
            for response in await asyncio.wait_for(asyncio.gather(*live), WAIT_SECONDS):
                assert isinstance(response, vpb.WatchViolationsResponse)
                assert response.violation.decision_id == noisy_id
            for s in [quiet_stream, *streams]:
                s.cancel()
        finally:
            for c in channels:
                await c.close()

    asyncio.run(scenario())
    events = server.log_events()
    assert not [e for e in events if "connection" in json.dumps(e).lower() and e.get("level") == "error"]
