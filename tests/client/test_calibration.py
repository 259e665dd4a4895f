"""The wrappers' self-calibrating input-token estimate: the calibrator's invariants and a real wrapper.

The calibrator is checked by property (bounds, monotone, conservative on a stable
stream); the wrapper test runs the real ``anthropic`` SDK, sync and async, against
the fake provider and a real spendgate, with the fake reporting the input tokens
chosen for each prompt.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from spendgate_client import AsyncJournaledAnthropic, JournaledAnthropic, TokenCeilingExceeded
from spendgate_client._calibrate import (
    MARGIN,
    MAX_FACTOR,
    MIN_CALLS,
    MIN_FACTOR,
    MIN_LEARN_TOKENS,
    WINDOW_CALLS,
    Calibrator,
    model_family,
    reported_input_tokens,
)
from spendgate_client._estimate import prepare_anthropic

from tests.fake_provider import PRICES_YAML, FakeProvider, Usage, new_session
from tests.processes import SpendgateServer

Client = JournaledAnthropic | AsyncJournaledAnthropic
KEY = "messages|claude-sonnet-4-5"

raws = st.integers(min_value=MIN_LEARN_TOKENS, max_value=2_000_000)
ratios = st.floats(min_value=0.05, max_value=5.0, allow_nan=False)
observations = st.lists(st.tuples(raws, ratios), max_size=40)


def fed(seen: list[tuple[int, float]]) -> Calibrator:
    calibrator = Calibrator()
    for raw, ratio in seen:
        calibrator.observe(KEY, raw, max(1, round(raw * ratio)))
    return calibrator


@given(observations, st.integers(min_value=0, max_value=10_000_000))
def test_correction_stays_within_its_bounds(seen: list[tuple[int, float]], raw: int) -> None:
    """Whatever the providers report, the corrected estimate stays within 0.5x-1.5x of the raw one."""
    corrected = fed(seen).correct(KEY, raw)
    assert math.floor(raw * MIN_FACTOR) <= corrected <= math.ceil(raw * MAX_FACTOR)


@given(
    observations, st.integers(min_value=0, max_value=10_000_000), st.integers(min_value=0, max_value=10_000)
)
def test_correction_is_monotone_in_the_raw_estimate(
    seen: list[tuple[int, float]], raw: int, more: int
) -> None:
    """A larger raw estimate never gets a smaller corrected one."""
    calibrator = fed(seen)
    assert calibrator.correct(KEY, raw) <= calibrator.correct(KEY, raw + more)


@given(
    st.floats(min_value=MIN_FACTOR, max_value=MAX_FACTOR / (1 + MARGIN)),
    st.lists(raws, min_size=MIN_CALLS, max_size=30),
    raws,
)
def test_stable_stream_is_within_the_margin_above_the_provider(
    ratio: float, stream: list[int], raw: int
) -> None:
    """On a stream of one ratio the estimate is at or above the provider's count, at most MARGIN above."""
    calibrator = Calibrator()
    for earlier in stream:
        calibrator.observe(KEY, earlier, round(earlier * ratio))
    provider = round(raw * ratio)
    corrected = calibrator.correct(KEY, raw)
    learned = max(round(r * ratio) / r for r in stream)
    # Rounding the provider's integer counts shifts a learned ratio by at most 0.5 / MIN_LEARN_TOKENS.
    assert corrected >= provider * (1 - 1 / MIN_LEARN_TOKENS) - 1
    assert corrected <= math.ceil(raw * learned * (1 + MARGIN))


@given(st.lists(ratios, min_size=1, max_size=WINDOW_CALLS), raws)
def test_a_denser_request_raises_the_factor_at_once(history: list[float], raw: int) -> None:
    """One request that tokenized denser than its raw estimate raises the very next estimate."""
    calibrator = Calibrator()
    for ratio in history:
        calibrator.observe(KEY, 10_000, round(10_000 * ratio))
    calibrator.observe(KEY, 10_000, 13_000)
    assert calibrator.correct(KEY, raw) >= math.ceil(raw * 1.3)


def test_lowering_waits_for_min_calls_and_a_dense_call_leaves_the_window() -> None:
    """Lowered only after MIN_CALLS agreeing calls; a dense outlier holds it up for WINDOW_CALLS calls."""
    calibrator = Calibrator()
    for _ in range(MIN_CALLS - 1):
        calibrator.observe(KEY, 1_000, 750)
    assert calibrator.correct(KEY, 1_000) == 1_000
    calibrator.observe(KEY, 1_000, 750)
    assert calibrator.correct(KEY, 1_000) == math.ceil(1_000 * 0.75 * (1 + MARGIN)) == 765
    calibrator.observe(KEY, 1_000, 1_000)
    for _ in range(WINDOW_CALLS - 1):
        calibrator.observe(KEY, 1_000, 750)
        assert calibrator.correct(KEY, 1_000) == 1_020
    calibrator.observe(KEY, 1_000, 750)
    assert calibrator.correct(KEY, 1_000) == 765
    assert calibrator.correct("messages|other", 1_000) == 1_000


