"""Moving a Redis written with the old key schema to store/keyspace.py's, on a real redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis
from spendgate_server.store import SessionKey
from spendgate_server.store.keys import ApiKey, RedisKeyStore, Scope
from spendgate_server.store.migrate import Moved, migrate_keyspace, new_key_for
from spendgate_server.store.policies import POLICY_KEY_PREFIX, PolicyStore
from spendgate_server.store.redis import RedisStore
from spendgate_server.store.redis_configs import RedisConfigStore
from spendgate_server.store.redis_logs import RedisLogStore

pytestmark = pytest.mark.redis

NOW = 1_800_000_000_000
RECORD = json.dumps(
    {
        "project": "",
        "config": '{"token_ceiling": 1000}',
        "version": 1,
        "updated_by": "ops",
        "update_time_ms": NOW,
    }
)
KEY = ApiKey("0a1b2c3d", "acme", Scope.ADMIN, "ops", "ab" * 32, NOW)


def write_old_schema(r: redis.Redis) -> None:
    """What the previous version kept, key for key, including the collisions' ambiguous shapes."""
    r.hset("sg:{acme:s1}", mapping={"spent": 700, "reserved": 300, "tools": 2, f"r:{'1' * 32}": 300})
    r.zadd("sg:{acme:s1}:exp", {f"r:{'1' * 32}": NOW + 600_000})
    r.pexpire("sg:{acme:s1}", 3_600_000)
    r.hset("sg:{acme:run:7}", mapping={"spent": 5})  # a session id holding ':'
    r.hset("sg:{cfg:acme}", mapping={"v": 1, "e:": "1", "p:": RECORD})  # tenant acme's config
    r.lpush("sg:{cfg:acme}:h:", RECORD)
    r.hset("sg:{cfg:globex}", mapping={"spent": 9})  # tenant cfg's session 'globex': no 'v'
    r.hset(
        "sg:pol:{cfg:acme}", mapping={"v": 3, "e:": "3", "p:": RECORD.replace('"version": 1', '"version": 3')}
    )
    r.lpush("sg:pol:{cfg:acme}:h:", RECORD)
    entry = r.xadd("sg:{journal:beta}", {"p": "{}"})
    r.xgroup_create("sg:{journal:beta}", "evaluators", id="0")
    r.set("sg:{journal:beta}:u:" + "2" * 32, entry, px=3_600_000)
    r.sadd("sg:journal:tenants", "beta")
    r.hset("sg:{journal:alpha}", mapping={"spent": 1})  # tenant journal's session 'alpha'
    r.zadd("sg:{ins:acme}:top", {"s1": 1000})
    r.hset("sg:{ins:acme}:s:s1", mapping={"spend": 1000})
    r.hset("sg:api-keys", KEY.key_id, KEY.to_json())
    r.set("sg:something-else", "x")


