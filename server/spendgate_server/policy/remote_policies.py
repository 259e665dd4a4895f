"""Every process's view of the policies: compiled once per version, invalidated by notices,
bounded in staleness by polling (the remote_config.py pattern, per tenant)."""

from __future__ import annotations

import json

import structlog

from spendgate_server.engine.remote_config import follow_changes
from spendgate_server.policy.policies import CompiledPolicies, Policies, compile_policies, policies_from_dict
from spendgate_server.store.policies import PolicyStore, StoredPolicies

__all__ = ["PolicyResolver", "parse_stored_policies"]

_log = structlog.get_logger("spendgate.policies")
ALL_TENANTS = "*"


def parse_stored_policies(stored: StoredPolicies | None) -> Policies:
    """The policies of a stored record (validated when written); empty when none."""
    return policies_from_dict(json.loads(stored.policies_json)) if stored else Policies()


class PolicyResolver:
    """Caches each tenant's compiled policies and keeps them fresh.

    Args:
        store: where policies live.
        poll_interval_seconds: how often cached tenants' versions are compared with the
            store's: the bound on staleness when change notices are lost.
    """

    def __init__(self, store: PolicyStore, poll_interval_seconds: float = 1.0) -> None:
        self.store = store
        self._poll_interval = poll_interval_seconds
        self._cache: dict[str, CompiledPolicies] = {}
        # Bumped on every invalidation, so a load that raced with one is not cached.
        self._generation: dict[str, int] = {}

    async def get(self, tenant: str) -> CompiledPolicies:
        """The tenant's current policies (cached; loaded and compiled on a miss)."""
        cached = self._cache.get(tenant)
        if cached is not None:
            return cached
        generation = self._generation.get(tenant, 0)
        stored = await self.store.get(tenant)
        compiled = compile_policies(parse_stored_policies(stored), stored.version if stored else 0)
        if self._generation.get(tenant, 0) == generation:
            self._cache[tenant] = compiled
        return compiled

    async def journals_prompts(self, tenant: str) -> bool:
        """Whether ``tenant`` enabled prompt journaling."""
        return (await self.get(tenant)).journal_prompts

    def invalidate(self, tenant: str) -> None:
        """Forget ``tenant``'s policies ('*': every tenant's)."""
        tenants = set(self._cache) | set(self._generation) if tenant == ALL_TENANTS else {tenant}
        for name in tenants:
            self._generation[name] = self._generation.get(name, 0) + 1
            self._cache.pop(name, None)

    async def poll_once(self) -> None:
        """Compare every cached tenant's version with the store's; forget those that changed."""
        tenants = list(self._cache)
        if not tenants:
            return
        for tenant, version in (await self.store.versions(tenants)).items():
            cached = self._cache.get(tenant)
            if cached is not None and cached.version != version:
                _log.info("policies_changed", tenant=tenant, version=version, via="poll")
                self.invalidate(tenant)

    async def run(self) -> None:
        """Follow change notices and poll until cancelled."""
        await follow_changes(
            self.store.listen, self.invalidate, self.poll_once, self._poll_interval, "policy"
        )
