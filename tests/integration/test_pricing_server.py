"""Exact spend through a real server: issue 14's usages settled with DecisionClient, cost read back.

Each call is decided and then settled over a real socket on the memory and the Redis
store; the cost the session counted must be the provider's bill, to the nano-USD.
"""

from __future__ import annotations

import hashlib
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from decimal import ROUND_CEILING, Decimal

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price
from spendgate_client import DecisionClient, InvalidRequest, Usage

from tests.processes import SpendgateServer, free_port, server_on_store

NANO = 1_000_000_000


def usd(amount: str) -> int:
    return int(Decimal(amount) * NANO)


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def client(request: pytest.FixtureRequest) -> Iterator[DecisionClient]:
    """A client of one server per store for the module: every test decides in fresh sessions."""
    with (
        server_on_store(request.param) as server,
        DecisionClient(server.target, timeout=5, fail_mode="closed") as client,
    ):
        yield client


def settled(client: DecisionClient, model: str, usage: Usage) -> int:
    """Decide, settle the usage, and return what the session counted for the call."""
    session = uuid.uuid4().hex
    decision = client.decide(session, model, 1_000, 1_000, hashlib.sha256(session.encode()).digest())
    assert decision.allowed, decision.reason
    result = client.settle(session, decision.reservation_id, decision.effective_model, usage=usage)
    assert result is not None and not result.already_settled
    # Nothing else is open in the session: its spend is this call's settled cost.
    assert result.session_spend_nano_usd == result.cost_nano_usd
    return result.cost_nano_usd


ISSUE_14 = [
    # 1. 1-hour cache writes: input 10, 100,000 tokens written to the 1-hour cache, output 100.
    (
        "claude-sonnet-4-5",
        {
            "input_tokens": 100_010,
            "cache_write_tokens": 100_000,
            "cache_write_1h_tokens": 100_000,
            "output_tokens": 100,
        },
        "",
        "0.60153",
    ),
    # 2. Two web searches on top of 9,548 in and 528 out.
    ("claude-sonnet-4-5", {"input_tokens": 9_548, "output_tokens": 528, "web_searches": 2}, "", "0.056564"),
    # 3. Audio tokens of an OpenAI audio model at its audio rates ($32/$64 vs $2.50/$10).
    (
        "gpt-audio",
        {"input_tokens": 1_000, "input_audio_tokens": 600, "output_tokens": 500, "output_audio_tokens": 400},
        "",
        "0.0468",
    ),
    # 4. The tier that ran: OpenAI priority doubles gpt-5's $1.25/$10; flex and Anthropic batch halve.
    ("gpt-5", {"input_tokens": 1_000, "output_tokens": 1_000}, "priority", "0.0225"),
    ("gpt-5", {"input_tokens": 1_000, "output_tokens": 1_000}, "flex", "0.005625"),
    ("claude-sonnet-4-5", {"input_tokens": 1_000, "output_tokens": 1_000}, "batch", "0.009"),
    # 5. Cloud and router ids. AWS bills regional endpoints 10% above the global one.
    (
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        {"input_tokens": 1_000, "output_tokens": 1_000},
        "",
        "0.0198",
    ),
    (
        "anthropic.claude-sonnet-4-5-20250929-v1:0",
        {"input_tokens": 1_000, "output_tokens": 1_000},
        "",
        "0.0198",
    ),
    (
        "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
        {"input_tokens": 1_000, "output_tokens": 1_000},
        "",
        "0.018",
    ),
    ("anthropic/claude-sonnet-4-5", {"input_tokens": 1_000, "output_tokens": 1_000}, "", "0.018"),
    ("claude-sonnet-4-5@20250929", {"input_tokens": 1_000, "output_tokens": 1_000}, "", "0.018"),
]


def test_issue_14_usages_settle_at_the_provider_bill(client: DecisionClient) -> None:
    """Every usage shape of issue 14, settled through a real server, counts its right value."""
    for model, counts, tier, right in ISSUE_14:
        assert settled(client, model, Usage(counts=counts, service_tier=tier)) == usd(right), (model, tier)


def test_older_clients_four_fields_still_settle(client: DecisionClient) -> None:
    """Fields 1-4 alone (uncached input, output, cache read, cache write) price as before."""
    usage = Usage(
        input_tokens=100, output_tokens=50, cache_read_input_tokens=1_000, cache_write_input_tokens=200
    )
    cost = settled(client, "claude-sonnet-4-5", usage)
    assert cost == 100 * 3_000 + 50 * 15_000 + 1_000 * 300 + 200 * 3_750


