"""Settle anomalies: each check at its boundary, and the engine handing them to the journal.

The engine tests run the real engine over the memory store with an injected clock, so
"an error reported 30 s after the decision" is 30 s of the test's clock, not of the wall.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spendgate_server.engine.anomalies import AnomalyKind, AnomalyThresholds, settle_anomalies
from spendgate_server.engine.config import EnforcementConfig
from spendgate_server.engine.decide import DecisionEngine, SettleCall
from spendgate_server.engine.events import Journal, JournalEvent
from spendgate_server.engine.pricing import PriceTable, Usage
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.store import DecidedCall
from spendgate_server.store.memory import MemoryStore

from tests.conftest import FakeClock
from tests.unit.test_rules import PRICES, call

DECIDED = DecidedCall("big", estimate_nano_usd=300_000, input_tokens=10_000, max_output_tokens=100)
NEAR_THE_ESTIMATE = Usage(9_000, 50)
T = AnomalyThresholds()


def kinds(
    *,
    model: str = "big",
    usage: Usage = NEAR_THE_ESTIMATE,
    ok: bool = True,
    cost: int = 100_000,
    delay_ms: int = 1_000,
    decided: DecidedCall = DECIDED,
) -> set[AnomalyKind]:
    found = settle_anomalies(
        decided,
        model=model,
        same_model=model == decided.model,
        usage=usage,
        provider_ok=ok,
        cost_nano_usd=cost,
        settle_delay_ms=delay_ms,
        thresholds=T,
    )
    return {a.kind for a in found}


def test_an_honest_settle_raises_nothing() -> None:
    """Same model, input near the estimate, cost under the worst case, a fast error: no flag."""
    assert kinds() == set()
    assert kinds(usage=Usage(13_000, 100), cost=300_000) == set()
    assert kinds(ok=False, cost=0, delay_ms=T.late_error_ms - 1) == set()


def test_each_kind_at_its_boundary() -> None:
    """Each check fires one step past its threshold and not at it."""
    cost_ceiling = DECIDED.estimate_nano_usd * T.above_cost_percent // 100
    input_ceiling = DECIDED.input_tokens * T.above_input_factor + T.above_input_slack_tokens
    floor = DECIDED.input_tokens // T.below_input_divisor
    assert kinds(model="small") == {AnomalyKind.MODEL_MISMATCH}
    assert kinds(cost=cost_ceiling) == set()
    assert kinds(cost=cost_ceiling + 1) == {AnomalyKind.USAGE_ABOVE_ESTIMATE}
    assert kinds(usage=Usage(input_ceiling, 0)) == set()
    assert kinds(usage=Usage(input_ceiling - 100, 0, 101)) == {AnomalyKind.USAGE_ABOVE_ESTIMATE}
    assert kinds(usage=Usage(floor, 5)) == set()
    assert kinds(usage=Usage(floor - 1, 5)) == {AnomalyKind.USAGE_BELOW_ESTIMATE}
    assert kinds(usage=Usage(0, 0), cost=0) == {AnomalyKind.USAGE_BELOW_ESTIMATE}
    assert kinds(ok=False, cost=0, delay_ms=T.late_error_ms) == {AnomalyKind.LATE_ERROR}


def test_cache_reads_count_as_input() -> None:
    """A prompt served from the cache is not "far below": cached tokens are input tokens."""
    assert kinds(usage=Usage(0, 50, cache_read_input_tokens=9_500)) == set()


def test_tiny_prompts_are_not_judged_below_but_zero_usage_is() -> None:
    """Under 200 decided input tokens the estimate is too coarse to judge, except for no usage at all."""
    tiny = replace(DECIDED, input_tokens=150)
    assert kinds(decided=tiny, usage=Usage(1, 1)) == set()
    assert kinds(decided=tiny, usage=Usage(0, 0), cost=0) == {AnomalyKind.USAGE_BELOW_ESTIMATE}


@given(
    st.integers(0, 10**7),
    st.integers(0, 10**6),
    st.integers(0, 10**9),
    st.booleans(),
    st.integers(0, 10**8),
)
def test_every_report_is_judged_without_error(
    input_tokens: int, output_tokens: int, cost: int, ok: bool, delay_ms: int
) -> None:
    """Any report gets a verdict; an error report is judged only by time, a success never by it."""
    found = kinds(usage=Usage(input_tokens, output_tokens), ok=ok, cost=cost, delay_ms=delay_ms)
    if ok:
        assert AnomalyKind.LATE_ERROR not in found
    else:
        assert found == ({AnomalyKind.LATE_ERROR} if delay_ms >= T.late_error_ms else set())


class ListJournal(Journal):
    """The journal as a list (the Journal port; the log-store one is tested in test_evaluator)."""

    def __init__(self) -> None:
        self.events: list[JournalEvent] = []

    async def append(self, event: JournalEvent, dedup_window_ms: int) -> None:
        self.events.append(event)


@pytest.fixture
def journal() -> ListJournal:
    return ListJournal()


def engine(clock: FakeClock, journal: Journal) -> DecisionEngine:
    return DecisionEngine(
        MemoryStore(),
        PriceTable(PRICES),
        ConfigResolver.static(EnforcementConfig()),
        clock=clock,
        journal=journal,
    )


async def test_engine_flags_and_journals_but_counts_as_reported(
    clock: FakeClock, journal: ListJournal
) -> None:
    """Decided on big, settled as small: counted at small's price, the anomaly returned and journaled."""
    e = engine(clock, journal)
    decision = await e.decide(call(10_000, 100))
    settled = await e.settle(
        SettleCall("t", "s1", decision.reservation_id, "small", Usage(10_000, 100), True)
    )
    assert settled.cost_nano_usd == PriceTable(PRICES).cost("small", Usage(10_000, 100))
    assert [a.kind for a in settled.anomalies] == [AnomalyKind.MODEL_MISMATCH]
    [event] = journal.events
    assert event.anomalies == settled.anomalies
    assert JournalEvent.from_json(event.to_json()) == event
    anomaly = settled.anomalies[0]
    assert (anomaly.decided_model, anomaly.estimate_nano_usd) == ("big", decision.estimated_cost_nano_usd)
    again = await e.settle(SettleCall("t", "s1", decision.reservation_id, "small", Usage(10_000, 100), True))
    assert again.already_settled and again.anomalies == ()


