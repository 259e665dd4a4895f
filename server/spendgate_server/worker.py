"""``spendgate worker``: the policy evaluator (and webhook sink) as a process of its own.

It takes the flags of ``spendgate serve`` (and their SPENDGATE_* variables), so one
environment configures both; only the store, evaluator, webhook, metrics and log
flags matter here. Any number of workers share the work through Redis consumer
groups; one that dies leaves its entries to the others.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog

from spendgate_server.alerts import build_alerts
from spendgate_server.errors import ConfigError, StoreUnavailable
from spendgate_server.logging import configure_logging, redact_secrets
from spendgate_server.metrics import Metrics, serve_metrics
from spendgate_server.settings import ServeSettings

__all__ = ["run_worker", "work"]

_log = structlog.get_logger("spendgate.worker")


async def work(settings: ServeSettings, on_ready: Callable[[], None] | None = None) -> None:
    """Evaluate journals until SIGTERM/SIGINT, then finish the batch in progress and stop."""
    if settings.store != "redis":
        raise ConfigError(
            "spendgate worker needs --store redis: the memory store's journal lives inside "
            "'spendgate serve', which evaluates it itself"
        )
    metrics = Metrics()
    if settings.metrics_port:
        serve_metrics(settings.metrics_port, settings.host, metrics.registry)
    alerts = build_alerts(settings)
    try:
        await alerts.logs.tenants("journal")
    except StoreUnavailable as exc:
        await alerts.close()
        raise ConfigError(f"--redis-url {redact_secrets(settings.redis_url)} is unreachable: {exc}") from exc
    alerts.start(evaluate=True, metrics=metrics)
    assert alerts.evaluator is not None
    _log.info("worker_ready", consumer=alerts.evaluator.consumer, webhook=bool(settings.webhook_url))
    if on_ready is not None:
        on_ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    _log.info("worker_stopping")
    await alerts.close()
    _log.info("worker_stopped", evaluated=alerts.evaluator.evaluated)


def run_worker(settings: ServeSettings) -> None:
    """Run :func:`work` on uvloop (asyncio's loop where uvloop is missing)."""
    configure_logging(settings.log_format, settings.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(work(settings))
    else:
        uvloop.run(work(settings))
