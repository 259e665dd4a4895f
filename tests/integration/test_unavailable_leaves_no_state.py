"""A Decide answered UNAVAILABLE leaves no state, even when the store applies it late.

The adversarial round paused Redis with SIGSTOP for 3 s: Decides timed out and were
answered UNAVAILABLE, Redis woke up, ran the scripts waiting in its sockets, and 19
reservations appeared that no client knew of. Here: the cancel step on both stores
(every order of reserve and cancel), the engine handing unanswered reserves to the
canceller, and the issue's input against a real Redis paused by SIGSTOP (by the PID of
the test's own redis-server) behind a real ``spendgate serve``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc
from spendgate_server.engine.config import EnforcementConfig
from spendgate_server.engine.decide import DecisionEngine
from spendgate_server.engine.pricing import PriceTable
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.errors import StoreUnavailable
from spendgate_server.store import (
    CancelRequest,
    CancelStatus,
    DedupCheck,
    ReserveOutcome,
    ReserveRequest,
    ReserveStatus,
    SessionKey,
    SessionState,
    SettleOutcome,
    SettleRequest,
    Store,
)
from spendgate_server.store.breaker import BreakerOpen
from spendgate_server.store.memory import MemoryStore
from spendgate_server.store.redis import session_keys

from tests.conftest import FakeClock
from tests.processes import RedisServer, SpendgateServer, read_ledger
from tests.unit.test_rules import PRICES, call

NOW = 1_800_000_000_000
SESSION = SessionKey("t", "s")
TTL, SESSION_TTL = 60_000, 3_600_000
POLL_SECONDS = 20.0


def reserve(rid: str, *, now: int = NOW, request_id: str = "", fingerprint: str = "f" * 32) -> ReserveRequest:
    return ReserveRequest(
        SESSION,
        now,
        rid,
        500,
        TTL,
        SESSION_TTL,
        tool_call_count=3,
        dedup=DedupCheck(fingerprint, 10_000),
        request_id=request_id,
        memo=json.dumps([rid]) if request_id else "",
    )


def cancel_of(request: ReserveRequest, now: int = NOW + 5) -> CancelRequest:
    return CancelRequest.undoing(request, now)


async def assert_empty(store: Store, now: int = NOW + 10) -> None:
    state = await store.session_state(SESSION, now, SESSION_TTL)
    assert (state.spent_nano_usd, state.reserved_nano_usd, state.tool_calls, state.open_reservations) == (
        0,
        0,
        0,
        0,
    )


# --- the store's cancel: both stores, every order ----------------------------------------


async def test_cancel_after_the_reserve_undoes_all_it_recorded(store: Store) -> None:
    """Reservation, tool calls, dedup mark and request-id memo are all gone: the retry is a new call."""
    first = reserve("a" * 32, request_id="req-1")
    assert (await store.reserve(first)).status is ReserveStatus.ALLOWED
    assert await store.cancel(cancel_of(first)) is CancelStatus.CANCELLED
    await assert_empty(store)
    retry = reserve("b" * 32, now=NOW + 20, request_id="req-1")
    outcome = await store.reserve(retry)
    assert outcome.status is ReserveStatus.ALLOWED  # not a duplicate, not a replay
    assert (outcome.reserved_nano_usd, outcome.tool_calls) == (500, 3)


async def test_cancel_before_the_reserve_makes_it_change_nothing(store: Store) -> None:
    """A reserve arriving after its cancel (another connection, reordered) meets a tombstone."""
    late = reserve("a" * 32, request_id="req-1")
    assert await store.cancel(cancel_of(late)) is CancelStatus.TOMBSTONED
    outcome = await store.reserve(late)
    assert outcome.status is ReserveStatus.CANCELLED
    await assert_empty(store)
    # The tombstone is forgotten after its ttl; other ids were never affected.
    assert (await store.reserve(reserve("b" * 32))).status is ReserveStatus.ALLOWED
    assert (await store.reserve(reserve("a" * 32, now=NOW + TTL + 20_000))).status is ReserveStatus.ALLOWED


async def test_a_reservation_a_client_knows_is_kept(store: Store) -> None:
    """Replayed to a retrying client, or settled, a reservation stays: that client settles it."""
    replayed = reserve("a" * 32, request_id="req-1")
    await store.reserve(replayed)
    assert (await store.reserve(reserve("z" * 32, request_id="req-1"))).status is ReserveStatus.REPLAYED
    assert await store.cancel(cancel_of(replayed)) is CancelStatus.KEPT
    settled = reserve("b" * 32, fingerprint="e" * 32)
    await store.reserve(settled)
    await store.settle(SettleRequest(SESSION, NOW + 1, "b" * 32, 40, TTL, SESSION_TTL))
    assert await store.cancel(cancel_of(settled)) is CancelStatus.KEPT
    state = await store.session_state(SESSION, NOW + 10, SESSION_TTL)
    assert (state.spent_nano_usd, state.reserved_nano_usd, state.open_reservations) == (40, 500, 1)


async def test_cancel_of_an_expired_reservation_takes_its_estimate_back(store: Store) -> None:
    """Redis hung longer than the reservation ttl: the late reserve expired, counted; the cancel undoes it."""
    stale = reserve("a" * 32)
    await store.reserve(stale)
    later = NOW + TTL + 1
    assert (await store.session_state(SESSION, later, SESSION_TTL)).spent_nano_usd == 500
    assert await store.cancel(cancel_of(stale, later)) is CancelStatus.CANCELLED
    await assert_empty(store, later)


async def test_a_dedup_mark_moved_by_a_later_call_stays(store: Store) -> None:
    """The cancel removes its own dedup mark only: one a later admitted call set stays in force."""
    first = reserve("a" * 32)
    await store.reserve(first)
    await store.reserve(reserve("b" * 32, now=NOW + 10_000))  # the mark expired; this one sets it again
    await store.cancel(cancel_of(first, NOW + 10_001))
    duplicate = await store.reserve(reserve("c" * 32, now=NOW + 10_002))
    assert duplicate.status is ReserveStatus.BLOCKED


# --- the engine hands unanswered reserves to the canceller --------------------------------


class LostReplies(Store):
    """A store that applies every reserve and then loses the reply (as a hung Redis does)."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.down = True
        self.refuse: StoreUnavailable | None = None

    async def reserve(self, request: ReserveRequest) -> ReserveOutcome:
        if self.refuse is not None:
            raise self.refuse
        await self.inner.reserve(request)
        raise StoreUnavailable("redis: Timeout reading from 127.0.0.1:6379")

    async def cancel(self, request: CancelRequest) -> CancelStatus:
        if self.down:
            raise StoreUnavailable("redis: Timeout reading from 127.0.0.1:6379")
        return await self.inner.cancel(request)

    async def settle(self, request: SettleRequest) -> SettleOutcome:
        return await self.inner.settle(request)

    async def session_state(self, session: SessionKey, now_ms: int, session_ttl_ms: int) -> SessionState:
        return await self.inner.session_state(session, now_ms, session_ttl_ms)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_engine_cancels_a_reserve_it_answered_unavailable(clock: FakeClock) -> None:
    """UNAVAILABLE says nothing is reserved, and once the store answers, nothing is."""
    store = LostReplies(MemoryStore())
    engine = DecisionEngine(
        store, PriceTable(PRICES), ConfigResolver.static(EnforcementConfig()), clock=clock
    )
    with pytest.raises(StoreUnavailable, match="nothing is reserved"):
        await engine.decide(call(1000, 100))
    session = SessionKey("t", "s1")
    assert (await store.session_state(session, clock(), SESSION_TTL)).reserved_nano_usd > 0
    assert engine.canceller.pending == 1
    assert await engine.canceller.drain_once() == 0  # still down: kept for the next round
    store.down = False
    assert await engine.canceller.drain_once() == 1
    assert engine.canceller.outcomes == {"cancelled": 1}
    state = await store.session_state(session, clock(), SESSION_TTL)
    assert (state.reserved_nano_usd, state.open_reservations) == (0, 0)
    # A call the circuit breaker refused never reached the store: nothing to cancel.
    store.refuse = BreakerOpen("redis circuit breaker open")
    with pytest.raises(BreakerOpen):
        await engine.decide(call(1000, 100, prompt="other"))
    assert engine.canceller.pending == 0


