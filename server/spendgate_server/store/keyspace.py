"""The one key schema of every Redis record spendgate keeps.

A key reads ``<namespace>:<kind>:{<id>[:<id>...]}[:<part>...]``:

- ``<kind>`` is a fixed word per record kind (``ses``, ``cfg``, ``pol``, ``log``,
  ``logreg``, ``ins``, ``live``); API keys, which have no id, are the one key ``sg:apikeys``.
- Every id (tenant, session, project, log name, unique id) is percent-encoded: any
  character outside ``[A-Za-z0-9._~@/+=-]`` becomes ``%XX`` of its UTF-8 bytes, so an
  encoded id never holds ``:``, ``{``, ``}`` or a bare ``%``. ``:`` then only
  separates, the first ``{...}`` is exactly the ids, and a key parses back into one
  (kind, ids, parts) triple: no tenant name, session id or project name can form
  another record's key (tests/store/test_keyspace.py checks it with random ids).
- The ids inside ``{...}`` are the Redis Cluster hash tag, and they are chosen so
  every multi-key step is single-slot: a session's hash and expiry zset share
  ``{tenant:session}``; a config's hash and histories share ``{tenant}``; a log
  stream, its unique-id markers and its intents share ``{log:tenant}``; a tenant's insights share
  ``{tenant}``.

Ids made of the characters the service accepts (rpc/validation.py) are encoded as
themselves, apart from ``:`` in session ids (``%3A``), so keys stay readable.

Keys of the schema before this one (``sg:{tenant:session}``, ``sg:{cfg:tenant}``,
``sg:{journal:tenant}``, ...) collided across tenants; ``store/migrate.py`` moves them.
"""

from __future__ import annotations

import enum
import re
from functools import lru_cache
from urllib.parse import quote

__all__ = [
    "API_KEYS",
    "CONFIGS_PREFIX",
    "NAMESPACE",
    "POLICIES_PREFIX",
    "Kind",
    "config_history_key",
    "config_key",
    "encode",
    "insights_key",
    "live_sessions_key",
    "log_intent_keys",
    "log_marker_key",
    "log_registry_key",
    "log_stream_key",
    "record_key",
    "session_keys",
]

NAMESPACE = "sg"


class Kind(enum.StrEnum):
    """The type prefix of each record kind."""

    SESSION = "ses"  # a session's state: hash + expiry zset
    CONFIG = "cfg"  # a tenant's remote configs: hash + one history list per project
    POLICIES = "pol"  # a tenant's policies: stored like configs, under their own kind
    LOG = "log"  # a tenant's log (journal, violations): stream + unique-id markers + intents
    LOG_REGISTRY = "logreg"  # the tenants that have a given log: set
    INSIGHTS = "ins"  # a tenant's session insights: rankings, summaries, series
    LIVE_SESSIONS = "live"  # a tenant's live sessions, for its session quota: sorted set
    API_KEYS = "apikeys"  # every API key record: one hash, no ids


# Characters kept as they are; everything else is %XX. No ':', '{', '}' or '%'.
_SAFE = "@/+="
_PLAIN = re.compile(r"[A-Za-z0-9._~@/+=-]*")

_SESSION = Kind.SESSION.value

API_KEYS = f"{NAMESPACE}:{Kind.API_KEYS}"
"""The hash of API key records (key id -> record)."""

CONFIGS_PREFIX = f"{NAMESPACE}:{Kind.CONFIG}"
"""Key prefix of remote configs (RedisConfigStore's default)."""

POLICIES_PREFIX = f"{NAMESPACE}:{Kind.POLICIES}"
"""Key prefix of policies (a RedisConfigStore of their own)."""


@lru_cache(maxsize=65_536)
def encode(part: str) -> str:
    """An id as it appears in a key: injective, and free of ``:``, ``{``, ``}`` and bare ``%``.

    Cached: every Decide and Settle encodes its tenant and session id.
    """
    if _PLAIN.fullmatch(part):
        return part  # the common case: nothing to escape
    return quote(part, safe=_SAFE)


def record_key(prefix: str, ids: tuple[str, ...], *parts: str) -> str:
    """``<prefix>:{<ids>}[:<parts>]``, every id and part encoded.

    ``prefix`` is ``<namespace>:<kind>``; ``ids`` form the hash tag; ``parts`` name a
    record within it (fixed words, or ids such as a project).
    """
    key = f"{prefix}:{{{':'.join(encode(i) for i in ids)}}}"
    return ":".join((key, *(encode(p) for p in parts))) if parts else key


def session_keys(tenant: str, session_id: str, namespace: str = NAMESPACE) -> list[str]:
    """The session hash and its expiry zset: one hash tag, ``{tenant:session}``."""
    hkey = f"{namespace}:{_SESSION}:{{{encode(tenant)}:{encode(session_id)}}}"
    return [hkey, hkey + ":exp"]


def config_key(prefix: str, tenant: str) -> str:
    """A tenant's config hash (version counter, etags, current records) under ``prefix``."""
    return record_key(prefix, (tenant,))


def config_history_key(prefix: str, tenant: str, project: str) -> str:
    """The revision list of one project's config ('' = the tenant's); same slot as config_key."""
    return record_key(prefix, (tenant,), "h", project)


def log_stream_key(log: str, tenant: str, namespace: str = NAMESPACE) -> str:
    """A tenant's stream of ``log`` (``journal``, ``violations``)."""
    return record_key(f"{namespace}:{Kind.LOG}", (log, tenant))


def log_marker_key(log: str, tenant: str, unique_id: str, namespace: str = NAMESPACE) -> str:
    """The marker of one appended unique id; same slot as its stream."""
    return record_key(f"{namespace}:{Kind.LOG}", (log, tenant), "u", unique_id)


def log_intent_keys(log: str, tenant: str, namespace: str = NAMESPACE) -> tuple[str, str]:
    """The intents of a tenant's ``log``: a sorted set (unique id -> time written, Unix ms) and a
    hash (unique id -> payload); same slot as its stream, so an append can remove them."""
    hkey = record_key(f"{namespace}:{Kind.LOG}", (log, tenant), "i")
    return hkey + ":t", hkey


def log_registry_key(log: str, namespace: str = NAMESPACE) -> str:
    """The set of tenants that have a ``log`` stream."""
    return record_key(f"{namespace}:{Kind.LOG_REGISTRY}", (log,))


def insights_key(tenant: str, *parts: str, namespace: str = NAMESPACE) -> str:
    """One of a tenant's insights records: ``top`` [project], ``s`` session, ``ts`` session."""
    return record_key(f"{namespace}:{Kind.INSIGHTS}", (tenant,), *parts)


def live_sessions_key(tenant: str, namespace: str = NAMESPACE) -> str:
    """The sorted set of a tenant's live sessions (session id -> expiry ms), for its quota."""
    return record_key(f"{namespace}:{Kind.LIVE_SESSIONS}", (tenant,))
