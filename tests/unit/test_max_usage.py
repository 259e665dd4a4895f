"""DecideRequest.max_usage sizes the reservation: a call's worst case in the units its endpoint bills.

Prices are genai-prices' catalogue (claude-sonnet-4-5: $3 / $15 per million input / output
tokens, half that at the batch tier; whisper-1: $0.006 per minute), so each expected
figure below is the provider's list price worked by hand.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spendgate.v1 import decision_pb2 as pb
from spendgate_server.engine.config import BudgetMode, EnforcementConfig, ModelDowngrade, Rule
from spendgate_server.engine.decide import Call, DecisionEngine, Verdict, request_digest
from spendgate_server.engine.pricing import PriceTable, Usage
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.engine.rules._unit import MAX_ESTIMATE_NANO_USD, MAX_USD_NANO
from spendgate_server.errors import InvalidArgument
from spendgate_server.rpc.validation import (
    MAX_BATCH_REQUESTS,
    MAX_INPUT_TOKENS,
    MAX_OUTPUT_TOKENS,
    call_from_proto,
)
from spendgate_server.store import Store

from tests.conftest import FakeClock

PRICES = PriceTable()
SONNET = "claude-sonnet-4-5"
# One Messages request of the batch: 1,000 input tokens, max_tokens 1,024.
REQUEST_IN, REQUEST_OUT = 1_000, 1_024
# Its worst case at standard prices: 1,000 x 3,000 + 1,024 x 15,000 nano-USD.
REQUEST_NANO_USD = REQUEST_IN * 3_000 + REQUEST_OUT * 15_000


def engine_for(store: Store, clock: FakeClock, config: EnforcementConfig | None = None) -> DecisionEngine:
    return DecisionEngine(store, PRICES, ConfigResolver.static(config or EnforcementConfig()), clock=clock)


def call(
    model: str = SONNET,
    input_tokens: int = REQUEST_IN,
    max_output: int = REQUEST_OUT,
    max_usage: Usage | None = None,
    session: str = "s1",
) -> Call:
    fingerprint = hashlib.sha256(f"{session}{model}{max_usage}".encode()).digest()
    return Call("t", session, model, input_tokens, max_output, fingerprint, max_usage=max_usage)


def batch(requests: int, tier: str = "batch") -> Usage:
    return Usage(
        counts={"input_tokens": requests * REQUEST_IN, "output_tokens": requests * REQUEST_OUT},
        service_tier=tier,
    )


async def test_a_batch_of_ten_reserves_ten_requests_at_half_price(store: Store, clock: FakeClock) -> None:
    decision = await engine_for(store, clock).decide(call(max_usage=batch(10)))
    assert decision.verdict is Verdict.ALLOW
    assert decision.estimated_cost_nano_usd == 10 * REQUEST_NANO_USD // 2 == 91_800_000
    assert decision.reserved_nano_usd == 91_800_000


async def test_an_audio_transcription_reserves_its_seconds(store: Store, clock: FakeClock) -> None:
    # whisper-1, 60 s: $0.006. The old estimate of 0 tokens in and out would reserve nothing.
    minute = Usage(counts={"audio_seconds": 60})
    decision = await engine_for(store, clock).decide(call("whisper-1", 0, 0, minute))
    assert decision.estimated_cost_nano_usd == decision.reserved_nano_usd == 6_000_000


async def test_without_max_usage_the_reservation_is_tokens_times_prices(
    store: Store, clock: FakeClock
) -> None:
    decision = await engine_for(store, clock).decide(call())
    assert decision.estimated_cost_nano_usd == decision.reserved_nano_usd == REQUEST_NANO_USD


async def test_a_session_budget_blocks_a_batch_by_its_whole_worst_case(
    store: Store, clock: FakeClock
) -> None:
    # $0.09 strict: one request ($0.01836) fits, the batch of ten at half price ($0.0918) does not.
    config = EnforcementConfig(max_session_nano_usd=90_000_000, budget_mode=BudgetMode.STRICT)
    engine = engine_for(store, clock, config)
    assert (await engine.decide(call(session="one"))).verdict is Verdict.ALLOW
    decision = await engine.decide(call(max_usage=batch(10), session="ten"))
    assert decision.verdict is Verdict.BLOCK and decision.rule is Rule.SESSION_BUDGET
    assert decision.estimated_cost_nano_usd == 91_800_000


async def test_a_downgrade_prices_the_fallback_by_max_usage_at_its_tier(
    store: Store, clock: FakeClock
) -> None:
    # claude-haiku-4-5: $1 / $5 per million, half at the batch tier.
    config = EnforcementConfig(model_downgrade=ModelDowngrade(50_000_000, "claude-haiku-4-5"))
    decision = await engine_for(store, clock, config).decide(call(max_usage=batch(10)))
    assert decision.verdict is Verdict.ALLOW_DOWNGRADED
    assert decision.effective_model == "claude-haiku-4-5"
    assert decision.estimated_cost_nano_usd == 10 * (REQUEST_IN * 1_000 + REQUEST_OUT * 5_000) // 2
    assert decision.reserved_nano_usd == decision.estimated_cost_nano_usd


async def test_a_worst_case_past_any_budget_is_held_just_above_every_budget(
    store: Store, clock: FakeClock
) -> None:
    # 100,000 requests of 10M input and 1M output tokens each, batch tier: $4,125,000 uncapped
    # (the summed input is past 200k tokens, so the long-context prices apply: $3 / $11.25).
    counts = {
        "input_tokens": MAX_BATCH_REQUESTS * MAX_INPUT_TOKENS,
        "output_tokens": MAX_BATCH_REQUESTS * MAX_OUTPUT_TOKENS,
    }
    assert PRICES.cost(SONNET, Usage(counts=counts, service_tier="batch")) == 4_125_000 * 1_000_000_000
    huge = Usage(counts=counts, service_tier="batch")
    config = EnforcementConfig(max_session_nano_usd=MAX_USD_NANO, budget_mode=BudgetMode.STRICT)
    decision = await engine_for(store, clock, config).decide(call(max_usage=huge))
    assert decision.verdict is Verdict.BLOCK
    assert decision.estimated_cost_nano_usd == MAX_ESTIMATE_NANO_USD == MAX_USD_NANO + 1


async def test_contradictory_max_usage_counts_name_max_usage(store: Store, clock: FakeClock) -> None:
    # 10 cache-read tokens without the input_tokens total they belong to.
    bad = Usage(counts={"cache_read_tokens": 10, "output_tokens": 5})
    with pytest.raises(InvalidArgument) as caught:
        await engine_for(store, clock).decide(call(max_usage=bad))
    assert [v.field for v in caught.value.violations] == ["max_usage.counts"]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 150_000), st.integers(0, 64_000))
def test_max_usage_of_tokens_prices_as_the_two_multiply_estimate(tokens_in: int, tokens_out: int) -> None:
    """Differential: the exact price of {input, output} tokens equals the hot path's estimate."""
    usage = Usage(counts={"input_tokens": tokens_in, "output_tokens": tokens_out})
    for model in (SONNET, "gpt-4o-mini", "claude-haiku-4-5"):
        assert PRICES.cost(model, usage) == PRICES.lookup(model).estimate(tokens_in, tokens_out)


