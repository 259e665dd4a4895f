"""Per-tenant append-only logs with consumer groups: the journal and the violations feed.

A log is named (``journal``, ``violations``) and split per tenant, each part one
Redis Stream under its own hash tag (``sg:log:{journal:<tenant>}``), so every step
touches one slot and Redis Cluster works. Entries carry a caller-chosen unique id
(``uid``): appending a uid already seen within ``unique_ttl_ms`` adds nothing,
which makes a retried append harmless. Positions (``entry_id``) are Redis stream
ids, ``<milliseconds>-<sequence>``, increasing within a tenant's log.

An *intent* is a payload written under a uid before its entry can be appended (the
journal writes one with each settle, before the settle's final event is known): an
append of that uid removes it in the same atomic step, so an intent left behind marks
an append that never happened (its writer died), for a sweeper to finish or drop.

Consumer groups give at-least-once processing: an entry read by a consumer stays
pending until acknowledged, and an entry pending longer than an idle bound (its
consumer died) can be claimed by another.

Two implementations pass one contract suite (tests/test_log_store.py):
MemoryLogStore (here) and RedisLogStore (store/redis_logs.py).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "AppendResult",
    "Intent",
    "LogEntry",
    "LogStore",
    "MemoryLogStore",
    "entry_id_ms",
    "parse_entry_id",
]


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a comparable pair.

    Raises:
        ValueError: not an entry id.
    """
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def entry_id_ms(entry_id: str) -> int:
    """The millisecond time part of an entry id: when the entry was appended."""
    return parse_entry_id(entry_id)[0]


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One entry: its position in the tenant's log and the payload appended."""

    entry_id: str
    payload: str


