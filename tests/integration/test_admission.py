"""Admission control: past --max-in-flight, or too close to its deadline, a call is refused at once
with a clear status, and the client's fail mode applies; nothing is refused below the bound. The
client bounds its own calls awaiting an answer (max_outstanding) and refuses past it, unsent."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc
from spendgate_client import (
    DEFAULT_MAX_OUTSTANDING,
    AsyncDecisionClient,
    DecisionClient,
    JournaledAnthropic,
    SpendgateUnavailable,
)
from spendgate_client._client import _Outstanding
from spendgate_server.errors import DeadlineExceeded, ResourceExhausted
from spendgate_server.rpc.admission import TIMEOUT_METADATA, Admission, sent_timeout_seconds, stream_options

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
    one = Admission(1)
    one.enter()
    assert str(one.full()).startswith("server at capacity: 1 call in flight (--max-in-flight 1)")
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


def test_a_standing_queue_sheds_calls_past_their_target() -> None:
    """CoDel's rule on a given sequence (20% of a 250 ms timeout: 50 ms): waits past the target are
    served until none has come through within it for the 100 ms interval, then shed, until one does."""
    admission = Admission(64, queue_target_percent=20)
    timeout = 0.250
    assert admission.queued(0.010, timeout, now=0.000) is None  # within its target
    assert admission.queued(0.080, timeout, now=0.050) is None  # past it, but a burst may drain
    assert admission.queued(0.120, timeout, now=0.099) is None  # 99 ms without a short wait
    shed = admission.queued(0.120, timeout, now=0.100)  # a whole interval: the queue stands
    assert isinstance(shed, ResourceExhausted) and shed.quota == "queue_target_percent"
    assert str(shed) == (
        "server overloaded: the call waited 120 ms before the server took it up, past 20% of its "
        "250 ms timeout, and no call has come through within its target for 100 ms "
        "(--queue-target-percent 20); let the client's fail mode decide"
    )
    assert admission.queued(0.300, timeout, now=0.150) is not None  # still standing
    assert admission.queued(0.050, timeout, now=0.160) is None  # exactly at its target: came through
    assert admission.queued(0.200, timeout, now=0.200) is None  # a new interval starts
    # The target is each call's own: 20% of a 5 s timeout is 1 s.
    assert admission.queued(0.900, 5.0, now=0.210) is None
    assert admission.queued(0.900, 5.0, now=0.300) is None


def test_sparse_calls_that_each_waited_long_are_never_shed() -> None:
    """An interval with no call taken up means the queue drained: a late call after it starts a new
    interval instead of being shed, however many such calls came before."""
    admission = Admission(64, queue_target_percent=20)
    for second in range(10):
        assert admission.queued(0.200, 0.250, now=float(second)) is None
    # Dense ones are a standing queue: shed once it has stood for the interval.
    assert admission.queued(0.200, 0.250, now=10.05) is None  # starts the interval
    assert admission.queued(0.200, 0.250, now=10.10) is None
    assert admission.queued(0.200, 0.250, now=10.16) is not None


def test_no_target_sheds_nothing() -> None:
    """--queue-target-percent 0: no wait is ever shed."""
    admission = Admission(64, queue_target_percent=0)
    assert all(admission.queued(10.0, 0.25, now=float(t)) is None for t in range(100))


SECONDS = st.floats(0.0, 2.0, allow_nan=False)


@given(
    st.lists(st.tuples(st.none() | SECONDS, st.none() | st.floats(0.001, 5.0), SECONDS), max_size=50),
    st.floats(0.0, 0.1),
)
def test_the_refusal_at_take_up_is_late_then_queued(
    calls: list[tuple[float | None, float | None, float]], service: float
) -> None:
    """Against a reference admission asked late() then, with a deadline and a sent timeout, queued():
    refusal() gives the same answers, and leaves the queue in the same state, call after call."""
    admission = Admission(64, initial_service_seconds=service, queue_target_percent=20)
    reference = Admission(64, initial_service_seconds=service, queue_target_percent=20)
    now = 0.0
    for remaining, sent, step in calls:
        now += step
        expected: DeadlineExceeded | ResourceExhausted | None = reference.late(remaining)
        if expected is None and remaining is not None and sent is not None:
            expected = reference.queued(sent - remaining, sent, now)
        got = admission.refusal(remaining, sent, now)
        assert (type(got), str(got)) == (type(expected), str(expected))


@pytest.mark.parametrize(
    ("metadata", "seconds"),
    [
        ((("authorization", "Bearer k"), (TIMEOUT_METADATA, "250")), 0.25),
        (((TIMEOUT_METADATA, "86400000"),), 86400.0),
        ((), None),  # a client that sends none is never shed
        (None, None),
        (((TIMEOUT_METADATA, "0"),), None),
        (((TIMEOUT_METADATA, "86400001"),), None),
        (((TIMEOUT_METADATA, "-5"),), None),
        (((TIMEOUT_METADATA, "2.5"),), None),
        (((TIMEOUT_METADATA, ""),), None),
        (((TIMEOUT_METADATA, "٣"),), None),  # a digit, but not an ASCII one
    ],
)
def test_the_sent_timeout_is_read_as_a_hint(
    metadata: tuple[tuple[str, str], ...] | None, seconds: float | None
) -> None:
    """Whole milliseconds in (0, 1 day] are read; anything else is ignored, never an error."""
    assert sent_timeout_seconds(metadata) == seconds


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


@pytest.mark.redis
def test_a_call_its_client_gave_up_on_leaves_the_bound(
    spendgate: Callable[..., SpendgateServer], redis_server: RedisServer
) -> None:
    """Two Decides hang on Redis (60 s store timeout) and fill --max-in-flight 2, so a third call is
    refused RESOURCE_EXHAUSTED; once their clients' deadlines pass, gRPC cancels them on the server
    and their places are free again, with Redis still silent: the next call is admitted (and, as it
    is malformed, answered INVALID_ARGUMENT without touching the store)."""
    proxy = TcpProxy(redis_server.port)
    server = spendgate(
        *("--store", "redis", "--redis-url", proxy.url, "--max-in-flight", "2"),
        *("--redis-timeout-millis", "60000", "--redis-breaker-failures", "0"),
    )
    malformed = pb.DecideRequest(model=MODEL, input_tokens=10, max_output_tokens=10)  # no session

    def well_formed(session: str) -> pb.DecideRequest:
        return pb.DecideRequest(
            session_id=session,
            model=MODEL,
            input_tokens=10,
            max_output_tokens=10,
            fingerprint=uuid.uuid4().bytes,
        )

    def answer(stub: decision_pb2_grpc.DecisionServiceStub, request: pb.DecideRequest, timeout: float) -> str:
        try:
            stub.Decide(request, timeout=timeout)
        except grpc.RpcError as error:
            return str(error.code().name)
        return "OK"

    try:
        with grpc.insecure_channel(server.target) as channel, ThreadPoolExecutor(2) as pool:
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            assert answer(stub, malformed, 5) == "INVALID_ARGUMENT"
            assert answer(stub, well_formed("warm"), 5) == "OK"  # the scripts are loaded
            proxy.drop_replies.set()
            futures = [pool.submit(answer, stub, well_formed("stuck"), 4) for _ in range(2)]
            poll(
                "the two calls to reach Redis", lambda: len(read_ledger(redis_server.port, "stuck").open) == 2
            )
            assert answer(stub, malformed, 5) == "RESOURCE_EXHAUSTED"
            assert [future.result() for future in futures] == ["DEADLINE_EXCEEDED"] * 2
            poll(
                "the cancelled calls to leave the bound",
                lambda: answer(stub, malformed, 5) == "INVALID_ARGUMENT",
            )
    finally:
        proxy.drop_replies.clear()
        proxy.close()


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


OVERLOADED = grpc.StatusCode.RESOURCE_EXHAUSTED
ANSWERED = grpc.StatusCode.OK


def test_the_limit_halves_once_per_round_and_grows_by_one_per_round() -> None:
    """AIMD on a given sequence: an overload answer halves the limit (not below 1) unless the call
    was sent before the last halving; any other answer adds 1/limit (not above the bound)."""
    outstanding = _Outstanding(8)
    first, second = outstanding.enter(), outstanding.enter()
    assert first is not None and second is not None
    outstanding.leave(first, OVERLOADED)
    assert outstanding.limit == 4.0
    outstanding.leave(second, OVERLOADED)  # sent in the same round: nothing new
    assert outstanding.limit == 4.0
    for expected in (2.0, 1.0, 1.0):
        ticket = outstanding.enter()
        assert ticket is not None
        outstanding.leave(ticket, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert outstanding.limit == expected
    held = outstanding.enter()
    assert held is not None and outstanding.enter() is None  # one outstanding: at the limit
    outstanding.leave(held, ANSWERED)
    assert outstanding.limit == 2.0
    for expected in (2.5, 2.9):
        ticket = outstanding.enter()
        assert ticket is not None
        outstanding.leave(ticket, ANSWERED)
        assert outstanding.limit == pytest.approx(expected)
    ticket = outstanding.enter()
    assert ticket is not None
    outstanding.leave(ticket, None)  # cancelled by the caller: nothing learnt
    assert outstanding.limit == pytest.approx(2.9)
    outstanding.leave(outstanding.enter() or 0, grpc.StatusCode.INVALID_ARGUMENT)  # answered
    assert outstanding.limit == pytest.approx(2.9 + 1 / 2.9)
    for _ in range(200):
        outstanding.leave(outstanding.enter() or 0, ANSWERED)
    assert outstanding.limit == 8.0


STATUSES = st.sampled_from(
    [None, ANSWERED, OVERLOADED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND]
)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50), STATUSES), max_size=200), st.integers(0, 8))
def test_the_count_never_passes_the_limit(
    steps: list[tuple[bool, int, grpc.StatusCode | None]], bound: int
) -> None:
    """Against a reference count: enter succeeds exactly while below the limit, leave always frees,
    and the limit stays within [1, bound] (no bound: nothing is refused, nothing adapts)."""
    outstanding = _Outstanding(bound)
    tickets: list[int] = []
    for enter, pick, status in steps:
        if enter:
            expected = not bound or len(tickets) + 1 <= outstanding.limit
            ticket = outstanding.enter()
            assert (ticket is not None) is expected
            if ticket is not None:
                tickets.append(ticket)
        elif tickets:
            outstanding.leave(tickets.pop(pick % len(tickets)), status)
        assert outstanding.count == len(tickets)
        if bound:
            assert 1.0 <= outstanding.limit <= bound
        else:
            assert outstanding.limit == 0.0


def test_a_lowered_limit_is_named_in_the_refusal() -> None:
    """After overload answers lowered a bound of 8 to 1, a second call is refused unsent, saying so."""
    client = DecisionClient("127.0.0.1:1", fail_mode="closed", max_outstanding=8)
    for _ in range(3):
        client._outstanding.leave(client._outstanding.enter() or 0, OVERLOADED)
    assert client.outstanding_limit == 1.0
    held = client._outstanding.enter()
    assert held is not None
    with pytest.raises(SpendgateUnavailable) as refused:
        client.decide("s", MODEL, 10, 10, uuid.uuid4().bytes)
    assert str(refused.value) == (
        "RESOURCE_EXHAUSTED: 1 calls to spendgate at 127.0.0.1:1 already await their answer "
        "(max_outstanding=8, lowered to 1 by answers saying it is overloaded): the service is "
        "slower than calls arrive; fail_mode is 'closed'"
    )
    client.close()


@pytest.mark.redis
def test_calls_that_time_out_lower_the_limit_and_answers_raise_it(
    stalled: tuple[SpendgateServer, RedisServer],
) -> None:
    """Decides that time out on a paused Redis halve the client's limit down to 1; once Redis runs
    again each answer raises it by 1/limit."""
    server, redis_server = stalled
    with DecisionClient(server.target, timeout=1, fail_mode="closed", max_outstanding=8) as client:
        assert client.decide("warm", MODEL, 10, 10, uuid.uuid4().bytes).allowed
        assert client.outstanding_limit == 8.0
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        for expected in (4.0, 2.0, 1.0, 1.0):
            with pytest.raises(SpendgateUnavailable) as late:
                client.decide("late", MODEL, 10, 10, uuid.uuid4().bytes)
            assert late.value.code == "DEADLINE_EXCEEDED"
            assert client.outstanding_limit == expected
        os.kill(redis_server.process.pid, signal.SIGCONT)
        poll("Redis to answer again", lambda: _admits(client))
        limit = client.outstanding_limit
        assert limit == 2.0  # the first answer after the outage
        for _ in range(3):
            assert client.decide("after", MODEL, 10, 10, uuid.uuid4().bytes).allowed
            limit += 1 / limit
            assert client.outstanding_limit == pytest.approx(limit)


@pytest.mark.redis
def test_a_call_that_waited_past_its_target_in_a_standing_queue_is_refused(
    spendgate: Callable[..., SpendgateServer], redis_server: RedisServer, redis_url: str
) -> None:
    """A client that says its timeout was 100 s sends calls with 5 s left: each waited 95 s, past
    20% of it. The first starts the interval; once the queue has stood for it the server refuses
    them RESOURCE_EXHAUSTED, saying why, and writes nothing; a call that comes through in time ends it."""
    server = spendgate("--store", "redis", "--redis-url", redis_url)
    stale = ((TIMEOUT_METADATA, "100000"),)
    answers: list[grpc.StatusCode] = []
    with grpc.insecure_channel(server.target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)

        def decide(session: str, metadata: tuple[tuple[str, str], ...]) -> grpc.RpcError | None:
            request = pb.DecideRequest(
                session_id=session,
                model=MODEL,
                input_tokens=10,
                max_output_tokens=10,
                fingerprint=uuid.uuid4().bytes,
            )
            try:
                stub.Decide(request, timeout=5, metadata=metadata)
            except grpc.RpcError as error:
                answers.append(error.code())
                return error
            answers.append(grpc.StatusCode.OK)
            return None

        def shed() -> bool:
            return decide("stale", stale) is not None

        poll("a call from the standing queue to be shed", shed)
        assert answers[0] is grpc.StatusCode.OK  # the interval had only begun
        assert set(answers[:-1]) == {grpc.StatusCode.OK}
        refused = decide("stale", stale)
        assert refused is not None and refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = refused.details() or ""
        # About 95 s waited (100 s sent, under 5 s left when taken up); the standing time is the server's.
        assert re.fullmatch(
            r"server overloaded: the call waited 9[45]\d{3} ms before the server took it up, past 20% "
            r"of its 100000 ms timeout, and no call has come through within its target for \d+ ms "
            r"\(--queue-target-percent 20\); let the client's fail mode decide",
            details,
        ), details
        assert decide("fresh", ((TIMEOUT_METADATA, "5000"),)) is None  # within its target
        assert decide("stale", stale) is None  # the queue no longer stands
        assert decide("plain", ()) is None  # no timeout sent: never shed
    served = answers.count(grpc.StatusCode.OK) - 2  # fresh and plain
    assert len(read_ledger(redis_server.port, "stale").open) == served  # the refused wrote nothing
