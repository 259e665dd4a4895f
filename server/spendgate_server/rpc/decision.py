"""DecisionService servicer: translates proto ↔ domain, times and counts; no rules here."""

from __future__ import annotations

import time
from typing import Any, NoReturn

import grpc
import structlog
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc

from spendgate_server.engine.decide import DecisionEngine
from spendgate_server.engine.insights import SessionActivity
from spendgate_server.errors import SpendgateError, StoreUnavailable
from spendgate_server.metrics import Metrics
from spendgate_server.rpc.auth import current_principal
from spendgate_server.rpc.status import abort, rpc_status
from spendgate_server.rpc.validation import call_from_proto, settle_from_proto
from spendgate_server.rpc.wire import decision_to_proto

__all__ = ["DecisionServicer"]

Context = grpc.aio.ServicerContext[Any, Any]
_log = structlog.get_logger("spendgate.servicer")


class DecisionServicer(decision_pb2_grpc.DecisionServiceServicer):
    """Serves spendgate.v1.DecisionService over the engine."""

    def __init__(
        self, engine: DecisionEngine, metrics: Metrics, activity: SessionActivity | None = None
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._activity = activity

    async def Decide(self, request: pb.DecideRequest, context: Context) -> pb.DecideResponse:
        started = time.perf_counter()
        try:
            call = call_from_proto(request, current_principal().tenant)
            decision = await self._engine.decide(call)
        except Exception as exc:
            await self._fail("Decide", context, exc)
        self._metrics.decided(decision, time.perf_counter() - started)
        if self._activity is not None:
            self._activity.decided(call.tenant, call.project, call.session_id, decision)
        return decision_to_proto(decision)

    async def Settle(self, request: pb.SettleRequest, context: Context) -> pb.SettleResponse:
        started = time.perf_counter()
        try:
            settle = settle_from_proto(request, current_principal().tenant)
            settled = await self._engine.settle(settle)
        except Exception as exc:
            await self._fail("Settle", context, exc)
        self._metrics.settled(
            settle.reservation_id, settled, not settle.provider_ok, time.perf_counter() - started
        )
        if self._activity is not None and not settled.already_settled:
            self._activity.settled(
                settle.tenant, settle.session_id, settled.cost_nano_usd, settled.session_spend_nano_usd
            )
        return pb.SettleResponse(
            actual_cost_nano_usd=settled.cost_nano_usd,
            session_spend_nano_usd=settled.session_spend_nano_usd,
            already_settled=settled.already_settled,
        )

    async def _fail(self, method: str, context: Context, exc: Exception) -> NoReturn:
        code, status = rpc_status(exc)
        self._metrics.failed(method, code.name)
        if isinstance(exc, StoreUnavailable):
            _log.warning("store_unavailable", rpc=method, error=str(exc))
        elif not isinstance(exc, SpendgateError):
            _log.error("internal_error", rpc=method, exc_info=exc)
        await abort(context, code, status)
