"""The Python DecisionClient against the real server: typed errors, fail modes, config checks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from spendgate_client import (
    AsyncDecisionClient,
    DecisionClient,
    DuplicateRequest,
    EnforcementError,
    InvalidRequest,
    SessionBudgetExceeded,
    SpendgateUnavailable,
    TokenCeilingExceeded,
    ToolCallLimitExceeded,
    enforcement_config_to_proto,
)

from tests.processes import SpendgateServer, free_port

FP = hashlib.sha256(b"request").digest()


@pytest.fixture(scope="module")
def server() -> Iterator[SpendgateServer]:
    """One server for the module: each test decides in sessions of its own."""
    started = SpendgateServer.start()
    yield started
    started.stop()


@pytest.fixture
def client(server: SpendgateServer) -> Iterator[DecisionClient]:
    with DecisionClient(server.target, timeout=5) as c:
        yield c


@pytest.mark.parametrize(
    ("config", "kwargs", "error"),
    [
        ({"token_ceiling": 10}, {}, TokenCeilingExceeded),
        ({"max_tool_calls": 0}, {"tool_call_count": 1}, ToolCallLimitExceeded),
        ({"max_session_usd": 0}, {}, SessionBudgetExceeded),
    ],
)
def test_blocks_raise_typed_errors(
    client: DecisionClient,
    config: dict[str, object],
    kwargs: dict[str, Any],
    error: type[EnforcementError],
) -> None:
    """raise_for_block raises the rule's own subclass, carrying rule, reason and decision id."""
    session = f"blocks-{error.__name__}"
    decision = client.decide(session, "claude-sonnet-4-5", 100, 10, FP, enforcement_config=config, **kwargs)
    with pytest.raises(error) as info:
        decision.raise_for_block()
    assert info.value.rule == error.rule and info.value.reason == decision.reason
    assert info.value.decision_id == decision.decision_id != ""


def test_duplicate_raises_duplicate_request(client: DecisionClient) -> None:
    """The second identical request within the TTL raises DuplicateRequest."""
    config = {"dedup_ttl_seconds": 30}
    client.decide("d", "claude-sonnet-4-5", 100, 10, FP, enforcement_config=config).raise_for_block()
    with pytest.raises(DuplicateRequest):
        client.decide("d", "claude-sonnet-4-5", 100, 10, FP, enforcement_config=config).raise_for_block()


def test_invalid_request_names_fields(client: DecisionClient) -> None:
    """A malformed request raises InvalidRequest (a ValueError) with the server's field names."""
    with pytest.raises(InvalidRequest) as info:
        client.decide("", "claude-sonnet-4-5", -1, 10, b"x")
    assert {"session_id", "input_tokens", "fingerprint"} <= {f for f, _ in info.value.field_violations}


def test_fail_open_allows_and_counts() -> None:
    """With nothing listening, fail_mode='open' allows the call, marks it, and counts it."""
    with DecisionClient(f"127.0.0.1:{free_port()}", timeout=0.2) as c:
        decision = c.decide("s", "m", 1, 1, FP)
        assert decision.allowed and decision.fail_open and decision.reservation_id == ""
        assert c.stats.snapshot()["fail_open_allowances"] == 1


def test_fail_closed_raises() -> None:
    """With nothing listening, fail_mode='closed' raises SpendgateUnavailable."""
    with (
        DecisionClient(f"127.0.0.1:{free_port()}", timeout=0.2, fail_mode="closed") as c,
        pytest.raises(SpendgateUnavailable),
    ):
        c.decide("s", "m", 1, 1, FP)


async def test_async_client_decides_and_settles(server: SpendgateServer) -> None:
    """The asyncio client decides and settles like the blocking one."""
    client = AsyncDecisionClient(server.target, timeout=5)
    try:
        decision = await client.decide("a", "claude-sonnet-4-5", 1000, 100, FP)
        settled = await client.settle(
            "a", decision.reservation_id, "claude-sonnet-4-5", input_tokens=1000, output_tokens=50
        )
        assert settled is not None and 0 < settled.cost_nano_usd < decision.estimated_cost_nano_usd
        assert (await client.settle("a", decision.reservation_id, "claude-sonnet-4-5")).already_settled  # type: ignore[union-attr]
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"token_celing": 5}, "token_celing"),
        ({"token_ceiling": "5"}, "token_ceiling"),
        ({"max_session_usd": "lots"}, "max_session_usd"),
        ({"model_downgrade": {"threshold_usd": 1}}, "model_downgrade"),
        ({"budget_mode": "loose"}, "budget_mode"),
        ({"shadow": ["nope"]}, "shadow"),
    ],
)
def test_config_errors_name_the_key(config: dict[str, object], key: str) -> None:
    """A bad enforcement_config raises ValueError naming the key."""
    with pytest.raises(ValueError, match=key):
        enforcement_config_to_proto(config)


def test_settle_survives_outage() -> None:
    """Settle against a dead service retries, then returns None and counts the failure."""
    with DecisionClient(f"127.0.0.1:{free_port()}", timeout=0.05) as c:
        assert c.settle("s", "0" * 32, "m") is None
        assert c.stats.snapshot()["settle_failures"] == 1
