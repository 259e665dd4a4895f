"""Admission control: past capacity a call is answered at once, never left to queue.

A server past its capacity used to take every call and share its CPU among all of
them: each waited longer and longer, and all of them missed their deadlines together
(``make bench``: at 1.5x its capacity goodput fell to 0.1-0.45x, every refusal a client
timeout at 250 ms). Three bounds now apply:

* **calls in flight** (``--max-in-flight``, per process): a call of the hot path
  (Decide, Settle, SettleBatch) is counted from the moment the server takes it up until
  its task ends, however it ends; past the bound the answer is RESOURCE_EXHAUSTED at once,
  naming the flag, before authentication or parsing. This is what a slow store meets:
  calls waiting on it pile up here, not in memory.
* **the deadline**: a call taken up with no more of its deadline left than calls take
  these days (a moving average of recent ones) is answered DEADLINE_EXCEEDED at once,
  saying so: its answer could not reach the client in time, so no work is started.
* **streams per connection** (:func:`stream_options`): a call waits in gRPC's core,
  where no Python code sees it, until the event loop takes it up; a CPU-bound server
  takes calls up about as fast as it finishes them, so its calls in flight stay few
  while that hidden queue grows. HTTP/2's stream limit bounds it per connection, and
  gRPC refuses the streams past it at once (UNAVAILABLE for the client).

Either way the client's fail mode applies within a round trip. The in-flight bound is
derived from measured capacity: a worker answers about C calls a second (``make bench``,
closed loop), so N calls in flight wait about N / C; N = 64 at the ~3,000 calls/s one
worker measured keeps that near 20 ms, far inside the clients' 250 ms deadline, while
32 callers already saturate the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import grpc

from spendgate_server.errors import DeadlineExceeded, ResourceExhausted, SpendgateError
from spendgate_server.metrics import Metrics
from spendgate_server.rpc.status import abort, rpc_status

__all__ = ["HOT_METHODS", "Admission", "AdmissionInterceptor", "stream_options"]

HOT_METHODS = frozenset(
    f"/spendgate.v1.DecisionService/{name}" for name in ("Decide", "Settle", "SettleBatch")
)
# Weight of the newest call in the moving average of service times.
_SMOOTHING = 0.05


def stream_options(max_in_flight: int, max_watch_streams_per_tenant: int) -> list[tuple[str, int]]:
    """gRPC server options bounding the calls one connection may have open at once.

    A call waits in gRPC's core, where no Python code sees it, until the server's event
    loop takes it up; past capacity that hidden queue, not the calls in flight, is what
    grows (``make bench``: calls in flight stayed under 16 while admitted calls waited
    200 ms). HTTP/2's ``SETTINGS_MAX_CONCURRENT_STREAMS`` bounds it per connection: gRPC
    refuses the streams past it at once (RST_STREAM REFUSED_STREAM, which a client sees as
    UNAVAILABLE). The bound leaves room for the watch streams a tenant may hold open on
    the same connection beside ``max_in_flight`` calls. Nothing when ``max_in_flight`` is 0.
    """
    if not max_in_flight:
        return []
    return [("grpc.max_concurrent_streams", max_in_flight + max_watch_streams_per_tenant)]


class Admission:
    """The in-flight bound and the recent service time of one process.

    Args:
        max_in_flight: calls served at once before the next is refused (0: no bound).
        initial_service_seconds: the service time assumed before any call was timed.
    """

    def __init__(self, max_in_flight: int, initial_service_seconds: float = 0.0) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.service_seconds = initial_service_seconds

    def late(self, remaining_seconds: float | None) -> DeadlineExceeded | None:
        """Why a call with ``remaining_seconds`` of its deadline left (None: it has none) cannot
        be answered in time, or None when it can."""
        if remaining_seconds is None or remaining_seconds > self.service_seconds:
            return None
        if remaining_seconds <= 0:
            return DeadlineExceeded(
                "deadline exceeded before the server took the call up: it waited in the "
                "server's queue past its deadline (the server is overloaded)"
            )
        return DeadlineExceeded(
            f"deadline too close to answer in time: {remaining_seconds * 1000:.1f} ms left, "
            f"calls take about {self.service_seconds * 1000:.1f} ms here now"
        )

    def full(self) -> ResourceExhausted | None:
        """Why one more call cannot be taken now (``max_in_flight`` are), or None when it can."""
        if not self.max_in_flight or self.in_flight < self.max_in_flight:
            return None
        return ResourceExhausted(
            "max_in_flight",
            f"server at capacity: {self.in_flight} calls in flight (--max-in-flight "
            f"{self.max_in_flight}); try another server, or let the client's fail mode decide",
        )

    def enter(self) -> None:
        """A call was taken up."""
        self.in_flight += 1

    def leave(self, seconds: float) -> None:
        """A call taken up ``seconds`` ago has ended (answered, refused, failed or cancelled)."""
        self.in_flight -= 1
        self.service_seconds += _SMOOTHING * (seconds - self.service_seconds)


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls of ``methods`` past the deadline or past capacity (see the module docstring).

    Put it first among the interceptors: the wrapping it adds then runs before any other,
    so a refused call costs no authentication and no parsing.
    """

    def __init__(
        self,
        admission: Admission,
        metrics: Metrics | None = None,
        methods: Iterable[str] = HOT_METHODS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._admission = admission
        self._metrics = metrics
        self._methods = frozenset(methods)
        self._clock = clock

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        # Typed loosely: grpc's stubs describe the sync handler shape, these are aio coroutines.
        handler: Any = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or handler.unary_unary is None or method not in self._methods:
            return cast("grpc.RpcMethodHandler[Any, Any] | None", handler)
        admission, metrics = self._admission, self._metrics
        name = method.rpartition("/")[2]

        async def refuse(context: grpc.aio.ServicerContext[Any, Any], why: SpendgateError) -> None:
            code, status = rpc_status(why)
            if metrics is not None:
                metrics.failed(name, code.name)
            await abort(context, code, status)

        full = admission.full()
        if full is not None:

            async def refused(_raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await refuse(context, full)

            # The request is never parsed: a refusal costs as little as gRPC allows.
            return cast(
                "grpc.RpcMethodHandler[Any, Any]",
                handler._replace(unary_unary=refused, request_deserializer=None),
            )
        # Counted from here, where the call is taken up, until its task ends however it ends
        # (a call the client cancels before its handler runs must not stay counted).
        admission.enter()
        task = asyncio.current_task()
        clock = self._clock
        started = clock()
        if task is None:  # pragma: no cover - grpc.aio always runs interceptors in the call's task
            admission.leave(0.0)
        else:
            task.add_done_callback(lambda _task: admission.leave(clock() - started))
        inner: Any = handler.unary_unary

        async def admitted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            late = admission.late(context.time_remaining())
            if late is not None:
                await refuse(context, late)
            return await inner(request, context)

        return cast("grpc.RpcMethodHandler[Any, Any]", handler._replace(unary_unary=admitted))
