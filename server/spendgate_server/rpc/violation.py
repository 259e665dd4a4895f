"""ViolationService servicer: the alerts feed, paged and live."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import structlog
from spendgate.v1 import violation_pb2 as vpb
from spendgate.v1 import violation_pb2_grpc

from spendgate_server.errors import FieldViolation, InvalidArgument, SpendgateError
from spendgate_server.policy.violations import (
    PolicyType,
    Violation,
    ViolationFeed,
    ViolationFilter,
    ViolationHub,
    WatchLimits,
)
from spendgate_server.rpc.alerts_wire import violation_to_proto
from spendgate_server.rpc.auth import current_principal
from spendgate_server.rpc.status import abort, rpc_status
from spendgate_server.rpc.validation import (
    cursor_from_proto,
    filter_ids_from_proto,
    page_size_from_proto,
    time_range_from_proto,
)

__all__ = ["ViolationServicer"]

Context = grpc.aio.ServicerContext[Any, Any]
_log = structlog.get_logger("spendgate.violations")
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
# A page reads at most this many entries, so a filter matching nothing stays cheap.
SCAN_LIMIT = 5000
# Recent violations kept converted for watchers (a message is never changed once built).
RESPONSE_CACHE_SIZE = 4096


def _filter(policy_type: int, session_id: str, project: str) -> ViolationFilter:
    if policy_type and policy_type not in PolicyType._value2member_map_:
        raise InvalidArgument([FieldViolation("policy_type", f"unknown PolicyType value {policy_type}")])
    filter_ids_from_proto(session_id, project)
    return ViolationFilter(PolicyType(policy_type) if policy_type else None, session_id, project)


class ViolationServicer(violation_pb2_grpc.ViolationServiceServicer):
    """Serves spendgate.v1.ViolationService for the caller's tenant.

    Args:
        feed: the alerts feed.
        recheck_seconds: a watcher re-reads the feed at least this often.
        watch_limits: open WatchViolations streams per tenant and per process; every
            stream of a tenant shares one reader of the feed (policy/violations.py).
    """

    def __init__(
        self, feed: ViolationFeed, recheck_seconds: float = 5.0, watch_limits: WatchLimits | None = None
    ) -> None:
        self._feed = feed
        self.hub = ViolationHub(feed, watch_limits, recheck_seconds)
        self._responses: OrderedDict[tuple[str, str], vpb.WatchViolationsResponse] = OrderedDict()

    async def ListViolations(
        self, request: vpb.ListViolationsRequest, context: Context
    ) -> vpb.ListViolationsResponse:
        try:
            size = page_size_from_proto(
                request.page_size, request.page_token, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE
            )
            where = _filter(request.policy_type, request.session_id, request.project)
            since, until = time_range_from_proto(
                request.start_time if request.HasField("start_time") else None,
                request.end_time if request.HasField("end_time") else None,
            )
            found, token = await self._feed.page(
                current_principal().tenant,
                before=request.page_token,
                since_ms=since,
                until_ms=until,
                where=where,
                page_size=size,
                scan_limit=SCAN_LIMIT,
            )
        except Exception as exc:
            await self._fail(context, exc)
        return vpb.ListViolationsResponse(
            violations=[violation_to_proto(v) for v in found], next_page_token=token
        )

    async def WatchViolations(
        self, request: vpb.WatchViolationsRequest, context: Context
    ) -> AsyncIterator[vpb.WatchViolationsResponse]:
        tenant = current_principal().tenant
        try:
            where = _filter(request.policy_type, request.session_id, request.project)
            cursor = cursor_from_proto(request.cursor)
            if cursor == "0":
                cursor = "0-0"
            # Empty: from the newest violation on. Past a limit: RESOURCE_EXHAUSTED.
            watch = self.hub.open(tenant, cursor)
        except Exception as exc:
            await self._fail(context, exc)
        with watch:
            while True:
                try:
                    batch = await watch.next_batch()
                except Exception as exc:
                    await self._fail(context, exc)
                for violation in batch:
                    if where.matches(violation):
                        yield self._response(tenant, violation)

    def _response(self, tenant: str, violation: Violation) -> vpb.WatchViolationsResponse:
        # Every watcher of a tenant sends the same violations: convert each once.
        key = (tenant, violation.cursor)
        response = self._responses.get(key)
        if response is None:
            response = vpb.WatchViolationsResponse(violation=violation_to_proto(violation))
            self._responses[key] = response
            if len(self._responses) > RESPONSE_CACHE_SIZE:
                self._responses.popitem(last=False)
        return response

    async def _fail(self, context: Context, exc: Exception) -> NoReturn:
        code, status = rpc_status(exc)
        if not isinstance(exc, SpendgateError):
            _log.error("internal_error", rpc="ViolationService", exc_info=exc)
        await abort(context, code, status)
