"""The authenticator's mode is fixed by its first load; losing every key refuses every call."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from spendgate_server.rpc.auth import DEV_PRINCIPAL, Authenticator, AuthError
from spendgate_server.store.keys import ApiKey, KeyStore, Scope, new_key
from structlog.testing import capture_logs

DECIDE = "/spendgate.v1.DecisionService/Decide"
UPDATE_CONFIG = "/spendgate.v1.ConfigService/UpdateConfig"
HEALTH = "/grpc.health.v1.Health/Check"


class ListKeyStore(KeyStore):
    """Key records in a dict the test edits."""

    def __init__(self) -> None:
        self.records: dict[str, ApiKey] = {}

    async def all(self) -> dict[str, ApiKey]:
        return dict(self.records)

    async def add(self, key: ApiKey) -> None:
        self.records[key.key_id] = key

    async def _put(self, key: ApiKey) -> None:
        self.records[key.key_id] = key


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def refusal(auth: Authenticator, metadata: list[tuple[str, str]], method: str = UPDATE_CONFIG) -> AuthError:
    with pytest.raises(AuthError) as info:
        auth.authenticate(metadata, method)
    return info.value


async def test_a_server_that_started_with_keys_never_opens() -> None:
    """Keys gone at run time: every call is UNAUTHENTICATED, even with a key that worked, till they return."""
    store = ListKeyStore()
    full, record = new_key("acme", Scope.ADMIN, "ops", 0)
    await store.add(record)
    registry = CollectorRegistry()
    failures = Counter("failures", "", ["reason"], registry=registry)
    missing = Gauge("missing", "", registry=registry)
    auth = Authenticator(store, allow_open_mode=True, failures=failures, keys_missing=missing)
    await auth.load()
    assert not auth.open_mode
    assert auth.authenticate(bearer(full), UPDATE_CONFIG).tenant == "acme"

    store.records.clear()
    with capture_logs() as logs:
        await auth.load()
        await auth.load()
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["api_keys_missing"]
    assert not auth.open_mode and auth.keys_missing
    assert registry.get_sample_value("missing") == 1
    for metadata in ([], bearer(full)):
        error = refusal(auth, metadata)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "no_keys")
    assert registry.get_sample_value("failures_total", {"reason": "no_keys"}) == 2
    # Probes stay answerable: they carry no tenant and change nothing.
    assert auth.authenticate([], HEALTH) is DEV_PRINCIPAL

    await store.add(record)
    with capture_logs() as logs:
        await auth.load()
    assert [e["event"] for e in logs] == ["api_keys_restored"]
    assert registry.get_sample_value("missing") == 0
    assert auth.authenticate(bearer(full), UPDATE_CONFIG).tenant == "acme"
    assert refusal(auth, []).reason == "missing"


async def test_an_open_server_stays_open_and_says_keys_are_ignored() -> None:
    """Started with no keys on loopback: open for its lifetime; a key created later is logged, once."""
    store = ListKeyStore()
    auth = Authenticator(store, allow_open_mode=True)
    await auth.load()
    assert auth.open_mode
    _, record = new_key("acme", Scope.CLIENT, "agent", 0)
    await store.add(record)
    with capture_logs() as logs:
        await auth.load()
        await auth.load()
    assert [e["event"] for e in logs] == ["api_keys_ignored_in_open_mode"]
    assert auth.open_mode
    assert auth.authenticate([], UPDATE_CONFIG) is DEV_PRINCIPAL


async def test_before_the_first_load_every_call_is_refused() -> None:
    """No mode is assumed before the key table was read: nothing is open by default."""
    auth = Authenticator(ListKeyStore(), allow_open_mode=True)
    assert refusal(auth, [], DECIDE).code is grpc.StatusCode.UNAUTHENTICATED


async def test_open_mode_not_allowed_and_no_keys_refuses() -> None:
    """Off loopback without --insecure, an empty key table never means open."""
    registry = CollectorRegistry()
    missing = Gauge("missing", "", registry=registry)
    auth = Authenticator(ListKeyStore(), allow_open_mode=False, keys_missing=missing)
    with capture_logs() as logs:
        await auth.load()
    # Nothing was lost at start-up: the key-loss event is for a server that had keys.
    assert logs == []
    assert not auth.open_mode and auth.keys_missing
    assert registry.get_sample_value("missing") == 1
    assert refusal(auth, [], DECIDE).reason == "no_keys"


async def test_a_verified_key_is_checked_again_after_each_load() -> None:
    """A key that authenticated is remembered only until the next load: revoked or replaced, it is refused."""
    store = ListKeyStore()
    client_key, client = new_key("acme", Scope.CLIENT, "app", 0)
    await store.add(client)
    auth = Authenticator(store, allow_open_mode=False)
    await auth.load()
    for _ in range(2):  # verified, then remembered: the same answer both times
        principal = auth.authenticate(bearer(client_key), DECIDE)
        assert (principal.tenant, principal.scope, principal.key_id) == ("acme", Scope.CLIENT, client.key_id)
        # The scope is checked per method, remembered or not.
        assert refusal(auth, bearer(client_key)).code is grpc.StatusCode.PERMISSION_DENIED

    await store.revoke(client.key_id, 1)
    await auth.load()
    assert refusal(auth, bearer(client_key), DECIDE).reason == "revoked"

    store.records.clear()
    other_key, other = new_key("acme", Scope.ADMIN, "ops", 0)
    await store.add(other)
    await auth.load()
    assert refusal(auth, bearer(client_key), DECIDE).reason == "unknown"
    assert auth.authenticate(bearer(other_key), UPDATE_CONFIG).scope is Scope.ADMIN