def test_small_requests_and_missing_usage_teach_nothing() -> None:
    """Requests under MIN_LEARN_TOKENS (the envelope dominates) and zero reports leave the factor at 1."""
    calibrator = Calibrator()
    for _ in range(10):
        calibrator.observe(KEY, MIN_LEARN_TOKENS - 1, 5)
        calibrator.observe(KEY, 5_000, 0)
    assert calibrator.factor(KEY) == 1.0


def test_concurrent_observers_and_readers_agree() -> None:
    """Settle threads observing while callers correct never see a factor outside the learned range."""
    calibrator = Calibrator()
    bad: list[float] = []

    def observe() -> None:
        for i in range(2_000):
            calibrator.observe(KEY, 1_000, 700 + i % 3)

    def read() -> None:
        for _ in range(2_000):
            factor = calibrator.factor(KEY)
            if factor != 1.0 and not 0.7 * (1 + MARGIN) <= factor <= 0.702 * (1 + MARGIN) + 1e-9:
                bad.append(factor)

    threads = [threading.Thread(target=f) for f in (observe, observe, read, read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert bad == []
    assert calibrator.correct(KEY, 1_000) == math.ceil(1_000 * 0.702 * (1 + MARGIN)) == 717


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
        ("anthropic/claude-sonnet-4-5", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4.1", "gpt-4.1"),
        ("GPT-4o-mini", "gpt-4o-mini"),
    ],
)
def test_model_family_joins_the_spellings_of_one_model(model: str, family: str) -> None:
    """Cloud, router, version and date spellings of one model learn together."""
    assert model_family(model) == family


def test_reported_input_counts_cache_reads_and_writes() -> None:
    """The provider's input is all of it: genai-prices' input_tokens, else uncached + reads + writes."""
    assert reported_input_tokens({"input_tokens": 900, "cache_read_tokens": 800}, 100, 800, 0) == 900
    assert reported_input_tokens({}, 100, 800, 50) == 950


# --- through a real wrapper ---------------------------------------------------------------

PROSE = (
    "The committee met on Tuesday to review the quarterly figures, and after a long discussion "
    "it agreed that the new warehouse should open in the spring rather than the autumn. "
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpendgateServer]:
    config = tmp_path_factory.mktemp("spendgate") / "prices.yaml"
    config.write_text(PRICES_YAML)
    started = SpendgateServer.start("--config", str(config))
    yield started
    started.stop()


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider().start()
    yield provider
    provider.stop()


@pytest.fixture(params=["sync", "async"])
async def make_client(
    request: pytest.FixtureRequest, server: SpendgateServer, fake: FakeProvider
) -> AsyncIterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(**kwargs: Any) -> Client:
        cls = JournaledAnthropic if request.param == "sync" else AsyncJournaledAnthropic
        client = cls(
            api_key="sk-ant-test",
            base_url=fake.base_url,
            max_retries=0,
            session_id=new_session(),
            spendgate_target=server.target,
            **kwargs,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        closing = client.close()
        if closing is not None:
            await closing


async def create(client: Client, text: str) -> Any:
    result: Any = client.messages.create(
        model="claude-test-big", max_tokens=100, messages=[{"role": "user", "content": text}]
    )
    return await result if inspect.isawaitable(result) else result


def body(text: str) -> dict[str, Any]:
    return {"model": "claude-test-big", "max_tokens": 100, "messages": [{"role": "user", "content": text}]}


async def test_ceiling_stops_blocking_prose_under_it_after_a_few_calls(
    make_client: Callable[..., Client], fake: FakeProvider
) -> None:
    """Prose billed at 75% of its raw estimate: blocked under token_ceiling at first, admitted later."""
    big = PROSE * 40
    raw = prepare_anthropic(body(big)).input_tokens
    billed = round(raw * 0.75)
    ceiling = round(raw * 0.85)
    assert raw > ceiling > billed * (1 + MARGIN) + 1
    client = make_client(enforcement_config={"token_ceiling": ceiling})
    with pytest.raises(TokenCeilingExceeded):
        await create(client, big)
    assert fake.requests == []
    for n in range(MIN_CALLS):
        small = f"Note {n}. " + PROSE * (5 + n)
        fake.usage = Usage(input_tokens=round(prepare_anthropic(body(small)).input_tokens * 0.75))
        await create(client, small)
        assert client.spendgate_flush(10)
    fake.usage = Usage(input_tokens=billed)
    await create(client, big)
    assert len(fake.requests) == MIN_CALLS + 1
    surface = JournaledAnthropic._spendgate_provider.routes["/v1/messages"].surface
    learned = client._spendgate_gate.calibrator.correct(f"{surface}|claude-test-big", raw)
    # Within a few percent above the provider's count (the small prompts' counts are rounded).
    assert billed <= learned <= billed * 1.03
