"""Composition root: settings → store → engine → servicers → gRPC server (and worker processes)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import multiprocess
from spendgate.v1 import (
    config_pb2,
    config_pb2_grpc,
    decision_pb2,
    decision_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    violation_pb2,
    violation_pb2_grpc,
)

from spendgate_server.alerts import WATCH_RECHECK_SECONDS, build_alerts
from spendgate_server.engine.decide import DecisionEngine, EngineTimings
from spendgate_server.engine.deny_cache import DenyCache
from spendgate_server.engine.insights import SessionActivity
from spendgate_server.engine.pricing import PriceTable
from spendgate_server.engine.quota import SessionQuota
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.errors import ConfigError, StoreUnavailable
from spendgate_server.logging import configure_logging
from spendgate_server.metrics import Metrics, serve_metrics
from spendgate_server.policy.journal import Journal
from spendgate_server.policy.violations import WatchLimits
from spendgate_server.rpc.admission import Admission, AdmissionInterceptor, stream_options
from spendgate_server.rpc.auth import Authenticator, AuthInterceptor, check_exposure, is_loopback
from spendgate_server.rpc.config import ConfigServicer
from spendgate_server.rpc.decision import DecisionServicer
from spendgate_server.rpc.policy import PolicyServicer
from spendgate_server.rpc.session import SessionServicer
from spendgate_server.rpc.status import DecodeErrorInterceptor
from spendgate_server.rpc.violation import ViolationServicer
from spendgate_server.settings import ServeSettings
from spendgate_server.store import Store
from spendgate_server.store.breaker import CircuitBreakerStore
from spendgate_server.store.configs import ConfigStore, MemoryConfigStore
from spendgate_server.store.insights import InsightsStore, MemoryInsightsStore
from spendgate_server.store.instrumented import InstrumentedStore
from spendgate_server.store.keys import FileKeyStore, KeyStore, RedisKeyStore, Scope, install_key
from spendgate_server.store.memory import MemoryStore
from spendgate_server.store.redis import RedisStore
from spendgate_server.store.redis_configs import RedisConfigStore
from spendgate_server.store.redis_insights import RedisInsightsStore
from spendgate_server.store.redis_session_registry import RedisSessionRegistry
from spendgate_server.store.session_registry import MemorySessionRegistry, SessionRegistry

__all__ = ["build_engine", "build_store", "run", "serve"]

_log = structlog.get_logger("spendgate.server")

# Requests are a few hundred bytes; a tight limit makes oversized input cheap to refuse.
MAX_MESSAGE_BYTES = 64 * 1024
SERVICE_NAMES = (
    decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name,
    config_pb2.DESCRIPTOR.services_by_name["ConfigService"].full_name,
    policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
    violation_pb2.DESCRIPTOR.services_by_name["ViolationService"].full_name,
    session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
)
# Reports only that the process is up and serving: for liveness probes, which must not
# restart pods because Redis is down (readiness, on the service names, covers that).
LIVENESS_SERVICE = "spendgate.liveness"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def build_store(settings: ServeSettings) -> Store:
    """The store named by the settings; Redis sits behind a circuit breaker (store/breaker.py)."""
    if settings.store == "redis":
        redis = RedisStore.from_url(
            settings.redis_url,
            timeout_seconds=settings.redis_timeout_millis / 1000,
            pipelined=settings.redis_pipelining == "on",
        )
        if settings.redis_breaker_failures == 0:
            return redis
        return CircuitBreakerStore(
            redis,
            failure_threshold=settings.redis_breaker_failures,
            open_seconds=settings.redis_breaker_open_millis / 1000,
        )
    return MemoryStore()


def build_config_store(settings: ServeSettings) -> ConfigStore:
    """Where remote configs live: Redis when the state does, else this process."""
    if settings.store == "redis":
        return RedisConfigStore.from_url(
            settings.redis_url, timeout_seconds=settings.redis_timeout_millis / 1000
        )
    return MemoryConfigStore()


def build_insights_store(settings: ServeSettings) -> InsightsStore:
    """Where the fleet's session insights are aggregated: Redis when the state is, else here."""
    if settings.store == "redis":
        return RedisInsightsStore.from_url(
            settings.redis_url, timeout_seconds=settings.redis_timeout_millis / 1000
        )
    return MemoryInsightsStore()


def build_keystore(settings: ServeSettings) -> KeyStore | None:
    """Where API keys live: Redis with the redis store, else the --keys-file if given."""
    if settings.store == "redis":
        return RedisKeyStore.from_url(
            settings.redis_url, timeout_seconds=settings.redis_timeout_millis / 1000
        )
    return FileKeyStore(settings.keys_file) if settings.keys_file else None


