"""While Redis is down, each retrying loop of a server logs the outage once, and its end once;
so do the calls that fail for it (one outage per kind, however many calls).

A real Redis is stopped (SIGTERM by PID) and started again on its port under a real
``spendgate serve --store redis``; its log lines are counted. The retries in between are
logged at debug level only, which is how the test knows they happened.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable

import grpc
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc

from tests.processes import RedisServer, SpendgateServer, free_port, scrape_metrics

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
# Where each loop runs: the evaluator in the server's child process (``process: evaluator`` on
# its lines); the policies are followed by both processes.
RUNS_IN: dict[str, tuple[str, ...]] = {
    loop: ("evaluator",) if loop == "evaluator_round" else ("serve",) for loop in LOOPS
}
RUNS_IN["policies_pubsub"] = ("serve", "evaluator")
DEADLINE_SECONDS = 60.0


def wait_for(server: SpendgateServer, done: Callable[[list[dict[str, object]]], bool], what: str) -> None:
    """Poll the server's log until ``done`` holds for its events (a condition, not a duration)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not done(server.log_events()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def counts(events: list[dict[str, object]], level: str) -> Counter[str]:
    return Counter(str(e["event"]) for e in events if e.get("level") == level)


def by_process(events: list[dict[str, object]]) -> dict[str, list[dict[str, object]]]:
    """The server's lines and its evaluator child's (``process: evaluator``), apart: each process
    runs its own loops (both follow the policies), and each logs its outage once."""
    split: dict[str, list[dict[str, object]]] = {}
    for event in events:
        split.setdefault(str(event.get("process", "serve")), []).append(event)
    return split


def every_loop(
    events: list[dict[str, object]], holds: Callable[[list[dict[str, object]], str], bool]
) -> bool:
    """Whether ``holds(lines of the process, loop)`` for every loop in every process it runs in."""
    processes = by_process(events)
    return all(holds(processes.get(process, []), loop) for loop in LOOPS for process in RUNS_IN[loop])


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
        # The evaluator child starts after the server serves: its loops must run before the outage
        # (a child still starting waits for the store instead, and logs evaluator_store_lost).
        wait_for(
            server,
            lambda events: any(e["event"] == "worker_ready" for e in by_process(events).get("evaluator", [])),
            "the evaluator child to be ready",
        )
        redis_server.stop()
        # Down long enough for every loop to have retried at least twice (seen at debug level).
        wait_for(
            server,
            lambda events: every_loop(events, lambda mine, loop: counts(mine, "debug")[LOST[loop]] >= 2),
            "every loop to retry twice",
        )
        redis_server = RedisServer.start(port=redis_server.port, workdir=redis_server.workdir)
        wait_for(
            server,
            lambda events: every_loop(events, lambda mine, loop: counts(mine, "info")[RESTORED[loop]] >= 1),
            "every loop to report the outage's end",
        )
        processes = by_process(server.log_events())
        assert set(processes) == {"serve", "evaluator"}
        for process, events in processes.items():
            warnings, infos, debugs = (
                counts(events, "warning"),
                counts(events, "info"),
                counts(events, "debug"),
            )
            for loop in LOOPS:
                if process not in RUNS_IN[loop]:
                    assert not warnings[LOST[loop]] and not infos[RESTORED[loop]], (process, loop)
                    continue
                assert warnings[LOST[loop]] == 1, (process, loop, warnings)
                assert infos[RESTORED[loop]] == 1, (process, loop, infos)
                (restored,) = [e for e in events if e["event"] == RESTORED[loop]]
                # Every failed try is counted: the one warning plus the retries logged at debug level.
                assert restored["failures"] == 1 + debugs[LOST[loop]], (process, loop)
                assert isinstance(restored["outage_seconds"], float) and restored["outage_seconds"] > 0
    finally:
        redis_server.stop()


# The kinds of per-call failure an outage causes: (the outage's warning, its end's info line).
CALL_KINDS = {
    "rpc": ("store_unavailable", "store_restored"),
    "journal_intent": ("journal_intent_failed", "journal_intent_restored"),
}
# Decides sent while Redis is down (each carrying the same settle, as a client retries it).
CALLS_DURING_OUTAGE = 40


def decide_carrying(settle: pb.SettleRequest | None, n: int) -> pb.DecideRequest:
    """The ``n``-th Decide of session ``s`` (its own prompt), with ``settle`` riding along."""
    return pb.DecideRequest(
        session_id="s",
        model="claude-sonnet-4-5",
        input_tokens=100,
        max_output_tokens=100,
        fingerprint=hashlib.sha256(f"prompt {n}".encode()).digest(),
        settles=[settle] if settle is not None else [],
    )


