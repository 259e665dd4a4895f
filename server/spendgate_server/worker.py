"""``spendgate worker``: the policy evaluator (and webhook sink) as a process of its own.

It takes its subset of the flag table (flags.py): the store, evaluator, webhook, metrics
and log flags, with the same SPENDGATE_* variables as ``spendgate serve``, so one
environment configures both. Any number of workers share the work through Redis
consumer groups; one that dies leaves its entries to the others.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog

from spendgate_server.alerts import Alerts, build_alerts
from spendgate_server.errors import ConfigError
from spendgate_server.lifecycle import Stopped, run_part, run_process, watch_thread
from spendgate_server.logging import configure_logging
from spendgate_server.metrics import Metrics, serve_metrics
from spendgate_server.settings import ServeSettings
from spendgate_server.stores import check_reachable, open_stores

__all__ = ["run_worker", "work"]

_log = structlog.get_logger("spendgate.worker")


async def _until_stopped(stop: asyncio.Event, alerts: Alerts) -> None:
    await stop.wait()
    _log.info("worker_stopping")
    await alerts.stop()
    raise Stopped


async def work(settings: ServeSettings, on_ready: Callable[[], None] | None = None) -> None:
    """Evaluate journals until SIGTERM/SIGINT, then finish the batch in progress and stop.

    The evaluator, the webhook sink, the policy watcher and the metrics endpoint run in one
    task group (lifecycle.py): the first to fail ends the process with its reason.

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
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stores = open_stores(settings, role="worker")
    try:
        await check_reachable(stores, settings)
        metrics = Metrics()
        metrics_thread = (
            serve_metrics(
                settings.metrics_port, settings.host, metrics.registry, required=settings.metrics_port_named
            )
            if settings.metrics_port
            else None
        )
        alerts = build_alerts(settings, stores)
        try:
            async with asyncio.TaskGroup() as group:
                alerts.start(group, evaluate=True, metrics=metrics)
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


def run_worker(settings: ServeSettings) -> int:
    """Run :func:`work` to its end; returns the exit code (lifecycle.py), the reason on stderr."""
    configure_logging(settings.log_format, settings.log_level)
    return run_process(lambda: work(settings))
