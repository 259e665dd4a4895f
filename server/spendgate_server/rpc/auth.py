"""Authentication and scopes: who is calling, for which tenant, allowed to do what.

The tenant always comes from the caller's API key, never from the request. The key
table is held in memory and reloaded every ``reload_seconds`` (the bound on how long
a revoked key keeps working), so verifying a key costs one SHA-256 and a dict lookup,
and a bad key never causes a store round trip.

Authentication never fails open. Whether a server runs open (no key exists, and it is
bound to loopback or started with ``--insecure``) is decided by the first load of the
key table, at start-up, and never changes while the process runs. A server that
started with keys and later reads an empty key table (Redis restarted without
persistence, the keys file removed) refuses every call with UNAUTHENTICATED, logs one
error line and sets ``spendgate_auth_keys_missing`` until keys are back; it never
turns into an open server.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from prometheus_client import Counter, Gauge

from spendgate_server.errors import ConfigError, SpendgateError
from spendgate_server.logging import Outage
from spendgate_server.store.keys import ApiKey, KeyStore, Scope, hash_secret, key_problem, parse_key

__all__ = [
    "DEV_PRINCIPAL",
    "Authenticator",
    "Principal",
    "current_principal",
    "is_loopback",
    "set_principal",
]

_log = structlog.get_logger("spendgate.auth")


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller."""

    tenant: str
    scope: Scope
    key_id: str
    name: str


# Open development mode (no keys, loopback only): everyone is the admin of tenant "default".
DEV_PRINCIPAL = Principal("default", Scope.ADMIN, "", "dev-mode")
_current: ContextVar[Principal] = ContextVar("spendgate_principal", default=DEV_PRINCIPAL)

# Methods anyone may call (probes and tooling), and those that need the admin scope.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# PolicyService/GetPatternSet is left to client keys: clients fetch it to match prompts locally.
ADMIN_METHODS = frozenset(
    {
        "/spendgate.v1.ConfigService/UpdateConfig",
        "/spendgate.v1.PolicyService/GetPolicies",
        "/spendgate.v1.PolicyService/UpdatePolicies",
        "/spendgate.v1.PolicyService/ListPolicyRevisions",
        "/spendgate.v1.ViolationService/ListViolations",
        "/spendgate.v1.ViolationService/WatchViolations",
        "/spendgate.v1.SessionService/ListSessions",
        "/spendgate.v1.SessionService/GetSessionSpend",
    }
)


# Verified keys remembered between two loads of the key table (rpc/auth.py Authenticator).
_MAX_VERIFIED = 1024


def current_principal() -> Principal:
    """The caller of the RPC being served."""
    return _current.get()


