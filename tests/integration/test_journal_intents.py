"""Settle in one round trip: the journal intent written with the settle, the append after the
reply, and the sweeper that finishes what a dead server acknowledged.

Each "server" is the real engine, session store, log store and journal over one real Redis
connection (pipelined, as ``spendgate serve`` runs them). A server killed right after its
Settle replies is a journal whose appends after the reply never reach Redis; a fresh server's
sweeper, its clock moved past the grace (never slept), must journal each of those settles
exactly once, as the dead server would have, and drop the intents of settles that never ran.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc
from spendgate_server.engine.anomalies import AnomalyKind
from spendgate_server.engine.config import EnforcementConfig
from spendgate_server.engine.decide import (
    Call,
    DecisionEngine,
    EngineTimings,
    SettleCall,
    Settlement,
    system_clock_ms,
)
from spendgate_server.engine.events import CallContext, JournalEvent
from spendgate_server.engine.pricing import PriceTable, Usage
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.errors import NotFound, StoreUnavailable
from spendgate_server.metrics import Metrics
from spendgate_server.policy.journal import JOURNAL_LOG, StoreJournal
from spendgate_server.policy.journal_sweeper import JournalSweeper, SweepResult
from spendgate_server.rpc.decision import DecisionServicer
from spendgate_server.store import Store
from spendgate_server.store.keyspace import log_intent_keys, log_stream_key
from spendgate_server.store.logs import AppendResult, LogStore, MemoryLogStore
from spendgate_server.store.memory import MemoryStore
from spendgate_server.store.redis import RedisConnection, RedisStore
from spendgate_server.store.redis_logs import RedisLogStore

from tests.conftest import FakeClock
from tests.integration.test_reliability import poll
from tests.processes import SpendgateServer
from tests.unit.test_rules import PRICES

GRACE_MS = 30_000
WINDOW_MS = EngineTimings().settled_ttl_ms
START = 1_800_000_000_000

pytestmark = pytest.mark.redis


async def no_prompts(_tenant: str) -> bool:
    return False


class KilledAfterReply(StoreJournal):
    """The journal of a server killed as soon as its Settles were answered: the appends it starts
    after a reply never reach the store. ``lost`` keeps the events they would have stored."""

    def __init__(self, logs: LogStore) -> None:
        super().__init__(logs, max_entries=10_000, journals_prompts=no_prompts, intents=True)
        self.lost: list[JournalEvent] = []

    def append_later(self, event: JournalEvent, dedup_window_ms: int, payload: str = "") -> None:
        self.lost.append(event)


class Recording(StoreJournal):
    """A journal that notes the decision id of each append it is asked for after a reply."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.later: list[str] = []

    def append_later(self, event: JournalEvent, dedup_window_ms: int, payload: str = "") -> None:
        self.later.append(event.decision_id)
        super().append_later(event, dedup_window_ms, payload)


class FailingAppends(RedisLogStore):
    """Redis answers everything but the journal's appends (the append script's slot is down)."""

    async def append(self, *args: object, **kwargs: object) -> AppendResult:
        raise StoreUnavailable("redis: the journal's node is unreachable")


class FailingIntents(RedisLogStore):
    """Redis answers everything but intent writes."""

    async def put_intent(self, *args: object, **kwargs: object) -> None:
        raise StoreUnavailable("redis: the journal's node is unreachable")


