"""Move records from the key schema before store/keyspace.py to it.

The old schema put every per-tenant record at ``sg:{<a>:<b>}...``, where a session
(``a`` tenant, ``b`` session id) could take the key of a config (``sg:{cfg:<tenant>}``),
a log stream (``sg:{journal:<tenant>}``) or insights (``sg:{ins:<tenant>}:...``). Each
old key is classified by its shape, and for the ambiguous bare ``sg:{<a>:<b>}`` by its
type (a stream is a log; a hash with a ``v`` field under ``cfg`` is a config; anything
else is a session), then moved with DUMP/RESTORE (value, consumer groups and TTL kept)
and deleted. A record whose new key already exists is left in place and reported.
Run it with every server and worker stopped: a server of the new version never reads
the old keys, and one of the old version would write them again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster

from spendgate_server.store import keyspace
from spendgate_server.store.redis import RedisClient, redis_call

__all__ = ["MigrationReport", "Moved", "migrate_keyspace", "new_key_for"]

_OLD_API_KEYS = "api-keys"
_OLD_CONFIG_TAG = "cfg"
_OLD_INSIGHTS_TAG = "ins"
_OLD_LOGS = ("journal", "violations")


class Moved(enum.Enum):
    """What happened to one old key."""

    MOVED = "moved"
    KEPT = "kept"  # the new key already exists: nothing was overwritten
    GONE = "gone"  # it expired or was deleted between the scan and the move


@dataclass
class MigrationReport:
    """Every old key found, where it goes, and what happened to it."""

    moves: list[tuple[str, str, Moved]] = field(default_factory=list)
    # Keys under the namespace that are neither old nor new records (left alone).
    unknown: list[str] = field(default_factory=list)

    def count(self, outcome: Moved) -> int:
        """How many keys had ``outcome``."""
        return sum(1 for _, _, o in self.moves if o is outcome)


def new_key_for(old: str, type_of: str, has_version: bool, namespace: str = keyspace.NAMESPACE) -> str | None:
    """The new key of an old-schema key, or None when ``old`` is not one.

    Args:
        old: the key as the old schema wrote it.
        type_of: its Redis type (``hash``, ``stream``, ...), for the ambiguous shapes.
        has_version: whether it is a hash with a ``v`` field (a config's version counter).
        namespace: the key namespace (``sg``).
    """
    head = f"{namespace}:"
    if not old.startswith(head):
        return None
    rest = old[len(head) :]
    if rest == _OLD_API_KEYS:
        return f"{namespace}:{keyspace.Kind.API_KEYS}"
    policies = f"{keyspace.Kind.POLICIES}:"
    if rest.startswith(policies + "{"):
        tag, suffix = _tag_and_suffix(rest[len(policies) :])
        old_tag, colon, tenant = tag.partition(":")
        if old_tag != _OLD_CONFIG_TAG or not colon:
            return None
        return _config(f"{namespace}:{keyspace.Kind.POLICIES}", tenant, suffix)
    if rest.endswith(":tenants") and "{" not in rest and rest[: -len(":tenants")] in _OLD_LOGS:
        return keyspace.log_registry_key(rest[: -len(":tenants")], namespace)
    if not rest.startswith("{"):
        return None
    tag, suffix = _tag_and_suffix(rest)
    a, colon, b = tag.partition(":")  # old tenants never hold ':'; session ids may
    if not colon:
        return None
    if a == _OLD_INSIGHTS_TAG and (suffix == ":top" or suffix.startswith((":top:", ":s:", ":ts:"))):
        return keyspace.insights_key(b, *suffix[1:].split(":", 1), namespace=namespace)
    if a in _OLD_LOGS and suffix.startswith(":u:"):
        return keyspace.log_marker_key(a, b, suffix[3:], namespace)
    if a == _OLD_CONFIG_TAG and suffix.startswith(":h:"):
        return keyspace.config_history_key(f"{namespace}:{keyspace.Kind.CONFIG}", b, suffix[3:])
    if suffix == ":exp":
        return keyspace.session_keys(a, b, namespace)[1]
    if suffix:
        return None
    if type_of == "stream" and a in _OLD_LOGS:
        return keyspace.log_stream_key(a, b, namespace)
    if a == _OLD_CONFIG_TAG and type_of == "hash" and has_version:
        return keyspace.config_key(f"{namespace}:{keyspace.Kind.CONFIG}", b)
    return keyspace.session_keys(a, b, namespace)[0]


def _tag_and_suffix(rest: str) -> tuple[str, str]:
    """``{<tag>}<suffix>`` split in two (old ids never held braces)."""
    close = rest.find("}")
    return rest[1:close], rest[close + 1 :]


def _config(prefix: str, tenant: str, suffix: str) -> str | None:
    if not suffix:
        return keyspace.config_key(prefix, tenant)
    if suffix.startswith(":h:"):
        return keyspace.config_history_key(prefix, tenant, suffix[3:])
    return None


def _is_new(key: str, namespace: str) -> bool:
    kinds = tuple(f"{namespace}:{kind}:{{" for kind in keyspace.Kind)
    return key.startswith(kinds) or key == f"{namespace}:{keyspace.Kind.API_KEYS}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def migrate_keyspace(
    client: RedisClient, *, namespace: str = keyspace.NAMESPACE, dry_run: bool = False
) -> MigrationReport:
    """Move every old-schema key under ``namespace`` to its new key.

    With ``dry_run`` nothing changes; the report says what would move (as MOVED, or
    KEPT when the new key exists).

    Raises:
        StoreUnavailable: Redis failed; keys moved so far stay moved, and running it
            again continues (a moved key is no longer found under its old name).
    """
    report = MigrationReport()
    scan: Any = (
        client.scan_iter(match=f"{namespace}:*", count=1000)
        if not isinstance(client, RedisCluster)
        else client.scan_iter(match=f"{namespace}:*", count=1000, target_nodes=RedisCluster.PRIMARIES)
    )
    old_keys = sorted({_text(k) async for k in scan} - {""})
    for old in old_keys:
        type_of = _text(await redis_call(client.type(old)))
        has_version = type_of == "hash" and bool(await redis_call(client.hexists(old, "v")))
        new = new_key_for(old, type_of, has_version, namespace)
        if new is None:
            if not _is_new(old, namespace):
                report.unknown.append(old)
            continue
        if await redis_call(client.exists(new)):
            report.moves.append((old, new, Moved.KEPT))
            continue
        if dry_run:
            report.moves.append((old, new, Moved.MOVED))
            continue
        report.moves.append((old, new, await _move(client, old, new)))
    return report


async def _move(client: RedisClient, old: str, new: str) -> Moved:
    payload = await redis_call(client.dump(old))
    ttl_ms = await redis_call(client.pttl(old))
    if payload is None or ttl_ms == -2:
        return Moved.GONE
    # RESTORE without REPLACE: it fails rather than overwrite a key written meanwhile.
    await redis_call(client.restore(new, max(int(ttl_ms), 0), payload))
    await redis_call(client.delete(old))
    return Moved.MOVED