# --- the input: a real Redis paused by SIGSTOP ------------------------------------


@pytest.fixture
def paused_redis() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


def decide_request(session: str, i: int) -> pb.DecideRequest:
    return pb.DecideRequest(
        session_id=session,
        model="claude-sonnet-4-5",
        input_tokens=1000,
        max_output_tokens=500,
        fingerprint=hashlib.sha256(b"same prompt").digest(),
        tool_call_count=1,
        request_id=f"req-{i}",
        enforcement_config=pb.EnforcementConfig(dedup_ttl_seconds=600),
    )


@pytest.mark.redis
@pytest.mark.parametrize("pipelining", ["on", "off"])
def test_decides_answered_unavailable_while_redis_is_stopped_leave_no_state(
    spendgate: Callable[..., SpendgateServer], paused_redis: RedisServer, pipelining: str
) -> None:
    """SIGSTOP Redis, 20 concurrent Decides get UNAVAILABLE, SIGCONT: no reservation, count or mark stays."""
    server = spendgate(
        *("--store", "redis", "--redis-url", paused_redis.url, "--redis-pipelining", pipelining),
        *("--redis-timeout-millis", "100", "--health-interval-millis", "100"),
    )
    sessions = [f"s-{uuid.uuid4().hex[:8]}-{i}" for i in range(20)]
    with grpc.insecure_channel(server.target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        assert stub.Decide(decide_request("warm-up", 99), timeout=5).verdict == pb.VERDICT_ALLOW
        os.kill(paused_redis.process.pid, signal.SIGSTOP)
        try:

            def attempt(index: int) -> tuple[grpc.StatusCode, str]:
                try:
                    stub.Decide(decide_request(sessions[index], index), timeout=5)
                except grpc.RpcError as exc:
                    return exc.code(), exc.details() or ""
                return grpc.StatusCode.OK, ""

            with ThreadPoolExecutor(len(sessions)) as pool:
                answers = list(pool.map(attempt, range(len(sessions))))
            assert {code for code, _ in answers} == {grpc.StatusCode.UNAVAILABLE}
            # The reply says so: nothing is reserved (or the breaker refused it before Redis).
            assert all("nothing is reserved" in text or "breaker" in text for _, text in answers), answers
        finally:
            os.kill(paused_redis.process.pid, signal.SIGCONT)

        client = redis.Redis(port=paused_redis.port, decode_responses=True)

        def leftovers() -> dict[str, object]:
            """What each session still holds that a Decide answered UNAVAILABLE recorded."""
            found: dict[str, object] = {}
            for session in sessions:
                ledger = read_ledger(client, session)
                key = session_keys(SessionKey("default", session), "sg")[0]
                fields = sorted(k for k in client.hkeys(key) if k[:2] in ("r:", "q:", "m:", "a:"))
                tools = int(client.hget(key, "tools") or 0)
                if ledger.spent or ledger.reserved or ledger.open or ledger.expired or fields or tools:
                    found[session] = (ledger, fields, tools)
            return found

        try:
            deadline = time.monotonic() + POLL_SECONDS
            while remaining := leftovers():
                assert time.monotonic() < deadline, f"phantom state remains: {remaining}"
                time.sleep(0.05)
        finally:
            client.close()
        # Each session's retry, same request id and prompt, is a new call: not a duplicate, not a replay.
        for index, session in enumerate(sessions):
            retried = stub.Decide(decide_request(session, index), timeout=5)
            assert retried.verdict == pb.VERDICT_ALLOW, retried
            assert retried.session_spend_nano_usd == retried.estimated_cost_nano_usd
    rounds = [e for e in server.log_events() if e.get("event") == "unanswered_reserves_cancelled"]
    assert sum(int(str(e.get("cancelled", 0))) + int(str(e.get("tombstoned", 0))) for e in rounds) >= 1
