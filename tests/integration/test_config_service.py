"""Remote config: the store contract, CAS, validation, fleet-wide invalidation, merge, CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc, decision_pb2_grpc
from spendgate.v1 import decision_pb2 as pb
from spendgate_server.engine.config import BudgetMode, EnforcementConfig, ModelDowngrade, Rule, config_to_dict
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.store.configs import ConfigConflict, ConfigStore, MemoryConfigStore
from spendgate_server.store.redis_configs import RedisConfigStore

from tests.conftest import STORES
from tests.integration.test_server import bad_fields
from tests.processes import SpendgateServer

PROPAGATION_DEADLINE_SECONDS = 10.0


@pytest.fixture(params=STORES)
async def config_store(request: pytest.FixtureRequest) -> AsyncIterator[ConfigStore]:
    """Each config store implementation, empty."""
    if request.param == "memory":
        store: ConfigStore = MemoryConfigStore()
    else:
        store = RedisConfigStore.from_url(request.getfixturevalue("redis_url"), timeout_seconds=5)
    yield store
    await store.close()


async def test_put_get_and_versions(config_store: ConfigStore) -> None:
    """A write is readable, bumps the tenant's version, and its etag is its version."""
    assert await config_store.get("t", "") is None
    first = await config_store.put("t", "", '{"token_ceiling": 5}', "", "alice", 1_000)
    second = await config_store.put("t", "proj", '{"token_ceiling": 3}', "", "bob", 2_000)
    assert (first.version, second.version) == (1, 2)
    stored = await config_store.get("t", "")
    assert stored is not None and (stored.etag, stored.updated_by, stored.config_json) == (
        "1",
        "alice",
        '{"token_ceiling": 5}',
    )
    assert await config_store.versions(["t", "other"]) == {"t": 2, "other": 0}


async def test_stale_etag_conflicts_and_changes_nothing(config_store: ConfigStore) -> None:
    """Compare-and-set: a write with a stale or missing etag fails; the config stays as it was."""
    await config_store.put("t", "", "{}", "", "a", 1)
    await config_store.put("t", "", '{"max_tool_calls": 1}', "1", "b", 2)
    for etag in ("1", ""):
        with pytest.raises(ConfigConflict) as info:
            await config_store.put("t", "", '{"max_tool_calls": 9}', etag, "c", 3)
        assert info.value.current_etag == "2"
    stored = await config_store.get("t", "")
    assert stored is not None and stored.config_json == '{"max_tool_calls": 1}'
    assert await config_store.versions(["t"]) == {"t": 2}


async def test_history_is_newest_first(config_store: ConfigStore) -> None:
    """Every write is kept, newest first, with its author."""
    etag = ""
    for n in range(3):
        etag = (await config_store.put("t", "p", json.dumps({"max_tool_calls": n}), etag, f"u{n}", n)).etag
    history = await config_store.history("t", "p")
    assert [(h.version, h.updated_by) for h in history] == [(3, "u2"), (2, "u1"), (1, "u0")]


async def test_poll_catches_a_change_without_notices(redis_url: str) -> None:
    """With no pub/sub at all, polling the version counter invalidates the cached config."""
    writer, reader = (
        RedisConfigStore.from_url(redis_url, timeout_seconds=5),
        RedisConfigStore.from_url(redis_url, timeout_seconds=5),
    )
    resolver = ConfigResolver(reader, EnforcementConfig())
    try:
        assert (await resolver.load("t", "")).config.token_ceiling is None
        await writer.put("t", "", '{"token_ceiling": 100}', "", "a", 1)
        assert resolver.cached("t", "") is not None
        await resolver.poll_once()
        assert resolver.cached("t", "") is None
        assert (await resolver.load("t", "")).config.token_ceiling == 100
    finally:
        await writer.close()
        await reader.close()


configs = st.builds(
    EnforcementConfig,
    token_ceiling=st.one_of(st.none(), st.integers(1, 10_000)),
    max_session_nano_usd=st.one_of(st.none(), st.integers(0, 10**12)),
    budget_mode=st.sampled_from(BudgetMode),
    dedup_ttl_seconds=st.one_of(st.none(), st.integers(1, 3600)),
    max_tool_calls=st.one_of(st.none(), st.integers(0, 100)),
    model_downgrade=st.one_of(
        st.none(), st.builds(ModelDowngrade, st.integers(0, 10**9), st.sampled_from(["a", "b"]))
    ),
    shadow_rules=st.frozensets(st.sampled_from(Rule)),
)


