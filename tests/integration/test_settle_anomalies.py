"""A client cannot settle its way out of a budget unnoticed: the issue's inputs against real servers.

Decide claude-opus-4-1 (estimate $2.10), then settle as claude-haiku-4-5, with
outcome=ERROR, with 0 tokens, or with 3x the decided tokens: each is counted as
reported, and raises a settle_anomaly violation the tenant sees on its alerts feed
(and no other tenant does), and a metric. Real ``spendgate serve`` processes over the
memory store and over a real Redis (the Lua scripts keep the decided call beside the
reservation), each with its evaluator running, and API keys for two tenants.
"""

from __future__ import annotations

import hashlib
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc, violation_pb2_grpc
from spendgate.v1 import violation_pb2 as vpb
from spendgate_server.store import (
    DecidedCall,
    ReserveRequest,
    SessionKey,
    SettleRequest,
    SettleStatus,
    Store,
)
from spendgate_server.store.redis import RedisStore, session_keys

from tests.integration.test_security import bearer, create_key
from tests.processes import SpendgateServer, free_port

OPUS, HAIKU = "claude-opus-4-1", "claude-haiku-4-5"
# 100,000 input tokens at $15/M plus 8,000 output tokens at $75/M: the issue's $2.10.
DECIDED_INPUT, DECIDED_OUTPUT = 100_000, 8_000
ESTIMATE = 2_100_000_000
POLL_SECONDS = 20.0


# --- the store keeps the decided call beside the reservation (both stores) -------------------


async def test_settle_returns_what_decide_admitted(store: Store) -> None:
    """The first settle, a repeated one, and a late one after expiry all get the decided call back."""
    session = SessionKey("t", "s")
    decided = DecidedCall(OPUS, ESTIMATE, DECIDED_INPUT, DECIDED_OUTPUT)

    def reserve(rid: str, now: int, with_record: bool = True) -> ReserveRequest:
        return ReserveRequest(
            session, now, rid, ESTIMATE, 1_000, 100_000, decided=decided if with_record else None
        )

    def settle(rid: str, now: int) -> SettleRequest:
        return SettleRequest(session, now, rid, 5, settled_ttl_ms=10_000, session_ttl_ms=100_000)

    await store.reserve(reserve("a" * 32, 1))
    first = await store.settle(settle("a" * 32, 2))
    again = await store.settle(settle("a" * 32, 3))
    assert (first.status, first.decided) == (SettleStatus.SETTLED, decided)
    assert (again.status, again.decided) == (SettleStatus.ALREADY_SETTLED, decided)
    await store.reserve(reserve("b" * 32, 10))
    late = await store.settle(settle("b" * 32, 2_000))  # expired at 1,010, counted at its estimate
    assert (late.status, late.decided) == (SettleStatus.SETTLED, decided)
    await store.reserve(reserve("c" * 32, 20, with_record=False))
    assert (await store.settle(settle("c" * 32, 21))).decided is None
    # Forgotten with the settle record: nothing of a settled call stays behind.
    assert (await store.settle(settle("a" * 32, 50_000))).status is SettleStatus.UNKNOWN
    if isinstance(store, RedisStore):
        keys = session_keys(session, "sg")
        client: Any = store.client
        fields = {f.decode() for f in await client.hkeys(keys[0])}
        assert not {f for f in fields if f.startswith(("a:", "m:"))}, fields


def test_decided_record_encoding_round_trips() -> None:
    """The stored form reads back; anything else reads as no record."""
    decided = DecidedCall("us.anthropic.claude-opus-4-1-v1:0", 1, 2, 3)
    assert DecidedCall.decode(decided.encode()) == decided
    assert DecidedCall.decode(decided.encode().encode()) == decided
    for junk in ("", "m 1 2", "m x 2 3", "m 1 2 3 4", "m ² 2 3"):
        assert DecidedCall.decode(junk) is None


# --- real servers: the inputs ------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # loopback
        text = response.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


