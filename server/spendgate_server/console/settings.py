"""``spendgate console`` flags, each also readable from a SPENDGATE_CONSOLE_* environment variable.

This module imports nothing from the web stack, so ``spendgate --help`` works without it.
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from spendgate_server.errors import ConfigError
from spendgate_server.rpc.auth import is_loopback

__all__ = ["ConsoleSettings", "add_console_arguments", "console_settings_from_args"]

LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
_PROJECT = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """Everything ``spendgate console`` needs; built once, never mutated."""

    host: str = "127.0.0.1"
    port: int = 8080
    # The spendgate server (host:port) the console calls as an admin client.
    target: str = "127.0.0.1:50051"
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # The console's own HTTPS (else plain HTTP: loopback, or behind a TLS proxy named by public_url).
    https_cert: str = ""
    https_key: str = ""
    # The origin browsers use to reach the console, e.g. https://console.example.com.
    public_url: str = ""
    insecure: bool = False
    # Projects offered as links on the Rules page and as filter suggestions (no call lists them).
    projects: tuple[str, ...] = ()
    session_idle_minutes: int = 60
    session_max_hours: int = 12
    rpc_timeout_seconds: float = 5.0
    log_format: str = "auto"
    log_level: str = "info"

    @property
    def secure_cookies(self) -> bool:
        """Browsers reach the console over HTTPS: its own, or a TLS proxy's in front of it."""
        return bool(self.https_cert) or self.public_url.startswith("https://")


def _env(name: str, default: str, *fallbacks: str) -> str:
    """SPENDGATE_CONSOLE_<NAME>, else the first set SPENDGATE_<FALLBACK>, else ``default``."""
    for variable in ("SPENDGATE_CONSOLE_" + name.upper(), *("SPENDGATE_" + f.upper() for f in fallbacks)):
        if variable in os.environ:
            return os.environ[variable]
    return default