def test_a_real_server_settles_what_calc_price_charges(client: DecisionClient) -> None:
    """One differential example over the wire: every dimension gpt-realtime prices, and a long prompt."""
    counts = {
        "input_tokens": 250_000,
        "input_audio_tokens": 40_000,
        "input_image_tokens": 10_000,
        "cache_read_tokens": 30_000,
        "cache_audio_read_tokens": 20_000,
        "cache_image_read_tokens": 5_000,
        "output_tokens": 9_000,
        "output_audio_tokens": 7_000,
    }
    price = calc_price(GenaiUsage(**counts), "gpt-realtime").total_price
    assert settled(client, "gpt-realtime", Usage(counts=counts)) == int(
        (price * NANO).to_integral_value(ROUND_CEILING)
    )
    long = {"input_tokens": 200_001, "cache_read_tokens": 50_000, "output_tokens": 3, "web_searches": 1}
    price = calc_price(GenaiUsage(**long), "claude-sonnet-4-5").total_price
    assert settled(client, "claude-sonnet-4-5", Usage(counts=long)) == int(
        (price * NANO).to_integral_value(ROUND_CEILING)
    )


def test_contradictory_counts_are_refused_and_nothing_is_settled(client: DecisionClient) -> None:
    """A part above its total names the key; an unknown key too; the reservation stays open to settle."""
    session = uuid.uuid4().hex
    decision = client.decide(session, "claude-sonnet-4-5", 1_000, 1_000, hashlib.sha256(b"c").digest())
    bad = {"input_tokens": 10, "cache_write_tokens": 5, "cache_write_1h_tokens": 100_000, "coffees": 1}
    with pytest.raises(InvalidRequest) as info:
        client.settle(session, decision.reservation_id, "claude-sonnet-4-5", counts=bad)
    with pytest.raises(InvalidRequest) as tier:
        client.settle(
            session, decision.reservation_id, "claude-sonnet-4-5", usage=Usage(service_tier="not a tier")
        )
    assert [field for field, _ in tier.value.field_violations] == ["usage.service_tier"]
    assert sorted(info.value.field_violations) == [
        (
            "usage.counts[cache_write_1h_tokens]",
            "100000 is more than cache_write_tokens (5), which includes it",
        ),
        ("usage.counts[cache_write_1h_tokens]", "100000 is more than input_tokens (10), which includes it"),
        (
            "usage.counts[coffees]",
            "not a genai-prices usage key (input_tokens, output_tokens, cache_read_tokens, "
            "cache_write_tokens, cache_write_1h_tokens, input_audio_tokens, web_searches, ...)",
        ),
    ]
    result = client.settle(
        session, decision.reservation_id, "claude-sonnet-4-5", counts={"input_tokens": 10, "output_tokens": 1}
    )
    assert result is not None and result.cost_nano_usd == 10 * 3_000 + 15_000


def test_unpriced_tiers_and_models_are_counted_per_call_and_logged_once(
    spendgate: Callable[..., SpendgateServer],
) -> None:
    """spendgate_unpriced_total{kind} counts every call charged the maximum; the log names each once."""
    port = free_port()
    server = spendgate("--metrics-port", str(port))
    with DecisionClient(server.target, timeout=5, fail_mode="closed") as client:
        usage = Usage(counts={"input_tokens": 1_000, "output_tokens": 1_000}, service_tier="priority")
        for _ in range(3):
            # Anthropic's priority tier has no catalogue price: 1,000 + 1,000 at $150/$600.
            assert settled(client, "claude-sonnet-4-5", usage) == usd("0.75")
        settled(client, "no-such-model", Usage(counts={"input_tokens": 1}))  # Decide and Settle: 2
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'spendgate_unpriced_total{kind="tier"} 3.0' in body
    assert 'spendgate_unpriced_total{kind="model"} 2.0' in body
    logged = [
        (e["kind"], e["model"], e["name"]) for e in server.log_events() if e["event"] == "unknown_price"
    ]
    assert logged == [("tier", "claude-sonnet-4-5", "priority"), ("model", "no-such-model", "no-such-model")]
