"""Reliability: the circuit breaker, Redis outages and restarts, killed workers and clients.

Fault cases run real redis-server and spendgate processes and poll with bounded
deadlines; none asserts a wall-clock duration. Session state is read straight from
Redis (the layout of lua/_session.lua) to prove where every nano-USD went.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio.cluster import RedisCluster
from spendgate_client import DecisionClient, InvalidRequest, SpendgateUnavailable
from spendgate_server.errors import ConfigError, StoreUnavailable
from spendgate_server.store import (
    ReserveOutcome,
    ReserveRequest,
    ReserveStatus,
    SessionKey,
    SessionState,
    SettleOutcome,
    SettleRequest,
    Store,
)
from spendgate_server.store.breaker import BreakerState, CircuitBreakerStore
from spendgate_server.store.redis import RedisStore, connect, load_script, session_keys

from tests.processes import RedisServer, SpendgateServer, TcpProxy, read_ledger, restart_redis

MODEL = "rel-model"
PRICES = "prices:\n  rel-model: {input_usd_per_mtok: 1, output_usd_per_mtok: 2}\n"
# 1000 input tokens at $1/Mtok plus 500 output tokens at $2/Mtok, in nano-USD.
ESTIMATE = 2_000_000
# The same call settled with 100 output tokens.
ACTUAL = 1_200_000
POLL_SECONDS = 20.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --- helpers --------------------------------------------------------------------------


def poll(what: str, check: Callable[[], bool], seconds: float = POLL_SECONDS) -> None:
    """Wait until ``check()`` holds (bounded; the deadline is a safety net, not a timing)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return int(reply.status)


def fingerprint() -> bytes:
    return uuid.uuid4().bytes


@pytest.fixture
def prices(tmp_path: Path) -> str:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES)
    return str(path)


def recorded(port: int, session: str) -> dict[str, int]:
    """Every reservation the session ever admitted that is not settled: open or expired."""
    ledger = read_ledger(port, session)
    return ledger.open | ledger.expired


def serve_redis(spendgate: Callable[..., SpendgateServer], url: str, *args: str) -> SpendgateServer:
    return spendgate("--store", "redis", "--redis-url", url, *args)


def decide(client: DecisionClient, session: str, print_: bytes | None = None, **kwargs: object) -> str:
    """Decide one standard call (a new request unless ``print_`` repeats one); return its reservation id.

    The call must be allowed.
    """
    decision = client.decide(session, MODEL, 1000, 500, print_ or fingerprint(), **kwargs)  # type: ignore[arg-type]
    assert decision.allowed and decision.estimated_cost_nano_usd == ESTIMATE, decision
    return decision.reservation_id


def settle(client: DecisionClient, session: str, reservation_id: str) -> None:
    settled = client.settle(session, reservation_id, MODEL, input_tokens=1000, output_tokens=100)
    assert settled is not None and settled.cost_nano_usd == ACTUAL


def bystander(client: DecisionClient, session: str, calls: int) -> list[str]:
    """Decide and settle ``calls`` calls normally: the session that must stay unaffected."""
    ids = [decide(client, session) for _ in range(calls)]
    for rid in ids:
        settle(client, session, rid)
    return ids


def assert_exact(port: int, session: str, settled_ids: list[str]) -> None:
    ledger = read_ledger(port, session)
    assert ledger.settled == dict.fromkeys(settled_ids, ACTUAL)
    assert (ledger.spent, ledger.reserved, ledger.open, ledger.expired) == (
        ACTUAL * len(settled_ids),
        0,
        {},
        {},
    )


