"""Each tenant's live sessions, counted against a limit: what bounds a tenant's session state.

A session is live from the call that admits it until ``session_ttl`` after its latest
refresh, the same inactivity bound the session store applies to its state. Two
implementations pass one contract suite (tests/store/test_session_registry.py):
:class:`MemorySessionRegistry` (here) and ``RedisSessionRegistry``
(store/redis_session_registry.py): one sorted set per tenant (session id -> expiry ms)
at ``sg:live:{<tenant>}`` (store/keyspace.py), one slot per tenant, so it works on a
cluster.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

__all__ = ["Admission", "MemorySessionRegistry", "SessionRegistry"]


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a session may hold state, and the tenant's live sessions after the call."""

    admitted: bool
    live_sessions: int


class SessionRegistry(ABC):
    """Counts each tenant's live sessions within a limit, atomically."""

    # True when admit() does no I/O (the engine then never admits ahead of the answer).
    local: bool = False

    @abstractmethod
    async def admit(
        self, tenant: str, session_id: str, now_ms: int, expires_ms: int, limit: int
    ) -> Admission:
        """Count ``session_id`` live until ``expires_ms`` unless it is new and the tenant already
        has ``limit`` live sessions (then nothing changes). Sessions expired at ``now_ms`` are
        forgotten first.

        Raises:
            StoreUnavailable: the registry could not be reached.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


@dataclass(slots=True)
class _Tenant:
    expiry: dict[str, int] = field(default_factory=dict)
    # (expiry ms, session): lazily pruned; an entry is current only if it matches ``expiry``.
    due: list[tuple[int, str]] = field(default_factory=list)


class MemorySessionRegistry(SessionRegistry):
    """The registry of the embedded memory store: this process's sessions."""

    local = True

    def __init__(self) -> None:
        self._tenants: dict[str, _Tenant] = {}

    async def admit(
        self, tenant: str, session_id: str, now_ms: int, expires_ms: int, limit: int
    ) -> Admission:
        t = self._tenants.setdefault(tenant, _Tenant())
        while t.due and t.due[0][0] <= now_ms:
            due_ms, session = heapq.heappop(t.due)
            if t.expiry.get(session) == due_ms:
                del t.expiry[session]
        if session_id not in t.expiry and len(t.expiry) >= limit:
            return Admission(False, len(t.expiry))
        if t.expiry.get(session_id) != expires_ms:
            t.expiry[session_id] = expires_ms
            heapq.heappush(t.due, (expires_ms, session_id))
        return Admission(True, len(t.expiry))

    async def close(self) -> None:
        self._tenants.clear()
