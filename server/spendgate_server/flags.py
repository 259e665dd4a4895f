"""Every flag of ``spendgate serve``, ``worker`` and ``console``, declared once in one table.

Each row names the commands that take it; a command's ``--help``, its environment
variables and the validation of its values all come from its rows. A flag ``--x-y`` of
``serve`` or ``worker`` is also ``SPENDGATE_X_Y``; of ``console``, ``SPENDGATE_CONSOLE_X_Y``
(some console flags fall back to a shared variable, e.g. ``SPENDGATE_TARGET``). A value
on the command line wins over the variable, which wins over the default.

Values are read as text and checked here, so a bad one is refused with a
:class:`~spendgate_server.errors.ConfigError` naming the flag, its variable and what is
accepted, never with argparse's usage dump. Checks that tie several flags together
belong to the settings builders (``settings.py``, ``console/settings.py``).
"""

from __future__ import annotations

import argparse
import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass

from spendgate_server.errors import ConfigError

__all__ = ["COMMANDS", "FLAGS", "Flag", "FlagValues", "Kind", "add_flags", "flags_of"]

COMMANDS = ("serve", "worker", "console")
_ENV_PREFIX = {"serve": "SPENDGATE_", "worker": "SPENDGATE_", "console": "SPENDGATE_CONSOLE_"}
# Where parsed arguments remember which command's table they were read with.
_COMMAND_DEST = "flag_table_command"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


class Kind(enum.Enum):
    """How a flag's text is read."""

    TEXT = "text"
    INT = "int"
    FLOAT = "float"
    CHOICE = "choice"
    SWITCH = "switch"  # given without a value; the variable reads 1/true/yes or 0/false/no
    LIST = "list"  # repeatable; the variable holds a comma-separated list


@dataclass(frozen=True, slots=True)
class Flag:
    """One row of the table: a flag, the commands that take it, its default and its bounds."""

    name: str
    commands: frozenset[str]
    default: str
    help: str
    kind: Kind = Kind.TEXT
    low: float = 0
    high: float = 0
    choices: tuple[str, ...] = ()
    # Read, in order, when the command's own variable is unset (full names).
    env_fallbacks: tuple[str, ...] = ()
    dest: str = ""
    metavar: str = ""

    @property
    def attribute(self) -> str:
        """The attribute argparse stores the value in."""
        return self.dest or self.name.replace("-", "_")

    def variables(self, command: str) -> tuple[str, ...]:
        """The environment variables read for ``command``, the first set one wins."""
        return (_ENV_PREFIX[command] + self.attribute.upper(), *self.env_fallbacks)


_SERVER = frozenset({"serve", "worker"})
_SERVE = frozenset({"serve"})
_CONSOLE = frozenset({"console"})
_ALL = frozenset(COMMANDS)


def _text(
    name: str,
    commands: frozenset[str],
    default: str,
    text: str,
    *,
    metavar: str = "",
    env_fallbacks: tuple[str, ...] = (),
) -> Flag:
    return Flag(name, commands, default, text, metavar=metavar, env_fallbacks=env_fallbacks)


def _int(name: str, commands: frozenset[str], default: int, low: int, high: int, text: str) -> Flag:
    return Flag(name, commands, str(default), text, Kind.INT, low, high)


def _float(name: str, commands: frozenset[str], default: float, low: float, high: float, text: str) -> Flag:
    return Flag(name, commands, f"{default:g}", text, Kind.FLOAT, low, high)


def _choice(name: str, commands: frozenset[str], default: str, choices: tuple[str, ...], text: str) -> Flag:
    return Flag(name, commands, default, text, Kind.CHOICE, choices=choices, metavar="|".join(choices))


def _switch(name: str, commands: frozenset[str], text: str) -> Flag:
    return Flag(name, commands, "", text, Kind.SWITCH)


