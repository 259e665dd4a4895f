"""Operations over real processes: health follows the store, graceful drain, metrics."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from spendgate_client import DecisionClient

from tests.processes import RedisServer, SpendgateServer, free_port, scrape_metrics

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
POLL_SECONDS = 15.0


def health_status(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(response.status)


def wait_for_health(target: str, expected: int) -> None:
    """Poll health until it reports ``expected`` (bounded; no fixed sleeps)."""
    deadline = time.monotonic() + POLL_SECONDS
    while (status := health_status(target)) != expected:
        assert time.monotonic() < deadline, f"health stayed {status}, expected {expected}"
        time.sleep(0.05)


@pytest.mark.redis
def test_health_follows_the_store(spendgate: Callable[..., SpendgateServer]) -> None:
    """Redis stops: NOT_SERVING; Redis returns: SERVING again, without restarting the server."""
    redis_server = RedisServer.start()
    try:
        server = spendgate(
            "--store", "redis", "--redis-url", redis_server.url, "--health-interval-millis", "100"
        )
        assert health_status(server.target) == SERVING
        assert health_status(server.target, "spendgate.v1.DecisionService") == SERVING
        redis_server.stop()
        wait_for_health(server.target, NOT_SERVING)
        assert health_status(server.target, "spendgate.liveness") == SERVING
        with DecisionClient(server.target, timeout=2, fail_mode="closed") as client:
            with pytest.raises(Exception, match="did not answer"):
                client.decide("s", "claude-sonnet-4-5", 10, 10, b"0" * 32)
            redis_server = RedisServer.start(port=redis_server.port, workdir=redis_server.workdir)
            wait_for_health(server.target, SERVING)
            assert client.decide("s", "claude-sonnet-4-5", 10, 10, b"0" * 32).allowed
    finally:
        redis_server.stop()


def test_reflection_describes_the_services(spendgate: Callable[..., SpendgateServer]) -> None:
    """Server reflection, registered with the other services, lists them and describes their messages."""
    server = spendgate()
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        decide_request = DescriptorPool(database).FindMessageTypeByName("spendgate.v1.DecideRequest")
    assert {"spendgate.v1.DecisionService", "grpc.health.v1.Health"} <= services
    assert "session_id" in decide_request.fields_by_name


def test_sigterm_drains_without_failing_calls(spendgate: Callable[..., SpendgateServer]) -> None:
    """Under steady load, SIGTERM turns health NOT_SERVING while every call still succeeds."""
    server = spendgate("--drain-seconds", "1.5")
    errors: list[BaseException] = []
    answered = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal answered
        with DecisionClient(server.target, timeout=5, fail_mode="closed") as client:
            while not stop.is_set():
                try:
                    client.decide(
                        f"drain-{uuid.uuid4().hex}", "claude-sonnet-4-5", 10, 10, uuid.uuid4().bytes
                    )
                    answered += 1
                except Exception as exc:  # any failure during the drain is the bug under test
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    before_term = answered
    server.process.send_signal(signal.SIGTERM)
    wait_for_health(server.target, NOT_SERVING)
    during_drain = answered
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    assert before_term > 0 and answered > during_drain, "calls kept being answered while draining"
    assert server.process.wait(timeout=10) == 0
    events = [e["event"] for e in server.log_events()]
    assert events.index("draining") < events.index("stopped")


def test_metrics_count_decisions(spendgate: Callable[..., SpendgateServer]) -> None:
    """Scraping /metrics shows decisions by verdict and rule, settles and latency counts moving."""
    port = free_port()
    server = spendgate("--metrics-port", str(port))
    with DecisionClient(server.target, timeout=5) as client:
        for i in range(3):
            decision = client.decide(
                "m", "claude-sonnet-4-5", 100, 10, hashlib.sha256(str(i).encode()).digest()
            )
            client.settle(
                "m", decision.reservation_id, "claude-sonnet-4-5", input_tokens=100, output_tokens=5
            )
        for _ in range(2):
            client.decide(
                "m", "claude-sonnet-4-5", 100, 10, b"b" * 32, enforcement_config={"token_ceiling": 1}
            )
        client.decide(
            "m",
            "claude-sonnet-4-5",
            100,
            10,
            b"c" * 32,
            enforcement_config={"shadow": True, "token_ceiling": 1},
        )
        with pytest.raises(ValueError, match="session_id"):
            client.decide("", "claude-sonnet-4-5", 1, 1, b"d" * 32)
    m = scrape_metrics(port)
    assert m['spendgate_decisions_total{rule="none",verdict="allow"}'] == 4
    assert m['spendgate_decisions_total{rule="token_ceiling",verdict="block"}'] == 2
    assert m['spendgate_shadow_would_block_total{rule="token_ceiling"}'] == 1
    assert m['spendgate_settles_total{outcome="settled"}'] == 3
    assert m["spendgate_reservations_total"] == 4
    assert m['spendgate_rpc_errors_total{code="INVALID_ARGUMENT",method="Decide"}'] == 1
    assert m["spendgate_decide_duration_seconds_count"] == 6
    assert m["spendgate_settle_lag_seconds_count"] == 3
    assert m['spendgate_store_duration_seconds_count{op="reserve"}'] == 4
    assert m["spendgate_health_serving"] == 1


def child_pids(pid: int) -> set[int]:
    """The direct children of ``pid`` (Linux /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(c) for c in children}


@pytest.mark.redis
def test_a_killed_worker_is_replaced(redis_url: str, spendgate: Callable[..., SpendgateServer]) -> None:
    """With --workers 2, a worker killed by SIGKILL is replaced and the port keeps answering."""
    server = spendgate("--store", "redis", "--redis-url", redis_url, "--workers", "2", port=free_port())
    deadline = time.monotonic() + POLL_SECONDS
    while len(before := child_pids(server.process.pid)) < 2:
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.05)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    while len(after := child_pids(server.process.pid) - {victim}) < 2:
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        time.sleep(0.05)
    assert victim not in after
    with DecisionClient(server.target, timeout=5, fail_mode="closed") as client:
        for i in range(10):
            assert client.decide(
                f"w-{i}", "claude-sonnet-4-5", 10, 10, hashlib.sha256(bytes([i])).digest()
            ).allowed
