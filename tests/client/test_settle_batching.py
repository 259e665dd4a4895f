"""The settler sends settles in batches and along with Decides, and still loses none: a server killed
mid-run, an older server without either, and any schedule of faults leave every call settled once."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc
from spendgate_client import DecisionClient, InvalidRequest, JournaledAnthropic, Settlement, Usage
from spendgate_client import _settler as settler_module
from spendgate_client._settler import Settler

from tests.fake_provider import BIG, PRICES_YAML, FakeProvider, cost, new_session
from tests.fake_provider import Usage as Billed
from tests.processes import SpendgateServer, free_port, read_ledger


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider(usage=Billed(input_tokens=10, output_tokens=20)).start()
    yield provider
    provider.stop()


@pytest.fixture
def prices(tmp_path: Path) -> str:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES_YAML)
    return str(path)


def _calls(client: JournaledAnthropic, threads: int, per_thread: int, tag: str) -> None:
    def work(t: int) -> None:
        for i in range(per_thread):
            content = f"{tag} {t} {i}"
            client.messages.create(
                model="claude-test-big", max_tokens=100, messages=[{"role": "user", "content": content}]
            )

    with futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))


@pytest.mark.redis
def test_no_settle_is_lost_when_the_server_is_killed_mid_run(
    spendgate: Callable[..., SpendgateServer],
    redis_url: str,
    redis_server: Any,
    prices: str,
    fake: FakeProvider,
) -> None:
    """8 threads call while the server is SIGKILLed and restarted: every reservation ends settled once."""
    port = free_port()
    args = ("--store", "redis", "--redis-url", redis_url, "--config", prices)
    server = spendgate(*args, port=port)
    session = new_session()
    calls = 0

    def kill_then_restart(_request: object) -> None:
        nonlocal calls, server
        calls += 1
        if calls == 60:  # mid-run: settles are queued, carried and in batches right now
            server.process.kill()
            server.process.wait()
            server = spendgate(*args, port=port)

    fake.on_request = kill_then_restart
    with JournaledAnthropic(
        api_key="k",
        base_url=fake.base_url,
        max_retries=0,
        session_id=session,
        spendgate_target=f"127.0.0.1:{port}",
        decide_timeout=5,
    ) as client:
        _calls(client, threads=8, per_thread=20, tag="kill")
        assert client.spendgate_flush(30)
        settler = client._spendgate_gate.settler
        fail_open = client._spendgate_gate.client.stats.snapshot()["fail_open_allowances"]
        assert settler.dropped == 0
    ledger = read_ledger(redis_server.port, session)
    # Every reservation the client learned of is settled, once, at its real cost.
    assert len(ledger.settled) == 160 - fail_open == settler.settled
    assert ledger.spent == len(ledger.settled) * cost(BIG, fake.usage)
    # Open ones can only be Decides the kill cut off before their answer (one per thread at
    # most): the client allowed those calls open, and they will count at their estimate.
    assert len(ledger.open) <= min(8, fail_open) and not ledger.expired


class _OlderServer(decision_pb2_grpc.DecisionServiceServicer):
    """Forwards to a real server the way a server predating batches answers: SettleBatch is
    UNIMPLEMENTED and a Decide's carried settles are ignored (no results)."""

    def __init__(self, upstream: str) -> None:
        self._channel = grpc.insecure_channel(upstream)
        self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)
        self.carried_seen = 0

    def Decide(self, request: pb.DecideRequest, context: Any) -> pb.DecideResponse:  # gRPC name
        self.carried_seen += len(request.settles)
        del request.settles[:]
        response: pb.DecideResponse = self._stub.Decide(request)
        return response

    def Settle(self, request: pb.SettleRequest, context: Any) -> pb.SettleResponse:  # gRPC name
        response: pb.SettleResponse = self._stub.Settle(request)
        return response

    def SettleBatch(
        self, request: pb.SettleBatchRequest, context: Any
    ) -> pb.SettleBatchResponse:  # gRPC name
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        raise AssertionError("unreachable: abort raises")


def test_an_older_server_gets_every_settle_on_its_own(
    spendgate: Callable[..., SpendgateServer], prices: str, fake: FakeProvider
) -> None:
    """Without SettleBatch or carried settles on the server, the client falls back and settles all."""
    upstream = spendgate("--config", prices)
    older = _OlderServer(upstream.target)
    proxy = grpc.server(futures.ThreadPoolExecutor(16))
    decision_pb2_grpc.add_DecisionServiceServicer_to_server(older, proxy)
    port = proxy.add_insecure_port("127.0.0.1:0")
    proxy.start()
    session = new_session()
    try:
        with JournaledAnthropic(
            api_key="k",
            base_url=fake.base_url,
            session_id=session,
            spendgate_target=f"127.0.0.1:{port}",
            decide_timeout=5,
        ) as client:
            _calls(client, threads=8, per_thread=10, tag="older")
            assert client.spendgate_flush(30)
            settler = client._spendgate_gate.settler
            assert (settler.settled, settler.dropped, settler.carried) == (80, 0, 0)
            assert settler.carry_seconds == 0  # it stopped asking after the first unanswered Decide
        with DecisionClient(upstream.target, timeout=5) as direct:
            probe = direct.decide(session, "claude-test-big", 0, 0, b"p" * 32)
        assert probe.session_spend_nano_usd == 80 * cost(BIG, fake.usage)
    finally:
        proxy.stop(0)


