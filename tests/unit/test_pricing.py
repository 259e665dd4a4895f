"""Pricing: every billed dimension, service tiers, cloud and router ids, overrides, and what has no price.

Right values are worked out by hand from the genai-prices catalogue (USD per million
tokens unless said otherwise) and cross-checked against ``genai_prices.calc_price``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price
from spendgate_server.engine.price_catalogue import (
    close_prices,
    max_prices,
    resolve,
    tier_context,
    tier_prices,
)
from spendgate_server.engine.price_units import flat_max
from spendgate_server.engine.pricing import (
    ModelPricing,
    PriceTable,
    RateCard,
    UnknownModelPolicy,
    Usage,
    parse_price_overrides,
)
from spendgate_server.errors import ConfigError, InvalidArgument

NOW = datetime(2026, 11, 30, 12, tzinfo=UTC)
NANO = 1_000_000_000


def usd(amount: str) -> int:
    return int(Decimal(amount) * NANO)


def reference(model: str, counts: dict[str, int], **context: str) -> int:
    """genai-prices' own price of ``counts``, rounded up to the nano-USD."""
    price = calc_price(
        GenaiUsage(**counts), model, genai_request_timestamp=NOW, price_context=context or None
    ).total_price
    return int((price * NANO).to_integral_value(rounding=ROUND_CEILING))


Reports = list[tuple[str, str, str, bool]]


@pytest.fixture
def reports() -> Reports:
    return []


@pytest.fixture
def table(reports: Reports) -> PriceTable:
    return PriceTable(on_unpriced=lambda *report: reports.append(report), now=NOW)


def cost(
    table: PriceTable, model: str, counts: dict[str, int] | None = None, *, tier: str = "", **more: int
) -> int:
    return table.cost(model, Usage(counts={**(counts or {}), **more}, service_tier=tier))


# The inputs of issue 14, with the right values it gives.
ONE_HOUR_WRITES = {
    "input_tokens": 10 + 100_000,  # input_tokens counts every input token, written to cache or not
    "cache_write_tokens": 100_000,
    "cache_write_1h_tokens": 100_000,
    "output_tokens": 100,
}
WEB_SEARCH = {"input_tokens": 9_548, "output_tokens": 528, "web_searches": 2}


def test_one_hour_cache_writes_cost_the_one_hour_rate(table: PriceTable) -> None:
    """100,000 tokens written to the 1-hour cache cost $6/MTok, not the 5-minute $3.75: $0.60153."""
    assert cost(table, "claude-sonnet-4-5", ONE_HOUR_WRITES) == usd("0.60153")
    assert reference("claude-sonnet-4-5", ONE_HOUR_WRITES) == usd("0.60153")


def test_five_minute_writes_keep_the_five_minute_rate(table: PriceTable) -> None:
    """The same writes to the 5-minute cache: 10 x $3 + 100,000 x $3.75 + 100 x $15 per MTok."""
    five = {**ONE_HOUR_WRITES, "cache_write_1h_tokens": 0, "cache_write_5m_tokens": 100_000}
    assert cost(table, "claude-sonnet-4-5", five) == usd("0.37653")


def test_web_search_requests_are_billed_per_request(table: PriceTable) -> None:
    """Two web searches add $10/K each to the tokens: $0.056564."""
    assert cost(table, "claude-sonnet-4-5", WEB_SEARCH) == usd("0.056564")


def test_openai_responses_tools_are_billed_per_call(table: PriceTable) -> None:
    """gpt-5 web search ($10/K) and file search ($2.50/K) calls on top of the tokens."""
    counts = {"input_tokens": 1_000, "output_tokens": 100, "web_searches": 3, "storage_searches": 4}
    expected = usd("0.00125") + usd("0.001") + usd("0.03") + usd("0.01")
    assert cost(table, "gpt-5", counts) == expected == reference("gpt-5", counts)


def test_audio_tokens_cost_the_audio_rates(table: PriceTable) -> None:
    """gpt-audio: 600 of 1,000 prompt tokens are audio ($32/MTok), 400 of 500 output tokens ($64/MTok)."""
    counts = {
        "input_tokens": 1_000,  # prompt_tokens
        "input_audio_tokens": 600,  # prompt_tokens_details.audio_tokens
        "output_tokens": 500,  # completion_tokens
        "output_audio_tokens": 400,  # completion_tokens_details.audio_tokens
    }
    expected = 400 * 2_500 + 600 * 32_000 + 100 * 10_000 + 400 * 64_000  # nano-USD per token
    assert cost(table, "gpt-audio", counts) == expected == usd("0.0468")
    assert cost(table, "gpt-audio", input_tokens=1_000, output_tokens=500) == usd("0.0075")


