"""Policy evaluation never runs on the event loop that answers Decide (issue 18, item 4a)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from spendgate.v1 import policy_pb2 as ppb
from spendgate.v1 import policy_pb2_grpc
from spendgate_server.engine.config import EnforcementConfig
from spendgate_server.engine.decide import DecisionEngine
from spendgate_server.engine.pricing import PriceTable
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.policy.evaluator import (
    EVALUATION_NICENESS,
    BatchResult,
    Evaluator,
    EvaluatorTimings,
    ProcessEvaluation,
    evaluate_batch,
)
from spendgate_server.policy.journal import CallContext, JournalEvent, StoreJournal
from spendgate_server.policy.policies import Policies, compile_policies, policies_to_dict
from spendgate_server.policy.remote_policies import PolicyResolver
from spendgate_server.policy.violations import PolicyType, ViolationFeed
from spendgate_server.store.logs import MemoryLogStore
from spendgate_server.store.memory import MemoryStore
from spendgate_server.store.policies import PolicyStore

from tests.conftest import FakeClock
from tests.integration.test_alerts_service import call, set_policies, wait_for
from tests.integration.test_server import bad_fields
from tests.processes import SpendgateServer
from tests.unit.test_pattern_cost import HEAVY
from tests.unit.test_rules import PRICES
from tests.unit.test_rules import call as decide_call

GATE_VARIABLE = "SPENDGATE_TEST_EVALUATION_GATE"
WAIT_SECONDS = 30.0


def gated_evaluate(policies: Policies, version: int, payloads: list[str]) -> BatchResult:
    """Runs in the evaluation process: says it started, then holds until the test opens the gate."""
    gate = Path(os.environ[GATE_VARIABLE])
    gate.with_suffix(".started").write_text(str(os.getpid()))
    deadline = time.monotonic() + WAIT_SECONDS
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.005)  # polls for the test's signal; nothing here waits for time to pass
    return evaluate_batch(compile_policies(policies, version), payloads)


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_the_loop_decides_while_the_evaluation_process_is_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the evaluation process is provably mid-batch, this loop still answers a Decide."""
    gate = tmp_path / "gate"
    monkeypatch.setenv(GATE_VARIABLE, str(gate))
    clock = FakeClock()
    logs = MemoryLogStore()
    policy_store = PolicyStore()
    await policy_store.put("t", '{"banned_patterns": ["secret"], "journal_prompts": true}', "", "test", 1)
    policies = PolicyResolver(policy_store)
    journal = StoreJournal(logs, max_entries=100, journals_prompts=policies.journals_prompts)
    feed = ViolationFeed(logs, max_entries=100, dedup_window_ms=60_000)
    context = CallContext(prompt_text="a secret")
    await journal.append(JournalEvent("a" * 32, "t", "s", clock(), "m", True, 1, 1, 0, 0, 1, context), 60_000)
    evaluator = Evaluator(
        logs,
        feed,
        policies,
        consumer="w",
        timings=EvaluatorTimings(claim_idle_ms=0),
        clock=clock,
        evaluation=ProcessEvaluation(evaluate=gated_evaluate),
    )
    engine = DecisionEngine(MemoryStore(), PriceTable(PRICES), ConfigResolver.static(EnforcementConfig()))
    try:
        batch = asyncio.create_task(evaluator.run_once())
        started = gate.with_suffix(".started")
        await until(started.exists)
        child = int(started.read_text())
        assert child != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, child) == min(
            19, os.getpriority(os.PRIO_PROCESS, 0) + EVALUATION_NICENESS
        )
        decision = await engine.decide(decide_call(session="other-tenant"))
        assert decision.allowed and not batch.done()
        gate.write_text("go")
        assert await batch == 1
        [violation] = await feed.after("t", "0-0", 10)
        assert violation.policy_type is PolicyType.BANNED_PATTERNS
    finally:
        await evaluator.close()


def evaluation_children(server_pid: int) -> dict[int, int]:
    """pid -> niceness of the server's multiprocessing children that evaluate (not the tracker)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == server_pid and "spawn_main" in cmdline:
            found[int(entry.name)] = int(fields[16])
    return found


@pytest.mark.redis
def test_a_server_with_the_evaluator_on_matches_in_a_nicer_child_process(
    spendgate: Callable[..., SpendgateServer], redis_url: str
) -> None:
    """`serve --evaluator on` (Redis): a journaled prompt is flagged, and the matching ran in a child."""
    server = spendgate(
        *("--store", "redis", "--redis-url", redis_url, "--evaluator", "on"),
        *("--evaluator-poll-millis", "20"),
    )
    set_policies(server.target, banned_patterns=[{"id": "k", "pattern": "sk-live-"}], journal_prompts=True)
    decision = call(server.target, "isolated", model="claude-sonnet-4-5", prompt_text="key sk-live-123 here")
    [found] = wait_for(server.target, 1, session_id="isolated")
    assert found.decision_id == decision and found.pattern.pattern_id == "k"
    children = evaluation_children(server.process.pid)
    assert children, "no evaluation process under the server"
    assert set(children.values()) == {EVALUATION_NICENESS}


def test_the_issue_pattern_set_is_refused_by_a_running_server(
    spendgate: Callable[..., SpendgateServer],
) -> None:
    """UpdatePolicies with 100 heavy patterns: INVALID_ARGUMENT naming each pattern and the set."""
    server = spendgate()
    heavy = ppb.Policies(
        banned_patterns=[ppb.BannedPattern(id=f"p{i}", pattern=HEAVY + str(i)) for i in range(100)],
        journal_prompts=True,
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.UpdatePolicies(ppb.UpdatePoliciesRequest(policies=heavy))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        fields = bad_fields(info.value)
        # The set's total first; then each pattern, as many as fit in a readable error.
        shown = len(fields) - 2
        assert fields == [
            "policies.banned_patterns",
            *(f"policies.banned_patterns[{i}].pattern" for i in range(shown + 1)),
        ]
        assert f"and {100 - shown} more problems" in (info.value.details() or "")
        current = stub.GetPolicies(ppb.GetPoliciesRequest()).policy_set
        assert current.version == 0 and policies_to_dict(Policies()) == {}
