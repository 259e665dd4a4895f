"""`spendgate serve --store redis` reads, evaluates and acknowledges the journal in a child process
(issue 17): the serving event loop does none of it, and the child lives and dies with the server."""

from __future__ import annotations

import asyncio
import json
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from spendgate_server.errors import ConfigError
from spendgate_server.lifecycle import (
    EXIT_CONFIG,
    EXIT_FAILED,
    ChildFailed,
    ChildProcess,
    PartFailed,
    run_child,
)
from spendgate_server.policy.evaluator import EVALUATION_NICENESS
from spendgate_server.policy.journal import EVALUATOR_GROUP, JOURNAL_LOG
from spendgate_server.store.redis_logs import RedisLogStore

from tests.integration.test_alerts_service import call, set_policies, wait_for
from tests.integration.test_evaluation_isolation import evaluation_children
from tests.processes import SpendgateServer, descendants, ended, free_port, scrape_metrics

WAIT_SECONDS = 20.0
TENANT = "default"  # the tenant of every caller of a server without API keys


def poll(what: str, condition: Callable[[], object]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polls a real process; nothing here waits for time to pass


def ready(server: SpendgateServer, pid: int) -> bool:
    """Whether the evaluator child ``pid`` said it evaluates (its consumer name ends in its PID)."""
    return any(
        e["event"] == "worker_ready" and str(e["consumer"]).endswith(f":{pid}") for e in server.log_events()
    )


def the_child(server: SpendgateServer, *, other_than: int = 0) -> int:
    """The server's one evaluator process (not ``other_than``), once it evaluates."""
    poll("the evaluator child", lambda: set(evaluation_children(server.process.pid)) - {other_than})
    [pid] = evaluation_children(server.process.pid)
    poll(f"evaluator child {pid} to be ready", lambda: ready(server, pid))
    return pid


def consumers(redis_url: str, tenant: str) -> set[str]:
    """Names of the evaluator group's consumers on ``tenant``'s journal (XINFO CONSUMERS)."""
    stream = RedisLogStore.from_url(redis_url).stream_key(JOURNAL_LOG, tenant)
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        return {consumer["name"] for consumer in client.xinfo_consumers(stream, EVALUATOR_GROUP)}


def redis_server_args(redis_url: str, *more: str) -> tuple[str, ...]:
    return ("--store", "redis", "--redis-url", redis_url, "--evaluator-poll-millis", "20", *more)


@pytest.mark.redis
def test_serve_on_redis_reads_and_evaluates_the_journal_in_its_child(
    spendgate: Callable[..., SpendgateServer], redis_url: str
) -> None:
    """A journaled prompt is flagged, and the only consumer of the journal is the nicer child."""
    server = spendgate(*redis_server_args(redis_url))
    set_policies(server.target, banned_patterns=[{"id": "k", "pattern": "sk-live-"}], journal_prompts=True)
    decision = call(server.target, "child", model="claude-sonnet-4-5", prompt_text="key sk-live-123 here")
    [found] = wait_for(server.target, 1, session_id="child")
    assert found.decision_id == decision and found.pattern.pattern_id == "k"
    child = the_child(server)
    assert consumers(redis_url, TENANT) == {f"{socket.gethostname()}:{child}"}
    assert evaluation_children(server.process.pid) == {child: EVALUATION_NICENESS}
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        names = {c["name"].rsplit("-", 2)[0] for c in client.client_list() if c["name"]}
    # The child holds connections of its own, named after its role.
    assert {f"spendgate-evaluator-{child}", f"spendgate-serve-{server.process.pid}"} <= names


@pytest.mark.redis
def test_sigkill_of_the_server_leaves_no_child_running(
    spendgate: Callable[..., SpendgateServer], redis_url: str
) -> None:
    """The child (and multiprocessing's tracker) end by themselves once the server is SIGKILLed."""
    server = spendgate(*redis_server_args(redis_url))
    child = the_child(server)
    below = descendants(server.process.pid)
    assert child in below
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    poll(f"processes {sorted(below)} to end", lambda: all(ended(pid) for pid in below))


def test_sigkill_of_a_memory_store_server_leaves_no_evaluation_process(
    spendgate: Callable[..., SpendgateServer],
) -> None:
    """The memory store's matching child (it exists once a batch was evaluated) ends with its server."""
    server = spendgate("--evaluator-poll-millis", "20")
    set_policies(server.target, banned_patterns=[{"id": "k", "pattern": "sk-live-"}], journal_prompts=True)
    call(server.target, "memory", model="claude-sonnet-4-5", prompt_text="key sk-live-789 here")
    wait_for(server.target, 1, session_id="memory")
    assert evaluation_children(server.process.pid)
    below = descendants(server.process.pid)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    poll(f"processes {sorted(below)} to end", lambda: all(ended(pid) for pid in below))


@pytest.mark.redis
def test_drain_stops_the_child_by_pid(spendgate: Callable[..., SpendgateServer], redis_url: str) -> None:
    """SIGTERM: the server drains, stops its child, and exits 0 with the child gone."""
    server = spendgate(*redis_server_args(redis_url))
    child = the_child(server)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(WAIT_SECONDS) == 0
    assert ended(child)
    events = [e["event"] for e in server.log_events()]
    assert "worker_stopped" in events and "parent_process_ended" not in events


@pytest.mark.redis
def test_a_killed_child_is_replaced_and_evaluates_again(
    spendgate: Callable[..., SpendgateServer], redis_url: str
) -> None:
    """SIGKILL of the child: one warning line, a new child, and violations keep coming."""
    server = spendgate(*redis_server_args(redis_url))
    set_policies(server.target, banned_patterns=[{"id": "k", "pattern": "sk-live-"}], journal_prompts=True)
    first = the_child(server)
    os.kill(first, signal.SIGKILL)
    second = the_child(server, other_than=first)
    assert ended(first) and second != first
    [died] = [e for e in server.log_events() if e["event"] == "child_process_died"]
    assert died["child"] == "the evaluator" and died["signal"] == "SIGKILL"
    call(server.target, "after", model="claude-sonnet-4-5", prompt_text="key sk-live-456 here")
    wait_for(server.target, 1, session_id="after")
    assert server.process.poll() is None


async def leave_pending(redis_url: str) -> None:
    """One journal entry delivered to a consumer that never acknowledges it (a dead worker)."""
    logs = RedisLogStore.from_url(redis_url)
    now = time.time_ns() // 1_000_000
    await logs.append(JOURNAL_LOG, TENANT, [("u1", "{}")], max_entries=10, unique_ttl_ms=60_000, now_ms=now)
    [_] = await logs.read_group(JOURNAL_LOG, TENANT, EVALUATOR_GROUP, "dead-worker", 10, now)
    await logs.close()


@pytest.mark.redis
def test_the_childs_gauges_reach_the_servers_metrics(
    spendgate: Callable[..., SpendgateServer], redis_url: str
) -> None:
    """An entry pending on a dead consumer shows as spendgate_evaluator_pending 1 on the server's port."""
    asyncio.run(leave_pending(redis_url))
    metrics_port = free_port()
    server = spendgate(
        *redis_server_args(redis_url, "--evaluator-claim-idle-millis", "600000"),
        *("--metrics-port", str(metrics_port)),
    )
    poll("the pending gauge", lambda: scrape_metrics(metrics_port).get("spendgate_evaluator_pending") == 1.0)
    assert scrape_metrics(metrics_port)["spendgate_journal_lag_seconds"] > 0
    assert consumers(redis_url, TENANT) == {"dead-worker"}  # not claimed: it is not idle long enough
    assert server.process.poll() is None


# The children of the ChildProcess tests: module-level, since a spawned child imports them.


def _failing_child(code: int, channel: multiprocessing.connection.Connection) -> None:
    async def main() -> None:
        if code == EXIT_FAILED:
            raise RuntimeError("boom")
        raise ConfigError("--webhook-url: not reachable")

    run_child(channel, main)


def _exiting_child(channel: multiprocessing.connection.Connection) -> None:
    channel.send(("hello", 1))


async def test_a_child_that_fails_ends_its_part_with_its_reason() -> None:
    """Exit 1 with a reason: the part fails with that reason (and exit 1); exit 2 keeps exit 2."""
    with pytest.raises(ChildFailed) as failed:
        await ChildProcess("test", _failing_child, (1,)).run()
    # The child's own reason line (run_process's), after the part that ran it. (Not through
    # run_part: a failed part arms this process's exit deadline.)
    part = PartFailed("the test child", failed.value)
    assert str(part) == "the test child failed: RuntimeError: boom" and part.exit_code == EXIT_FAILED
    with pytest.raises(ConfigError, match=r"^--webhook-url: not reachable$") as config:
        await ChildProcess("test", _failing_child, (2,)).run()
    assert PartFailed("the test child", config.value).exit_code == EXIT_CONFIG


async def test_a_child_that_ends_unasked_fails_and_its_messages_arrive() -> None:
    """A child that returns (exit 0) while not told to stop is a failure; what it sent arrives first."""
    received: list[object] = []
    with pytest.raises(ChildFailed, match=r"^its process exited 0$"):
        await ChildProcess("test", _exiting_child, on_message=received.append).run()
    assert received == [("hello", 1)]


@pytest.mark.redis
def test_a_child_stopped_by_a_sigterm_of_its_own_is_replaced(
    spendgate: Callable[..., SpendgateServer], redis_url: str
) -> None:
    """SIGTERM to the child alone: it stops cleanly, and after the grace a new child evaluates."""
    server = spendgate(*redis_server_args(redis_url))
    set_policies(server.target, banned_patterns=[{"id": "k", "pattern": "sk-live-"}], journal_prompts=True)
    first = the_child(server)
    os.kill(first, signal.SIGTERM)
    second = the_child(server, other_than=first)
    [died] = [e for e in server.log_events() if e["event"] == "child_process_died"]
    assert died["child"] == "the evaluator" and died["signal"] == "SIGTERM"
    assert "part_failed" not in {e["event"] for e in server.log_events()}
    call(server.target, "after-term", model="claude-sonnet-4-5", prompt_text="key sk-live-654 here")
    wait_for(server.target, 1, session_id="after-term")
    assert server.process.poll() is None and second != first


def log_lines(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@pytest.mark.redis
def test_sigterm_to_the_process_group_drains_and_exits_0(redis_url: str, tmp_path: Path) -> None:
    """systemd's stop, ``timeout`` and ``tini -g`` signal the whole group: the child ends at once,
    and the server still drains and exits 0 (the child is not a failed part)."""
    log = tmp_path / "server.log"
    argv = [
        *(sys.executable, "-m", "spendgate_server", "serve", "--port", "0", "--metrics-port", "0"),
        *("--log-format", "json", "--drain-seconds", "1", *redis_server_args(redis_url)),
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=sink, start_new_session=True)
    try:
        poll(
            "the server's evaluator child", lambda: any(e["event"] == "worker_ready" for e in log_lines(log))
        )
        below = descendants(process.pid)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(WAIT_SECONDS) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    names = [e["event"] for e in log_lines(log)]
    assert "draining" in names and "part_failed" not in names and "child_process_died" not in names
    poll(f"processes {sorted(below)} to end", lambda: all(ended(pid) for pid in below))
