"""The journal: every settled call as an event in its tenant's bounded log (a Redis Stream).

The engine appends after a settle succeeds, through the :class:`Journal`
interface. The append is idempotent per decision id, so the engine appends on a
repeated settle too: if a server dies between the settle and the append, the
client's retry (Settle is retried on UNAVAILABLE) finds the call already settled
and journals it then, once. A call is lost from the journal only if the server
dies in that window and the client never retries (it died too, or stayed cut
off longer than its retry window of 10 minutes). A failed append fails the
Settle with UNAVAILABLE, which the client retries the same way.
"""

from __future__ import annotations

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


class StoreJournal(Journal):
    """The journal in a LogStore (Redis Streams or memory), one bounded log per tenant.

    Args:
        logs: the log store.
        max_entries: each tenant's journal keeps its newest this many events.
        journals_prompts: whether a tenant enabled prompt journaling; prompt text of
            any other tenant is dropped before it is stored.
    """

    def __init__(
        self, logs: LogStore, *, max_entries: int, journals_prompts: Callable[[str], Awaitable[bool]]
    ) -> None:
        self._logs = logs
        self._max_entries = max_entries
        self._journals_prompts = journals_prompts

    async def append(self, event: JournalEvent, dedup_window_ms: int) -> None:
        if event.context.prompt_text and not await self._journals_prompts(event.tenant):
            event = replace(event, context=replace(event.context, prompt_text="", prompt_truncated=False))
        await self._logs.append(
            JOURNAL_LOG,
            event.tenant,
            [(event.decision_id, event.to_json())],
            max_entries=self._max_entries,
            unique_ttl_ms=dedup_window_ms,
            now_ms=event.time_ms,
        )