@given(remote=configs, local=configs)
def test_effective_config_is_never_looser(remote: EnforcementConfig, local: EnforcementConfig) -> None:
    """For any remote and local configs, each enforced limit of either survives, at least as strict."""
    merged = remote.stricter(local)
    for side in (remote, local):
        if side.token_ceiling is not None and Rule.TOKEN_CEILING not in side.shadow_rules:
            assert merged.token_ceiling is not None and merged.token_ceiling <= side.token_ceiling
            assert Rule.TOKEN_CEILING not in merged.shadow_rules
        if side.max_session_nano_usd is not None and Rule.SESSION_BUDGET not in side.shadow_rules:
            assert merged.max_session_nano_usd is not None
            assert merged.max_session_nano_usd <= side.max_session_nano_usd
            assert Rule.SESSION_BUDGET not in merged.shadow_rules
        if side.dedup_ttl_seconds is not None and Rule.DUPLICATE_REQUEST not in side.shadow_rules:
            assert merged.dedup_ttl_seconds is not None and merged.dedup_ttl_seconds >= side.dedup_ttl_seconds
        if side.max_tool_calls is not None and Rule.TOOL_CALL_LIMIT not in side.shadow_rules:
            assert merged.max_tool_calls is not None and merged.max_tool_calls <= side.max_tool_calls
        if side.model_downgrade is not None and Rule.MODEL_DOWNGRADE not in side.shadow_rules:
            assert merged.model_downgrade is not None
            assert merged.model_downgrade.threshold_nano_usd <= side.model_downgrade.threshold_nano_usd
        if side.budget_mode is BudgetMode.STRICT:
            assert merged.budget_mode is BudgetMode.STRICT
    # A rule only one side shadows, and the other does not set, keeps reporting in shadow.
    assert merged.shadow_rules <= remote.shadow_rules | local.shadow_rules


# --- over the wire -------------------------------------------------------------------------


def write(target: str, rules: dict[str, Any], project: str = "", etag: str | None = None) -> cpb.Config:
    """Write ``rules`` (user-facing form) with the current etag unless one is given."""
    from spendgate_server.engine.config import parse_enforcement_config
    from spendgate_server.rpc.wire import config_to_proto

    with grpc.insecure_channel(target) as channel:
        stub = config_pb2_grpc.ConfigServiceStub(channel)
        if etag is None:
            etag = stub.GetConfig(cpb.GetConfigRequest(project=project)).config.etag
        request = cpb.UpdateConfigRequest(
            project=project, enforcement_config=config_to_proto(parse_enforcement_config(rules)), etag=etag
        )
        return stub.UpdateConfig(request, metadata=(("x-spendgate-actor", "test"),)).config


def decide(target: str, input_tokens: int, project: str = "", prompt: str = "p") -> pb.DecideResponse:
    with grpc.insecure_channel(target) as channel:
        return decision_pb2_grpc.DecisionServiceStub(channel).Decide(
            pb.DecideRequest(
                session_id=f"s-{time.monotonic_ns()}",
                model="claude-sonnet-4-5",
                input_tokens=input_tokens,
                max_output_tokens=10,
                fingerprint=hashlib.sha256(prompt.encode()).digest(),
                project=project,
            )
        )


@pytest.fixture
def two_servers(redis_url: str, spendgate: Callable[..., SpendgateServer]) -> list[SpendgateServer]:
    return [spendgate("--store", "redis", "--redis-url", redis_url) for _ in range(2)]


def wait_until_ceiling(target: str, tokens: int) -> float:
    """Seconds until a call of ``tokens`` is blocked on ``target`` (bounded poll)."""
    started = time.monotonic()
    while decide(target, tokens).verdict != pb.VERDICT_BLOCK:
        assert time.monotonic() - started < PROPAGATION_DEADLINE_SECONDS, "config never reached the server"
        time.sleep(0.002)
    return time.monotonic() - started


@pytest.mark.redis
def test_a_write_on_one_server_changes_decisions_on_the_other(two_servers: list[SpendgateServer]) -> None:
    """A config written through server A is applied by server B, and echoed as its version."""
    a, b = two_servers
    assert decide(b.target, 5_000).verdict == pb.VERDICT_ALLOW  # B has cached the empty config
    written = write(a.target, {"token_ceiling": 1_000})
    delay = wait_until_ceiling(b.target, 5_000)
    assert decide(b.target, 500).config_version == written.version
    print(f"config propagation to the other server: {delay * 1000:.1f} ms")


@pytest.mark.redis
def test_pubsub_link_cut_still_converges(two_servers: list[SpendgateServer], redis_url: str) -> None:
    """Killing every pub/sub connection loses notices; the servers still converge (reconnect or poll)."""
    a, b = two_servers
    assert decide(b.target, 5_000).verdict == pb.VERDICT_ALLOW
    admin = redis.Redis.from_url(redis_url)
    try:
        killed = cast(int, admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))  # type: ignore[no-untyped-call]  # untyped in redis-py
        assert killed >= 2
        write(a.target, {"token_ceiling": 1_000})
        wait_until_ceiling(b.target, 5_000)
    finally:
        admin.close()


