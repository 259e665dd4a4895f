"""Violations and the alerts feed: a per-tenant log of the calls that broke a policy.

A violation's id is derived from (tenant, call, policy, pattern), and the feed
stores an id once (store/logs.py), so an event evaluated twice (redelivered
after a worker died) never yields a second copy. Its position in the feed (the
cursor) is a stream id: increasing, so a watcher that resumes after the last
cursor it received misses none and repeats none.

Live watchers share one reader per tenant and process (:class:`ViolationHub`): a
thousand open streams cost one poll of the store, not a thousand, and hold no pooled
connection while they wait. Open streams are bounded per tenant and per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from spendgate_server.engine.anomalies import AnomalyKind, SettleAnomaly
from spendgate_server.errors import ResourceExhausted
from spendgate_server.store.logs import LogStore, entry_id_ms, parse_entry_id

__all__ = [
    "VIOLATIONS_LOG",
    "WEBHOOK_GROUP",
    "PatternHit",
    "PolicyType",
    "Violation",
    "ViolationFeed",
    "ViolationFilter",
    "ViolationHub",
    "Watch",
    "WatchLimits",
    "violation_id",
]

_log = structlog.get_logger("spendgate.violations")

VIOLATIONS_LOG = "violations"
WEBHOOK_GROUP = "webhook"


class PolicyType(enum.IntEnum):
    """Values are the wire codes of spendgate.v1.PolicyType."""

    APPROVED_MODELS = 1
    BANNED_PATTERNS = 2
    KEY_ENVIRONMENT_CHECK = 3
    APPROVAL_REQUIRED_THRESHOLD = 4
    # Built in, always on: a settle that does not match its decision (engine/anomalies.py).
    SETTLE_ANOMALY = 5

    @property
    def key(self) -> str:
        """The user-facing policy name."""
        return _KEYS[self]

    @classmethod
    def from_key(cls, key: str) -> PolicyType:
        """The type named ``key`` (``approved_models``, ...).

        Raises:
            ValueError: no such policy.
        """
        for member, name in _KEYS.items():
            if name == key:
                return member
        raise ValueError(f"unknown policy type {key!r}; expected one of {', '.join(_KEYS.values())}")


_KEYS = {
    PolicyType.APPROVED_MODELS: "approved_models",
    PolicyType.BANNED_PATTERNS: "banned_patterns",
    PolicyType.KEY_ENVIRONMENT_CHECK: "key_environment_check",
    PolicyType.APPROVAL_REQUIRED_THRESHOLD: "approval_required_threshold_cents",
    PolicyType.SETTLE_ANOMALY: "settle_anomaly",
}


def violation_id(tenant: str, decision_id: str, policy_type: PolicyType, item: str = "") -> str:
    """The id of the violation of ``policy_type`` (and ``item``, a pattern id) by one call."""
    key = "\x00".join((tenant, decision_id, str(int(policy_type)), item))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class PatternHit:
    """Where a banned pattern matched; never the matched text."""

    pattern_id: str
    pattern: str
    offset: int
    redacted_excerpt: str = ""
    matched_on_client: bool = False


@dataclass(frozen=True, slots=True)
class Violation:
    """One call that broke one policy."""

    violation_id: str
    policy_type: PolicyType
    message: str
    call_time_ms: int
    decision_id: str
    session_id: str
    project: str
    requested_model: str
    effective_model: str
    environment: str
    key_fingerprint: str
    key_label: str
    cost_nano_usd: int
    policy_version: int
    pattern: PatternHit | None = None
    approved_models: tuple[str, ...] = ()
    permitted_environments: tuple[str, ...] = ()
    threshold_cents: int = 0
    # Set for SETTLE_ANOMALY: what the settle reported against what Decide admitted.
    anomaly: SettleAnomaly | None = None
    # Its position in the feed; empty until stored.
    cursor: str = field(default="", compare=False)

    @property
    def create_time_ms(self) -> int:
        """When it was stored in the feed (0 before)."""
        return entry_id_ms(self.cursor) if self.cursor else 0

    def to_json(self) -> str:
        """The stored form (without the cursor, which the feed assigns)."""
        raw = asdict(self)
        del raw["cursor"]
        raw["policy_type"] = self.policy_type.key
        return json.dumps(raw, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, cursor: str = "") -> Violation:
        """Parse what to_json wrote."""
        raw: dict[str, Any] = json.loads(text)
        raw["policy_type"] = PolicyType.from_key(raw["policy_type"])
        raw["pattern"] = PatternHit(**raw["pattern"]) if raw.get("pattern") else None
        raw["approved_models"] = tuple(raw.get("approved_models", ()))
        raw["permitted_environments"] = tuple(raw.get("permitted_environments", ()))
        anomaly = raw.get("anomaly")
        raw["anomaly"] = (
            SettleAnomaly(**{**anomaly, "kind": AnomalyKind(anomaly["kind"])}) if anomaly else None
        )
        return cls(**raw, cursor=cursor)

    def webhook_payload(self, tenant: str) -> dict[str, Any]:
        """The JSON object a webhook receives."""
        raw: dict[str, Any] = json.loads(self.to_json())
        return {"tenant": tenant, "cursor": self.cursor, "create_time_ms": self.create_time_ms, **raw}


@dataclass(frozen=True, slots=True)
class ViolationFilter:
    """Which violations a reader wants; unset fields match all."""

    policy_type: PolicyType | None = None
    session_id: str = ""
    project: str = ""

    def matches(self, violation: Violation) -> bool:
        """Whether ``violation`` passes."""
        return (
            (self.policy_type is None or violation.policy_type is self.policy_type)
            and (not self.session_id or violation.session_id == self.session_id)
            and (not self.project or violation.project == self.project)
        )


class ViolationFeed:
    """The alerts feed over a LogStore.

    Args:
        logs: the log store.
        max_entries: each tenant's feed keeps its newest this many violations.
        dedup_window_ms: how long a violation id is remembered; longer than any
            journal event can wait to be (re)evaluated.
    """

    def __init__(self, logs: LogStore, *, max_entries: int, dedup_window_ms: int) -> None:
        self.logs = logs
        self._max_entries = max_entries
        self._dedup_window_ms = dedup_window_ms

    async def add(self, tenant: str, violations: Sequence[Violation], now_ms: int) -> int:
        """Store the violations whose ids are new, atomically; returns how many were."""
        if not violations:
            return 0
        result = await self.logs.append(
            VIOLATIONS_LOG,
            tenant,
            [(v.violation_id, v.to_json()) for v in violations],
            max_entries=self._max_entries,
            unique_ttl_ms=self._dedup_window_ms,
            now_ms=now_ms,
        )
        return result.added

    async def after(self, tenant: str, cursor: str, count: int) -> list[Violation]:
        """Up to ``count`` violations after ``cursor`` ("0-0": from the oldest kept), oldest first."""
        entries = await self.logs.after(VIOLATIONS_LOG, tenant, cursor, count)
        return [Violation.from_json(e.payload, e.entry_id) for e in entries]

    async def page(
        self,
        tenant: str,
        *,
        before: str,
        since_ms: int,
        until_ms: int | None,
        where: ViolationFilter,
        page_size: int,
        scan_limit: int,
    ) -> tuple[list[Violation], str]:
        """Newest first: up to ``page_size`` matching violations found in [since_ms, until_ms),
        before cursor ``before`` (empty: the newest). At most ``scan_limit`` entries are read;
        the second value is where the next page starts, empty when nothing older is left."""
        cursor = before
        if until_ms is not None:
            bound = f"{until_ms}-0"
            if not cursor or parse_entry_id(bound) < parse_entry_id(cursor):
                cursor = bound
        low = f"{since_ms}-0"
        found: list[Violation] = []
        scanned = 0
        while scanned < scan_limit:
            want = min(max(page_size, 100), scan_limit - scanned)
            entries = await self.logs.before(VIOLATIONS_LOG, tenant, cursor, low, want)
            for entry in entries:
                scanned += 1
                cursor = entry.entry_id
                violation = Violation.from_json(entry.payload, entry.entry_id)
                if where.matches(violation):
                    found.append(violation)
                    if len(found) == page_size:
                        break
            if len(found) == page_size or len(entries) < want:
                break
        more = await self.logs.before(VIOLATIONS_LOG, tenant, cursor, low, 1) if cursor else []
        return found, cursor if more else ""

    async def last_cursor(self, tenant: str) -> str:
        """The newest violation's cursor ("0-0" when there is none)."""
        return await self.logs.last_id(VIOLATIONS_LOG, tenant)

    async def wait(self, tenant: str, cursor: str, timeout_seconds: float) -> None:
        """Return when violations after ``cursor`` may exist, or after the timeout."""
        await self.logs.wait(VIOLATIONS_LOG, tenant, cursor, timeout_seconds)


