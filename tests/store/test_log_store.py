"""The journal/violation LogStore and the PolicyStore contracts: every test runs on memory and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from spendgate_server.policy.violations import PolicyType, Violation, ViolationFeed, ViolationFilter
from spendgate_server.store.configs import MemoryConfigStore
from spendgate_server.store.logs import Intent, LogStore, MemoryLogStore, entry_id_ms, parse_entry_id
from spendgate_server.store.policies import POLICY_KEY_PREFIX, PolicyConflict, PolicyStore
from spendgate_server.store.redis import RedisConnection
from spendgate_server.store.redis_configs import RedisConfigStore
from spendgate_server.store.redis_logs import RedisLogStore

from tests.conftest import STORES

NOW = 1_800_000_000_000
LOG = "journal"
TTL = 3_600_000


@pytest.fixture(params=[*STORES, pytest.param("redis-pipelined", marks=pytest.mark.redis)])
async def logs(request: pytest.FixtureRequest) -> AsyncIterator[LogStore]:
    """Each log store implementation, empty; Redis also with appends on the pipelined connection."""
    connection = None
    if request.param == "memory":
        store: LogStore = MemoryLogStore()
    elif request.param == "redis":
        store = RedisLogStore.from_url(request.getfixturevalue("redis_url"), poll_seconds=0.01)
    else:
        connection = RedisConnection(request.getfixturevalue("redis_url"), timeout_seconds=2)
        assert connection.hot_path is not None
        store = RedisLogStore(
            connection.client, poll_seconds=0.01, owns_client=False, hot_path=connection.hot_path
        )
    yield store
    await store.close()
    if connection is not None:
        await connection.aclose()


@pytest.fixture(params=STORES)
async def policy_store(request: pytest.FixtureRequest) -> AsyncIterator[PolicyStore]:
    """Each policy store backend, empty."""
    if request.param == "memory":
        store = PolicyStore(MemoryConfigStore())
    else:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
        store = PolicyStore(RedisConfigStore(client, key_prefix=POLICY_KEY_PREFIX))
    yield store
    await store.close()


async def append(
    logs: LogStore, tenant: str, *uids: str, max_entries: int = 1000, now: int = NOW
) -> list[str]:
    result = await logs.append(
        LOG,
        tenant,
        [(uid, f"payload-{uid}") for uid in uids],
        max_entries=max_entries,
        unique_ttl_ms=TTL,
        now_ms=now,
    )
    return list(result.entry_ids)


async def test_append_is_unique_per_uid_and_ordered(logs: LogStore) -> None:
    """A uid already appended adds nothing; entry ids increase; tenants are listed."""
    first = await append(logs, "t", "a", "b")
    again = await append(logs, "t", "b", "c")
    assert first[0] and first[1] and again[0] == "" and again[1]
    ids = [first[0], first[1], again[1]]
    assert [parse_entry_id(i) for i in ids] == sorted(parse_entry_id(i) for i in ids)
    assert [e.payload for e in await logs.after(LOG, "t", "0-0", 10)] == [
        "payload-a",
        "payload-b",
        "payload-c",
    ]
    await append(logs, "u", "a")
    assert sorted(await logs.tenants(LOG)) == ["t", "u"]
    assert await logs.tenants("violations") == []


async def test_retention_keeps_the_newest_entries(logs: LogStore) -> None:
    """A log bounded to N entries keeps the newest N."""
    await append(logs, "t", *(f"e{i}" for i in range(10)), max_entries=4)
    assert [e.payload for e in await logs.after(LOG, "t", "0-0", 100)] == [
        f"payload-e{i}" for i in range(6, 10)
    ]


async def test_tenants_logs_are_separate(logs: LogStore) -> None:
    """Equal uids of two tenants never meet; a tenant reads only its own entries."""
    assert (await append(logs, "t", "x"))[0]
    assert (await append(logs, "u", "x"))[0]
    assert [e.payload for e in await logs.after(LOG, "u", "0-0", 10)] == ["payload-x"]
    assert len(await logs.after(LOG, "t", "0-0", 10)) == 1


async def intend(logs: LogStore, tenant: str, uid: str, at: int, payload: str = "") -> None:
    await logs.put_intent(LOG, tenant, uid, payload or f"intent-{uid}", now_ms=at, ttl_ms=TTL)


async def test_intents_are_listed_once_stale_oldest_first(logs: LogStore) -> None:
    """An intent is stale once written before the bound; the oldest come first, at most count,
    per tenant with any; a tenant with only intents is listed among the tenants."""
    await intend(logs, "t", "b", NOW + 20)
    await intend(logs, "t", "a", NOW + 10)
    await intend(logs, "t", "c", NOW + 30)
    await intend(logs, "u", "a", NOW + 40)
    assert sorted(await logs.tenants(LOG)) == ["t", "u"]
    assert await logs.stale_intents(LOG, ["t", "u"], before_ms=NOW + 10, count=10) == {}
    assert await logs.stale_intents(LOG, ["t", "u", "v"], before_ms=NOW + 31, count=10) == {
        "t": [
            Intent("a", NOW + 10, "intent-a"),
            Intent("b", NOW + 20, "intent-b"),
            Intent("c", NOW + 30, "intent-c"),
        ]
    }
    stale = await logs.stale_intents(LOG, ["t", "u"], before_ms=NOW + 41, count=2)
    assert stale == {
        "t": [Intent("a", NOW + 10, "intent-a"), Intent("b", NOW + 20, "intent-b")],
        "u": [Intent("a", NOW + 40, "intent-a")],
    }
    assert await logs.stale_intents(LOG, [], before_ms=NOW + 41, count=2) == {}
    assert await logs.stale_intents("violations", ["t"], before_ms=NOW + 41, count=2) == {}


async def test_a_rewritten_intent_replaces_the_first(logs: LogStore) -> None:
    """Writing a uid's intent again keeps one intent: the newer payload and time."""
    await intend(logs, "t", "a", NOW, "first")
    await intend(logs, "t", "a", NOW + 5, "second")
    assert await logs.stale_intents(LOG, ["t"], before_ms=NOW + 100, count=10) == {
        "t": [Intent("a", NOW + 5, "second")]
    }


