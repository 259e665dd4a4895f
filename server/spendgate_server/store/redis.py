"""Redis store: each atomic step is one Lua script, so one round trip per Decide or Settle.

Keys of a session share the hash tag ``{tenant:session}`` (store/keyspace.py),
which keeps every script single-slot, so the same scripts run on one Redis or on a
Redis Cluster (``redis+cluster://`` URLs, see :func:`connect`).

Failure policy: every call has one short timeout and is never retried here. A
retry after a timeout could run a script twice (two reservations for one call);
instead the caller gets StoreUnavailable at once and the client applies its fail
mode. The circuit breaker (breaker.py) stops calls piling onto a dead Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.maint_notifications import MaintNotificationsConfig

from spendgate_server.errors import ConfigError, StoreUnavailable
from spendgate_server.logging import redact_secrets
from spendgate_server.rule_codes import Rule
from spendgate_server.store import keyspace
from spendgate_server.store.base import (
    CancelRequest,
    CancelStatus,
    DecidedCall,
    ReserveOutcome,
    ReserveRequest,
    ReserveStatus,
    SessionKey,
    SessionState,
    SettleOutcome,
    SettleRecord,
    SettleRequest,
    SettleStatus,
    Store,
    shadow_rules_from_mask,
)
from spendgate_server.store.pipeline import PipelinedRedis, ScriptError

__all__ = [
    "CLUSTER_SCHEMES",
    "DECIDE",
    "SCRIPTS",
    "SETTLE",
    "STATE",
    "RedisClient",
    "RedisConnection",
    "RedisStore",
    "ScriptSignature",
    "connect",
    "decide_args",
    "load_script",
    "ping",
    "redis_call",
]

RedisClient = aioredis.Redis | RedisCluster
"""A single Redis (or a proxy speaking its protocol) or a Redis Cluster."""

# URL scheme -> the scheme redis-py parses; these select the cluster client.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# Replies that mean "Redis cannot serve right now", not "our script is wrong", even
# when Redis raises them from inside a script (their text then names the script).
_OUTAGE_REPLIES = (OutOfMemoryError, ReadOnlyError, NoScriptError, ClusterError, AskError, TryAgainError)
_OUTAGE_PREFIXES = ("BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS", "CLUSTERDOWN", "TRYAGAIN")


def load_script(name: str) -> str:
    """The source of ``lua/<name>.lua`` with the shared session helpers prepended."""
    lua = resources.files("spendgate_server.store") / "lua"
    return (lua / "_session.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


def session_keys(session: SessionKey, prefix: str) -> list[str]:
    """The two keys of a session under namespace ``prefix``, one hash tag (store/keyspace.py)."""
    return keyspace.session_keys(session.tenant, session.session_id, prefix)


_T = TypeVar("_T")
_R = TypeVar("_R")


async def redis_call(awaitable: Awaitable[_T]) -> _T:
    """Await a redis-py call; any Redis failure becomes StoreUnavailable (the outage status).

    A cancelled call stays a cancellation: redis-py reports a read cut short by
    cancellation as a timeout, and a background loop that retries on StoreUnavailable
    would then never end (a server failing a start-up check hung instead of exiting).
    """
    try:
        return await awaitable
    except (RedisError, RedisClusterException) as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from exc
        raise StoreUnavailable(f"redis: {exc}") from exc


def _flag(value: bool) -> str:
    return "1" if value else "0"


@dataclass(frozen=True, slots=True)
class ScriptSignature(Generic[_R]):
    """A Lua script's KEYS, ARGV and reply, in the order its header lists them.

    The ARGV are built from ``argv`` alone, so they cannot drift from each other;
    tests/store/test_scripts.py checks that the script's header and its
    ``local ... = unpack(ARGV)`` line name the same values in the same order.
    """

    name: str
    keys: tuple[str, ...]
    argv: tuple[tuple[str, Callable[[_R], object]], ...]
    reply: tuple[str, ...]

    def args(self, request: _R) -> list[object]:
        """The script's ARGV for ``request``."""
        return [value(request) for _, value in self.argv]