def _server_credentials(settings: ServeSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    try:
        key, chain = Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes()
        client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise ConfigError(
            f"--tls-cert/--tls-key/--tls-client-ca: cannot read {exc.filename}: {exc.strerror}"
        ) from exc
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def build_prices(settings: ServeSettings, metrics: Metrics | None = None) -> PriceTable:
    """The price table with the settings' overrides and unknown-model policy.

    Whatever has no known price is counted per call in ``metrics`` and logged once per name.
    """

    def unpriced(kind: str, model: str, name: str, first: bool) -> None:
        if metrics is not None:
            metrics.unpriced.labels(kind).inc()
        if first:
            _log.warning(
                "unknown_price",
                kind=kind,
                model=model,
                name=name,
                policy=settings.unknown_model_price.value,
                charged="the never-undercount maximum; add it to prices: in --config",
            )

    return PriceTable(settings.price_overrides, settings.unknown_model_price, unpriced)


def build_engine(
    settings: ServeSettings,
    store: Store,
    prices: PriceTable,
    configs: ConfigResolver,
    journal: Journal | None = None,
) -> DecisionEngine:
    """The engine over ``store``, applying ``configs`` and ``prices``, journaling settles to ``journal``."""
    timings = EngineTimings(
        reservation_ttl_ms=settings.reservation_ttl_seconds * 1000,
        session_ttl_ms=settings.session_ttl_seconds * 1000,
    )
    deny = DenyCache(settings.deny_cache_millis) if settings.deny_cache_millis else None
    quota = build_session_quota(settings)
    return DecisionEngine(
        store, prices, configs, timings=timings, journal=journal, deny_cache=deny, quota=quota
    )


def build_session_quota(settings: ServeSettings) -> SessionQuota | None:
    """The --max-sessions-per-tenant bound, counted where the sessions live (None: no limit)."""
    if not settings.max_sessions_per_tenant:
        return None
    registry: SessionRegistry = (
        RedisSessionRegistry.from_url(
            settings.redis_url, timeout_seconds=settings.redis_timeout_millis / 1000
        )
        if settings.store == "redis"
        else MemorySessionRegistry()
    )
    return SessionQuota(registry, settings.max_sessions_per_tenant, settings.session_ttl_seconds * 1000)


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
        *stream_options(settings.max_in_flight, settings.max_watch_streams_per_tenant),
    ]