FLAGS: tuple[Flag, ...] = (
    # --- serve and worker
    _text("host", _SERVER, "127.0.0.1", "address to bind: the gRPC port (serve) and the metrics endpoint"),
    _int("port", _SERVE, 50051, 0, 65535, "gRPC port to bind, 0 for any free port"),
    _choice("store", _SERVER, "memory", ("memory", "redis"), "state store: memory (embedded) or redis"),
    _text(
        "redis-url",
        _SERVER,
        "redis://127.0.0.1:6379/0",
        "redis://, rediss://, unix:// or redis+cluster://host:port[,host:port...] URL",
        metavar="URL",
    ),
    _int(
        "redis-timeout-millis",
        _SERVER,
        100,
        1,
        60_000,
        "bound on connecting to Redis and on every command (below the clients' 250 ms deadline)",
    ),
    _int("workers", _SERVE, 1, 1, 64, "server processes sharing the port (redis store only)"),
    _text("config", _SERVE, "", "YAML or JSON file: enforcement rules and prices", metavar="FILE"),
    _choice(
        "unknown-model-price",
        _SERVE,
        "max",
        ("max", "reject"),
        "a model with no known price: 'max' (priced as the most expensive known) or 'reject'",
    ),
    _int(
        "reservation-ttl-seconds",
        _SERVE,
        600,
        1,
        86_400,
        "an unsettled reservation expires after this long and counts at its estimate",
    ),
    _int("session-ttl-seconds", _SERVE, 86_400, 60, 30 * 86_400, "a session idle this long is forgotten"),
    _int(
        "settle-error-flag-seconds",
        _SERVE,
        30,
        0,
        86_400,
        "flag a provider error settled this long after its decision (a refused call fails fast)",
    ),
    _float(
        "drain-seconds",
        _SERVE,
        5,
        0,
        3600,
        "on SIGTERM, report NOT_SERVING and keep serving this long before stopping",
    ),
    _int(
        "metrics-port",
        _SERVER,
        9464,
        0,
        65535,
        "Prometheus /metrics port on --host; 0 turns it off. If the default port is taken (another "
        "server on this host), a warning is logged and the server runs without; a port named here must bind",
    ),
    _int("health-interval-millis", _SERVE, 1000, 50, 60_000, "how often health re-checks the store"),
    _float(
        "connection-idle-seconds",
        _SERVE,
        120,
        0,
        86_400,
        "close a client connection with no call in flight for this long (the client reconnects on "
        "its next call); 0 keeps idle connections open",
    ),
    _float(
        "keepalive-seconds",
        _SERVE,
        60,
        0,
        86_400,
        "ping a client connection quiet for this long; one that does not answer within 20 s is closed "
        "(a vanished peer, a dead stream); 0 leaves it to gRPC (2 hours)",
    ),
    _int(
        "config-poll-millis",
        _SERVER,
        1000,
        50,
        600_000,
        "re-check remote config and policy versions this often (the staleness bound if pub/sub drops)",
    ),
    _text(
        "keys-file",
        _SERVE,
        "",
        "API keys file for the memory store (the redis store keeps keys in Redis)",
        metavar="FILE",
    ),
    _text(
        "admin-key-file",
        _SERVE,
        "",
        "file holding an admin key (from 'spendgate keys generate', e.g. a mounted Secret), stored at "
        "start-up unless its id is already known",
        metavar="FILE",
    ),
    _text("admin-key-tenant", _SERVE, "default", "tenant of the --admin-key-file key", metavar="TENANT"),
    _switch("insecure", _SERVE, "serve without API keys on a non-loopback address (never in production)"),
    _float(
        "key-reload-seconds",
        _SERVE,
        5,
        0.1,
        3600,
        "reload API keys this often: the bound on how long a revoked key still works",
    ),
    _text("tls-cert", _SERVE, "", "PEM certificate chain: serve TLS", metavar="FILE"),
    _text("tls-key", _SERVE, "", "PEM private key of --tls-cert", metavar="FILE"),
    _text("tls-client-ca", _SERVE, "", "PEM CA bundle: require client certificates (mTLS)", metavar="FILE"),
    _choice(
        "redis-pipelining",
        _SERVE,
        "on",
        ("on", "off"),
        "on: hot-path scripts share one pipelined connection (plain redis:// only); off: the pool",
    ),
    _int(
        "deny-cache-millis",
        _SERVE,
        250,
        0,
        60_000,
        "answer a session already out of budget from memory this long (0 turns it off)",
    ),
    _choice(
        "log-format", _ALL, "auto", ("auto", "json", "console"), "log lines: auto is console on a terminal"
    ),
    _choice(
        "log-level", _ALL, "info", ("debug", "info", "warning", "error"), "the least severe level logged"
    ),
    _int(
        "redis-breaker-failures",
        _SERVE,
        5,
        0,
        1000,
        "consecutive Redis failures that open the circuit breaker (0 turns it off)",
    ),
    _int(
        "redis-breaker-open-millis",
        _SERVE,
        1000,
        10,
        600_000,
        "how long an open breaker fails calls at once before one call tries Redis again",
    ),
    _int(
        "journal-max-entries",
        _SERVE,
        100_000,
        100,
        100_000_000,
        "settled calls kept in each tenant's journal (older ones are trimmed)",
    ),
    _int(
        "journal-intent-grace-seconds",
        _SERVE,
        30,
        0,
        600,
        "a Settle is answered before its journal append, leaving an intent that a sweeper journals "
        "after this long if the append never happened; 0: each Settle awaits its append",
    ),
    _int(
        "violations-max-entries",
        _SERVER,
        100_000,
        100,
        100_000_000,
        "violations kept in each tenant's alerts feed",
    ),
    _choice(
        "evaluator",
        _SERVE,
        "on",
        ("on", "off"),
        "evaluate settled calls against the policies in this server (with Redis, in a child process); "
        "off leaves it to 'spendgate worker'",
    ),
    _int("evaluator-batch-size", _SERVER, 100, 1, 10_000, "journal entries evaluated per tenant and round"),
    _int(
        "evaluator-claim-idle-millis",
        _SERVER,
        30_000,
        10,
        86_400_000,
        "re-evaluate journal entries a worker left unacknowledged this long (it died)",
    ),
    _int(
        "evaluator-poll-millis",
        _SERVER,
        200,
        10,
        60_000,
        "pause of an idle evaluator, and how often alert watchers poll Redis",
    ),
    _text(
        "webhook-url",
        _SERVER,
        "",
        "POST every violation here as signed JSON (runs with the evaluator)",
        metavar="URL",
    ),
    _text(
        "webhook-secret-file",
        _SERVER,
        "",
        "file holding the webhook HMAC secret (or env SPENDGATE_WEBHOOK_SECRET)",
        metavar="FILE",
    ),
    _int("webhook-timeout-millis", _SERVER, 5000, 100, 120_000, "deadline of one webhook delivery"),
    _int(
        "max-watch-streams-per-tenant",
        _SERVE,
        64,
        1,
        1_000_000,
        "open WatchViolations streams one tenant may hold on this server",
    ),
    _int(
        "max-watch-streams",
        _SERVE,
        1024,
        1,
        1_000_000,
        "open WatchViolations streams of all tenants on this server (per worker process)",
    ),
    _int(
        "max-sessions-per-tenant",
        _SERVE,
        100_000,
        0,
        100_000_000,
        "distinct live sessions (used within --session-ttl-seconds) one tenant may hold; 0: no limit",
    ),
    _int(
        "max-in-flight",
        _SERVE,
        64,
        0,
        1_000_000,
        "Decide/Settle calls served at once per worker; past it RESOURCE_EXHAUSTED at once (0: no bound)",
    ),
    _int(
        "queue-target-percent",
        _SERVE,
        20,
        0,
        100,
        "share of its timeout a call may wait to be taken up while calls queue past capacity; once "
        "none has come through within it for 100 ms, calls past it are refused RESOURCE_EXHAUSTED "
        "(0: off; clients that send no timeout are never shed)",
    ),
    # --- console
    _text("host", _CONSOLE, "127.0.0.1", "address to bind"),
    _int("port", _CONSOLE, 8080, 0, 65535, "port to bind, 0 for any free port"),
    _text(
        "target",
        _CONSOLE,
        "127.0.0.1:50051",
        "the spendgate server, host:port",
        env_fallbacks=("SPENDGATE_TARGET",),
    ),
    _text(
        "tls-ca",
        _CONSOLE,
        "",
        "PEM CA that signed the server's certificate: connect to --target with TLS",
        metavar="FILE",
        env_fallbacks=("SPENDGATE_TLS_CA",),
    ),
    _text(
        "tls-cert",
        _CONSOLE,
        "",
        "client certificate (mTLS)",
        metavar="FILE",
        env_fallbacks=("SPENDGATE_TLS_CERT",),
    ),
    _text(
        "tls-key",
        _CONSOLE,
        "",
        "client private key (mTLS)",
        metavar="FILE",
        env_fallbacks=("SPENDGATE_TLS_KEY",),
    ),
    _text("https-cert", _CONSOLE, "", "PEM certificate chain: serve the console on HTTPS", metavar="FILE"),
    _text("https-key", _CONSOLE, "", "PEM private key of --https-cert", metavar="FILE"),
    _text(
        "public-url",
        _CONSOLE,
        "",
        "the URL browsers use (e.g. https://console.example.com); needed off loopback",
        metavar="URL",
    ),
    _switch(
        "insecure", _CONSOLE, "allow plain HTTP off loopback (admin keys would cross the network in clear)"
    ),
    Flag(
        "project",
        _CONSOLE,
        "",
        "a project to offer on the pages; repeat it (the variable takes a,b)",
        Kind.LIST,
        dest="projects",
        metavar="NAME",
    ),
    _int(
        "session-idle-minutes",
        _CONSOLE,
        60,
        1,
        7 * 24 * 60,
        "sign a browser out after this long without a request",
    ),
    _int(
        "session-max-hours",
        _CONSOLE,
        12,
        1,
        30 * 24,
        "sign a browser out this long after it signed in, however active",
    ),
    _float("rpc-timeout-seconds", _CONSOLE, 5, 0.1, 300, "deadline of each call to --target"),
)