def add_console_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the console flags; every default can come from SPENDGATE_CONSOLE_<FLAG>."""
    d = ConsoleSettings()
    a = parser.add_argument
    a("--host", default=_env("host", d.host), help="address to bind (env SPENDGATE_CONSOLE_HOST)")
    a("--port", default=_env("port", str(d.port)), help="port to bind, 0 for any free port")
    a(
        "--target",
        default=_env("target", d.target, "target"),
        help="the spendgate server, host:port (env SPENDGATE_CONSOLE_TARGET, else SPENDGATE_TARGET)",
    )
    a(
        "--tls-ca",
        default=_env("tls_ca", "", "tls_ca"),
        help="PEM CA that signed the server's certificate: connect to --target with TLS",
    )
    a("--tls-cert", default=_env("tls_cert", "", "tls_cert"), help="client certificate (mTLS)")
    a("--tls-key", default=_env("tls_key", "", "tls_key"), help="client private key (mTLS)")
    a(
        "--https-cert",
        default=_env("https_cert", ""),
        help="PEM certificate chain: serve the console on HTTPS",
    )
    a("--https-key", default=_env("https_key", ""), help="PEM private key of --https-cert")
    a(
        "--public-url",
        default=_env("public_url", ""),
        help="the URL browsers use (e.g. https://console.example.com); needed off loopback",
    )
    a(
        "--insecure",
        action="store_true",
        default=_env("insecure", "") in ("1", "true", "yes"),
        help="allow plain HTTP off loopback (admin keys would cross the network in clear)",
    )
    a(
        "--project",
        dest="projects",
        action="append",
        default=[p for p in _env("projects", "").split(",") if p],
        help="a project to offer on the pages; repeat it (env SPENDGATE_CONSOLE_PROJECTS=a,b)",
    )
    a(
        "--session-idle-minutes",
        default=_env("session_idle_minutes", str(d.session_idle_minutes)),
        help="sign a browser out after this long without a request",
    )
    a(
        "--session-max-hours",
        default=_env("session_max_hours", str(d.session_max_hours)),
        help="sign a browser out this long after it signed in, however active",
    )
    a(
        "--rpc-timeout-seconds",
        default=_env("rpc_timeout_seconds", str(d.rpc_timeout_seconds)),
        help="deadline of each call to --target",
    )
    a("--log-format", default=_env("log_format", d.log_format), help="auto, json or console")
    a("--log-level", default=_env("log_level", d.log_level), help="debug, info, warning or error")


def _flag(flag: str) -> str:
    return f"--{flag} (env SPENDGATE_CONSOLE_{flag.upper().replace('-', '_')})"


def _number(flag: str, value: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise ConfigError(f"{_flag(flag)} must be a number between {low:g} and {high:g}, got {value!r}")
    return number


def _integer(flag: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise ConfigError(f"{_flag(flag)} must be an integer between {low} and {high}, got {value!r}")
    return number


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{_flag(flag)} must be one of {', '.join(choices)}; got {value!r}")
    return value


def console_settings_from_args(args: argparse.Namespace) -> ConsoleSettings:
    """Validate parsed flags into settings.

    Raises:
        ConfigError: naming the flag, its environment variable and the accepted values.
    """
    if bool(args.https_cert) != bool(args.https_key):
        raise ConfigError("--https-cert and --https-key go together: give both or neither")
    if (args.tls_cert or args.tls_key) and not args.tls_ca:
        raise ConfigError("--tls-cert/--tls-key need --tls-ca")
    for flag in ("tls-ca", "tls-cert", "tls-key", "https-cert", "https-key"):
        path = getattr(args, flag.replace("-", "_"))
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{_flag(flag)}: cannot read {path}")
    if args.https_cert:
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(args.https_cert, args.https_key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{_flag('https-cert')} and {_flag('https-key')}: not a PEM certificate chain and its "
                f"private key ({exc.strerror or exc})"
            ) from exc
    public_url = ""
    if args.public_url:
        parts = urlsplit(args.public_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            raise ConfigError(
                f"{_flag('public-url')} must be an origin such as https://console.example.com, "
                f"got {args.public_url!r}"
            )
        # Written the way browsers send Origin: lower case, no default port.
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        default_port = {"http": 80, "https": 443}[parts.scheme]
        port = f":{parts.port}" if parts.port not in (None, default_port) else ""
        public_url = f"{parts.scheme}://{host}{port}"
    if not is_loopback(args.host):
        # Off loopback, the Host and Origin headers can only be checked against a known origin,
        # and an admin key must not cross the network in clear.
        if not public_url:
            raise ConfigError(
                f"--host {args.host} is reachable from the network: give --public-url, the URL "
                "browsers use, so requests from other sites can be told apart"
            )
        if not (args.https_cert or public_url.startswith("https://")) and not args.insecure:
            raise ConfigError(
                f"--host {args.host} with plain HTTP would send admin keys in clear: give --https-cert "
                "and --https-key, an https:// --public-url (a TLS proxy), or --insecure"
            )
    for project in args.projects:
        if not _PROJECT.fullmatch(project):
            raise ConfigError(f"{_flag('project')}: {project!r} is not 1-64 characters of [A-Za-z0-9._-]")
    return ConsoleSettings(
        host=args.host,
        port=_integer("port", args.port, 0, 65535),
        target=args.target,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        https_cert=args.https_cert,
        https_key=args.https_key,
        public_url=public_url,
        insecure=bool(args.insecure),
        projects=tuple(dict.fromkeys(args.projects)),
        session_idle_minutes=_integer("session-idle-minutes", args.session_idle_minutes, 1, 7 * 24 * 60),
        session_max_hours=_integer("session-max-hours", args.session_max_hours, 1, 30 * 24),
        rpc_timeout_seconds=_number("rpc-timeout-seconds", args.rpc_timeout_seconds, 0.1, 300),
        log_format=_choice("log-format", args.log_format, LOG_FORMATS),
        log_level=_choice("log-level", args.log_level, LOG_LEVELS),
    )
