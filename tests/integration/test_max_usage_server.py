"""DecideRequest.max_usage through a real server: the session's reservation read back from DecideResponse.

Catalogue prices: claude-sonnet-4-5 $3 / $15 per million input / output tokens, half at
the batch tier; whisper-1 $0.006 per minute of audio.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator

import pytest
from spendgate_client import DecisionClient, InvalidRequest, Usage

from tests.processes import server_on_store

SONNET = "claude-sonnet-4-5"
# One request of the batch: 1,000 input tokens, max_tokens 1,024; $0.01836 at standard prices.
REQUEST_IN, REQUEST_OUT = 1_000, 1_024
REQUEST_NANO_USD = REQUEST_IN * 3_000 + REQUEST_OUT * 15_000


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def client(request: pytest.FixtureRequest) -> Iterator[DecisionClient]:
    """A client of one server per store for the module: every test decides in fresh sessions."""
    with (
        server_on_store(request.param) as server,
        DecisionClient(server.target, timeout=5, fail_mode="closed") as client,
    ):
        yield client


def reserved(
    client: DecisionClient, model: str, tokens_in: int, tokens_out: int, max_usage: Usage | None
) -> int:
    """Decide one call in a fresh session; return what the session holds reserved for it."""
    session = uuid.uuid4().hex
    decision = client.decide(
        session, model, tokens_in, tokens_out, hashlib.sha256(session.encode()).digest(), max_usage=max_usage
    )
    assert decision.allowed, decision.reason
    assert decision.reserved_nano_usd == decision.session_spend_nano_usd
    assert decision.reserved_nano_usd == decision.estimated_cost_nano_usd
    return decision.reserved_nano_usd


def test_a_ten_request_batch_reserves_ten_worst_cases_at_half_price(client: DecisionClient) -> None:
    batch = Usage(
        counts={"input_tokens": 10 * REQUEST_IN, "output_tokens": 10 * REQUEST_OUT}, service_tier="batch"
    )
    assert reserved(client, SONNET, REQUEST_IN, 0, batch) == 10 * REQUEST_NANO_USD // 2 == 91_800_000


def test_an_audio_transcription_reserves_its_seconds(client: DecisionClient) -> None:
    assert reserved(client, "whisper-1", 0, 0, Usage(counts={"audio_seconds": 60})) == 6_000_000


def test_without_max_usage_the_reservation_is_as_before(client: DecisionClient) -> None:
    assert reserved(client, SONNET, REQUEST_IN, REQUEST_OUT, None) == REQUEST_NANO_USD


def test_a_bad_max_usage_key_is_named(client: DecisionClient) -> None:
    with pytest.raises(InvalidRequest) as caught:
        reserved(client, SONNET, 1, 1, Usage(counts={"minutes": 3}))
    assert [f for f, _ in caught.value.field_violations] == ["max_usage.counts[minutes]"]