class _Health:
    """Health that follows the store: SERVING while it answers, NOT_SERVING while it does not."""

    def __init__(self, servicer: health.aio.HealthServicer, store: Store, metrics: Metrics) -> None:
        self._servicer = servicer
        self._store = store
        self._metrics = metrics
        self._serving: bool | None = None
        self.draining = False

    async def set(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        self._metrics.health_serving.set(1 if serving else 0)
        for name in ("", *SERVICE_NAMES):
            await self._servicer.set(name, _SERVING if serving else _NOT_SERVING)
        _log.info("health", serving=serving)

    async def watch(self, interval_seconds: float) -> None:
        while not self.draining:
            try:
                await self._store.ping()
            except StoreUnavailable as exc:
                if self._serving:
                    _log.warning("store_unreachable", error=str(exc))
                await self.set(False)
            else:
                await self.set(not self.draining)
            await asyncio.sleep(interval_seconds)


async def _install_admin_key(keystore: KeyStore, settings: ServeSettings) -> None:
    """Store the --admin-key-file key unless its id is known (every replica does this at start)."""
    record, added = await install_key(
        keystore,
        settings.admin_key,
        settings.admin_key_tenant,
        Scope.ADMIN,
        "admin-key-file",
        time.time_ns() // 1_000_000,
    )
    log = _log.info if record.active else _log.warning
    log("admin_key", key_id=record.key_id, tenant=record.tenant, added=added, revoked=not record.active)


async def serve(settings: ServeSettings, on_ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain: NOT_SERVING first, stop after the drain period."""
    metrics = Metrics()
    store: Store = InstrumentedStore(build_store(settings), metrics.store_seconds, metrics.store_errors)
    try:
        await store.ping()
    except StoreUnavailable as exc:
        await store.close()
        raise ConfigError(f"--redis-url {settings.redis_url} is unreachable: {exc}") from exc
    if settings.metrics_port and settings.workers == 1:
        serve_metrics(settings.metrics_port, settings.host, metrics.registry)
    prices = build_prices(settings, metrics)
    configs = ConfigResolver(
        build_config_store(settings), settings.default_config, settings.config_poll_millis / 1000
    )
    alerts = build_alerts(settings)
    engine = build_engine(settings, store, prices, configs, alerts.journal)
    config_task = asyncio.create_task(configs.run())
    activity = SessionActivity(build_insights_store(settings))
    activity_task = asyncio.create_task(activity.run())
    # The embedded memory store has no other reader of its journal: evaluate here.
    alerts.start(
        evaluate=settings.evaluator == "on" or (settings.evaluator == "auto" and settings.store == "memory"),
        metrics=metrics,
    )

    credentials = _server_credentials(settings)
    keystore = build_keystore(settings)
    if settings.admin_key and keystore is not None:
        await _install_admin_key(keystore, settings)
    authenticator = Authenticator(
        keystore,
        allow_open_mode=is_loopback(settings.host) or settings.insecure,
        reload_seconds=settings.key_reload_seconds,
        failures=metrics.auth_failures,
    )
    await authenticator.load()
    check_exposure(settings.host, authenticator.has_keys, settings.insecure)
    if authenticator.open_mode:
        _log.warning(
            "open_dev_mode",
            detail="no API keys exist: every caller is admin of tenant 'default'",
            host=settings.host,
        )
    auth_task = asyncio.create_task(authenticator.run())

    # Admission first: a call refused past capacity or past its deadline costs nothing more.
    admission = AdmissionInterceptor(Admission(settings.max_in_flight), metrics)
    interceptors = [admission, AuthInterceptor(authenticator), DecodeErrorInterceptor()]
    server = grpc.aio.server(options=_server_options(settings), interceptors=interceptors)
    decision_pb2_grpc.add_DecisionServiceServicer_to_server(
        DecisionServicer(engine, metrics, activity), server
    )
    config_pb2_grpc.add_ConfigServiceServicer_to_server(ConfigServicer(configs, prices), server)
    session_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(activity.store), server)
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(alerts.policies), server)
    violation_pb2_grpc.add_ViolationServiceServicer_to_server(
        ViolationServicer(
            alerts.feed,
            WATCH_RECHECK_SECONDS,
            WatchLimits(settings.max_watch_streams_per_tenant, settings.max_watch_streams),
        ),
        server,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        address = f"{settings.host}:{settings.port}"
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise ConfigError(f"--port {settings.port}: cannot bind {settings.host}: {exc}") from exc
    await server.start()
    status = _Health(health_servicer, store, metrics)
    await status.set(True)
    await health_servicer.set(LIVENESS_SERVICE, _SERVING)
    watcher = asyncio.create_task(status.watch(settings.health_interval_millis / 1000))
    _log.info(
        "serving",
        host=settings.host,
        port=port,
        store=settings.store,
        metrics_port=settings.metrics_port,
        tls=credentials is not None,
        mtls=bool(settings.tls_client_ca),
        auth=not authenticator.open_mode,
    )
    if on_ready is not None:
        on_ready(port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Load balancers see NOT_SERVING and move traffic away while calls are still answered.
    _log.info("draining", drain_seconds=settings.drain_seconds)
    status.draining = True
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await status.set(False)
    await asyncio.sleep(settings.drain_seconds)
    await server.stop(grace=settings.drain_seconds)
    await alerts.close()
    for task in (config_task, auth_task, activity_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if keystore is not None:
        await keystore.close()
    await configs.store.close()
    await activity.store.close()
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
    """Run the server, in ``settings.workers`` processes sharing the port when above one.

    A worker that dies while the supervisor is not stopping is replaced, so a crashed
    worker does not leave the pod serving with fewer processes than asked for.
    """
    if settings.workers == 1:
        _run_one(settings)
        return
    configure_logging(settings.log_format, settings.log_level)
    # Workers write metrics to files in this directory; this supervisor serves their sum.
    metrics_dir = tempfile.mkdtemp(prefix="spendgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if settings.metrics_port:
        serve_metrics(settings.metrics_port, settings.host, None)
    # spawn, not fork: gRPC's threads must not be forked.
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def start_worker() -> multiprocessing.process.BaseProcess:
        worker = ctx.Process(target=_run_worker, args=(settings,))
        worker.start()
        return worker

    workers = [start_worker() for _ in range(settings.workers)]

    def forward(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = False
    while any(w.is_alive() for w in workers):
        multiprocessing.connection.wait([w.sentinel for w in workers if w.is_alive()], timeout=1.0)
        for index, worker in enumerate(workers):
            if worker.is_alive() or stopping:
                continue
            if worker.exitcode == 2:
                # A configuration error: every replacement would fail the same way.
                stopping, failed = True, True
                forward(signal.SIGTERM, None)
                break
            multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]  # untyped upstream
            _log.warning("worker_died", pid=worker.pid, exitcode=worker.exitcode, action="replaced")
            workers[index] = start_worker()
    if failed or any(w.exitcode not in (0, -signal.SIGTERM) for w in workers):
        sys.exit(1)