# --- the breaker, with a fake store and a fake clock ---------------------------------------


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(Store):
    """A store whose every call fails with StoreUnavailable while ``down`` is set."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def _answer(self) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise StoreUnavailable("redis: connection refused")

    async def reserve(self, request: ReserveRequest) -> ReserveOutcome:
        await self._answer()
        return ReserveOutcome(ReserveStatus.ALLOWED, 0, request.estimate_nano_usd, 0)

    async def settle(self, request: SettleRequest) -> SettleOutcome:
        raise NotImplementedError

    async def session_state(self, session: SessionKey, now_ms: int, session_ttl_ms: int) -> SessionState:
        await self._answer()
        return SessionState(0, 0, 0, 0)

    async def ping(self) -> None:
        await self._answer()

    async def close(self) -> None:
        return None


def state_of(breaker: CircuitBreakerStore) -> BreakerState:
    # A function, so mypy does not narrow the property across awaits.
    return breaker.state


def state_call(store: Store) -> Awaitable[SessionState]:
    return store.session_state(SessionKey("t", "s"), 0, 1)


async def test_breaker_opens_after_consecutive_failures_and_fails_fast() -> None:
    """After N consecutive outages, calls fail at once without reaching the store."""
    inner, clock = FlakyStore(), FakeMonotonic()
    breaker = CircuitBreakerStore(inner, failure_threshold=3, open_seconds=1.0, clock=clock)
    inner.down = True
    for _ in range(3):
        with pytest.raises(StoreUnavailable, match="connection refused"):
            await state_call(breaker)
    assert state_of(breaker) is BreakerState.OPEN and inner.calls == 3
    for _ in range(10):
        with pytest.raises(StoreUnavailable, match="circuit breaker open after 3 consecutive failures"):
            await state_call(breaker)
    assert inner.calls == 3


async def test_breaker_success_resets_the_failure_count() -> None:
    """Failures must be consecutive: one success in between keeps the breaker closed."""
    inner = FlakyStore()
    breaker = CircuitBreakerStore(inner, failure_threshold=3, clock=FakeMonotonic())
    for _ in range(5):
        inner.down = True
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                await state_call(breaker)
        inner.down = False
        await state_call(breaker)
    assert state_of(breaker) is BreakerState.CLOSED


async def test_breaker_half_open_trial_closes_or_reopens() -> None:
    """After the open period one trial goes through: failure reopens, success closes."""
    inner, clock = FlakyStore(), FakeMonotonic()
    breaker = CircuitBreakerStore(inner, failure_threshold=1, open_seconds=1.0, clock=clock)
    inner.down = True
    with pytest.raises(StoreUnavailable):
        await state_call(breaker)
    clock.now += 1.0
    assert state_of(breaker) is BreakerState.HALF_OPEN
    with pytest.raises(StoreUnavailable, match="connection refused"):
        await state_call(breaker)  # the trial reached the store and failed
    assert state_of(breaker) is BreakerState.OPEN and inner.calls == 2
    clock.now += 1.0
    inner.down = False
    await state_call(breaker)
    assert state_of(breaker) is BreakerState.CLOSED and inner.calls == 3


async def test_breaker_lets_one_trial_at_a_time_and_frees_it_on_cancel() -> None:
    """While a trial is in flight others fail fast; a cancelled trial does not wedge the breaker."""
    inner, clock = FlakyStore(), FakeMonotonic()
    breaker = CircuitBreakerStore(inner, failure_threshold=1, open_seconds=1.0, clock=clock)
    inner.down = True
    with pytest.raises(StoreUnavailable):
        await state_call(breaker)
    clock.now += 1.0
    inner.gate = asyncio.Event()
    trial = asyncio.ensure_future(state_call(breaker))
    await asyncio.sleep(0)  # let the trial reach the store
    with pytest.raises(StoreUnavailable, match="trial call"):
        await state_call(breaker)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    inner.gate, inner.down = None, False
    await state_call(breaker)
    assert state_of(breaker) is BreakerState.CLOSED


async def test_breaker_ping_passes_through_and_ends_the_open_period() -> None:
    """Health pings always reach the store; a successful one lets the next call try at once."""
    inner, clock = FlakyStore(), FakeMonotonic()
    breaker = CircuitBreakerStore(inner, failure_threshold=2, open_seconds=60.0, clock=clock)
    inner.down = True
    for _ in range(2):
        with pytest.raises(StoreUnavailable, match="connection refused"):
            await breaker.ping()  # failed pings count: an idle server still notices
    assert state_of(breaker) is BreakerState.OPEN
    inner.down = False
    await breaker.ping()
    assert state_of(breaker) is BreakerState.HALF_OPEN
    await state_call(breaker)
    assert state_of(breaker) is BreakerState.CLOSED


async def test_breaker_ignores_errors_of_a_store_that_answered() -> None:
    """An error raised after the store answered (a bug of ours) is not an outage."""

    class Broken(FlakyStore):
        async def session_state(self, session: SessionKey, now_ms: int, session_ttl_ms: int) -> SessionState:
            raise RuntimeError("spendgate Lua script failed")

    breaker = CircuitBreakerStore(Broken(), failure_threshold=1, clock=FakeMonotonic())
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await state_call(breaker)
    assert state_of(breaker) is BreakerState.CLOSED


# --- the Redis client --------------------------------------------------------------------


async def test_connect_chooses_the_cluster_client_by_scheme() -> None:
    """redis+cluster:// gives redis-py's cluster client with every listed startup node."""
    cluster = connect("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", timeout_seconds=0.1)
    single = connect("redis://127.0.0.1:6379/0", timeout_seconds=0.1)
    try:
        assert isinstance(cluster, RedisCluster)
        assert sorted(n.port for n in cluster.startup_nodes) == [7000, 7001]
        assert not isinstance(single, RedisCluster)
    finally:
        await cluster.aclose()
        await single.aclose()
    for bad in ("redis+cluster://127.0.0.1:7000/3", "redis+cluster://", "http://127.0.0.1"):
        with pytest.raises(ConfigError, match="--redis-url"):
            connect(bad, timeout_seconds=0.1)


