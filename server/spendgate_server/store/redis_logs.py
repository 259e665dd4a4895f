"""Logs in Redis Streams: one stream per (log, tenant) under its own hash tag.

Keys (store/keyspace.py): ``sg:log:{<log>:<tenant>}`` (the stream),
``sg:log:{<log>:<tenant>}:u:<uid>`` (one marker per unique id, expiring) and
``sg:log:{<log>:<tenant>}:i`` / ``:i:t`` (the intents: payloads by uid, and uids by the
time they were written) share a hash tag, so every script is single-slot.
``sg:logreg:{<log>}`` (a set, its own slot) lists the tenants. Redis can lose it (a
restart without persistence, FLUSHALL, a failover to a replica that lagged), so no
process trusts its memory of having written it: a tenant is written again by an append
that created its stream (the whole data set was lost: at once), and by every append or
intent when this process last wrote it ``registry_refresh_ms`` ago or more (only part was
lost). A consumer group Redis lost is created again, from the start of the stream, when a
group command answers NOGROUP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, TypeVar

from redis.exceptions import RedisError, ResponseError

from spendgate_server.errors import StoreUnavailable
from spendgate_server.store.keyspace import log_intent_keys, log_marker_key, log_registry_key, log_stream_key
from spendgate_server.store.logs import AppendResult, Intent, LogEntry, LogStore, entry_id_ms, parse_entry_id
from spendgate_server.store.pipeline import PipelinedRedis, ScriptError
from spendgate_server.store.redis import RedisClient, connect, redis_call

__all__ = ["APPEND_SCRIPT", "DROP_INTENTS_SCRIPT", "INTENT_SCRIPT", "REGISTRY_REFRESH_MS", "RedisLogStore"]

_T = TypeVar("_T")
# The largest stream id: each part an unsigned 64-bit integer.
_LAST_ID = (2**64 - 1, 2**64 - 1)
# How long a process trusts that a tenant it wrote to the registry is still there: the
# longest a tenant whose registry entry alone was lost stays unseen by the evaluator and
# the sweeper while it keeps writing. Costs one SADD per active tenant per interval.
REGISTRY_REFRESH_MS = 5_000

APPEND_SCRIPT = """
-- log_append: append the entries whose unique id was not seen; keep the newest N; remove
-- the intent of every entry given (appended now or before).
-- KEYS[1] the stream   KEYS[2] intent times (zset)   KEYS[3] intent payloads (hash)
-- KEYS[4..n+3] one marker key per entry (same hash tag)
-- ARGV[1] max entries (exact trim)   ARGV[2] marker ttl ms
-- ARGV[3..n+2] payloads   ARGV[n+3..2n+2] unique ids
-- Reply: per entry, its new stream id, or "" when its marker existed (nothing added); then
-- 1 when this call created the stream (it did not exist: the tenant may be missing from
-- the registry), else 0
local out = {}
local n = #KEYS - 3
local created = 0
if redis.call('EXISTS', KEYS[1]) == 0 then created = 1 end
local added = 0
for i = 1, n do
  local marker, uid = KEYS[i + 3], ARGV[n + 2 + i]
  if redis.call('EXISTS', marker) == 1 then
    out[#out + 1] = ''
  else
    local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', 'p', ARGV[i + 2])
    redis.call('SET', marker, id, 'PX', ARGV[2])
    out[#out + 1] = id
    added = 1
  end
  redis.call('ZREM', KEYS[2], uid)
  redis.call('HDEL', KEYS[3], uid)
end
out[#out + 1] = created * added
return out
"""

INTENT_SCRIPT = """
-- log_intent: record (or replace) the intent of one unique id.
-- KEYS[1] intent times (zset)   KEYS[2] intent payloads (hash)   (the stream's hash tag)
-- ARGV[1] unique id   ARGV[2] time written, Unix ms   ARGV[3] payload   ARGV[4] ttl ms
-- Reply: 1
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

DROP_INTENTS_SCRIPT = """
-- log_drop_intents: remove intents still written at the time given (a newer write is kept).
-- KEYS[1] intent times (zset)   KEYS[2] intent payloads (hash)
-- ARGV[2i-1] unique id   ARGV[2i] the time it was written, Unix ms
-- Reply: how many were removed
local dropped = 0
for i = 1, #ARGV, 2 do
  local at = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if at and tonumber(at) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    dropped = dropped + 1
  end
end
return dropped
"""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(raw: Any) -> list[LogEntry]:
    out = []
    for entry_id, fields in raw or ():
        if fields is None:
            continue
        payload = fields.get(b"p", fields.get("p"))
        if payload is not None:
            out.append(LogEntry(_text(entry_id), _text(payload)))
    return out


class RedisLogStore(LogStore):
    """Shared logs: every server appends, any number of workers consume.

    Args:
        registry_refresh_ms: a tenant this process wrote to the registry at least this long
            ago (by the callers' ``now_ms``) is written again with its next append or intent.
    """

    def __init__(
        self,
        client: RedisClient,
        key_prefix: str = "sg",
        poll_seconds: float = 0.1,
        *,
        owns_client: bool = True,
        hot_path: PipelinedRedis | None = None,
        registry_refresh_ms: int = REGISTRY_REFRESH_MS,
    ) -> None:
        self._client = client
        # When given, appends go over the pipelined connection the session scripts use
        # (pipeline.py): the journal appends of a turn's settles then leave in their write.
        self._hot_path = hot_path
        # False when the process's shared client was given: its owner closes it.
        self._owns_client = owns_client
        self._poll_seconds = poll_seconds
        self._prefix = key_prefix
        self._append = client.register_script(APPEND_SCRIPT)
        self._intent = client.register_script(INTENT_SCRIPT)
        self._drop_intents = client.register_script(DROP_INTENTS_SCRIPT)
        # When this process last wrote each (log, tenant) to the registry (callers' Unix ms).
        self._registered: dict[tuple[str, str], int] = {}
        self._registry_refresh_ms = registry_refresh_ms
        self._groups: set[tuple[str, str, str]] = set()

    @classmethod
    def from_url(cls, url: str, *, timeout_seconds: float = 0.5, poll_seconds: float = 0.1) -> RedisLogStore:
        """Connect lazily to ``url`` (one Redis, or a cluster: ``redis+cluster://``); ``wait`` polls
        every ``poll_seconds``."""
        # As many connections as the session store: every Settle also appends to the journal.
        return cls(connect(url, timeout_seconds=timeout_seconds), poll_seconds=poll_seconds)

    def stream_key(self, log: str, tenant: str) -> str:
        """The tenant's stream of ``log``."""
        return log_stream_key(log, tenant, self._prefix)

    def _registry(self, log: str) -> str:
        return log_registry_key(log, self._prefix)

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
        if not entries:
            return AppendResult(())
        stream = self.stream_key(log, tenant)
        keys = [
            stream,
            *log_intent_keys(log, tenant, self._prefix),
            *(log_marker_key(log, tenant, uid, self._prefix) for uid, _ in entries),
        ]
        args: list[int | str] = [
            max_entries,
            max(unique_ttl_ms, 1),
            *(payload for _, payload in entries),
            *(uid for uid, _ in entries),
        ]
        script = self._script(APPEND_SCRIPT, self._append, keys, args)
        due = self._registration_due(log, tenant, now_ms)
        if due:
            # Concurrently (its own slot): the registry may name a tenant a moment before its
            # stream exists, which the evaluator's group creation (MKSTREAM) allows.
            reply, _ = await asyncio.gather(script, self._register(log, tenant, now_ms))
        else:
            reply = await script
        *ids, created = reply
        if created and not due:
            # The stream was new: Redis lost its data (or the tenant is new), the registry too.
            await self._register(log, tenant, now_ms)
        return AppendResult(tuple(_text(r) for r in ids))

    async def _script(self, source: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a log script: over the pipelined connection when there is one, else the pool."""
        if self._hot_path is not None:
            try:
                return await self._hot_path.run_script(source, keys, args)
            except ScriptError as exc:
                raise RuntimeError(str(exc)) from exc
        return await redis_call(script(keys=keys, args=args))

    def _registration_due(self, log: str, tenant: str, now_ms: int) -> bool:
        """Whether this process's last registry write of the tenant is missing or too old to trust."""
        last = self._registered.get((log, tenant))
        # A clock that went back (callers' clocks differ) counts as due, never as fresh for ever.
        return last is None or not 0 <= now_ms - last < self._registry_refresh_ms

    async def _register(self, log: str, tenant: str, now_ms: int) -> None:
        await redis_call(self._client.sadd(self._registry(log), tenant))
        self._registered[(log, tenant)] = now_ms

    async def put_intent(
        self, log: str, tenant: str, uid: str, payload: str, *, now_ms: int, ttl_ms: int
    ) -> None:
        keys = list(log_intent_keys(log, tenant, self._prefix))
        write = self._script(INTENT_SCRIPT, self._intent, keys, [uid, now_ms, payload, max(ttl_ms, 1)])
        if not self._registration_due(log, tenant, now_ms):
            await write
            return
        # A sweeper finds intents through the registry, which Redis may have lost since this
        # process last wrote it: written again (concurrently: its own slot, one round trip).
        await asyncio.gather(write, self._register(log, tenant, now_ms))

    async def stale_intents(
        self, log: str, tenants: Sequence[str], *, before_ms: int, count: int
    ) -> dict[str, list[Intent]]:
        # One pipelined command per tenant (per node on a cluster): cheap when there is nothing to do.
        keys = [log_intent_keys(log, tenant, self._prefix) for tenant in tenants]
        pipe = self._client.pipeline(transaction=False)
        for times, _ in keys:
            pipe.zrangebyscore(times, "-inf", f"({before_ms}", start=0, num=count, withscores=True)
        found = [
            (tenant, [(_text(uid), int(at)) for uid, at in due], payloads)
            for tenant, due, (_, payloads) in zip(
                tenants, await redis_call(pipe.execute()), keys, strict=True
            )
            if due
        ]
        if not found:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for _, due, payloads in found:
            pipe.hmget(payloads, [uid for uid, _ in due])
        out: dict[str, list[Intent]] = {}
        for (tenant, due, _), values in zip(found, await redis_call(pipe.execute()), strict=True):
            # A payload gone meanwhile was appended (or dropped) between the two reads.
            intents = [
                Intent(uid, at, _text(v)) for (uid, at), v in zip(due, values, strict=True) if v is not None
            ]
            if intents:
                out[tenant] = intents
        return out

    async def drop_intents(self, log: str, tenant: str, intents: Sequence[tuple[str, int]]) -> int:
        if not intents:
            return 0
        keys = list(log_intent_keys(log, tenant, self._prefix))
        args = [part for uid, time_ms in intents for part in (uid, time_ms)]
        return int(await self._script(DROP_INTENTS_SCRIPT, self._drop_intents, keys, args))

    async def tenants(self, log: str) -> list[str]:
        members = await redis_call(self._client.smembers(self._registry(log)))
        return sorted(_text(m) for m in members)

    async def _ensure_group(self, stream: str, group: str, *, force: bool = False) -> None:
        if not force and (stream, group, "") in self._groups:
            return
        try:
            await self._client.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise StoreUnavailable(f"redis: {exc}") from exc
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        self._groups.add((stream, group, ""))

    async def _grouped(self, stream: str, group: str, command: Any) -> Any:
        """Run ``command()`` on an existing group; recreate it once if Redis lost it (NOGROUP)."""
        await self._ensure_group(stream, group)
        try:
            return await command()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise StoreUnavailable(f"redis: {exc}") from exc
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        await self._ensure_group(stream, group, force=True)
        return await redis_call(command())

    async def read_group(
        self, log: str, tenant: str, group: str, consumer: str, count: int, now_ms: int
    ) -> list[LogEntry]:
        stream = self.stream_key(log, tenant)
        reply = await self._grouped(
            stream, group, lambda: self._client.xreadgroup(group, consumer, {stream: ">"}, count=count)
        )
        return [entry for _, items in reply or () for entry in _entries(items)]

    async def claim(
        self, log: str, tenant: str, group: str, consumer: str, min_idle_ms: int, count: int, now_ms: int
    ) -> list[LogEntry]:
        stream = self.stream_key(log, tenant)
        reply = await self._grouped(
            stream,
            group,
            lambda: self._client.xautoclaim(stream, group, consumer, min_idle_ms, "0-0", count=count),
        )
        deleted = [_text(d) for d in reply[2]] if len(reply) > 2 else []
        if deleted:
            # Trimmed while pending (retention outran the consumers): nothing left to process.
            await redis_call(self._client.xack(stream, group, *deleted))
        return _entries(reply[1])

    async def ack(self, log: str, tenant: str, group: str, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            await redis_call(self._client.xack(self.stream_key(log, tenant), group, *entry_ids))

    async def pending(self, log: str, tenant: str, group: str) -> int:
        stream = self.stream_key(log, tenant)
        summary = await self._grouped(stream, group, lambda: self._client.xpending(stream, group))
        return int(summary["pending"])

    async def oldest_unacked_ms(self, log: str, tenant: str, group: str) -> int | None:
        stream = self.stream_key(log, tenant)
        summary = await self._grouped(stream, group, lambda: self._client.xpending(stream, group))
        groups = await redis_call(self._client.xinfo_groups(stream))
        candidates = [entry_id_ms(_text(summary["min"]))] if summary["pending"] else []
        for info in groups:
            if _text(info["name"]) == group:
                last = _text(info["last-delivered-id"])
                first = await redis_call(self._client.xrange(stream, min=f"({last}", max="+", count=1))
                candidates += [entry_id_ms(_text(entry_id)) for entry_id, _ in first or ()]
        return min(candidates) if candidates else None

    async def after(self, log: str, tenant: str, cursor: str, count: int) -> list[LogEntry]:
        if parse_entry_id(cursor) == _LAST_ID:
            return []  # nothing follows the largest id, and XRANGE refuses an interval starting after it
        stream = self.stream_key(log, tenant)
        return _entries(await redis_call(self._client.xrange(stream, min=f"({cursor}", max="+", count=count)))

    async def before(self, log: str, tenant: str, cursor: str, low: str, count: int) -> list[LogEntry]:
        stream = self.stream_key(log, tenant)
        return _entries(
            await redis_call(
                self._client.xrevrange(stream, max=f"({cursor}" if cursor else "+", min=low, count=count)
            )
        )

    async def last_id(self, log: str, tenant: str) -> str:
        newest = await redis_call(self._client.xrevrange(self.stream_key(log, tenant), count=1))
        return _text(newest[0][0]) if newest else "0-0"

    async def wait(self, log: str, tenant: str, cursor: str, timeout_seconds: float) -> None:
        # Polled rather than XREAD BLOCK: a blocked read would hold a pooled connection
        # past the store's command timeout. The poll interval bounds a watcher's latency.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        mark = parse_entry_id(cursor)
        while parse_entry_id(await self.last_id(log, tenant)) <= mark:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(self._poll_seconds, remaining))

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
