"""Where policies live: versioned per tenant, compare-and-set, with history and change notices.

Policies are stored exactly like remote configs (store/configs.py): the same
compare-and-set, version counter, history and change notices, in a config store
of their own (``sg:pol:{<tenant>}`` in Redis). So one tested mechanism serves
both, and the two never share a version counter. In Redis both publish on the
config channel; a policy write makes servers reload that tenant's config once
(and the reverse), which is cheap and rare.
"""

from __future__ import annotations

from dataclasses import dataclass

from spendgate_server.store.configs import (
    ChangeListener,
    ConfigConflict,
    ConfigStore,
    MemoryConfigStore,
    StoredConfig,
)
from spendgate_server.store.keyspace import POLICIES_PREFIX

__all__ = ["POLICY_KEY_PREFIX", "PolicyConflict", "PolicyStore", "StoredPolicies"]

POLICY_KEY_PREFIX = POLICIES_PREFIX


class PolicyConflict(ConfigConflict):
    """The etag given is not the policies' current one (AIP-154): FAILED_PRECONDITION."""

    def __init__(self, current_etag: str) -> None:
        self.current_etag = current_etag
        Exception.__init__(
            self,
            "etag mismatch for the policies: they were changed since you read them (current etag "
            f"{current_etag or 'none: none were written'}); read them again and retry",
        )


@dataclass(frozen=True, slots=True)
class StoredPolicies:
    """One written set of policies: the user-facing form as JSON, and who wrote it when."""

    policies_json: str
    version: int
    updated_by: str
    update_time_ms: int

    @property
    def etag(self) -> str:
        """The compare-and-set token: the version it was written at."""
        return str(self.version)

    @classmethod
    def from_config(cls, stored: StoredConfig) -> StoredPolicies:
        """The policies kept in a config record."""
        return cls(stored.config_json, stored.version, stored.updated_by, stored.update_time_ms)


class PolicyStore:
    """A tenant's policies over a config store of their own.

    Args:
        configs: a config store used for policies only (``MemoryConfigStore()``, or
            ``RedisConfigStore(client, key_prefix=POLICY_KEY_PREFIX)``).
    """

    def __init__(self, configs: ConfigStore | None = None) -> None:
        self._configs = configs or MemoryConfigStore()

    async def get(self, tenant: str) -> StoredPolicies | None:
        """The current policies, or None when never written."""
        stored = await self._configs.get(tenant, "")
        return StoredPolicies.from_config(stored) if stored else None

    async def put(
        self, tenant: str, policies_json: str, etag: str, actor: str, now_ms: int
    ) -> StoredPolicies:
        """Write if ``etag`` is current ('' when creating); bump the version; notify.

        Raises:
            PolicyConflict: ``etag`` is stale; nothing was written.
        """
        try:
            stored = await self._configs.put(tenant, "", policies_json, etag, actor, now_ms)
        except ConfigConflict as exc:
            raise PolicyConflict(exc.current_etag) from None
        return StoredPolicies.from_config(stored)

    async def history(self, tenant: str) -> list[StoredPolicies]:
        """Every kept revision, newest first."""
        return [StoredPolicies.from_config(s) for s in await self._configs.history(tenant, "")]

    async def versions(self, tenants: list[str]) -> dict[str, int]:
        """Each tenant's policy version (0 when never written)."""
        return await self._configs.versions(tenants)

    async def listen(self, on_change: ChangeListener) -> None:
        """Call ``on_change`` with a tenant (or '*') on change notices until cancelled; best effort."""
        await self._configs.listen(on_change)

    async def close(self) -> None:
        """Release connections."""
        await self._configs.close()