@pytest.mark.redis
async def test_out_of_memory_is_an_outage_but_a_broken_script_is_a_bug() -> None:
    """OOM raised inside a script becomes StoreUnavailable (UNAVAILABLE); a script error stays INTERNAL."""
    server = RedisServer.start("--maxmemory-policy", "noeviction")
    store = RedisStore.from_url(server.url)
    request = ReserveRequest(SessionKey("t", "s"), 1, "r1", 10, 1000, 100_000)
    try:
        raw = redis.Redis(port=server.port)
        raw.set("ballast", "x" * 2_000_000)
        raw.config_set("maxmemory", "1mb")
        with pytest.raises(StoreUnavailable, match="maxmemory"):
            await store.reserve(request)
        raw.config_set("maxmemory", "0")
        # A session key of the wrong type makes the script itself fail: our bug, not an outage.
        raw.set(session_keys(request.session, "sg")[0], "not a hash")
        raw.close()
        with pytest.raises(RuntimeError, match="Lua script failed"):
            await store.reserve(request)
    finally:
        await store.close()
        server.stop()


@pytest.mark.redis
async def test_pooled_connections_survive_a_redis_restart() -> None:
    """After Redis restarts, connections it closed are replaced before use: no call fails."""
    server = RedisServer.start()
    store = RedisStore.from_url(server.url)

    async def burst() -> list[BaseException | ReserveOutcome]:
        return await asyncio.gather(
            *(
                store.reserve(
                    ReserveRequest(SessionKey("t", f"s{i}"), 1, uuid.uuid4().hex, 10, 1000, 100_000)
                )
                for i in range(20)
            ),
            return_exceptions=True,
        )

    try:
        assert all(isinstance(r, ReserveOutcome) for r in await burst())  # fills the pool
        # In a thread, so the event loop sees the old connections being closed.
        server = await asyncio.to_thread(restart_redis, server)
        assert [r for r in await burst() if not isinstance(r, ReserveOutcome)] == []
    finally:
        await store.close()
        server.stop()


# --- real processes: outages, restarts, killed workers and clients --------------------------


@pytest.mark.redis
def test_hung_redis_is_answered_unavailable_at_once_and_recovers(
    spendgate: Callable[..., SpendgateServer],
) -> None:
    """A hung Redis: UNAVAILABLE within the deadline, then at once from the breaker; it heals alone."""
    redis_server = RedisServer.start()
    try:
        server = serve_redis(
            spendgate,
            redis_server.url,
            *("--redis-timeout-millis", "100", "--health-interval-millis", "100"),
            *("--redis-breaker-failures", "3", "--redis-breaker-open-millis", "300"),
        )
        with DecisionClient(server.target, timeout=2, fail_mode="closed") as client:
            assert client.decide("hung", MODEL, 10, 10, fingerprint()).allowed
            os.kill(redis_server.process.pid, signal.SIGSTOP)
            try:
                details = []
                for _ in range(8):
                    with pytest.raises(SpendgateUnavailable) as raised:
                        client.decide("hung", MODEL, 10, 10, fingerprint())
                    cause = raised.value.__cause__
                    assert isinstance(cause, grpc.RpcError)
                    # UNAVAILABLE, not DEADLINE_EXCEEDED: the server answered within the deadline.
                    assert cause.code() is grpc.StatusCode.UNAVAILABLE
                    details.append(cause.details() or "")
                assert any("circuit breaker open" in d for d in details), details
                poll("health NOT_SERVING", lambda: health(server.target) == NOT_SERVING)
            finally:
                os.kill(redis_server.process.pid, signal.SIGCONT)

            def answered() -> bool:
                try:
                    return client.decide("hung", MODEL, 10, 10, fingerprint()).allowed
                except SpendgateUnavailable:
                    return False

            poll("decisions after Redis resumed", answered)
            poll("health SERVING", lambda: health(server.target) == SERVING)
        events = [e["event"] for e in server.log_events()]
        assert "store_breaker_open" in events and "store_breaker_closed" in events
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
        redis_server.stop()


