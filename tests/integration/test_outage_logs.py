"""While Redis is down, each retrying loop of a server logs the outage once, and its end once.

A real Redis is stopped (SIGTERM by PID) and started again on its port under a real
``spendgate serve --store redis``; its log lines are counted. The retries in between are
logged at debug level only, which is how the test knows they happened.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import grpc
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc

from tests.processes import RedisServer, SpendgateServer

# The loops a Redis-backed server runs, each named by its outage event's prefix.
LOOPS = ("config_pubsub", "policies_pubsub", "config_poll", "evaluator_round", "key_reload", "journal_sweep")
LOST = {
    "config_pubsub": "config_pubsub_lost",
    "policies_pubsub": "policies_pubsub_lost",
    "config_poll": "config_poll_failed",
    "evaluator_round": "evaluator_round_failed",
    "key_reload": "key_reload_failed",
    "journal_sweep": "journal_sweep_failed",
}
RESTORED = {loop: f"{loop}_restored" for loop in LOOPS}
DEADLINE_SECONDS = 60.0


def wait_for(server: SpendgateServer, done: Callable[[list[dict[str, object]]], bool], what: str) -> None:
    """Poll the server's log until ``done`` holds for its events (a condition, not a duration)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not done(server.log_events()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def counts(events: list[dict[str, object]], level: str) -> Counter[str]:
    return Counter(str(e["event"]) for e in events if e.get("level") == level)


def test_each_loop_logs_an_outage_once_and_its_end_once(spendgate: Callable[..., SpendgateServer]) -> None:
    """Redis stopped, then restarted: one warning and one info per loop, whatever the retries."""
    redis_server = RedisServer.start()
    try:
        server = spendgate(
            *("--store", "redis", "--redis-url", redis_server.url, "--log-level", "debug"),
            *("--config-poll-millis", "50", "--key-reload-seconds", "0.1", "--evaluator-poll-millis", "10"),
            # The journal sweeper then runs every second (its floor).
            *("--journal-intent-grace-seconds", "1"),
        )
        # One decision, so the default tenant's config is cached and polled.
        with grpc.insecure_channel(server.target) as channel:
            decision_pb2_grpc.DecisionServiceStub(channel).Decide(
                pb.DecideRequest(session_id="s", model="claude-sonnet-4-5", fingerprint=b"f" * 32), timeout=10
            )
        redis_server.stop()
        # Down long enough for every loop to have retried at least twice (seen at debug level).
        wait_for(
            server,
            lambda events: all(counts(events, "debug")[LOST[loop]] >= 2 for loop in LOOPS),
            "every loop to retry twice",
        )
        redis_server = RedisServer.start(port=redis_server.port, workdir=redis_server.workdir)
        wait_for(
            server,
            lambda events: all(counts(events, "info")[RESTORED[loop]] >= 1 for loop in LOOPS),
            "every loop to report the outage's end",
        )
        events = server.log_events()
        warnings, infos, debugs = counts(events, "warning"), counts(events, "info"), counts(events, "debug")
        for loop in LOOPS:
            assert warnings[LOST[loop]] == 1, (loop, warnings)
            assert infos[RESTORED[loop]] == 1, (loop, infos)
            (restored,) = [e for e in events if e["event"] == RESTORED[loop]]
            # Every failed try is counted: the one warning plus the retries logged at debug level.
            assert restored["failures"] == 1 + debugs[LOST[loop]], loop
            assert isinstance(restored["outage_seconds"], float) and restored["outage_seconds"] > 0
    finally:
        redis_server.stop()