@dataclass(frozen=True, slots=True)
class WatchLimits:
    """Bounds on live watchers (WatchViolations streams) in one process.

    Attributes:
        per_tenant: open streams one tenant may hold (--max-watch-streams-per-tenant).
        per_process: open streams of all tenants together (--max-watch-streams).
        queued_per_watch: violations buffered for a watcher that reads slowly; past
            this it drops the buffer and re-reads from its cursor, so memory stays bounded.
        concurrent_catch_ups: store reads that watchers resuming from an old cursor
            may run at once, so a burst of reconnects cannot take the connection pool.
        batch_size: violations read per store call.
        messages_per_second_per_tenant: violations handed to one tenant's watchers per
            second in this process, all its streams together (bursts up to a tenth of
            a second's worth). Each message costs the serving loop tens of microseconds;
            past this a tenant's watchers fall behind (and catch up later) instead of
            taking the loop from other tenants' decisions.
    """

    per_tenant: int = 64
    per_process: int = 1024
    queued_per_watch: int = 1000
    concurrent_catch_ups: int = 4
    batch_size: int = 100
    messages_per_second_per_tenant: float = 1000.0


class _Budget:
    """A token bucket: ``rate`` tokens a second, holding at most ``burst``."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._last = asyncio.get_running_loop().time()
        # Waiters queue here in turn (FIFO), so at most one of them sleeps on the clock.
        self._turn = asyncio.Lock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    async def take(self, wanted: int) -> int:
        """Wait until at least one token is there; take up to ``wanted``; return how many."""
        loop = asyncio.get_running_loop()
        self._refill(loop.time())
        if self._tokens >= 1 and not self._turn.locked():
            granted = min(wanted, int(self._tokens))
            self._tokens -= granted
            return granted
        async with self._turn:
            self._refill(loop.time())
            while self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self._rate)
                self._refill(loop.time())
            granted = min(wanted, int(self._tokens))
            self._tokens -= granted
            return granted


class Watch:
    """One watcher's view of a tenant's feed: every violation after its cursor, in order, once.

    It first reads from the feed itself (catching up from its cursor, a few watchers at a
    time), then takes what the tenant's shared reader delivers. Use :meth:`next_batch`
    until done, then :meth:`close` (or use it as a context manager).
    """

    def __init__(self, hub: ViolationHub, reader: _TenantReader, cursor: str) -> None:
        self._hub = hub
        self._reader = reader
        # "" starts at the newest violation when the reader is ready: nothing old is sent.
        self.cursor = cursor
        self._behind = bool(cursor)
        self._queue: list[Violation] = []
        self._wake = asyncio.Event()
        self._error: Exception | None = None
        self._closed = False

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def start_at(self, position: str) -> None:
        """A watcher from now (empty cursor) starts after ``position``, the newest when it opened."""
        if not self.cursor:
            self.cursor = position

    def _deliver(self, batch: list[Violation]) -> None:
        if self._behind:
            return  # it will read these from the feed itself
        self._queue.extend(batch)
        if len(self._queue) > self._hub.limits.queued_per_watch:
            # A slow reader: forget the buffer and catch up from the feed instead.
            self._queue.clear()
            self._behind = True
        self._wake.set()

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._wake.set()

    async def next_batch(self) -> list[Violation]:
        """The next violations after :attr:`cursor` (at least one), oldest first.

        Raises:
            StoreUnavailable: the feed could not be read (the stream should end).
        """
        await self._reader.ready.wait()
        mark = parse_entry_id(self.cursor or "0-0")
        while True:
            if self._error is not None:
                raise self._error
            if self._behind:
                # Cleared before reading: what the reader delivers meanwhile is queued, and
                # whatever both the read and the queue hold is dropped below by its cursor.
                self._behind = False
                limits = self._hub.limits
                async with self._hub.catch_up_slots:
                    batch = await self._hub.feed.after(self._reader.tenant, self.cursor, limits.batch_size)
                if len(batch) == limits.batch_size:
                    self._behind = True
            else:
                batch, self._queue = self._queue, []
            # Increasing positions only: the queue may repeat what a read returned.
            fresh = []
            last = mark
            for violation in batch:
                position = parse_entry_id(violation.cursor)
                if position > last:
                    fresh.append(violation)
                    last = position
            if fresh:
                granted = await self._reader.budget.take(len(fresh))
                # What the tenant's budget does not cover yet waits at the head of the queue.
                self._queue[:0] = fresh[granted:]
                fresh = fresh[:granted]
                self.cursor = fresh[-1].cursor
                return fresh
            if not self._behind and not self._queue and self._error is None:
                self._wake.clear()
                await self._wake.wait()

    def close(self) -> None:
        """Stop watching; frees its place in the limits. Idempotent."""
        if not self._closed:
            self._closed = True
            self._hub._release(self)


class _TenantReader:
    """Polls one tenant's feed for every watcher of it in this process."""

    def __init__(self, hub: ViolationHub, tenant: str) -> None:
        self.tenant = tenant
        self.watchers: set[Watch] = set()
        # Set once the newest cursor is known: deliveries start after it.
        self.ready = asyncio.Event()
        self.position = "0-0"
        rate = hub.limits.messages_per_second_per_tenant
        self.budget = _Budget(rate, max(1.0, rate / 10))
        self._hub = hub
        self.task = asyncio.create_task(self._run(), name=f"violations-reader:{tenant}")

    async def _run(self) -> None:
        feed, limits = self._hub.feed, self._hub.limits
        try:
            self.position = await feed.last_cursor(self.tenant)
            for watch in self.watchers:
                watch.start_at(self.position)
            self.ready.set()
            while True:
                batch = await feed.after(self.tenant, self.position, limits.batch_size)
                if not batch:
                    await feed.wait(self.tenant, self.position, self._hub.recheck_seconds)
                    continue
                # Position and delivery change together (no await between): a watcher
                # registered later catches up from the feed up to at least this position.
                self.position = batch[-1].cursor
                for watch in list(self.watchers):
                    watch._deliver(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Every watcher ends with the error (clients resume from their cursor); the
            # next watcher of this tenant starts a new reader.
            _log.warning("violations_reader_failed", tenant=self.tenant, error=str(exc))
            self._hub._drop_reader(self)
            self.ready.set()
            for watch in list(self.watchers):
                watch._fail(exc)


class ViolationHub:
    """Fans one reader per tenant out to every live watcher of it in this process.

    Args:
        feed: the alerts feed.
        limits: open-stream bounds and buffering.
        recheck_seconds: the reader re-reads the feed at least this often when no
            append wakes it (the store's own poll interval is usually shorter).
    """

    def __init__(
        self, feed: ViolationFeed, limits: WatchLimits | None = None, recheck_seconds: float = 5.0
    ) -> None:
        self.feed = feed
        self.limits = limits or WatchLimits()
        self.recheck_seconds = recheck_seconds
        self._readers: dict[str, _TenantReader] = {}
        self._open: dict[str, int] = {}
        self._total = 0
        self._catch_up_slots: asyncio.Semaphore | None = None

    @property
    def catch_up_slots(self) -> asyncio.Semaphore:
        """Bounds the store reads of watchers catching up (created on the serving loop)."""
        if self._catch_up_slots is None:
            self._catch_up_slots = asyncio.Semaphore(self.limits.concurrent_catch_ups)
        return self._catch_up_slots

    def open_streams(self, tenant: str | None = None) -> int:
        """Open watchers of ``tenant``, or of every tenant."""
        return self._total if tenant is None else self._open.get(tenant, 0)

    async def wait_ready(self, tenant: str) -> None:
        """Return once ``tenant``'s reader knows where the feed ends (watchers from now start there)."""
        reader = self._readers.get(tenant)
        if reader is not None:
            await reader.ready.wait()

    def readers(self) -> int:
        """Tenants with a live reader in this process."""
        return len(self._readers)

    def open(self, tenant: str, cursor: str) -> Watch:
        """Start watching ``tenant``'s feed after ``cursor`` ("": from now; "0-0": from the oldest kept).

        Raises:
            ResourceExhausted: the tenant or the process is at its limit of open streams.
        """
        limits = self.limits
        held = self._open.get(tenant, 0)
        if held >= limits.per_tenant:
            _log.info("watch_refused", tenant=tenant, quota="max_watch_streams_per_tenant", limit=held)
            raise ResourceExhausted(
                "max_watch_streams_per_tenant",
                f"tenant {tenant!r} already has {held} WatchViolations streams open on this server, its "
                f"limit (--max-watch-streams-per-tenant {limits.per_tenant}); close one, or share one "
                "stream between readers",
            )
        if self._total >= limits.per_process:
            _log.info("watch_refused", tenant=tenant, quota="max_watch_streams", limit=self._total)
            raise ResourceExhausted(
                "max_watch_streams",
                f"this server already serves {self._total} WatchViolations streams, its limit "
                f"(--max-watch-streams {limits.per_process}); retry later or on another server",
            )
        reader = self._readers.get(tenant)
        if reader is None:
            reader = self._readers[tenant] = _TenantReader(self, tenant)
        watch = Watch(self, reader, cursor)
        if reader.ready.is_set():
            watch.start_at(reader.position)
        reader.watchers.add(watch)
        self._open[tenant] = held + 1
        self._total += 1
        return watch

    def _release(self, watch: Watch) -> None:
        reader = watch._reader
        tenant = reader.tenant
        self._total -= 1
        left = self._open[tenant] - 1
        if left:
            self._open[tenant] = left
        else:
            del self._open[tenant]
        reader.watchers.discard(watch)
        if not reader.watchers and self._readers.get(tenant) is reader:
            self._drop_reader(reader)
            reader.task.cancel()

    def _drop_reader(self, reader: _TenantReader) -> None:
        if self._readers.get(reader.tenant) is reader:
            del self._readers[reader.tenant]

    async def close(self) -> None:
        """Stop every reader (open watchers then wait forever: close them first)."""
        readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            reader.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader.task