DECIDE: ScriptSignature[ReserveRequest] = ScriptSignature(
    "decide",
    keys=("hkey", "zkey"),
    argv=(
        ("now_ms", lambda r: r.now_ms),
        ("reservation_id", lambda r: r.reservation_id),
        ("estimate_nano_usd", lambda r: r.estimate_nano_usd),
        ("reservation_ttl_ms", lambda r: r.reservation_ttl_ms),
        ("session_ttl_ms", lambda r: r.session_ttl_ms),
        ("request_id", lambda r: r.request_id),
        ("memo", lambda r: r.memo),
        ("fingerprint", lambda r: r.dedup.fingerprint if r.dedup else ""),
        ("dedup_ttl_ms", lambda r: r.dedup.ttl_ms if r.dedup else 0),
        ("dedup_shadow", lambda r: _flag(r.dedup is not None and r.dedup.shadow)),
        ("tool_call_count", lambda r: r.tool_call_count),
        ("tool_cap", lambda r: r.tools.cap if r.tools else -1),
        ("tool_shadow", lambda r: _flag(r.tools is not None and r.tools.shadow)),
        ("budget_cap_nano_usd", lambda r: r.budget.cap_nano_usd if r.budget else -1),
        ("budget_strict", lambda r: _flag(r.budget is not None and r.budget.strict)),
        ("budget_shadow", lambda r: _flag(r.budget is not None and r.budget.shadow)),
        ("decided", lambda r: r.decided.encode() if r.decided is not None else ""),
    ),
    reply=("status", "spent", "reserved", "tools", "blocked_rule", "shadow_mask", "memo"),
)

SETTLE: ScriptSignature[SettleRequest] = ScriptSignature(
    "settle",
    keys=("hkey", "zkey"),
    argv=(
        ("now_ms", lambda r: r.now_ms),
        ("reservation_id", lambda r: r.reservation_id),
        ("cost_nano_usd", lambda r: r.cost_nano_usd),
        ("settled_ttl_ms", lambda r: r.settled_ttl_ms),
        ("session_ttl_ms", lambda r: r.session_ttl_ms),
        ("release_dedup", lambda r: _flag(r.release_dedup)),
    ),
    reply=("status", "cost", "spent", "reserved", "decided"),
)

STATE: ScriptSignature[tuple[int, int]] = ScriptSignature(
    "state",
    keys=("hkey", "zkey"),
    argv=(("now_ms", lambda r: r[0]), ("session_ttl_ms", lambda r: r[1])),
    reply=("spent", "reserved", "tools", "open_reservations"),
)

CANCEL: ScriptSignature[CancelRequest] = ScriptSignature(
    "cancel",
    keys=("hkey", "zkey"),
    argv=(
        ("now_ms", lambda r: r.now_ms),
        ("reservation_id", lambda r: r.reservation_id),
        ("request_id", lambda r: r.request_id),
        ("tool_call_count", lambda r: r.tool_call_count),
        ("tombstone_ttl_ms", lambda r: r.tombstone_ttl_ms),
        ("session_ttl_ms", lambda r: r.session_ttl_ms),
    ),
    reply=("status",),
)

SCRIPTS = (DECIDE, SETTLE, STATE, CANCEL)
"""The session scripts; each runs on the two keys of one session."""


def decide_args(request: ReserveRequest) -> list[object]:
    """The ARGV of decide.lua for ``request``."""
    return DECIDE.args(request)


def connect(
    url: str, *, timeout_seconds: float, max_connections: int = 64, client_name: str | None = None
) -> RedisClient:
    """A lazily connecting client for ``url``; nothing is contacted until the first call.

    ``redis://``, ``rediss://`` and ``unix://`` give one Redis. ``redis+cluster://`` and
    ``rediss+cluster://`` give a Redis Cluster client; list several nodes to find the
    cluster from, ``redis+cluster://10.0.0.1:6379,10.0.0.2:6379``.

    ``timeout_seconds`` bounds connecting and every command. redis-py's own retries
    are turned off (see the module docstring; its retry wrapper still runs around each
    command, with 0 retries, for about 0.3 µs, and drops a broken connection so that
    the next command opens a new one; the pipelined hot path has no such wrapper), and
    so are its maintenance notifications: in redis-py 8 they default on, which skips the
    check that drops pooled connections a restarted Redis has closed (every such
    connection would then fail one call) and may stretch timeouts to 10 s during a
    maintenance event.

    ``client_name`` is set on every connection (``CLIENT SETNAME``), so ``CLIENT LIST``
    on the Redis tells which process and which client holds it.

    Raises:
        ConfigError: the URL is malformed; the message names --redis-url.
    """
    common: dict[str, Any] = {
        "socket_timeout": timeout_seconds,
        "socket_connect_timeout": timeout_seconds,
        "max_connections": max_connections,
        "health_check_interval": 0,
        "retry": Retry(NoBackoff(), 0),
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }
    if client_name:
        common["client_name"] = client_name
    scheme = url.partition("://")[0].lower()
    try:
        if scheme in CLUSTER_SCHEMES:
            return _cluster(url, CLUSTER_SCHEMES[scheme], common)
        # A blocking pool: past max_connections a call waits (up to the timeout) for a free
        # connection instead of failing at once with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(url, timeout=timeout_seconds, **common)
        client = aioredis.Redis(connection_pool=pool)
        client.auto_close_connection_pool = True  # aclose() closes the pool it was given
        return client
    except (ValueError, RedisClusterException) as exc:
        raise ConfigError(
            f"--redis-url {redact_secrets(url)!r} is not valid: {redact_secrets(str(exc))}; "
            "expected redis://host:port/db, rediss://, unix:///path or "
            "redis+cluster://host:port[,host:port...]"
        ) from exc