async def test_an_append_removes_the_intents_of_its_uids(logs: LogStore) -> None:
    """Appending a uid removes its intent, whether the entry is new or was appended before; other
    uids' intents, and other tenants', stay."""
    await append(logs, "t", "old")
    for uid in ("old", "new", "other"):
        await intend(logs, "t", uid, NOW)
    await intend(logs, "u", "new", NOW)
    assert await append(logs, "t", "old", "new") == ["", await logs.last_id(LOG, "t")]
    assert await logs.stale_intents(LOG, ["t", "u"], before_ms=NOW + 1, count=10) == {
        "t": [Intent("other", NOW, "intent-other")],
        "u": [Intent("new", NOW, "intent-new")],
    }


async def test_drop_removes_only_the_intent_that_was_read(logs: LogStore) -> None:
    """A drop names each intent by uid and time: one written since (a newer settle) is kept."""
    await intend(logs, "t", "a", NOW)
    await intend(logs, "t", "b", NOW)
    await intend(logs, "t", "b", NOW + 7)  # rewritten after the sweeper read it at NOW
    assert await logs.drop_intents(LOG, "t", [("a", NOW), ("b", NOW), ("gone", NOW)]) == 1
    assert await logs.drop_intents(LOG, "t", []) == 0
    assert await logs.drop_intents(LOG, "nobody", [("a", NOW)]) == 0
    assert await logs.stale_intents(LOG, ["t"], before_ms=NOW + 100, count=10) == {
        "t": [Intent("b", NOW + 7, "intent-b")]
    }


async def test_group_delivers_once_and_keeps_unacked_pending(logs: LogStore) -> None:
    """Each entry is delivered to a group once; unacknowledged entries stay pending until acked."""
    await append(logs, "t", "a", "b", "c")
    got = await logs.read_group(LOG, "t", "g", "w1", 2, NOW)
    assert [e.payload for e in got] == ["payload-a", "payload-b"]
    rest = await logs.read_group(LOG, "t", "g", "w2", 10, NOW)
    assert [e.payload for e in rest] == ["payload-c"]
    assert await logs.read_group(LOG, "t", "g", "w1", 10, NOW) == []
    assert await logs.pending(LOG, "t", "g") == 3
    await logs.ack(LOG, "t", "g", [e.entry_id for e in got])
    assert await logs.pending(LOG, "t", "g") == 1
    # Another group sees everything, independently.
    assert len(await logs.read_group(LOG, "t", "other", "w1", 10, NOW)) == 3


async def test_a_dead_consumers_entries_are_claimed(logs: LogStore) -> None:
    """Entries pending past the idle bound move to the claiming consumer; acked ones never come back."""
    await append(logs, "t", "a", "b")
    dead = await logs.read_group(LOG, "t", "g", "dead", 10, NOW)
    assert len(dead) == 2
    await logs.ack(LOG, "t", "g", [dead[0].entry_id])
    assert await logs.claim(LOG, "t", "g", "alive", 3_600_000, 10, NOW) == []
    claimed = await logs.claim(LOG, "t", "g", "alive", 0, 10, NOW)
    assert [e.payload for e in claimed] == ["payload-b"]
    await logs.ack(LOG, "t", "g", [claimed[0].entry_id])
    assert await logs.claim(LOG, "t", "g", "alive", 0, 10, NOW) == []
    assert await logs.pending(LOG, "t", "g") == 0


async def test_entries_trimmed_while_pending_are_dropped_from_the_group(logs: LogStore) -> None:
    """A pending entry the retention removed is acknowledged on claim, not returned."""
    await append(logs, "t", "a", max_entries=1)
    await logs.read_group(LOG, "t", "g", "dead", 10, NOW)
    await append(logs, "t", "b", max_entries=1, now=NOW + 1)
    assert await logs.claim(LOG, "t", "g", "alive", 0, 10, NOW) == []
    assert await logs.pending(LOG, "t", "g") == 0


