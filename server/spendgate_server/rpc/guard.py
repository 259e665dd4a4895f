"""Admission, authentication and request parsing, wrapped around each method's handler once, at registration.

grpc.aio runs its server interceptors on every call, through a chain of coroutines (one
Python coroutine per interceptor to find the handler, however the method was
registered), and each of them builds its wrapped handler anew (closures, a copy of the
handler tuple). None of what this module checks needs that: admission, authentication
and parsing depend only on the method and the call, so :class:`Guard` wraps each handler
once, at registration, in one coroutine that does all three, and the server runs with no
interceptor. Per call there is the work itself and one frame more, nothing else
(``python -m bench.levers --levers per_call_guard`` measures the difference).

Order per call: admission (rpc/admission.py; hot-path methods only: a call refused past
capacity, past its deadline or from a standing queue costs no authentication and no
parsing), then authentication (a bad key is refused before its bytes are parsed), then
parsing (bytes that are no request are INVALID_ARGUMENT, not gRPC's UNKNOWN), then the
servicer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, NoReturn, cast

import grpc
from google.protobuf.message import DecodeError

from spendgate_server.errors import FieldViolation, InvalidArgument, SpendgateError
from spendgate_server.metrics import Metrics
from spendgate_server.rpc.admission import HOT_METHODS, Admission, sent_timeout_seconds
from spendgate_server.rpc.auth import Authenticator, AuthError, set_principal
from spendgate_server.rpc.status import abort, rpc_status

__all__ = ["Guard", "GuardedServer"]

Context = grpc.aio.ServicerContext[Any, Any]
Metadata = Sequence[tuple[str, Any]] | None
# Typed loosely: grpc's stubs describe the sync handler shape, these are aio coroutines.
Handler = Any


class Guard:
    """Wraps method handlers with admission, authentication (``authenticator``) and request parsing.

    Args:
        authenticator: who may call what.
        admission: the process's in-flight bound and queue state; None admits every call.
        metrics: where refusals by admission are counted (``rpc_errors`` by method and code).
        admitted: the methods ("/package.Service/Method") admission applies to; unary ones only.
        clock: seconds, monotonic; times calls for admission's service-time average.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        admission: Admission | None = None,
        metrics: Metrics | None = None,
        admitted: Iterable[str] = HOT_METHODS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._auth = authenticator
        self._admission = admission
        self._metrics = metrics
        self._admitted = frozenset(admitted)
        self._clock = clock

    def wrap(self, method: str, handler: Handler) -> Handler:
        """``handler`` of ``method`` ("/package.Service/Method"), admitted, authenticated and parsing
        its request.

        Handlers that stream requests are returned as they are (none of ours does; reflection's,
        which is public, is one).
        """
        if handler is None or (handler.unary_unary is None and handler.unary_stream is None):
            return handler
        authenticate = self._auth.authenticate
        parse: Callable[[bytes], Any] | None = handler.request_deserializer

        def admit(raw: Any, metadata: Metadata) -> Any:
            """The request, parsed, once its caller is known (their principal is set for the servicer).

            Raises:
                AuthError: the caller is not let in.
                InvalidArgument: the bytes are no request of this method.
            """
            set_principal(authenticate(metadata, method))
            if parse is None:
                return raw
            try:
                return parse(raw)
            except DecodeError:
                violation = FieldViolation("request", "is not a valid protobuf message of the request type")
                raise InvalidArgument([violation]) from None

        admission = self._admission
        if handler.unary_unary is not None and admission is not None and method in self._admitted:
            inner_admitted: Handler = handler.unary_unary
            name, metrics, clock = method.rpartition("/")[2], self._metrics, self._clock

            async def refuse(context: Context, why: SpendgateError) -> NoReturn:
                code, status = rpc_status(why)
                if metrics is not None:
                    metrics.failed(name, code.name)
                await abort(context, code, status)

            async def admitted_call(raw: Any, context: Context) -> Any:
                full = admission.full()
                if full is not None:
                    await refuse(context, full)
                # Counted from here until the call ends, however it ends (answered, refused,
                # failed, or cancelled by its client).
                admission.enter()
                started = clock()
                try:
                    # Read once: grpc.aio builds a new tuple on each invocation_metadata() (µs).
                    metadata = cast("Metadata", context.invocation_metadata())
                    remaining = context.time_remaining()
                    sent = None if remaining is None else sent_timeout_seconds(metadata)
                    why = admission.refusal(remaining, sent, started)
                    if why is not None:
                        await refuse(context, why)
                    try:
                        request = admit(raw, metadata)
                    except (AuthError, InvalidArgument) as exc:
                        await _refuse(context, exc)
                    return await inner_admitted(request, context)
                finally:
                    admission.leave(clock() - started)

            return handler._replace(unary_unary=admitted_call, request_deserializer=None)
        if handler.unary_unary is not None:
            inner: Handler = handler.unary_unary

            async def unary(raw: Any, context: Context) -> Any:
                try:
                    request = admit(raw, cast("Metadata", context.invocation_metadata()))
                except (AuthError, InvalidArgument) as exc:
                    await _refuse(context, exc)
                return await inner(request, context)

            return handler._replace(unary_unary=unary, request_deserializer=None)
        inner_stream: Handler = handler.unary_stream

        async def stream(raw: Any, context: Context) -> AsyncIterator[Any]:
            try:
                request = admit(raw, cast("Metadata", context.invocation_metadata()))
            except (AuthError, InvalidArgument) as exc:
                await _refuse(context, exc)
            async for item in inner_stream(request, context):
                yield item

        return handler._replace(unary_stream=stream, request_deserializer=None)


async def _refuse(context: Context, exc: AuthError | InvalidArgument) -> NoReturn:
    if isinstance(exc, AuthError):
        await context.abort(exc.code, str(exc))
    await abort(context, *rpc_status(exc))


class _GuardedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose answers are guarded (looked up per call: none is on the hot path)."""

    def __init__(self, inner: grpc.GenericRpcHandler, guard: Guard) -> None:
        self._inner = inner
        self._guard = guard

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler:
        return self._guard.wrap(handler_call_details.method, self._inner.service(handler_call_details))


class GuardedServer:
    """Registers servicers on a grpc.aio server with every handler guarded.

    Pass it where generated ``add_XServicer_to_server`` functions take a server: they call
    only the two methods below.
    """

    def __init__(self, server: grpc.aio.Server, guard: Guard) -> None:
        self._server = server
        self._guard = guard

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Add ``generic_rpc_handlers``, their handlers guarded."""
        self._server.add_generic_rpc_handlers(
            tuple(_GuardedGeneric(h, self._guard) for h in generic_rpc_handlers)
        )

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Handler]) -> None:
        """Add the handlers of ``service_name``'s methods, guarded."""
        guarded = {
            name: self._guard.wrap(f"/{service_name}/{name}", handler)
            for name, handler in method_handlers.items()
        }
        self._server.add_registered_method_handlers(service_name, guarded)

    def as_server(self) -> grpc.aio.Server:
        """This object, typed as what generated registration functions accept (they call only the above)."""
        return cast("grpc.aio.Server", self)
