"""Tuning experiments: run ``spendgate serve`` with bench-only changes (levers), never editing server/.

``python -m bench.variants LEVERS serve ...`` applies the comma-separated levers,
then runs the spendgate CLI. Patches are applied at import, so ``--workers``
children (spawned, which re-import this module as ``__mp_main__``) get them too;
the lever names travel to them in SG_BENCH_LEVERS.

Each lever is a monkeypatch standing in for a server change; bench/levers.py
measures each against the unchanged server in the same run.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["LEVERS", "Lever", "apply"]


@dataclass(frozen=True)
class Lever:
    """A change to try: a patch applied before the server starts, and/or extra serve flags."""

    doc: str
    patch: Callable[[], None] | None = None
    flags: tuple[str, ...] = ()


def _no_metrics() -> None:
    from spendgate_server import metrics
    from spendgate_server.store import instrumented

    metrics.Metrics.decided = lambda self, decision, seconds: None  # type: ignore[method-assign]
    metrics.Metrics.settled = lambda self, *args: None  # type: ignore[method-assign]

    async def _timed(self: Any, op: str, call: Callable[[], Any]) -> Any:
        return await call()

    instrumented.InstrumentedStore._timed = _timed  # type: ignore[method-assign]


def _no_auth() -> None:
    from spendgate_server.rpc import auth

    async def intercept_service(self: Any, continuation: Any, details: Any) -> Any:
        return await continuation(details)

    auth.AuthInterceptor.intercept_service = intercept_service  # type: ignore[method-assign,assignment]


def _no_interceptors() -> None:
    import grpc

    original = grpc.aio.server

    def server(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("interceptors", None)
        return original(*args, **kwargs)

    grpc.aio.server = server


@dataclass(frozen=True)
class _Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


def _wrap_once() -> None:
    """No per-call interceptor chain: each method's handler is wrapped by the interceptors once.

    The server's interceptors (auth, decode errors) only depend on the method name, so
    their wrapping is applied when handlers are registered (or first looked up, for
    generic handlers) instead of on every call; behaviour is unchanged.
    """
    import grpc

    original = grpc.aio.server

    def wrap(interceptors: list[Any], method: str, handler: Any) -> Any:
        details = _Details(method, ())
        for interceptor in reversed(interceptors):  # the first interceptor ends up outermost

            async def continuation(_details: Any, handler: Any = handler) -> Any:
                return handler

            coro = interceptor.intercept_service(continuation, details)
            try:
                coro.send(None)
            except StopIteration as done:
                handler = done.value
            else:  # pragma: no cover - an interceptor that suspends cannot be hoisted
                raise RuntimeError(f"{type(interceptor).__name__} suspends in intercept_service")
        return handler

    class Hoisted(grpc.GenericRpcHandler):
        def __init__(self, inner: Any, interceptors: list[Any]) -> None:
            self._inner, self._interceptors = inner, interceptors
            self._cache: dict[str, Any] = {}

        def service(self, details: Any) -> Any:
            method = details.method
            if method not in self._cache:
                handler = self._inner.service(details)
                self._cache[method] = None if handler is None else wrap(self._interceptors, method, handler)
            return self._cache[method]

    def server(*args: Any, **kwargs: Any) -> Any:
        interceptors = list(kwargs.pop("interceptors", None) or ())
        srv: Any = original(*args, **kwargs)
        add_generic, add_registered = srv.add_generic_rpc_handlers, srv.add_registered_method_handlers

        def add_generic_rpc_handlers(handlers: Any) -> None:
            add_generic(tuple(Hoisted(h, interceptors) for h in handlers))

        def add_registered_method_handlers(service: str, handlers: dict[str, Any]) -> None:
            add_registered(
                service, {k: wrap(interceptors, f"/{service}/{k}", h) for k, h in handlers.items()}
            )

        srv.add_generic_rpc_handlers = add_generic_rpc_handlers
        srv.add_registered_method_handlers = add_registered_method_handlers
        return srv

    grpc.aio.server = server


def _memo_interceptors() -> None:
    from spendgate_server.rpc import auth, status

    missing = object()

    def memoized(cls: Any) -> None:
        original = cls.intercept_service

        async def intercept_service(self: Any, continuation: Any, details: Any) -> Any:
            # The wrapped handler depends only on the method: build it once, not per call.
            cache = self.__dict__.setdefault("_bench_memo", {})
            handler = cache.get(details.method, missing)
            if handler is missing:
                handler = cache[details.method] = await original(self, continuation, details)
            return handler

        cls.intercept_service = intercept_service

    memoized(auth.AuthInterceptor)
    memoized(status.DecodeErrorInterceptor)


def _journal_pool() -> None:
    from spendgate_server.store import redis_logs

    original = redis_logs.RedisLogStore.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["hot_path"] = None
        original(self, *args, **kwargs)

    redis_logs.RedisLogStore.__init__ = init  # type: ignore[method-assign]


def _no_group_commit() -> None:
    from spendgate_server.policy import journal

    original = journal.StoreJournal.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["group_commit"] = False
        original(self, *args, **kwargs)

    journal.StoreJournal.__init__ = init  # type: ignore[method-assign]


def _asyncio_loop() -> None:
    import uvloop

    def run(main: Any, **_kwargs: Any) -> Any:
        return asyncio.run(main)

    uvloop.run = run


def _server_option(name: str, value: int | str) -> Callable[[], None]:
    def patch() -> None:
        from spendgate_server import app

        original = app._server_options

        def options(settings: Any) -> list[tuple[str, Any]]:
            return [*original(settings), (name, value)]

        app._server_options = options

    return patch


LEVERS: dict[str, Lever] = {
    # The pipelined hot path (store/pipeline.py) and the deny cache began here as bench-only
    # patches and are now the server's defaults; these levers measure what each buys.
    "redis_pool": Lever(
        "hot-path scripts through redis-py's pool instead of the pipelined connection",
        flags=("--redis-pipelining", "off"),
    ),
    "no_metrics": Lever(
        "cost of Prometheus metrics: Metrics.decided/settled and store timing off", _no_metrics
    ),
    "no_breaker": Lever(
        "cost of the circuit-breaker layer: --redis-breaker-failures 0",
        flags=("--redis-breaker-failures", "0"),
    ),
    "no_auth": Lever("cost of the auth interceptor (key check per call) — for scale only", _no_auth),
    "no_interceptors": Lever(
        "cost of gRPC server interceptors per call (auth and decode-error ones removed) — for scale only",
        _no_interceptors,
    ),
    "memo_interceptors": Lever(
        "interceptors build each method's wrapped handler once (cached by method), not per call",
        _memo_interceptors,
    ),
    "no_deny_cache": Lever(
        "no local deny cache: every call of a session out of budget asks the store",
        flags=("--deny-cache-millis", "0"),
    ),
    "wrap_once": Lever(
        "auth and decode-error wrapping applied once per method at registration, no per-call interceptors",
        _wrap_once,
    ),
    "asyncio_loop": Lever("the default asyncio loop instead of uvloop (what uvloop buys)", _asyncio_loop),
    "opt_latency": Lever(
        "server channel arg grpc.optimization_target=latency",
        _server_option("grpc.optimization_target", "latency"),
    ),
    "journal_pool": Lever(
        "journal appends through redis-py's pool instead of the pipelined hot-path connection",
        _journal_pool,
    ),
    "awaited_journal": Lever(
        "each Settle awaits its journal append (no intent written with the settle script)",
        flags=("--journal-intent-grace-seconds", "0"),
    ),
    "no_group_commit": Lever(
        "one journal append per settle (no group commit of the appends of one event-loop turn)",
        _no_group_commit,
    ),
    "max_streams_64": Lever(
        "server channel arg grpc.max_concurrent_streams=64: a connection's excess calls wait in the client",
        _server_option("grpc.max_concurrent_streams", 64),
    ),
    "max_streams_256": Lever(
        "server channel arg grpc.max_concurrent_streams=256",
        _server_option("grpc.max_concurrent_streams", 256),
    ),
    "opt_throughput": Lever(
        "server channel arg grpc.optimization_target=throughput",
        _server_option("grpc.optimization_target", "throughput"),
    ),
}


def apply(names: str) -> list[str]:
    """Apply the named levers (comma-separated; "" or "baseline" is none); return their extra flags."""
    flags: list[str] = []
    for name in [n.strip() for n in names.split(",") if n.strip() and n.strip() != "baseline"]:
        if name not in LEVERS:
            raise SystemExit(f"bench.variants: unknown lever {name!r}; known: {', '.join(sorted(LEVERS))}")
        lever = LEVERS[name]
        if lever.patch is not None:
            lever.patch()
        flags.extend(lever.flags)
    return flags


if __name__ == "__main__":
    os.environ["SG_BENCH_LEVERS"] = sys.argv[1]
    extra = apply(sys.argv[1])
    from spendgate_server.cli import main

    main([*sys.argv[2:], *extra])
elif __name__ == "__mp_main__":  # a --workers child re-importing the parent's main module
    apply(os.environ.get("SG_BENCH_LEVERS", ""))
