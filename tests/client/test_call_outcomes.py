"""How a call ended decides what is counted (issue 14, items 6a, 6b and 7's client side).

* A stream the caller closes early counts what was streamed, never the placeholder
  output of ``message_start``; an OpenAI stream closed before its usage keeps its
  reservation (it expires at its estimate, which is never below the real cost).
* An exception the SDK raises after the provider answered 2xx still settles the
  billed usage.
* A budget block tells settled spend from open reservations, and whether waiting
  for settles can help.

Real SDKs against the fake provider, a real server at genai-prices' real prices;
sync and async.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import openai
import pydantic
import pytest
from spendgate_client import (
    AsyncJournaledAnthropic,
    AsyncJournaledOpenAI,
    DecisionClient,
    JournaledAnthropic,
    JournaledOpenAI,
    SessionBudgetExceeded,
)

from tests.fake_provider import FakeProvider, new_session, session_spend
from tests.fake_provider import Usage as Billed
from tests.processes import SpendgateServer

# The inputs name claude-sonnet-4-5, which the SDK warns is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

HELLO: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server() -> Iterator[SpendgateServer]:
    """One server at genai-prices' real prices (sessions keep tests apart)."""
    started = SpendgateServer.start()
    yield started
    started.stop()


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider().start()
    yield provider
    provider.stop()


@pytest.fixture(params=["sync", "async"])
async def make(
    request: pytest.FixtureRequest, server: SpendgateServer, fake: FakeProvider
) -> AsyncIterator[Callable[..., Any]]:
    """Builds wrapper clients of either SDK (sync or async per parameter), pointed at the fake."""
    made: list[Any] = []

    def build(sdk: str = "openai", **kwargs: Any) -> Any:
        sync = request.param == "sync"
        if sdk == "openai":
            cls: Any = JournaledOpenAI if sync else AsyncJournaledOpenAI
            base = fake.openai_base_url
        else:
            cls = JournaledAnthropic if sync else AsyncJournaledAnthropic
            base = fake.base_url
        options = {"session_id": new_session(), **kwargs}
        client = cls(
            api_key="sk-test", base_url=base, max_retries=0, spendgate_target=server.target, **options
        )
        made.append(client)
        return client

    yield build
    for client in made:
        await resolve(client.close())


async def resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def next_item(stream: Any) -> Any:
    return await stream.__anext__() if hasattr(stream, "__anext__") else next(stream)


def spent(server: SpendgateServer, client: Any) -> int:
    assert client.spendgate_flush(10)
    return session_spend(server.target, client.spendgate_session_id)


# --- 6a: a stream closed early --------------------------------------------------------------