class Server:
    """One server's parts over its own Redis connection (or over memory, when ``url`` is empty)."""

    def __init__(
        self,
        url: str,
        clock: FakeClock,
        *,
        journal: type[StoreJournal] = StoreJournal,
        logs: type[RedisLogStore] = RedisLogStore,
    ) -> None:
        self.connection = RedisConnection(url, timeout_seconds=5) if url else None
        if self.connection is None:
            self.store: Store = MemoryStore()
            self.logs: LogStore = MemoryLogStore()
        else:
            client, hot_path = self.connection.client, self.connection.hot_path
            assert hot_path is not None
            self.store = RedisStore(client, hot_path=hot_path, owns_client=False)
            self.logs = logs(client, owns_client=False, hot_path=hot_path)
        if journal is KilledAfterReply:
            self.journal: StoreJournal = KilledAfterReply(self.logs)
        else:
            self.journal = journal(self.logs, max_entries=10_000, journals_prompts=no_prompts, intents=True)
        self.clock = clock
        self.engine = DecisionEngine(
            self.store,
            PriceTable(PRICES),
            ConfigResolver.static(EnforcementConfig()),
            clock=clock,
            journal=self.journal,
        )

    def sweeper(self) -> JournalSweeper:
        return JournalSweeper(
            self.journal, self.engine, grace_ms=GRACE_MS, interval_seconds=1, clock=self.clock
        )

    async def journaled(self, tenant: str) -> list[JournalEvent]:
        return [
            JournalEvent.from_json(e.payload) for e in await self.logs.after(JOURNAL_LOG, tenant, "0-0", 1000)
        ]

    async def intents(self, tenant: str) -> list[str]:
        stale = await self.logs.stale_intents(JOURNAL_LOG, [tenant], before_ms=2**52, count=1000)
        return [i.uid for i in stale.get(tenant, [])]

    async def close(self) -> None:
        await self.journal.drain()
        if self.connection is not None:
            await self.connection.aclose()


def call(tenant: str, session: str, input_tokens: int = 10_000, prompt: str = "") -> Call:
    return Call(tenant, session, "big", input_tokens, 100, (prompt or uuid.uuid4().hex).encode().ljust(32))


def draft(tenant: str, session: str, decision_id: str, time_ms: int) -> JournalEvent:
    """An intent as the engine writes it, for a settle that never reached the session store."""
    return JournalEvent(decision_id, tenant, session, time_ms, "big", True, 10_000, 50, 0, 0, 12_345)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    s = Server(url, FakeClock(START))
    yield s
    await s.close()


async def test_a_settle_is_answered_before_its_append_which_removes_the_intent(server: Server) -> None:
    """The reply comes with the append still running; once it ends, the event is journaled once,
    exactly as returned, and no intent is left."""
    decision = await server.engine.decide(call("t", "s"))
    settled = await server.engine.settle(
        SettleCall("t", "s", decision.reservation_id, "small", Usage(9_000, 50), True)
    )
    assert server.journal.in_background == 1  # the append, started after the reply
    await server.journal.drain()
    [event] = await server.journaled("t")
    assert (event.decision_id, event.cost_nano_usd, event.anomalies) == (
        decision.reservation_id,
        settled.cost_nano_usd,
        settled.anomalies,
    )
    assert [a.kind for a in event.anomalies] == [AnomalyKind.MODEL_MISMATCH]
    assert await server.intents("t") == []
    assert await server.sweeper().sweep_once() == SweepResult()


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_reply_waits_for_no_journal_work(store: str, request: pytest.FixtureRequest) -> None:
    """A Settle's reply, and a Decide's carrying a settle, are built from the store's outcome alone:
    when the handler returns, no append is asked for and no anomaly counted; the loop's next
    turn does both, and each call is then journaled once with what its settle reported."""
    url = request.getfixturevalue("redis_url") if store == "redis" else ""
    server = Server(url, FakeClock(START), journal=Recording)
    journal = server.journal
    assert isinstance(journal, Recording)
    metrics = Metrics()
    servicer = DecisionServicer(server.engine, metrics)
    no_context = cast(Any, None)  # only a failing RPC uses it

    def mismatches() -> float | None:
        return metrics.registry.get_sample_value(
            "spendgate_settle_anomalies_total", {"kind": AnomalyKind.MODEL_MISMATCH.key}
        )

    def report(reservation_id: str, model: str) -> pb.SettleRequest:
        return pb.SettleRequest(
            session_id="s",
            reservation_id=reservation_id,
            model=model,
            usage=pb.Usage(input_tokens=9_000, output_tokens=50),
            outcome=pb.PROVIDER_OUTCOME_OK,
        )

    try:
        first = await server.engine.decide(call("default", "s"))
        settled = await servicer.Settle(report(first.reservation_id, "small"), no_context)
        assert (journal.later, mismatches()) == ([], None)
        await asyncio.sleep(0)  # one loop turn, no time
        assert (journal.later, mismatches()) == ([first.reservation_id], 1.0)

        second = await server.engine.decide(call("default", "s"))
        decided = await servicer.Decide(
            pb.DecideRequest(
                session_id="s",
                model="big",
                input_tokens=100,
                max_output_tokens=50,
                fingerprint=b"f" * 32,
                settles=[report(second.reservation_id, "big")],
            ),
            no_context,
        )
        [rider] = decided.settle_results
        assert rider.code == 0 and rider.settled.actual_cost_nano_usd > 0
        assert journal.later == [first.reservation_id]
        await asyncio.sleep(0)
        assert journal.later == [first.reservation_id, second.reservation_id]

        await journal.drain()
        events = await server.journaled("default")
        assert [(e.decision_id, e.cost_nano_usd, [a.kind for a in e.anomalies]) for e in events] == [
            (first.reservation_id, settled.actual_cost_nano_usd, [AnomalyKind.MODEL_MISMATCH]),
            (second.reservation_id, rider.settled.actual_cost_nano_usd, []),
        ]
        assert await server.intents("default") == []
    finally:
        await server.close()


