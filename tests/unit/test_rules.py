"""The five rules through the engine: each fires, does not fire, and holds at its edge.

The engine runs over both stores; prices are overridden so costs are round numbers.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from spendgate_server.engine.config import (
    BudgetMode,
    EnforcementConfig,
    ModelDowngrade,
    Rule,
    parse_enforcement_config,
)
from spendgate_server.engine.decide import Call, DecisionEngine, SettleCall, Verdict
from spendgate_server.engine.deny_cache import DenyCache
from spendgate_server.engine.pricing import ModelPricing, PriceTable, RateCard, UnknownModelPolicy, Usage
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.errors import InvalidArgument, NotFound
from spendgate_server.store import ReserveRequest, SessionKey, Store

from tests.conftest import FakeClock

# $1 per million input tokens and $2 per million output tokens: 1,000 and 2,000 nano-USD per token.
BIG = ModelPricing("big", RateCard(1_000_000_000, 2_000_000_000, 100_000_000, 1_250_000_000))
SMALL = ModelPricing("small", RateCard(100_000_000, 200_000_000, 10_000_000, 125_000_000))
PRICES = {"big": BIG, "small": SMALL}


def engine_for(
    store: Store,
    clock: FakeClock,
    config: EnforcementConfig | None = None,
    unknown: UnknownModelPolicy = UnknownModelPolicy.MAX,
) -> DecisionEngine:
    resolver = ConfigResolver.static(config or EnforcementConfig())
    return DecisionEngine(store, PriceTable(PRICES, unknown), resolver, clock=clock)


def call(
    input_tokens: int = 100,
    max_output: int = 100,
    *,
    session: str = "s1",
    model: str = "big",
    prompt: str = "hi",
    tools: int = 0,
    request_id: str = "",
    config: EnforcementConfig | None = None,
) -> Call:
    return Call(
        "t",
        session,
        model,
        input_tokens,
        max_output,
        hashlib.sha256(prompt.encode()).digest(),
        tools,
        request_id,
        config,
    )


@pytest.fixture
def engine(store: Store, clock: FakeClock) -> DecisionEngine:
    return engine_for(store, clock)


async def test_estimate_is_worst_case_cost(engine: DecisionEngine) -> None:
    """The reservation is input x input price + max output x output price."""
    decision = await engine.decide(call(1_000, 500))
    assert decision.estimated_cost_nano_usd == 1_000 * 1_000 + 500 * 2_000


@pytest.mark.parametrize(
    ("tokens", "verdict"), [(7_999, Verdict.ALLOW), (8_000, Verdict.ALLOW), (8_001, Verdict.BLOCK)]
)
async def test_token_ceiling(engine: DecisionEngine, tokens: int, verdict: Verdict) -> None:
    """token_ceiling blocks only above N: exactly N is allowed."""
    decision = await engine.decide(call(tokens, config=EnforcementConfig(token_ceiling=8_000)))
    assert decision.verdict is verdict
    if verdict is Verdict.BLOCK:
        assert decision.rule is Rule.TOKEN_CEILING and "8001" in decision.reason
        assert decision.reservation_id == ""


async def test_token_ceiling_block_reserves_nothing(engine: DecisionEngine, clock: FakeClock) -> None:
    """A ceiling block happens before the store: the session stays empty."""
    await engine.decide(call(9_000, config=EnforcementConfig(token_ceiling=8_000)))
    state = await engine.store.session_state(SessionKey("t", "s1"), clock(), 3_600_000)
    assert (state.reserved_nano_usd, state.open_reservations) == (0, 0)


@pytest.mark.parametrize(("mode", "calls_allowed"), [(BudgetMode.CROSSING, 3), (BudgetMode.STRICT, 2)])
async def test_session_budget_modes(engine: DecisionEngine, mode: BudgetMode, calls_allowed: int) -> None:
    """With a cap of 2.5 calls, crossing admits the 3rd call (crossing once); strict stops at 2."""
    config = EnforcementConfig(max_session_nano_usd=750_000, budget_mode=mode)
    verdicts = [(await engine.decide(call(100, 100, prompt=str(i), config=config))).verdict for i in range(4)]
    assert verdicts.count(Verdict.ALLOW) == calls_allowed
    assert verdicts[calls_allowed:] == [Verdict.BLOCK] * (4 - calls_allowed)


async def test_budget_block_reason_and_remaining(engine: DecisionEngine) -> None:
    """A budget block names the rule and the spend; remaining budget is reported on allows."""
    config = EnforcementConfig(max_session_nano_usd=300_000)
    first = await engine.decide(call(100, 100, prompt="a", config=config))
    assert first.remaining_budget_nano_usd == 0
    # Settled at its estimate: the settled spend alone reaches the cap.
    await engine.settle(SettleCall("t", "s1", first.reservation_id, "big", Usage(100, 100), True))
    blocked = await engine.decide(call(100, 100, prompt="b", config=config))
    assert (blocked.verdict, blocked.rule) == (Verdict.BLOCK, Rule.SESSION_BUDGET)
    assert "max_session_usd" in blocked.reason and "new session id" in blocked.reason


async def test_settle_frees_budget(engine: DecisionEngine) -> None:
    """Settling below the estimate returns the difference; a call that then fits exactly is allowed."""
    # Estimates are 300,000; the settle counts 120,000, so 120,000 + 300,000 fills the cap exactly.
    config = EnforcementConfig(max_session_nano_usd=420_000, budget_mode=BudgetMode.STRICT)
    first = await engine.decide(call(100, 100, prompt="a", config=config))
    assert (await engine.decide(call(100, 100, prompt="b", config=config))).verdict is Verdict.BLOCK
    settled = await engine.settle(SettleCall("t", "s1", first.reservation_id, "big", Usage(100, 10), True))
    assert settled.cost_nano_usd == 100 * 1_000 + 10 * 2_000
    assert (await engine.decide(call(100, 100, prompt="b", config=config))).verdict is Verdict.ALLOW


async def test_settle_prices_cache_tokens(engine: DecisionEngine) -> None:
    """Cache reads and writes are priced at their own rates."""
    first = await engine.decide(call())
    settled = await engine.settle(
        SettleCall("t", "s1", first.reservation_id, "big", Usage(10, 20, 1_000, 100), True)
    )
    assert settled.cost_nano_usd == 10 * 1_000 + 20 * 2_000 + 1_000 * 100 + 100 * 1_250


async def test_settle_provider_error_releases(engine: DecisionEngine) -> None:
    """A provider error counts nothing."""
    first = await engine.decide(call())
    settled = await engine.settle(SettleCall("t", "s1", first.reservation_id, "big", Usage(10, 20), False))
    assert (settled.cost_nano_usd, settled.session_spend_nano_usd) == (0, 0)


async def test_settle_unknown_reservation(engine: DecisionEngine) -> None:
    """Settling an id the session never reserved is NotFound, naming the field."""
    with pytest.raises(NotFound) as info:
        await engine.settle(SettleCall("t", "s1", "0" * 32, "big", Usage(), True))
    assert info.value.field == "reservation_id"


async def test_dedup(engine: DecisionEngine, clock: FakeClock) -> None:
    """An identical request within dedup_ttl_seconds is blocked; after it, or different, allowed."""
    config = EnforcementConfig(dedup_ttl_seconds=30)
    assert (await engine.decide(call(prompt="x", config=config))).verdict is Verdict.ALLOW
    dup = await engine.decide(call(prompt="x", config=config))
    assert (dup.verdict, dup.rule) == (Verdict.BLOCK, Rule.DUPLICATE_REQUEST)
    assert (await engine.decide(call(prompt="y", config=config))).verdict is Verdict.ALLOW
    clock.advance(30_000)
    assert (await engine.decide(call(prompt="x", config=config))).verdict is Verdict.ALLOW


async def test_no_dedup_without_the_rule(engine: DecisionEngine) -> None:
    """Without dedup_ttl_seconds identical requests are all allowed."""
    verdicts = {(await engine.decide(call(prompt="x"))).verdict for _ in range(3)}
    assert verdicts == {Verdict.ALLOW}


async def test_tool_call_limit(engine: DecisionEngine) -> None:
    """max_tool_calls counts tool results across the session; the call that would exceed it is blocked."""
    config = EnforcementConfig(max_tool_calls=4)
    assert (await engine.decide(call(prompt="1", tools=2, config=config))).verdict is Verdict.ALLOW
    assert (await engine.decide(call(prompt="2", tools=2, config=config))).verdict is Verdict.ALLOW
    blocked = await engine.decide(call(prompt="3", tools=1, config=config))
    assert (blocked.verdict, blocked.rule) == (Verdict.BLOCK, Rule.TOOL_CALL_LIMIT)
    assert "max_tool_calls 4" in blocked.reason


@pytest.mark.parametrize(("threshold", "downgraded"), [(300_000, False), (299_999, True)])
async def test_model_downgrade(engine: DecisionEngine, threshold: int, downgraded: bool) -> None:
    """Above the threshold (estimate 300,000) the call runs on the fallback, priced there."""
    config = EnforcementConfig(model_downgrade=ModelDowngrade(threshold, "small"))
    decision = await engine.decide(call(100, 100, config=config))
    if downgraded:
        assert (decision.verdict, decision.rule, decision.effective_model) == (
            Verdict.ALLOW_DOWNGRADED,
            Rule.MODEL_DOWNGRADE,
            "small",
        )
        assert decision.estimated_cost_nano_usd == 100 * 100 + 100 * 200
    else:
        assert (decision.verdict, decision.effective_model) == (Verdict.ALLOW, "big")


async def test_downgrade_prices_the_budget_on_the_fallback(engine: DecisionEngine) -> None:
    """The budget sees the fallback's (cheaper) estimate after a downgrade."""
    config = EnforcementConfig(
        max_session_nano_usd=40_000,
        budget_mode=BudgetMode.STRICT,
        model_downgrade=ModelDowngrade(1_000, "small"),
    )
    decision = await engine.decide(call(100, 100, config=config))
    assert decision.verdict is Verdict.ALLOW_DOWNGRADED
    assert decision.session_spend_nano_usd == 30_000


