"""The evaluator: a consumer group over every tenant's journal that stores policy violations.

At-least-once, and no duplicates: a batch is acknowledged only after its
violations are stored, so a worker that dies mid-batch leaves its entries
pending; another worker (or this one, restarted) claims entries pending longer
than ``claim_idle_ms`` and evaluates them again. A violation's id is derived from
(call, policy), and the feed stores an id once, so the second evaluation adds
nothing that the first already stored.

Run it as ``spendgate worker`` (any number, against Redis) or inside ``spendgate
serve`` (the embedded memory store has no other reader).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from spendgate_server.errors import StoreUnavailable
from spendgate_server.metrics import Metrics
from spendgate_server.policy.checks import evaluate
from spendgate_server.policy.journal import EVALUATOR_GROUP, JOURNAL_LOG, JournalEvent
from spendgate_server.policy.remote_policies import PolicyResolver
from spendgate_server.policy.violations import Violation, ViolationFeed
from spendgate_server.store.logs import LogEntry, LogStore

__all__ = ["Evaluator", "EvaluatorTimings", "default_consumer_name"]

_log = structlog.get_logger("spendgate.evaluator")
Clock = Callable[[], int]


def default_consumer_name() -> str:
    """``host:pid``: unique per worker process, readable in XINFO CONSUMERS."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _system_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class EvaluatorTimings:
    """How the evaluator paces itself."""

    # Entries read per tenant per round.
    batch_size: int = 100
    # An entry pending this long belongs to a dead consumer and may be claimed.
    claim_idle_ms: int = 30_000
    # Pause between rounds that found nothing.
    idle_poll_seconds: float = 0.2
    # How often the lag and pending gauges are refreshed.
    metrics_interval_seconds: float = 5.0


class Evaluator:
    """Evaluates journal entries into violations for every tenant.

    Args:
        logs: the log store holding the journals.
        feed: where violations go.
        policies: the tenants' current policies.
        consumer: this worker's name in the consumer group.
        timings: batch size, claim idle bound, poll and metrics intervals.
        metrics: sets spendgate_journal_lag_seconds and spendgate_evaluator_pending.
        clock: Unix milliseconds.
    """

    def __init__(
        self,
        logs: LogStore,
        feed: ViolationFeed,
        policies: PolicyResolver,
        *,
        consumer: str | None = None,
        timings: EvaluatorTimings | None = None,
        metrics: Metrics | None = None,
        clock: Clock = _system_ms,
    ) -> None:
        self._logs = logs
        self._feed = feed
        self._policies = policies
        self.consumer = consumer or default_consumer_name()
        self._timings = timings or EvaluatorTimings()
        self._metrics = metrics
        self._clock = clock
        self._stopping = False
        self.evaluated = 0

    async def run_once(self) -> int:
        """One round over every tenant: claim a dead consumer's entries, then read new ones.

        Returns:
            How many journal entries were evaluated (and acknowledged).
        """
        t = self._timings
        done = 0
        for tenant in await self._logs.tenants(JOURNAL_LOG):
            now = self._clock()
            stale = await self._logs.claim(
                JOURNAL_LOG, tenant, EVALUATOR_GROUP, self.consumer, t.claim_idle_ms, t.batch_size, now
            )
            if stale:
                _log.info("journal_entries_reclaimed", tenant=tenant, count=len(stale))
                done += await self._process(tenant, stale)
            fresh = await self._logs.read_group(
                JOURNAL_LOG, tenant, EVALUATOR_GROUP, self.consumer, t.batch_size, now
            )
            done += await self._process(tenant, fresh)
        return done

    async def _process(self, tenant: str, entries: list[LogEntry]) -> int:
        if not entries:
            return 0
        policies = await self._policies.get(tenant)
        violations: list[Violation] = []
        for entry in entries:
            try:
                violations += evaluate(JournalEvent.from_json(entry.payload), policies)
            except Exception:
                # A poison entry is logged and acknowledged: retrying it forever would stall the tenant.
                _log.exception("journal_entry_not_evaluated", tenant=tenant, entry_id=entry.entry_id)
        # Stored first, acknowledged after: a crash in between re-evaluates, and the ids dedupe.
        added = await self._feed.add(tenant, violations, self._clock())
        await self._logs.ack(JOURNAL_LOG, tenant, EVALUATOR_GROUP, [e.entry_id for e in entries])
        self.evaluated += len(entries)
        if violations:
            _log.info(
                "violations_found", tenant=tenant, found=len(violations), stored=added, entries=len(entries)
            )
        return len(entries)

    async def refresh_metrics(self) -> tuple[int, float]:
        """Set the gauges; returns (pending entries, lag in seconds) over every tenant."""
        pending, oldest = 0, None
        for tenant in await self._logs.tenants(JOURNAL_LOG):
            pending += await self._logs.pending(JOURNAL_LOG, tenant, EVALUATOR_GROUP)
            first = await self._logs.oldest_unacked_ms(JOURNAL_LOG, tenant, EVALUATOR_GROUP)
            if first is not None:
                oldest = first if oldest is None else min(oldest, first)
        lag = max(0.0, (self._clock() - oldest) / 1000) if oldest is not None else 0.0
        if self._metrics is not None:
            self._metrics.evaluator_pending.set(pending)
            self._metrics.journal_lag.set(lag)
        return pending, lag

    def stop(self) -> None:
        """Finish the round in progress, then return from :meth:`run`."""
        self._stopping = True

    async def run(self) -> None:
        """Evaluate until :meth:`stop` (or cancellation); store outages are logged and retried.

        Raises:
            Exception: anything but an outage (a bug, a record it cannot read): the process
                running the evaluator ends with it rather than evaluating nothing unnoticed.
        """
        loop = asyncio.get_running_loop()
        next_metrics = 0.0
        failures = 0
        while not self._stopping:
            try:
                done = await self.run_once()
                if loop.time() >= next_metrics:
                    await self.refresh_metrics()
                    next_metrics = loop.time() + self._timings.metrics_interval_seconds
                failures = 0
            except StoreUnavailable as exc:
                # An outage passes: back off, keep evaluating.
                failures += 1
                _log.warning("evaluator_round_failed", error=str(exc), failures=failures)
                await asyncio.sleep(min(self._timings.idle_poll_seconds * 2**failures, 5.0))
                continue
            if not done:
                await asyncio.sleep(self._timings.idle_poll_seconds)