async def test_an_unknown_reservation_leaves_no_intent(server: Server) -> None:
    """A settle of an id the session never reserved fails NOT_FOUND, and its intent is removed."""
    with pytest.raises(NotFound):
        await server.engine.settle(SettleCall("t", "s", "0" * 32, "big", Usage(10, 5), True))
    await server.journal.drain()
    assert await server.intents("t") == []
    assert await server.journaled("t") == []


async def test_an_append_that_fails_after_the_reply_is_journaled_by_the_sweeper(redis_url: str) -> None:
    """The journal's node fails the background append: the intent stays, and after the grace a
    sweeper journals the event with the cost and anomalies the Settle answered."""
    clock = FakeClock(START)
    broken = Server(redis_url, clock, logs=FailingAppends)
    fresh = Server(redis_url, clock)
    try:
        decision = await broken.engine.decide(call("t", "s"))
        clock.advance(45_000)
        settled = await broken.engine.settle(
            SettleCall("t", "s", decision.reservation_id, "big", Usage(0, 0), False)
        )
        await broken.journal.drain()
        assert await fresh.intents("t") == [decision.reservation_id]
        clock.advance(GRACE_MS - 1)
        assert await fresh.sweeper().sweep_once() == SweepResult()  # within the grace: its append may come
        clock.advance(1)
        assert await fresh.sweeper().sweep_once() == SweepResult(journaled=1)
        [event] = await fresh.journaled("t")
        assert [a.kind for a in settled.anomalies] == [AnomalyKind.LATE_ERROR]
        assert (event.cost_nano_usd, event.anomalies, event.time_ms) == (0, settled.anomalies, START + 45_000)
        assert await fresh.intents("t") == []
    finally:
        await broken.close()
        await fresh.close()


async def test_a_failed_intent_write_makes_the_settle_await_its_append(redis_url: str) -> None:
    """Without a stored intent nothing could recover the event: the reply waits for the append."""
    server = Server(redis_url, FakeClock(START), logs=FailingIntents)
    try:
        decision = await server.engine.decide(call("t", "s"))
        await server.engine.settle(
            SettleCall("t", "s", decision.reservation_id, "big", Usage(9_000, 50), True)
        )
        assert [e.decision_id for e in await server.journaled("t")] == [decision.reservation_id]
    finally:
        await server.close()


@dataclass(frozen=True)
class Report:
    """One call of the dead server: what its Settle reports, or no settle at all."""

    model: str
    input_tokens: int
    output_tokens: int
    provider_ok: bool
    delay_ms: int
    settled: bool  # False: the intent reached Redis, the settle script never did


