"""SessionService servicer: the top sessions of the caller's tenant and their spend over time."""

from __future__ import annotations

import time
from typing import Any, NoReturn

import grpc
from google.protobuf import timestamp_pb2
from spendgate.v1 import session_pb2 as spb
from spendgate.v1 import session_pb2_grpc

from spendgate_server.errors import FieldViolation, InvalidArgument
from spendgate_server.rpc.auth import current_principal
from spendgate_server.rpc.status import abort, rpc_status
from spendgate_server.rpc.validation import project_from_proto, session_id_from_proto
from spendgate_server.store.insights import InsightsStore

__all__ = ["SessionServicer"]

Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 20, 200


def _timestamp(unix_ms: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=unix_ms // 1000, nanos=unix_ms % 1000 * 1_000_000)


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    """Serves spendgate.v1.SessionService from the fleet's aggregated insights."""

    def __init__(self, store: InsightsStore) -> None:
        self._store = store

    async def ListSessions(
        self, request: spb.ListSessionsRequest, context: Context
    ) -> spb.ListSessionsResponse:
        try:
            project = project_from_proto(request.project)
            if not 0 <= request.page_size <= MAX_PAGE_SIZE:
                raise InvalidArgument([FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")])
            now_ms = time.time_ns() // 1_000_000
            sessions = await self._store.top_sessions(
                current_principal().tenant, project, request.page_size or DEFAULT_PAGE_SIZE, now_ms
            )
        except Exception as exc:
            await self._fail(context, exc)
        response = spb.ListSessionsResponse()
        for s in sessions:
            summary = response.sessions.add(
                session_id=s.session_id,
                project=s.project,
                spend_nano_usd=s.spend_nano_usd,
                decision_count=s.decisions,
                blocked=[
                    spb.RuleCount(rule=int(rule), count=count)  # type: ignore[arg-type]  # Rule values are wire codes
                    for rule, count in sorted(s.blocked.items())
                ],
                last_seen_time=_timestamp(s.last_seen_ms),
            )
            if s.budget_nano_usd is not None:
                summary.budget_nano_usd = s.budget_nano_usd
        return response

    async def GetSessionSpend(
        self, request: spb.GetSessionSpendRequest, context: Context
    ) -> spb.GetSessionSpendResponse:
        try:
            session_id = session_id_from_proto(request.session_id)
            points = await self._store.spend_series(
                current_principal().tenant, session_id, time.time_ns() // 1_000_000
            )
        except Exception as exc:
            await self._fail(context, exc)
        return spb.GetSessionSpendResponse(
            points=[
                spb.SpendPoint(minute_start_time=_timestamp(p.minute_start_ms), cost_nano_usd=p.cost_nano_usd)
                for p in points
            ]
        )

    async def _fail(self, context: Context, exc: Exception) -> NoReturn:
        await abort(context, *rpc_status(exc))
