"""A Redis outage is one warning and one restored line per kind of journal write, however many
settles it fails: their intents, the appends after their replies, the removals of their intents.

A real redis-server is stopped by PID and started again on its port; the journal's lines are
captured and counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest
from spendgate_server.engine.events import JournalEvent
from spendgate_server.policy.journal import JOURNAL_LOG, StoreJournal
from spendgate_server.store.redis import RedisConnection
from spendgate_server.store.redis_logs import RedisLogStore
from structlog.testing import capture_logs

from tests.processes import RedisServer

NOW = 1_800_000_000_000
WINDOW_MS = 3_600_000
# Settles that fail while Redis is down, of each kind.
FAILED = 12
# Each kind: (its outage's warning, its end's info line).
KINDS = {
    "intent": ("journal_intent_failed", "journal_intent_restored"),
    "deferred append": ("journal_append_deferred_failed", "journal_append_deferred_restored"),
    "intent removal": ("journal_intent_removal_failed", "journal_intent_removal_restored"),
}


async def no_prompts(_tenant: str) -> bool:
    return False


def event(i: int) -> JournalEvent:
    return JournalEvent(f"{i:032x}", "t", "s", NOW + i, "m", True, 10, 5, 0, 0, 1000 + i)


@pytest.fixture
async def own_redis() -> AsyncIterator[tuple[RedisServer, StoreJournal]]:
    """A private redis-server (the test stops it) and a journal with intents over it."""
    server = RedisServer.start()
    connection = RedisConnection(server.url, timeout_seconds=1)
    assert connection.hot_path is not None
    logs = RedisLogStore(connection.client, owns_client=False, hot_path=connection.hot_path)
    journal = StoreJournal(logs, max_entries=1000, journals_prompts=no_prompts, intents=True)
    try:
        yield server, journal
    finally:
        await connection.aclose()
        server.stop()


@pytest.mark.redis
async def test_each_kind_of_journal_write_logs_an_outage_once(
    own_redis: tuple[RedisServer, StoreJournal],
) -> None:
    server, journal = own_redis
    # Intents written before the outage, removed during it (their settles found no reservation).
    written = []
    for i in range(FAILED):
        intent = journal.intend(event(i), WINDOW_MS)
        assert intent is not None and await intent.recorded()
        written.append(intent)
    with capture_logs() as logs:
        server.stop()
        for i in range(FAILED):
            intent = journal.intend(event(100 + i), WINDOW_MS)
            assert intent is not None and not await intent.recorded()
            journal.append_later(event(200 + i), WINDOW_MS)
            await journal.drain()  # one deferred append per store call: each fails on its own
        for intent in written:
            intent.abandon()
        await journal.drain()
        restarted = RedisServer.start(port=server.port, workdir=server.workdir)
        try:
            intent = journal.intend(event(300), WINDOW_MS)
            assert intent is not None and await intent.recorded()
            intent.abandon()
            journal.append_later(event(301), WINDOW_MS)
            await journal.drain()
            stored = await journal.logs.after(JOURNAL_LOG, "t", "0-0", 100)
        finally:
            restarted.stop()
    assert [JournalEvent.from_json(entry.payload).decision_id for entry in stored] == [f"{301:032x}"]
    levels = Counter((line["event"], line["log_level"]) for line in logs)
    for kind, (lost, restored) in KINDS.items():
        assert levels[lost, "warning"] == 1, (kind, levels)
        # The retries between are debug lines, which an earlier test's logging set-up (level
        # info, loggers cached) may filter before capture: the count of the end line proves them.
        assert levels[lost, "debug"] in (0, FAILED - 1), (kind, levels)
        assert levels[restored, "info"] == 1, (kind, levels)
        (end,) = [line for line in logs if line["event"] == restored]
        assert end["failures"] == FAILED, kind
    assert not [line for line in logs if line["event"] == "journal_background_failed"]
