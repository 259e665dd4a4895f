"""Server settings: flags, each also readable from a SPENDGATE_* environment variable."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spendgate_server.engine.config import EnforcementConfig, parse_enforcement_config
from spendgate_server.engine.pricing import PriceOverride, UnknownModelPolicy, parse_price_overrides
from spendgate_server.errors import ConfigError, InvalidArgument
from spendgate_server.store.keys import key_problem

__all__ = ["ServeSettings", "add_serve_arguments", "load_config_file", "settings_from_args"]

STORES = ("memory", "redis")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
EVALUATOR_MODES = ("auto", "on", "off")


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
    drain_seconds: float = 5.0
    # 0 turns the Prometheus endpoint off.
    metrics_port: int = 9464
    health_interval_millis: int = 1000
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
    violations_max_entries: int = 100_000
    # "auto" runs the evaluator inside serve with the memory store only (Redis: spendgate worker).
    evaluator: str = "auto"
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
    # Decide/Settle calls served at once per process; past it RESOURCE_EXHAUSTED at once (0: no
    # bound). About capacity x the wait accepted: ~3,000 calls/s per worker x 20 ms (rpc/admission.py).
    max_in_flight: int = 64
    # Distinct live sessions per tenant (0: no limit).
    max_sessions_per_tenant: int = 100_000


def _env(name: str, default: str) -> str:
    return os.environ.get("SPENDGATE_" + name.upper().replace("-", "_"), default)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the serve flags; every default can come from SPENDGATE_<FLAG>."""
    d = ServeSettings()
    a = parser.add_argument
    a("--host", default=_env("host", d.host), help="address to bind (env SPENDGATE_HOST)")
    a("--port", default=_env("port", str(d.port)), help="port to bind, 0 for any free port")
    a("--store", default=_env("store", d.store), help="state store: memory (embedded) or redis")
    a(
        "--redis-url",
        default=_env("redis_url", d.redis_url),
        help="redis://, rediss:// or unix:// URL",
    )
    a("--redis-timeout-millis", default=_env("redis_timeout_millis", str(d.redis_timeout_millis)))
    a(
        "--workers",
        default=_env("workers", str(d.workers)),
        help="server processes (redis store only)",
    )
    a(
        "--config",
        default=_env("config", ""),
        help="YAML or JSON file: enforcement rules and prices",
    )
    a(
        "--unknown-model-price",
        default=_env("unknown_model_price", d.unknown_model_price.value),
        help="unknown model: 'max' (price as the most expensive known) or 'reject'",
    )
    a(
        "--reservation-ttl-seconds",
        default=_env("reservation_ttl_seconds", str(d.reservation_ttl_seconds)),
    )
    a("--session-ttl-seconds", default=_env("session_ttl_seconds", str(d.session_ttl_seconds)))
    a(
        "--drain-seconds",
        default=_env("drain_seconds", str(d.drain_seconds)),
        help="on SIGTERM, report NOT_SERVING and keep serving this long before stopping",
    )
    a(
        "--metrics-port",
        default=_env("metrics_port", str(d.metrics_port)),
        help="Prometheus /metrics port on --host; 0 turns it off",
    )
    a(
        "--health-interval-millis",
        default=_env("health_interval_millis", str(d.health_interval_millis)),
        help="how often health re-checks the store",
    )
    a(
        "--config-poll-millis",
        default=_env("config_poll_millis", str(d.config_poll_millis)),
        help="re-check remote config versions this often (the staleness bound if pub/sub drops)",
    )
    a(
        "--keys-file",
        default=_env("keys_file", ""),
        help="API keys file for the memory store (the redis store keeps keys in Redis)",
    )
    a(
        "--admin-key-file",
        default=_env("admin_key_file", ""),
        help="file holding an admin key (from 'spendgate keys generate'), stored at start-up unless "
        "its id exists: the first key of a fresh deployment (e.g. a mounted Kubernetes Secret)",
    )
    a(
        "--admin-key-tenant",
        default=_env("admin_key_tenant", d.admin_key_tenant),
        help="the tenant the --admin-key-file key administers",
    )
    a(
        "--insecure",
        action="store_true",
        default=_env("insecure", "") in ("1", "true", "yes"),
        help="serve without API keys on a non-loopback address (never in production)",
    )
    a(
        "--key-reload-seconds",
        default=_env("key_reload_seconds", str(d.key_reload_seconds)),
        help="reload API keys this often: the bound on how long a revoked key still works",
    )
    a("--tls-cert", default=_env("tls_cert", ""), help="PEM certificate chain: serve TLS")
    a("--tls-key", default=_env("tls_key", ""), help="PEM private key of --tls-cert")
    a(
        "--tls-client-ca",
        default=_env("tls_client_ca", ""),
        help="PEM CA bundle: require client certificates (mTLS)",
    )
    a(
        "--redis-pipelining",
        default=_env("redis_pipelining", d.redis_pipelining),
        help="on: hot-path scripts share one pipelined connection (plain redis:// only); off: a pool",
    )
    a(
        "--deny-cache-millis",
        default=_env("deny_cache_millis", str(d.deny_cache_millis)),
        help="answer a session already out of budget from memory this long (0 turns it off)",
    )
    a("--log-format", default=_env("log_format", d.log_format), help="auto, json or console")
    a("--log-level", default=_env("log_level", d.log_level), help="debug, info, warning or error")
    a(
        "--redis-breaker-failures",
        default=_env("redis_breaker_failures", str(d.redis_breaker_failures)),
        help="consecutive Redis failures that open the circuit breaker (0 turns it off)",
    )
    a(
        "--redis-breaker-open-millis",
        default=_env("redis_breaker_open_millis", str(d.redis_breaker_open_millis)),
        help="how long an open breaker fails calls at once before one call tries Redis again",
    )
    a(
        "--journal-max-entries",
        default=_env("journal_max_entries", str(d.journal_max_entries)),
        help="settled calls kept in each tenant's journal (older ones are trimmed)",
    )
    a(
        "--violations-max-entries",
        default=_env("violations_max_entries", str(d.violations_max_entries)),
        help="violations kept in each tenant's alerts feed",
    )
    a(
        "--evaluator",
        default=_env("evaluator", d.evaluator),
        help="run the policy evaluator in this process: auto (with the memory store only), on or off",
    )
    a("--evaluator-batch-size", default=_env("evaluator_batch_size", str(d.evaluator_batch_size)))
    a(
        "--evaluator-claim-idle-millis",
        default=_env("evaluator_claim_idle_millis", str(d.evaluator_claim_idle_millis)),
        help="re-evaluate journal entries a worker left unacknowledged this long (it died)",
    )
    a(
        "--evaluator-poll-millis",
        default=_env("evaluator_poll_millis", str(d.evaluator_poll_millis)),
        help="pause of an idle evaluator, and how often alert watchers poll Redis",
    )
    a(
        "--webhook-url",
        default=_env("webhook_url", ""),
        help="POST every violation here as signed JSON (runs with the evaluator)",
    )
    a(
        "--webhook-secret-file",
        default=_env("webhook_secret_file", ""),
        help="file holding the webhook HMAC secret (or env SPENDGATE_WEBHOOK_SECRET)",
    )
    a("--webhook-timeout-millis", default=_env("webhook_timeout_millis", str(d.webhook_timeout_millis)))
    a(
        "--max-watch-streams-per-tenant",
        default=_env("max_watch_streams_per_tenant", str(d.max_watch_streams_per_tenant)),
        help="open WatchViolations streams one tenant may hold on this server",
    )
    a(
        "--max-watch-streams",
        default=_env("max_watch_streams", str(d.max_watch_streams)),
        help="open WatchViolations streams of all tenants on this server (per worker process)",
    )
    a(
        "--max-in-flight",
        default=_env("max_in_flight", str(d.max_in_flight)),
        help="Decide/Settle calls served at once per worker; past it RESOURCE_EXHAUSTED (0: no bound)",
    )
    a(
        "--max-sessions-per-tenant",
        default=_env("max_sessions_per_tenant", str(d.max_sessions_per_tenant)),
        help="distinct live sessions (used within --session-ttl-seconds) one tenant may hold; 0: no limit",
    )


