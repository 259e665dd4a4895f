"""PolicyService, ViolationService, the CLIs and the SDK wrappers over real server processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from spendgate.v1 import policy_pb2 as ppb
from spendgate.v1 import policy_pb2_grpc, violation_pb2_grpc
from spendgate.v1 import violation_pb2 as vpb
from spendgate_client import DecisionClient, JournaledAnthropic, key_fingerprint

from tests.fake_provider import PRICES_YAML, FakeProvider, new_session
from tests.integration.test_security import bearer, code_of, create_key
from tests.integration.test_server import bad_fields
from tests.integration.test_webhook import Receiver
from tests.processes import SpendgateServer

SECRET = "sk-live-Zq8Xv2LmN4pR7tY1uW9eB3cD5fG6hJ0kQ"  # noqa: S105  # fake: it must never be stored
DEADLINE_SECONDS = 15.0


@pytest.fixture
def server(spendgate: Callable[..., SpendgateServer], tmp_path: Path) -> SpendgateServer:
    """A memory-store server (the evaluator runs inside it) with round prices."""
    config = tmp_path / "prices.yaml"
    config.write_text(PRICES_YAML)
    return spendgate("--config", str(config), "--evaluator-poll-millis", "20")


def set_policies(target: str, metadata: Any = None, **raw: Any) -> ppb.PolicySet:
    from spendgate_server.policy.policies import policies_from_dict
    from spendgate_server.rpc.alerts_wire import policies_to_proto

    with grpc.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        etag = stub.GetPolicies(ppb.GetPoliciesRequest(), metadata=metadata).policy_set.etag
        request = ppb.UpdatePoliciesRequest(policies=policies_to_proto(policies_from_dict(raw)), etag=etag)
        return stub.UpdatePolicies(request, metadata=metadata).policy_set


def call(
    target: str, session: str, model: str = "claude-test-big", output_tokens: int = 10, **context: Any
) -> str:
    """Decide and settle one call through DecisionClient; returns its decision id."""
    with DecisionClient(target, timeout=5) as client:
        decision = client.decide(session, model, 100, 100, b"f" * 32)
        assert decision.reservation_id, decision
        settled = client.settle(
            session, decision.reservation_id, model, input_tokens=100, output_tokens=output_tokens, **context
        )
        assert settled is not None
        return decision.decision_id


def list_violations(target: str, metadata: Any = None, **filters: Any) -> list[vpb.Violation]:
    with grpc.insecure_channel(target) as channel:
        stub = violation_pb2_grpc.ViolationServiceStub(channel)
        found: list[vpb.Violation] = []
        request = vpb.ListViolationsRequest(page_size=2, **filters)
        while True:
            page = stub.ListViolations(request, metadata=metadata)
            found += page.violations
            if not page.next_page_token:
                return found
            request.page_token = page.next_page_token


def wait_for(target: str, count: int, **filters: Any) -> list[vpb.Violation]:
    """Poll ListViolations until it holds ``count`` violations (the evaluator runs asynchronously)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while len(found := list_violations(target, **filters)) < count:
        assert time.monotonic() < deadline, f"only {len(found)} of {count} violations"
        time.sleep(0.02)
    return found


