"""Configs in Redis: one hash per tenant (``sg:cfg:{tenant}``, store/keyspace.py), changes on pub/sub."""

from __future__ import annotations

import asyncio
from importlib import resources

import structlog
from redis.exceptions import RedisError

from spendgate_server.logging import Outage
from spendgate_server.store.configs import (
    HISTORY_LENGTH,
    ChangeListener,
    ConfigConflict,
    ConfigStore,
    StoredConfig,
)
from spendgate_server.store.keyspace import CONFIGS_PREFIX, config_history_key, config_key
from spendgate_server.store.redis import RedisClient, connect, redis_call

__all__ = ["CHANGES_CHANNEL", "RedisConfigStore"]

CHANGES_CHANNEL = "sg:config-changes"
_log = structlog.get_logger("spendgate.configs")
_RECONNECT_SECONDS = (0.1, 0.5, 1.0, 2.0)


class RedisConfigStore(ConfigStore):
    """Shared configs; every server sees a write within the pub/sub delay, or the poll interval."""

    def __init__(
        self, client: RedisClient, key_prefix: str = CONFIGS_PREFIX, *, owns_client: bool = True
    ) -> None:
        self._client = client
        # False when the process's shared client was given: its owner closes it.
        self._owns_client = owns_client
        self._prefix = key_prefix
        # Stand-alone script: it needs none of the session helpers that load_script prepends.
        source = (resources.files("spendgate_server.store") / "lua" / "config_put.lua").read_text()
        self._put = client.register_script(source)

    @classmethod
    def from_url(cls, url: str, *, timeout_seconds: float = 0.5) -> RedisConfigStore:
        """Connect lazily to ``url``."""
        # connect() also understands redis+cluster:// and turns redis-py's retries off.
        return cls(connect(url, timeout_seconds=timeout_seconds, max_connections=8))

    def _hash(self, tenant: str) -> str:
        # key_prefix is the record kind's prefix: CONFIGS_PREFIX, or POLICIES_PREFIX for policies.
        return config_key(self._prefix, tenant)

    async def get(self, tenant: str, project: str) -> StoredConfig | None:
        record = await redis_call(self._client.hget(self._hash(tenant), f"p:{project}"))
        return StoredConfig.from_record(record) if record else None

    async def put(
        self, tenant: str, project: str, config_json: str, etag: str, actor: str, now_ms: int
    ) -> StoredConfig:
        hkey = self._hash(tenant)
        written, value = await redis_call(
            self._put(
                keys=[hkey, config_history_key(self._prefix, tenant, project)],
                args=[project, etag, config_json, actor, now_ms, HISTORY_LENGTH, CHANGES_CHANNEL, tenant],
            )
        )
        if not written:
            raise ConfigConflict(project, value.decode() if isinstance(value, bytes) else str(value))
        return StoredConfig(project, config_json, int(value), actor, now_ms)

    async def history(self, tenant: str, project: str) -> list[StoredConfig]:
        records = await redis_call(
            self._client.lrange(config_history_key(self._prefix, tenant, project), 0, -1)
        )
        return [StoredConfig.from_record(r) for r in records]

    async def versions(self, tenants: list[str]) -> dict[str, int]:
        pipe = self._client.pipeline(transaction=False)
        for tenant in tenants:
            pipe.hget(self._hash(tenant), "v")
        values = await redis_call(pipe.execute())
        return {tenant: int(v or 0) for tenant, v in zip(tenants, values, strict=True)}

    async def listen(self, on_change: ChangeListener) -> None:
        attempt = 0
        what = "config" if self._prefix == CONFIGS_PREFIX else "policies"
        outage = Outage(_log, f"{what}_pubsub_lost", f"{what}_pubsub_restored")
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANGES_CHANNEL)
                outage.succeeded()
                # Notices sent while we were not subscribed are lost: treat every tenant as changed.
                on_change("*")
                attempt = 0
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        data = message["data"]
                        on_change(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as exc:
                delay = _RECONNECT_SECONDS[min(attempt, len(_RECONNECT_SECONDS) - 1)]
                attempt += 1
                outage.failed(exc, retry_seconds=delay)
                await asyncio.sleep(delay)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
