"""Idle client connections are reaped by the server; a client that comes back reconnects unharmed."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.processes import SpendgateServer

POLL_SECONDS = 15.0
_ESTABLISHED = "01"


def established_at(port: int) -> int:
    """How many TCP connections are established to local ``port`` (the server's end), IPv4 and IPv6."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, _, state = row.split()[1:4]
            if int(local.rpartition(":")[2], 16) == port and state == _ESTABLISHED:
                count += 1
    return count


def wait_until(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + POLL_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.02)


def went_idle_after_ready(states: list[grpc.ChannelConnectivity]) -> bool:
    """The channel was connected, then saw its connection go (the server's GOAWAY and close)."""
    ready = grpc.ChannelConnectivity.READY
    return ready in states and grpc.ChannelConnectivity.IDLE in states[states.index(ready) :]


def check(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


def test_an_idle_client_connection_is_closed_by_the_server(spendgate: Callable[..., SpendgateServer]) -> None:
    """With --connection-idle-seconds, the server closes a gRPC connection that made a call and went
    quiet, and a raw TCP connection that never spoke; the gRPC client's next call reconnects."""
    server = spendgate("--connection-idle-seconds", "0.3")
    with grpc.insecure_channel(server.target) as channel:
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append, try_to_connect=False)
        assert check(channel) == health_pb2.HealthCheckResponse.SERVING
        assert established_at(server.port) == 1
        silent = socket.create_connection(("127.0.0.1", server.port))
        try:
            wait_until("the server closing both connections", lambda: established_at(server.port) == 0)
            silent.settimeout(5)
            while silent.recv(65536):  # whatever the server said before closing, then end of stream
                pass
        finally:
            silent.close()
        wait_until("the channel going idle", lambda: went_idle_after_ready(states))
        # A reaped client is not harmed: its next call opens a new connection.
        assert check(channel) == health_pb2.HealthCheckResponse.SERVING
        assert established_at(server.port) == 1
        channel.unsubscribe(states.append)