def set_principal(principal: Principal) -> None:
    """Make ``principal`` the caller of the RPC being served (rpc/guard.py, once authenticated)."""
    _current.set(principal)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AuthError(SpendgateError):
    """A call refused: UNAUTHENTICATED or PERMISSION_DENIED (never carries the secret)."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class Authenticator:
    """Verifies bearer keys against an in-memory copy of the key table."""

    def __init__(
        self,
        keystore: KeyStore | None,
        *,
        allow_open_mode: bool,
        reload_seconds: float = 5.0,
        failures: Counter | None = None,
        keys_missing: Gauge | None = None,
    ) -> None:
        self._keystore = keystore
        self._allow_open_mode = allow_open_mode
        self._reload_seconds = reload_seconds
        self._failures = failures
        self._keys_missing = keys_missing
        self._keys: dict[str, ApiKey] = {}
        # Decided by the first load and never changed after: None until then (every call refused).
        self._open: bool | None = None
        self._missing = False
        self._ignored_keys_logged = False
        self._last_logged: dict[tuple[str, str], float] = {}
        # Keys presented and verified since the table was last loaded, as presented: the same
        # string needs no parse, hash or compare again. Only valid, active keys get in, and each
        # load empties it, so a revoked key is refused from the next load on, as before.
        self._verified: dict[str, Principal] = {}

    @property
    def has_keys(self) -> bool:
        """At least one key record exists (revoked ones count: they still close open mode)."""
        return bool(self._keys)

    @property
    def open_mode(self) -> bool:
        """This server started with no key while open mode was allowed: every caller is the dev admin.

        Fixed by the first :meth:`load`; no later load changes it, in either direction.
        """
        return self._open is True

    @property
    def keys_missing(self) -> bool:
        """The server started with keys and its key table is now empty: every call is refused."""
        return self._missing

    async def load(self) -> None:
        """(Re)read the key table; the first load also decides, for good, whether the server runs open.

        Raises:
            StoreUnavailable: the key store cannot be read (the previous table stays in force).
            ConfigError: the keys file cannot be read or parsed.
        """
        keys = await self._keystore.all() if self._keystore is not None else {}
        first = self._open is None
        if first:
            self._open = self._allow_open_mode and not keys
        self._keys = keys
        self._verified = {}
        if self._open:
            if keys and not self._ignored_keys_logged:
                self._ignored_keys_logged = True
                _log.warning(
                    "api_keys_ignored_in_open_mode",
                    detail="API keys exist but this server started in open development mode; "
                    "restart it to enforce them",
                    keys=len(keys),
                )
            return
        missing = not keys
        if missing != self._missing:
            self._missing = missing
            if self._keys_missing is not None:
                self._keys_missing.set(1 if missing else 0)
            if first:
                pass  # At start-up an empty table is no loss: check_exposure refuses it in one line.
            elif missing:
                _log.error(
                    "api_keys_missing",
                    detail="the key store holds no API keys (Redis restarted without persistence, or "
                    "the keys file was removed): every call is refused until keys are restored",
                )
            else:
                _log.warning("api_keys_restored", keys=len(keys))

    async def run(self) -> None:
        """Reload the key table until cancelled: new and revoked keys take effect within the period."""
        outage = Outage(_log, "key_reload_failed", "key_reload_restored")
        while True:
            await asyncio.sleep(self._reload_seconds)
            try:
                await self.load()
            except SpendgateError as exc:
                outage.failed(exc)
            else:
                outage.succeeded()

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None, method: str) -> Principal:
        """The principal of a call, checked against the method's scope.

        Raises:
            AuthError: no/invalid/revoked key (UNAUTHENTICATED) or too small a scope
                (PERMISSION_DENIED).
        """
        if method.startswith(PUBLIC_PREFIXES) or self._open is True:
            return DEV_PRINCIPAL
        if self._open is None or self._missing:
            # Never open: a server that started with keys and lost them refuses everyone.
            raise self._refuse(
                grpc.StatusCode.UNAUTHENTICATED,
                "no_keys",
                "",
                "this server has no API keys loaded; every call is refused until they are restored",
            )
        presented = ""
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, rest = value.strip().partition(" ")
                # The auth scheme is case-insensitive (RFC 9110 section 11.1).
                presented = rest.strip() if scheme.lower() == "bearer" else value.strip()
        if not presented:
            raise self._refuse(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing",
                "",
                "this server requires an API key: send it as 'authorization: Bearer sgk_…'",
            )
        principal = self._verified.get(presented)
        if principal is None:
            principal = self._verify(presented)
        if method in ADMIN_METHODS and principal.scope is not Scope.ADMIN:
            raise self._refuse(
                grpc.StatusCode.PERMISSION_DENIED,
                "scope",
                principal.key_id,
                f"API key {principal.key_id} has the client scope; {method} needs an admin key",
            )
        return principal

    def _verify(self, presented: str) -> Principal:
        """The principal of a presented key checked against the key table (then remembered).

        Raises:
            AuthError: malformed, unknown or revoked (UNAUTHENTICATED).
        """
        parsed = parse_key(presented)
        if parsed is None:
            raise self._refuse(
                grpc.StatusCode.UNAUTHENTICATED,
                "malformed",
                "",
                f"the API key is malformed: {key_problem(presented)}",
            )
        key_id, secret = parsed
        record = self._keys.get(key_id)
        if record is None or not hmac.compare_digest(record.secret_sha256, hash_secret(secret)):
            raise self._refuse(
                grpc.StatusCode.UNAUTHENTICATED, "unknown", key_id, f"API key {key_id} is not valid"
            )
        if not record.active:
            raise self._refuse(
                grpc.StatusCode.UNAUTHENTICATED, "revoked", key_id, f"API key {key_id} was revoked"
            )
        principal = Principal(record.tenant, record.scope, key_id, record.name)
        if len(self._verified) >= _MAX_VERIFIED:
            self._verified.clear()
        self._verified[presented] = principal
        return principal

    def _refuse(self, code: grpc.StatusCode, reason: str, key_id: str, message: str) -> AuthError:
        if self._failures is not None:
            self._failures.labels(reason).inc()
        # At most one log line per (reason, key id) a minute: a flood of bad keys can't flood the logs.
        now = time.monotonic()
        if now - self._last_logged.get((reason, key_id), -60.0) >= 60.0:
            if len(self._last_logged) > 10_000:
                self._last_logged.clear()
            self._last_logged[(reason, key_id)] = now
            _log.warning("auth_failed", reason=reason, key_id=key_id or None)
        return AuthError(code, reason, message)


def check_exposure(host: str, has_keys: bool, insecure: bool) -> None:
    """Refuse to serve without keys on a non-loopback address unless explicitly --insecure.

    Raises:
        ConfigError: naming the flags to fix it.
    """
    if not has_keys and not is_loopback(host) and not insecure:
        raise ConfigError(
            f"--host {host} is reachable from the network and no API keys exist: create one with "
            "'spendgate keys create', or pass --insecure to serve without authentication"
        )
