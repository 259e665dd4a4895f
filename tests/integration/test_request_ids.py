"""A request id replays only its own request (issue 18, item 3), over the real server and client."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from spendgate_client import DecisionClient, InvalidRequest

from tests.processes import SpendgateServer

CAP_NANO_USD = 100_000  # $0.0001
CONFIG = "enforcement:\n  max_session_usd: 0.0001\n"
FP = hashlib.sha256(b"hello").digest()


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_replayed_request_id_with_other_content_is_refused(
    spendgate: Callable[..., SpendgateServer], tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    """haiku 10 tokens is allowed; replaying its request id with opus 900k tokens is INVALID_ARGUMENT."""
    config = tmp_path / "spendgate.yaml"
    config.write_text(CONFIG)
    args = ["--config", str(config)]
    if store == "redis":
        args += ["--store", "redis", "--redis-url", request.getfixturevalue("redis_url")]
    with DecisionClient(spendgate(*args).target, timeout=5) as client:
        first = client.decide("s", "claude-haiku-4-5", 10, 10, FP, request_id="req-1")
        assert first.allowed
        # The session goes to 450 times its cap, as in the issue.
        settled = client.settle("s", first.reservation_id, "claude-haiku-4-5", input_tokens=45_000)
        assert settled is not None and settled.session_spend_nano_usd == 450 * CAP_NANO_USD

        with pytest.raises(InvalidRequest) as info:
            client.decide("s", "claude-opus-4-1", 900_000, 32_000, FP, request_id="req-1")
        assert [field for field, _ in info.value.field_violations] == ["request_id"]

        replay = client.decide("s", "claude-haiku-4-5", 10, 10, FP, request_id="req-1")
        assert (replay.decision_id, replay.verdict) == (first.decision_id, "allow")
        assert replay.session_spend_nano_usd == 450 * CAP_NANO_USD  # nothing new was reserved

        fresh = client.decide("s", "claude-opus-4-1", 900_000, 32_000, FP, request_id="req-2")
        assert (fresh.verdict, fresh.rule) == ("block", "max_session_usd")