def _rows(command: str) -> dict[str, Flag]:
    rows: dict[str, Flag] = {}
    for flag in FLAGS:
        if command in flag.commands:
            if flag.name in rows:
                raise AssertionError(f"--{flag.name} is declared twice for {command}")
            rows[flag.name] = flag
    return rows


_TABLE = {command: _rows(command) for command in COMMANDS}


def _shown_default(flag: Flag) -> str:
    if flag.kind is Kind.SWITCH:
        return "off"
    return flag.default or "none"


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Declare ``command``'s flags on ``parser``; ``--help`` shows each default and variable."""
    parser.set_defaults(**{_COMMAND_DEST: command})
    for flag in _TABLE[command].values():
        variables = " or ".join(flag.variables(command))
        # argparse %-formats help texts.
        text = f"{flag.help} (default {_shown_default(flag)}; env {variables})".replace("%", "%%")
        option = f"--{flag.name}"
        if flag.kind is Kind.SWITCH:
            parser.add_argument(option, dest=flag.attribute, action="store_const", const="1", help=text)
        elif flag.kind is Kind.LIST:
            parser.add_argument(
                option, dest=flag.attribute, action="append", metavar=flag.metavar or None, help=text
            )
        else:
            metavar = flag.metavar or {Kind.INT: "N", Kind.FLOAT: "X"}.get(flag.kind) or flag.name.upper()
            parser.add_argument(option, dest=flag.attribute, metavar=metavar, help=text)


