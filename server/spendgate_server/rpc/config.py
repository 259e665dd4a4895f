"""ConfigService servicer: read, compare-and-set, history and watch of remote configs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import NoReturn

import structlog
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc

from spendgate_server.engine.config import config_to_dict
from spendgate_server.engine.pricing import PriceTable
from spendgate_server.engine.remote_config import ConfigResolver, parse_stored
from spendgate_server.errors import FieldViolation, InvalidArgument
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
from spendgate_server.rpc.validation import config_from_proto, etag_from_proto, project_from_proto
from spendgate_server.rpc.wire import config_to_proto
from spendgate_server.store.configs import StoredConfig

__all__ = ["ConfigServicer"]

_log = structlog.get_logger("spendgate.config")
# A watch re-reads at least this often, so it converges even if every notice is lost.
WATCH_RECHECK_SECONDS = 5.0


def _config_message(project: str, stored: StoredConfig | None) -> cpb.Config:
    if stored is None:
        return cpb.Config(project=project)
    return cpb.Config(
        project=project, enforcement_config=config_to_proto(parse_stored(stored)), **revision_fields(stored)
    )


class ConfigServicer(config_pb2_grpc.ConfigServiceServicer):
    """Serves spendgate.v1.ConfigService for the caller's tenant."""

    def __init__(self, resolver: ConfigResolver, prices: PriceTable) -> None:
        self._resolver = resolver
        self._store = resolver.store
        self._prices = prices

    async def GetConfig(self, request: cpb.GetConfigRequest, context: Context) -> cpb.GetConfigResponse:
        try:
            project = project_from_proto(request.project)
            stored = await self._store.get(current_principal().tenant, project)
        except Exception as exc:
            await self._fail(context, exc)
        return cpb.GetConfigResponse(config=_config_message(project, stored))

    async def UpdateConfig(
        self, request: cpb.UpdateConfigRequest, context: Context
    ) -> cpb.UpdateConfigResponse:
        try:
            project = project_from_proto(request.project)
            config = config_from_proto(request.enforcement_config)
            if config.model_downgrade is not None:
                fallback = self._prices.lookup(config.model_downgrade.fallback_model)
                if not fallback.known:
                    raise InvalidArgument(
                        [
                            FieldViolation(
                                "enforcement_config.model_downgrade.fallback_model",
                                f"no price is known for {config.model_downgrade.fallback_model!r}: "
                                "a downgrade needs a priced fallback (add a price override)",
                            )
                        ]
                    )
            stored = await self._store.put(
                current_principal().tenant,
                project,
                json.dumps(config_to_dict(config), sort_keys=True),
                etag_from_proto(request.etag),
                actor_of(context),
                now_ms(),
            )
        except Exception as exc:
            await self._fail(context, exc)
        # This server sees its own write at once; the others through the store's notices.
        self._resolver.invalidate(current_principal().tenant)
        _log.info(
            "config_updated",
            tenant=current_principal().tenant,
            project=project,
            version=stored.version,
            updated_by=stored.updated_by,
        )
        return cpb.UpdateConfigResponse(config=_config_message(project, stored))

    async def ListConfigRevisions(
        self, request: cpb.ListConfigRevisionsRequest, context: Context
    ) -> cpb.ListConfigRevisionsResponse:
        try:
            project = project_from_proto(request.project)
            size, start = page_request(request)
            revisions = await self._store.history(current_principal().tenant, project)
        except Exception as exc:
            await self._fail(context, exc)
        page, token = page_of(revisions, size, start)
        return cpb.ListConfigRevisionsResponse(
            revisions=[_config_message(project, r) for r in page], next_page_token=token
        )

    async def WatchConfig(
        self, request: cpb.WatchConfigRequest, context: Context
    ) -> AsyncIterator[cpb.WatchConfigResponse]:
        try:
            project = project_from_proto(request.project)
        except Exception as exc:
            await self._fail(context, exc)
        last_version = -1
        while True:
            try:
                stored = await self._store.get(current_principal().tenant, project)
            except Exception as exc:
                await self._fail(context, exc)
            version = stored.version if stored else 0
            if version != last_version:
                last_version = version
                yield cpb.WatchConfigResponse(config=_config_message(project, stored))
            await self._resolver.wait_for_change(current_principal().tenant, WATCH_RECHECK_SECONDS)

    async def _fail(self, context: Context, exc: Exception) -> NoReturn:
        await fail(context, exc, _log, "ConfigService")