def test_policies_are_validated_and_compare_and_set(server: SpendgateServer) -> None:
    """A pattern RE2 refuses is INVALID_ARGUMENT naming it; a stale etag FAILED_PRECONDITION; history kept."""
    with grpc.insecure_channel(server.target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        bad = ppb.Policies(banned_patterns=[ppb.BannedPattern(id="x", pattern="(?<=look)behind")])
        with pytest.raises(grpc.RpcError) as info:
            stub.UpdatePolicies(ppb.UpdatePoliciesRequest(policies=bad))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(info.value) == ["policies.banned_patterns[0].pattern"]
        assert "RE2" in (info.value.details() or "")
        first = set_policies(server.target, approved_models=["a"])
        set_policies(server.target, approved_models=["b"])
        with pytest.raises(grpc.RpcError) as info:
            stub.UpdatePolicies(ppb.UpdatePoliciesRequest(policies=ppb.Policies(), etag=first.etag))
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        current = stub.GetPolicies(ppb.GetPoliciesRequest()).policy_set
        assert (current.version, list(current.policies.approved_models)) == (2, ["b"])
        history = stub.ListPolicyRevisions(ppb.ListPolicyRevisionsRequest())
        assert [r.version for r in history.revisions] == [2, 1]
        patterns = stub.GetPatternSet(ppb.GetPatternSetRequest(known_version=2))
        assert patterns.unchanged and patterns.version == 2


def test_admin_scope_guards_policies_and_violations(
    spendgate: Callable[..., SpendgateServer], tmp_path: Path
) -> None:
    """Client keys read only the pattern set; admin keys do the rest, for their own tenant only."""
    keys_file = tmp_path / "keys.json"
    admin, client, other = (
        create_key(keys_file, "acme", "admin", "ops"),
        create_key(keys_file, "acme", "client", "agent"),
        create_key(keys_file, "globex", "admin", "ops"),
    )
    server = spendgate("--keys-file", str(keys_file))
    set_policies(server.target, bearer(admin), banned_patterns=[{"id": "p", "pattern": "secret"}])
    with grpc.insecure_channel(server.target) as channel:
        policies = policy_pb2_grpc.PolicyServiceStub(channel)
        violations = violation_pb2_grpc.ViolationServiceStub(channel)
        got = policies.GetPatternSet(ppb.GetPatternSetRequest(), metadata=bearer(client))
        assert [p.id for p in got.patterns] == ["p"]
        for denied in (
            lambda: policies.GetPolicies(ppb.GetPoliciesRequest(), metadata=bearer(client)),
            lambda: policies.UpdatePolicies(ppb.UpdatePoliciesRequest(), metadata=bearer(client)),
            lambda: policies.ListPolicyRevisions(ppb.ListPolicyRevisionsRequest(), metadata=bearer(client)),
            lambda: violations.ListViolations(vpb.ListViolationsRequest(), metadata=bearer(client)),
            lambda: next(
                iter(violations.WatchViolations(vpb.WatchViolationsRequest(), metadata=bearer(client)))
            ),
        ):
            assert code_of(denied) is grpc.StatusCode.PERMISSION_DENIED
        assert violations.ListViolations(vpb.ListViolationsRequest(), metadata=bearer(admin)).violations == []
        assert list(policies.GetPatternSet(ppb.GetPatternSetRequest(), metadata=bearer(other)).patterns) == []


def test_settled_calls_reach_the_feed_with_filters(server: SpendgateServer) -> None:
    """Settle context flows to the feed; list filters by type, session, project and time."""
    set_policies(
        server.target,
        approved_models=["claude-test-big"],
        key_environment_check=[{"key_label": "ci", "environments": ["staging"]}],
        approval_required_threshold_cents=1,
    )
    started = time.time_ns() // 1_000_000
    session_a, session_b = new_session(), new_session()
    call(server.target, session_a)  # clean
    small = call(
        server.target,
        session_a,
        model="claude-test-small",
        requested_model="claude-test-big",
        verdict="allow_downgraded",
        project="web",
    )
    wrong_env = call(server.target, session_b, key_label="ci", environment="prod", project="batch")
    costly = call(server.target, session_b, output_tokens=20_000)
    everything = wait_for(server.target, 4)
    assert {(v.decision_id, v.policy_type) for v in everything} == {
        (small, vpb.POLICY_TYPE_APPROVED_MODELS),
        (wrong_env, vpb.POLICY_TYPE_KEY_ENVIRONMENT_CHECK),
        (costly, vpb.POLICY_TYPE_APPROVAL_REQUIRED_THRESHOLD),
        # 20,000 output tokens settled on a call decided with 100: far above its estimate.
        (costly, vpb.POLICY_TYPE_SETTLE_ANOMALY),
    }
    [model] = list_violations(server.target, policy_type=vpb.POLICY_TYPE_APPROVED_MODELS)
    assert (model.requested_model, model.effective_model, model.project) == (
        "claude-test-big",
        "claude-test-small",
        "web",
    )
    assert "downgraded from claude-test-big" in model.message
    assert {v.decision_id for v in list_violations(server.target, session_id=session_b)} == {
        wrong_env,
        costly,
    }
    assert [v.decision_id for v in list_violations(server.target, project="batch")] == [wrong_env]
    from spendgate_server.rpc.alerts_wire import timestamp

    assert list_violations(server.target, end_time=timestamp(started)) == []
    assert len(list_violations(server.target, start_time=timestamp(started))) == 4


def test_a_resumed_watch_receives_every_violation_exactly_once(server: SpendgateServer) -> None:
    """A watcher that disconnects and resumes from its last cursor misses none and repeats none."""
    set_policies(server.target, approval_required_threshold_cents=0)
    session = new_session()

    async def watch(cursor: str, count: int) -> list[vpb.Violation]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stream = violation_pb2_grpc.ViolationServiceStub(channel).WatchViolations(
                vpb.WatchViolationsRequest(cursor=cursor)
            )
            got: list[vpb.Violation] = []
            while len(got) < count:
                response = await asyncio.wait_for(stream.read(), DEADLINE_SECONDS)
                assert isinstance(response, vpb.WatchViolationsResponse)
                got.append(response.violation)
            stream.cancel()
            return got

    first_ids = [call(server.target, session) for _ in range(4)]
    first = asyncio.run(watch("0", 2))  # disconnects after two
    later_ids = [call(server.target, session) for _ in range(3)]
    rest = asyncio.run(watch(first[-1].cursor, 5))
    seen = [v.decision_id for v in first + rest]
    assert sorted(seen) == sorted(first_ids + later_ids) and len(set(seen)) == 7
    cursors = [v.cursor for v in first + rest]
    assert cursors == sorted(cursors, key=lambda c: tuple(int(p) for p in c.split("-")))


def test_cli_policies_and_violations(server: SpendgateServer, tmp_path: Path) -> None:
    """`policies set` refuses a bad pattern with RE2's reason and writes a good one; `violations` reads it."""
    target = ("--target", server.target)
    bad = tmp_path / "bad.yaml"
    bad.write_text("banned_patterns:\n  - {id: x, pattern: '(a'}\n")
    refused = cli("policies", "set", str(bad), *target)
    assert (
        refused.returncode == 2
        and "banned_patterns[0].pattern" in refused.stderr
        and "missing )" in refused.stderr
    )
    good = tmp_path / "good.yaml"
    good.write_text("approved_models: [claude-test-big]\napproval_required_threshold_cents: 1000\n")
    written = cli("policies", "set", str(good), *target)
    assert written.returncode == 0 and "+ approved_models" in written.stdout
    assert "approval_required_threshold_cents: 1000" in cli("policies", "get", *target).stdout
    session = new_session()
    decision = call(server.target, session, model="claude-test-small")
    wait_for(server.target, 1)
    listed = cli("violations", "list", "--type", "approved_models", "--json", *target)
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["decision_id"] == decision and row["policy_type"] == "POLICY_TYPE_APPROVED_MODELS"
    tail = cli("violations", "tail", "--from-start", "--count", "1", *target)
    assert tail.returncode == 0 and "approved_models" in tail.stdout and session in tail.stdout
    fingerprint = subprocess.run(
        [sys.executable, "-m", "spendgate_server", "policies", "fingerprint"],
        input=SECRET + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert fingerprint.stdout.strip() == key_fingerprint(SECRET) and SECRET not in fingerprint.stdout


def test_cli_violations_list_limit(server: SpendgateServer) -> None:
    """--limit 0 (was "no violations") is one page of the server's default size; N shows N; -1 exits 2."""
    target = ("--target", server.target)
    set_policies(server.target, approved_models=["claude-test-big"])
    session = new_session()
    decisions = {call(server.target, session, model="claude-test-small") for _ in range(3)}
    wait_for(server.target, 3)

    def shown(*flags: str) -> list[str]:
        listed = cli("violations", "list", "--json", *flags, *target)
        assert listed.returncode == 0, listed.stderr
        return [json.loads(line)["decision_id"] for line in listed.stdout.splitlines()]

    assert set(shown("--limit", "0")) == decisions and len(shown("--limit", "0")) == 3
    assert len(shown("--limit", "2")) == 2 and set(shown("--limit", "2")) < decisions
    refused = cli("violations", "list", "--limit", "-1", *target)
    assert refused.returncode == 2 and "argument --limit: must be 0 or more, got -1" in refused.stderr


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendgate_server", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- the SDK wrappers: context from the environment, local matching, privacy ---------------------


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider().start()
    yield provider
    provider.stop()


@pytest.fixture
def redis_server_with_evaluator(
    spendgate: Callable[..., SpendgateServer], redis_url: str, tmp_path: Path
) -> tuple[SpendgateServer, str]:
    """A Redis-store server evaluating in-process, so the test can read the journal in Redis."""
    config = tmp_path / "prices.yaml"
    config.write_text(PRICES_YAML)
    server = spendgate(
        "--store",
        "redis",
        "--redis-url",
        redis_url,
        "--config",
        str(config),
        "--evaluator",
        "on",
        "--evaluator-poll-millis",
        "20",
        env={"SPENDGATE_REDIS_TIMEOUT_MILLIS": "5000"},
    )
    return server, redis_url


def redis_dump(url: str) -> str:
    """Every string and stream value in Redis, as text: where a leaked secret would be."""
    client = redis.Redis.from_url(url)
    try:
        out = []
        for key in client.scan_iter():
            kind = client.type(key)
            if kind == b"stream":
                out += [repr(fields) for _, fields in client.xrange(key) or ()]
            elif kind == b"string":
                out.append(repr(client.get(key)))
            elif kind == b"hash":
                out.append(repr(client.hgetall(key)))
        return "\n".join(out)
    finally:
        client.close()


@pytest.mark.redis
@pytest.mark.parametrize("journal_prompts", [False, True], ids=["matched-on-client", "journaled"])
def test_wrapper_reports_context_and_never_leaks_the_secret(
    redis_server_with_evaluator: tuple[SpendgateServer, str],
    fake: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
    journal_prompts: bool,
) -> None:
    """A prompt carrying a secret is flagged, the feed never holds it, and unjournaled it never leaves."""
    server, url = redis_server_with_evaluator
    provider_key = "sk-ant-test-key"
    set_policies(
        server.target,
        banned_patterns=[{"id": "live-key", "pattern": "sk-live-"}],
        key_environment_check=[{"key_fingerprint": key_fingerprint(provider_key), "environments": ["prod"]}],
        journal_prompts=journal_prompts,
    )
    monkeypatch.setenv("SPENDGATE_ENVIRONMENT", "dev")
    monkeypatch.setenv("SPENDGATE_PROJECT", "support-bot")
    session = new_session()
    client = JournaledAnthropic(
        api_key=provider_key,
        base_url=fake.base_url,
        max_retries=0,
        session_id=session,
        spendgate_target=server.target,
    )
    try:
        client.messages.create(
            model="claude-test-big",
            max_tokens=100,
            system="You are helpful.",
            messages=[{"role": "user", "content": f"my key is {SECRET} why does it fail?"}],
        )
        assert client.spendgate_flush(DEADLINE_SECONDS)
    finally:
        client.close()
    found = {v.policy_type: v for v in wait_for(server.target, 2, session_id=session)}
    banned = found[vpb.POLICY_TYPE_BANNED_PATTERNS]
    assert banned.pattern.pattern_id == "live-key" and banned.pattern.matched_on_client is not journal_prompts
    assert banned.pattern.offset == len("You are helpful.\nmy key is ")
    env = found[vpb.POLICY_TYPE_KEY_ENVIRONMENT_CHECK]
    assert (env.environment, env.project, env.key_fingerprint) == (
        "dev",
        "support-bot",
        key_fingerprint(provider_key),
    )
    for violation in found.values():
        assert SECRET[8:20] not in str(violation) and provider_key not in str(violation)
    stored = redis_dump(url)
    assert provider_key not in stored
    if journal_prompts:
        assert (
            "[REDACTED]" in banned.pattern.redacted_excerpt and "my key is" in banned.pattern.redacted_excerpt
        )
        journal_only = stored.count(SECRET[8:20])
        assert journal_only == 1, (
            "the secret may sit in the journaled prompt (the tenant chose that), nowhere else"
        )
    else:
        assert banned.pattern.redacted_excerpt == ""
        assert SECRET[8:20] not in stored and "why does it fail" not in stored


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_webhook_flag_delivers_signed_violations(
    spendgate: Callable[..., SpendgateServer],
    tmp_path: Path,
    receiver: Receiver,
    store: str,
    request: pytest.FixtureRequest,
) -> None:
    """`serve --webhook-url` POSTs each violation, signed with the configured secret (with Redis,
    from the server's evaluator child process)."""
    from spendgate_server.policy.webhook import SIGNATURE_HEADER, verify_signature

    secret = tmp_path / "secret"
    secret.write_text("a-webhook-secret-of-some-length\n")
    receiver.failures = 1
    backend = (
        ("--store", "redis", "--redis-url", request.getfixturevalue("redis_url")) if store == "redis" else ()
    )
    server = spendgate(
        *backend,
        *("--webhook-url", receiver.url, "--webhook-secret-file", str(secret)),
        *("--evaluator-poll-millis", "20"),
    )
    set_policies(server.target, approval_required_threshold_cents=0)
    decision = call(server.target, new_session())
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not receiver.accepted:
        assert time.monotonic() < deadline, receiver.received
        time.sleep(0.02)
    [(headers, body)] = receiver.accepted
    assert verify_signature(
        b"a-webhook-secret-of-some-length", headers[SIGNATURE_HEADER], body, int(time.time())
    )
    assert json.loads(body)["decision_id"] == decision


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver().start()
    yield started
    started.stop()