@pytest.mark.parametrize(("waited_ms", "flagged"), [(29_999, False), (30_000, True)])
async def test_a_late_provider_error_is_flagged(
    clock: FakeClock, journal: ListJournal, waited_ms: int, flagged: bool
) -> None:
    """An error settled 30 s after its decision is flagged; 1 ms earlier it is a refusal like any other."""
    e = engine(clock, journal)
    decision = await e.decide(call(10_000, 100))
    clock.advance(waited_ms)
    settled = await e.settle(SettleCall("t", "s1", decision.reservation_id, "big", Usage(0, 0), False))
    assert settled.cost_nano_usd == 0
    assert [a.kind for a in settled.anomalies] == ([AnomalyKind.LATE_ERROR] if flagged else [])
    if flagged:
        assert settled.anomalies[0].settle_delay_ms == waited_ms


async def test_a_downgraded_call_is_compared_with_its_fallback(
    clock: FakeClock, journal: ListJournal
) -> None:
    """The decided model is the effective one: settling a downgraded call on the fallback is honest."""
    from spendgate_server.engine.config import ModelDowngrade

    e = engine(clock, journal)
    downgrade = EnforcementConfig(model_downgrade=ModelDowngrade(1, "small"))
    decision = await e.decide(call(10_000, 100, config=downgrade))
    assert decision.effective_model == "small"
    honest = await e.settle(SettleCall("t", "s1", decision.reservation_id, "small", Usage(10_000, 50), True))
    assert honest.anomalies == ()
    decision = await e.decide(call(10_000, 100, config=downgrade, prompt="other"))
    requested = await e.settle(SettleCall("t", "s1", decision.reservation_id, "big", Usage(10_000, 50), True))
    # Run on the model it was moved off: another model, and ten times the reserved cost.
    assert {a.kind for a in requested.anomalies} == {
        AnomalyKind.MODEL_MISMATCH,
        AnomalyKind.USAGE_ABOVE_ESTIMATE,
    }