def test_cached_audio_and_image_tokens_have_their_own_rates(table: PriceTable) -> None:
    """gpt-realtime: cached audio $0.40, audio $32, image $5, cached text $0.40, text $4, output $16."""
    counts = {
        "input_tokens": 10_000,
        "input_audio_tokens": 4_000,
        "input_image_tokens": 1_000,
        "cache_read_tokens": 3_000,
        "cache_audio_read_tokens": 2_000,
        "cache_image_read_tokens": 0,  # cached and image tokens overlap here: say how many
        "output_tokens": 1_000,
    }
    expected = (
        2_000 * 400  # cached audio
        + 2_000 * 32_000  # uncached audio
        + 1_000 * 5_000  # image
        + 1_000 * 400  # cached, not audio
        + 4_000 * 4_000  # the rest of the input
        + 1_000 * 16_000
    )
    assert cost(table, "gpt-realtime", counts) == expected == reference("gpt-realtime", counts)


def test_characters_and_seconds_are_priced_in_their_units(table: PriceTable) -> None:
    """tts-1 is $15 per million characters; whisper-1 $0.36 an hour of audio."""
    assert cost(table, "tts-1", input_characters=2_000) == 2_000 * 15_000
    assert cost(table, "whisper-1", audio_seconds=90, input_audio_seconds=90) == usd("0.009")


def test_long_context_tier_applies_to_every_token(table: PriceTable) -> None:
    """Past 200,000 prompt tokens claude-sonnet-4-5 costs $6/$22.50 on all of them."""
    counts = {"input_tokens": 200_001, "output_tokens": 1_000}
    assert cost(table, "claude-sonnet-4-5", counts) == 200_001 * 6_000 + 1_000 * 22_500
    assert cost(table, "claude-sonnet-4-5", input_tokens=200_000, output_tokens=1_000) == usd("0.615")


def test_older_clients_four_fields_price_as_counts(table: PriceTable) -> None:
    """input_tokens excludes cache reads and writes in the four fields; the counts include them."""
    old = Usage(
        input_tokens=100, output_tokens=50, cache_read_input_tokens=1_000, cache_write_input_tokens=200
    )
    new = Usage(
        counts={
            "input_tokens": 1_300,
            "output_tokens": 50,
            "cache_read_tokens": 1_000,
            "cache_write_tokens": 200,
        }
    )
    assert table.cost("claude-sonnet-4-5", old) == table.cost("claude-sonnet-4-5", new)
    assert table.cost("claude-sonnet-4-5", old) == 100 * 3_000 + 50 * 15_000 + 1_000 * 300 + 200 * 3_750
    assert (new.input_tokens, new.cache_read_input_tokens, new.cache_write_input_tokens) == (100, 1_000, 200)


@pytest.mark.parametrize(
    ("tier", "expected"),
    [
        ("", "0.01125"),
        ("default", "0.01125"),
        ("priority", "0.0225"),
        ("PRIORITY", "0.0225"),
        ("flex", "0.005625"),
        ("batch", "0.005625"),
    ],
)
def test_openai_service_tiers(table: PriceTable, tier: str, expected: str) -> None:
    """gpt-5, 1,000 in and 1,000 out: standard $1.25/$10, priority twice that, flex and batch half."""
    assert cost(table, "gpt-5", tier=tier, input_tokens=1_000, output_tokens=1_000) == usd(expected)


def test_anthropic_batch_tier(table: PriceTable) -> None:
    """Anthropic's batch prices are half: $1.50/$7.50 for claude-sonnet-4-5, and 1-hour writes $3."""
    assert cost(table, "claude-sonnet-4-5", ONE_HOUR_WRITES, tier="batch") == usd("0.300765")
    assert cost(table, "claude-sonnet-4-5", ONE_HOUR_WRITES, tier="standard") == usd("0.60153")


