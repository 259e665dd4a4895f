"""The one place a process picks its backend: every store of ``serve``, ``worker`` and the CLIs.

``settings.store`` chooses ``memory`` or ``redis`` here, once. With Redis, every store of
the process shares one :class:`~spendgate_server.store.redis.RedisConnection`: one
redis-py client (one connection pool) and the pipelined hot-path connection it owns.
Its connections are named ``spendgate-<role>-<pid>-<n>`` (``-hot`` for the hot path), so
``CLIENT LIST`` on the Redis shows which process holds what.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from spendgate_server.errors import ConfigError, StoreUnavailable
from spendgate_server.logging import redact_secrets
from spendgate_server.settings import ServeSettings
from spendgate_server.store import Store
from spendgate_server.store.breaker import CircuitBreakerStore
from spendgate_server.store.configs import ConfigStore, MemoryConfigStore
from spendgate_server.store.insights import InsightsStore, MemoryInsightsStore
from spendgate_server.store.keys import FileKeyStore, KeyStore, RedisKeyStore
from spendgate_server.store.logs import LogStore, MemoryLogStore
from spendgate_server.store.memory import MemoryStore
from spendgate_server.store.policies import POLICY_KEY_PREFIX, PolicyStore
from spendgate_server.store.redis import RedisClient, RedisConnection, RedisStore, ping
from spendgate_server.store.redis_configs import RedisConfigStore
from spendgate_server.store.redis_insights import RedisInsightsStore
from spendgate_server.store.redis_logs import RedisLogStore
from spendgate_server.store.redis_session_registry import RedisSessionRegistry
from spendgate_server.store.session_registry import MemorySessionRegistry, SessionRegistry

__all__ = [
    "MemoryStores",
    "RedisStores",
    "Stores",
    "check_reachable",
    "open_keystore",
    "open_redis",
    "open_stores",
]

# The `spendgate keys` CLI waits longer than a server would: it is a person, not a Decide.
_ADMIN_TIMEOUT_MILLIS = 500
# A migration scans and moves every key: its commands may take longer still.
_MIGRATE_TIMEOUT_MILLIS = 5000


class Stores(ABC):
    """The stores of one process, all on one backend; each is built once, when first asked for.

    Closing the stores closes what they share (:meth:`aclose`); their own ``close``
    methods then have nothing left to release.
    """

    backend: str

    @property
    @abstractmethod
    def sessions(self) -> Store:
        """Session state for Decide and Settle."""

    @property
    @abstractmethod
    def configs(self) -> ConfigStore:
        """Remote enforcement configs."""

    @property
    @abstractmethod
    def insights(self) -> InsightsStore:
        """The fleet's session insights."""

    @property
    @abstractmethod
    def logs(self) -> LogStore:
        """The journal and the violations feed."""

    @property
    @abstractmethod
    def policies(self) -> PolicyStore:
        """The org-wide policies."""

    @property
    @abstractmethod
    def session_registry(self) -> SessionRegistry:
        """Each tenant's live sessions (for --max-sessions-per-tenant)."""

    @property
    @abstractmethod
    def keys(self) -> KeyStore | None:
        """API keys; None when there is nowhere to keep them (memory store, no --keys-file)."""

    @abstractmethod
    async def ping(self) -> None:
        """Check that the backend answers.

        Raises:
            StoreUnavailable: it does not.
        """

    async def aclose(self) -> None:
        """Release the backend's connections."""
        return


class MemoryStores(Stores):
    """This process's memory: nothing shared, nothing to install (keys in ``--keys-file``)."""

    backend = "memory"

    def __init__(self, settings: ServeSettings) -> None:
        self._keys_file = settings.keys_file

    @functools.cached_property
    def sessions(self) -> Store:
        return MemoryStore()

    @functools.cached_property
    def configs(self) -> ConfigStore:
        return MemoryConfigStore()

    @functools.cached_property
    def insights(self) -> InsightsStore:
        return MemoryInsightsStore()

    @functools.cached_property
    def logs(self) -> LogStore:
        return MemoryLogStore()

    @functools.cached_property
    def policies(self) -> PolicyStore:
        return PolicyStore(MemoryConfigStore())

    @functools.cached_property
    def session_registry(self) -> SessionRegistry:
        return MemorySessionRegistry()

    @functools.cached_property
    def keys(self) -> KeyStore | None:
        return FileKeyStore(self._keys_file) if self._keys_file else None

    async def ping(self) -> None:
        return


