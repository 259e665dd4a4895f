"""A server that cannot serve ends with its reason: one line on stderr and a non-zero exit, in every mode."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from spendgate_client import DecisionClient
from spendgate_server.lifecycle import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from spendgate_server.settings import ServeSettings
from spendgate_server.stores import open_stores

from tests.processes import RedisServer, SpendgateServer, free_port, stop_process

# Generous: a spawned --workers child imports grpc before it can fail. The bug this guards
# against is a process that never ends, not a slow one.
EXIT_WITHIN_SECONDS = 20.0


@dataclass
class Ended:
    """How a process ended: its exit code and the lines of stderr that are not JSON log lines."""

    code: int
    lines: list[str]
    stderr: str


def run_until_exit(argv: list[str], tmp_path: Path) -> Ended:
    """Run ``argv`` and wait for it to end by itself; a process still up after the bound fails the test."""
    log = tmp_path / f"stderr-{time.monotonic_ns()}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        code = process.wait(timeout=EXIT_WITHIN_SECONDS)
    except subprocess.TimeoutExpired:
        stop_process(process)
        pytest.fail(f"still running after {EXIT_WITHIN_SECONDS} s:\n{log.read_text()}")
    stderr = log.read_text()
    return Ended(code, [line for line in stderr.splitlines() if line and not line.startswith("{")], stderr)


@pytest.fixture(scope="module")
def fatal_redis() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    server.stop()


@dataclass
class Case:
    """A fatal condition: how to bring it about, the exit code it gives and words of its reason."""

    arrange: Callable[[RedisServer, Path, int], list[str]]
    code: int
    reason: str


def no_keys_on_a_public_address(redis_server: RedisServer, tmp_path: Path, port: int) -> list[str]:
    return ["--host", "0.0.0.0"]  # noqa: S104  # the refusal under test


def port_taken(redis_server: RedisServer, tmp_path: Path, port: int) -> list[str]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    HELD.append(holder)
    return []


def unreadable_tls_files(redis_server: RedisServer, tmp_path: Path, port: int) -> list[str]:
    return ["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "missing.key")]


def redis_unreachable(redis_server: RedisServer, tmp_path: Path, port: int) -> list[str]:
    return ["--redis-url", f"redis://:hunter2@127.0.0.1:{free_port()}/0"]


def evaluator_raises(redis_server: RedisServer, tmp_path: Path, port: int) -> list[str]:
    """A settled call waits in the journal, and the tenant's policy record cannot be read (corrupted
    behind the service's back): evaluating the journal raises."""
    seeder = SpendgateServer.start("--store", "redis", "--redis-url", redis_server.url, "--evaluator", "off")
    try:
        with DecisionClient(seeder.target, timeout=5, fail_mode="closed") as client:
            decision = client.decide("fatal", "claude-sonnet-4-5", 10, 10, b"f" * 32)
            settled = client.settle(
                "fatal", decision.reservation_id, "claude-sonnet-4-5", input_tokens=10, output_tokens=10
            )
            assert settled is not None
    finally:
        seeder.stop()

    async def corrupt() -> None:
        stores = open_stores(ServeSettings(store="redis", redis_url=redis_server.url), role="test")
        try:
            await stores.policies.put("default", '{"approved_models": [', "", "test", 1)
        finally:
            await stores.aclose()

    asyncio.run(corrupt())
    return []


HELD: list[socket.socket] = []

CASES = {
    "no keys on a public address": Case(no_keys_on_a_public_address, EXIT_CONFIG, "no API keys exist"),
    "port taken": Case(port_taken, EXIT_CONFIG, "cannot bind"),
    "unreadable TLS files": Case(unreadable_tls_files, EXIT_CONFIG, "cannot read"),
    "Redis unreachable at start": Case(redis_unreachable, EXIT_CONFIG, "is unreachable"),
    "an evaluator that raises": Case(evaluator_raises, EXIT_FAILED, "the evaluator failed: JSONDecodeError"),
}

# The start-up refusals come before any part starts (app.py's _serve) and --evaluator is read
# only once the parts start, so for them "off" runs exactly the code "on" does: only "on" runs
# (the mode in which a refusal once went unsaid, with the evaluator already running). With the
# evaluator off nothing reads the journal, so nothing can raise: "on" only there too.
# --workers 1 and 2 run different code (a worker reports its reason to its supervisor): both run.
MATRIX = [
    pytest.param(name, "on", workers, id=f"{name}-evaluator on-workers {workers}")
    for name in CASES
    for workers in (1, 2)
]


@pytest.mark.redis
@pytest.mark.parametrize(("name", "evaluator", "workers"), MATRIX)
def test_a_fatal_condition_ends_the_server_with_one_line(
    name: str, evaluator: str, workers: int, fatal_redis: RedisServer, tmp_path: Path
) -> None:
    """Whatever part fails and in whatever mode, `spendgate serve` exits non-zero by itself with
    exactly one line, `spendgate: <reason>`, on stderr besides its JSON log lines, and no traceback."""
    case = CASES[name]
    client = redis.Redis(port=fatal_redis.port)
    client.flushall()
    client.close()
    port = free_port()
    try:
        extra = case.arrange(fatal_redis, tmp_path, port)
        argv = [
            *(sys.executable, "-m", "spendgate_server", "serve", "--port", str(port)),
            *("--store", "redis", "--redis-url", fatal_redis.url, "--workers", str(workers)),
            *("--evaluator", evaluator, "--evaluator-poll-millis", "20", "--metrics-port", "0"),
            # The workers that did not fail drain when their supervisor ends them: 0 s, as in every
            # other test's server, rather than the default 5 s spent serving nothing.
            *("--log-format", "json", "--drain-seconds", "0", *extra),
        ]
        ended = run_until_exit(argv, tmp_path)
    finally:
        while HELD:
            HELD.pop().close()
    assert ended.code == case.code, ended.stderr
    assert len(ended.lines) == 1, ended.stderr
    (line,) = ended.lines
    assert line.startswith("spendgate: ") and case.reason in line, ended.stderr
    assert "hunter2" not in ended.stderr
    assert "Traceback" not in line


@pytest.mark.redis
def test_a_worker_process_ends_with_one_line_when_its_evaluator_raises(
    fatal_redis: RedisServer, tmp_path: Path
) -> None:
    """`spendgate worker` ends the same way when its evaluator raises: exit 1 and the reason in one line."""
    client = redis.Redis(port=fatal_redis.port)
    client.flushall()
    client.close()
    evaluator_raises(fatal_redis, tmp_path, 0)
    argv = [
        *(sys.executable, "-m", "spendgate_server", "worker", "--store", "redis"),
        *("--redis-url", fatal_redis.url, "--evaluator-poll-millis", "20", "--metrics-port", "0"),
        *("--log-format", "json"),
    ]
    ended = run_until_exit(argv, tmp_path)
    assert ended.code == EXIT_FAILED and ended.lines == [
        line for line in ended.lines if "the evaluator failed: JSONDecodeError" in line
    ], ended.stderr
    assert len(ended.lines) == 1, ended.stderr


def test_exit_codes_are_documented() -> None:
    """The README's table of server exit codes names every code the lifecycle uses."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme[readme.index("### Exit codes of `spendgate serve`") :]
    for code in (EXIT_OK, EXIT_FAILED, EXIT_CONFIG):
        assert f"\n| {code} | " in table, code