@pytest.mark.redis
@pytest.mark.parametrize("persistence", ["aof-everysec", "none"])
def test_redis_restart(persistence: str, spendgate: Callable[..., SpendgateServer], prices: str) -> None:
    """With AOF, spend and open reservations survive a restart; without it, the session restarts at zero."""
    aof = persistence == "aof-everysec"
    redis_server = RedisServer.start(*(("--appendonly", "yes", "--appendfsync", "everysec") if aof else ()))
    # SHA-1 names a script in Redis; it is not used for security here.
    decide_sha = hashlib.sha1(load_script("decide").encode(), usedforsecurity=False).hexdigest()
    try:
        server = serve_redis(
            spendgate, redis_server.url, "--config", prices, "--health-interval-millis", "100"
        )
        with DecisionClient(server.target, timeout=2, fail_mode="closed") as client:
            settled_id = decide(client, "restart")
            settle(client, "restart", settled_id)
            open_id = decide(client, "restart")
            redis_server = restart_redis(redis_server)
            raw = redis.Redis(port=redis_server.port)
            try:
                # Scripts are never persisted: the next call meets NOSCRIPT and reloads them.
                assert raw.script_exists(decide_sha) == [False]
                after: list[int] = []

                def answered() -> bool:
                    try:
                        decision = client.decide("restart", MODEL, 1000, 500, fingerprint())
                    except SpendgateUnavailable:
                        return False  # the breaker may still be open from the restart
                    after.append(decision.session_spend_nano_usd)
                    return True

                poll("a decision after the restart", answered)
                assert raw.script_exists(decide_sha) == [True]
            finally:
                raw.close()
            if aof:
                # Settled spend, the open reservation and the new one: nothing was lost.
                assert after == [ACTUAL + ESTIMATE + ESTIMATE]
                settle(client, "restart", open_id)
            else:
                # Everything is gone: spend, reservations, dedup windows, tool counts.
                assert after == [ESTIMATE]
                with pytest.raises(InvalidRequest, match="NOT_FOUND"):
                    client.settle("restart", open_id, MODEL, input_tokens=1000, output_tokens=100)
    finally:
        redis_server.stop()


@pytest.mark.redis
def test_worker_killed_mid_call(
    redis_server: RedisServer, redis_url: str, spendgate: Callable[..., SpendgateServer], prices: str
) -> None:
    """A worker killed after Redis ran its calls: they expire at their estimate; a retry counts once."""
    proxy = TcpProxy(redis_server.port)
    calls = 4
    try:
        # The victim reaches Redis through the proxy, which will lose its replies.
        # Its Redis timeout outlasts the test: the worker dies waiting, it does not time out.
        victim = serve_redis(
            spendgate,
            proxy.url,
            "--config",
            prices,
            "--reservation-ttl-seconds",
            "4",
            "--redis-timeout-millis",
            "60000",
        )
        survivor = serve_redis(spendgate, redis_url, "--config", prices, "--reservation-ttl-seconds", "4")
        with (
            DecisionClient(victim.target, timeout=30, fail_mode="closed") as to_victim,
            DecisionClient(survivor.target, timeout=5, fail_mode="closed") as to_survivor,
            ThreadPoolExecutor(calls) as pool,
        ):
            before = bystander(to_survivor, "bystander", 2)
            request_ids = [uuid.uuid4().hex for _ in range(calls)]
            prints = [fingerprint() for _ in range(calls)]
            proxy.drop_replies.set()
            futures = [
                pool.submit(decide, to_victim, "killed", p, request_id=r)
                for r, p in zip(request_ids, prints, strict=True)
            ]
            poll("Redis to run every call", lambda: len(recorded(redis_server.port, "killed")) == calls)
            victim.process.kill()
            victim.process.wait()
            for future in futures:
                with pytest.raises(SpendgateUnavailable):
                    future.result()
            # The caller retries one call, unchanged, on another worker with its request id: same
            # decision back (a request id reused for a different request would be refused).
            retried = decide(to_survivor, "killed", prints[0], request_id=request_ids[0])
            assert retried in read_ledger(redis_server.port, "killed").open
            settle(to_survivor, "killed", retried)
            after = bystander(to_survivor, "bystander", 2)
        poll("reservations to expire", lambda: not read_ledger(redis_server.port, "killed").open)
        ledger = read_ledger(redis_server.port, "killed")
        assert ledger.settled == {retried: ACTUAL}
        assert len(ledger.expired) == calls - 1 and set(ledger.expired.values()) == {ESTIMATE}
        assert retried not in ledger.expired
        assert (ledger.spent, ledger.reserved) == ((calls - 1) * ESTIMATE + ACTUAL, 0)
        assert_exact(redis_server.port, "bystander", before + after)
    finally:
        proxy.close()


