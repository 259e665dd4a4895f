"""The one place where exceptions become gRPC status codes (AIP-193 rich errors)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
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

__all__ = ["DOMAIN", "DecodeErrorInterceptor", "abort", "rpc_status"]

DOMAIN = "spendgate.dev"


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


# The message and the BadRequest both travel in trailers. grpc clients start refusing
# metadata past 8 KiB (the soft limit of grpc.max_metadata_size; some calls between 8 and
# 16 KiB are refused at random), and the BadRequest goes base64-encoded: each is kept
# under this many bytes so that both, encoded, stay well inside 8 KiB.
MAX_ERROR_TEXT_BYTES = 2 * 1024


def _bounded(exc: InvalidArgument) -> InvalidArgument:
    """``exc`` with as many field violations as fit MAX_ERROR_TEXT_BYTES, the rest counted in a last one."""
    kept: list[FieldViolation] = []
    size = 0
    for violation in exc.violations:
        size += len(violation.field.encode()) + len(violation.description.encode()) + 4
        if size > MAX_ERROR_TEXT_BYTES and kept:
            rest = len(exc.violations) - len(kept)
            kept.append(FieldViolation(violation.field, f"... and {rest} more problems (fix these first)"))
            return InvalidArgument(kept)
        kept.append(violation)
    return exc


def rpc_status(exc: BaseException) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The status code and google.rpc.Status (ErrorInfo, plus BadRequest for bad input) of ``exc``.

    Errors we did not raise on purpose become INTERNAL without their text, which may hold secrets.
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


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Answers bytes that are not a valid request message with INVALID_ARGUMENT.

    grpc would otherwise report its own deserialisation failure as UNKNOWN; here the
    handler receives raw bytes and parses them itself.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        # Typed loosely: grpc's stubs describe the sync handler shape, these are aio coroutines.
        handler: Any = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return cast("grpc.RpcMethodHandler[Any, Any] | None", handler)
        parse = handler.request_deserializer

        async def decoded(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return parse(raw)
            except DecodeError:
                violation = FieldViolation("request", "is not a valid protobuf message of the request type")
                await abort(context, *rpc_status(InvalidArgument([violation])))

        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary

            async def unary(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                return await inner(await decoded(raw, context), context)

            return cast(
                "grpc.RpcMethodHandler[Any, Any]",
                handler._replace(unary_unary=unary, request_deserializer=None),
            )
        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream

            async def stream(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                async for item in inner_stream(await decoded(raw, context), context):
                    yield item

            return cast(
                "grpc.RpcMethodHandler[Any, Any]",
                handler._replace(unary_stream=stream, request_deserializer=None),
            )
        return cast("grpc.RpcMethodHandler[Any, Any] | None", handler)
