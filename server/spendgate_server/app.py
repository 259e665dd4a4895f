"""Composition root of ``spendgate serve``: settings → stores (stores.py) → engine → servicers →
gRPC server (and its ``--workers`` processes)."""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
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

from spendgate_server.alerts import WATCH_RECHECK_SECONDS, Alerts, build_alerts
from spendgate_server.engine.anomalies import AnomalyThresholds
from spendgate_server.engine.decide import DecisionEngine, EngineTimings, system_clock_ms
from spendgate_server.engine.deny_cache import DenyCache
from spendgate_server.engine.insights import SessionActivity
from spendgate_server.engine.pricing import PriceTable
from spendgate_server.engine.quota import SessionQuota
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.errors import ConfigError, StoreUnavailable
from spendgate_server.lifecycle import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    UNWIND_SECONDS,
    Stopped,
    arm_exit_deadline,
    parent_gone,
    report_once,
    run_part,
    run_process,
    set_reporter,
    watch_thread,
)
from spendgate_server.logging import configure_logging
from spendgate_server.metrics import Metrics, serve_metrics
from spendgate_server.policy.journal import Journal
from spendgate_server.policy.journal_sweeper import JournalSweeper
from spendgate_server.policy.violations import WatchLimits
from spendgate_server.rpc.admission import Admission, stream_options
from spendgate_server.rpc.auth import Authenticator, check_exposure, is_loopback
from spendgate_server.rpc.config import ConfigServicer
from spendgate_server.rpc.decision import DecisionServicer
from spendgate_server.rpc.guard import Guard, GuardedServer
from spendgate_server.rpc.policy import PolicyServicer
from spendgate_server.rpc.session import SessionServicer
from spendgate_server.rpc.violation import ViolationServicer
from spendgate_server.settings import ServeSettings
from spendgate_server.store import Store
from spendgate_server.store.instrumented import InstrumentedStore
from spendgate_server.store.keys import KeyStore, Scope, install_key
from spendgate_server.stores import Stores, check_reachable, open_stores
from spendgate_server.worker import run_evaluation_child

__all__ = ["build_engine", "run", "serve"]

_log = structlog.get_logger("spendgate.server")

# Requests are a few hundred bytes; a tight limit makes oversized input cheap to refuse.
MAX_MESSAGE_BYTES = 64 * 1024
# A TLS handshake takes milliseconds; a client still in it after this long is not coming.
_HANDSHAKE_TIMEOUT_MS = 10_000
# How long a pinged connection may take to answer before it is closed as dead.
_KEEPALIVE_TIMEOUT_MS = 20_000
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
    quota: SessionQuota | None = None,
) -> DecisionEngine:
    """The engine over ``store``, applying ``configs`` and ``prices``, journaling settles to ``journal``,
    bounding each tenant's live sessions with ``quota``."""
    timings = EngineTimings(
        reservation_ttl_ms=settings.reservation_ttl_seconds * 1000,
        session_ttl_ms=settings.session_ttl_seconds * 1000,
    )
    deny = DenyCache(settings.deny_cache_millis) if settings.deny_cache_millis else None
    anomalies = AnomalyThresholds(late_error_ms=settings.settle_error_flag_seconds * 1000)
    return DecisionEngine(
        store,
        prices,
        configs,
        timings=timings,
        journal=journal,
        deny_cache=deny,
        quota=quota,
        anomaly_thresholds=anomalies,
    )


def build_session_quota(settings: ServeSettings, stores: Stores) -> SessionQuota | None:
    """The --max-sessions-per-tenant bound, counted where the sessions live (None: no limit)."""
    if not settings.max_sessions_per_tenant:
        return None
    return SessionQuota(
        stores.session_registry, settings.max_sessions_per_tenant, settings.session_ttl_seconds * 1000
    )


def _check_bindable(settings: ServeSettings) -> None:
    """Refuse a ``--host`` or a taken ``--port`` in our words, before gRPC core logs its own lines.

    The probe binds as the server will (SO_REUSEADDR, and SO_REUSEPORT when workers share
    the port), so a port only in TIME_WAIT, or shared by this server's workers, is free.
    It runs before the exposure check, so a host that cannot be bound (not an address, or
    not one of this machine's) is refused as such, not as "reachable from the network".

    Raises:
        ConfigError: naming --host or --port and the reason.
    """
    host = settings.host
    if host.startswith("[") != host.endswith("]") or host.count("[") + host.count("]") not in (0, 2):
        raise ConfigError(
            f"--host {host}: cannot bind: brackets must enclose a whole IPv6 address ([::1]), or be left out"
        )
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]"), settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"--host {settings.host}: cannot bind: not an IP address or a name this machine resolves ({why})"
        ) from exc
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if settings.workers > 1:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise ConfigError(
                        f"--host {settings.host}: cannot bind: {exc.strerror} (not an address of this host)"
                    ) from exc
                raise ConfigError(
                    f"--port {settings.port}: cannot bind {settings.host}: {exc.strerror}"
                ) from exc