class Tenant:
    """One tenant's client and admin keys against one server."""

    def __init__(self, server: SpendgateServer, client_key: str, admin_key: str) -> None:
        self.server, self.client_key, self.admin_key = server, client_key, admin_key

    def decide_opus(self, session: str) -> pb.DecideResponse:
        with grpc.insecure_channel(self.server.target) as channel:
            decision = decision_pb2_grpc.DecisionServiceStub(channel).Decide(
                pb.DecideRequest(
                    session_id=session,
                    model=OPUS,
                    input_tokens=DECIDED_INPUT,
                    max_output_tokens=DECIDED_OUTPUT,
                    fingerprint=hashlib.sha256(uuid.uuid4().bytes).digest(),
                ),
                metadata=bearer(self.client_key),
            )
        assert (decision.verdict, decision.estimated_cost_nano_usd) == (pb.VERDICT_ALLOW, ESTIMATE)
        return decision

    def settle(self, session: str, reservation: str, model: str, usage: pb.Usage, ok: bool = True) -> int:
        with grpc.insecure_channel(self.server.target) as channel:
            response = decision_pb2_grpc.DecisionServiceStub(channel).Settle(
                pb.SettleRequest(
                    session_id=session,
                    reservation_id=reservation,
                    model=model,
                    usage=usage,
                    outcome=pb.PROVIDER_OUTCOME_OK if ok else pb.PROVIDER_OUTCOME_ERROR,
                ),
                metadata=bearer(self.client_key),
            )
        return int(response.actual_cost_nano_usd)

    def anomalies(self, **filters: Any) -> list[vpb.Violation]:
        with grpc.insecure_channel(self.server.target) as channel:
            page = violation_pb2_grpc.ViolationServiceStub(channel).ListViolations(
                vpb.ListViolationsRequest(
                    policy_type=vpb.POLICY_TYPE_SETTLE_ANOMALY, page_size=500, **filters
                ),
                metadata=bearer(self.admin_key),
            )
        return list(page.violations)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def tenants(
    request: pytest.FixtureRequest, spendgate: Callable[..., SpendgateServer], tmp_path: Path
) -> tuple[Tenant, Tenant, int]:
    """A server (memory, or Redis with its evaluator on) flagging every error settle, two tenants."""
    metrics_port = free_port()
    args = [
        "--settle-error-flag-seconds",
        "0",
        "--evaluator-poll-millis",
        "20",
        "--metrics-port",
        str(metrics_port),
    ]
    keys: dict[str, str] = {}
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        args += ["--store", "redis", "--redis-url", url, "--evaluator", "on"]
        store_flag = ("--redis-url", url)
    else:
        keys_file = tmp_path / "keys.json"
        args += ["--keys-file", str(keys_file)]
        store_flag = ("--keys-file", str(keys_file))
    for tenant in ("acme", "globex"):
        for scope in ("client", "admin"):
            result = create_key_in(store_flag, tenant, scope)
            keys[f"{tenant}-{scope}"] = result
    server = spendgate(*args)
    acme = Tenant(server, keys["acme-client"], keys["acme-admin"])
    globex = Tenant(server, keys["globex-client"], keys["globex-admin"])
    return acme, globex, metrics_port


def create_key_in(store_flag: tuple[str, str], tenant: str, scope: str) -> str:
    if store_flag[0] == "--keys-file":
        return create_key(Path(store_flag[1]), tenant, scope, f"{tenant}-{scope}")
    from tests.integration.test_security import spendgate_cli

    result = spendgate_cli(
        "keys", "create", *store_flag, "--tenant", tenant, "--scope", scope, "--name", scope
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0]


def wait_for_anomalies(tenant: Tenant, count: int) -> list[vpb.Violation]:
    deadline = time.monotonic() + POLL_SECONDS
    while len(found := tenant.anomalies()) < count:
        assert time.monotonic() < deadline, f"only {len(found)} of {count} anomalies: {found}"
        time.sleep(0.05)
    return found


