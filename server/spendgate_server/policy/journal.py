"""The journal: every settled call as an event in its tenant's bounded log (a Redis Stream).

With intents (the server's default, ``--journal-intent-grace-seconds`` above 0), a
Settle costs one store round trip: the engine writes the event's *intent* (the event as
known before the store's reply, in the tenant's log slot) in the same write as the settle
script, answers once both are stored, and appends the final event in the background
(within ``deferred_commit_seconds``, one store call for the tenant's appends of that
moment); the append removes the intent in the same atomic step. An intent still there after the
grace belongs to an append that never happened (its server died, or the append failed):
the sweeper (policy/journal_sweeper.py) rebuilds the event from the intent and the
store's settle record and appends it, or drops the intent when the store never settled
the call. So nothing a Settle reply acknowledged is lost: before the reply, its event is
either appended or recoverable from an intent, for as long as the store keeps the settle's
record (the settle window, an hour: some server must sweep within it). If the intent's write fails, the engine
awaits the append as without intents. A server draining on SIGTERM awaits its background
appends (:meth:`StoreJournal.drain`).

Without intents the engine awaits the append before answering, and a failed append fails
the Settle with UNAVAILABLE, which the client retries. The append is idempotent per
decision id, so the engine appends on a repeated settle too: a server dying between
the settle and the append is covered by the client's retry, which finds the call
already settled and journals it then, once.

Appends are group-committed: the appends of one event-loop turn (settles whose store
replies arrive together under load) reach the log in one store call per tenant, and
each returns once the write carrying its event has succeeded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import structlog

from spendgate_server.engine.events import CallContext, Journal, JournalEvent, JournalIntent
from spendgate_server.errors import StoreUnavailable
from spendgate_server.logging import Outage
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
# How long an append made after its Settle's reply waits for others to share its store call.
_DEFERRED_COMMIT_SECONDS = 0.005

# (uid, payload, time ms, the appender waiting for it, or None after the reply)
_Entry = tuple[str, str, int, "asyncio.Future[None] | None"]

_log = structlog.get_logger("spendgate.journal")


class StoreJournal(Journal):
    """The journal in a LogStore (Redis Streams or memory), one bounded log per tenant.

    Args:
        logs: the log store.
        max_entries: each tenant's journal keeps its newest this many events.
        journals_prompts: whether a tenant enabled prompt journaling; prompt text of
            any other tenant is dropped before it is stored.
        group_commit: appends of one event-loop turn share one store call per tenant.
        intents: keep intents (:meth:`intend`), so a Settle is answered before its append.
        deferred_commit_seconds: how long an append after the reply waits for others of its
            tenant to share its store call (the intent already makes it durable, so waiting
            costs only journal latency; the evaluator polls every 200 ms anyway).
    """

    def __init__(
        self,
        logs: LogStore,
        *,
        max_entries: int,
        journals_prompts: Callable[[str], Awaitable[bool]],
        group_commit: bool = True,
        intents: bool = False,
        deferred_commit_seconds: float = _DEFERRED_COMMIT_SECONDS,
    ) -> None:
        self._logs = logs
        self._max_entries = max_entries
        self._journals_prompts = journals_prompts
        self._group_commit = group_commit
        # Appends waiting for the next flush, by (tenant, dedup window): (uid, payload, time, waiter).
        self._waiting: dict[tuple[str, int], list[_Entry]] = {}
        self._intents = intents
        # Appends after the reply (no waiter), by (tenant, dedup window), and their flush timers.
        self._deferred: dict[tuple[str, int], list[_Entry]] = {}
        self._timers: dict[tuple[str, int], asyncio.TimerHandle] = {}
        self._deferred_seconds = deferred_commit_seconds
        # Group commits, intent writes, appends after the reply and intent removals, until they
        # end (drain()).
        self._background: set[asyncio.Task[Any]] = set()
        # The store's failures, one outage per kind of write (a warning when it starts, an info
        # line when it ends), not a line per settle: a client retrying its settles through an
        # outage would otherwise log one line per retry.
        self._intent_outage = Outage(_log, "journal_intent_failed", "journal_intent_restored")
        self._deferred_outage = Outage(
            _log, "journal_append_deferred_failed", "journal_append_deferred_restored"
        )
        self._removal_outage = Outage(
            _log, "journal_intent_removal_failed", "journal_intent_removal_restored"
        )

    @property
    def logs(self) -> LogStore:
        """The log store the journal is kept in."""
        return self._logs

    async def _visible(self, event: JournalEvent) -> JournalEvent:
        """``event`` as it may be stored: prompt text only for a tenant that journals prompts."""
        if event.context.prompt_text and not await self._journals_prompts(event.tenant):
            return replace(event, context=replace(event.context, prompt_text="", prompt_truncated=False))
        return event

    def intend(self, draft: JournalEvent, dedup_window_ms: int) -> JournalIntent | None:
        """Start writing ``draft``'s intent (its first step runs in this turn's next callbacks, so
        on the pipelined connection it leaves in the same write as the caller's settle script)."""
        if not self._intents:
            return None
        return _StoreIntent(
            self, draft, dedup_window_ms, self.spawn(self._put_intent(draft, dedup_window_ms))
        )

    async def _put_intent(self, draft: JournalEvent, dedup_window_ms: int) -> tuple[JournalEvent, str] | None:
        """Store ``draft``'s intent; the draft as stored (its prompt text only where journaled) and
        its JSON, or None when it could not be stored."""
        try:
            # Most settles carry no prompt: no need to ask whether the tenant journals prompts.
            event = await self._visible(draft) if draft.context.prompt_text else draft
            payload = event.to_json()
            await self._logs.put_intent(
                JOURNAL_LOG,
                event.tenant,
                event.decision_id,
                payload,
                now_ms=event.time_ms,
                ttl_ms=dedup_window_ms,
            )
        except StoreUnavailable as exc:  # the Settle awaits its append instead
            self._intent_outage.failed(exc, decision_id=draft.decision_id)
            return None
        except Exception as exc:  # a bug: the Settle awaits its append instead
            _log.warning("journal_intent_failed", decision_id=draft.decision_id, error=str(exc))
            return None
        self._intent_outage.succeeded()
        return event, payload

    def append_later(self, event: JournalEvent, dedup_window_ms: int, payload: str = "") -> None:
        """Append ``event`` (already as it may be stored) within ``deferred_commit_seconds``,
        in one store call with the other deferred appends of its tenant; a failure is logged
        (the event's intent stays for the sweeper). ``payload``, when given, is the event's
        JSON already encoded."""
        key = (event.tenant, dedup_window_ms)
        batch = self._deferred.setdefault(key, [])
        batch.append((event.decision_id, payload or event.to_json(), event.time_ms, None))
        if len(batch) >= _MAX_BATCH:
            self._flush_deferred(key)
        elif len(batch) == 1:
            loop = asyncio.get_running_loop()
            self._timers[key] = loop.call_later(self._deferred_seconds, self._flush_deferred, key)

    def _flush_deferred(self, key: tuple[str, int]) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._commit_in_batches(key, self._deferred.pop(key, []))

    async def drop_intent(self, draft: JournalEvent) -> None:
        """Remove ``draft``'s intent (its settle failed); if the store fails, it stays for the
        sweeper, which drops it (the store never settled the call) or journals it."""
        try:
            await self._logs.drop_intents(JOURNAL_LOG, draft.tenant, [(draft.decision_id, draft.time_ms)])
        except StoreUnavailable as exc:
            self._removal_outage.failed(exc, decision_id=draft.decision_id)
            return
        self._removal_outage.succeeded()

    def spawn(self, work: Any) -> asyncio.Task[Any]:
        """Run ``work`` in the background until it ends; :meth:`drain` waits for it."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The intent stays in the store: the sweeper appends the event after the grace.
            _log.warning("journal_background_failed", error=str(exc), task=task.get_name())

    @property
    def in_background(self) -> int:
        """How many appends after the reply wait to be sent, plus the background writes running."""
        return len(self._background) + sum(len(batch) for batch in self._deferred.values())

    async def drain(self) -> None:
        """Send the deferred appends now and wait for every background write to end (a stopping
        server: nothing is left half done)."""
        for key in list(self._deferred):
            self._flush_deferred(key)
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def append(self, event: JournalEvent, dedup_window_ms: int) -> None:
        """Append ``event`` (once per decision id within ``dedup_window_ms``); returns when stored.

        Group commit: appends made in the same event-loop turn (the settles whose store
        replies arrived together) go to the store in one call per tenant, and each caller
        returns when the write that carries its event succeeded, or raises what it raised.
        """
        event = await self._visible(event)
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
        self._commit_in_batches(key, self._waiting.pop(key, []))

    def _commit_in_batches(self, key: tuple[str, int], batch: list[_Entry]) -> None:
        """Commit ``batch`` in the background, at most ``_MAX_BATCH`` events per store call."""
        for start in range(0, len(batch), _MAX_BATCH):
            self.spawn(self._commit(key, batch[start : start + _MAX_BATCH]))

    async def _commit(self, key: tuple[str, int], batch: list[_Entry]) -> None:
        tenant, dedup_window_ms = key
        try:
            await self._write(tenant, dedup_window_ms, [(uid, payload, ms) for uid, payload, ms, _ in batch])
        except asyncio.CancelledError:
            for *_, waiter in batch:
                if waiter is not None:
                    waiter.cancel()
            raise
        except Exception as exc:
            # Each settle of the batch fails as its own append would have (UNAVAILABLE: retried).
            for *_, waiter in batch:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(exc)
            if any(waiter is None for *_, waiter in batch):
                # Appends after the reply: their intents stay, and the sweeper journals them.
                if isinstance(exc, StoreUnavailable):
                    self._deferred_outage.failed(exc, tenant=tenant, events=len(batch))
                else:
                    _log.warning(
                        "journal_append_deferred_failed", tenant=tenant, events=len(batch), error=str(exc)
                    )
            return
        for *_, waiter in batch:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if any(waiter is None for *_, waiter in batch):
            self._deferred_outage.succeeded()

    async def _write(self, tenant: str, dedup_window_ms: int, entries: list[tuple[str, str, int]]) -> None:
        await self._logs.append(
            JOURNAL_LOG,
            tenant,
            [(uid, payload) for uid, payload, _ in entries],
            max_entries=self._max_entries,
            unique_ttl_ms=dedup_window_ms,
            now_ms=max(ms for _, _, ms in entries),
        )


class _StoreIntent(JournalIntent):
    """One settle's intent in a StoreJournal: its write, then its commit or its removal."""

    def __init__(
        self,
        journal: StoreJournal,
        draft: JournalEvent,
        dedup_window_ms: int,
        write: asyncio.Task[tuple[JournalEvent, str] | None],
    ) -> None:
        self._journal = journal
        self._draft = draft
        self._window_ms = dedup_window_ms
        self._write = write

    async def recorded(self) -> bool:
        if self._write.done():  # usually: its reply came with the settle script's
            return self._write.result() is not None
        # Shielded: a caller that gives up must not cancel the write (the intent is its safety).
        return await asyncio.shield(self._write) is not None

    def commit(self, event: JournalEvent) -> None:
        written = self._write.result()
        if written is None:
            raise RuntimeError("commit of an intent that was not recorded")
        stored, payload = written
        if event.context.prompt_text and not stored.context.prompt_text:
            # The tenant does not journal prompts (decided when the intent was written).
            event = replace(event, context=stored.context)
        # Most events are their draft (the cost the store counted is the one priced, no anomaly):
        # then the intent's JSON is the event's, and it is not encoded again.
        self._journal.append_later(event, self._window_ms, payload if event == stored else "")

    def abandon(self) -> None:
        self._journal.spawn(self._remove())

    async def _remove(self) -> None:
        if await self.recorded():
            # Only this write's intent: a settle of the same id written since keeps its own.
            draft = self._draft
            await self._journal.drop_intent(draft)
