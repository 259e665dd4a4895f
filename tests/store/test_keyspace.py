"""The key schema: no tenant, session, project or log id can form another record's key.

Every Redis record kind is built here from its ids, exactly as its store builds it; the
property is that the map from (record kind, role, ids) to key is injective, and that
each multi-key step's keys share one Redis Cluster slot.
"""

from __future__ import annotations

from urllib.parse import unquote

from hypothesis import example, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot
from spendgate_server.store import SessionKey
from spendgate_server.store.keys import RedisKeyStore
from spendgate_server.store.keyspace import (
    API_KEYS,
    CONFIGS_PREFIX,
    POLICIES_PREFIX,
    Kind,
    config_history_key,
    config_key,
    encode,
    insights_key,
    live_sessions_key,
    log_intent_keys,
    log_marker_key,
    log_registry_key,
    log_stream_key,
)
from spendgate_server.store.policies import POLICY_KEY_PREFIX
from spendgate_server.store.redis import session_keys

# Every word the schema (or the schema before it) gives a meaning to.
RESERVED = sorted(
    {k.value for k in Kind}
    | {"sg", "exp", "h", "u", "top", "s", "ts", "tenants", "api-keys", "journal", "violations", "cfg"}
    | {"i", "t"}
    | {"ins", "pol", "default", "webhook", "evaluator", "%", "%3A", "%7B", "{", "}", ":", "", "sg:ses"}
)
# What the service accepts (rpc/validation.py, store/keys.py), plus the delimiters.
ID_CHARS = "AZaz09._@-:/+={}%~ "
ids = st.one_of(
    st.sampled_from(RESERVED),
    st.text(alphabet=ID_CHARS, min_size=0, max_size=12),
    st.lists(st.sampled_from(RESERVED), min_size=1, max_size=4).map(":".join),
    st.lists(st.sampled_from([*RESERVED, "{x}", "a}b", "{"]), min_size=1, max_size=3).map("}{".join),
    st.text(max_size=8),  # anything at all, unicode included
)


def records(tenant: str, session: str, project: str, log: str, uid: str) -> dict[tuple[str, ...], str]:
    """Every record kind's key(s) for these ids, keyed by what the record is."""
    hkey, zkey = session_keys(SessionKey(tenant, session), "sg")
    out = {
        ("session hash", tenant, session): hkey,
        ("session expiry", tenant, session): zkey,
        ("api keys",): RedisKeyStore.KEY,
        ("log registry", log): log_registry_key(log),
        ("log stream", log, tenant): log_stream_key(log, tenant),
        ("log marker", log, tenant, uid): log_marker_key(log, tenant, uid),
        ("log intent times", log, tenant): log_intent_keys(log, tenant)[0],
        ("log intent payloads", log, tenant): log_intent_keys(log, tenant)[1],
        ("insights top", tenant): insights_key(tenant, "top"),
        ("live sessions", tenant): live_sessions_key(tenant),
        ("insights top of project", tenant, project): insights_key(tenant, "top", project),
        ("insights summary", tenant, session): insights_key(tenant, "s", session),
        ("insights series", tenant, session): insights_key(tenant, "ts", session),
    }
    for name, prefix in (("config", CONFIGS_PREFIX), ("policies", POLICY_KEY_PREFIX)):
        out[(name, tenant)] = config_key(prefix, tenant)
        out[(f"{name} history", tenant, project)] = config_history_key(prefix, tenant, project)
    return out


@settings(max_examples=1_000, deadline=None)
@given(st.tuples(ids, ids, ids, ids, ids), st.tuples(ids, ids, ids, ids, ids))
@example(("cfg", "acme", "", "journal", "u"), ("acme", "x", "", "journal", "u"))  # issue 18: cfg/acme
@example(("journal", "beta", "", "journal", "u"), ("beta", "s", "", "journal", "u"))  # issue 18: journal/beta
@example(("a:b", "c", "", "journal", "u"), ("a", "b:c", "", "journal", "u"))
@example(("a}", "b", "p", "journal", "u"), ("a", "}b", "p", "journal", "u"))
@example(("t", "top", "top", "journal", "u"), ("t", "s", "", "journal", "u"))
def test_keys_of_different_records_never_coincide(
    first: tuple[str, str, str, str, str], second: tuple[str, str, str, str, str]
) -> None:
    """Two sets of ids: equal keys only for the same record with the same ids."""
    keys: dict[str, tuple[str, ...]] = {}
    for record, key in [*records(*first).items(), *records(*second).items()]:
        seen = keys.setdefault(key, record)
        assert seen == record, f"{seen} and {record} share the key {key!r}"


@settings(max_examples=500, deadline=None)
@given(ids.filter(bool), ids.filter(bool), ids, ids)
def test_every_multi_key_step_is_single_slot(tenant: str, session: str, project: str, uid: str) -> None:
    """A session's two keys, a config and its history, a stream, its markers and its intents: one
    hash slot each.

    Tenants and session ids are never empty (the service refuses them), so no tag is empty.
    """
    hkey, zkey = session_keys(SessionKey(tenant, session), "sg")
    assert key_slot(hkey.encode()) == key_slot(zkey.encode())
    for prefix in (CONFIGS_PREFIX, POLICIES_PREFIX):
        assert key_slot(config_key(prefix, tenant).encode()) == key_slot(
            config_history_key(prefix, tenant, project).encode()
        )
    for log in ("journal", "violations"):
        stream = key_slot(log_stream_key(log, tenant).encode())
        assert stream == key_slot(log_marker_key(log, tenant, uid).encode())
        assert [stream, stream] == [key_slot(k.encode()) for k in log_intent_keys(log, tenant)]
    top = key_slot(insights_key(tenant, "top").encode())
    assert top == key_slot(insights_key(tenant, "s", session).encode())
    assert top == key_slot(insights_key(tenant, "top", project).encode())


@settings(max_examples=500, deadline=None)
@given(ids)
def test_encoding_is_reversible_and_free_of_delimiters(value: str) -> None:
    """An encoded id decodes back to itself and holds no ':', '{' or '}'."""
    encoded = encode(value)
    assert unquote(encoded) == value
    assert not set(encoded) & set(":{}")


def test_accepted_ids_stay_readable() -> None:
    """Ids the service accepts appear as themselves; a session id's ':' is the one escape."""
    assert session_keys(SessionKey("acme", "agent-1.run/7@x+y=z"), "sg") == [
        "sg:ses:{acme:agent-1.run/7@x+y=z}",
        "sg:ses:{acme:agent-1.run/7@x+y=z}:exp",
    ]
    assert session_keys(SessionKey("acme", "a:b"), "sg")[0] == "sg:ses:{acme:a%3Ab}"
    assert config_key(CONFIGS_PREFIX, "acme") == "sg:cfg:{acme}"
    assert config_history_key(POLICIES_PREFIX, "acme", "") == "sg:pol:{acme}:h:"
    assert log_stream_key("journal", "beta") == "sg:log:{journal:beta}"
    assert log_intent_keys("journal", "beta") == ("sg:log:{journal:beta}:i:t", "sg:log:{journal:beta}:i")
    assert log_registry_key("violations") == "sg:logreg:{violations}"
    assert insights_key("acme", "top", "batch") == "sg:ins:{acme}:top:batch"
    assert live_sessions_key("acme") == "sg:live:{acme}"
    assert API_KEYS == "sg:apikeys"
