"""Tenants cannot reach each other's records through their names (issue 18, item 1), on a real Redis.

Before the key schema of store/keyspace.py, a tenant named ``cfg`` deciding on session
``acme`` wrote into tenant acme's config hash, and a tenant named ``journal`` deciding
on session ``beta`` broke every Settle of tenant beta.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from spendgate.v1 import config_pb2 as cpb
from spendgate.v1 import config_pb2_grpc, decision_pb2_grpc
from spendgate.v1 import decision_pb2 as pb
from spendgate_server.store.keys import RedisKeyStore, Scope, new_key

from tests.integration.test_reliability import poll
from tests.processes import SpendgateServer

pytestmark = pytest.mark.redis

Metadata = tuple[tuple[str, str], ...]


def make_keys(redis_url: str, wanted: dict[str, tuple[str, str]]) -> dict[str, Metadata]:
    """Store one API key per (tenant, scope) in Redis; return the call metadata of each."""

    async def add() -> dict[str, Metadata]:
        store = RedisKeyStore(aioredis.Redis.from_url(redis_url))
        try:
            out: dict[str, Metadata] = {}
            for name, (tenant, scope) in wanted.items():
                full, record = new_key(tenant, Scope(scope), name, 0)
                await store.add(record)
                out[name] = (("authorization", f"Bearer {full}"),)
            return out
        finally:
            await store.close()

    return asyncio.run(add())


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def decide(session: str, input_tokens: int = 100, prompt: str = "p") -> pb.DecideRequest:
    return pb.DecideRequest(
        session_id=session,
        model="claude-haiku-4-5",
        input_tokens=input_tokens,
        max_output_tokens=100,
        fingerprint=hashlib.sha256(prompt.encode()).digest(),
    )


def settle(session: str, reservation_id: str) -> pb.SettleRequest:
    return pb.SettleRequest(
        session_id=session,
        reservation_id=reservation_id,
        model="claude-haiku-4-5",
        usage=pb.Usage(input_tokens=100, output_tokens=20),
        outcome=pb.PROVIDER_OUTCOME_OK,
    )


def test_tenant_cfg_deciding_on_session_acme_leaves_acmes_config_alone(
    spendgate: Callable[..., SpendgateServer], redis_url: str, raw: redis.Redis
) -> None:
    """acme's token_ceiling still blocks after tenant cfg decides on session 'acme'; its config has no TTL."""
    keys = make_keys(
        redis_url, {"acme-admin": ("acme", "admin"), "acme": ("acme", "client"), "cfg": ("cfg", "client")}
    )
    server = spendgate("--store", "redis", "--redis-url", redis_url)
    with grpc.insecure_channel(server.target) as channel:
        decisions = decision_pb2_grpc.DecisionServiceStub(channel)
        configs = config_pb2_grpc.ConfigServiceStub(channel)
        update = cpb.UpdateConfigRequest(enforcement_config=pb.EnforcementConfig(token_ceiling=1_000))
        written = configs.UpdateConfig(update, metadata=keys["acme-admin"]).config
        config_key = "sg:cfg:{acme}"
        before = raw.hgetall(config_key)

        foreign = decisions.Decide(decide("acme"), metadata=keys["cfg"])
        assert foreign.verdict == pb.VERDICT_ALLOW
        decisions.Settle(settle("acme", foreign.reservation_id), metadata=keys["cfg"])

        assert raw.hgetall(config_key) == before, "acme's config hash is untouched"
        assert raw.pttl(config_key) == -1, "acme's config never expires"
        assert int(raw.hget("sg:ses:{cfg:acme}", "spent") or 0) > 0, "cfg's session lives in its own key"
        blocked = decisions.Decide(decide("s1", input_tokens=2_000), metadata=keys["acme"])
        assert (blocked.verdict, blocked.rule) == (pb.VERDICT_BLOCK, pb.RULE_TOKEN_CEILING)
        assert blocked.config_version == written.version
        read = configs.GetConfig(cpb.GetConfigRequest(), metadata=keys["acme"]).config
        assert (read.version, read.enforcement_config.token_ceiling) == (written.version, 1_000)


@pytest.mark.parametrize("journal_first", [True, False], ids=["journal-decides-first", "beta-settles-first"])
def test_tenant_journal_deciding_on_session_beta_never_breaks_betas_settles(
    spendgate: Callable[..., SpendgateServer], redis_url: str, raw: redis.Redis, journal_first: bool
) -> None:
    """Tenant 'journal' on session 'beta' and tenant beta's journaled settles both work, in either order."""
    keys = make_keys(redis_url, {"journal": ("journal", "client"), "beta": ("beta", "client")})
    server = spendgate("--store", "redis", "--redis-url", redis_url)
    with grpc.insecure_channel(server.target) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)

        def journal_tenant_decides(prompt: str) -> None:
            decision = stub.Decide(decide("beta", prompt=prompt), metadata=keys["journal"])
            assert decision.verdict == pb.VERDICT_ALLOW

        if journal_first:
            journal_tenant_decides("first")
        for n in range(3):
            decision = stub.Decide(decide(f"beta-{n}"), metadata=keys["beta"])
            settled = stub.Settle(settle(f"beta-{n}", decision.reservation_id), metadata=keys["beta"])
            assert settled.actual_cost_nano_usd > 0 and not settled.already_settled
        journal_tenant_decides("after")

        # Journaled just after each Settle's reply (its intent was stored with the settle).
        stream = "sg:log:{journal:beta}"
        poll("beta's journal", lambda: raw.type(stream) not in ("none", "stream") or raw.xlen(stream) >= 3)
        assert raw.type("sg:log:{journal:beta}") == "stream"
        assert raw.xlen("sg:log:{journal:beta}") == 3, "every beta settle was journaled"
        assert raw.type("sg:ses:{journal:beta}") == "hash"
        assert int(raw.hget("sg:ses:{journal:beta}", "reserved") or 0) > 0