def decide(
    stub: decision_pb2_grpc.DecisionServiceStub, request: pb.DecideRequest
) -> pb.DecideResponse | grpc.StatusCode:
    """The answer to ``request``, or the status code it failed with."""
    try:
        response: pb.DecideResponse = stub.Decide(request, timeout=10)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return response


def test_calls_failing_in_an_outage_log_it_once_per_kind(spendgate: Callable[..., SpendgateServer]) -> None:
    """A client's Decides through an outage, each carrying a settle: one warning and one
    restored line per kind (the RPCs' store failures, the journal intents' writes), the rest
    at debug level; the metrics still count every failed call."""
    redis_server = RedisServer.start()
    metrics_port = free_port()
    try:
        server = spendgate(
            *("--store", "redis", "--redis-url", redis_server.url, "--log-level", "debug"),
            *("--metrics-port", str(metrics_port)),
        )
        with grpc.insecure_channel(server.target) as channel:
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            first = stub.Decide(decide_carrying(None, 0), timeout=10)
            assert first.verdict == pb.VERDICT_ALLOW
            carried = pb.SettleRequest(
                session_id="s",
                reservation_id=first.reservation_id,
                model="claude-sonnet-4-5",
                usage=pb.Usage(input_tokens=100, output_tokens=10),
                outcome=pb.PROVIDER_OUTCOME_OK,
            )
            redis_server.stop()
            for n in range(1, CALLS_DURING_OUTAGE + 1):
                assert decide(stub, decide_carrying(carried, n)) is grpc.StatusCode.UNAVAILABLE
            # Started again empty (no persistence): the carried settle is then NOT_FOUND, a
            # failure of the call's own, not of the store.
            redis_server = RedisServer.start(port=redis_server.port, workdir=redis_server.workdir)
            n = CALLS_DURING_OUTAGE
            deadline = time.monotonic() + DEADLINE_SECONDS
            # Until the server's connection and circuit breaker let a Decide through.
            while isinstance(answer := decide(stub, decide_carrying(carried, n := n + 1)), grpc.StatusCode):
                assert answer is grpc.StatusCode.UNAVAILABLE, answer
                assert time.monotonic() < deadline, "no Decide answered after the restart"
                time.sleep(0.05)
            assert answer.verdict == pb.VERDICT_ALLOW
            assert [r.code for r in answer.settle_results] == [grpc.StatusCode.NOT_FOUND.value[0]]
        wait_for(
            server,
            lambda events: all(
                counts(by_process(events).get("serve", []), "info")[restored] >= 1
                for _, restored in CALL_KINDS.values()
            ),
            "every kind of call failure to report the outage's end",
        )
        events = by_process(server.log_events())["serve"]
        warnings, infos, debugs = counts(events, "warning"), counts(events, "info"), counts(events, "debug")
        metrics = scrape_metrics(metrics_port)
        failed_calls = {
            method: metrics.get(f'spendgate_rpc_errors_total{{code="UNAVAILABLE",method="{method}"}}', 0.0)
            for method in ("Decide", "Settle")
        }
        assert failed_calls["Decide"] >= CALLS_DURING_OUTAGE
        assert failed_calls["Settle"] >= CALLS_DURING_OUTAGE
        # At least the last one; one more if a Decide failed as its settle went through (the
        # store's first call after the restart is the circuit breaker's lone trial).
        assert metrics['spendgate_rpc_errors_total{code="NOT_FOUND",method="Settle"}'] >= 1
        for kind, (lost, restored) in CALL_KINDS.items():
            assert warnings[lost] == 1, (kind, warnings)
            assert infos[restored] == 1, (kind, infos)
            (line,) = [e for e in events if e["event"] == restored]
            assert line["failures"] == 1 + debugs[lost], (kind, line, debugs)
            assert isinstance(line["outage_seconds"], float) and line["outage_seconds"] > 0
        # Every RPC the store failed is one failure of the outage: each Decide and its settle.
        (rpc_restored,) = [e for e in events if e["event"] == "store_restored"]
        assert rpc_restored["failures"] == failed_calls["Decide"] + failed_calls["Settle"]
        # Every carried settle during the outage tried to write its journal intent.
        (intent_restored,) = [e for e in events if e["event"] == "journal_intent_restored"]
        assert isinstance(intent_restored["failures"], int)
        assert intent_restored["failures"] >= CALLS_DURING_OUTAGE
        # The calls' own failures are not an outage: the NOT_FOUND settle logs no warning.
        assert not [e for e in events if e.get("level") == "warning" and "NOT_FOUND" in str(e)]
    finally:
        redis_server.stop()