def _int(flag: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise ConfigError(
            f"--{flag} (env SPENDGATE_{flag.upper().replace('-', '_')}) must be an integer "
            f"between {low} and {high}, got {value!r}"
        )
    return number


def _float(flag: str, value: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise ConfigError(
            f"--{flag} (env SPENDGATE_{flag.upper().replace('-', '_')}) must be a number "
            f"between {low:g} and {high:g}, got {value!r}"
        )
    return number


def _choice(flag: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(
            f"--{flag} (env SPENDGATE_{flag.upper().replace('-', '_')}) must be one of "
            f"{', '.join(choices)}; got {value!r}"
        )
    return value


def load_config_file(path: str) -> tuple[EnforcementConfig, dict[str, PriceOverride]]:
    """Read ``{enforcement: {...}, prices: {...}}`` from YAML or JSON.

    Raises:
        ConfigError: naming the file and the bad key.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from exc
    try:
        raw: Any = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config: {path} is not valid YAML/JSON: {exc}") from exc
    raw = raw or {}
    if not isinstance(raw, dict) or not set(raw) <= {"enforcement", "prices"}:
        raise ConfigError(f"--config: {path} must be a mapping with keys 'enforcement' and/or 'prices'")
    try:
        config = parse_enforcement_config(raw.get("enforcement") or {}, prefix="enforcement.")
    except InvalidArgument as exc:
        raise ConfigError(f"--config: {path}: {exc}") from exc
    try:
        prices = parse_price_overrides(raw.get("prices") or {})
    except ConfigError as exc:
        raise ConfigError(f"--config: {path}: {exc}") from exc
    return config, prices


def _webhook_url(url: str) -> str:
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"--webhook-url (env SPENDGATE_WEBHOOK_URL) must be an http:// or https:// URL, got {url!r}"
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


def _admin_key(args: argparse.Namespace, store: str) -> str:
    if not args.admin_key_file:
        return ""
    if store != "redis" and not args.keys_file:
        raise ConfigError(
            "--admin-key-file needs a key store every server reads: --store redis, or --keys-file"
        )
    try:
        key = Path(args.admin_key_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--admin-key-file: cannot read {args.admin_key_file}: {exc.strerror}") from exc
    problem = key_problem(key)
    if problem is not None:
        # key_problem never repeats the content: the file may hold some other secret by mistake.
        raise ConfigError(
            f"--admin-key-file {args.admin_key_file} does not hold a spendgate key ({problem}): "
            "make one with 'spendgate keys generate'"
        )
    return key


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Validate parsed flags into settings.

    Raises:
        ConfigError: naming the flag, its environment variable and the accepted values.
    """
    store = _choice("store", args.store, STORES)
    workers = _int("workers", args.workers, 1, 64)
    if workers > 1 and store == "memory":
        raise ConfigError("--workers above 1 needs --store redis: the memory store would split the state")
    port = _int("port", args.port, 0, 65535)
    if workers > 1 and port == 0:
        raise ConfigError("--workers above 1 needs a fixed --port: workers share it with SO_REUSEPORT")
    config, prices = load_config_file(args.config) if args.config else (EnforcementConfig(), {})
    drain = _float("drain-seconds", args.drain_seconds, 0, 3600)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    if args.tls_client_ca and not args.tls_cert:
        raise ConfigError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    return ServeSettings(
        host=args.host,
        port=port,
        store=store,
        redis_url=args.redis_url,
        redis_timeout_millis=_int("redis-timeout-millis", args.redis_timeout_millis, 1, 60_000),
        workers=workers,
        default_config=config,
        price_overrides=prices,
        unknown_model_price=UnknownModelPolicy(
            _choice(
                "unknown-model-price",
                args.unknown_model_price,
                [p.value for p in UnknownModelPolicy],
            )
        ),
        reservation_ttl_seconds=_int("reservation-ttl-seconds", args.reservation_ttl_seconds, 1, 86_400),
        session_ttl_seconds=_int("session-ttl-seconds", args.session_ttl_seconds, 60, 30 * 86_400),
        drain_seconds=drain,
        metrics_port=_int("metrics-port", args.metrics_port, 0, 65535),
        keys_file=args.keys_file,
        admin_key=_admin_key(args, store),
        admin_key_tenant=args.admin_key_tenant,
        insecure=bool(args.insecure),
        key_reload_seconds=_float("key-reload-seconds", args.key_reload_seconds, 0.1, 3600),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        redis_pipelining=_choice("redis-pipelining", args.redis_pipelining, ("on", "off")),
        deny_cache_millis=_int("deny-cache-millis", args.deny_cache_millis, 0, 60_000),
        config_poll_millis=_int("config-poll-millis", args.config_poll_millis, 50, 600_000),
        health_interval_millis=_int("health-interval-millis", args.health_interval_millis, 50, 60_000),
        log_format=_choice("log-format", args.log_format, LOG_FORMATS),
        log_level=_choice("log-level", args.log_level, LOG_LEVELS),
        redis_breaker_failures=_int("redis-breaker-failures", args.redis_breaker_failures, 0, 1000),
        redis_breaker_open_millis=_int(
            "redis-breaker-open-millis", args.redis_breaker_open_millis, 10, 600_000
        ),
        journal_max_entries=_int("journal-max-entries", args.journal_max_entries, 100, 100_000_000),
        violations_max_entries=_int("violations-max-entries", args.violations_max_entries, 100, 100_000_000),
        evaluator=_choice("evaluator", args.evaluator, EVALUATOR_MODES),
        evaluator_batch_size=_int("evaluator-batch-size", args.evaluator_batch_size, 1, 10_000),
        evaluator_claim_idle_millis=_int(
            "evaluator-claim-idle-millis", args.evaluator_claim_idle_millis, 10, 86_400_000
        ),
        evaluator_poll_millis=_int("evaluator-poll-millis", args.evaluator_poll_millis, 10, 60_000),
        webhook_url=_webhook_url(args.webhook_url),
        webhook_secret=_webhook_secret(args.webhook_url, args.webhook_secret_file),
        webhook_timeout_millis=_int("webhook-timeout-millis", args.webhook_timeout_millis, 100, 120_000),
        max_watch_streams_per_tenant=_int(
            "max-watch-streams-per-tenant", args.max_watch_streams_per_tenant, 1, 1_000_000
        ),
        max_watch_streams=_int("max-watch-streams", args.max_watch_streams, 1, 1_000_000),
        max_in_flight=_int("max-in-flight", args.max_in_flight, 0, 1_000_000),
        max_sessions_per_tenant=_int("max-sessions-per-tenant", args.max_sessions_per_tenant, 0, 100_000_000),
    )
