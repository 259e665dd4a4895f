"""Two ``serve --workers N`` supervisors on one port: the second is refused at start.

Workers bind with SO_REUSEPORT, so without a lock the second supervisor's workers would
join the first one's port. Each supervisor holds an abstract Unix socket named after its
port for its lifetime; the kernel frees it when the supervisor ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from tests.integration.test_evaluator_child import poll
from tests.processes import RedisServer, SpendgateServer, descendants, ended, free_port


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    server.stop()


def test_second_supervisor_on_a_port_exits_2(
    spendgate: Callable[..., SpendgateServer], redis_server: RedisServer
) -> None:
    """The second supervisor: exit 2 and one line saying the port is taken; the first keeps serving."""
    port = free_port()
    argv = ("--workers", "2", "--store", "redis", "--redis-url", redis_server.url)
    first = spendgate(*argv, port=port)
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "spendgate_server",
            "serve",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")},
    )
    assert second.returncode == 2
    reasons = [line for line in second.stderr.splitlines() if not line.startswith("{")]
    assert reasons == [
        f"spendgate: --port {port}: cannot bind 127.0.0.1: the port is taken by another spendgate serve "
        "--workers on this host"
    ]
    assert first.process.poll() is None

    # The lock lives as long as its supervisor: once the first has stopped, the port is free again.
    first.stop()
    third = spendgate(*argv, port=port)
    assert third.port == port


def test_localhost_and_its_address_are_one_port(
    spendgate: Callable[..., SpendgateServer], redis_server: RedisServer
) -> None:
    """A supervisor on --host 127.0.0.1 holds the port for --host localhost too."""
    port = free_port()
    argv = ("--workers", "2", "--store", "redis", "--redis-url", redis_server.url)
    spendgate(*argv, "--host", "127.0.0.1", port=port)
    second = subprocess.run(
        [sys.executable, "-m", "spendgate_server", "serve", "--port", str(port), "--metrics-port", "0", *argv,
         "--host", "localhost"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert second.returncode == 2
    assert "the port is taken by another spendgate serve --workers" in second.stderr


@pytest.mark.parametrize("second_host", ["0.0.0.0", "127.0.0.2"])  # noqa: S104 (refused: nothing binds)
def test_overlapping_hosts_are_one_port(
    spendgate: Callable[..., SpendgateServer], redis_server: RedisServer, second_host: str
) -> None:
    """A supervisor on 127.0.0.1 refuses another on the same port at any host.

    0.0.0.0 overlaps 127.0.0.1: both would bind with SO_REUSEPORT, and the loopback share
    of the calls would go to whichever bound the more specific address. The rule is one
    ``serve --workers`` per port per host, so a second specific address is refused too.
    """
    port = free_port()
    argv = ("--workers", "2", "--store", "redis", "--redis-url", redis_server.url)
    first = spendgate(*argv, "--host", "127.0.0.1", port=port)
    second = subprocess.run(
        [sys.executable, "-m", "spendgate_server", "serve", "--port", str(port), "--metrics-port", "0", *argv,
         "--host", second_host],
        capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")},
    )  # fmt: skip
    assert second.returncode == 2, second.stderr
    reasons = [line for line in second.stderr.splitlines() if not line.startswith("{")]
    assert reasons == [
        f"spendgate: --port {port}: cannot bind {second_host}: the port is taken by another spendgate serve "
        "--workers on this host"
    ]
    assert first.process.poll() is None


def test_a_sigkilled_supervisor_leaves_no_worker_serving(
    spendgate: Callable[..., SpendgateServer], redis_server: RedisServer
) -> None:
    """Its workers (and their evaluator children) end by themselves, and the port is free again.

    The port lock dies with the supervisor, so a worker left serving would share the port
    with the next supervisor's workers.
    """
    port = free_port()
    argv = ("--workers", "2", "--store", "redis", "--redis-url", redis_server.url)
    first = spendgate(*argv, port=port)
    poll("both workers", lambda: len(descendants(first.process.pid)) >= 2)
    below = descendants(first.process.pid)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    poll(f"processes {sorted(below)} to end", lambda: all(ended(pid) for pid in below))
    assert spendgate(*argv, port=port).port == port