def test_tier_contexts_are_genai_prices_variants() -> None:
    """A tier name selects the price variant that names it, under service_tier, processing or speed."""
    gpt5 = resolve("gpt-5")
    assert gpt5 is not None
    assert tier_context(gpt5.model, "flex", NOW) == {"service_tier": "flex"}
    assert tier_context(gpt5.model, "batch", NOW) == {"processing": "batch"}
    assert tier_context(gpt5.model, "scale", NOW) is None


def test_a_tier_without_a_price_is_charged_the_maximum_and_reported(
    table: PriceTable, reports: Reports
) -> None:
    """Anthropic's priority tier is not in the catalogue: never undercount, and say so once per name."""
    counts = {"input_tokens": 1_000, "output_tokens": 1_000}
    charged = cost(table, "claude-sonnet-4-5", counts, tier="priority")
    assert charged == table.max_card.cost(counts) > cost(table, "claude-sonnet-4-5", counts) * 10
    cost(table, "claude-sonnet-4-5", counts, tier="priority")
    assert reports == [
        ("tier", "claude-sonnet-4-5", "priority", True),
        ("tier", "claude-sonnet-4-5", "priority", False),
    ]


def test_a_unit_without_a_price_is_charged_the_maximum_and_reported(
    table: PriceTable, reports: Reports
) -> None:
    """claude-sonnet-4-5 has no price for code executions: the dearest per-call fee known ($35/K) applies."""
    counts = {"input_tokens": 1_000, "output_tokens": 100, "code_executions": 2}
    tokens = cost(table, "claude-sonnet-4-5", input_tokens=1_000, output_tokens=100)
    assert cost(table, "claude-sonnet-4-5", counts) == tokens + 2 * 35_000_000
    assert reports == [("unit", "claude-sonnet-4-5", "code_executions", True)]


@pytest.mark.parametrize(
    ("model", "entry", "rule", "expected"),
    [
        # AWS bills regional endpoints (geo prefixes and in-region ids) 10% above the global one;
        # the genai-prices catalogue has both prices.
        (
            "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "aws/regional.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "bedrock",
            "0.0198",
        ),
        (
            "anthropic.claude-sonnet-4-5-20250929-v1:0",
            "aws/regional.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "bedrock",
            "0.0198",
        ),
        (
            "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "aws/global.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "bedrock",
            "0.018",
        ),
        (
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/global.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "aws/global.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "bedrock",
            "0.018",
        ),
        ("anthropic/claude-sonnet-4-5", "anthropic/claude-sonnet-4-5", "router-prefix", "0.018"),
        (
            "openrouter/anthropic/claude-sonnet-4.5",
            "openrouter/anthropic/claude-sonnet-4.5",
            "router-prefix",
            "0.018",
        ),
        ("claude-sonnet-4-5@20250929", "google/claude-sonnet-4-5", "vertex", "0.018"),
        (
            "projects/p/locations/global/publishers/anthropic/models/claude-sonnet-4-5@20250929",
            "google/claude-sonnet-4-5",
            "google-resource",
            "0.018",
        ),
        ("claude-sonnet-4-5-20250929", "anthropic/claude-sonnet-4-5", "catalogue", "0.018"),
        ("openai/gpt-4o-mini", "openai/gpt-4o-mini", "router-prefix", "0.00075"),
        ("models/gemini-2.5-flash", "google/gemini-2.5-flash", "google-resource", "0.0028"),
    ],
)
def test_cloud_and_router_ids_resolve_to_catalogue_entries(
    table: PriceTable, model: str, entry: str, rule: str, expected: str
) -> None:
    """1,000 in and 1,000 out on each form of an id costs what its catalogue entry says."""
    pricing = table.lookup(model)
    assert (pricing.entry, pricing.rule, pricing.known) == (entry, rule, True)
    assert cost(table, model, input_tokens=1_000, output_tokens=1_000) == usd(expected)


def test_an_unknown_model_is_never_free(table: PriceTable, reports: Reports) -> None:
    """A name nothing resolves gets the maximum on every dimension, and is reported."""
    pricing = table.lookup("no-such-model-anywhere")
    assert not pricing.known and pricing.rule == "unknown"
    assert pricing.estimate(1_000, 1_000) == usd("0.75")  # $150/$600 per MTok: o1-pro's
    assert cost(table, "no-such-model-anywhere", input_tokens=1, output_tokens=0) > 0
    assert reports[0] == ("model", "no-such-model-anywhere", "no-such-model-anywhere", True)