@pytest.fixture
async def old(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    raw = redis.Redis.from_url(redis_url)
    write_old_schema(raw)
    raw.close()
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_every_old_record_moves_and_the_stores_read_it(old: aioredis.Redis) -> None:
    """After the move the new stores see the same sessions, configs, policies, journal and keys."""
    report = await migrate_keyspace(old)
    assert report.count(Moved.MOVED) == 15 and report.count(Moved.KEPT) == 0
    assert report.unknown == ["sg:something-else"]
    assert not [k for k in await old.keys("sg:{*") if k]  # no old-shape key left

    state = await RedisStore(old).session_state(SessionKey("acme", "s1"), NOW, 3_600_000)
    assert (state.spent_nano_usd, state.reserved_nano_usd, state.tool_calls, state.open_reservations) == (
        700,
        300,
        2,
        1,
    )
    assert 0 < await old.pttl("sg:ses:{acme:s1}") <= 3_600_000
    assert (await RedisStore(old).session_state(SessionKey("acme", "run:7"), NOW, 1)).spent_nano_usd == 5
    assert (await RedisStore(old).session_state(SessionKey("cfg", "globex"), NOW, 1)).spent_nano_usd == 9
    assert (await RedisStore(old).session_state(SessionKey("journal", "alpha"), NOW, 1)).spent_nano_usd == 1

    config = await RedisConfigStore(old).get("acme", "")
    assert config is not None and (config.version, config.config_json) == (1, '{"token_ceiling": 1000}')
    assert len(await RedisConfigStore(old).history("acme", "")) == 1
    policies = await PolicyStore(RedisConfigStore(old, key_prefix=POLICY_KEY_PREFIX)).get("acme")
    assert policies is not None and policies.version == 3

    logs = RedisLogStore(old)
    assert await logs.tenants("journal") == ["beta"]
    assert await logs.pending("journal", "beta", "evaluators") == 0  # the consumer group came along
    assert [g["name"] for g in await old.xinfo_groups("sg:log:{journal:beta}")] == [b"evaluators"]
    assert await old.pttl("sg:log:{journal:beta}:u:" + "2" * 32) > 0
    assert await RedisKeyStore(old).all() == {KEY.key_id: KEY}
    assert await old.zscore("sg:ins:{acme}:top", "s1") == 1000


async def test_dry_run_changes_nothing_and_a_second_run_moves_nothing(old: aioredis.Redis) -> None:
    """A dry run reports the moves without making them; after the real run nothing is left to move."""
    before = sorted(await old.keys("*"))
    dry = await migrate_keyspace(old, dry_run=True)
    assert dry.count(Moved.MOVED) == 15 and sorted(await old.keys("*")) == before
    await migrate_keyspace(old)
    again = await migrate_keyspace(old)
    assert again.moves == [] and again.unknown == ["sg:something-else"]


async def test_an_existing_new_key_is_never_overwritten(old: aioredis.Redis) -> None:
    """If the new key was already written (a new server ran first), the old record stays and is reported."""
    await old.hset("sg:cfg:{acme}", mapping={"v": 5})
    report = await migrate_keyspace(old)
    assert ("sg:{cfg:acme}", "sg:cfg:{acme}", Moved.KEPT) in report.moves
    assert await old.hget("sg:cfg:{acme}", "v") == b"5" and await old.exists("sg:{cfg:acme}")


@pytest.mark.parametrize(
    ("old_key", "type_of", "has_version", "new_key"),
    [
        ("sg:{cfg:acme}", "hash", True, "sg:cfg:{acme}"),
        ("sg:{cfg:acme}", "hash", False, "sg:ses:{cfg:acme}"),
        ("sg:{cfg:acme}:exp", "zset", False, "sg:ses:{cfg:acme}:exp"),
        ("sg:{journal:beta}", "stream", False, "sg:log:{journal:beta}"),
        ("sg:{journal:beta}", "hash", False, "sg:ses:{journal:beta}"),
        ("sg:{ins:acme}:ts:a:b", "hash", False, "sg:ins:{acme}:ts:a%3Ab"),
        ("sg:{ins:acme}", "hash", False, "sg:ses:{ins:acme}"),
        ("sg:violations:tenants", "set", False, "sg:logreg:{violations}"),
        ("sg:ses:{acme:s1}", "hash", False, None),
        ("sg:pol:{acme}", "hash", True, None),
        ("other:{a:b}", "hash", False, None),
    ],
)
def test_old_keys_are_classified_by_shape_then_type(
    old_key: str, type_of: str, has_version: bool, new_key: str | None
) -> None:
    """The ambiguous bare shape is told apart by type; keys of the new schema are not old ones."""
    assert new_key_for(old_key, type_of, has_version) == new_key


def test_cli_moves_and_names_a_missing_url(redis_url: str) -> None:
    """`spendgate migrate-keys` reports what moved (exit 0); without a Redis URL it says so (exit 2)."""
    raw = redis.Redis.from_url(redis_url)
    write_old_schema(raw)
    raw.close()
    command = [sys.executable, "-m", "spendgate_server", "migrate-keys"]
    done = subprocess.run([*command, "--redis-url", redis_url], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "moved 15 keys, kept 0 whose new key exists, 1 unknown" in done.stdout
    missing = subprocess.run(
        command, capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin"}
    )
    assert missing.returncode == 2 and "--redis-url" in missing.stderr
