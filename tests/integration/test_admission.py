"""Admission control: past --max-in-flight, or too close to its deadline, a call is refused at once
with a clear status, and the client's fail mode applies; nothing is refused below the bound."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from spendgate_client import DecisionClient, JournaledAnthropic, SpendgateUnavailable
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
