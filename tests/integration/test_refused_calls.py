"""A call the provider refused, end to end: its identical retry is not blocked as a duplicate."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from spendgate_client import DecisionClient

from tests.processes import SpendgateServer

FP = hashlib.sha256(b"the same request").digest()
CONFIG = {"dedup_ttl_seconds": 600}


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_retry_after_a_refused_call_goes_through(
    spendgate: Callable[..., SpendgateServer], store: str, request: pytest.FixtureRequest
) -> None:
    """Decide, the provider answers 529, Settle(ERROR); the identical retry is allowed and reserves again."""
    args = (
        ["--store", "redis", "--redis-url", request.getfixturevalue("redis_url")] if store == "redis" else []
    )
    with DecisionClient(spendgate(*args).target, timeout=5) as client:
        first = client.decide("s", "claude-sonnet-4-5", 1_000, 100, FP, enforcement_config=CONFIG)
        assert first.allowed
        duplicate = client.decide("s", "claude-sonnet-4-5", 1_000, 100, FP, enforcement_config=CONFIG)
        assert duplicate.rule == "dedup_ttl_seconds"

        refused = client.settle("s", first.reservation_id, "claude-sonnet-4-5", provider_ok=False)
        assert refused is not None
        assert (refused.cost_nano_usd, refused.session_spend_nano_usd) == (0, 0)

        retry = client.decide("s", "claude-sonnet-4-5", 1_000, 100, FP, enforcement_config=CONFIG)
        assert retry.allowed and retry.reservation_id != first.reservation_id
        assert retry.session_spend_nano_usd == retry.estimated_cost_nano_usd

        ran = client.settle(
            "s", retry.reservation_id, "claude-sonnet-4-5", input_tokens=1_000, output_tokens=50
        )
        assert ran is not None and ran.cost_nano_usd > 0
        again = client.decide("s", "claude-sonnet-4-5", 1_000, 100, FP, enforcement_config=CONFIG)
        assert again.rule == "dedup_ttl_seconds"
