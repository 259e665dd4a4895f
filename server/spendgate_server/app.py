"""Composition root: settings → store → engine → servicers → gRPC server (and worker processes)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from spendgate.v1 import decision_pb2, decision_pb2_grpc

from spendgate_server.engine import DecisionEngine, EngineTimings
from spendgate_server.errors import ConfigError, StoreUnavailable
from spendgate_server.logging import configure_logging
from spendgate_server.pricing import PriceTable
from spendgate_server.servicer import DecisionServicer
from spendgate_server.settings import ServeSettings
from spendgate_server.store import Store
from spendgate_server.store.memory import MemoryStore
from spendgate_server.store.redis import RedisStore

__all__ = ["build_engine", "build_store", "run", "serve"]

_log = structlog.get_logger("spendgate.server")

# Requests are a few hundred bytes; a tight limit makes oversized input cheap to refuse.
MAX_MESSAGE_BYTES = 64 * 1024


def build_store(settings: ServeSettings) -> Store:
    """The store named by the settings."""
    if settings.store == "redis":
        return RedisStore.from_url(settings.redis_url, timeout_seconds=settings.redis_timeout_millis / 1000)
    return MemoryStore()


def build_engine(settings: ServeSettings, store: Store) -> DecisionEngine:
    """The engine over ``store`` with the settings' default config and prices."""
    prices = PriceTable(
        settings.price_overrides,
        settings.unknown_model_price,
        on_unknown=lambda model: _log.warning(
            "unknown_model_price", model=model, policy=settings.unknown_model_price.value
        ),
    )
    timings = EngineTimings(
        reservation_ttl_ms=settings.reservation_ttl_seconds * 1000,
        session_ttl_ms=settings.session_ttl_seconds * 1000,
    )
    return DecisionEngine(store, prices, settings.default_config, timings=timings)


def _server_options(settings: ServeSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Workers share the port; a lone server must fail loudly if the port is taken.
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        # Long-lived HTTP/2 connections are recycled so clients rebalance after a scale-up.
        ("grpc.max_connection_age_ms", 5 * 60 * 1000),
        ("grpc.max_connection_age_grace_ms", 30 * 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


async def serve(settings: ServeSettings, on_ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain: NOT_SERVING first, stop after the drain period."""
    store = build_store(settings)
    try:
        await store.ping()
    except StoreUnavailable as exc:
        await store.close()
        raise ConfigError(f"--redis-url {settings.redis_url} is unreachable: {exc}") from exc
    engine = build_engine(settings, store)

    server = grpc.aio.server(options=_server_options(settings))
    decision_pb2_grpc.add_DecisionServiceServicer_to_server(DecisionServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = [decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name]
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    except RuntimeError as exc:
        raise ConfigError(f"--port {settings.port}: cannot bind {settings.host}: {exc}") from exc
    await server.start()
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _log.info("serving", host=settings.host, port=port, store=settings.store)
    if on_ready is not None:
        on_ready(port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    _log.info("draining", drain_seconds=settings.drain_seconds)
    await health_servicer.enter_graceful_shutdown()
    await asyncio.sleep(settings.drain_seconds)
    await server.stop(grace=settings.drain_seconds)
    await store.close()
    _log.info("stopped")


def _run_one(settings: ServeSettings) -> None:
    configure_logging(settings.log_format, settings.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(serve(settings))
    else:
        # uvloop measured ~8% more closed-loop throughput than asyncio's loop (make bench).
        uvloop.run(serve(settings))


def _run_worker(settings: ServeSettings) -> None:
    try:
        _run_one(settings)
    except ConfigError as exc:
        print(f"spendgate: {exc}", file=sys.stderr)
        sys.exit(2)


def run(settings: ServeSettings) -> None:
    """Run the server, in ``settings.workers`` processes sharing the port when above one."""
    if settings.workers == 1:
        _run_one(settings)
        return
    # spawn, not fork: gRPC's threads must not be forked.
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=_run_worker, args=(settings,), daemon=False) for _ in range(settings.workers)
    ]
    for worker in workers:
        worker.start()

    def forward(_signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.join()
    failed = [w.exitcode for w in workers if w.exitcode not in (0, None)]
    if failed:
        sys.exit(1)