def test_a_retry_with_another_max_usage_is_another_request() -> None:
    assert request_digest(call(max_usage=batch(10))) != request_digest(call(max_usage=batch(11)))
    assert request_digest(call(max_usage=batch(10))) == request_digest(call(max_usage=batch(10)))


def _request(**max_usage: object) -> pb.DecideRequest:
    request = pb.DecideRequest(session_id="s", model=SONNET, input_tokens=1, fingerprint=b"f" * 32)
    request.max_usage.CopyFrom(pb.Usage(**max_usage))  # type: ignore[arg-type]
    return request


def test_max_usage_is_validated_as_settle_usage_is() -> None:
    request = _request(counts={"input_tokens": 5, "cache_read_tokens": 9, "bogus": 1}, service_tier="no way")
    with pytest.raises(InvalidArgument) as caught:
        call_from_proto(request, "t")
    fields = sorted(v.field for v in caught.value.violations)
    assert fields == [
        "max_usage.counts[bogus]",
        "max_usage.counts[cache_read_tokens]",
        "max_usage.service_tier",
    ]


def test_max_usage_bounds_are_a_batch_of_calls() -> None:
    limit = MAX_BATCH_REQUESTS * MAX_OUTPUT_TOKENS
    parsed = call_from_proto(_request(counts={"output_tokens": limit}, service_tier="batch"), "t")
    assert parsed.max_usage == Usage(counts={"output_tokens": limit}, service_tier="batch")
    with pytest.raises(InvalidArgument) as caught:
        call_from_proto(_request(counts={"output_tokens": limit + 1}), "t")
    assert [v.field for v in caught.value.violations] == ["max_usage.counts[output_tokens]"]


def test_max_usage_without_counts_is_absent() -> None:
    # Fields 1-4 alone carry nothing the contract reads on a DecideRequest.
    assert call_from_proto(_request(input_tokens=5), "t").max_usage is None
    assert (
        call_from_proto(pb.DecideRequest(session_id="s", model=SONNET, fingerprint=b"f" * 32), "t").max_usage
        is None
    )