def test_stale_etag_is_failed_precondition(spendgate: Callable[..., SpendgateServer]) -> None:
    """A write with a stale etag is FAILED_PRECONDITION and does not replace the config."""
    server = spendgate()
    first = write(server.target, {"token_ceiling": 100})
    write(server.target, {"token_ceiling": 200}, etag=first.etag)
    with pytest.raises(grpc.RpcError) as info:
        write(server.target, {"token_ceiling": 300}, etag=first.etag)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert decide(server.target, 250).verdict == pb.VERDICT_BLOCK


def test_invalid_config_names_every_field_and_is_not_stored(
    spendgate: Callable[..., SpendgateServer],
) -> None:
    """Every bad field is named; nothing is written; an unpriced downgrade fallback is refused."""
    server = spendgate()
    bad = pb.EnforcementConfig(token_ceiling=0, max_tool_calls=-1, budget_mode=cast(Any, 7))
    bad.model_downgrade.threshold_nano_usd = 1
    bad.model_downgrade.fallback_model = "no-such-model-anywhere"
    with grpc.insecure_channel(server.target) as channel:
        stub = config_pb2_grpc.ConfigServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.UpdateConfig(cpb.UpdateConfigRequest(enforcement_config=bad))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert {
            "enforcement_config.token_ceiling",
            "enforcement_config.max_tool_calls",
            "enforcement_config.budget_mode",
        } <= set(bad_fields(info.value))
        unpriced = pb.EnforcementConfig(
            model_downgrade=pb.ModelDowngrade(threshold_nano_usd=1, fallback_model="no-such-model-anywhere")
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.UpdateConfig(cpb.UpdateConfigRequest(enforcement_config=unpriced))
        assert bad_fields(info.value) == ["enforcement_config.model_downgrade.fallback_model"]
        assert stub.GetConfig(cpb.GetConfigRequest()).config.version == 0
        with pytest.raises(grpc.RpcError) as info:
            stub.GetConfig(cpb.GetConfigRequest(project="bad project!"))
        assert bad_fields(info.value) == ["project"]


def test_history_and_project_rules(spendgate: Callable[..., SpendgateServer]) -> None:
    """Project rules tighten the tenant's for calls naming the project; history keeps each change."""
    server = spendgate()
    write(server.target, {"token_ceiling": 4_000})
    write(server.target, {"token_ceiling": 1_000}, project="batch")
    assert decide(server.target, 2_000).verdict == pb.VERDICT_ALLOW
    assert decide(server.target, 2_000, project="batch").verdict == pb.VERDICT_BLOCK
    assert decide(server.target, 5_000, project="batch").rule == pb.RULE_TOKEN_CEILING
    write(server.target, {"token_ceiling": 3_000, "max_tool_calls": 5})
    with grpc.insecure_channel(server.target) as channel:
        stub = config_pb2_grpc.ConfigServiceStub(channel)
        history = stub.ListConfigRevisions(cpb.ListConfigRevisionsRequest(page_size=1))
        assert [r.version for r in history.revisions] == [3] and history.next_page_token
        rest = stub.ListConfigRevisions(cpb.ListConfigRevisionsRequest(page_token=history.next_page_token))
        assert [r.version for r in rest.revisions] == [1] and not rest.next_page_token
        assert history.revisions[0].updated_by == "test"


def test_remote_shadow_rule_reports_and_never_blocks(spendgate: Callable[..., SpendgateServer]) -> None:
    """A remote rule in shadow mode allows the call and reports would_block."""
    server = spendgate()
    write(server.target, {"token_ceiling": 100, "shadow": ["token_ceiling"]})
    decision = decide(server.target, 5_000)
    assert (decision.verdict, decision.would_block, list(decision.shadow_rules)) == (
        pb.VERDICT_ALLOW,
        True,
        [pb.RULE_TOKEN_CEILING],
    )


def test_watch_streams_current_then_changes(spendgate: Callable[..., SpendgateServer]) -> None:
    """WatchConfig yields the current config, then each new version."""
    server = spendgate()

    async def watch() -> list[int]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stream = config_pb2_grpc.ConfigServiceStub(channel).WatchConfig(cpb.WatchConfigRequest())
            first = await stream.read()
            assert isinstance(first, cpb.WatchConfigResponse)
            versions = [first.config.version]
            await asyncio.get_running_loop().run_in_executor(
                None, write, server.target, {"max_tool_calls": 2}
            )
            second = await asyncio.wait_for(stream.read(), 10)
            assert isinstance(second, cpb.WatchConfigResponse)
            versions.append(second.config.version)
            stream.cancel()
            return versions

    assert asyncio.run(watch()) == [0, 1]


# --- the CLI -------------------------------------------------------------------------------


@pytest.fixture
def cli_target(spendgate: Callable[..., SpendgateServer]) -> str:
    return spendgate().target


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spendgate_server", "config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_set_prints_the_diff_and_history(cli_target: str, tmp_path: Path) -> None:
    """`config set` validates, writes and prints what changed; `history` shows every change."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.json"
    first.write_text("token_ceiling: 8000\nmax_session_usd: 5\n")
    second.write_text(json.dumps({"enforcement": {"token_ceiling": 4000, "dedup_ttl_seconds": 30}}))
    assert (
        "+ token_ceiling: 8000" in cli("set", str(first), "--target", cli_target, "--actor", "alice").stdout
    )
    out = cli("set", str(second), "--target", cli_target).stdout
    assert "~ token_ceiling: 8000 -> 4000" in out and '- max_session_usd: "5"' in out
    assert "+ dedup_ttl_seconds: 30" in out
    history = cli("history", "--target", cli_target).stdout
    assert history.index("version 2") < history.index("version 1") and "by alice" in history
    got = cli("get", "--target", cli_target).stdout
    assert "token_ceiling: 4000" in got and "version 2" in got


def test_cli_history_limit(cli_target: str, tmp_path: Path) -> None:
    """--limit 0 (was one entry) is one page of the server's default size; N shows N; -1 exits 2."""
    rules = tmp_path / "r.yaml"
    for tool_calls in (3, 4, 5):
        rules.write_text(f"max_tool_calls: {tool_calls}\n")
        assert cli("set", str(rules), "--target", cli_target).returncode == 0

    def versions(*flags: str) -> list[str]:
        out = cli("history", *flags, "--target", cli_target)
        assert out.returncode == 0, out.stderr
        return [line.split()[1] for line in out.stdout.splitlines() if line.startswith("version ")]

    assert versions("--limit", "0") == ["3", "2", "1"]
    assert versions("--limit", "2") == ["3", "2"]
    refused = cli("history", "--limit", "-1", "--target", cli_target)
    assert refused.returncode == 2 and "argument --limit: must be 0 or more, got -1" in refused.stderr


def test_cli_rejects_a_bad_file_before_writing(cli_target: str, tmp_path: Path) -> None:
    """A bad file is refused with every bad key named, exit 2, and nothing is written."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("token_ceiling: -1\nmax_sesion_usd: 3\n")
    result = cli("set", str(bad), "--target", cli_target)
    assert result.returncode == 2
    assert "token_ceiling" in result.stderr and "max_sesion_usd" in result.stderr
    assert "version 0" in cli("get", "--target", cli_target).stdout


def test_cli_stale_etag_is_reported(cli_target: str, tmp_path: Path) -> None:
    """An explicit stale etag (FAILED_PRECONDITION) is one line in words and exit 1."""
    rules = tmp_path / "r.yaml"
    rules.write_text("max_tool_calls: 3\n")
    cli("set", str(rules), "--target", cli_target)
    rules.write_text("max_tool_calls: 4\n")
    result = cli("set", str(rules), "--target", cli_target, "--etag", "0")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("spendgate: etag mismatch for the tenant config")


def test_config_round_trips_through_user_form() -> None:
    """config_to_dict is what parse_enforcement_config reads back, exactly."""
    from spendgate_server.engine.config import parse_enforcement_config

    config = parse_enforcement_config({"max_session_usd": "0.000000001", "shadow": True, "token_ceiling": 9})
    assert parse_enforcement_config(config_to_dict(config)) == config


def test_wrapper_project_applies_project_rules(spendgate: Callable[..., SpendgateServer]) -> None:
    """A client naming a project (DecisionClient project=, wrappers' spendgate_project=) gets its rules."""
    from spendgate_client import DecisionClient, JournaledAnthropic, TokenCeilingExceeded

    server = spendgate()
    write(server.target, {"token_ceiling": 50}, project="tight")
    with DecisionClient(server.target, timeout=5) as client:
        fp = hashlib.sha256(b"p").digest()
        assert client.decide("s", "claude-sonnet-4-5", 100, 10, fp).allowed
        assert not client.decide("s", "claude-sonnet-4-5", 100, 10, fp, project="tight").allowed
    wrapped = JournaledAnthropic(
        api_key="sk-ant-test",
        session_id="w",
        spendgate_target=server.target,
        spendgate_project="tight",
        base_url="http://127.0.0.1:9",  # never contacted: the call is blocked first
    )
    try:
        with pytest.raises(TokenCeilingExceeded):
            wrapped.messages.create(
                model="claude-test-big",
                max_tokens=10,
                messages=[{"role": "user", "content": "hello " * 100}],
            )
    finally:
        wrapped.close()
    with pytest.raises(ValueError, match="spendgate_project"):
        JournaledAnthropic(api_key="k", session_id="w", spendgate_project="bad project!")