def _cluster(url: str, base_scheme: str, common: dict[str, Any]) -> RedisCluster:
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for host in filter(None, hosts.split(",")):
        node = urlsplit(f"//{host}")
        if not node.hostname:
            raise ValueError(f"node {host!r} has no host")
        nodes.append(ClusterNode(node.hostname, node.port or 6379))
    if not nodes:
        raise ValueError("no cluster node given")
    # Credentials, TLS and query options are read as redis-py reads a single-node URL.
    first = f"{base_scheme}://{userinfo + '@' if userinfo else ''}{nodes[0].host}:{nodes[0].port}"
    options: dict[str, Any] = dict(parse_url(first + parts.path + (f"?{parts.query}" if parts.query else "")))
    for name in ("host", "port"):
        options.pop(name, None)
    if options.pop("db", 0):
        raise ValueError("Redis Cluster has only database 0")
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return RedisCluster(startup_nodes=nodes, **options, **common)


async def ping(client: RedisClient) -> None:
    """Check that Redis answers; on a cluster, every primary (one missing cannot serve its slots).

    Raises:
        StoreUnavailable: it does not.
    """
    try:
        if isinstance(client, RedisCluster):
            await client.ping(target_nodes=RedisCluster.PRIMARIES)
        else:
            await client.ping()
    except (RedisError, RedisClusterException) as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc


def _unavailable_reply(exc: ResponseError) -> bool:
    return isinstance(exc, _OUTAGE_REPLIES) or str(exc).startswith(_OUTAGE_PREFIXES)


# Numbers the clients a process makes, so CLIENT LIST can tell two clients of one process apart.
_CLIENT_NUMBERS = itertools.count(1)


