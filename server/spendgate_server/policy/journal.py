"""The journal: every settled call as an event in its tenant's bounded log (a Redis Stream).

The engine appends after a settle succeeds, through the :class:`Journal`
interface. The append is idempotent per decision id, so the engine appends on a
repeated settle too: if a server dies between the settle and the append, the
client's retry (Settle is retried on UNAVAILABLE) finds the call already settled
and journals it then, once. A call is lost from the journal only if the server
dies in that window and the client never retries (it died too, or stayed cut
off longer than its retry window of 10 minutes). A failed append fails the
Settle with UNAVAILABLE, which the client retries the same way.

Appends are group-committed: the settles of one event-loop turn (their store replies
arrive together under load) reach the log in one store call per tenant, and each
Settle answers once the write carrying its event has succeeded, so nothing is
acknowledged before it is stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

from spendgate_server.engine.events import CallContext, Journal, JournalEvent
from spendgate_server.store.logs import LogStore

__all__ = [
    "EVALUATOR_GROUP",
    "JOURNAL_LOG",
    "CallContext",
    "Journal",
    "JournalEvent",
    "StoreJournal",
]

JOURNAL_LOG = "journal"
EVALUATOR_GROUP = "evaluators"
# Events per store call of a group commit (the append script's keys: one marker per event).
_MAX_BATCH = 64


class StoreJournal(Journal):
    """The journal in a LogStore (Redis Streams or memory), one bounded log per tenant.

    Args:
        logs: the log store.
        max_entries: each tenant's journal keeps its newest this many events.
        journals_prompts: whether a tenant enabled prompt journaling; prompt text of
            any other tenant is dropped before it is stored.
    """

    def __init__(
        self,
        logs: LogStore,
        *,
        max_entries: int,
        journals_prompts: Callable[[str], Awaitable[bool]],
        group_commit: bool = True,
    ) -> None:
        self._logs = logs
        self._max_entries = max_entries
        self._journals_prompts = journals_prompts
        self._group_commit = group_commit
        # Appends waiting for the next flush, by (tenant, dedup window): (uid, payload, time, waiter).
        self._waiting: dict[tuple[str, int], list[tuple[str, str, int, asyncio.Future[None]]]] = {}
        self._flushes: set[asyncio.Task[None]] = set()

    async def append(self, event: JournalEvent, dedup_window_ms: int) -> None:
        """Append ``event`` (once per decision id within ``dedup_window_ms``); returns when stored.

        Group commit: appends made in the same event-loop turn (the settles whose store
        replies arrived together) go to the store in one call per tenant, and each caller
        returns when the write that carries its event succeeded, or raises what it raised.
        """
        if event.context.prompt_text and not await self._journals_prompts(event.tenant):
            event = replace(event, context=replace(event.context, prompt_text="", prompt_truncated=False))
        if not self._group_commit:
            await self._write(
                event.tenant, dedup_window_ms, [(event.decision_id, event.to_json(), event.time_ms)]
            )
            return
        key = (event.tenant, dedup_window_ms)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch = self._waiting.setdefault(key, [])
        batch.append((event.decision_id, event.to_json(), event.time_ms, waiter))
        if len(batch) == 1:
            # After every append of this turn: call_soon runs once the callbacks queued before it have.
            asyncio.get_running_loop().call_soon(self._flush, key)
        await waiter

    def _flush(self, key: tuple[str, int]) -> None:
        batch = self._waiting.pop(key, [])
        for start in range(0, len(batch), _MAX_BATCH):
            task = asyncio.get_running_loop().create_task(
                self._commit(key, batch[start : start + _MAX_BATCH])
            )
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _commit(
        self, key: tuple[str, int], batch: list[tuple[str, str, int, asyncio.Future[None]]]
    ) -> None:
        tenant, dedup_window_ms = key
        try:
            await self._write(tenant, dedup_window_ms, [(uid, payload, ms) for uid, payload, ms, _ in batch])
        except asyncio.CancelledError:
            for *_, waiter in batch:
                waiter.cancel()
            raise
        except Exception as exc:
            # Each settle of the batch fails as its own append would have (UNAVAILABLE: retried).
            for *_, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for *_, waiter in batch:
            if not waiter.done():
                waiter.set_result(None)

    async def _write(self, tenant: str, dedup_window_ms: int, entries: list[tuple[str, str, int]]) -> None:
        await self._logs.append(
            JOURNAL_LOG,
            tenant,
            [(uid, payload) for uid, payload, _ in entries],
            max_entries=self._max_entries,
            unique_ttl_ms=dedup_window_ms,
            now_ms=max(ms for _, _, ms in entries),
        )
