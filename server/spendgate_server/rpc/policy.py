"""PolicyService servicer: read, compare-and-set, history of policies, and the pattern set."""

from __future__ import annotations

import json
from typing import NoReturn

import structlog
from spendgate.v1 import policy_pb2 as ppb
from spendgate.v1 import policy_pb2_grpc

from spendgate_server.policy.policies import policies_to_dict
from spendgate_server.policy.remote_policies import PolicyResolver, parse_stored_policies
from spendgate_server.rpc.alerts_wire import policies_to_proto
from spendgate_server.rpc.auth import current_principal
from spendgate_server.rpc.revisions import (
    Context,
    actor_of,
    fail,
    now_ms,
    page_of,
    page_request,
    revision_fields,
)
from spendgate_server.rpc.validation import etag_from_proto, policies_from_proto
from spendgate_server.store.policies import StoredPolicies

__all__ = ["PolicyServicer"]

_log = structlog.get_logger("spendgate.policies")


def _policy_set(stored: StoredPolicies | None) -> ppb.PolicySet:
    if stored is None:
        return ppb.PolicySet(policies=ppb.Policies())
    return ppb.PolicySet(policies=policies_to_proto(parse_stored_policies(stored)), **revision_fields(stored))


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """Serves spendgate.v1.PolicyService for the caller's tenant."""

    def __init__(self, resolver: PolicyResolver) -> None:
        self._resolver = resolver
        self._store = resolver.store

    async def GetPolicies(self, request: ppb.GetPoliciesRequest, context: Context) -> ppb.GetPoliciesResponse:
        try:
            stored = await self._store.get(current_principal().tenant)
        except Exception as exc:
            await self._fail(context, exc)
        return ppb.GetPoliciesResponse(policy_set=_policy_set(stored))

    async def UpdatePolicies(
        self, request: ppb.UpdatePoliciesRequest, context: Context
    ) -> ppb.UpdatePoliciesResponse:
        tenant = current_principal().tenant
        try:
            policies = policies_from_proto(request.policies)
            stored = await self._store.put(
                tenant,
                json.dumps(policies_to_dict(policies), sort_keys=True),
                etag_from_proto(request.etag),
                actor_of(context),
                now_ms(),
            )
        except Exception as exc:
            await self._fail(context, exc)
        # This process sees its own write at once; the others through the store's notices.
        self._resolver.invalidate(tenant)
        _log.info("policies_updated", tenant=tenant, version=stored.version, updated_by=stored.updated_by)
        return ppb.UpdatePoliciesResponse(policy_set=_policy_set(stored))

    async def ListPolicyRevisions(
        self, request: ppb.ListPolicyRevisionsRequest, context: Context
    ) -> ppb.ListPolicyRevisionsResponse:
        try:
            size, start = page_request(request)
            revisions = await self._store.history(current_principal().tenant)
        except Exception as exc:
            await self._fail(context, exc)
        page, token = page_of(revisions, size, start)
        return ppb.ListPolicyRevisionsResponse(
            revisions=[_policy_set(r) for r in page], next_page_token=token
        )

    async def GetPatternSet(
        self, request: ppb.GetPatternSetRequest, context: Context
    ) -> ppb.GetPatternSetResponse:
        try:
            compiled = await self._resolver.get(current_principal().tenant)
        except Exception as exc:
            await self._fail(context, exc)
        if request.known_version and request.known_version == compiled.version:
            return ppb.GetPatternSetResponse(version=compiled.version, unchanged=True)
        return ppb.GetPatternSetResponse(
            version=compiled.version,
            patterns=[
                ppb.BannedPattern(id=b.id, pattern=b.pattern) for b in compiled.policies.banned_patterns
            ],
            journal_prompts=compiled.journal_prompts,
        )

    async def _fail(self, context: Context, exc: Exception) -> NoReturn:
        await fail(context, exc, _log, "PolicyService")
