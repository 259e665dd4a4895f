"""API keys: generated with a CSPRNG, stored only as SHA-256 hashes, listed and revoked by id.

A key reads ``sgk_<id>_<secret>``: the 8-hex-digit id is public (it names the key in
listings and logs), the 256-bit secret is never stored. A fast hash is enough because
the secret is random, not a password. Keys live in Redis (shared by the fleet) or in a
JSON file (the embedded single-process setup); servers reload them periodically.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import re
import secrets
import tempfile
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from spendgate_server.errors import ConfigError
from spendgate_server.store.keyspace import API_KEYS
from spendgate_server.store.redis import RedisClient, connect, redis_call

__all__ = [
    "ApiKey",
    "FileKeyStore",
    "KeyStore",
    "RedisKeyStore",
    "Scope",
    "generate_key",
    "hash_secret",
    "install_key",
    "key_problem",
    "new_key",
    "parse_key",
]

_KEY = re.compile(r"sgk_([0-9a-f]{8})_([A-Za-z0-9_-]{43})")
_KEY_ID = re.compile(r"[0-9a-f]{8}")
_SECRET = re.compile(r"[A-Za-z0-9_-]+")
_SECRET_CHARS = 43  # secrets.token_urlsafe(32): 256 bits in unpadded base64url
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


class Scope(enum.Enum):
    """What a key may do. ``admin`` includes everything ``client`` may."""

    CLIENT = "client"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key: who it belongs to and what it may do; never the secret itself."""

    key_id: str
    tenant: str
    scope: Scope
    name: str
    secret_sha256: str
    created_ms: int
    revoked_ms: int = 0

    @property
    def active(self) -> bool:
        """Not revoked."""
        return not self.revoked_ms

    def to_json(self) -> str:
        """Serialised for the store."""
        return json.dumps({**asdict(self), "scope": self.scope.value}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ApiKey:
        """Parse what to_json wrote."""
        raw = json.loads(text)
        return cls(**{**raw, "scope": Scope(raw["scope"])})


def hash_secret(secret: str) -> str:
    """The stored form of a key's secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(presented: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else None (no store is consulted)."""
    match = _KEY.fullmatch(presented)
    return (match.group(1), match.group(2)) if match else None


def generate_key() -> str:
    """A fresh well-formed key ``sgk_<8 hex>_<43 URL-safe characters>`` (CSPRNG); nothing is stored."""
    return f"sgk_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"


def _check_names(tenant: str, name: str, tenant_label: str = "--tenant", name_label: str = "--name") -> None:
    for label, value in ((tenant_label, tenant), (name_label, name)):
        if not _NAME.fullmatch(value):
            raise ConfigError(f"{label} must be 1-64 characters of [A-Za-z0-9._@-], got {value!r}")


def key_problem(presented: str) -> str | None:
    """What is wrong with a presented key, in words; None for a well-formed key.

    The answer describes the key's shape only and never repeats any part of it, so it
    may be shown to whoever sent the key and written to logs.
    """
    if not presented:
        return "it is empty"
    if presented[:7].lower() == "bearer ":
        return "it starts with 'Bearer ': 'Bearer ' goes once before the key, which itself starts with 'sgk_'"
    if presented.startswith("sk-"):
        return "it looks like a provider's API key (sk-…); spendgate keys start with 'sgk_'"
    if any(c.isspace() or c in "'\"" for c in presented):
        return "it contains spaces or quotes: copy the key alone"
    if not presented.startswith("sgk_"):
        return "spendgate keys start with 'sgk_' (make one with 'spendgate keys create')"
    key_id, _, secret = presented[4:].partition("_")
    if not _KEY_ID.fullmatch(key_id):
        return "'sgk_' must be followed by the key id (8 lowercase hex digits) and '_'"
    if not secret:
        return "the secret after the key id is missing"
    if not _SECRET.fullmatch(secret):
        return "the secret after the key id may hold only letters, digits, '_' and '-'"
    if len(secret) != _SECRET_CHARS:
        return (
            f"the secret after the key id has {len(secret)} characters instead of {_SECRET_CHARS}: "
            "was the key cut short or joined to something?"
        )
    return None


def new_key(tenant: str, scope: Scope, name: str, now_ms: int) -> tuple[str, ApiKey]:
    """Mint a key: the full key (shown once) and its stored record.

    Raises:
        ConfigError: the tenant or name is not 1-64 characters of [A-Za-z0-9._@-].
    """
    _check_names(tenant, name)
    full = generate_key()
    key_id, secret = parse_key(full) or ("", "")
    return full, ApiKey(key_id, tenant, scope, name, hash_secret(secret), now_ms)


class KeyStore(ABC):
    """Where key records live."""

    @abstractmethod
    async def all(self) -> dict[str, ApiKey]:
        """Every key record by id, revoked ones included."""

    @abstractmethod
    async def add(self, key: ApiKey) -> None:
        """Store a new key record."""

    async def add_if_absent(self, key: ApiKey) -> bool:
        """Store ``key`` unless a record with its id exists; whether it was stored."""
        if key.key_id in await self.all():
            return False
        await self.add(key)
        return True

    async def revoke(self, key_id: str, now_ms: int) -> ApiKey:
        """Mark a key revoked; servers stop accepting it at their next reload.

        Raises:
            ConfigError: ``key_id`` is not a key id, or no key has it.
        """
        if not _KEY_ID.fullmatch(key_id):
            raise ConfigError(f"{key_id!r} is not a key id: the 8 lowercase hex digits after 'sgk_'")
        key = (await self.all()).get(key_id)
        if key is None:
            raise ConfigError(f"no key with id {key_id!r} (see 'spendgate keys list')")
        revoked = replace(key, revoked_ms=key.revoked_ms or now_ms)
        await self._put(revoked)
        return revoked

    @abstractmethod
    async def _put(self, key: ApiKey) -> None: ...

    async def close(self) -> None:
        """Release connections."""
        return


class RedisKeyStore(KeyStore):
    """Key records in one Redis hash shared by the fleet."""

    KEY = API_KEYS

    def __init__(self, client: RedisClient, *, owns_client: bool = True) -> None:
        self._client = client
        # False when the process's shared client was given: its owner closes it.
        self._owns_client = owns_client

    @classmethod
    def from_url(cls, url: str, timeout_seconds: float = 0.5) -> RedisKeyStore:
        """Connect lazily to ``url``."""
        # connect() also understands redis+cluster:// and turns redis-py's retries off.
        return cls(connect(url, timeout_seconds=timeout_seconds, max_connections=8))

    async def all(self) -> dict[str, ApiKey]:
        raw = await redis_call(self._client.hgetall(self.KEY))
        return {k.decode() if isinstance(k, bytes) else k: ApiKey.from_json(v) for k, v in raw.items()}

    async def add(self, key: ApiKey) -> None:
        await self._put(key)

    async def add_if_absent(self, key: ApiKey) -> bool:
        # HSETNX: replicas starting together cannot overwrite each other (or a revocation).
        return bool(await redis_call(self._client.hsetnx(self.KEY, key.key_id, key.to_json())))

    async def _put(self, key: ApiKey) -> None:
        await redis_call(self._client.hset(self.KEY, key.key_id, key.to_json()))

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


class FileKeyStore(KeyStore):
    """Key records in a JSON file (written atomically, mode 0600): for the embedded setup."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    async def all(self) -> dict[str, ApiKey]:
        try:
            text = self._path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"--keys-file {self._path}: {exc.strerror}") from exc
        try:
            return {k: ApiKey.from_json(json.dumps(v)) for k, v in json.loads(text or b"{}").items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"--keys-file {self._path} is not a spendgate keys file: {exc}") from exc

    async def add(self, key: ApiKey) -> None:
        await self._put(key)

    async def _put(self, key: ApiKey) -> None:
        records = {k: json.loads(v.to_json()) for k, v in (await self.all()).items()}
        records[key.key_id] = json.loads(key.to_json())
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".keys-")
        except OSError as exc:
            raise ConfigError(f"--keys-file {self._path}: cannot write: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "w") as sink:
                json.dump(records, sink, indent=2, sort_keys=True)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self._path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # never leave a half-written file behind
                os.unlink(tmp)
            raise ConfigError(f"--keys-file {self._path}: cannot write: {exc.strerror}") from exc


async def install_key(
    store: KeyStore, presented: str, tenant: str, scope: Scope, name: str, now_ms: int
) -> tuple[ApiKey, bool]:
    """Store a key the operator made (e.g. mounted from a Kubernetes Secret) unless its id is known.

    Idempotent, so every replica can run it at start-up: the first writes the record,
    the others find it. A revoked record stays revoked (a restart never revives a key).

    Returns:
        The stored record and whether this call added it.

    Raises:
        ConfigError: ``presented`` is not a well-formed key, the tenant or name is not
            1-64 characters of [A-Za-z0-9._@-], or the id is stored with another secret.
    """
    parsed = parse_key(presented)
    if parsed is None:
        raise ConfigError(
            "the admin key is not of the form sgk_<8 hex digits>_<43 characters of [A-Za-z0-9_-]>"
        )
    _check_names(tenant, name, tenant_label="--admin-key-tenant")
    key_id, secret = parsed
    record = ApiKey(key_id, tenant, scope, name, hash_secret(secret), now_ms)
    added = await store.add_if_absent(record)
    stored = record if added else (await store.all())[key_id]
    if stored.secret_sha256 != record.secret_sha256:
        raise ConfigError(f"key id {key_id} is already stored with another secret: generate a new key")
    return stored, added
