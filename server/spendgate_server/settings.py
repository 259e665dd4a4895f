"""Settings of ``spendgate serve`` and ``spendgate worker``, read from the flag table (flags.py)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spendgate_server.documents import read_document
from spendgate_server.engine.config import EnforcementConfig, parse_enforcement_config
from spendgate_server.engine.pricing import PriceOverride, UnknownModelPolicy, parse_price_overrides
from spendgate_server.errors import ConfigError, InvalidArgument
from spendgate_server.flags import FlagValues, add_flags
from spendgate_server.logging import redact_secrets
from spendgate_server.store.keys import key_problem

__all__ = [
    "ServeSettings",
    "add_serve_arguments",
    "add_worker_arguments",
    "load_config_file",
    "settings_from_args",
]


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """Everything ``spendgate serve`` needs; built once, never mutated."""

    host: str = "127.0.0.1"
    port: int = 50051
    store: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Below the clients' default 250 ms deadline, so a hung Redis reaches them as UNAVAILABLE.
    redis_timeout_millis: int = 100
    # A session found out of budget is answered from memory this long (0: off; deny_cache.py).
    deny_cache_millis: int = 250
    # "on": Decide/Settle scripts share one pipelined connection (store/pipeline.py).
    redis_pipelining: str = "on"
    workers: int = 1
    default_config: EnforcementConfig = field(default_factory=EnforcementConfig)
    price_overrides: Mapping[str, PriceOverride] = field(default_factory=dict)
    unknown_model_price: UnknownModelPolicy = UnknownModelPolicy.MAX
    reservation_ttl_seconds: int = 600
    session_ttl_seconds: int = 86_400
    # A provider error settled this long after its decision is flagged (engine/anomalies.py).
    settle_error_flag_seconds: int = 30
    drain_seconds: float = 5.0
    # 0 turns the Prometheus endpoint off.
    metrics_port: int = 9464
    # The user named the port (flag or variable): if it is taken, refuse to start. The default
    # port may be taken by another server on the host: then warn and serve without metrics.
    metrics_port_named: bool = False
    health_interval_millis: int = 1000
    # Idle client connections are closed after this long (0: never); see _server_options in app.py.
    connection_idle_seconds: float = 120.0
    # Quiet connections are pinged this often; an unanswered ping closes them (0: gRPC's 2 hours).
    keepalive_seconds: float = 60.0
    keys_file: str = ""
    # An admin key the operator made (a mounted Secret), stored at start-up unless its id is known.
    admin_key: str = field(default="", repr=False)
    admin_key_tenant: str = "default"
    insecure: bool = False
    key_reload_seconds: float = 5.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Bound on how stale a remote config can be when change notices are lost.
    config_poll_millis: int = 1000
    log_format: str = "auto"
    log_level: str = "info"
    # Consecutive store outages that open the circuit breaker; 0 turns the breaker off.
    redis_breaker_failures: int = 5
    # How long an open breaker answers UNAVAILABLE at once before one call may try the store.
    redis_breaker_open_millis: int = 1000
    # Journal, policies and the alerts feed (each tenant's journal and feed keep this many entries).
    journal_max_entries: int = 100_000
    # A Settle leaves a journal intent, swept after this long if its append never happened
    # (policy/journal.py); 0: every Settle awaits its append.
    journal_intent_grace_seconds: int = 30
    violations_max_entries: int = 100_000
    # "on": serve evaluates the journal itself (with Redis, the consumer group shares the work
    # with other servers and any `spendgate worker`); "off" leaves it to workers.
    evaluator: str = "on"
    evaluator_batch_size: int = 100
    # A journal entry pending this long belongs to a dead worker and is evaluated again.
    evaluator_claim_idle_millis: int = 30_000
    evaluator_poll_millis: int = 200
    webhook_url: str = ""
    webhook_secret: str = field(default="", repr=False)
    webhook_timeout_millis: int = 5000
    # Limits per tenant and per process (RESOURCE_EXHAUSTED past them, naming the flag).
    max_watch_streams_per_tenant: int = 64
    max_watch_streams: int = 1024
    # Distinct live sessions per tenant (0: no limit).
    max_sessions_per_tenant: int = 100_000
    # Decide/Settle calls served at once per process; past it RESOURCE_EXHAUSTED at once (0: no
    # bound). About capacity x the wait accepted: ~3,000 calls/s per worker x 20 ms (rpc/admission.py).
    max_in_flight: int = 64
    # Share of its timeout a call may wait before take-up while calls queue; once the queue
    # stands, calls that waited longer are refused (rpc/admission.py; 0: off).
    queue_target_percent: int = 20


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the flags of ``spendgate serve`` (the table in flags.py)."""
    add_flags(parser, "serve")


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the flags of ``spendgate worker``: the store, evaluator, webhook, metrics and log ones."""
    add_flags(parser, "worker")


def load_config_file(path: str) -> tuple[EnforcementConfig, dict[str, PriceOverride]]:
    """Read ``{enforcement: {...}, prices: {...}}`` from YAML or JSON.

    Raises:
        ConfigError: naming the file and the bad key.
    """
    raw: Any = read_document(path, "--config") or {}
    if not isinstance(raw, dict) or not set(raw) <= {"enforcement", "prices"}:
        raise ConfigError(f"--config: {path} must be a mapping with keys 'enforcement' and/or 'prices'")
    try:
        config = parse_enforcement_config(raw.get("enforcement") or {}, prefix="enforcement.")
    except InvalidArgument as exc:
        raise ConfigError(f"--config: {path}: {exc}") from exc
    prices_raw = raw.get("prices") or {}
    if not isinstance(prices_raw, dict):
        raise ConfigError(f"--config: {path}: prices must be a mapping of model names")
    try:
        prices = parse_price_overrides(prices_raw)
    except ConfigError as exc:
        raise ConfigError(f"--config: {path}: {exc}") from exc
    return config, prices


def _webhook_url(url: str) -> str:
    if not url:
        return url
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            "--webhook-url (env SPENDGATE_WEBHOOK_URL) must be an http:// or https:// URL, "
            f"got {redact_secrets(url)!r}"
        )
    parts = urlsplit(url)
    try:
        port = parts.port  # ValueError: not a number, or out of 0..65535
    except ValueError:
        port = 0
    # Refused at start: a bad port would only show as failed deliveries, retried for ever.
    if not parts.hostname or port == 0 or parts.netloc.endswith(":"):
        raise ConfigError(
            "--webhook-url (env SPENDGATE_WEBHOOK_URL) must name a host and, if any, a port in 1..65535, "
            f"got {redact_secrets(url)!r}"
        )
    return url


def _webhook_secret(url: str, path: str) -> str:
    secret = os.environ.get("SPENDGATE_WEBHOOK_SECRET", "")
    if path:
        try:
            secret = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--webhook-secret-file: cannot read {path}: {exc.strerror}") from exc
    if url and len(secret) < 16:
        raise ConfigError(
            "--webhook-url needs a signing secret of at least 16 characters: "
            "--webhook-secret-file FILE or env SPENDGATE_WEBHOOK_SECRET"
        )
    return secret


def _admin_key(path: str, store: str, keys_file: str) -> str:
    if not path:
        return ""
    if store != "redis" and not keys_file:
        raise ConfigError(
            "--admin-key-file needs a key store every server reads: --store redis, or --keys-file"
        )
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--admin-key-file: cannot read {path}: {exc.strerror}") from exc
    problem = key_problem(key)
    if problem is not None:
        # key_problem never repeats the content: the file may hold some other secret by mistake.
        raise ConfigError(
            f"--admin-key-file {path} does not hold a spendgate key ({problem}): "
            "make one with 'spendgate keys generate'"
        )
    return key


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Validate the flags of ``serve`` or ``worker`` (as declared on ``args``) into settings.

    Flags the command does not take keep their defaults.

    Raises:
        ConfigError: naming the flag, its environment variable and the accepted values.
    """
    v = FlagValues(args)
    store = v.text("store")
    workers = v.integer("workers")
    if workers > 1 and store == "memory":
        raise ConfigError("--workers above 1 needs --store redis: the memory store would split the state")
    port = v.integer("port")
    if workers > 1 and port == 0:
        raise ConfigError("--workers above 1 needs a fixed --port: workers share it with SO_REUSEPORT")
    config_path = v.raw("config")
    config, prices = load_config_file(config_path) if config_path else (EnforcementConfig(), {})
    tls_cert, tls_key, tls_client_ca = v.raw("tls-cert"), v.raw("tls-key"), v.raw("tls-client-ca")
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if tls_client_ca and not tls_cert:
        raise ConfigError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    webhook_url = _webhook_url(v.raw("webhook-url"))
    return ServeSettings(
        host=v.raw("host"),
        port=port,
        store=store,
        redis_url=v.raw("redis-url"),
        redis_timeout_millis=v.integer("redis-timeout-millis"),
        workers=workers,
        default_config=config,
        price_overrides=prices,
        unknown_model_price=UnknownModelPolicy(v.text("unknown-model-price")),
        reservation_ttl_seconds=v.integer("reservation-ttl-seconds"),
        session_ttl_seconds=v.integer("session-ttl-seconds"),
        settle_error_flag_seconds=v.integer("settle-error-flag-seconds"),
        drain_seconds=v.number("drain-seconds"),
        metrics_port=v.integer("metrics-port"),
        metrics_port_named=v.given("metrics-port"),
        keys_file=v.raw("keys-file"),
        admin_key=_admin_key(v.raw("admin-key-file"), store, v.raw("keys-file")),
        admin_key_tenant=v.raw("admin-key-tenant"),
        insecure=v.switch("insecure"),
        key_reload_seconds=v.number("key-reload-seconds"),
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        redis_pipelining=v.text("redis-pipelining"),
        deny_cache_millis=v.integer("deny-cache-millis"),
        config_poll_millis=v.integer("config-poll-millis"),
        health_interval_millis=v.integer("health-interval-millis"),
        connection_idle_seconds=v.number("connection-idle-seconds"),
        keepalive_seconds=v.number("keepalive-seconds"),
        log_format=v.text("log-format"),
        log_level=v.text("log-level"),
        redis_breaker_failures=v.integer("redis-breaker-failures"),
        redis_breaker_open_millis=v.integer("redis-breaker-open-millis"),
        journal_max_entries=v.integer("journal-max-entries"),
        journal_intent_grace_seconds=v.integer("journal-intent-grace-seconds"),
        violations_max_entries=v.integer("violations-max-entries"),
        evaluator=v.text("evaluator"),
        evaluator_batch_size=v.integer("evaluator-batch-size"),
        evaluator_claim_idle_millis=v.integer("evaluator-claim-idle-millis"),
        evaluator_poll_millis=v.integer("evaluator-poll-millis"),
        webhook_url=webhook_url,
        webhook_secret=_webhook_secret(webhook_url, v.raw("webhook-secret-file")),
        webhook_timeout_millis=v.integer("webhook-timeout-millis"),
        max_watch_streams_per_tenant=v.integer("max-watch-streams-per-tenant"),
        max_watch_streams=v.integer("max-watch-streams"),
        max_sessions_per_tenant=v.integer("max-sessions-per-tenant"),
        max_in_flight=v.integer("max-in-flight"),
        queue_target_percent=v.integer("queue-target-percent"),
    )
