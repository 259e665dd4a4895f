"""Admission control: past --max-in-flight, or too close to its deadline, a call is refused at once
with a clear status, and the client's fail mode applies; nothing is refused below the bound. The
client bounds its own calls awaiting an answer (max_outstanding) and refuses past it, unsent."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from spendgate_client import (
    DEFAULT_MAX_OUTSTANDING,
    AsyncDecisionClient,
    DecisionClient,
    JournaledAnthropic,
    SpendgateUnavailable,
)
from spendgate_client._client import _Outstanding
from spendgate_server.errors import DeadlineExceeded, ResourceExhausted
from spendgate_server.rpc.admission import Admission, stream_options

from tests.fake_provider import FakeProvider
from tests.processes import RedisServer, SpendgateServer, TcpProxy, read_ledger

MODEL = "gpt-4o"


def poll(what: str, check: Callable[[], bool], seconds: float = 20.0) -> None:
    """Wait until ``check()`` holds (bounded; the deadline is a safety net, not a timing)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --- the decisions, with the numbers given ------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "service", "refused"),
    [
        (None, 1.0, False),  # no deadline: never too late
        (0.250, 0.001, False),
        (0.001, 0.001, True),  # exactly one service time left: it would arrive too late
        (0.0005, 0.002, True),
        (0.0, 0.0, True),  # the deadline has passed
    ],
)
def test_a_call_too_close_to_its_deadline_is_refused(
    remaining: float | None, service: float, refused: bool
) -> None:
    """Refused when no more of its deadline is left than a call takes now; admitted otherwise."""
    admission = Admission(64, initial_service_seconds=service)
    late = admission.late(remaining)
    assert (late is not None) == refused
    if late is not None:
        assert isinstance(late, DeadlineExceeded)
        expected = "waited in the server's queue" if remaining == 0 else "deadline too close"
        assert expected in str(late)


def test_the_bound_counts_calls_taken_up_and_not_yet_ended() -> None:
    """The n+1-th call in flight is refused, naming the flag; one ending makes room; 0 is no bound."""
    admission = Admission(2)
    for _ in range(2):
        assert admission.full() is None
        admission.enter()
    full = admission.full()
    assert isinstance(full, ResourceExhausted) and full.quota == "max_in_flight"
    assert str(full).startswith("server at capacity: 2 calls in flight (--max-in-flight 2)")
    admission.leave(0.004)
    assert admission.full() is None
    unbounded = Admission(0)
    for _ in range(10_000):
        unbounded.enter()
    assert unbounded.full() is None


def test_the_service_time_follows_recent_calls() -> None:
    """A moving average: slow calls raise it, fast ones bring it back down."""
    admission = Admission(8)
    for _ in range(200):
        admission.enter()
        admission.leave(0.100)
    assert 0.099 < admission.service_seconds <= 0.100
    for _ in range(200):
        admission.enter()
        admission.leave(0.001)
    assert admission.service_seconds < 0.002


def test_stream_bound_leaves_room_for_watch_streams() -> None:
    """One connection may hold the bound's calls plus a tenant's watch streams; no bound, no limit."""
    assert stream_options(64, 64) == [("grpc.max_concurrent_streams", 128)]
    assert stream_options(0, 64) == []


# --- a real server whose calls hang on Redis ------------------------------------------------------


@pytest.fixture
def hung(
    redis_server: RedisServer, redis_url: str, spendgate: Callable[..., SpendgateServer]
) -> Iterator[tuple[SpendgateServer, TcpProxy]]:
    """A server with --max-in-flight 2 reaching Redis through a proxy that can lose replies."""
    proxy = TcpProxy(redis_server.port)
    server = spendgate(
        *("--store", "redis", "--redis-url", proxy.url, "--max-in-flight", "2"),
        # Hung calls hold their place in flight this long, then fail as outages.
        *("--redis-timeout-millis", "3000", "--redis-breaker-failures", "0"),
    )
    yield server, proxy
    proxy.close()


def _refusal(error: SpendgateUnavailable) -> grpc.RpcError:
    cause = error.__cause__
    assert isinstance(cause, grpc.RpcError)
    return cause


