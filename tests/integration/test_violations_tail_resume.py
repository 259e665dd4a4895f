"""`spendgate violations tail` follows the feed across a server restart (real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_alerts_service import call, set_policies
from tests.processes import STARTUP_SECONDS, SpendgateServer, free_port, stop_process

DEADLINE_SECONDS = 30.0
# `spendgate violations tail` with its reconnection backoff shortened (the same attempts, each
# delay a hundredth): a server down for good ends it in well under a second instead of ~40 s of
# waiting. Only where the server never comes back; the restart case keeps the real backoff.
# The CLI module first: it silences grpc's own logging before grpc is imported, as the command does.
SHORT_BACKOFF = (
    "from spendgate_server.cli import main; "
    "from spendgate_server.admin import violations_cli as tail; "
    "tail.RESUME_FIRST_DELAY_SECONDS /= 100; tail.RESUME_MAX_DELAY_SECONDS /= 100; "
    "main()"
)


def wait_lines(path: Path, count: int, process: subprocess.Popen[bytes]) -> list[str]:
    """The first ``count`` lines the tail printed, waiting for them within a bound."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        lines = path.read_text().splitlines()
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, f"tail printed {lines}"
        assert process.poll() is None or len(path.read_text().splitlines()) >= count, process.returncode
        time.sleep(0.05)


@pytest.mark.redis
def test_tail_resumes_after_the_server_restarts(redis_url: str, tmp_path: Path) -> None:
    """The server is stopped (by PID) and started again on the same port mid-tail: the tail
    reconnects after the last cursor it printed and shows the next violation, each exactly once,
    with nothing on stderr; a server that stays down ends it with one line, exit 1."""
    port = free_port()
    args = ("--store", "redis", "--redis-url", redis_url, "--evaluator-poll-millis", "20")
    server = SpendgateServer.start(*args, port=port)
    out, err = tmp_path / "tail.out", tmp_path / "tail.err"
    tail: subprocess.Popen[bytes] | None = None
    try:
        set_policies(server.target, approved_models=["claude-haiku-4-5"])
        argv = [sys.executable, "-m", "spendgate_server", "violations", "tail", "--target", server.target]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            tail = subprocess.Popen(
                [*argv, "--from-start", "--count", "2", "--json"], stdout=stdout, stderr=stderr
            )
        first_id = call(server.target, "tail-1", model="claude-sonnet-4-5")
        [first] = wait_lines(out, 1, tail)
        server.stop()
        server = SpendgateServer.start(*args, port=port)
        second_id = call(server.target, "tail-2", model="claude-sonnet-4-5")
        tail.wait(timeout=DEADLINE_SECONDS)
        printed = [json.loads(line) for line in out.read_text().splitlines()]
        assert [p["decision_id"] for p in printed] == [first_id, second_id]
        cursors = [tuple(int(part) for part in p["cursor"].split("-")) for p in printed]
        assert json.loads(first)["cursor"] == printed[0]["cursor"] and cursors[0] < cursors[1]
        assert tail.returncode == 0 and err.read_text() == ""

        # Down for good: bounded retries, then the one line of an unreachable server.
        short = [sys.executable, "-c", SHORT_BACKOFF, *argv[3:]]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            tail = subprocess.Popen([*short, "--from-start"], stdout=stdout, stderr=stderr)
        wait_lines(out, 2, tail)
        server.stop()
        tail.wait(timeout=STARTUP_SECONDS + 60)
        assert tail.returncode == 1
        [line] = err.read_text().splitlines()
        assert line.startswith(f"spendgate: cannot reach spendgate at {server.target}: "), line
    finally:
        if tail is not None:
            stop_process(tail)
        server.stop()
