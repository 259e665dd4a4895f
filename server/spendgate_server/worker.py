"""``spendgate worker``: the policy evaluator (and webhook sink) as a process of its own.

It takes its subset of the flag table (flags.py): the store, evaluator, webhook, metrics
and log flags, with the same SPENDGATE_* variables as ``spendgate serve``, so one
environment configures both. Any number of workers share the work through Redis
consumer groups; one that dies leaves its entries to the others.

``spendgate serve --store redis --evaluator on`` runs the same worker as a child process
(:func:`run_evaluation_child`), so the event loop that answers Decide reads no journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.connection
import signal
from collections.abc import Callable

import structlog

from spendgate_server.alerts import GAUGES, Alerts, build_alerts
from spendgate_server.errors import ConfigError, StoreUnavailable
from spendgate_server.lifecycle import Stopped, parent_gone, run_child, run_part, run_process, watch_thread
from spendgate_server.logging import Outage, configure_logging
from spendgate_server.metrics import Metrics, serve_metrics
from spendgate_server.policy.evaluator import EVALUATION_NICENESS, InlineEvaluation
from spendgate_server.settings import ServeSettings
from spendgate_server.stores import Stores, check_reachable, open_stores

__all__ = ["run_evaluation_child", "run_worker", "work"]

_log = structlog.get_logger("spendgate.worker")
# The child's first ping is retried this often, doubling up to the maximum.
_FIRST_PING_BACKOFF_SECONDS = 0.1
_MAX_PING_BACKOFF_SECONDS = 5.0


async def _until_stopped(stop: asyncio.Event, alerts: Alerts) -> None:
    await stop.wait()
    _log.info("worker_stopping")
    await alerts.stop()
    raise Stopped


def _sender(server: multiprocessing.connection.Connection) -> Callable[[int, float], None]:
    """Sends the evaluator's gauges to the server; once the server is gone, nowhere (it stops)."""

    def send(pending: int, lag: float) -> None:
        with contextlib.suppress(OSError):
            server.send((GAUGES, pending, lag))

    return send


async def work(
    settings: ServeSettings,
    on_ready: Callable[[], None] | None = None,
    *,
    server: multiprocessing.connection.Connection | None = None,
) -> None:
    """Evaluate journals until SIGTERM/SIGINT, then finish the batch in progress and stop.

    The evaluator, the webhook sink, the policy watcher and the metrics endpoint run in one
    task group (lifecycle.py): the first to fail ends the process with its reason.

    Args:
        settings: the flags (the store, evaluator, webhook, metrics and log ones count).
        on_ready: called once every part runs.
        server: the channel to the ``spendgate serve`` this worker is the child of
            (:func:`run_evaluation_child`). Such a worker serves no metrics (its gauges go
            to the server), does not check Redis first (the server did; an outage now is
            retried, not fatal), evaluates inline (it is the server's low-priority
            process), answers SIGTERM but not SIGINT, and stops once the server has ended.

    Raises:
        ConfigError: not the redis store, Redis unreachable, the metrics port taken.
    """
    if settings.store != "redis":
        raise ConfigError(
            "spendgate worker needs --store redis: the memory store's journal lives inside "
            "'spendgate serve', which evaluates it itself"
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # A server's child leaves SIGINT to the server (a terminal's Ctrl-C reaches both).
    for sig in (signal.SIGTERM,) if server else (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if server is not None:
        parent_gone(stop.set)
    stores = open_stores(settings, role="evaluator" if server else "worker")
    try:
        metrics, metrics_thread = None, None
        if server is None:
            await check_reachable(stores, settings)
        elif not await _store_answers(stores, stop):
            return
        if server is None:
            metrics = Metrics()
            if settings.metrics_port:
                metrics_thread = serve_metrics(
                    settings.metrics_port,
                    settings.host,
                    metrics.registry,
                    required=settings.metrics_port_named,
                )
        alerts = build_alerts(settings, stores)
        try:
            async with asyncio.TaskGroup() as group:
                alerts.start(
                    group,
                    evaluate=True,
                    metrics=metrics,
                    gauges=_sender(server) if server else None,
                    evaluation=InlineEvaluation() if server else None,
                )
                if metrics_thread is not None:
                    group.create_task(
                        run_part("the metrics endpoint", watch_thread(metrics_thread), returns=False)
                    )
                assert alerts.evaluator is not None
                _log.info(
                    "worker_ready", consumer=alerts.evaluator.consumer, webhook=bool(settings.webhook_url)
                )
                if on_ready is not None:
                    on_ready()
                group.create_task(_until_stopped(stop, alerts))
        except* Stopped:
            pass
        _log.info("worker_stopped", evaluated=alerts.evaluator.evaluated if alerts.evaluator else 0)
    finally:
        await stores.aclose()


async def _store_answers(stores: Stores, stop: asyncio.Event) -> bool:
    """Wait until the store answers a ping; False when ``stop`` is set first.

    A server's child starts while Redis may be down (the server checked it at its own
    start, not now), and a Redis Cluster client learns its slot map from its first
    command: a pub/sub subscription sent before that fails on an empty map. So the
    child pings first, retrying with backoff and logging the outage once.
    """
    outage = Outage(_log, "evaluator_store_lost", "evaluator_store_restored")
    backoff = _FIRST_PING_BACKOFF_SECONDS
    while not stop.is_set():
        try:
            await stores.ping()
        except StoreUnavailable as exc:
            outage.failed(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, _MAX_PING_BACKOFF_SECONDS)
            continue
        outage.succeeded()
        return True
    return False


def run_worker(settings: ServeSettings) -> int:
    """Run :func:`work` to its end; returns the exit code (lifecycle.py), the reason on stderr."""
    configure_logging(settings.log_format, settings.log_level)
    return run_process(lambda: work(settings))


def run_evaluation_child(settings: ServeSettings, server: multiprocessing.connection.Connection) -> None:
    """The evaluator of ``spendgate serve --store redis``: :func:`work` in a child process of the server.

    Spawned by the server once it serves (alerts.py, lifecycle.ChildProcess), at
    policy/evaluator.py's EVALUATION_NICENESS: it reads the journals, evaluates, stores
    the violations, acknowledges, and posts to the webhook, with its own Redis
    connections, so the server's event loop spends nothing on them. ``server`` carries
    its gauges and its fatal reason to the server. Its log lines carry ``process: evaluator``.
    """
    configure_logging(settings.log_format, settings.log_level)
    # Its lines share the server's stream: each says which process wrote it.
    structlog.contextvars.bind_contextvars(process="evaluator")
    run_child(server, lambda: work(settings, server=server), EVALUATION_NICENESS)
