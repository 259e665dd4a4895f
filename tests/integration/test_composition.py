"""One composition root: each process builds every store on one shared, named Redis client."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis
from spendgate.v1 import session_pb2 as spb
from spendgate.v1 import session_pb2_grpc

from tests.fake_provider import PRICES_YAML, new_session
from tests.integration.test_alerts_service import call, cli, set_policies, wait_for
from tests.processes import RedisServer, SpendgateServer, stop_process

POLL_SECONDS = 15.0


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, so every connection on it belongs to a process the test started."""
    server = RedisServer.start()
    yield server
    server.stop()


def start_worker(redis_url: str, log: Path) -> subprocess.Popen[bytes]:
    """A `spendgate worker`, returned once it reports ready."""
    argv = [
        *(sys.executable, "-m", "spendgate_server", "worker", "--store", "redis", "--redis-url", redis_url),
        *("--evaluator-poll-millis", "20", "--metrics-port", "0", "--log-format", "json"),
    ]
    with log.open("wb") as sink:
        worker = subprocess.Popen(argv, stdout=sink, stderr=sink)
    deadline = time.monotonic() + POLL_SECONDS
    while '"worker_ready"' not in log.read_text():
        assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return worker


def connections_by_name(redis_port: int) -> Counter[str]:
    """How many connections each client name holds on the Redis, this reader's own left out."""
    reader = redis.Redis(port=redis_port, decode_responses=True)
    try:
        own = reader.client_id()
        return Counter(c["name"] for c in reader.client_list() if int(c["id"]) != own)
    finally:
        reader.close()


@pytest.mark.redis
def test_serve_and_worker_each_hold_one_redis_client(
    private_redis: RedisServer, spendgate: Callable[..., SpendgateServer], tmp_path: Path
) -> None:
    """After every store was used (sessions, journal, configs, policies, keys, insights, the feed),
    each process's connections carry its one client's name; the hot path is that client's ``-hot``."""
    prices = tmp_path / "prices.yaml"
    prices.write_text(PRICES_YAML)
    server = spendgate(
        *("--store", "redis", "--redis-url", private_redis.url, "--config", str(prices)),
        *("--evaluator", "off", "--key-reload-seconds", "0.1", "--health-interval-millis", "50"),
    )
    worker = start_worker(private_redis.url, tmp_path / "worker.log")
    try:
        rules = tmp_path / "rules.yaml"
        rules.write_text("token_ceiling: 5000\n")
        assert cli("config", "set", str(rules), "--target", server.target).returncode == 0
        set_policies(server.target, approved_models=["claude-test-big"])
        session = new_session()
        call(server.target, session, model="claude-test-small")
        # The worker evaluated the journal against the policies and stored the violation.
        wait_for(server.target, 1)
        with grpc.insecure_channel(server.target) as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            deadline = time.monotonic() + POLL_SECONDS
            while session not in [
                s.session_id for s in stub.ListSessions(spb.ListSessionsRequest()).sessions
            ]:
                assert time.monotonic() < deadline, "insights were never flushed"
                time.sleep(0.05)
        names = connections_by_name(private_redis.port)
        for role, pid in (("serve", server.process.pid), ("worker", worker.pid)):
            own = {name: n for name, n in names.items() if name.startswith(f"spendgate-{role}-{pid}-")}
            clients = {name.removesuffix("-hot") for name in own}
            assert len(clients) == 1, f"{role} opened more than one client: {own}"
            (client,) = clients
            # The pipelined hot path is one connection, owned by the same client (serve's
            # Decide/Settle scripts; both processes' group-committed journal appends).
            hot = own.pop(f"{client}-hot", 0)
            assert hot == 1 if role == "serve" else hot <= 1, own
            assert set(own) == {client}, own
            # One pool serves every store: the two change listeners (configs, policies) and the rest.
            assert own[client] >= 2, own
        strays = [name for name in names if not name.startswith(("spendgate-serve-", "spendgate-worker-"))]
        assert not strays, f"connections of no named client: {names}"
    finally:
        stop_process(worker)


def test_worker_help_lists_only_the_worker_flags() -> None:
    """`spendgate worker --help` shows the worker's subset of the flag table, with defaults and variables."""
    shown = subprocess.run(
        [sys.executable, "-m", "spendgate_server", "worker", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert (
        "--evaluator-batch-size N" in shown and "(default 100; env SPENDGATE_EVALUATOR_BATCH_SIZE)" in shown
    )
    for serve_only in ("--port", "--workers", "--keys-file", "--tls-cert", "--drain-seconds", "--evaluator "):
        assert serve_only not in shown, serve_only
    refused = subprocess.run(
        [sys.executable, "-m", "spendgate_server", "worker", "--workers", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 2 and "unrecognized arguments: --workers 2" in refused.stderr
    assert "Traceback" not in refused.stderr