def test_unknown_model_rejected_under_the_reject_policy() -> None:
    """--unknown-model-price reject: INVALID_ARGUMENT on the field named."""
    table = PriceTable(unknown=UnknownModelPolicy.REJECT, now=NOW)
    with pytest.raises(InvalidArgument) as info:
        table.lookup("no-such-model-anywhere", "model_downgrade.fallback")
    assert info.value.violations[0].field == "model_downgrade.fallback"


def test_the_maximum_never_charges_a_part_less_than_its_total() -> None:
    """Cached or audio tokens of an unknown model cost at least what plain input tokens do."""
    prices = {key: flat_max(value) for key, value in max_prices(NOW).items()}
    for key in ("cache_read_mtok", "cache_write_1h_mtok", "input_audio_mtok", "cache_audio_read_mtok"):
        assert prices[key] >= prices["input_mtok"] == Decimal(150)
    assert prices["output_audio_mtok"] >= prices["output_mtok"] == Decimal(600)


def test_estimate_is_the_standard_input_and_output_price(table: PriceTable) -> None:
    """The Decide estimate: input x input price + max output x output price, long-context tier included."""
    sonnet = table.lookup("claude-sonnet-4-5")
    assert sonnet.estimate(1_000, 500) == 1_000 * 3_000 + 500 * 15_000
    assert sonnet.estimate(300_000, 500) == 300_000 * 6_000 + 500 * 22_500
    # A model with no token prices (whisper-1 is priced by the hour) reserves at the maximum.
    assert table.lookup("whisper-1").estimate(1_000, 1_000) == usd("0.75")


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        (
            {"input_tokens": 100, "cache_read_tokens": 60, "cache_write_tokens": 60, "output_tokens": 1},
            "add up",
        ),
        ({"input_tokens": 100_010, "cache_write_1h_tokens": 100_000, "output_tokens": 100}, "must be given"),
    ],
)
def test_contradictory_counts_are_refused(table: PriceTable, counts: dict[str, int], message: str) -> None:
    """Parts above their total, or parts without their total, are INVALID_ARGUMENT on usage.counts."""
    with pytest.raises(InvalidArgument) as info:
        cost(table, "claude-sonnet-4-5", counts)
    assert info.value.violations[0].field == "usage.counts"
    assert message in info.value.violations[0].description
    with pytest.raises(ValueError, match="usage"):
        reference("claude-sonnet-4-5", counts)


def test_override_adds_prices_to_a_catalogue_model() -> None:
    """gpt-4o-audio-preview's audio rates are missing from the catalogue; an override adds them."""
    overrides = parse_price_overrides(
        {"gpt-4o-audio-preview": {"input_audio_mtok": 40, "output_audio_mtok": 80}}
    )
    table = PriceTable(overrides, now=NOW)
    counts = {
        "input_tokens": 1_000,
        "input_audio_tokens": 1_000,
        "output_tokens": 100,
        "output_audio_tokens": 100,
    }
    assert cost(table, "gpt-4o-audio-preview-2024-12-17", counts) == 1_000 * 40_000 + 100 * 80_000
    # Text keeps the catalogue's $2.50/$10.
    assert cost(table, "gpt-4o-audio-preview", input_tokens=1_000, output_tokens=100) == usd("0.0035")


def test_override_per_tier() -> None:
    """An operator prices Anthropic's priority tier; its other prices stay the standard ones."""
    overrides = parse_price_overrides(
        {"claude-sonnet-4-5": {"tiers": {"priority": {"input_mtok": 6, "output_mtok": 30}}}}
    )
    table = PriceTable(overrides, now=NOW)
    assert cost(table, "claude-sonnet-4-5", tier="priority", input_tokens=1_000, output_tokens=1_000) == usd(
        "0.036"
    )
    assert (
        cost(table, "claude-sonnet-4-5", WEB_SEARCH, tier="priority")
        == 9_548 * 6_000 + 528 * 30_000 + 20_000_000
    )
    assert cost(table, "claude-sonnet-4-5", WEB_SEARCH) == usd("0.056564")
    assert table.lookup("claude-sonnet-4-5").tiers == ("", "batch", "priority")


