"""The CLI against a server that answers but whose store is down: said as such, not as unreachable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.processes import RedisServer, SpendgateServer


@pytest.mark.redis
def test_a_store_outage_is_not_reported_as_an_unreachable_server() -> None:
    """Real processes: Redis stopped under a running server; `spendgate decide` exits 1 with one
    line saying the server answered and its store is unavailable (ErrorInfo STORE_UNAVAILABLE)."""
    redis_server = RedisServer.start()
    server = SpendgateServer.start("--store", "redis", "--redis-url", redis_server.url)
    try:
        redis_server.stop()
        run = subprocess.run(
            [
                *(sys.executable, "-m", "spendgate_server", "decide", "--target", server.target),
                *("--session", "s", "--model", "claude-sonnet-4-5", "--timeout", "10"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert server.process.poll() is None, "the server must outlive its store"
    finally:
        server.stop()
        redis_server.stop()
    lines = run.stderr.splitlines()
    assert run.returncode == 1, run.stderr
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(
        f"spendgate: spendgate at {server.target} answered, but its store is unavailable: "
    )
    assert "cannot reach" not in lines[0]
