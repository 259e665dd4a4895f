"""Session insights storage: the fleet's per-session aggregate (the console's Sessions page).

Interface, data shapes and the embedded backend; the Redis backend is store/redis_insights.py.
Servers fold batched deltas in (engine/insights.py buffers them); nothing here is ever
consulted to enforce a rule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field

from spendgate_server.rule_codes import Rule

__all__ = [
    "MINUTE_MS",
    "RETENTION_MS",
    "InsightsStore",
    "MemoryInsightsStore",
    "SessionDelta",
    "SessionSummary",
    "SpendPoint",
]

MINUTE_MS = 60_000
# How long a session's insights outlive its last activity.
RETENTION_MS = 24 * 3600 * 1000


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