async def test_shadow_mode_reports_and_allows(engine: DecisionEngine) -> None:
    """In shadow mode every rule is evaluated, would_block is reported, and the call is allowed."""
    config = parse_enforcement_config({"token_ceiling": 10, "max_tool_calls": 0, "shadow": True})
    decision = await engine.decide(call(100, tools=1, config=config))
    assert decision.verdict is Verdict.ALLOW and decision.would_block
    assert decision.shadow_rules == {Rule.TOKEN_CEILING, Rule.TOOL_CALL_LIMIT}


async def test_server_config_cannot_be_loosened_by_client(store: Store, clock: FakeClock) -> None:
    """A client config tightens the server's; a looser client value is ignored."""
    engine = engine_for(store, clock, EnforcementConfig(token_ceiling=1_000))
    assert (
        await engine.decide(call(1_500, config=EnforcementConfig(token_ceiling=5_000)))
    ).verdict is Verdict.BLOCK
    assert (
        await engine.decide(call(600, config=EnforcementConfig(token_ceiling=500)))
    ).verdict is Verdict.BLOCK
    assert (
        await engine.decide(call(400, config=EnforcementConfig(token_ceiling=500)))
    ).verdict is Verdict.ALLOW


async def test_request_id_returns_same_decision(engine: DecisionEngine) -> None:
    """A retried request id gets the same decision id and reserves once."""
    first = await engine.decide(call(request_id="r-1"))
    retry = await engine.decide(call(request_id="r-1"))
    assert (retry.decision_id, retry.reservation_id, retry.verdict) == (
        first.decision_id,
        first.reservation_id,
        first.verdict,
    )
    assert retry.session_spend_nano_usd == first.session_spend_nano_usd


