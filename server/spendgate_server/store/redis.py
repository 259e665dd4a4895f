"""Redis store: each atomic step is one Lua script, so one round trip per Decide or Settle.

Keys of a session share the hash tag ``{tenant:session}`` (see lua/_session.lua),
which keeps every script single-slot and Redis Cluster usable.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from spendgate_server.config import Rule
from spendgate_server.errors import StoreUnavailable
from spendgate_server.store.base import (
    ReserveOutcome,
    ReserveRequest,
    ReserveStatus,
    SessionKey,
    SessionState,
    SettleOutcome,
    SettleRequest,
    SettleStatus,
    Store,
    shadow_rules_from_mask,
)

__all__ = ["RedisStore", "load_script"]


def load_script(name: str) -> str:
    """The source of ``lua/<name>.lua`` with the shared session helpers prepended."""
    lua = resources.files("spendgate_server.store") / "lua"
    return (lua / "_session.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


def session_keys(session: SessionKey, prefix: str) -> list[str]:
    """The two keys of a session, under one hash tag."""
    tag = f"{prefix}:{{{session.tenant}:{session.session_id}}}"
    return [tag, tag + ":exp"]


def _flag(value: bool) -> str:
    return "1" if value else "0"


class RedisStore(Store):
    """Shared state in Redis (or anything speaking its protocol with Lua)."""

    def __init__(self, client: aioredis.Redis, key_prefix: str = "sg") -> None:
        self._client = client
        self._prefix = key_prefix
        self._decide = client.register_script(load_script("decide"))
        self._settle = client.register_script(load_script("settle"))
        self._state = client.register_script(load_script("state"))

    @classmethod
    def from_url(cls, url: str, *, timeout_seconds: float = 0.25, max_connections: int = 64) -> RedisStore:
        """Connect lazily to ``url`` (redis://, rediss://, unix://) with short timeouts."""
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            max_connections=max_connections,
            health_check_interval=0,
        )
        return cls(client)

    async def _run(self, script: Any, session: SessionKey, args: list[Any]) -> list[Any]:
        try:
            reply: list[Any] = await script(keys=session_keys(session, self._prefix), args=args)
        except ResponseError as exc:
            if "script" in str(exc):
                # A script that fails is our bug, not an outage: let it surface as INTERNAL.
                raise RuntimeError(f"spendgate Lua script failed: {exc}") from exc
            raise StoreUnavailable(f"redis: {exc}") from exc
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return reply

    async def reserve(self, request: ReserveRequest) -> ReserveOutcome:
        dedup, tools, budget = request.dedup, request.tools, request.budget
        reply = await self._run(
            self._decide,
            request.session,
            [
                request.now_ms,
                request.reservation_id,
                request.estimate_nano_usd,
                request.reservation_ttl_ms,
                request.session_ttl_ms,
                request.request_id,
                request.memo,
                dedup.fingerprint if dedup else "",
                dedup.ttl_ms if dedup else 0,
                _flag(dedup is not None and dedup.shadow),
                request.tool_call_count,
                tools.cap if tools else -1,
                _flag(tools is not None and tools.shadow),
                budget.cap_nano_usd if budget else -1,
                _flag(budget is not None and budget.strict),
                _flag(budget is not None and budget.shadow),
            ],
        )
        status, spent, reserved, tool_calls, rule, mask, memo = reply
        return ReserveOutcome(
            status=ReserveStatus(status),
            spent_nano_usd=spent,
            reserved_nano_usd=reserved,
            tool_calls=tool_calls,
            blocked_by=Rule(rule) if rule else None,
            shadow_fired=shadow_rules_from_mask(mask),
            memo=memo.decode() if isinstance(memo, bytes) else memo,
        )

    async def settle(self, request: SettleRequest) -> SettleOutcome:
        status, cost, spent, reserved = await self._run(
            self._settle,
            request.session,
            [
                request.now_ms,
                request.reservation_id,
                request.cost_nano_usd,
                request.settled_ttl_ms,
                request.session_ttl_ms,
            ],
        )
        return SettleOutcome(SettleStatus(status), cost, spent, reserved)

    async def session_state(self, session: SessionKey, now_ms: int, session_ttl_ms: int) -> SessionState:
        spent, reserved, tools, open_count = await self._run(self._state, session, [now_ms, session_ttl_ms])
        return SessionState(spent, reserved, tools, open_count)

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def close(self) -> None:
        await self._client.aclose()