def test_override_of_an_unknown_model_and_legacy_keys() -> None:
    """A model the catalogue lacks needs input and output prices; the old *_usd_per_mtok keys still work."""
    overrides = parse_price_overrides(
        {
            "my-finetune": {
                "input_usd_per_mtok": 3,
                "output_usd_per_mtok": 15,
                "cache_read_usd_per_mtok": "0.3",
            }
        }
    )
    table = PriceTable(overrides, now=NOW)
    usage = Usage(input_tokens=1_000, output_tokens=1_000, cache_read_input_tokens=1_000)
    assert table.cost("my-finetune", usage) == usd("0.0183")
    assert table.lookup("MY-FINETUNE").rule == "override"
    with pytest.raises(ConfigError, match=r"prices\.half: .* need input_mtok and output_mtok"):
        PriceTable(parse_price_overrides({"half": {"input_mtok": 1}}), now=NOW)


def test_override_completes_missing_totals_and_overlaps() -> None:
    """Pricing audio apart on a model with cached prices also prices cached audio: at the higher rate."""
    prices = close_prices(
        {"input_mtok": Decimal(1), "cache_read_mtok": Decimal("0.1"), "input_audio_mtok": Decimal(8)}
    )
    assert prices["cache_audio_read_mtok"] == Decimal(8)
    prices = close_prices({"input_mtok": Decimal(3), "cache_write_1h_mtok": Decimal(6)})
    assert prices["cache_write_mtok"] == Decimal(3)  # 5-minute writes were charged as input: still are


def test_catalogue_price_lists_are_already_complete() -> None:
    """Completing a catalogue model's prices changes nothing: the catalogue is priced as it is."""
    for name in ("claude-sonnet-4-5", "gpt-realtime", "gemini-2.5-flash", "gpt-5"):
        entry = resolve(name)
        assert entry is not None
        for prices in tier_prices(entry.model, NOW).values():
            assert close_prices(prices) == prices


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"m": {"input_mtoks": 1}}, r"prices\.m\.input_mtoks: not a genai-prices price key"),
        ({"m": {"input_mtok": -1}}, r"prices\.m\.input_mtok: must be a finite, non-negative"),
        ({"m": {"input_mtok": "lots"}}, r"prices\.m\.input_mtok: must be a number of USD"),
        ({"m": {"input_mtok": True}}, r"prices\.m\.input_mtok: must be a number"),
        ({"m": {"input_mtok": 1, "input_usd_per_mtok": 1}}, "given twice"),
        ({"m": {"tiers": {"standard": {"input_mtok": 1}}}}, r"prices\.m\.tiers\.standard: a tier name"),
        ({"m": {"tiers": {"flex": {}}}}, r"prices\.m\.tiers\.flex: must map"),
        ({"m": 3}, r"prices\.m: must map"),
    ],
)
def test_bad_overrides_name_the_key(raw: dict[str, object], message: str) -> None:
    """Every bad override is a ConfigError naming where it is."""
    with pytest.raises(ConfigError, match=message):
        parse_price_overrides(raw)


def test_legacy_rate_card_pricing_still_works() -> None:
    """ModelPricing(name, RateCard(...)) in nano-USD per MTok, as earlier tests and embedders build it."""
    table = PriceTable({"big": ModelPricing("big", RateCard(1_000_000_000, 2_000_000_000, 100_000_000, 0))})
    assert table.cost("big", Usage(10, 20, 1_000)) == 10 * 1_000 + 20 * 2_000 + 1_000 * 100
    assert table.lookup("big").estimate(100, 100) == 300_000


def test_reported_requests_multiply_the_per_request_fee_and_cost_nothing_where_unpriced() -> None:
    """A usage may report ``requests`` (one per image for DALL·E); absent, one request is billed."""
    table = PriceTable(
        parse_price_overrides(
            {"dall-e-3-standard-1024x1024": {"requests_kcount": 40, "input_mtok": 0, "output_mtok": 0}}
        )
    )
    assert table.cost("dall-e-3-standard-1024x1024", Usage(counts={"requests": 3})) == 120_000_000
    assert table.cost("dall-e-3-standard-1024x1024", Usage(counts={})) == 40_000_000
    # gpt-4o-mini has no per-request fee: reporting requests adds nothing.
    tokens = {"input_tokens": 1_000, "output_tokens": 100}
    assert table.cost("gpt-4o-mini", Usage(counts={**tokens, "requests": 1})) == table.cost(
        "gpt-4o-mini", Usage(counts=tokens)
    )