async def test_unknown_model_is_never_free(engine: DecisionEngine) -> None:
    """An unknown model is priced like the most expensive known one, never at zero."""
    decision = await engine.decide(call(1_000, 1_000, model="no-such-model-anywhere"))
    assert decision.verdict is Verdict.ALLOW
    assert (
        decision.estimated_cost_nano_usd
        > (await engine.decide(call(1_000, 1_000, prompt="z"))).estimated_cost_nano_usd
    )


async def test_unknown_model_reject_policy(store: Store, clock: FakeClock) -> None:
    """With the reject policy an unknown model is INVALID_ARGUMENT on the model field."""
    engine = engine_for(store, clock, unknown=UnknownModelPolicy.REJECT)
    with pytest.raises(InvalidArgument) as info:
        await engine.decide(call(model="no-such-model-anywhere"))
    assert info.value.violations[0].field == "model"


async def test_refused_call_releases_its_dedup_mark(engine: DecisionEngine) -> None:
    """A refused call frees its reservation and its fingerprint: the identical retry goes through."""
    config = EnforcementConfig(dedup_ttl_seconds=60)
    first = await engine.decide(call(prompt="q", config=config))
    assert (await engine.decide(call(prompt="q", config=config))).rule is Rule.DUPLICATE_REQUEST
    refused = await engine.settle(SettleCall("t", "s1", first.reservation_id, "big", Usage(), False))
    assert (refused.cost_nano_usd, refused.session_spend_nano_usd) == (0, 0)
    retry = await engine.decide(call(prompt="q", config=config))
    assert retry.verdict is Verdict.ALLOW
    await engine.settle(SettleCall("t", "s1", retry.reservation_id, "big", Usage(100, 10), True))
    again = await engine.decide(call(prompt="q", config=config))
    assert (again.verdict, again.rule) == (Verdict.BLOCK, Rule.DUPLICATE_REQUEST)