async def test_anthropic_stream_closed_after_30_deltas_counts_them(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """sonnet-4-5, input 1,000, 30 text deltas read, then closed: $0.003 in + 30 tokens out = $0.00345."""
    fake.usage = Billed(input_tokens=1_000, output_tokens=900)
    fake.text_deltas = 60
    client = make("anthropic")
    stream = await resolve(
        client.messages.create(model="claude-sonnet-4-5", max_tokens=1_024, messages=HELLO, stream=True)
    )
    kinds = [(await next_item(stream)).type for _ in range(32)]
    assert kinds[:2] == ["message_start", "content_block_start"] and set(kinds[2:]) == {"content_block_delta"}
    await resolve(stream.close())
    assert spent(server, client) == 1_000 * 3_000 + 30 * 15_000 == 3_450_000


async def test_anthropic_stream_helper_closed_early_counts_what_was_streamed(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """messages.stream(...) left after 30 deltas settles like the plain stream: never the placeholder."""
    fake.usage = Billed(input_tokens=1_000, output_tokens=900)
    fake.text_deltas = 60
    client = make("anthropic")
    seen = 0
    if isinstance(client, AsyncJournaledAnthropic):
        async with client.messages.stream(model="claude-sonnet-4-5", max_tokens=1_024, messages=HELLO) as s:
            async for event in s:
                seen += event.type == "content_block_delta"
                if seen == 30:
                    break
    else:
        with client.messages.stream(model="claude-sonnet-4-5", max_tokens=1_024, messages=HELLO) as s:
            for event in s:
                seen += event.type == "content_block_delta"
                if seen == 30:
                    break
    assert spent(server, client) >= 3_450_000


async def test_anthropic_stream_read_to_the_end_counts_the_final_usage(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """The same stream read to message_stop counts message_delta's 900 output tokens, not the deltas."""
    fake.usage = Billed(input_tokens=1_000, output_tokens=900)
    fake.text_deltas = 60
    client = make("anthropic")
    stream = await resolve(
        client.messages.create(model="claude-sonnet-4-5", max_tokens=1_024, messages=HELLO, stream=True)
    )
    if hasattr(stream, "__aiter__"):
        [event async for event in stream]
    else:
        list(stream)
    assert spent(server, client) == 1_000 * 3_000 + 900 * 15_000


async def test_openai_stream_closed_before_its_usage_keeps_the_reservation(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """A chat stream closed before its usage chunk keeps the reservation (never less than the real cost)."""
    fake.usage = Billed(input_tokens=1_000, output_tokens=200)
    client = make()
    stream = await resolve(
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=300, stream=True)
    )
    await next_item(stream)
    await resolve(stream.close())
    held = spent(server, client)
    assert held >= 300 * 600 > 1_000 * 150 + 200 * 600 - held


# --- 6b: an error after a 2xx ---------------------------------------------------------------


class Answer(pydantic.BaseModel):
    text: str


async def test_openai_parse_raising_after_a_2xx_settles_the_billed_usage(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """chat.completions.parse raising LengthFinishReasonError: gpt-4o-mini, 92 in, 5,000 out = $0.0030138."""
    fake.usage = Billed(input_tokens=92, output_tokens=5_000)
    fake.finish_reason = "length"
    client = make()
    with pytest.raises(openai.LengthFinishReasonError):
        await resolve(
            client.chat.completions.parse(model="gpt-4o-mini", messages=HELLO, response_format=Answer)
        )
    assert len(fake.requests) == 1
    assert spent(server, client) == 92 * 150 + 5_000 * 600 == 3_013_800


async def stream_parse(client: Any) -> None:
    """Read chat.completions.stream(..., response_format=Answer) to its end."""
    if isinstance(client, AsyncJournaledOpenAI):
        async with client.chat.completions.stream(
            model="gpt-4o-mini", messages=HELLO, response_format=Answer
        ) as a:
            async for _ in a:
                pass
        return
    with client.chat.completions.stream(model="gpt-4o-mini", messages=HELLO, response_format=Answer) as s:
        for _ in s:
            pass


async def test_openai_streamed_parse_raising_after_a_2xx_never_counts_less(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """The streamed parse raising mid-stream (here on the fake's text, which is no JSON) keeps at least
    the billed $0.0030138: the stream ended before its usage, so the reservation stays."""
    fake.usage = Billed(input_tokens=92, output_tokens=5_000)
    fake.finish_reason = "length"
    client = make()
    with pytest.raises(ValueError, match="expected value"):
        await stream_parse(client)
    assert spent(server, client) >= 3_013_800


async def test_anthropic_parse_raising_after_a_2xx_settles_the_billed_usage(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """messages.parse whose answer fails validation still counts the billed 1,000 in and 200 out ($0.006)."""
    fake.usage = Billed(input_tokens=1_000, output_tokens=200)
    client = make("anthropic")
    with pytest.raises(ValueError, match="Answer") as raised:
        await resolve(
            client.messages.parse(
                model="claude-sonnet-4-5", max_tokens=1_024, messages=HELLO, output_format=Answer
            )
        )
    assert not isinstance(raised.value, SessionBudgetExceeded)
    assert len(fake.requests) == 1
    assert spent(server, client) == 6_000_000


# --- 7: block reasons tell spent from reserved ------------------------------------------------


def reserve(server: SpendgateServer, session: str, usd_nano: int) -> str:
    """Open a reservation of ``usd_nano`` in ``session`` (a call in flight): gpt-4o-mini output tokens."""
    with DecisionClient(server.target, timeout=5) as decisions:
        decision = decisions.decide(session, "gpt-4o-mini", 0, usd_nano // 600, os.urandom(32))
    assert decision.reservation_id and decision.estimated_cost_nano_usd == usd_nano
    return decision.reservation_id


async def test_a_block_by_open_reservations_says_waiting_helps(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """Cap $0.005, one $0.015 reservation open: blocked with spent 0, reserved $0.015, waiting helps."""
    client = make(enforcement_config={"max_session_usd": 0.005})
    session = client.spendgate_session_id
    reservation = reserve(server, session, 15_000_000)
    with pytest.raises(SessionBudgetExceeded) as blocked:
        await resolve(client.chat.completions.create(model="gpt-4o-mini", messages=HELLO))
    error = blocked.value
    assert (error.spent_nano_usd, error.reserved_nano_usd, error.unblocks_on_settle) == (0, 15_000_000, True)
    assert "new session" not in error.reason
    with DecisionClient(server.target, timeout=5) as decisions:
        decisions.settle(session, reservation, "gpt-4o-mini", output_tokens=2_667)  # the real $0.0016
    fake.usage = Billed(input_tokens=10, output_tokens=10)
    await resolve(client.chat.completions.create(model="gpt-4o-mini", messages=HELLO))
    assert len(fake.requests) == 1


async def test_a_block_by_settled_spend_says_start_a_new_session(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """Settled spend at the cap: blocked with spent $0.30, nothing reserved, and waiting cannot help."""
    client = make(enforcement_config={"max_session_usd": 0.01})
    session = client.spendgate_session_id
    reservation = reserve(server, session, 6_000)
    with DecisionClient(server.target, timeout=5) as decisions:
        decisions.settle(session, reservation, "gpt-4o-mini", input_tokens=2_000_000)
    with pytest.raises(SessionBudgetExceeded) as blocked:
        await resolve(client.embeddings.create(model="text-embedding-3-small", input="x"))
    error = blocked.value
    assert (error.spent_nano_usd, error.reserved_nano_usd, error.unblocks_on_settle) == (
        300_000_000,
        0,
        False,
    )
    assert "new session" in error.reason
    assert fake.requests == []