reports = st.lists(
    st.builds(
        Report,
        st.sampled_from(["big", "small", "claude-unknown"]),
        st.integers(0, 30_000),
        st.integers(0, 300),
        st.booleans(),
        st.integers(0, 60_000),
        st.booleans(),
    ),
    min_size=1,
    max_size=6,
)


async def dies_after_replying(
    url: str, tenant: str, plays: Sequence[Report]
) -> tuple[Server, dict[str, Settlement], list[str]]:
    """Play ``plays`` on a server that is killed once each Settle is answered."""
    dead = Server(url, FakeClock(START), journal=KilledAfterReply)
    settlements: dict[str, Settlement] = {}
    never_settled: list[str] = []
    for n, play in enumerate(plays):
        session = f"s{n % 2}"
        decision = await dead.engine.decide(call(tenant, session, input_tokens=5_000))
        dead.clock.advance(play.delay_ms)
        if play.settled:
            usage = Usage(play.input_tokens, play.output_tokens)
            report = SettleCall(tenant, session, decision.reservation_id, play.model, usage, play.provider_ok)
            settlements[decision.reservation_id] = await dead.engine.settle(report)
        else:
            intent = dead.journal.intend(
                draft(tenant, session, decision.reservation_id, dead.clock()), WINDOW_MS
            )
            assert intent is not None and await intent.recorded()
            never_settled.append(decision.reservation_id)
    return dead, settlements, never_settled


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plays=reports)
def test_what_a_dead_server_acknowledged_is_journaled_once_by_the_sweepers(
    redis_url: str, plays: list[Report]
) -> None:
    """Two fresh servers sweep at once past the grace: each settle the dead server answered is
    journaled exactly once, as the dead server would have journaled it (same cost, anomalies,
    time and context); intents of settles that never ran are dropped; nothing is left."""

    async def scenario() -> None:
        tenant = uuid.uuid4().hex
        dead, settlements, never_settled = await dies_after_replying(redis_url, tenant, plays)
        assert isinstance(dead.journal, KilledAfterReply)
        assert sorted(await dead.intents(tenant)) == sorted([*settlements, *never_settled])
        later = FakeClock(dead.clock() + GRACE_MS + 1)
        fresh = [Server(redis_url, later), Server(redis_url, later)]
        try:
            results = await asyncio.gather(*(s.sweeper().sweep_once() for s in fresh))
            assert sum(r.dropped for r in results) == len(never_settled)
            journaled = await fresh[0].journaled(tenant)
            assert sorted(e.to_json() for e in journaled) == sorted(e.to_json() for e in dead.journal.lost)
            by_id = {e.decision_id: e for e in journaled}
            assert set(by_id) == set(settlements)
            for decision_id, settled in settlements.items():
                assert (by_id[decision_id].cost_nano_usd, by_id[decision_id].anomalies) == (
                    settled.cost_nano_usd,
                    settled.anomalies,
                )
            assert await fresh[0].intents(tenant) == []
            assert await fresh[1].sweeper().sweep_once() == SweepResult()
        finally:
            for s in (dead, *fresh):
                await s.close()

    asyncio.run(scenario())


async def test_an_intent_keeps_its_context_and_a_newer_settle_keeps_its_intent(redis_url: str) -> None:
    """The event a sweeper journals carries the settle's context; a drop spares an intent written
    again since the sweeper read it (a retried settle's)."""
    clock = FakeClock(START)
    dead = Server(redis_url, clock, journal=KilledAfterReply)
    fresh = Server(redis_url, clock)
    try:
        decision = await dead.engine.decide(call("t", "s"))
        context = CallContext(requested_model="big", project="p", key_label="ci", pattern_matches=(("x", 3),))
        report = SettleCall("t", "s", decision.reservation_id, "big", Usage(9_000, 50), True, context)
        await dead.engine.settle(report)
        clock.advance(GRACE_MS + 1)
        assert await fresh.sweeper().sweep_once() == SweepResult(journaled=1)
        [event] = await fresh.journaled("t")
        assert event.context == context
        # An intent read at one time and rewritten before the drop is kept.
        unsettled = draft("t", "s", "f" * 32, clock())
        await fresh.logs.put_intent(
            JOURNAL_LOG, "t", unsettled.decision_id, unsettled.to_json(), now_ms=clock(), ttl_ms=WINDOW_MS
        )
        assert await fresh.logs.drop_intents(JOURNAL_LOG, "t", [(unsettled.decision_id, clock() - 1)]) == 0
        assert await fresh.intents("t") == [unsettled.decision_id]
    finally:
        await dead.close()
        await fresh.close()