def test_settling_out_of_a_budget_is_counted_as_reported_and_flagged(
    tenants: tuple[Tenant, Tenant, int],
) -> None:
    """The issue's four settles are counted as reported and flagged; an honest one is not."""
    acme, globex, metrics_port = tenants
    session = f"s-{uuid.uuid4().hex[:8]}"
    cases = {
        # (model, usage, provider ok) -> (what is counted, the anomaly raised)
        "haiku": (HAIKU, pb.Usage(input_tokens=DECIDED_INPUT, output_tokens=DECIDED_OUTPUT), True),
        "error": (OPUS, pb.Usage(), False),
        "zero": (OPUS, pb.Usage(), True),
        "triple": (OPUS, pb.Usage(input_tokens=3 * DECIDED_INPUT, output_tokens=3 * DECIDED_OUTPUT), True),
        # The dated id of the same model, near the estimate: honest.
        "honest": ("claude-opus-4-1-20250805", pb.Usage(input_tokens=95_000, output_tokens=2_000), True),
    }
    expected = {
        "haiku": (140_000_000, vpb.SETTLE_ANOMALY_KIND_MODEL_MISMATCH),
        "error": (0, vpb.SETTLE_ANOMALY_KIND_LATE_ERROR),
        "zero": (0, vpb.SETTLE_ANOMALY_KIND_USAGE_BELOW_ESTIMATE),
        "triple": (3 * ESTIMATE, vpb.SETTLE_ANOMALY_KIND_USAGE_ABOVE_ESTIMATE),
        "honest": (95_000 * 15_000 + 2_000 * 75_000, None),
    }
    decisions: dict[str, str] = {}
    for name, (model, usage, ok) in cases.items():
        decision = acme.decide_opus(session)
        decisions[decision.decision_id] = name
        assert acme.settle(session, decision.reservation_id, model, usage, ok) == expected[name][0], name

    flagged = wait_for_anomalies(acme, 4)
    assert {decisions[v.decision_id]: v.settle_anomaly.kind for v in flagged} == {
        name: kind for name, (_, kind) in expected.items() if kind is not None
    }
    for violation in flagged:
        anomaly = violation.settle_anomaly
        assert (anomaly.decided_model, anomaly.estimated_cost_nano_usd) == (OPUS, ESTIMATE)
        assert (anomaly.decided_input_tokens, anomaly.decided_max_output_tokens) == (
            DECIDED_INPUT,
            DECIDED_OUTPUT,
        )
        assert violation.session_id == session and violation.message.startswith(
            vpb.SettleAnomalyKind.Name(anomaly.kind).removeprefix("SETTLE_ANOMALY_KIND_").lower()
        )
    haiku = next(v for v in flagged if decisions[v.decision_id] == "haiku")
    assert haiku.effective_model == HAIKU and haiku.cost_nano_usd == 140_000_000
    assert "settled as claude-haiku-4-5 but decided on claude-opus-4-1 (estimate $2.1)" in haiku.message
    # Another tenant sees none of it.
    assert globex.anomalies() == []
    metrics = scrape(metrics_port)
    for kind in ("model_mismatch", "late_error", "usage_below_estimate", "usage_above_estimate"):
        assert metrics[f'spendgate_settle_anomalies_total{{kind="{kind}"}}'] == 1


@pytest.mark.redis
def test_the_decided_call_lives_beside_the_reservation_in_redis(
    spendgate: Callable[..., SpendgateServer], redis_url: str
) -> None:
    """The a:<id> record is written by the Decide script and read by the Settle script on any server."""
    first = spendgate("--store", "redis", "--redis-url", redis_url)
    second = spendgate("--store", "redis", "--redis-url", redis_url)
    with grpc.insecure_channel(first.target) as channel:
        decision = decision_pb2_grpc.DecisionServiceStub(channel).Decide(
            pb.DecideRequest(
                session_id="fleet",
                model=OPUS,
                input_tokens=DECIDED_INPUT,
                max_output_tokens=DECIDED_OUTPUT,
                fingerprint=b"x" * 32,
            )
        )
    client = redis.Redis.from_url(redis_url)
    key = session_keys(SessionKey("default", "fleet"), "sg")[0]
    stored = client.hget(key, f"a:{decision.reservation_id}")
    client.close()
    assert DecidedCall.decode(stored or b"") == DecidedCall(OPUS, ESTIMATE, DECIDED_INPUT, DECIDED_OUTPUT)
    with grpc.insecure_channel(second.target) as channel:
        settled = decision_pb2_grpc.DecisionServiceStub(channel).Settle(
            pb.SettleRequest(
                session_id="fleet",
                reservation_id=decision.reservation_id,
                model=HAIKU,
                usage=pb.Usage(input_tokens=DECIDED_INPUT, output_tokens=DECIDED_OUTPUT),
                outcome=pb.PROVIDER_OUTCOME_OK,
            )
        )
    assert settled.actual_cost_nano_usd == 140_000_000
