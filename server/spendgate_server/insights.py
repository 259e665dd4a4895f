"""Session insights for people (the console's Sessions page): top spenders, blocks, spend over time.

Every server buffers what its decisions and settles show, per session, and flushes the
buffer to the InsightsStore about once a second in one batch. The hot path only
updates a dict; nothing here is ever consulted to enforce a rule.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field

import structlog

from spendgate_server.config import Rule
from spendgate_server.engine import Clock, Decision, system_clock_ms
from spendgate_server.errors import SpendgateError

__all__ = [
    "InsightsStore",
    "MemoryInsightsStore",
    "SessionActivity",
    "SessionDelta",
    "SessionSummary",
    "SpendPoint",
]

_log = structlog.get_logger("spendgate.insights")
MINUTE_MS = 60_000
# How long a session's insights outlive its last activity.
RETENTION_MS = 24 * 3600 * 1000
# A buffer never holds more sessions than this between flushes (memory bound under a storm).
MAX_PENDING_SESSIONS = 100_000


@dataclass(slots=True)
class SessionDelta:
    """What one server saw of one session since its last flush."""

    project: str = ""
    committed_nano_usd: int | None = None
    budget_nano_usd: int | None = None
    last_seen_ms: int = 0
    decisions: int = 0
    blocked: dict[Rule, int] = field(default_factory=lambda: defaultdict(int))
    # Minute start (Unix ms) -> settled cost in it.
    spend_by_minute: dict[int, int] = field(default_factory=lambda: defaultdict(int))


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """A session's aggregated recent state."""

    session_id: str
    project: str
    spend_nano_usd: int
    budget_nano_usd: int | None
    decisions: int
    blocked: dict[Rule, int]
    last_seen_ms: int


@dataclass(frozen=True, slots=True)
class SpendPoint:
    """Settled spend within the minute starting at ``minute_start_ms``."""

    minute_start_ms: int
    cost_nano_usd: int


class InsightsStore(ABC):
    """Where the fleet's flushed session insights are aggregated."""

    @abstractmethod
    async def record(self, tenant: str, deltas: dict[str, SessionDelta], now_ms: int) -> None:
        """Fold one server's deltas for ``tenant`` into the aggregate."""

    @abstractmethod
    async def top_sessions(self, tenant: str, project: str, limit: int, now_ms: int) -> list[SessionSummary]:
        """The sessions with the most spend (of ``project`` when given), highest first."""

    @abstractmethod
    async def spend_series(self, tenant: str, session_id: str, now_ms: int) -> list[SpendPoint]:
        """A session's settled spend per minute over the retention window, oldest first."""

    async def close(self) -> None:
        """Release connections."""
        return


class SessionActivity:
    """The per-server buffer: cheap to update on every RPC, flushed in batches."""

    def __init__(self, store: InsightsStore, clock: Clock = system_clock_ms) -> None:
        self.store = store
        self._clock = clock
        self._pending: dict[str, dict[str, SessionDelta]] = defaultdict(dict)
        self._size = 0

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
        for tenant, deltas in pending.items():
            try:
                await self.store.record(tenant, deltas, now)
            except SpendgateError as exc:
                _log.warning("insights_flush_failed", tenant=tenant, error=str(exc))

    async def run(self, interval_seconds: float = 1.0) -> None:
        """Flush periodically until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(interval_seconds)
                await self.flush()
        finally:
            with contextlib.suppress(Exception):
                await self.flush()


class MemoryInsightsStore(InsightsStore):
    """The embedded aggregate, in this process."""

    def __init__(self) -> None:
        self._sessions: dict[str, dict[str, SessionSummary]] = defaultdict(dict)
        self._series: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))

    async def record(self, tenant: str, deltas: dict[str, SessionDelta], now_ms: int) -> None:
        for session_id, delta in deltas.items():
            old = self._sessions[tenant].get(session_id)
            blocked = dict(old.blocked) if old else {}
            for rule, count in delta.blocked.items():
                blocked[rule] = blocked.get(rule, 0) + count
            committed = delta.committed_nano_usd
            self._sessions[tenant][session_id] = SessionSummary(
                session_id,
                delta.project or (old.project if old else ""),
                committed if committed is not None else (old.spend_nano_usd if old else 0),
                delta.budget_nano_usd if delta.decisions else (old.budget_nano_usd if old else None),
                (old.decisions if old else 0) + delta.decisions,
                blocked,
                max(delta.last_seen_ms, old.last_seen_ms if old else 0),
            )
            series = self._series[(tenant, session_id)]
            for minute, cost in delta.spend_by_minute.items():
                series[minute] += cost

    async def top_sessions(self, tenant: str, project: str, limit: int, now_ms: int) -> list[SessionSummary]:
        live = [
            s
            for s in self._sessions[tenant].values()
            if s.last_seen_ms > now_ms - RETENTION_MS and (not project or s.project == project)
        ]
        return sorted(live, key=lambda s: (-s.spend_nano_usd, s.session_id))[:limit]

    async def spend_series(self, tenant: str, session_id: str, now_ms: int) -> list[SpendPoint]:
        series = self._series.get((tenant, session_id), {})
        return [SpendPoint(m, c) for m, c in sorted(series.items()) if m > now_ms - RETENTION_MS]