@pytest.mark.redis
def test_past_capacity_calls_are_refused_at_once_and_fail_open_applies(
    hung: tuple[SpendgateServer, TcpProxy], redis_server: RedisServer
) -> None:
    """Two calls hang on Redis; the third is RESOURCE_EXHAUSTED naming the flag, fail-open allows
    the wrapped call, and once the hung calls end the server admits again."""
    server, proxy = hung
    fake = FakeProvider().start()
    with (
        DecisionClient(server.target, timeout=30, fail_mode="closed") as patient,
        DecisionClient(server.target, timeout=5, fail_mode="closed") as closed,
        DecisionClient(server.target, timeout=5, fail_mode="open") as opened,
        ThreadPoolExecutor(2) as pool,
    ):
        assert closed.decide("warm", MODEL, 10, 10, uuid.uuid4().bytes).allowed
        proxy.drop_replies.set()
        stuck = [pool.submit(patient.decide, "stuck", MODEL, 10, 10, uuid.uuid4().bytes) for _ in range(2)]
        # Both ran in Redis (their replies are what is lost): both are in flight on the server.
        poll("the two calls to reach Redis", lambda: len(read_ledger(redis_server.port, "stuck").open) == 2)

        with pytest.raises(SpendgateUnavailable, match="RESOURCE_EXHAUSTED") as refused:
            closed.decide("third", MODEL, 10, 10, uuid.uuid4().bytes)
        error = _refusal(refused.value)
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            "server at capacity: 2 calls in flight (--max-in-flight 2); "
            "try another server, or let the client's fail mode decide"
        )

        allowed = opened.decide("third", MODEL, 10, 10, uuid.uuid4().bytes)
        assert (allowed.allowed, allowed.fail_open) == (True, True)
        assert allowed.reason == "fail open: spendgate RESOURCE_EXHAUSTED"
        with JournaledAnthropic(
            api_key="k", base_url=fake.base_url, session_id="wrapped", spendgate_target=server.target
        ) as client:
            message = client.messages.create(
                model="claude-test-big", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
            assert message.content[0].type == "text"  # the provider answered: the call went ahead
            assert client._spendgate_gate.client.stats.snapshot()["fail_open_allowances"] == 1
        assert [r.path for r in fake.requests] == ["/v1/messages"]

        for future in stuck:
            with pytest.raises(SpendgateUnavailable, match="UNAVAILABLE"):
                future.result()
        proxy.drop_replies.clear()
        poll("the server to admit again", lambda: _admits(closed))
    fake.stop()


def _admits(client: DecisionClient) -> bool:
    try:
        return client.decide("after", MODEL, 10, 10, uuid.uuid4().bytes).allowed
    except SpendgateUnavailable:
        return False  # the store connection is being re-made after the lost replies


@pytest.mark.redis
def test_a_call_whose_deadline_cannot_be_met_is_refused_at_once(
    hung: tuple[SpendgateServer, TcpProxy], redis_server: RedisServer
) -> None:
    """After calls took seconds (a hung Redis), a call with 50 ms left is refused DEADLINE_EXCEEDED
    by the server, saying why, instead of being started; a call with time to spare is served."""
    server, proxy = hung
    with (
        DecisionClient(server.target, timeout=30, fail_mode="closed") as patient,
        DecisionClient(server.target, timeout=0.05, fail_mode="closed") as hurried,
        DecisionClient(server.target, timeout=5, fail_mode="closed") as relaxed,
    ):
        proxy.drop_replies.set()
        with pytest.raises(SpendgateUnavailable, match="UNAVAILABLE"):
            patient.decide("slow", MODEL, 10, 10, uuid.uuid4().bytes)  # 3 s, then the store timeout
        proxy.drop_replies.clear()
        with pytest.raises(SpendgateUnavailable, match="DEADLINE_EXCEEDED") as refused:
            hurried.decide("hurried", MODEL, 10, 10, uuid.uuid4().bytes)
        details = _refusal(refused.value).details() or ""
        assert details.startswith("deadline too close to answer in time: ")
        assert not read_ledger(redis_server.port, "hurried").open  # nothing was started
        poll("the server to admit again", lambda: _admits(relaxed))


# --- the client's own bound: past max_outstanding a call is not sent ------------------------------


@pytest.fixture
def stalled(spendgate: Callable[..., SpendgateServer]) -> Iterator[tuple[SpendgateServer, RedisServer]]:
    """A server on a Redis that SIGSTOP can pause (by its PID): calls then wait on the store."""
    redis_server = RedisServer.start()
    server = spendgate(
        *("--store", "redis", "--redis-url", redis_server.url),
        # Calls wait for a paused Redis instead of failing, as on a store slower than the load.
        *("--redis-timeout-millis", "60000", "--redis-breaker-failures", "0"),
    )
    yield server, redis_server
    os.kill(redis_server.process.pid, signal.SIGCONT)
    redis_server.stop()


EXHAUSTED = (
    "RESOURCE_EXHAUSTED: 2 calls to spendgate at {target} already await their answer "
    "(max_outstanding=2): the service is slower than calls arrive"
)


@pytest.mark.redis
def test_past_its_bound_the_client_refuses_at_once_and_the_fail_mode_applies(
    stalled: tuple[SpendgateServer, RedisServer],
) -> None:
    """Two Decides wait on a paused Redis; the client's third is not sent: fail-closed raises
    RESOURCE_EXHAUSTED naming max_outstanding, fail-open allows it, a Settle is retried and
    given up; once Redis runs again the waiting calls are answered and the client sends again."""
    server, redis_server = stalled
    with (
        DecisionClient(server.target, timeout=60, fail_mode="closed", max_outstanding=2) as closed,
        DecisionClient(server.target, timeout=60, fail_mode="open", max_outstanding=2) as opened,
        ThreadPoolExecutor(4) as pool,
    ):
        assert closed.decide("warm", MODEL, 10, 10, uuid.uuid4().bytes).allowed
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        waiting = [
            pool.submit(client.decide, "waiting", MODEL, 10, 10, uuid.uuid4().bytes)
            for client in (closed, closed, opened, opened)
        ]
        poll("both clients to be at their bound", lambda: (closed.outstanding, opened.outstanding) == (2, 2))

        with pytest.raises(SpendgateUnavailable) as refused:
            closed.decide("third", MODEL, 10, 10, uuid.uuid4().bytes)
        assert refused.value.code == "RESOURCE_EXHAUSTED"
        assert refused.value.__cause__ is None  # never sent: no gRPC error behind it
        assert str(refused.value) == EXHAUSTED.format(target=server.target) + "; fail_mode is 'closed'"

        allowed = opened.decide("third", MODEL, 10, 10, uuid.uuid4().bytes)
        assert (allowed.allowed, allowed.fail_open, allowed.reservation_id) == (True, True, "")
        assert allowed.reason == "fail open: spendgate RESOURCE_EXHAUSTED (client max_outstanding)"

        # Settle is idempotent: each of its tries meets the bound, then it is given up.
        assert closed.settle("third", "r-1", MODEL, input_tokens=1) is None
        assert closed.stats.snapshot() == {
            "decisions": 4,
            "fail_open_allowances": 0,
            "outstanding_refusals": 4,  # the Decide and the Settle's three tries
            "settle_retries": 2,
            "settle_failures": 1,
        }
        assert opened.stats.snapshot()["fail_open_allowances"] == 1
        assert opened.stats.snapshot()["outstanding_refusals"] == 1

        os.kill(redis_server.process.pid, signal.SIGCONT)
        assert all(future.result().allowed and not future.result().fail_open for future in waiting)
        assert (closed.outstanding, opened.outstanding) == (0, 0)
        assert closed.decide("after", MODEL, 10, 10, uuid.uuid4().bytes).allowed
    assert len(read_ledger(redis_server.port, "waiting").open) == 4  # the refused calls wrote nothing
    assert not read_ledger(redis_server.port, "third").open


@pytest.mark.redis
async def test_the_async_client_counts_a_cancelled_call_as_ended(
    stalled: tuple[SpendgateServer, RedisServer],
) -> None:
    """An awaiting Decide fills a bound of 1, so the next is refused; cancelling it frees the place."""
    server, redis_server = stalled
    client = AsyncDecisionClient(server.target, timeout=60, fail_mode="closed", max_outstanding=1)
    try:
        assert (await client.decide("warm", MODEL, 10, 10, uuid.uuid4().bytes)).allowed
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        waiting = asyncio.ensure_future(client.decide("waiting", MODEL, 10, 10, uuid.uuid4().bytes))
        await asyncio.sleep(0)  # the task runs up to its first await: the call is sent
        assert client.outstanding == 1
        with pytest.raises(SpendgateUnavailable, match="max_outstanding=1") as refused:
            await client.decide("next", MODEL, 10, 10, uuid.uuid4().bytes)
        assert refused.value.code == "RESOURCE_EXHAUSTED"
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert client.outstanding == 0
        os.kill(redis_server.process.pid, signal.SIGCONT)
        assert (await client.decide("next", MODEL, 10, 10, uuid.uuid4().bytes)).allowed
        assert client.stats.snapshot()["outstanding_refusals"] == 1
    finally:
        await client.close()


@pytest.mark.parametrize("bound", [-1, 1.5, True, "64"])
def test_a_bound_that_is_no_count_is_refused_naming_it(bound: object) -> None:
    """max_outstanding must be a whole number >= 0; anything else is a ValueError naming it."""
    with pytest.raises(ValueError, match=r"^max_outstanding must be a whole number >= 0 \(0: no bound\)"):
        DecisionClient("127.0.0.1:1", max_outstanding=bound)  # type: ignore[arg-type]


def test_the_default_bound_is_the_servers() -> None:
    """A client holds at most what one server worker serves at once (--max-in-flight's default)."""
    from spendgate_server.settings import ServeSettings

    assert DecisionClient("127.0.0.1:1").max_outstanding == DEFAULT_MAX_OUTSTANDING
    assert AsyncDecisionClient("127.0.0.1:1").max_outstanding == DEFAULT_MAX_OUTSTANDING
    assert ServeSettings.__dataclass_fields__["max_in_flight"].default == DEFAULT_MAX_OUTSTANDING


@given(st.lists(st.booleans(), max_size=200), st.integers(0, 8))
def test_the_count_never_passes_the_bound(steps: list[bool], bound: int) -> None:
    """Against a reference count: enter succeeds exactly while below the bound, leave always frees."""
    outstanding, model = _Outstanding(bound), 0
    for enter in steps:
        if enter:
            expected = not bound or model < bound
            assert outstanding.enter() is expected
            model += expected
        elif model:
            outstanding.leave()
            model -= 1
        assert outstanding.count == model
        assert not bound or model <= bound