class RedisStores(Stores):
    """Everything in Redis (or a Redis Cluster), on the process's one shared client.

    Args:
        settings: the URL, timeout, pipelining and breaker settings.
        role: what the process is (``serve``, ``worker``, ``keys``): part of the client name.
    """

    backend = "redis"

    def __init__(self, settings: ServeSettings, role: str) -> None:
        self._settings = settings
        self.connection = RedisConnection(
            settings.redis_url,
            timeout_seconds=settings.redis_timeout_millis / 1000,
            pipelined=settings.redis_pipelining == "on",
            name=f"spendgate-{role}",
        )

    @functools.cached_property
    def sessions(self) -> Store:
        """Session state behind a circuit breaker (store/breaker.py) unless it is turned off."""
        s = self._settings
        store = RedisStore(self.connection.client, hot_path=self.connection.hot_path, owns_client=False)
        if s.redis_breaker_failures == 0:
            return store
        return CircuitBreakerStore(
            store,
            failure_threshold=s.redis_breaker_failures,
            open_seconds=s.redis_breaker_open_millis / 1000,
        )

    @functools.cached_property
    def configs(self) -> ConfigStore:
        return RedisConfigStore(self.connection.client, owns_client=False)

    @functools.cached_property
    def insights(self) -> InsightsStore:
        return RedisInsightsStore(self.connection.client, owns_client=False)

    @functools.cached_property
    def logs(self) -> LogStore:
        return RedisLogStore(
            self.connection.client,
            poll_seconds=self._settings.evaluator_poll_millis / 1000,
            owns_client=False,
            hot_path=self.connection.hot_path,
        )

    @functools.cached_property
    def policies(self) -> PolicyStore:
        return PolicyStore(
            RedisConfigStore(self.connection.client, key_prefix=POLICY_KEY_PREFIX, owns_client=False)
        )

    @functools.cached_property
    def session_registry(self) -> SessionRegistry:
        return RedisSessionRegistry(self.connection.client, owns_client=False)

    @functools.cached_property
    def keys(self) -> KeyStore | None:
        return RedisKeyStore(self.connection.client, owns_client=False)

    async def ping(self) -> None:
        await ping(self.connection.client)

    async def aclose(self) -> None:
        await self.connection.aclose()


def open_stores(settings: ServeSettings, *, role: str) -> Stores:
    """The stores of a process on the backend ``settings.store`` names; nothing is contacted yet.

    Args:
        settings: the backend and its settings.
        role: what the process is (``serve``, ``worker``, ...), named on its Redis connections.

    Raises:
        ConfigError: a malformed ``--redis-url``.
    """
    if settings.store == "redis":
        return RedisStores(settings, role)
    return MemoryStores(settings)


async def check_reachable(stores: Stores, settings: ServeSettings) -> None:
    """Refuse to start on a backend that does not answer.

    Raises:
        ConfigError: naming ``--redis-url`` (its password left out) and the failure.
    """
    try:
        await stores.ping()
    except StoreUnavailable as exc:
        raise ConfigError(f"--redis-url {redact_secrets(settings.redis_url)} is unreachable: {exc}") from exc


@contextlib.asynccontextmanager
async def open_redis(url: str) -> AsyncIterator[RedisClient]:
    """A client of the Redis at ``url`` for an admin command (``spendgate migrate-keys``)."""
    connection = RedisConnection(
        url, timeout_seconds=_MIGRATE_TIMEOUT_MILLIS / 1000, pipelined=False, name="spendgate-migrate"
    )
    try:
        yield connection.client
    finally:
        await connection.aclose()


@contextlib.asynccontextmanager
async def open_keystore(redis_url: str, keys_file: str) -> AsyncIterator[KeyStore]:
    """The key store ``spendgate keys`` manages: the fleet's Redis, or a memory-store server's file.

    Give exactly one of ``redis_url`` and ``keys_file``; the store is closed on leaving.
    """
    settings = ServeSettings(
        store="redis" if redis_url else "memory",
        redis_url=redis_url,
        keys_file=keys_file,
        redis_timeout_millis=_ADMIN_TIMEOUT_MILLIS,
    )
    stores = open_stores(settings, role="keys")
    try:
        keystore = stores.keys
        assert keystore is not None, "a keys file or a Redis URL is given"
        yield keystore
    finally:
        await stores.aclose()
