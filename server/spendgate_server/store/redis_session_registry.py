"""Live sessions per tenant in Redis: one sorted set per tenant, one script per admission.

See store/session_registry.py for the contract and the key.
"""

from __future__ import annotations

from spendgate_server.store.keyspace import NAMESPACE, live_sessions_key
from spendgate_server.store.redis import RedisClient, connect, redis_call
from spendgate_server.store.session_registry import Admission, SessionRegistry

__all__ = ["ADMIT_SCRIPT", "RedisSessionRegistry"]

ADMIT_SCRIPT = """
-- session_admit: count a session among its tenant's live sessions, within a limit.
-- KEYS[1] the tenant's sorted set: session id -> expiry ms
-- ARGV[1] session id   ARGV[2] now ms   ARGV[3] its new expiry ms   ARGV[4] the limit
-- Reply: {1 admitted or 0 refused (nothing changed), live sessions after}
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
local count = redis.call('ZCARD', KEYS[1])
if not known and count >= tonumber(ARGV[4]) then
  return {0, count}
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
-- The set lives as long as its newest member (times are the caller's clock): an idle
-- tenant leaves no key behind.
local newest = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2])
redis.call('PEXPIRE', KEYS[1], math.max(1, newest - tonumber(ARGV[2])))
if not known then
  count = count + 1
end
return {1, count}
"""


class RedisSessionRegistry(SessionRegistry):
    """The fleet's registry: every server admits against the same sorted set per tenant."""

    def __init__(self, client: RedisClient, key_prefix: str = NAMESPACE, *, owns_client: bool = True) -> None:
        self._client = client
        # False when the process's shared client was given: its owner closes it.
        self._owns_client = owns_client
        self._prefix = key_prefix
        self._admit = client.register_script(ADMIT_SCRIPT)

    @classmethod
    def from_url(cls, url: str, *, timeout_seconds: float) -> RedisSessionRegistry:
        """Connect lazily to ``url`` (see store.redis.connect)."""
        return cls(connect(url, timeout_seconds=timeout_seconds, max_connections=16))

    def key(self, tenant: str) -> str:
        """The tenant's sorted set."""
        return live_sessions_key(tenant, self._prefix)

    async def admit(
        self, tenant: str, session_id: str, now_ms: int, expires_ms: int, limit: int
    ) -> Admission:
        admitted, count = await redis_call(
            self._admit(keys=[self.key(tenant)], args=[session_id, now_ms, expires_ms, limit])
        )
        return Admission(bool(int(admitted)), int(count))

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