# The input: a $0.005 cap, one open $0.015 reservation (5,000 in + 5,000 out on "big"),
# settled later at its real $0.0016 (1,000 in + 300 out).
CAP_0_005 = EnforcementConfig(max_session_nano_usd=5_000_000)


async def test_a_block_by_open_reservations_says_so_and_lifts_on_settle(
    store: Store, clock: FakeClock
) -> None:
    """Calls in flight, not settled spend, reach the cap: the block says reserved; the settle lifts it."""
    engine = DecisionEngine(
        store,
        PriceTable(PRICES),
        ConfigResolver.static(EnforcementConfig()),
        clock=clock,
        deny_cache=DenyCache(),
    )
    first = await engine.decide(call(5_000, 5_000, prompt="a", config=CAP_0_005))
    assert (first.verdict, first.reserved_nano_usd, first.settled_spend_nano_usd) == (
        Verdict.ALLOW,
        15_000_000,
        0,
    )
    for prompt in "bc":  # the second answer comes from the deny cache: it must say the same
        blocked = await engine.decide(call(100, 100, prompt=prompt, config=CAP_0_005))
        assert (blocked.verdict, blocked.rule) == (Verdict.BLOCK, Rule.SESSION_BUDGET)
        assert (blocked.settled_spend_nano_usd, blocked.reserved_nano_usd) == (0, 15_000_000)
        assert blocked.session_spend_nano_usd == 15_000_000 and blocked.unblocks_on_settle
        assert "$0.015 reserved by calls in flight" in blocked.reason and "$0 settled" in blocked.reason
        assert "new session" not in blocked.reason and "settle can lift" in blocked.reason
    settled = await engine.settle(SettleCall("t", "s1", first.reservation_id, "big", Usage(1_000, 300), True))
    assert settled.session_spend_nano_usd == 1_600_000
    later = await engine.decide(call(100, 100, prompt="d", config=CAP_0_005))
    assert (later.verdict, later.settled_spend_nano_usd, later.reserved_nano_usd) == (
        Verdict.ALLOW,
        1_600_000,
        300_000,
    )


async def test_a_block_by_settled_spend_says_start_a_new_session(engine: DecisionEngine) -> None:
    """When settled spend alone reached the cap, waiting cannot help: the reason says start a new session."""
    first = await engine.decide(call(5_000, 5_000, prompt="a", config=CAP_0_005))
    await engine.settle(SettleCall("t", "s1", first.reservation_id, "big", Usage(5_000, 1_000), True))
    open_call = await engine.decide(call(5_000, 5_000, prompt="b", config=CAP_0_005))
    assert open_call.verdict is Verdict.BLOCK  # 7,000,000 settled is past the cap
    blocked = await engine.decide(call(100, 100, prompt="c", config=CAP_0_005))
    assert (blocked.settled_spend_nano_usd, blocked.reserved_nano_usd, blocked.unblocks_on_settle) == (
        7_000_000,
        0,
        False,
    )
    assert blocked.reason == "session spend $0.007 has reached max_session_usd $0.005; start a new session id"