def _server_options(settings: ServeSettings) -> list[tuple[str, int]]:
    options = [
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
    idle_ms = round(settings.connection_idle_seconds * 1000)
    if idle_ms:
        # A connection with no call in flight is closed (GOAWAY, then close): idle clients cannot
        # hold sockets and memory for ever. It also reaps a TCP connection that never speaks.
        options.append(("grpc.max_connection_idle_ms", idle_ms))
        # ...and, on TLS, one that never finishes its handshake (gRPC's default waits 120 s).
        options.append(("grpc.server_handshake_timeout_ms", min(idle_ms, _HANDSHAKE_TIMEOUT_MS)))
    keepalive_ms = round(settings.keepalive_seconds * 1000)
    if keepalive_ms:
        # Pings find peers that vanished without closing (a host gone, a dropped NAT entry),
        # including those holding a WatchViolations stream, which never counts as idle.
        options += [
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
            # Keep pinging a quiet stream (gRPC stops after 2 pings without data by default).
            ("grpc.http2.max_pings_without_data", 0),
        ]
    return options


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


async def _grpc_server(server: grpc.aio.Server, status: _Health) -> None:
    # Shielded: cancelling wait_for_termination would cancel the future server.stop() awaits.
    await asyncio.shield(asyncio.ensure_future(server.wait_for_termination()))
    if not status.draining:
        raise RuntimeError("it stopped while the process was not draining")


async def _until_stopped(
    stop: asyncio.Event, settings: ServeSettings, status: _Health, server: grpc.aio.Server, alerts: Alerts
) -> None:
    """On SIGTERM/SIGINT: NOT_SERVING, keep answering for the drain period, stop; then end the group."""
    await stop.wait()
    # Load balancers see NOT_SERVING and move traffic away while calls are still answered.
    _log.info("draining", drain_seconds=settings.drain_seconds)
    status.draining = True
    await status.set(False)
    await asyncio.sleep(settings.drain_seconds)
    await server.stop(grace=settings.drain_seconds)
    # Settles answered before their journal append: their appends end before the process does.
    await alerts.journal.drain()
    await alerts.stop()
    raise Stopped


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
    """Serve until SIGTERM/SIGINT, then drain: NOT_SERVING first, stop after the drain period.

    Every long-lived part runs in one task group (lifecycle.py): the first to fail ends
    the process with its reason.

    Raises:
        ConfigError: the process cannot start as configured (Redis unreachable, a file
            unreadable, the port taken, no API keys on a public address).
        BaseExceptionGroup: of the :class:`~spendgate_server.lifecycle.PartFailed` that ended it.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A --workers worker drains when its supervisor dies, even by SIGKILL: the port lock died
    # with it, so a worker left serving could share the port with a new supervisor's workers.
    parent_gone(stop.set)
    stores = open_stores(settings, role="serve")
    try:
        await _serve(settings, stores, stop, on_ready)
    finally:
        await stores.aclose()
    _log.info("stopped")


async def _serve(
    settings: ServeSettings, stores: Stores, stop: asyncio.Event, on_ready: Callable[[int], None] | None
) -> None:
    metrics = Metrics()
    store: Store = InstrumentedStore(stores.sessions, metrics.store_seconds, metrics.store_errors)
    # What can be refused is checked before any part starts, so a refusal leaves nothing running.
    await check_reachable(stores, settings)
    credentials = _server_credentials(settings)
    if settings.admin_key and stores.keys is not None:
        await _install_admin_key(stores.keys, settings)
    authenticator = Authenticator(
        stores.keys,
        allow_open_mode=is_loopback(settings.host) or settings.insecure,
        reload_seconds=settings.key_reload_seconds,
        failures=metrics.auth_failures,
        keys_missing=metrics.auth_keys_missing,
    )
    _check_bindable(settings)
    # The first load decides, once, whether this server runs open (rpc/auth.py).
    await authenticator.load()
    check_exposure(settings.host, authenticator.has_keys, settings.insecure)
    if authenticator.open_mode:
        _log.warning(
            "open_dev_mode",
            detail="no API keys exist: every caller is admin of tenant 'default'",
            host=settings.host,
        )
    prices = build_prices(settings, metrics)
    configs = ConfigResolver(stores.configs, settings.default_config, settings.config_poll_millis / 1000)
    alerts = build_alerts(settings, stores)
    engine = build_engine(
        settings, store, prices, configs, alerts.journal, build_session_quota(settings, stores)
    )
    activity = SessionActivity(stores.insights)

    # Admission, authentication and parsing wrap each handler once, at registration, admission
    # first: a call refused past capacity or past its deadline costs nothing more (rpc/guard.py).
    admission = Admission(settings.max_in_flight, queue_target_percent=settings.queue_target_percent)
    server = grpc.aio.server(options=_server_options(settings))
    guarded = GuardedServer(server, Guard(authenticator, admission, metrics)).as_server()
    decision_pb2_grpc.add_DecisionServiceServicer_to_server(
        DecisionServicer(engine, metrics, activity), guarded
    )
    config_pb2_grpc.add_ConfigServiceServicer_to_server(ConfigServicer(configs, prices), guarded)
    session_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(activity.store), guarded)
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(alerts.policies), guarded)
    violation_pb2_grpc.add_ViolationServiceServicer_to_server(
        ViolationServicer(
            alerts.feed,
            WATCH_RECHECK_SECONDS,
            WatchLimits(settings.max_watch_streams_per_tenant, settings.max_watch_streams),
        ),
        guarded,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, guarded)
    # As reflection.enable_server_reflection does, on the guarded registrar (not a grpc.aio.Server).
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer([*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME]),
        guarded,
    )
    try:
        address = f"{_bracketed(settings.host)}:{settings.port}"
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise ConfigError(f"--port {settings.port}: cannot bind {settings.host}: {exc}") from exc
    metrics_thread = None
    if settings.metrics_port and settings.workers == 1:
        metrics_thread = serve_metrics(
            settings.metrics_port,
            settings.host,
            metrics.registry,
            required=settings.metrics_port_named,
        )
    await server.start()
    try:
        status = _Health(health_servicer, store, metrics)
        await status.set(True)
        await health_servicer.set(LIVENESS_SERVICE, _SERVING)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(run_part("the gRPC server", _grpc_server(server, status)))
                group.create_task(run_part("the config watcher", configs.run(), returns=False))
                group.create_task(run_part("the key check", authenticator.run(), returns=False))
                group.create_task(run_part("the session insights", activity.run(), returns=False))
                group.create_task(
                    run_part("the health check", status.watch(settings.health_interval_millis / 1000))
                )
                if metrics_thread is not None:
                    group.create_task(
                        run_part("the metrics endpoint", watch_thread(metrics_thread), returns=False)
                    )
                # Redis: the evaluator runs in a child process (worker.py); the memory store's
                # journal lives in this process, so it is evaluated here.
                alerts.start(
                    group,
                    evaluate=settings.evaluator == "on",
                    metrics=metrics,
                    child=run_evaluation_child if settings.store == "redis" else None,
                )
                if settings.journal_intent_grace_seconds:
                    sweeper = JournalSweeper(
                        alerts.journal,
                        engine,
                        grace_ms=settings.journal_intent_grace_seconds * 1000,
                        interval_seconds=max(1.0, settings.journal_intent_grace_seconds / 2),
                        clock=system_clock_ms,
                    )
                    group.create_task(run_part("the journal sweeper", sweeper.run(), returns=False))
                _log.info(
                    "serving",
                    host=settings.host,
                    port=port,
                    store=settings.store,
                    # What is served: 0 when metrics are off (the default port taken, or none asked).
                    # With --workers the supervisor serves them and reports a taken port itself.
                    metrics_port=settings.metrics_port if metrics_thread or settings.workers > 1 else 0,
                    tls=credentials is not None,
                    mtls=bool(settings.tls_client_ca),
                    auth=not authenticator.open_mode,
                )
                if on_ready is not None:
                    on_ready(port)
                group.create_task(_until_stopped(stop, settings, status, server, alerts))
        except* Stopped:
            pass
    finally:
        # Already stopped after a drain; after a failure, stop at once.
        await server.stop(grace=None)


def _bracketed(host: str) -> str:
    """``host`` as a gRPC address wants it: an IPv6 literal in brackets (``::1`` -> ``[::1]``)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _run_worker(settings: ServeSettings, reasons: multiprocessing.connection.Connection) -> None:
    """A ``--workers`` child: its fatal reason goes to the supervisor, which reports it once."""
    configure_logging(settings.log_format, settings.log_level)
    set_reporter(lambda code, line: reasons.send((code, line)))
    sys.exit(run_process(lambda: serve(settings)))


def run(settings: ServeSettings) -> int:
    """Run the server, in ``settings.workers`` processes sharing the port when above one.

    Returns the exit code (lifecycle.py): 0 after a drain, 1 when a part failed, 2 when
    the settings cannot work; the reason is one line on stderr.

    A worker killed by a signal while the supervisor is not stopping is replaced, so a
    crashed worker does not leave the pod serving with fewer processes than asked for. A
    worker that ends with a reason (exit 1 or 2) ends the supervisor and its other workers
    with that reason: every replacement would fail the same way.
    """
    configure_logging(settings.log_format, settings.log_level)
    if settings.workers == 1:
        return run_process(lambda: serve(settings))
    return _supervise(settings)


def _hold_port(settings: ServeSettings) -> socket.socket:
    """Hold ``--host:--port`` for this supervisor's lifetime, so a second supervisor cannot join it.

    Workers bind with SO_REUSEPORT, which lets any process of the same user bind the port
    too: a second ``serve --workers`` on the same port would come up and take a share of
    the first one's connections. The lock is an abstract Unix socket named after the
    port alone: bound by one process per network namespace at a time, and freed by the
    kernel when the process ends, however it ends. The host is left out of the name
    because addresses overlap: a supervisor on ``0.0.0.0`` and one on ``127.0.0.1`` would
    both bind, and the second would silently take the loopback share of the first one's
    calls. So one ``serve --workers`` per port per host (per pod on Kubernetes). A lone
    server needs none: it binds without SO_REUSEPORT, so the port is its own.

    Raises:
        ConfigError: another supervisor holds the address (the port is taken).
    """
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0spendgate-serve:{settings.port}")
    except OSError as exc:
        lock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise ConfigError(
            f"--port {settings.port}: cannot bind {settings.host}: the port is taken by another "
            "spendgate serve --workers on this host"
        ) from exc
    return lock


def _supervise(settings: ServeSettings) -> int:
    with _hold_port(settings):
        return _supervise_workers(settings)


def _supervise_workers(settings: ServeSettings) -> int:
    # Workers write metrics to files in this directory; this supervisor serves their sum.
    metrics_dir = tempfile.mkdtemp(prefix="spendgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    metrics_thread = (
        serve_metrics(settings.metrics_port, settings.host, None, required=settings.metrics_port_named)
        if settings.metrics_port
        else None
    )
    # spawn, not fork: gRPC's threads must not be forked.
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    reasons: dict[int, multiprocessing.connection.Connection] = {}

    def start_worker() -> multiprocessing.process.BaseProcess:
        receive, send = ctx.Pipe(duplex=False)
        worker = ctx.Process(target=_run_worker, args=(settings, send))
        worker.start()
        send.close()
        assert worker.pid is not None
        reasons[worker.pid] = receive
        return worker

    def forward(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    workers = [start_worker() for _ in range(settings.workers)]
    failure: tuple[int, str] | None = None

    def fail(code: int, line: str) -> None:
        # Said at once; the other workers drain (health NOT_SERVING first) and stop, within a bound.
        nonlocal failure
        failure = (code, line)
        report_once(code, line)
        arm_exit_deadline(code, line, 2 * settings.drain_seconds + UNWIND_SECONDS)
        forward(signal.SIGTERM, None)

    while any(w.is_alive() for w in workers):
        multiprocessing.connection.wait([w.sentinel for w in workers if w.is_alive()], timeout=1.0)
        if failure is None and metrics_thread is not None and not metrics_thread.is_alive():
            fail(EXIT_FAILED, "spendgate: the metrics endpoint failed: its thread ended")
        for index, worker in enumerate(workers):
            if worker.is_alive() or stopping:
                continue
            assert worker.pid is not None and worker.exitcode is not None
            if worker.exitcode in (EXIT_FAILED, EXIT_CONFIG):
                # The worker said why it ended: the supervisor ends with that reason.
                receive = reasons[worker.pid]
                code, line = (
                    receive.recv()
                    if receive.poll()
                    else (worker.exitcode, f"spendgate: worker {worker.pid} exited {worker.exitcode}")
                )
                fail(code, line)
                break
            multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]  # untyped upstream
            _log.warning("worker_died", pid=worker.pid, exitcode=worker.exitcode, action="replaced")
            workers[index] = start_worker()
    if failure is not None:
        return failure[0]
    # A worker that failed while the others stopped on SIGTERM still reports its reason.
    for worker in workers:
        assert worker.pid is not None
        if worker.exitcode in (EXIT_FAILED, EXIT_CONFIG) and reasons[worker.pid].poll():
            code, line = reasons[worker.pid].recv()
            report_once(code, line)
            return int(code)
    return EXIT_OK if all(w.exitcode in (0, -signal.SIGTERM) for w in workers) else EXIT_FAILED
