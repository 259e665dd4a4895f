"""The one place where exceptions become gRPC status codes (AIP-193 rich errors)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from spendgate_server.errors import InvalidArgument, NotFound, SpendgateError, StoreUnavailable

__all__ = ["DOMAIN", "abort", "translate_errors"]

DOMAIN = "spendgate.dev"
_log = structlog.get_logger("spendgate.status")


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, status_pb2.Status]:
    details = []
    if isinstance(exc, InvalidArgument):
        code, reason = grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
        details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in exc.violations
                    ]
                )
            )
        )
    elif isinstance(exc, NotFound):
        code, reason = grpc.StatusCode.NOT_FOUND, "NOT_FOUND"
    elif isinstance(exc, StoreUnavailable):
        code, reason = grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"
    else:
        code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
    message = str(exc) if isinstance(exc, SpendgateError) else "internal error; see server logs"
    details.insert(0, _packed(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)))
    return code, status_pb2.Status(code=code.value[0], message=message, details=details)


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End the RPC with the status for ``exc``, details in ``grpc-status-details-bin``."""
    code, status = _status_for(exc)
    await context.abort(
        code,
        status.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


_R = TypeVar("_R")


def translate_errors(
    method: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[_R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[_R]]:
    """Decorate a servicer method so every exception leaves as a proper gRPC status."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> _R:
        try:
            return await method(self, request, context)
        except SpendgateError as exc:
            if isinstance(exc, StoreUnavailable):
                _log.warning("store_unavailable", rpc=method.__name__, error=str(exc))
            await abort(context, exc)
        except Exception as exc:
            _log.exception("internal_error", rpc=method.__name__)
            await abort(context, exc)

    return wrapper
