"""The one place where exceptions become gRPC status codes (AIP-193 rich errors)."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from spendgate_server.errors import InvalidArgument, NotFound, SpendgateError, StoreUnavailable
from spendgate_server.store.configs import ConfigConflict

__all__ = ["DOMAIN", "abort", "rpc_status"]

DOMAIN = "spendgate.dev"


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rpc_status(exc: BaseException) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The status code and google.rpc.Status (ErrorInfo, plus BadRequest for bad input) of ``exc``.

    Errors we did not raise on purpose become INTERNAL without their text, which may hold secrets.
    """
    details = []
    if isinstance(exc, InvalidArgument):
        code, reason = grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations
        ]
        details.append(_packed(error_details_pb2.BadRequest(field_violations=violations)))
    elif isinstance(exc, ConfigConflict):
        code, reason = grpc.StatusCode.FAILED_PRECONDITION, "ETAG_MISMATCH"
    elif isinstance(exc, NotFound):
        code, reason = grpc.StatusCode.NOT_FOUND, "NOT_FOUND"
    elif isinstance(exc, StoreUnavailable):
        code, reason = grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"
    else:
        code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
    message = str(exc) if isinstance(exc, SpendgateError) else "internal error; see server logs"
    details.insert(0, _packed(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)))
    return code, status_pb2.Status(code=code.value[0], message=message, details=details)


async def abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, status: status_pb2.Status
) -> NoReturn:
    """End the RPC with ``status``; details travel in ``grpc-status-details-bin``."""
    await context.abort(
        code, status.message, trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),)
    )
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
