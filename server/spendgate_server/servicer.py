"""DecisionService servicer: translates proto ↔ domain and nothing else."""

from __future__ import annotations

from typing import Any

import grpc
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc

from spendgate_server.engine import DecisionEngine
from spendgate_server.status import translate_errors
from spendgate_server.validation import call_from_proto, settle_from_proto
from spendgate_server.wire import decision_to_proto

__all__ = ["DEFAULT_TENANT", "DecisionServicer"]

# Until API keys exist every caller is this tenant; the tenant never comes from the request.
DEFAULT_TENANT = "default"

Context = grpc.aio.ServicerContext[Any, Any]


class DecisionServicer(decision_pb2_grpc.DecisionServiceServicer):
    """Serves spendgate.v1.DecisionService over the engine."""

    def __init__(self, engine: DecisionEngine) -> None:
        self._engine = engine

    @translate_errors
    async def Decide(self, request: pb.DecideRequest, context: Context) -> pb.DecideResponse:
        decision = await self._engine.decide(call_from_proto(request, DEFAULT_TENANT))
        return decision_to_proto(decision)

    @translate_errors
    async def Settle(self, request: pb.SettleRequest, context: Context) -> pb.SettleResponse:
        settled = await self._engine.settle(settle_from_proto(request, DEFAULT_TENANT))
        return pb.SettleResponse(
            actual_cost_nano_usd=settled.cost_nano_usd,
            session_spend_nano_usd=settled.session_spend_nano_usd,
            already_settled=settled.already_settled,
        )