_DOOMED_CLIENT = """
import json, sys, uuid
from spendgate_client import DecisionClient
client = DecisionClient(sys.argv[1], timeout=5, fail_mode="closed")
ids = [client.decide("orphan", "rel-model", 1000, 500, uuid.uuid4().bytes).reservation_id for _ in range(3)]
print(json.dumps(ids), flush=True)
sys.stdin.read()  # wait to be killed before settling
"""


@pytest.mark.redis
def test_client_killed_between_decide_and_settle(
    redis_server: RedisServer, redis_url: str, spendgate: Callable[..., SpendgateServer], prices: str
) -> None:
    """A client killed before settling: its calls count at their estimate; a late settle corrects once."""
    server = serve_redis(spendgate, redis_url, "--config", prices, "--reservation-ttl-seconds", "1")
    doomed = subprocess.Popen(
        [sys.executable, "-c", _DOOMED_CLIENT, server.target], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert doomed.stdout is not None
        orphans: list[str] = json.loads(doomed.stdout.readline())
    finally:
        doomed.kill()
        doomed.wait()
        for pipe in (doomed.stdin, doomed.stdout):
            if pipe is not None:
                pipe.close()
    assert len(orphans) == 3
    with DecisionClient(server.target, timeout=5, fail_mode="closed") as client:
        settled = bystander(client, "bystander", 3)
        poll("orphans to expire", lambda: not read_ledger(redis_server.port, "orphan").open)
        ledger = read_ledger(redis_server.port, "orphan")
        assert ledger.expired == dict.fromkeys(orphans, ESTIMATE)
        assert (ledger.spent, ledger.reserved) == (3 * ESTIMATE, 0)
        # The real usage turns up late (a restarted client): corrected, and counted once.
        for _ in range(2):
            client.settle("orphan", orphans[0], MODEL, input_tokens=1000, output_tokens=100)
        ledger = read_ledger(redis_server.port, "orphan")
        assert ledger.settled == {orphans[0]: ACTUAL}
        assert ledger.spent == 2 * ESTIMATE + ACTUAL
    assert_exact(redis_server.port, "bystander", settled)


@pytest.mark.redis
async def test_pipelining_off_uses_the_pool(redis_url: str) -> None:
    """--redis-pipelining off runs the same scripts through redis-py's pool, with the same results."""
    from spendgate_server.store.base import ReserveRequest, ReserveStatus, SessionKey

    pooled = RedisStore.from_url(redis_url, timeout_seconds=5, pipelined=False)
    piped = RedisStore.from_url(redis_url, timeout_seconds=5)
    try:
        session = SessionKey("t", "pipelining")
        for store, rid in ((pooled, "1" * 32), (piped, "2" * 32)):
            outcome = await store.reserve(ReserveRequest(session, 1, rid, 10, 60_000, 3_600_000))
            assert outcome.status is ReserveStatus.ALLOWED
        assert (await pooled.session_state(session, 1, 3_600_000)).reserved_nano_usd == 20
    finally:
        await pooled.close()
        await piped.close()