async def test_oldest_unacked_covers_pending_and_undelivered(logs: LogStore) -> None:
    """The lag reference is the oldest entry not acknowledged, delivered or not; None when done."""
    assert await logs.oldest_unacked_ms(LOG, "t", "g") is None
    ids = await append(logs, "t", "a", "b")
    assert await logs.oldest_unacked_ms(LOG, "t", "g") == entry_id_ms(ids[0])
    got = await logs.read_group(LOG, "t", "g", "w", 1, NOW)
    assert await logs.oldest_unacked_ms(LOG, "t", "g") == entry_id_ms(ids[0])
    await logs.ack(LOG, "t", "g", [got[0].entry_id])
    assert await logs.oldest_unacked_ms(LOG, "t", "g") == entry_id_ms(ids[1])
    rest = await logs.read_group(LOG, "t", "g", "w", 1, NOW)
    await logs.ack(LOG, "t", "g", [rest[0].entry_id])
    assert await logs.oldest_unacked_ms(LOG, "t", "g") is None


async def test_ranges_and_cursors(logs: LogStore) -> None:
    """after/before are exclusive of the cursor; before honours its lower bound; last_id is the newest."""
    assert await logs.last_id(LOG, "t") == "0-0"
    ids = await append(logs, "t", "a", "b", "c", "d")
    assert await logs.last_id(LOG, "t") == ids[-1]
    assert [e.entry_id for e in await logs.after(LOG, "t", ids[1], 10)] == ids[2:]
    assert [e.entry_id for e in await logs.before(LOG, "t", ids[3], "0-0", 2)] == [ids[2], ids[1]]
    assert [e.entry_id for e in await logs.before(LOG, "t", "", ids[2], 10)] == [ids[3], ids[2]]
    await logs.wait(LOG, "t", ids[1], 5.0)  # entries exist after it: returns at once


async def test_nothing_follows_the_largest_stream_id(logs: LogStore) -> None:
    """after(18446744073709551615-18446744073709551615) is empty (Redis refuses that XRANGE start)."""
    await append(logs, "t", "a")
    largest = f"{2**64 - 1}-{2**64 - 1}"
    assert await logs.after(LOG, "t", largest, 10) == []
    assert [e.payload for e in await logs.after(LOG, "t", f"{2**64 - 1}-0", 10)] == []


# --- policies -------------------------------------------------------------------------------


async def test_policies_compare_and_set_with_history(policy_store: PolicyStore) -> None:
    """Policies are versioned per tenant; a stale etag conflicts and changes nothing; history is kept."""
    assert await policy_store.get("t") is None
    first = await policy_store.put("t", '{"a": 1}', "", "alice", 1)
    second = await policy_store.put("t", '{"a": 2}', first.etag, "bob", 2)
    with pytest.raises(PolicyConflict) as info:
        await policy_store.put("t", '{"a": 3}', first.etag, "eve", 3)
    assert info.value.current_etag == second.etag and "policies" in str(info.value)
    stored = await policy_store.get("t")
    assert stored is not None and stored.policies_json == '{"a": 2}' and stored.updated_by == "bob"
    assert [h.version for h in await policy_store.history("t")] == [2, 1]
    assert await policy_store.versions(["t", "u"]) == {"t": 2, "u": 0}


# --- the violations feed ----------------------------------------------------------------------


def violation(n: int, kind: PolicyType = PolicyType.APPROVED_MODELS, session: str = "s") -> Violation:
    return Violation(f"v{n}", kind, f"violation {n}", NOW, f"d{n}", session, "", "m", "m", "", "", "", 0, 1)


async def test_feed_stores_an_id_once_and_pages_newest_first(logs: LogStore) -> None:
    """Re-adding a violation id adds nothing; pages are newest first, filtered, and resume by token."""
    feed = ViolationFeed(logs, max_entries=1000, dedup_window_ms=TTL)
    batch = [
        violation(i, PolicyType.BANNED_PATTERNS if i % 2 else PolicyType.APPROVED_MODELS) for i in range(7)
    ]
    assert await feed.add("t", batch, NOW) == 7
    assert await feed.add("t", batch[:3], NOW + 1) == 0
    everything = ViolationFilter()
    page, token = await feed.page(
        "t", before="", since_ms=0, until_ms=None, where=everything, page_size=3, scan_limit=100
    )
    assert [v.violation_id for v in page] == ["v6", "v5", "v4"] and token
    page2, token2 = await feed.page(
        "t", before=token, since_ms=0, until_ms=None, where=everything, page_size=10, scan_limit=100
    )
    assert [v.violation_id for v in page2] == ["v3", "v2", "v1", "v0"] and token2 == ""
    banned = ViolationFilter(policy_type=PolicyType.BANNED_PATTERNS)
    only, _ = await feed.page(
        "t", before="", since_ms=0, until_ms=None, where=banned, page_size=10, scan_limit=100
    )
    assert [v.violation_id for v in only] == ["v5", "v3", "v1"]
    assert all(v.create_time_ms > 0 and v.cursor for v in only)
