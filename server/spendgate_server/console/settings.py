"""``spendgate console`` settings, read from the flag table (flags.py): each flag is also a
SPENDGATE_CONSOLE_* environment variable.

This module imports nothing from the web stack, so ``spendgate --help`` works without it.
"""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from spendgate_server.admin.channel import check_target
from spendgate_server.errors import ConfigError, InvalidArgument
from spendgate_server.flags import FlagValues, add_flags
from spendgate_server.rpc.auth import is_loopback
from spendgate_server.rpc.validation import project_from_proto

__all__ = ["ConsoleSettings", "add_console_arguments", "console_settings_from_args"]


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


def add_console_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the flags of ``spendgate console`` (the table in flags.py)."""
    add_flags(parser, "console")


def console_settings_from_args(args: argparse.Namespace) -> ConsoleSettings:
    """Validate parsed flags into settings.

    Raises:
        ConfigError: naming the flag, its environment variable and the accepted values.
    """
    v = FlagValues(args, "console")
    host, https_cert, https_key = v.raw("host"), v.raw("https-cert"), v.raw("https-key")
    tls_ca, tls_cert, tls_key = v.raw("tls-ca"), v.raw("tls-cert"), v.raw("tls-key")
    if bool(https_cert) != bool(https_key):
        raise ConfigError("--https-cert and --https-key go together: give both or neither")
    if (tls_cert or tls_key) and not tls_ca:
        raise ConfigError("--tls-cert/--tls-key need --tls-ca")
    for flag in ("tls-ca", "tls-cert", "tls-key", "https-cert", "https-key"):
        path = v.raw(flag)
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{v.label(flag)}: cannot read {path}")
    if https_cert:
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(https_cert, https_key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{v.label('https-cert')} and {v.label('https-key')}: not a PEM certificate chain and its "
                f"private key ({exc.strerror or exc})"
            ) from exc
    public_url = ""
    if given_url := v.raw("public-url"):
        parts = urlsplit(given_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            raise ConfigError(
                f"{v.label('public-url')} must be an origin such as https://console.example.com, "
                f"got {given_url!r}"
            )
        # Written the way browsers send Origin: lower case, no default port.
        name = parts.hostname or ""
        name = f"[{name}]" if ":" in name else name
        default_port = {"http": 80, "https": 443}[parts.scheme]
        port = f":{parts.port}" if parts.port not in (None, default_port) else ""
        public_url = f"{parts.scheme}://{name}{port}"
    insecure = v.switch("insecure")
    if not is_loopback(host):
        # Off loopback, the Host and Origin headers can only be checked against a known origin,
        # and an admin key must not cross the network in clear.
        if not public_url:
            raise ConfigError(
                f"--host {host} is reachable from the network: give --public-url, the URL "
                "browsers use, so requests from other sites can be told apart"
            )
        if not (https_cert or public_url.startswith("https://")) and not insecure:
            raise ConfigError(
                f"--host {host} with plain HTTP would send admin keys in clear: give --https-cert "
                "and --https-key, an https:// --public-url (a TLS proxy), or --insecure"
            )
    # Refused at start, not at the first sign-in: the admin CLIs' own check of --target.
    check_target(v.raw("target"), v.label("target"))
    projects = v.items("project")
    for project in projects:
        try:
            project_from_proto(project)  # the service's rule for the field
        except InvalidArgument as exc:
            raise ConfigError(f"{v.label('project')}: {project!r} {exc.violations[0].description}") from exc
    return ConsoleSettings(
        host=host,
        port=v.integer("port"),
        target=v.raw("target"),
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        https_cert=https_cert,
        https_key=https_key,
        public_url=public_url,
        insecure=insecure,
        projects=tuple(dict.fromkeys(projects)),
        session_idle_minutes=v.integer("session-idle-minutes"),
        session_max_hours=v.integer("session-max-hours"),
        rpc_timeout_seconds=v.number("rpc-timeout-seconds"),
        log_format=v.text("log-format"),
        log_level=v.text("log-level"),
    )
