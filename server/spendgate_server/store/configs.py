"""Where remote configs live: versioned, compare-and-set, with history and change notices.

Two implementations pass the same contract (tests/test_config_store.py):
MemoryConfigStore (embedded) and RedisConfigStore (store/redis_configs.py).
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from spendgate_server.errors import SpendgateError

__all__ = ["ConfigConflict", "ConfigStore", "MemoryConfigStore", "StoredConfig"]

HISTORY_LENGTH = 1000


class ConfigConflict(SpendgateError):
    """The etag given is not the config's current one: someone else wrote first (AIP-154)."""

    def __init__(self, project: str, current_etag: str) -> None:
        self.current_etag = current_etag
        where = f"project {project!r}" if project else "the tenant config"
        super().__init__(
            f"etag mismatch for {where}: it was changed since you read it (current etag "
            f"{current_etag or 'none: it does not exist'}); read it again and retry"
        )


@dataclass(frozen=True, slots=True)
class StoredConfig:
    """One written config: the user-facing rules as JSON, and who wrote them when."""

    project: str
    config_json: str
    version: int
    updated_by: str
    update_time_ms: int

    @property
    def etag(self) -> str:
        """The compare-and-set token: the version it was written at."""
        return str(self.version)

    @classmethod
    def from_record(cls, record: str | bytes) -> StoredConfig:
        """Parse the JSON record the stores keep."""
        raw = json.loads(record)
        return cls(
            raw["project"], raw["config"], int(raw["version"]), raw["updated_by"], int(raw["update_time_ms"])
        )


ChangeListener = Callable[[str], None]
"""Called with a tenant id when one of its configs changed (possibly on another server)."""


class ConfigStore(ABC):
    """Versioned configs per tenant and project."""

    @abstractmethod
    async def get(self, tenant: str, project: str) -> StoredConfig | None:
        """The current config, or None when it was never written."""

    @abstractmethod
    async def put(
        self, tenant: str, project: str, config_json: str, etag: str, actor: str, now_ms: int
    ) -> StoredConfig:
        """Write if ``etag`` is current ('' when creating); bump the tenant's version; notify.

        Raises:
            ConfigConflict: ``etag`` is stale; nothing was written.
        """

    @abstractmethod
    async def history(self, tenant: str, project: str) -> list[StoredConfig]:
        """Every kept revision, newest first."""

    @abstractmethod
    async def versions(self, tenants: list[str]) -> dict[str, int]:
        """Each tenant's version counter (0 when nothing was written): what polling compares."""

    @abstractmethod
    async def listen(self, on_change: ChangeListener) -> None:
        """Call ``on_change`` for every change notice until cancelled.

        Notices are best effort (pub/sub); readers must also poll ``versions``.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


class MemoryConfigStore(ConfigStore):
    """Configs in this process; notices are delivered synchronously to listeners."""

    def __init__(self) -> None:
        self._current: dict[tuple[str, str], StoredConfig] = {}
        self._history: dict[tuple[str, str], list[StoredConfig]] = {}
        self._versions: dict[str, int] = {}
        self._listeners: list[ChangeListener] = []

    async def get(self, tenant: str, project: str) -> StoredConfig | None:
        return self._current.get((tenant, project))

    async def put(
        self, tenant: str, project: str, config_json: str, etag: str, actor: str, now_ms: int
    ) -> StoredConfig:
        current = self._current.get((tenant, project))
        current_etag = current.etag if current else ""
        if etag != current_etag:
            raise ConfigConflict(project, current_etag)
        version = self._versions[tenant] = self._versions.get(tenant, 0) + 1
        stored = StoredConfig(project, config_json, version, actor, now_ms)
        self._current[(tenant, project)] = stored
        revisions = self._history.setdefault((tenant, project), [])
        revisions.insert(0, stored)
        del revisions[HISTORY_LENGTH:]
        for listener in self._listeners:
            listener(tenant)
        return stored

    async def history(self, tenant: str, project: str) -> list[StoredConfig]:
        return list(self._history.get((tenant, project), []))

    async def versions(self, tenants: list[str]) -> dict[str, int]:
        return {tenant: self._versions.get(tenant, 0) for tenant in tenants}

    async def listen(self, on_change: ChangeListener) -> None:
        self._listeners.append(on_change)
        try:
            await asyncio.Event().wait()
        finally:
            self._listeners.remove(on_change)

    async def close(self) -> None:
        self._listeners.clear()
