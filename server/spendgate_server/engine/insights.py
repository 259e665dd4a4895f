"""Session insights for people (the console's Sessions page): top spenders, blocks, spend over time.

Every server buffers what its decisions and settles show, per session, and flushes the
buffer to the InsightsStore about once a second in one batch. The hot path only
updates a dict; nothing here is ever consulted to enforce a rule.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import structlog

from spendgate_server.engine.decide import Clock, Decision, system_clock_ms
from spendgate_server.errors import SpendgateError
from spendgate_server.logging import Outage
from spendgate_server.store.insights import MINUTE_MS, InsightsStore, SessionDelta

__all__ = ["MAX_PENDING_SESSIONS", "SessionActivity"]

_log = structlog.get_logger("spendgate.insights")
# A buffer never holds more sessions than this between flushes (memory bound under a storm).
MAX_PENDING_SESSIONS = 100_000


class SessionActivity:
    """The per-server buffer: cheap to update on every RPC, flushed in batches."""

    def __init__(self, store: InsightsStore, clock: Clock = system_clock_ms) -> None:
        self.store = store
        self._clock = clock
        self._pending: dict[str, dict[str, SessionDelta]] = defaultdict(dict)
        self._size = 0
        # A store outage is logged when it starts and when it ends, not at every flush.
        self._outage = Outage(_log, "insights_flush_failed", "insights_flush_restored")

    def _delta(self, tenant: str, session_id: str) -> SessionDelta | None:
        sessions = self._pending[tenant]
        delta = sessions.get(session_id)
        if delta is None:
            if self._size >= MAX_PENDING_SESSIONS:
                return None  # dropped until the next flush: insights are best effort
            delta = sessions[session_id] = SessionDelta()
            self._size += 1
        return delta

    def decided(self, tenant: str, project: str, session_id: str, decision: Decision) -> None:
        """Note one decision."""
        delta = self._delta(tenant, session_id)
        if delta is None:
            return
        delta.project = project
        delta.last_seen_ms = self._clock()
        delta.decisions += 1
        if decision.spend_known:
            delta.committed_nano_usd = decision.session_spend_nano_usd
        delta.budget_nano_usd = decision.budget_nano_usd
        if not decision.allowed and decision.rule is not None:
            delta.blocked[decision.rule] += 1

    def settled(self, tenant: str, session_id: str, cost_nano_usd: int, committed_nano_usd: int) -> None:
        """Note one settle."""
        delta = self._delta(tenant, session_id)
        if delta is None:
            return
        now = self._clock()
        delta.last_seen_ms = now
        delta.committed_nano_usd = committed_nano_usd
        delta.spend_by_minute[now - now % MINUTE_MS] += cost_nano_usd

    async def flush(self) -> None:
        """Send everything buffered to the store (kept for the next try if that fails)."""
        pending, self._pending, self._size = self._pending, defaultdict(dict), 0
        now = self._clock()
        failed = False
        for tenant, deltas in pending.items():
            try:
                await self.store.record(tenant, deltas, now)
            except SpendgateError as exc:
                failed = True
                self._outage.failed(exc, tenant=tenant)
        if pending and not failed:
            self._outage.succeeded()

    async def run(self, interval_seconds: float = 1.0) -> None:
        """Flush periodically until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(interval_seconds)
                await self.flush()
        finally:
            with contextlib.suppress(Exception):
                await self.flush()