class FlagValues:
    """The validated values of one command's flags, read from parsed arguments.

    Args:
        args: what a parser prepared by :func:`add_flags` returned.
        command: the command; by default the one ``args`` were declared for.

    A flag the command does not take reads as the default of the ``serve`` row of
    that name (a ``worker`` builds the same settings as ``serve`` and ignores the rest).
    Every accessor raises :class:`ConfigError` naming the flag and its variable.
    """

    def __init__(self, args: argparse.Namespace, command: str | None = None) -> None:
        self._args = args
        self.command = command or str(getattr(args, _COMMAND_DEST, "serve"))
        self._rows = _TABLE[self.command]

    def _flag(self, name: str) -> tuple[Flag, bool]:
        """The row, and whether this command takes it."""
        if name in self._rows:
            return self._rows[name], True
        return _TABLE["serve"][name], False

    def label(self, name: str) -> str:
        """``--name (env VARIABLE)``, as error messages name a flag."""
        flag, _ = self._flag(name)
        return f"--{name} (env {flag.variables(self.command)[0]})"

    def source(self, name: str) -> str:
        """Where the value came from: ``flag``, ``env`` or ``default``."""
        flag, taken = self._flag(name)
        if not taken:
            return "default"
        if getattr(self._args, flag.attribute, None) is not None:
            return "flag"
        if any(variable in os.environ for variable in flag.variables(self.command)):
            return "env"
        return "default"

    def given(self, name: str) -> bool:
        """Whether the user named a value (on the command line or in the environment)."""
        return self.source(name) != "default"

    def raw(self, name: str) -> str:
        """The text of the value, before any check."""
        flag, taken = self._flag(name)
        if not taken:
            return flag.default
        value = getattr(self._args, flag.attribute, None)
        if isinstance(value, list):
            return ",".join(value)
        if value is not None:
            return str(value)
        for variable in flag.variables(self.command):
            if variable in os.environ:
                return os.environ[variable]
        return flag.default

    def text(self, name: str) -> str:
        """A text value, or a choice checked against its row."""
        flag, _ = self._flag(name)
        value = self.raw(name)
        if flag.kind is Kind.CHOICE and value not in flag.choices:
            raise ConfigError(f"{self.label(name)} must be one of {', '.join(flag.choices)}; got {value!r}")
        return value

    def integer(self, name: str) -> int:
        """An integer within the row's bounds."""
        flag, _ = self._flag(name)
        value = self.raw(name)
        try:
            number = int(value)
        except ValueError:
            number = int(flag.low) - 1
        if not flag.low <= number <= flag.high:
            raise ConfigError(
                f"{self.label(name)} must be an integer between {flag.low:.0f} and {flag.high:.0f}, "
                f"got {value!r}"
            )
        return number

    def number(self, name: str) -> float:
        """A number within the row's bounds."""
        flag, _ = self._flag(name)
        value = self.raw(name)
        try:
            number = float(value)
        except ValueError:
            number = flag.low - 1
        if not flag.low <= number <= flag.high:
            raise ConfigError(
                f"{self.label(name)} must be a number between {flag.low:g} and {flag.high:g}, got {value!r}"
            )
        return number

    def switch(self, name: str) -> bool:
        """A switch: given, or its variable set to 1/true/yes/on (0/false/no/off or empty: not)."""
        value = self.raw(name).strip().lower()
        if value not in _TRUE + _FALSE:
            raise ConfigError(f"{self.label(name)} must be one of 1, true, yes, 0, false, no; got {value!r}")
        return value in _TRUE

    def items(self, name: str) -> tuple[str, ...]:
        """A list: every value given, else the variable's comma-separated items."""
        return tuple(item for item in self.raw(name).split(",") if item)


def flags_of(command: str) -> Sequence[Flag]:
    """``command``'s rows, in declaration order."""
    return tuple(_TABLE[command].values())