async def test_an_intent_that_is_not_this_tenants_event_is_dropped(server: Server) -> None:
    """Unreadable, or naming another tenant or id: dropped after the grace, journaled nowhere."""
    decision = await server.engine.decide(call("u", "s"))
    settled = SettleCall("u", "s", decision.reservation_id, "big", Usage(9_000, 50), True)
    await server.engine.settle(settled)
    await server.journal.drain()
    foreign = draft("u", "s", decision.reservation_id, START).to_json()  # another tenant's settled call
    for uid, payload in (("x" * 32, "{not json"), (decision.reservation_id, foreign), ("y" * 32, foreign)):
        await server.logs.put_intent(JOURNAL_LOG, "t", uid, payload, now_ms=START, ttl_ms=WINDOW_MS)
    server.clock.advance(GRACE_MS)
    assert await server.sweeper().sweep_once() == SweepResult(dropped=3)
    assert await server.journaled("t") == []
    assert len(await server.journaled("u")) == 1
    assert await server.intents("t") == []


SERVER_CONFIG = """
prices:
  big: {input_usd_per_mtok: 1, output_usd_per_mtok: 2}
"""


def test_a_server_journals_at_start_what_a_dead_one_left_and_leaves_no_intent(
    redis_url: str, spendgate: Callable[..., SpendgateServer], tmp_path: Path
) -> None:
    """``spendgate serve`` sweeps when it starts: a call a killed server answered a minute ago
    (past the 30 s grace) is journaled as that server would have; the server's own Settles
    are journaled and leave no intent once it has stopped."""
    clock = FakeClock(system_clock_ms() - 60_000)

    async def killed_server() -> list[JournalEvent]:
        dead = Server(redis_url, clock, journal=KilledAfterReply)
        try:
            decision = await dead.engine.decide(call("default", "s"))
            await dead.engine.settle(
                SettleCall("default", "s", decision.reservation_id, "big", Usage(9_000, 50), True)
            )
            assert isinstance(dead.journal, KilledAfterReply)
            return dead.journal.lost
        finally:
            await dead.close()

    lost = asyncio.run(killed_server())
    client = redis.Redis.from_url(redis_url)
    stream = log_stream_key(JOURNAL_LOG, "default")
    times, _ = log_intent_keys(JOURNAL_LOG, "default")

    def journaled() -> list[str]:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(stream)  # type: ignore[assignment]
        return [fields[b"p"].decode() for _, fields in entries]

    config = tmp_path / "spendgate.yaml"
    config.write_text(SERVER_CONFIG)
    server = spendgate("--store", "redis", "--redis-url", redis_url, "--config", str(config))
    poll("the start-up sweep", lambda: len(journaled()) == 1)
    assert journaled() == [e.to_json() for e in lost]
    with grpc.insecure_channel(server.target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        decided = stub.Decide(
            pb.DecideRequest(
                session_id="s", model="big", input_tokens=100, max_output_tokens=50, fingerprint=b"f" * 32
            )
        )
        stub.Settle(
            pb.SettleRequest(
                session_id="s",
                reservation_id=decided.reservation_id,
                model="big",
                usage=pb.Usage(input_tokens=90, output_tokens=40),
                outcome=pb.PROVIDER_OUTCOME_OK,
            )
        )
    server.stop()
    assert [JournalEvent.from_json(e).decision_id for e in journaled()] == [
        lost[0].decision_id,
        decided.reservation_id,
    ]
    assert client.zcard(times) == 0
    client.close()
