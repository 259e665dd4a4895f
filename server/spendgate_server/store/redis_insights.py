"""Session insights in Redis: per tenant, under one hash tag ``sg:ins:{tenant}`` so each flush is one slot."""

from __future__ import annotations

from typing import Any, cast

from spendgate_server.rule_codes import Rule
from spendgate_server.store.insights import (
    RETENTION_MS,
    InsightsStore,
    SessionDelta,
    SessionSummary,
    SpendPoint,
)
from spendgate_server.store.keyspace import insights_key
from spendgate_server.store.redis import RedisClient, connect, redis_call

__all__ = ["RedisInsightsStore"]

# The ranking keeps this many sessions per tenant (and per project); the rest fall off.
MAX_RANKED = 10_000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisInsightsStore(InsightsStore):
    """Aggregates every server's flushes with HINCRBY/ZADD in one pipeline per tenant."""

    def __init__(self, client: RedisClient, key_prefix: str = "sg", *, owns_client: bool = True) -> None:
        self._client = client
        # False when the process's shared client was given: its owner closes it.
        self._owns_client = owns_client
        self._prefix = key_prefix

    @classmethod
    def from_url(cls, url: str, *, timeout_seconds: float = 0.5) -> RedisInsightsStore:
        """Connect lazily to ``url``."""
        return cls(connect(url, timeout_seconds=timeout_seconds, max_connections=4))

    def _key(self, tenant: str, *parts: str) -> str:
        return insights_key(tenant, *parts, namespace=self._prefix)

    async def record(self, tenant: str, deltas: dict[str, SessionDelta], now_ms: int) -> None:
        pipe = self._client.pipeline(transaction=False)
        ttl_ms = RETENTION_MS
        rankings = {self._key(tenant, "top")}
        for session_id, delta in deltas.items():
            summary = self._key(tenant, "s", session_id)
            fields: dict[str, str | int] = {"last": delta.last_seen_ms}
            if delta.project:
                fields["project"] = delta.project
            if delta.decisions:
                fields["budget"] = -1 if delta.budget_nano_usd is None else delta.budget_nano_usd
                pipe.hincrby(summary, "decisions", delta.decisions)
            if delta.committed_nano_usd is not None:
                fields["spend"] = delta.committed_nano_usd
                pipe.zadd(self._key(tenant, "top"), {session_id: delta.committed_nano_usd})
                if delta.project:
                    ranking = self._key(tenant, "top", delta.project)
                    rankings.add(ranking)
                    pipe.zadd(ranking, {session_id: delta.committed_nano_usd})
            pipe.hset(summary, mapping=cast(Any, fields))
            for rule, count in delta.blocked.items():
                pipe.hincrby(summary, f"b:{int(rule)}", count)
            pipe.pexpire(summary, ttl_ms)
            if delta.spend_by_minute:
                series = self._key(tenant, "ts", session_id)
                for minute, cost in delta.spend_by_minute.items():
                    pipe.hincrby(series, str(minute), cost)
                pipe.pexpire(series, ttl_ms)
        for ranking in rankings:
            pipe.zremrangebyrank(ranking, 0, -MAX_RANKED - 1)
            pipe.pexpire(ranking, ttl_ms)
        await redis_call(pipe.execute())

    async def top_sessions(self, tenant: str, project: str, limit: int, now_ms: int) -> list[SessionSummary]:
        ranking = self._key(tenant, "top", project) if project else self._key(tenant, "top")
        ranked = cast(
            "list[tuple[bytes, float]]",
            await redis_call(self._client.zrevrange(ranking, 0, limit * 2 - 1, withscores=True)),
        )
        pipe = self._client.pipeline(transaction=False)
        ids = [_text(member) for member, _ in ranked]
        for session_id in ids:
            pipe.hgetall(self._key(tenant, "s", session_id))
        summaries, stale = [], []
        for session_id, raw in zip(ids, await redis_call(pipe.execute()), strict=True):
            fields = {_text(k): _text(v) for k, v in raw.items()}
            if not fields or int(fields.get("last", 0)) <= now_ms - RETENTION_MS:
                stale.append(session_id)  # the summary expired: forget its rank too
                continue
            budget = int(fields.get("budget", -1))
            summaries.append(
                SessionSummary(
                    session_id,
                    fields.get("project", ""),
                    int(fields.get("spend", 0)),
                    None if budget < 0 else budget,
                    int(fields.get("decisions", 0)),
                    {Rule(int(k[2:])): int(v) for k, v in fields.items() if k.startswith("b:")},
                    int(fields["last"]),
                )
            )
        if stale:
            await redis_call(self._client.zrem(ranking, *stale))
        return summaries[:limit]

    async def spend_series(self, tenant: str, session_id: str, now_ms: int) -> list[SpendPoint]:
        raw = await redis_call(self._client.hgetall(self._key(tenant, "ts", session_id)))
        points = sorted((int(_text(k)), int(_text(v))) for k, v in raw.items())
        return [SpendPoint(m, c) for m, c in points if m > now_ms - RETENTION_MS]

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
