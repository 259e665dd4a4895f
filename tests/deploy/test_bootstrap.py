"""The first key of a fresh deployment: ``serve --admin-key-file`` (a mounted Kubernetes Secret).

A server bound to a non-loopback address refuses to start without keys; the admin key
file is how a fresh fleet gets its first one. Every replica stores it at start-up unless
its id is known, so the step is idempotent, and a revoked key is never revived.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import redis
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc
from spendgate_server.errors import ConfigError, StoreUnavailable
from spendgate_server.store.keys import (
    FileKeyStore,
    RedisKeyStore,
    Scope,
    generate_key,
    install_key,
    parse_key,
)
from spendgate_server.store.redis import redis_call

from tests.processes import SpendgateServer

pytestmark = pytest.mark.redis


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendgate_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def admin_update(target: str, key: str | None) -> int:
    """UpdateConfig (an admin-only RPC) with ``key``; the version written."""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    with grpc.insecure_channel(target) as channel:
        stub = config_pb2_grpc.ConfigServiceStub(channel)
        current = stub.GetConfig(cpb.GetConfigRequest(), metadata=metadata, timeout=10).config
        request = cpb.UpdateConfigRequest(etag=current.etag)
        request.enforcement_config.token_ceiling = 4000
        return stub.UpdateConfig(request, metadata=metadata, timeout=10).config.version


def test_generate_prints_one_well_formed_key_each_time() -> None:
    """``keys generate`` prints a fresh ``sgk_`` key and stores nothing (it needs no store flag)."""
    first, second = cli("keys", "generate"), cli("keys", "generate")
    assert first.returncode == second.returncode == 0, first.stderr
    keys = [first.stdout.strip(), second.stdout.strip()]
    assert all(parse_key(key) for key in keys)
    assert keys[0] != keys[1]


async def test_install_key_is_idempotent_and_never_revives_a_revoked_key(tmp_path: Path) -> None:
    """The first install adds the record; later ones find it; a revoked record stays revoked."""
    store = FileKeyStore(str(tmp_path / "keys.json"))
    key = generate_key()
    record, added = await install_key(store, key, "acme", Scope.ADMIN, "admin-key-file", 1_000)
    assert (added, record.tenant, record.scope, record.created_ms) == (True, "acme", Scope.ADMIN, 1_000)
    again, added = await install_key(store, key, "acme", Scope.ADMIN, "admin-key-file", 2_000)
    assert (added, again) == (False, record)
    await store.revoke(record.key_id, 3_000)
    revoked, added = await install_key(store, key, "acme", Scope.ADMIN, "admin-key-file", 4_000)
    assert (added, revoked.revoked_ms) == (False, 3_000)


async def test_install_key_refuses_an_id_stored_with_another_secret(redis_url: str) -> None:
    """Two keys sharing an id (a hand-edited Secret) are refused, not silently merged."""
    store = RedisKeyStore.from_url(redis_url)
    try:
        key = generate_key()
        await install_key(store, key, "default", Scope.ADMIN, "admin-key-file", 1)
        other = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
        with pytest.raises(ConfigError, match="already stored with another secret"):
            await install_key(store, other, "default", Scope.ADMIN, "admin-key-file", 2)
    finally:
        await store.close()


def test_fleet_on_a_network_address_starts_from_the_admin_key_file(
    spendgate: Callable[..., SpendgateServer], redis_url: str, tmp_path: Path
) -> None:
    """Two replicas bound to 0.0.0.0 with an empty Redis start; the key file's key is admin, others are
    refused, and the key is stored once."""
    key = generate_key()
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")  # kubectl create secret --from-file keeps a trailing newline
    # Bound to every interface, as in a pod: the case where a server without keys refuses to start.
    network = ("--host", "0.0.0.0")  # noqa: S104
    flags = (*network, "--store", "redis", "--redis-url", redis_url, "--admin-key-file", str(key_file))
    first = spendgate(*flags, "--admin-key-tenant", "acme")
    second = spendgate(*flags, "--admin-key-tenant", "acme")
    assert admin_update(first.target, key) == 1
    assert admin_update(second.target, key) == 2
    with pytest.raises(grpc.RpcError) as refused:
        admin_update(first.target, None)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    events = [e for s in (first, second) for e in s.log_events() if e.get("event") == "admin_key"]
    added = [bool(e["added"]) for e in events]
    assert sorted(added) == [False, True]
    listing = cli("keys", "list", "--redis-url", redis_url)
    assert listing.returncode == 0, listing.stderr
    (line,) = listing.stdout.splitlines()
    assert line.split()[:4] == [key.split("_")[1], "acme", "admin", "active"]


@pytest.mark.parametrize(
    ("content", "flags", "message"),
    [
        ("not-a-key", ("--store", "redis"), "does not hold a spendgate key"),
        ("sgk_0123abcd_short", ("--store", "redis"), "does not hold a spendgate key"),
        (None, ("--store", "redis"), "--admin-key-file: cannot read"),
        (generate_key(), ("--store", "memory"), "--admin-key-file needs a key store"),
    ],
)
def test_a_bad_admin_key_file_is_one_line_exit_2_and_never_echoed(
    tmp_path: Path, redis_url: str, content: str | None, flags: tuple[str, ...], message: str
) -> None:
    """A missing, malformed or unusable key file stops serve with exit 2 and one line naming the flag,
    without printing what the file holds."""
    key_file = tmp_path / "key"
    if content is not None:
        key_file.write_text(content)
    result = cli(
        "serve",
        *flags,
        *("--redis-url", redis_url, "--port", "0", "--metrics-port", "0", "--admin-key-file", str(key_file)),
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert message in line
    if content:
        assert content not in line


@pytest.mark.parametrize("evaluator", ["on", "off"])
def test_without_a_key_a_network_bound_server_still_refuses_to_start(redis_url: str, evaluator: str) -> None:
    """The safe default stands: no keys, no --admin-key-file, not loopback -> exit 2 naming the fix, also
    with the policy evaluator running (as in the Kubernetes pods: it used to swallow the shutdown)."""
    flush = redis.Redis.from_url(redis_url)
    flush.flushall()
    flush.close()
    result = cli(
        "serve",
        *("--host", "0.0.0.0", "--port", "0", "--metrics-port", "0", "--store", "redis"),  # noqa: S104
        *("--redis-url", redis_url, "--evaluator", evaluator),
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()[-1:]
    assert "no API keys exist" in line


async def test_a_cancelled_redis_call_stays_a_cancellation() -> None:
    """redis-py reports a read cut short by cancellation as a timeout; redis_call turns it back into the
    cancellation, so a loop retrying on StoreUnavailable still ends when cancelled."""
    started = asyncio.Event()

    async def read_cut_short() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise redis.exceptions.TimeoutError("Timeout reading from 127.0.0.1:6379") from None

    async def retrying_loop() -> None:
        while True:
            with contextlib.suppress(StoreUnavailable):
                await redis_call(read_cut_short())

    task = asyncio.create_task(retrying_loop())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=30)
    # Outside a cancellation the same error is an outage, as before.
    with pytest.raises(StoreUnavailable, match="Timeout reading"):
        await redis_call(_raise(redis.exceptions.TimeoutError("Timeout reading from 127.0.0.1:6379")))


async def _raise(exc: Exception) -> None:
    raise exc