@dataclass(frozen=True, slots=True)
class Intent:
    """A payload waiting for its append: its uid, when it was written (Unix ms) and the payload."""

    uid: str
    time_ms: int
    payload: str


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Per appended (uid, payload): the new entry id, or "" when the uid was already there."""

    entry_ids: tuple[str, ...]

    @property
    def added(self) -> int:
        """How many entries were new."""
        return sum(1 for e in self.entry_ids if e)


class LogStore(ABC):
    """Named, per-tenant, bounded logs of unique entries with consumer groups."""

    @abstractmethod
    async def append(
        self,
        log: str,
        tenant: str,
        entries: Sequence[tuple[str, str]],
        *,
        max_entries: int,
        unique_ttl_ms: int,
        now_ms: int,
    ) -> AppendResult:
        """Append ``(uid, payload)`` pairs whose uid was not seen within ``unique_ttl_ms``; atomic.

        The log keeps its newest ``max_entries`` entries (older ones are trimmed,
        pending or not). ``now_ms`` is the caller's clock (the memory store's ids and
        expiry use it; Redis uses its own clock for ids). The intent of every uid given is
        removed in the same step, whether its entry was new or not.
        """

    @abstractmethod
    async def put_intent(
        self, log: str, tenant: str, uid: str, payload: str, *, now_ms: int, ttl_ms: int
    ) -> None:
        """Record (or replace) ``uid``'s intent, written at ``now_ms``; the tenant joins :meth:`tenants`.

        Redis forgets a tenant's intents ``ttl_ms`` after the last one was written.

        Raises:
            StoreUnavailable: not recorded.
        """

    @abstractmethod
    async def stale_intents(
        self, log: str, tenants: Sequence[str], *, before_ms: int, count: int
    ) -> dict[str, list[Intent]]:
        """Per tenant with any, up to ``count`` of its intents written before ``before_ms``, oldest first."""

    @abstractmethod
    async def drop_intents(self, log: str, tenant: str, intents: Sequence[tuple[str, int]]) -> int:
        """Remove each ``(uid, time_ms)`` intent that is still the one written at ``time_ms``
        (a newer write of the uid is kept); returns how many were removed."""

    @abstractmethod
    async def tenants(self, log: str) -> list[str]:
        """Every tenant that ever appended to ``log`` (or wrote an intent to it).

        A store that can lose its data (Redis) lists a tenant again once it writes again
        (store/redis_logs.py says how soon).
        """

    @abstractmethod
    async def read_group(
        self, log: str, tenant: str, group: str, consumer: str, count: int, now_ms: int
    ) -> list[LogEntry]:
        """Up to ``count`` entries never delivered to ``group``, now pending for ``consumer``.

        A group is created on first use, positioned before the oldest retained entry; a
        group the store lost is created again the same way (its entries are delivered
        again: at least once).
        """

    @abstractmethod
    async def claim(
        self, log: str, tenant: str, group: str, consumer: str, min_idle_ms: int, count: int, now_ms: int
    ) -> list[LogEntry]:
        """Up to ``count`` of ``group``'s entries pending for at least ``min_idle_ms``, moved to
        ``consumer`` (a dead consumer's work). Pending entries the log has trimmed meanwhile
        are acknowledged and not returned."""

    @abstractmethod
    async def ack(self, log: str, tenant: str, group: str, entry_ids: Sequence[str]) -> None:
        """Mark entries processed by ``group``: they are never delivered to it again."""

    @abstractmethod
    async def pending(self, log: str, tenant: str, group: str) -> int:
        """How many of ``group``'s entries are delivered and not acknowledged."""

    @abstractmethod
    async def oldest_unacked_ms(self, log: str, tenant: str, group: str) -> int | None:
        """Append time of the oldest entry ``group`` has not acknowledged (pending or never
        delivered); None when it is done with the log."""

    @abstractmethod
    async def after(self, log: str, tenant: str, cursor: str, count: int) -> list[LogEntry]:
        """Up to ``count`` entries after ``cursor`` (exclusive; ``"0-0"`` for the start), oldest first."""

    @abstractmethod
    async def before(self, log: str, tenant: str, cursor: str, low: str, count: int) -> list[LogEntry]:
        """Up to ``count`` entries before ``cursor`` (exclusive; ``""`` for the end) and at or
        after ``low``, newest first."""

    @abstractmethod
    async def last_id(self, log: str, tenant: str) -> str:
        """The newest entry's id, or ``"0-0"`` when the log is empty."""

    @abstractmethod
    async def wait(self, log: str, tenant: str, cursor: str, timeout_seconds: float) -> None:
        """Return when the log may hold entries after ``cursor``, or after the timeout."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


@dataclass(slots=True)
class _Pending:
    consumer: str
    delivered_ms: int


@dataclass(slots=True)
class _Group:
    last_delivered: tuple[int, int]
    pending: dict[str, _Pending] = field(default_factory=dict)


@dataclass(slots=True)
class _Log:
    keys: list[tuple[int, int]] = field(default_factory=list)
    entries: list[LogEntry] = field(default_factory=list)
    uids: dict[str, tuple[str, int]] = field(default_factory=dict)
    groups: dict[str, _Group] = field(default_factory=dict)
    last: tuple[int, int] = (0, 0)
    intents: dict[str, Intent] = field(default_factory=dict)


class MemoryLogStore(LogStore):
    """Logs in this process (the embedded store): same contract, nothing shared.

    Times (entry ids, idle times, uid expiry) come from the callers' ``now_ms``.
    """

    def __init__(self) -> None:
        self._logs: dict[tuple[str, str], _Log] = {}
        self._tenants: dict[str, list[str]] = {}
        self._appended = asyncio.Condition()

    def _log(self, log: str, tenant: str) -> _Log:
        part = self._logs.get((log, tenant))
        if part is None:
            part = self._logs[(log, tenant)] = _Log()
            self._tenants.setdefault(log, []).append(tenant)
        return part

    async def append(
        self,
        log: str,
        tenant: str,
        entries: Sequence[tuple[str, str]],
        *,
        max_entries: int,
        unique_ttl_ms: int,
        now_ms: int,
    ) -> AppendResult:
        part = self._log(log, tenant)
        ids: list[str] = []
        for uid, _ in entries:
            part.intents.pop(uid, None)
        for uid, payload in entries:
            seen = part.uids.get(uid)
            if seen is not None and seen[1] > now_ms:
                ids.append("")
                continue
            key = (now_ms, 0) if now_ms > part.last[0] else (part.last[0], part.last[1] + 1)
            part.last = key
            entry_id = f"{key[0]}-{key[1]}"
            part.keys.append(key)
            part.entries.append(LogEntry(entry_id, payload))
            part.uids[uid] = (entry_id, now_ms + unique_ttl_ms)
            ids.append(entry_id)
        excess = len(part.entries) - max_entries
        if excess > 0:
            del part.keys[:excess], part.entries[:excess]
        if len(part.uids) > 2 * max(max_entries, 1024):
            part.uids = {u: v for u, v in part.uids.items() if v[1] > now_ms}
        async with self._appended:
            self._appended.notify_all()
        return AppendResult(tuple(ids))

    async def tenants(self, log: str) -> list[str]:
        return list(self._tenants.get(log, []))

    async def put_intent(
        self, log: str, tenant: str, uid: str, payload: str, *, now_ms: int, ttl_ms: int
    ) -> None:
        # The intents of this process's logs die with it, as its logs do: no expiry needed.
        self._log(log, tenant).intents[uid] = Intent(uid, now_ms, payload)

    async def stale_intents(
        self, log: str, tenants: Sequence[str], *, before_ms: int, count: int
    ) -> dict[str, list[Intent]]:
        out: dict[str, list[Intent]] = {}
        for tenant in tenants:
            part = self._logs.get((log, tenant))
            if part is None:
                continue
            stale = sorted(
                (i for i in part.intents.values() if i.time_ms < before_ms), key=lambda i: i.time_ms
            )
            if stale:
                out[tenant] = stale[:count]
        return out

    async def drop_intents(self, log: str, tenant: str, intents: Sequence[tuple[str, int]]) -> int:
        part = self._logs.get((log, tenant))
        dropped = 0
        for uid, time_ms in intents:
            found = part.intents.get(uid) if part is not None else None
            if part is not None and found is not None and found.time_ms == time_ms:
                del part.intents[uid]
                dropped += 1
        return dropped

    def _group(self, part: _Log, group: str) -> _Group:
        found = part.groups.get(group)
        if found is None:
            found = part.groups[group] = _Group((0, 0))
        return found

    async def read_group(
        self, log: str, tenant: str, group: str, consumer: str, count: int, now_ms: int
    ) -> list[LogEntry]:
        part = self._log(log, tenant)
        state = self._group(part, group)
        start = bisect.bisect_right(part.keys, state.last_delivered)
        batch = part.entries[start : start + count]
        for entry in batch:
            state.pending[entry.entry_id] = _Pending(consumer, now_ms)
        if batch:
            state.last_delivered = parse_entry_id(batch[-1].entry_id)
        return batch

    def _find(self, part: _Log, entry_id: str) -> LogEntry | None:
        key = parse_entry_id(entry_id)
        index = bisect.bisect_left(part.keys, key)
        if index < len(part.keys) and part.keys[index] == key:
            return part.entries[index]
        return None

    async def claim(
        self, log: str, tenant: str, group: str, consumer: str, min_idle_ms: int, count: int, now_ms: int
    ) -> list[LogEntry]:
        part = self._log(log, tenant)
        state = self._group(part, group)
        now = now_ms
        claimed: list[LogEntry] = []
        for entry_id in sorted(state.pending, key=parse_entry_id):
            if len(claimed) >= count:
                break
            info = state.pending[entry_id]
            if now - info.delivered_ms < min_idle_ms:
                continue
            entry = self._find(part, entry_id)
            if entry is None:
                del state.pending[entry_id]  # trimmed while pending: nothing left to process
                continue
            state.pending[entry_id] = _Pending(consumer, now)
            claimed.append(entry)
        return claimed

    async def ack(self, log: str, tenant: str, group: str, entry_ids: Sequence[str]) -> None:
        state = self._group(self._log(log, tenant), group)
        for entry_id in entry_ids:
            state.pending.pop(entry_id, None)

    async def pending(self, log: str, tenant: str, group: str) -> int:
        return len(self._group(self._log(log, tenant), group).pending)

    async def oldest_unacked_ms(self, log: str, tenant: str, group: str) -> int | None:
        part = self._log(log, tenant)
        state = self._group(part, group)
        candidates = [parse_entry_id(e)[0] for e in state.pending if self._find(part, e) is not None]
        start = bisect.bisect_right(part.keys, state.last_delivered)
        if start < len(part.keys):
            candidates.append(part.keys[start][0])
        return min(candidates) if candidates else None

    async def after(self, log: str, tenant: str, cursor: str, count: int) -> list[LogEntry]:
        part = self._log(log, tenant)
        start = bisect.bisect_right(part.keys, parse_entry_id(cursor))
        return part.entries[start : start + count]

    async def before(self, log: str, tenant: str, cursor: str, low: str, count: int) -> list[LogEntry]:
        part = self._log(log, tenant)
        end = bisect.bisect_left(part.keys, parse_entry_id(cursor)) if cursor else len(part.keys)
        start = max(bisect.bisect_left(part.keys, parse_entry_id(low)), end - count)
        return part.entries[start:end][::-1]

    async def last_id(self, log: str, tenant: str) -> str:
        part = self._log(log, tenant)
        return part.entries[-1].entry_id if part.entries else "0-0"

    async def wait(self, log: str, tenant: str, cursor: str, timeout_seconds: float) -> None:
        part = self._log(log, tenant)
        key = parse_entry_id(cursor)
        with contextlib.suppress(TimeoutError):
            async with self._appended:
                await asyncio.wait_for(
                    self._appended.wait_for(lambda: bool(part.keys) and part.keys[-1] > key),
                    timeout_seconds,
                )

    async def close(self) -> None:
        return None
