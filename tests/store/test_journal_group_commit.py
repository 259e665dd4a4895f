"""Journal group commit: the appends of one event-loop turn reach the log in one store call per tenant,
each returns only once its event is stored, and a failed write fails every append it carried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from spendgate_server.engine.events import JournalEvent
from spendgate_server.errors import StoreUnavailable
from spendgate_server.policy.journal import JOURNAL_LOG, StoreJournal
from spendgate_server.store.logs import AppendResult, LogStore, MemoryLogStore
from spendgate_server.store.redis import RedisConnection
from spendgate_server.store.redis_logs import RedisLogStore

from tests.processes import free_port

NOW = 1_800_000_000_000
WINDOW_MS = 3_600_000


class Counted(MemoryLogStore):
    """The memory log store, counting the append calls it serves."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    async def append(
        self,
        log: str,
        tenant: str,
        entries: Sequence[tuple[str, str]],
        *,
        max_entries: int,
        unique_ttl_ms: int,
        now_ms: int,
    ) -> AppendResult:
        self.calls.append(len(entries))
        return await super().append(
            log, tenant, entries, max_entries=max_entries, unique_ttl_ms=unique_ttl_ms, now_ms=now_ms
        )


async def no_prompts(_tenant: str) -> bool:
    return False


def event(i: int, tenant: str = "t") -> JournalEvent:
    return JournalEvent(f"{i:032x}", tenant, "s", NOW + i, "m", True, 10, 5, 0, 0, 1000 + i)


async def stored(logs: LogStore, tenant: str = "t") -> list[JournalEvent]:
    return [JournalEvent.from_json(e.payload) for e in await logs.after(JOURNAL_LOG, tenant, "0-0", 10_000)]


async def test_appends_of_one_turn_are_one_store_call_per_tenant() -> None:
    """50 concurrent appends of one tenant (a retried one among them) and 3 of another: two calls."""
    logs = Counted()
    journal = StoreJournal(logs, max_entries=1000, journals_prompts=no_prompts)
    await asyncio.gather(
        *(journal.append(event(i), WINDOW_MS) for i in range(50)),
        journal.append(event(7), WINDOW_MS),  # a repeated settle journals its call once
        *(journal.append(event(i, "u"), WINDOW_MS) for i in range(3)),
    )
    assert sorted(logs.calls) == [3, 51]
    assert [e.decision_id for e in await stored(logs)] == [f"{i:032x}" for i in range(50)]
    assert len(await stored(logs, "u")) == 3


async def test_a_batch_is_split_past_sixty_four_events() -> None:
    """130 appends of one turn: store calls of 64, 64 and 2 (the append script's key bound)."""
    logs = Counted()
    journal = StoreJournal(logs, max_entries=1000, journals_prompts=no_prompts)
    await asyncio.gather(*(journal.append(event(i), WINDOW_MS) for i in range(130)))
    assert logs.calls == [64, 64, 2]
    assert len(await stored(logs)) == 130


async def test_each_append_returns_once_its_event_is_stored() -> None:
    """Appends of separate turns: each event is readable the moment its append returns."""
    logs = Counted()
    journal = StoreJournal(logs, max_entries=1000, journals_prompts=no_prompts)
    for i in range(5):
        await journal.append(event(i), WINDOW_MS)
        assert len(await stored(logs)) == i + 1
    assert logs.calls == [1] * 5


async def test_without_group_commit_each_append_is_its_own_call() -> None:
    """group_commit=False (what bench/variants.py measures against): one store call per append."""
    logs = Counted()
    journal = StoreJournal(logs, max_entries=1000, journals_prompts=no_prompts, group_commit=False)
    await asyncio.gather(*(journal.append(event(i), WINDOW_MS) for i in range(10)))
    assert logs.calls == [1] * 10


@pytest.fixture
async def unreachable() -> AsyncIterator[RedisLogStore]:
    """A log store whose Redis is not there: nothing listens on its port."""
    connection = RedisConnection(f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=0.5)
    assert connection.hot_path is not None
    yield RedisLogStore(connection.client, owns_client=False, hot_path=connection.hot_path)
    await connection.aclose()


async def test_a_failed_write_fails_every_append_it_carried(unreachable: RedisLogStore) -> None:
    """Redis unreachable: each append of the batch raises StoreUnavailable (its Settle is retried)."""
    journal = StoreJournal(unreachable, max_entries=1000, journals_prompts=no_prompts)
    results = await asyncio.gather(
        *(journal.append(event(i), WINDOW_MS) for i in range(8)), return_exceptions=True
    )
    assert all(isinstance(r, StoreUnavailable) for r in results), results


@pytest.mark.redis
async def test_group_commit_over_the_pipelined_connection(redis_url: str) -> None:
    """On Redis with the hot-path connection: one turn's 40 appends are stored once each, readable."""
    connection = RedisConnection(redis_url, timeout_seconds=2)
    assert connection.hot_path is not None
    logs = RedisLogStore(connection.client, owns_client=False, hot_path=connection.hot_path)
    journal = StoreJournal(logs, max_entries=1000, journals_prompts=no_prompts)
    try:
        await asyncio.gather(*(journal.append(event(i % 20), WINDOW_MS) for i in range(40)))
        assert sorted(e.decision_id for e in await stored(logs)) == [f"{i:032x}" for i in range(20)]
        assert await logs.tenants(JOURNAL_LOG) == ["t"]
    finally:
        await connection.aclose()


async def test_appends_after_the_reply_wait_to_share_one_store_call() -> None:
    """Appends made after their Settles were answered wait (here: an hour) to share one store
    call per tenant; a full batch of 64 leaves at once; drain sends the rest without waiting."""
    logs = Counted()
    journal = StoreJournal(
        logs, max_entries=1000, journals_prompts=no_prompts, intents=True, deferred_commit_seconds=3600
    )
    for i in range(70):
        journal.append_later(event(i), WINDOW_MS)
    journal.append_later(event(0, "u"), WINDOW_MS)
    journal.append_later(event(0, "u"), WINDOW_MS)  # a retried settle: journaled once
    assert journal.in_background == 1 + 8  # the full batch's store call, and 8 appends waiting
    await asyncio.sleep(0)
    assert logs.calls == [64]
    await journal.drain()
    assert sorted(logs.calls) == [2, 6, 64]
    assert journal.in_background == 0
    assert [e.decision_id for e in await stored(logs)] == [f"{i:032x}" for i in range(70)]
    assert len(await stored(logs, "u")) == 1
