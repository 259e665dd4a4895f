"""Every server's view of the remote configs: cached, invalidated by notices, bounded by polling.

A change written on any server reaches this one through the store's notices (Redis
pub/sub, milliseconds); if notices are lost, polling the tenants' version counters
every ``poll_interval_seconds`` catches it, which bounds how stale a config can be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from spendgate_server.engine.config import EnforcementConfig, parse_enforcement_config
from spendgate_server.errors import StoreUnavailable
from spendgate_server.logging import Outage
from spendgate_server.store.configs import ConfigStore, MemoryConfigStore, StoredConfig

__all__ = ["ConfigResolver", "ResolvedConfig", "follow_changes", "parse_stored"]

_log = structlog.get_logger("spendgate.remote_config")
ALL_TENANTS = "*"


@dataclass(frozen=True, slots=True)
class ResolvedConfig:
    """The server-side rules for a (tenant, project): default ⊓ tenant ⊓ project."""

    config: EnforcementConfig
    version: int


def parse_stored(stored: StoredConfig) -> EnforcementConfig:
    """The rules of a stored config (validated when it was written)."""
    return parse_enforcement_config(json.loads(stored.config_json))


class ConfigResolver:
    """Caches resolved configs per (tenant, project) and keeps them fresh."""

    def __init__(
        self, store: ConfigStore, default: EnforcementConfig, poll_interval_seconds: float = 1.0
    ) -> None:
        self.store = store
        self._default = default
        self._poll_interval = poll_interval_seconds
        self._cache: dict[tuple[str, str], ResolvedConfig] = {}
        self._seen_versions: dict[str, int] = {}
        # Bumped on every invalidation, so a load that raced with one is not cached.
        self._generation: dict[str, int] = {}
        self._changed = asyncio.Condition()
        # Strong references: the loop keeps only weak ones to tasks.
        self._notifications: set[asyncio.Task[None]] = set()
        self._loading: dict[tuple[str, str], asyncio.Future[ResolvedConfig]] = {}

    @classmethod
    def static(cls, default: EnforcementConfig) -> ConfigResolver:
        """A resolver with no remote configs written yet (embedded use and tests)."""
        return cls(MemoryConfigStore(), default)

    def cached(self, tenant: str, project: str) -> ResolvedConfig | None:
        """The cached resolution, or None: the hot path, no I/O."""
        return self._cache.get((tenant, project))

    async def load(self, tenant: str, project: str) -> ResolvedConfig:
        """Read the tenant's (and project's) config from the store and cache the result.

        Concurrent misses for the same config share one read, so a burst of first calls
        (or the burst after an invalidation) costs the store one round trip set, not one each.
        """
        key = (tenant, project)
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self._load(tenant, project))
            self._loading[key] = loading
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        # Shielded: one waiter giving up must not cancel the read the others wait for.
        return await asyncio.shield(loading)

    async def _load(self, tenant: str, project: str) -> ResolvedConfig:
        generation = self._generation.get(tenant, 0)
        # The version counter is read first: a write racing with this load shows up at the next poll.
        version_counter = (await self.store.versions([tenant]))[tenant]
        config, version = self._default, 0
        for name in ("", project) if project else ("",):
            stored = await self.store.get(tenant, name)
            if stored is not None:
                config = config.stricter(parse_stored(stored))
                version = max(version, stored.version)
        resolved = ResolvedConfig(config, version)
        if self._generation.get(tenant, 0) == generation:
            self._cache[(tenant, project)] = resolved
            self._seen_versions.setdefault(tenant, version_counter)
        return resolved

    def invalidate(self, tenant: str) -> None:
        """Forget cached configs of ``tenant`` ('*': of every tenant) and wake watchers."""
        tenants = (
            {t for t, _ in self._cache} | set(self._seen_versions) if tenant == ALL_TENANTS else {tenant}
        )
        for name in tenants:
            self._generation[name] = self._generation.get(name, 0) + 1
            self._seen_versions.pop(name, None)
        self._cache = {key: value for key, value in self._cache.items() if key[0] not in tenants}
        task = asyncio.get_running_loop().create_task(self._notify())
        self._notifications.add(task)
        task.add_done_callback(self._notifications.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_change(self, tenant: str, timeout_seconds: float) -> None:
        """Return when ``tenant``'s configs may have changed, or after the timeout."""
        start = self._generation.get(tenant, 0)
        with contextlib.suppress(TimeoutError):
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._generation.get(tenant, 0) != start), timeout_seconds
                )

    async def poll_once(self) -> None:
        """Compare every cached tenant's version counter with the one seen; invalidate on change."""
        tenants = list(self._seen_versions)
        if not tenants:
            return
        current = await self.store.versions(tenants)
        for tenant, version in current.items():
            if self._seen_versions.get(tenant, version) != version:
                _log.info("config_changed", tenant=tenant, version=version, via="poll")
                self.invalidate(tenant)

    async def run(self) -> None:
        """Follow change notices and poll until cancelled."""
        await follow_changes(
            self.store.listen, self.invalidate, self.poll_once, self._poll_interval, "config"
        )


async def follow_changes(
    listen: Callable[[Callable[[str], None]], Coroutine[Any, Any, None]],
    invalidate: Callable[[str], None],
    poll_once: Callable[[], Awaitable[None]],
    poll_interval_seconds: float,
    what: str,
) -> None:
    """Keep a per-tenant cache fresh until cancelled: notices invalidate at once, and a poll
    every ``poll_interval_seconds`` catches any notice that was lost.

    Shared by the config and the policy caches; ``what`` names them in the logs.

    Raises:
        Exception: what the listener or a poll raised other than an outage; the two run
            in one task group, so neither can die while the other goes on alone.
    """

    async def poll() -> None:
        outage = Outage(_log, f"{what}_poll_failed", f"{what}_poll_restored")
        while True:
            await asyncio.sleep(poll_interval_seconds)
            try:
                await poll_once()
            except StoreUnavailable as exc:
                outage.failed(exc)
            else:
                outage.succeeded()

    async with asyncio.TaskGroup() as group:
        group.create_task(listen(invalidate))
        group.create_task(poll())
