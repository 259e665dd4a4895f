"""DecisionService servicer: translates proto ↔ domain, times and counts; no rules here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import grpc
import structlog
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc

from spendgate_server.engine.decide import DecisionEngine, SettleAnswer, SettleCall, Settlement
from spendgate_server.engine.insights import SessionActivity
from spendgate_server.errors import FieldViolation, InvalidArgument, SpendgateError, StoreUnavailable
from spendgate_server.logging import Outage
from spendgate_server.metrics import Metrics
from spendgate_server.rpc.auth import current_principal
from spendgate_server.rpc.status import abort, rpc_status
from spendgate_server.rpc.validation import call_from_proto, settle_from_proto
from spendgate_server.rpc.wire import decision_to_proto

__all__ = ["MAX_BATCH_SETTLES", "DecisionServicer"]

Context = grpc.aio.ServicerContext[Any, Any]
_log = structlog.get_logger("spendgate.servicer")

# Settles in one SettleBatch or riding along one Decide. The client also keeps a batch's
# bytes under the 64 KiB message limit (a settle may carry 32 KiB of prompt).
MAX_BATCH_SETTLES = 64

# A settle answered: its request, its answer, and the seconds it took to answer.
_Answered = tuple[SettleCall, SettleAnswer, float]


class DecisionServicer(decision_pb2_grpc.DecisionServiceServicer):
    """Serves spendgate.v1.DecisionService over the engine."""

    def __init__(
        self, engine: DecisionEngine, metrics: Metrics, activity: SessionActivity | None = None
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._activity = activity
        # One outage for every call the store fails: a Redis down for a minute is two lines
        # (store_unavailable, store_restored), not one per call; the metrics count each call.
        self._store_outage = Outage(_log, "store_unavailable", "store_restored")

    async def Decide(self, request: pb.DecideRequest, context: Context) -> pb.DecideResponse:
        started = time.perf_counter()
        tenant = current_principal().tenant
        riders: asyncio.Future[list[pb.SettleResult]] | None = None
        answered: list[_Answered] = []
        if request.settles:
            if len(request.settles) > MAX_BATCH_SETTLES:
                await self._fail("Decide", context, _too_many("settles"))
            # The settles that ride along go first: scheduled now, they reach the store (one
            # pipelined write) before this decision's script, so the decision sees them.
            riders = asyncio.gather(*(self._settle_one(s, tenant, answered) for s in request.settles))
            await asyncio.sleep(0)
        try:
            call = call_from_proto(request, tenant)
            decision = await self._engine.decide(call)
        except Exception as exc:
            if riders is not None:
                await riders  # applied or not, the client sends them again (settling is idempotent)
                self._after_reply(answered)
            await self._fail("Decide", context, exc)
        self._metrics.decided(decision, time.perf_counter() - started)
        if decision.allowed:  # reserved, so the store answered (a block may not have asked it)
            self._store_outage.succeeded()
        if self._activity is not None:
            self._activity.decided(call.tenant, call.project, call.session_id, decision)
        response = decision_to_proto(decision)
        if riders is not None:
            response.settle_results.extend(await riders)
            self._after_reply(answered)
        return response

    async def Settle(self, request: pb.SettleRequest, context: Context) -> pb.SettleResponse:
        started = time.perf_counter()
        try:
            settle = settle_from_proto(request, current_principal().tenant)
            answer = await self._engine.settle_first(settle)
        except Exception as exc:
            await self._fail("Settle", context, exc)
        self._after_reply([(settle, answer, time.perf_counter() - started)])
        return _settle_response(answer.settlement)

    async def SettleBatch(self, request: pb.SettleBatchRequest, context: Context) -> pb.SettleBatchResponse:
        if not 1 <= len(request.settles) <= MAX_BATCH_SETTLES:
            await self._fail("SettleBatch", context, _too_many("settles"))
        tenant = current_principal().tenant
        answered: list[_Answered] = []
        results = await self._settle_all(request.settles, tenant, answered)
        self._after_reply(answered)
        return pb.SettleBatchResponse(results=results)

    async def _settle_all(
        self, requests: Sequence[pb.SettleRequest], tenant: str, answered: list[_Answered]
    ) -> list[pb.SettleResult]:
        # Concurrently: their scripts leave in one pipelined write to the store.
        return await asyncio.gather(*(self._settle_one(r, tenant, answered) for r in requests))

    async def _settle_one(
        self, request: pb.SettleRequest, tenant: str, answered: list[_Answered]
    ) -> pb.SettleResult:
        """One settle of a batch: its result, or its failure as the status a lone Settle would get.
        An answered settle joins ``answered``, for the work after the reply."""
        started = time.perf_counter()
        try:
            settle = settle_from_proto(request, tenant)
            answer = await self._engine.settle_first(settle)
        except Exception as exc:
            code, status = rpc_status(exc)
            self._metrics.failed("Settle", code.name)
            self._log_failure("Settle", exc)
            return pb.SettleResult(code=code.value[0], message=status.message)
        answered.append((settle, answer, time.perf_counter() - started))
        return pb.SettleResult(settled=_settle_response(answer.settlement))

    def _after_reply(self, answered: list[_Answered]) -> None:
        """Finish ``answered`` once the reply carrying them is sent.

        Scheduled from the handler just before it returns its response: gRPC then sends the
        response in the same task step, and this runs at the loop's next turn. The reply
        thus never waits for the journal event, its anomalies, its append or the metrics;
        the event is durable through its intent meanwhile (DecisionEngine.settle_first).
        """
        if answered:
            asyncio.get_running_loop().call_soon(self._finish, answered)

    def _finish(self, answered: list[_Answered]) -> None:
        for settle, answer, seconds in answered:
            try:
                settled = answer.finish()
            except Exception as exc:  # a bug: the intent stays, and the sweeper journals the event
                _log.error("settle_journal_failed", decision_id=settle.reservation_id, exc_info=exc)
                settled = answer.settlement
            self._settled(settle, settled, seconds)

    def _settled(self, settle: SettleCall, settled: Settlement, seconds: float) -> None:
        self._store_outage.succeeded()  # the store applied (or had applied) the settle
        self._metrics.settled(settle.reservation_id, settled, not settle.provider_ok, seconds)
        if self._activity is not None and not settled.already_settled:
            self._activity.settled(
                settle.tenant, settle.session_id, settled.cost_nano_usd, settled.session_spend_nano_usd
            )

    async def _fail(self, method: str, context: Context, exc: Exception) -> NoReturn:
        code, status = rpc_status(exc)
        self._metrics.failed(method, code.name)
        self._log_failure(method, exc)
        await abort(context, code, status)

    def _log_failure(self, method: str, exc: Exception) -> None:
        """Log a failed call: the store's failures as one outage, bugs each with its traceback.

        Bad input, NOT_FOUND and the like are the caller's, told in the call's status: not logged.
        """
        if isinstance(exc, StoreUnavailable):
            self._store_outage.failed(exc, rpc=method)
        elif not isinstance(exc, SpendgateError):
            _log.error("internal_error", rpc=method, exc_info=exc)


def _settle_response(settled: Settlement) -> pb.SettleResponse:
    return pb.SettleResponse(
        actual_cost_nano_usd=settled.cost_nano_usd,
        session_spend_nano_usd=settled.session_spend_nano_usd,
        already_settled=settled.already_settled,
    )


def _too_many(field: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, f"must hold 1-{MAX_BATCH_SETTLES} settles")])