# --- any schedule of faults: a ledger stands in for the server, and answers as a fault plan says ---


class _LedgerClient(DecisionClient):
    """A DecisionClient whose settles go to an in-memory ledger (idempotent, as the server is),
    each answered as ``plan`` says: applied, refused for good, lost before or after applying."""

    def __init__(self, plan: Callable[[], str]) -> None:
        super().__init__("127.0.0.1:9", timeout=1)  # never connected: no call reaches it
        self._plan = plan
        self._lock = threading.Lock()
        self.ledger: dict[str, int] = {}
        self.refused: set[str] = set()

    def _apply(self, request: pb.SettleRequest) -> pb.SettleResult:
        outcome = self._plan()
        with self._lock:
            if outcome == "refused":
                self.refused.add(request.reservation_id)
                return pb.SettleResult(code=grpc.StatusCode.NOT_FOUND.value[0], message="no reservation")
            if outcome in ("ok", "reply_lost"):
                self.ledger.setdefault(request.reservation_id, request.usage.input_tokens)
            if outcome == "ok":
                return pb.SettleResult(code=0)
            return pb.SettleResult(code=grpc.StatusCode.UNAVAILABLE.value[0], message="lost")

    def settle(self, session_id: str, reservation_id: str, model: str, usage: Any = None, **_: Any) -> Any:
        result = self._apply(pb.SettleRequest(reservation_id=reservation_id, usage=usage.to_proto()))
        if result.code == grpc.StatusCode.NOT_FOUND.value[0]:
            raise InvalidRequest("NOT_FOUND: no reservation", ())
        return Settlement(0, 0, False) if result.code == 0 else None

    def settle_batch(self, requests: Sequence[pb.SettleRequest]) -> Sequence[pb.SettleResult] | None:
        if self._plan() == "batch_lost":
            for request in requests:  # the server applied them, then the connection dropped
                self._apply(request)
            return None
        return [self._apply(r) for r in requests]

    def decide_carrying(self, session_id: str) -> None:
        """What a Decide does with the settles it carries (the RPC itself is not the point here)."""
        carrier = self._carrier
        carried = carrier(session_id) if carrier is not None else None
        if carried is None:
            return
        settles, done = carried
        done(None if self._plan() == "batch_lost" else [self._apply(s) for s in settles])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    jobs=st.integers(1, 120),
    decides=st.integers(0, 40),
    seed=st.integers(0, 2**32 - 1),
    faults=st.sampled_from([0.0, 0.1, 0.4]),
)
def test_any_fault_schedule_settles_each_job_once_or_reports_it_refused(
    monkeypatch: pytest.MonkeyPatch, jobs: int, decides: int, seed: int, faults: float
) -> None:
    """Batches, carried settles and retries in any order: each job ends applied exactly once in the
    ledger and counted settled, or refused and counted dropped; the queue drains."""
    monkeypatch.setattr(settler_module, "_FLUSH_BACKOFF_SECONDS", 0.001)
    rng = random.Random(seed)
    lock = threading.Lock()

    def plan() -> str:
        with lock:
            roll = rng.random()
        if roll < faults / 2:
            return "reply_lost" if roll < faults / 4 else "batch_lost"
        if roll < faults / 2 + 0.05:
            return "refused"
        return "ok"

    client = _LedgerClient(plan)
    settler = Settler(client)
    settler.carry_seconds = rng.choice([0.0, 0.002, 0.05])
    settler.max_batch = rng.choice([1, 3, 64])

    def decide_often() -> None:
        for _ in range(decides):
            client.decide_carrying("s")

    carrier_thread = threading.Thread(target=decide_often, daemon=True)
    carrier_thread.start()
    for i in range(jobs):
        settler.submit("s", f"{i:032x}", "m", Usage(input_tokens=i + 1))
    carrier_thread.join()
    assert settler.flush(30)
    settler.close(1)
    ids = {f"{i:032x}" for i in range(jobs)}
    refused_only = client.refused - set(client.ledger)
    assert set(client.ledger) | refused_only == ids  # every job applied, or refused before it was
    assert all(client.ledger[f"{i:032x}"] == i + 1 for i in range(jobs) if f"{i:032x}" in client.ledger)
    assert settler.settled + settler.dropped == jobs
    assert settler.dropped <= len(client.refused)