class RedisConnection:
    """One process's client of Redis: the redis-py client (one pool) that every store of the
    process shares, and the pipelined hot-path connection (pipeline.py), owned by this object.

    Args:
        url: as for :func:`connect`.
        timeout_seconds: bound on connecting and on every command.
        pipelined: with a plain ``redis://`` URL, Decide/Settle scripts go over one pipelined
            connection; other URLs, and every other command, use the pool.
        name: what the process is (``spendgate-serve``); its process id and the client's
            number in the process follow, so ``CLIENT LIST`` attributes every connection.
        max_connections: bound of the pool, shared by every store of the process.

    Raises:
        ConfigError: the URL is malformed.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float,
        pipelined: bool = True,
        name: str = "spendgate",
        max_connections: int = 64,
    ) -> None:
        self.name = f"{name}-{os.getpid()}-{next(_CLIENT_NUMBERS)}"
        self.client = connect(
            url, timeout_seconds=timeout_seconds, max_connections=max_connections, client_name=self.name
        )
        self.hot_path: PipelinedRedis | None = None
        if pipelined and url.partition("://")[0].lower() == "redis":
            options = parse_url(url)
            self.hot_path = PipelinedRedis(
                options.get("host", "localhost"),
                int(options.get("port", 6379)),
                int(options.get("db", 0)),
                username=options.get("username"),
                password=options.get("password"),
                timeout_seconds=timeout_seconds,
                client_name=f"{self.name}-hot",
            )

    async def aclose(self) -> None:
        """Close the hot-path connection and the pool."""
        if self.hot_path is not None:
            await self.hot_path.close()
        await self.client.aclose()


class RedisStore(Store):
    """Shared state in Redis or Redis Cluster (or anything speaking the protocol with Lua)."""

    def __init__(
        self,
        client: RedisClient,
        key_prefix: str = "sg",
        hot_path: PipelinedRedis | None = None,
        *,
        owns_client: bool = True,
    ) -> None:
        self._client = client
        # False when the process's shared client was given: its owner closes it.
        self._owns_client = owns_client
        self._prefix = key_prefix
        # When given, Decide/Settle scripts go over this pipelined connection (pipeline.py).
        self._hot_path = hot_path
        self._sources = {script.name: load_script(script.name) for script in SCRIPTS}
        # Script objects run EVALSHA and, on NOSCRIPT (a restarted or failed-over
        # Redis has an empty script cache), load the script and run it again.
        self._decide = client.register_script(self._sources["decide"])
        self._settle = client.register_script(self._sources["settle"])
        self._state = client.register_script(self._sources["state"])
        self._cancel = client.register_script(self._sources["cancel"])

    @classmethod
    def from_url(
        cls, url: str, *, timeout_seconds: float = 0.25, max_connections: int = 64, pipelined: bool = True
    ) -> RedisStore:
        """A store with a client of its own (see :class:`RedisConnection`), closed with it.

        With ``pipelined`` and a plain ``redis://`` URL, the scripts run over one shared
        pipelined connection (pipeline.py); other URLs, and pings, use redis-py.
        """
        connection = RedisConnection(
            url, timeout_seconds=timeout_seconds, pipelined=pipelined, max_connections=max_connections
        )
        return cls(connection.client, hot_path=connection.hot_path)

    @property
    def client(self) -> RedisClient:
        """The redis-py client this store runs its scripts on."""
        return self._client

    async def _run(self, script: Any, session: SessionKey, args: list[Any]) -> list[Any]:
        if self._hot_path is not None:
            try:
                hot: list[Any] = await self._hot_path.run_script(
                    script.script, session_keys(session, self._prefix), args
                )
            except ScriptError as exc:
                raise RuntimeError(str(exc)) from exc
            return hot
        try:
            reply: list[Any] = await script(keys=session_keys(session, self._prefix), args=args)
        except ResponseError as exc:
            if "script" in str(exc) and not _unavailable_reply(exc):
                # A script that fails is our bug, not an outage: let it surface as INTERNAL.
                raise RuntimeError(f"spendgate Lua script failed: {exc}") from exc
            raise StoreUnavailable(f"redis: {exc}") from exc
        except (RedisError, RedisClusterException) as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc
        return reply

    async def reserve(self, request: ReserveRequest) -> ReserveOutcome:
        reply = await self._run(self._decide, request.session, DECIDE.args(request))
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
        reply = await self._run(self._settle, request.session, SETTLE.args(request))
        status, cost, spent, reserved, decided = reply
        return SettleOutcome(SettleStatus(status), cost, spent, reserved, DecidedCall.decode(decided))

    async def settle_record(
        self, session: SessionKey, reservation_id: str, now_ms: int
    ) -> SettleRecord | None:
        # A plain read of the session hash's d:<id> and a:<id> fields (lua/_session.lua).
        hkey = session_keys(session, self._prefix)[0]
        cost, decided = await redis_call(
            self._client.hmget(hkey, [f"d:{reservation_id}", f"a:{reservation_id}"])
        )
        if cost is None:
            return None
        return SettleRecord(int(cost), DecidedCall.decode(decided) if decided is not None else None)

    async def cancel(self, request: CancelRequest) -> CancelStatus:
        (status,) = await self._run(self._cancel, request.session, CANCEL.args(request))
        return CancelStatus(status)

    async def session_state(self, session: SessionKey, now_ms: int, session_ttl_ms: int) -> SessionState:
        reply = await self._run(self._state, session, STATE.args((now_ms, session_ttl_ms)))
        spent, reserved, tools, open_count = reply
        return SessionState(spent, reserved, tools, open_count)

    async def ping(self) -> None:
        await ping(self._client)

    async def close(self) -> None:
        if not self._owns_client:
            return
        if self._hot_path is not None:
            await self._hot_path.close()
        await self._client.aclose()
