"""Authentication never fails open: a server that started with keys and loses them refuses every call.

Real processes: a private redis-server (FLUSHALL empties the key store as a Redis
restart without persistence would) or a keys file that is removed, and a real
``spendgate serve``. Every wait polls the server's own log for the event it emits,
with a deadline as a safety net; nothing sleeps for time to pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc, decision_pb2_grpc
from spendgate.v1 import decision_pb2 as pb

from tests.integration.test_security import bearer, decide_request, spendgate_cli
from tests.processes import RedisServer, SpendgateServer, free_port, scrape_metrics

POLL_SECONDS = 15.0
UPDATE = cpb.UpdateConfigRequest(enforcement_config=pb.EnforcementConfig(token_ceiling=1))


def refused(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code of a call that must fail (a success fails the test)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    code: grpc.StatusCode = info.value.code()
    return code


def wait_for_event(server: SpendgateServer, event: str, while_polling: Callable[[], None]) -> None:
    """Poll the server's log for ``event``, running ``while_polling`` (assertions) on every turn."""
    deadline = time.monotonic() + POLL_SECONDS
    while not any(e.get("event") == event for e in server.log_events()):
        while_polling()
        assert time.monotonic() < deadline, f"the server never logged {event}"
        time.sleep(0.05)


def keys_cli(*args: str) -> str:
    result = spendgate_cli("keys", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    server.stop()


def check_losing_keys(
    server: SpendgateServer, metrics_port: int, admin: str, lose: Callable[[], None]
) -> None:
    """The issue's input: keys vanish from a running server; a keyless UpdateConfig must never succeed."""
    with grpc.insecure_channel(server.target) as channel:
        config = config_pb2_grpc.ConfigServiceStub(channel)
        decision = decision_pb2_grpc.DecisionServiceStub(channel)

        def keyless_update_is_refused() -> None:
            assert refused(lambda: config.UpdateConfig(UPDATE)) is grpc.StatusCode.UNAUTHENTICATED

        keyless_update_is_refused()
        assert config.UpdateConfig(UPDATE, metadata=bearer(admin)).config.version == 1
        lose()
        wait_for_event(server, "api_keys_missing", keyless_update_is_refused)
        # Every call is refused now, even with the key that worked a moment ago.
        keyless_update_is_refused()
        keyed = bearer(admin)
        for call in (
            lambda: decision.Decide(decide_request()),
            lambda: decision.Decide(decide_request(), metadata=keyed),
            lambda: config.GetConfig(cpb.GetConfigRequest(), metadata=keyed),
            lambda: config.UpdateConfig(UPDATE, metadata=keyed),
        ):
            assert refused(call) is grpc.StatusCode.UNAUTHENTICATED
        metrics = scrape_metrics(metrics_port)
        assert metrics["spendgate_auth_keys_missing"] == 1
        assert metrics['spendgate_auth_failures_total{reason="no_keys"}'] >= 5


@pytest.mark.redis
def test_redis_key_store_emptied_refuses_every_call(
    spendgate: Callable[..., SpendgateServer], own_redis: RedisServer
) -> None:
    """FLUSHALL on the real Redis: the server refuses every call (never opens) until a key exists again."""
    admin = keys_cli(
        "create", "--redis-url", own_redis.url, "--tenant", "acme", "--scope", "admin", "--name", "ops"
    )
    metrics_port = free_port()
    server = spendgate(
        *("--store", "redis", "--redis-url", own_redis.url),
        *("--key-reload-seconds", "0.1", "--metrics-port", str(metrics_port)),
    )

    def flushall() -> None:
        client = redis.Redis(port=own_redis.port)
        client.flushall()
        client.close()

    check_losing_keys(server, metrics_port, admin, flushall)
    restored = keys_cli(
        "create", "--redis-url", own_redis.url, "--tenant", "acme", "--scope", "admin", "--name", "ops2"
    )
    with grpc.insecure_channel(server.target) as channel:
        config = config_pb2_grpc.ConfigServiceStub(channel)
        wait_for_event(server, "api_keys_restored", lambda: None)
        assert refused(lambda: config.UpdateConfig(UPDATE)) is grpc.StatusCode.UNAUTHENTICATED
        # The config hash went with FLUSHALL: the restored key writes version 1 again.
        assert config.UpdateConfig(UPDATE, metadata=bearer(restored)).config.version == 1
    assert scrape_metrics(metrics_port)["spendgate_auth_keys_missing"] == 0
    missing = [e for e in server.log_events() if e.get("event") == "api_keys_missing"]
    assert len(missing) == 1 and missing[0]["level"] == "error"
    assert not any(e.get("event") == "open_dev_mode" for e in server.log_events())


def test_keys_file_removed_refuses_every_call(
    spendgate: Callable[..., SpendgateServer], tmp_path: Path
) -> None:
    """The --keys-file is removed: the server refuses every call until the file is back."""
    keys_file = tmp_path / "keys.json"
    admin = keys_cli(
        "create", "--keys-file", str(keys_file), "--tenant", "acme", "--scope", "admin", "--name", "ops"
    )
    saved = keys_file.read_bytes()
    metrics_port = free_port()
    server = spendgate(
        *("--keys-file", str(keys_file)),
        *("--key-reload-seconds", "0.1", "--metrics-port", str(metrics_port)),
    )
    check_losing_keys(server, metrics_port, admin, keys_file.unlink)
    keys_file.write_bytes(saved)
    with grpc.insecure_channel(server.target) as channel:
        config = config_pb2_grpc.ConfigServiceStub(channel)
        wait_for_event(server, "api_keys_restored", lambda: None)
        assert refused(lambda: config.UpdateConfig(UPDATE)) is grpc.StatusCode.UNAUTHENTICATED
        # Nothing was written while the keys were gone: the next version is 2.
        update = cpb.UpdateConfigRequest(enforcement_config=UPDATE.enforcement_config, etag="1")
        assert config.UpdateConfig(update, metadata=bearer(admin)).config.version == 2
    assert scrape_metrics(metrics_port)["spendgate_auth_keys_missing"] == 0


def test_an_open_server_stays_open_until_restarted(
    spendgate: Callable[..., SpendgateServer], tmp_path: Path
) -> None:
    """Open mode is decided at start-up: a key created later is logged as ignored, not half-enforced."""
    keys_file = tmp_path / "keys.json"
    server = spendgate("--keys-file", str(keys_file), "--key-reload-seconds", "0.1")
    with grpc.insecure_channel(server.target) as channel:
        config = config_pb2_grpc.ConfigServiceStub(channel)
        assert config.UpdateConfig(UPDATE).config.version == 1
        keys_cli(
            "create", "--keys-file", str(keys_file), "--tenant", "acme", "--scope", "admin", "--name", "ops"
        )
        wait_for_event(server, "api_keys_ignored_in_open_mode", lambda: None)
        assert config.UpdateConfig(cpb.UpdateConfigRequest(etag="1")).config.version == 2
    # Restarted, the same server enforces the key.
    server.stop()
    restarted = spendgate("--keys-file", str(keys_file))
    with grpc.insecure_channel(restarted.target) as channel:
        config = config_pb2_grpc.ConfigServiceStub(channel)
        assert refused(lambda: config.UpdateConfig(UPDATE)) is grpc.StatusCode.UNAUTHENTICATED
