"""A short-lived, per-process memory of sessions whose budget the store found used up.

A runaway agent loop keeps calling after its session is out of budget; without this,
every such call costs a Redis round trip just to be told no again. Only one kind of
answer is remembered: a crossing-mode budget block, enforced (not shadow). Such a
session stays blocked until its spend goes down, which only a Settle below its
estimate can do, so serving the block from memory can never allow what the store
would block. It can over-block, for at most ``ttl_ms``, after a Settle on another
server frees budget; a Settle through this server forgets the session at once.

The entry keeps the store's split of the spend (settled, and reserved by calls in
flight), so a block served from memory says the same as the store's: whether the
settled spend alone reached the cap, or waiting for settles can lift it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DenyCache", "DenyEntry"]


@dataclass(frozen=True, slots=True)
class DenyEntry:
    """What the store said when it blocked the session."""

    until_ms: int
    committed_nano_usd: int
    cap_nano_usd: int
    # The part of committed_nano_usd held by open reservations (the rest is settled).
    reserved_nano_usd: int = 0

    @property
    def settled_nano_usd(self) -> int:
        """What settled (or expired) calls cost."""
        return self.committed_nano_usd - self.reserved_nano_usd


class DenyCache:
    """Bounded map of (tenant, session) to a recent budget block."""

    def __init__(self, ttl_ms: int = 250, max_entries: int = 100_000) -> None:
        self.ttl_ms = ttl_ms
        self._max_entries = max_entries
        self._entries: dict[tuple[str, str], DenyEntry] = {}

    def blocked(self, tenant: str, session_id: str, cap_nano_usd: int, now_ms: int) -> DenyEntry | None:
        """The remembered block, if it is fresh and still binding under ``cap_nano_usd``.

        A cap raised since the block (a config change) makes the entry useless: the
        store must decide again.
        """
        entry = self._entries.get((tenant, session_id))
        if entry is None:
            return None
        if entry.until_ms <= now_ms or cap_nano_usd > entry.cap_nano_usd:
            del self._entries[(tenant, session_id)]
            return None
        return entry

    def remember(
        self, tenant: str, session_id: str, committed: int, cap: int, now_ms: int, reserved: int = 0
    ) -> None:
        """Note that the store blocked this session's budget (crossing mode, enforced).

        ``committed`` is settled plus ``reserved`` nano-USD, as the store reported them.
        """
        if self.ttl_ms <= 0:
            return
        if len(self._entries) >= self._max_entries:
            self._entries.clear()  # cheap, and only costs a few store round trips
        self._entries[(tenant, session_id)] = DenyEntry(now_ms + self.ttl_ms, committed, cap, reserved)

    def forget(self, tenant: str, session_id: str) -> None:
        """A settle may have freed budget: ask the store next time."""
        self._entries.pop((tenant, session_id), None)