@pytest.mark.parametrize(
    ("settle_first", "unblocks"),
    [(False, True), (True, False)],
    ids=["reserved-blocks", "settled-blocks"],
)
async def test_strict_mode_tells_whether_settles_can_make_room(
    engine: DecisionEngine, settle_first: bool, unblocks: bool
) -> None:
    """Strict mode: waiting helps only if settled spend plus this estimate fits the cap."""
    strict = EnforcementConfig(max_session_nano_usd=5_000_000, budget_mode=BudgetMode.STRICT)
    first = await engine.decide(call(1_000, 1_500, prompt="a", config=strict))  # reserves $0.004
    if settle_first:
        await engine.settle(SettleCall("t", "s1", first.reservation_id, "big", Usage(1_000, 1_500), True))
    blocked = await engine.decide(call(1_000, 1_000, prompt="b", config=strict))  # estimate $0.003
    assert (blocked.verdict, blocked.unblocks_on_settle) == (Verdict.BLOCK, unblocks)
    assert (
        "plus this call's estimate $0.003 would exceed max_session_usd $0.005 (strict mode)" in blocked.reason
    )
    assert ("start a new session id" in blocked.reason) is not unblocks


async def test_a_ceiling_block_reports_no_spend(engine: DecisionEngine) -> None:
    """A ceiling block never asks the store: no spend split, and nothing to wait for."""
    blocked = await engine.decide(call(9_000, config=EnforcementConfig(token_ceiling=8_000)))
    assert (blocked.settled_spend_nano_usd, blocked.reserved_nano_usd, blocked.unblocks_on_settle) == (
        0,
        0,
        False,
    )


@pytest.mark.parametrize(
    "changed",
    [
        {"model": "small"},
        {"input_tokens": 900_000},
        {"max_output": 101},
        {"prompt": "another prompt"},
        {"tools": 1},
        {"config": EnforcementConfig(token_ceiling=5_000)},
    ],
    ids=["model", "input-tokens", "max-output", "fingerprint", "tool-calls", "config"],
)
async def test_request_id_reused_for_another_request_is_refused(
    engine: DecisionEngine, clock: FakeClock, changed: dict[str, object]
) -> None:
    """A request id replays only the request it was first used for; anything else changed is refused."""
    first = await engine.decide(call(request_id="r-1"))
    before = await engine.store.session_state(SessionKey("t", "s1"), clock(), 3_600_000)
    with pytest.raises(InvalidArgument) as info:
        await engine.decide(call(request_id="r-1", **changed))  # type: ignore[arg-type]
    assert [v.field for v in info.value.violations] == ["request_id"]
    assert "'r-1' was already used in this session for a different request" in str(info.value)
    assert await engine.store.session_state(SessionKey("t", "s1"), clock(), 3_600_000) == before
    retry = await engine.decide(call(request_id="r-1"))
    assert (retry.decision_id, retry.verdict) == (first.decision_id, Verdict.ALLOW)


async def test_a_memo_without_a_digest_still_replays(engine: DecisionEngine, clock: FakeClock) -> None:
    """A decision stored before digests were kept (six fields) replays as it did then."""
    memo = json.dumps(["a" * 32, int(Verdict.ALLOW), "big", 0, 300_000, "allowed"])
    await engine.store.reserve(
        ReserveRequest(
            SessionKey("t", "s1"), clock(), "a" * 32, 300_000, 600_000, 3_600_000, request_id="old", memo=memo
        )
    )
    replayed = await engine.decide(call(5, model="small", request_id="old"))
    assert (replayed.decision_id, replayed.effective_model, replayed.estimated_cost_nano_usd) == (
        "a" * 32,
        "big",
        300_000,
    )


async def test_a_client_downgrade_to_an_unpriced_fallback_is_refused(engine: DecisionEngine) -> None:
    """As UpdateConfig refuses it: a client's fallback with no known price is INVALID_ARGUMENT."""
    config = EnforcementConfig(model_downgrade=ModelDowngrade(1_000, "unknown-model-x"))
    with pytest.raises(InvalidArgument) as refused:
        await engine.decide(call(100, 100, config=config))
    [violation] = refused.value.violations
    assert violation.field == "enforcement_config.model_downgrade.fallback_model"
    assert "unknown-model-x" in violation.description
