"""The per-tenant bound on live sessions (``--max-sessions-per-tenant``).

A client can open a fresh session id for every call, and each one holds state (about
1.6 KB in the memory store, kept for the session TTL). The quota counts a tenant's
live sessions in a :class:`SessionRegistry` and refuses a new session past the limit
with RESOURCE_EXHAUSTED, before anything is written.

The Decide hot path pays a dict lookup for a session this process has seen. A new
session is checked with the registry before the decision only when the tenant is near
its limit (within a tenth of it, and at least IN_FLIGHT_PER_TENANT) or the registry is
local; otherwise it is admitted at once and registered in the background, so a new
session costs no extra round trip and the decision never waits on the registry. The count
stays exact in the registry; a tenant can overshoot its limit by at most the
registrations in flight per process (``IN_FLIGHT_PER_TENANT``), and a session admitted
ahead of a refusal is refused from its next call on.

The quota guards memory, not spend: when the registry cannot be reached the call is
admitted (the store it shares is most likely down too, and the store's own circuit
breaker answers at once), and for ``REGISTRY_RETRY_MS`` new sessions are admitted
without asking, so an outage costs one registry timeout per process per interval.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import structlog

from spendgate_server.errors import ResourceExhausted, SpendgateError, StoreUnavailable
from spendgate_server.logging import Outage
from spendgate_server.store.session_registry import SessionRegistry

__all__ = ["IN_FLIGHT_PER_TENANT", "REGISTRY_RETRY_MS", "SessionQuota"]

_log = structlog.get_logger("spendgate.quota")

# Background registrations one tenant may have in flight in this process.
IN_FLIGHT_PER_TENANT = 64
# Sessions this process remembers as admitted (least recently used forgotten first).
KNOWN_SESSIONS = 200_000
# A known session's registry expiry is refreshed at most this often.
REFRESH_MS = 60_000
# After the registry failed to answer, new sessions are admitted unasked this long.
REGISTRY_RETRY_MS = 1_000


class SessionQuota:
    """Admits at most ``limit`` live sessions per tenant.

    Args:
        registry: where live sessions are counted (shared by the fleet with Redis).
        limit: live sessions per tenant.
        session_ttl_ms: how long a session stays live after its latest call.
    """

    def __init__(self, registry: SessionRegistry, limit: int, session_ttl_ms: int) -> None:
        self.registry = registry
        self.limit = limit
        self._ttl_ms = session_ttl_ms
        self._refresh_ms = min(REFRESH_MS, max(1, session_ttl_ms // 10))
        self._known: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._counts: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Logged when the registry stops answering and when it answers again, not per call.
        self._outage = Outage(_log, "session_registry_unavailable", "session_registry_restored")
        # Far from the limit by this much, a new session is registered in the background.
        self._margin = max(IN_FLIGHT_PER_TENANT, limit // 10)
        self._registry_down_until_ms = 0
        self.unchecked = 0

    async def admit(self, tenant: str, session_id: str, now_ms: int) -> None:
        """Let ``session_id`` hold state, or refuse it.

        Raises:
            ResourceExhausted: ``tenant`` already has ``limit`` live sessions and this one is new.
        """
        key = (tenant, session_id)
        refresh_at = self._known.get(key)
        if refresh_at is not None:
            if refresh_at > now_ms:
                self._known.move_to_end(key)
                return
            # Known and counted: refreshing its expiry never needs to hold the call.
            if not self.registry.local:
                self._remember(key, now_ms)
                self._later(tenant, session_id, now_ms)
                return
        in_flight = self._in_flight.get(tenant, 0)
        # A tenant not heard of yet counts as empty: its first replies tell the truth, and
        # until then at most IN_FLIGHT_PER_TENANT sessions go ahead unchecked.
        count = self._counts.get(tenant, 0)
        ahead = (
            not self.registry.local
            and count + in_flight < self.limit - self._margin
            and in_flight < IN_FLIGHT_PER_TENANT
        )
        if ahead:
            self._remember(key, now_ms)
            self._later(tenant, session_id, now_ms)
            return
        if now_ms < self._registry_down_until_ms:
            self.unchecked += 1
            return
        try:
            admission = await self.registry.admit(
                tenant, session_id, now_ms, now_ms + self._ttl_ms, self.limit
            )
        except StoreUnavailable as exc:
            self._registry_down_until_ms = now_ms + REGISTRY_RETRY_MS
            self.unchecked += 1
            self._outage.failed(exc, admitted_unchecked_ms=REGISTRY_RETRY_MS)
            return
        self._outage.succeeded()
        self._counts[tenant] = admission.live_sessions
        if not admission.admitted:
            raise ResourceExhausted(
                "max_sessions_per_tenant",
                f"tenant {tenant!r} already has {admission.live_sessions} live sessions, its limit "
                f"(--max-sessions-per-tenant {self.limit}); reuse a session id, or wait for idle ones "
                f"to expire (--session-ttl-seconds {self._ttl_ms // 1000})",
            )
        self._remember(key, now_ms)

    def _remember(self, key: tuple[str, str], now_ms: int) -> None:
        self._known[key] = now_ms + self._refresh_ms
        self._known.move_to_end(key)
        if len(self._known) > KNOWN_SESSIONS:
            self._known.popitem(last=False)

    def _later(self, tenant: str, session_id: str, now_ms: int) -> None:
        self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1
        task = asyncio.create_task(self._register(tenant, session_id, now_ms))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _register(self, tenant: str, session_id: str, now_ms: int) -> None:
        try:
            admission = await self.registry.admit(
                tenant, session_id, now_ms, now_ms + self._ttl_ms, self.limit
            )
        except SpendgateError as exc:
            # Unregistered: its next call checks again.
            self._known.pop((tenant, session_id), None)
            self._outage.failed(exc, tenant=tenant)
            return
        finally:
            self._in_flight[tenant] -= 1
            if not self._in_flight[tenant]:
                del self._in_flight[tenant]
        self._outage.succeeded()
        self._counts[tenant] = admission.live_sessions
        if not admission.admitted:
            self._known.pop((tenant, session_id), None)
            _log.warning(
                "session_quota_overshoot",
                tenant=tenant,
                live_sessions=admission.live_sessions,
                limit=self.limit,
            )

    async def drain(self) -> None:
        """Wait for the background registrations in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))
