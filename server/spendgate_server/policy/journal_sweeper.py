"""The journal sweeper: finishes the appends that a Settle's intent promised and nobody made.

A Settle answered before its journal append leaves an intent in the tenant's log slot
(policy/journal.py); the append removes it. An intent older than the grace means the
append never happened: its server died after the reply, or the append failed. For each,
the sweeper asks the session store for the settle's record: when there is one, it
rebuilds the event exactly as the engine builds it (``DecisionEngine.recovered_event``:
the cost the store counted, the anomalies judged at the settle's time) and appends it,
which removes the intent; when there is none, the settle never ran (or found no
reservation), and the intent is dropped.

Every server runs one. Several sweeping at once are harmless: an append of a decision id
already journaled adds nothing, and a drop removes an intent only while it is the one
that was read (a settle of the same id written since keeps its own). A round costs one
pipelined read of every tenant's stale intents when there is nothing to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from spendgate_server.engine.decide import DecisionEngine
from spendgate_server.engine.events import JournalEvent
from spendgate_server.errors import StoreUnavailable
from spendgate_server.logging import Outage
from spendgate_server.policy.journal import JOURNAL_LOG, StoreJournal

__all__ = ["JournalSweeper", "SweepResult"]

_log = structlog.get_logger("spendgate.journal")

# Intents handled per tenant and round; a backlog is worked through round after round.
_BATCH = 200


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one round did: events appended from intents (added, or found already journaled),
    and intents dropped."""

    journaled: int = 0
    dropped: int = 0


class JournalSweeper:
    """Appends (or drops) the intents older than a grace, for every tenant of the journal.

    Args:
        journal: the journal whose log store holds the intents, and that appends.
        engine: rebuilds each event from the session store's settle record.
        grace_ms: an intent younger than this may still be appended by its settle.
        interval_seconds: time between rounds.
        clock: Unix milliseconds (injected: tests move it past the grace instead of sleeping).
    """

    def __init__(
        self,
        journal: StoreJournal,
        engine: DecisionEngine,
        *,
        grace_ms: int,
        interval_seconds: float,
        clock: Callable[[], int],
    ) -> None:
        self._journal = journal
        self._engine = engine
        self._grace_ms = grace_ms
        self._interval_seconds = interval_seconds
        self._clock = clock

    async def sweep_once(self) -> SweepResult:
        """One round over every tenant.

        Raises:
            StoreUnavailable: a store did not answer; what was done stays done.
        """
        logs = self._journal.logs
        tenants = await logs.tenants(JOURNAL_LOG)
        if not tenants:
            return SweepResult()
        # Intents written grace_ms ago or earlier.
        stale = await logs.stale_intents(
            JOURNAL_LOG, tenants, before_ms=self._clock() - self._grace_ms + 1, count=_BATCH
        )
        window_ms = self._engine.timings.settled_ttl_ms
        journaled = dropped = 0
        for tenant, intents in stale.items():
            events: list[JournalEvent] = []
            unsettled: list[tuple[str, int]] = []
            for intent in intents:
                try:
                    draft: JournalEvent | None = JournalEvent.from_json(intent.payload)
                except ValueError:
                    draft = None  # not an event (written by something else): nothing to append
                if draft is not None and (draft.tenant, draft.decision_id) != (tenant, intent.uid):
                    draft = None  # not this tenant's intent for this id: never journaled elsewhere
                event = None if draft is None else await self._engine.recovered_event(draft)
                if event is None:
                    unsettled.append((intent.uid, intent.time_ms))
                else:
                    events.append(event)
            # Appended together (group commit: one store call per tenant); each removes its intent.
            await asyncio.gather(*(self._journal.append(e, window_ms) for e in events))
            dropped += await logs.drop_intents(JOURNAL_LOG, tenant, unsettled)
            journaled += len(events)
        if journaled or dropped:
            _log.info("journal_intents_swept", journaled=journaled, dropped=dropped)
        return SweepResult(journaled, dropped)

    async def run(self) -> None:
        """Sweep every ``interval_seconds`` until cancelled; a failed round is logged and the
        next one tries again (recovery must never take the decision service down with it)."""
        # A store outage is logged when it starts and when it ends, as every retrying loop does.
        outage = Outage(_log, "journal_sweep_failed", "journal_sweep_restored")
        while True:
            try:
                await self.sweep_once()
                outage.succeeded()
            except StoreUnavailable as exc:
                outage.failed(exc, retry_seconds=self._interval_seconds)
            except Exception as exc:  # a bug in one round: logged with its traceback, not fatal
                _log.error("journal_sweep_failed", error=str(exc), exc_info=exc)
            await asyncio.sleep(self._interval_seconds)
