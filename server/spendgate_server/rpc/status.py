"""The one place where exceptions become gRPC status codes (AIP-193 rich errors)."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from spendgate_server.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SpendgateError,
    StoreUnavailable,
)
from spendgate_server.store.configs import ConfigConflict

__all__ = ["DOMAIN", "abort", "rpc_status"]

DOMAIN = "spendgate.dev"
# The message travels in a trailer, and again inside the Status with the BadRequest in
# another (base64: 4/3 of its size). grpc clients refuse received metadata past a soft
# limit of 8 KiB at random (more often the larger it is) and always past 16 KiB, so an
# error stays near 5 KiB at most: the violations' text, and so the message, fit
# MAX_ERROR_TEXT_BYTES, and no single field or description can take it all.
MAX_ERROR_TEXT_BYTES = 1024
MAX_FIELD_CHARS = 128
MAX_DESCRIPTION_CHARS = 384


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _bounded(exc: InvalidArgument) -> InvalidArgument:
    """``exc`` with as many (clipped) violations as fit MAX_ERROR_TEXT_BYTES; a last one counts the rest."""
    kept: list[FieldViolation] = []
    size = 0
    for violation in exc.violations:
        field = _clip(violation.field, MAX_FIELD_CHARS)
        description = _clip(violation.description, MAX_DESCRIPTION_CHARS)
        size += len(field.encode()) + len(description.encode()) + 4
        if size > MAX_ERROR_TEXT_BYTES and kept:
            rest = len(exc.violations) - len(kept)
            kept.append(FieldViolation(field, f"... and {rest} more problems (fix these first)"))
            return InvalidArgument(kept)
        kept.append(FieldViolation(field, description))
    return InvalidArgument(kept)


def rpc_status(exc: BaseException) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The status code and google.rpc.Status (ErrorInfo, plus BadRequest for bad input) of ``exc``.

    Errors we did not raise on purpose become INTERNAL without their text, which may hold secrets.
    The text is bounded (see MAX_ERROR_TEXT_BYTES), so an error stays a few KiB whatever the
    request held.
    """
    details = []
    if isinstance(exc, InvalidArgument):
        code, reason = grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
        exc = _bounded(exc)
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations
        ]
        details.append(_packed(error_details_pb2.BadRequest(field_violations=violations)))
    elif isinstance(exc, ConfigConflict):
        code, reason = grpc.StatusCode.FAILED_PRECONDITION, "ETAG_MISMATCH"
    elif isinstance(exc, NotFound):
        code, reason = grpc.StatusCode.NOT_FOUND, "NOT_FOUND"
    elif isinstance(exc, ResourceExhausted):
        code, reason = grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED"
        quota = error_details_pb2.QuotaFailure.Violation(subject=exc.quota, description=str(exc))
        details.append(_packed(error_details_pb2.QuotaFailure(violations=[quota])))
    elif isinstance(exc, DeadlineExceeded):
        code, reason = grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"
    elif isinstance(exc, StoreUnavailable):
        code, reason = grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"
    else:
        code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
    message = str(exc) if isinstance(exc, SpendgateError) else "internal error; see server logs"
    if not isinstance(exc, InvalidArgument):  # that one is bounded above, its count kept at the end
        message = _clip(message, MAX_ERROR_TEXT_BYTES)
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
