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

    async def _timed(self: Any, children: Any, call: Any) -> Any:
        return await call

    instrumented.InstrumentedStore._timed = _timed  # type: ignore[method-assign]


def _no_auth() -> None:
    from spendgate_server.rpc import auth

    def authenticate(self: Any, metadata: Any, method: str) -> auth.Principal:
        return auth.DEV_PRINCIPAL

    auth.Authenticator.authenticate = authenticate  # type: ignore[method-assign]


def _per_call_guard() -> None:
    """Admission, authentication and parsing applied on every call by a gRPC server interceptor.

    The handlers are registered unwrapped and one interceptor wraps the handler of each
    call with the server's Guard. The server ran so, in two interceptors, before rpc/guard.py
    wrapped authentication and parsing once, and admission alone stayed an interceptor until
    it joined that wrapping: this lever costs about what that interceptor did.
    """
    import grpc
    from spendgate_server.rpc import guard

    guards: list[Any] = []

    class PerCallGuard(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            return guards[0].wrap(details.method, await continuation(details))

    class Unguarded:
        def wrap(self, method: str, handler: Any) -> Any:
            return handler

    original_server, original_init = grpc.aio.server, guard.GuardedServer.__init__

    def server(*args: Any, **kwargs: Any) -> Any:
        kwargs["interceptors"] = [*(kwargs.get("interceptors") or ()), PerCallGuard()]
        return original_server(*args, **kwargs)

    def init(self: Any, srv: Any, server_guard: Any) -> None:
        guards.append(server_guard)
        original_init(self, srv, Unguarded())  # type: ignore[arg-type]

    grpc.aio.server = server
    guard.GuardedServer.__init__ = init  # type: ignore[method-assign,assignment]


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
    "no_auth": Lever(
        "cost of the key check per call (every caller is the dev principal) — for scale only", _no_auth
    ),
    "per_call_guard": Lever(
        "admission, auth and parsing wrapped per call by a server interceptor, not once at "
        "registration (rpc/guard.py)",
        _per_call_guard,
    ),
    "no_deny_cache": Lever(
        "no local deny cache: every call of a session out of budget asks the store",
        flags=("--deny-cache-millis", "0"),
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
