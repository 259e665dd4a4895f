"""Prometheus metrics: names, labels, and the scrape endpoint.

Recording is a few counter/histogram updates per RPC (no I/O); the endpoint is
served from a separate thread. With ``--workers`` above one, prometheus_client's
multiprocess mode aggregates every worker in the supervisor's endpoint.
"""

from __future__ import annotations

import threading
import time

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

from spendgate_server.engine.decide import Decision, Settlement, decision_id_time_ms
from spendgate_server.errors import ConfigError
from spendgate_server.rule_codes import Rule

__all__ = ["Metrics", "serve_metrics"]

_log = structlog.get_logger("spendgate.metrics")

# Decide takes ~0.5 ms end to end; buckets resolve 50 µs to 1 s.
_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25, 1.0)
_LAG_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_MAX_PLAUSIBLE_LAG_MS = 24 * 3600 * 1000


def _rule_label(rule: Rule | None) -> str:
    return "none" if rule is None else rule.key


class Metrics:
    """Every metric the server exports, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._decision_counters: dict[tuple[object, object], Counter] = {}
        self._config_version_seen = -1
        r = self.registry
        self.decisions = Counter(
            "spendgate_decisions",
            "Decisions by verdict and the rule that fired.",
            ["verdict", "rule"],
            registry=r,
        )
        self.shadow = Counter(
            "spendgate_shadow_would_block",
            "Rules in shadow mode that fired (calls allowed).",
            ["rule"],
            registry=r,
        )
        self.decide_seconds = Histogram(
            "spendgate_decide_duration_seconds", "Decide handling time.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.settle_seconds = Histogram(
            "spendgate_settle_duration_seconds", "Settle handling time.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.store_seconds = Histogram(
            "spendgate_store_duration_seconds",
            "Store round trip by operation.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "spendgate_store_errors", "Store failures by operation.", ["op"], registry=r
        )
        self.rpc_errors = Counter(
            "spendgate_rpc_errors", "RPCs answered with an error status.", ["method", "code"], registry=r
        )
        self.auth_failures = Counter(
            "spendgate_auth_failures", "Calls refused by authentication, by reason.", ["reason"], registry=r
        )
        self.auth_keys_missing = Gauge(
            "spendgate_auth_keys_missing",
            "1 while a server that started with API keys finds none (every call refused).",
            multiprocess_mode="max",
            registry=r,
        )
        self.reservations = Counter("spendgate_reservations", "Reservations created.", registry=r)
        self.unpriced = Counter(
            "spendgate_unpriced",
            "Decides and Settles charged the never-undercount maximum: a model, service tier or "
            "usage unit had no known price.",
            ["kind"],
            registry=r,
        )
        self.settles = Counter("spendgate_settles", "Settles by outcome.", ["outcome"], registry=r)
        # The children every Settle counts into, looked up once (labels() locks and builds a key).
        self._settle_outcomes = {
            o: self.settles.labels(o) for o in ("settled", "released", "already_settled")
        }
        self.settle_anomalies = Counter(
            "spendgate_settle_anomalies",
            "Settles unlike their decision (counted as reported, flagged on the alerts feed), by kind.",
            ["kind"],
            registry=r,
        )
        self.settle_lag = Histogram(
            "spendgate_settle_lag_seconds",
            "Time from Decide to its Settle.",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.config_version = Gauge(
            "spendgate_config_version",
            "Version of the server-side config in use.",
            multiprocess_mode="max",
            registry=r,
        )
        self.health_serving = Gauge(
            "spendgate_health_serving",
            "1 while health reports SERVING.",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.journal_lag = Gauge(
            "spendgate_journal_lag_seconds",
            "Age of the oldest journal entry not yet evaluated.",
            multiprocess_mode="max",
            registry=r,
        )
        self.evaluator_pending = Gauge(
            "spendgate_evaluator_pending",
            "Journal entries delivered to evaluators but not acknowledged.",
            multiprocess_mode="max",
            registry=r,
        )

    def decided(self, decision: Decision, seconds: float) -> None:
        """Record one Decide answered with a decision."""
        self.decide_seconds.observe(seconds)
        # Labelled children are looked up once per (verdict, rule): this runs on every Decide.
        key = (decision.verdict, decision.rule)
        counter = self._decision_counters.get(key)
        if counter is None:
            counter = self._decision_counters[key] = self.decisions.labels(
                decision.verdict.name.lower(), _rule_label(decision.rule)
            )
        counter.inc()
        if decision.config_version != self._config_version_seen:
            self._config_version_seen = decision.config_version
            self.config_version.set(decision.config_version)
        if decision.reservation_id:
            self.reservations.inc()
        for rule in decision.shadow_rules:
            self.shadow.labels(rule.key).inc()

    def settled(self, reservation_id: str, settlement: Settlement, released: bool, seconds: float) -> None:
        """Record one Settle answered."""
        self.settle_seconds.observe(seconds)
        if settlement.already_settled:
            self._settle_outcomes["already_settled"].inc()
            return
        self._settle_outcomes["released" if released else "settled"].inc()
        for anomaly in settlement.anomalies:
            self.settle_anomalies.labels(anomaly.kind.key).inc()
        lag_ms = time.time_ns() // 1_000_000 - decision_id_time_ms(reservation_id)
        if 0 <= lag_ms <= _MAX_PLAUSIBLE_LAG_MS:
            self.settle_lag.observe(lag_ms / 1000)

    def failed(self, method: str, code: str) -> None:
        """Record an RPC answered with an error status."""
        self.rpc_errors.labels(method, code).inc()
        if method == "Settle" and code == "NOT_FOUND":
            self.settles.labels("unknown").inc()


def serve_metrics(
    port: int, host: str, registry: CollectorRegistry | None, *, required: bool = True
) -> threading.Thread | None:
    """Serve /metrics on ``host:port`` from a daemon thread; returns the thread (alive while it serves).

    ``host`` is ``--host`` as given: an IPv6 address may be in brackets (``[::1]``).

    ``registry`` None means the multiprocess view: the sum over every worker's files.
    Without ``required`` (the port is the default one, not one the user named), a port
    another process holds costs one warning and None is returned: a second server on the
    host still serves, without metrics.

    Raises:
        ConfigError: the port cannot be bound and is ``required``.
    """
    if registry is None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
    try:
        _, thread = start_http_server(port, addr=host.strip("[]"), registry=registry)
    except OSError as exc:
        if required:
            raise ConfigError(f"--metrics-port {port}: cannot bind {host}: {exc.strerror}") from exc
        _log.warning(
            "metrics_off",
            detail=f"the default --metrics-port {port} is taken on {host} ({exc.strerror}): serving "
            "without metrics; give --metrics-port a free port to have them",
        )
        return None
    return thread
