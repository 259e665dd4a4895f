"""JournaledOpenAI / AsyncJournaledOpenAI against a real spendgate and a fake OpenAI API.

The real ``openai`` SDK talks to :mod:`tests.fake_provider` through ``base_url``;
a real ``spendgate serve`` (memory store, round prices) decides. Every test runs
with the sync and the async client.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from openai.types.responses import Response
from spendgate_client import (
    AsyncJournaledOpenAI,
    DuplicateRequest,
    JournaledOpenAI,
    SessionBudgetExceeded,
    SpendgateUnavailable,
    TokenCeilingExceeded,
    ToolCallLimitExceeded,
)
from spendgate_client._estimate import prepare_openai_chat

from tests.fake_provider import (
    BIG,
    PRICES_YAML,
    SMALL,
    TEXT_PIECES,
    FakeProvider,
    Usage,
    cost,
    new_session,
    session_spend,
)
from tests.processes import SpendgateServer, free_port

Client = JournaledOpenAI | AsyncJournaledOpenAI
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpendgateServer]:
    """One server for the module (sessions keep tests apart); prices are round numbers."""
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
    """Builds wrapper clients (sync or async) pointed at the fake and the server; closes them."""
    made: list[Client] = []

    def make(**kwargs: Any) -> Client:
        cls = JournaledOpenAI if request.param == "sync" else AsyncJournaledOpenAI
        options: dict[str, Any] = {
            "api_key": "sk-test",
            "base_url": fake.openai_base_url,
            "max_retries": 0,
            "session_id": new_session(),
            "spendgate_target": server.target,
            **kwargs,
        }
        client = cls(**options)
        made.append(client)
        return client

    yield make
    for client in made:
        await resolve(client.close())


async def resolve(value: Any) -> Any:
    """The value, awaited when the async client returned an awaitable."""
    return await value if inspect.isawaitable(value) else value


async def chat(client: Client, **kwargs: Any) -> Any:
    kwargs.setdefault("model", "gpt-test-big")
    kwargs.setdefault("max_tokens", 100)
    kwargs.setdefault("messages", HELLO)
    return await resolve(client.chat.completions.create(**kwargs))


async def respond(client: Client, **kwargs: Any) -> Any:
    kwargs.setdefault("model", "gpt-test-big")
    kwargs.setdefault("max_output_tokens", 100)
    kwargs.setdefault("input", "Say hello.")
    return await resolve(client.responses.create(**kwargs))


async def drain(stream: Any) -> list[Any]:
    if hasattr(stream, "__aiter__"):
        return [item async for item in stream]
    return list(stream)


def spent(server: SpendgateServer, client: Client) -> int:
    assert client.spendgate_flush(10)
    return session_spend(server.target, client.spendgate_session_id)


# Usage with cached tokens: OpenAI reports them inside prompt_tokens; spendgate apart.
CACHED = Usage(input_tokens=120, output_tokens=30, cache_read_input_tokens=400)
CACHED_COST = 120 * 1_000 + 30 * 2_000 + 400 * 100


async def test_chat_completion_returns_the_sdk_object_and_settles_cached_tokens_apart(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """A chat completion comes back as ChatCompletion; prompt_tokens minus cached_tokens settles as input."""
    fake.usage = CACHED
    client = make_client()
    completion = await chat(client)
    assert isinstance(completion, ChatCompletion)
    assert completion.usage is not None and completion.usage.prompt_tokens == 520
    assert spent(server, client) == cost(BIG, CACHED) == CACHED_COST


async def test_streamed_chat_hides_the_usage_chunk_it_asked_for(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """Without include_usage the wrapper asks for it, settles from it and hides that chunk."""
    fake.usage = CACHED
    client = make_client()
    chunks = await drain(await chat(client, stream=True))
    assert all(chunk.choices for chunk in chunks)
    assert len(chunks) == len(TEXT_PIECES) + 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(TEXT_PIECES)
    assert fake.requests[0].body["stream_options"] == {"include_usage": True}
    assert spent(server, client) == CACHED_COST


async def test_streamed_chat_keeps_the_usage_chunk_the_caller_asked_for(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """With include_usage set by the caller, the usage chunk arrives as usual and is settled."""
    fake.usage = CACHED
    client = make_client()
    chunks = await drain(await chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 520
    assert spent(server, client) == CACHED_COST


async def test_chat_stream_helper_settles(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """The SDK's chat.completions.stream(...) helper still assembles the completion, and it is settled."""
    fake.usage = CACHED
    client = make_client()
    if isinstance(client, AsyncJournaledOpenAI):
        async with client.chat.completions.stream(model="gpt-test-big", messages=HELLO) as astream:
            final = await astream.get_final_completion()
    else:
        with client.chat.completions.stream(model="gpt-test-big", messages=HELLO) as stream:
            final = stream.get_final_completion()
    assert final.choices[0].message.content == "".join(TEXT_PIECES)
    assert spent(server, client) == CACHED_COST


async def test_responses_settle_streamed_or_not(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """responses.create returns the SDK's Response; streamed, usage comes from response.completed."""
    fake.usage = CACHED
    client = make_client()
    response = await respond(client)
    assert isinstance(response, Response) and response.output_text == "".join(TEXT_PIECES)
    events = await drain(await respond(client, input="Again.", stream=True))
    assert events[-1].type == "response.completed"
    assert spent(server, client) == 2 * CACHED_COST


async def test_token_ceiling_blocks_before_the_provider(
    make_client: Callable[..., Client], fake: FakeProvider
) -> None:
    """Chat and responses calls over token_ceiling raise TokenCeilingExceeded and are never sent."""
    client = make_client(enforcement_config={"token_ceiling": 50})
    long = "word " * 200
    with pytest.raises(TokenCeilingExceeded):
        await chat(client, messages=[{"role": "user", "content": long}])
    with pytest.raises(TokenCeilingExceeded):
        await chat(client, messages=[{"role": "user", "content": long}], stream=True)
    with pytest.raises(TokenCeilingExceeded):
        await respond(client, input=long)
    assert fake.requests == []


async def test_session_budget_blocks_once_spent(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """Once settled spend reaches max_session_usd, the next call is blocked and not sent."""
    client = make_client(enforcement_config={"max_session_usd": 0.0002})
    await chat(client)
    assert spent(server, client) == cost(BIG, fake.usage) == 200_000
    with pytest.raises(SessionBudgetExceeded):
        await respond(client)
    assert len(fake.requests) == 1


async def test_duplicate_request_is_blocked_whatever_the_key_order(
    make_client: Callable[..., Client], fake: FakeProvider
) -> None:
    """The same request (dict keys in any order, streamed or not) within the dedup TTL is blocked."""
    client = make_client(enforcement_config={"dedup_ttl_seconds": 60})
    await chat(client, messages=[{"role": "user", "content": "Hi", "name": "ann"}])
    with pytest.raises(DuplicateRequest):
        await chat(client, messages=[{"name": "ann", "content": "Hi", "role": "user"}], stream=True)
    await chat(client, messages=[{"role": "user", "content": "Hi", "name": "bob"}])
    assert len(fake.requests) == 2


async def test_tool_messages_of_the_newest_turn_count_toward_max_tool_calls(
    make_client: Callable[..., Client], fake: FakeProvider
) -> None:
    """Trailing role=tool messages are counted; the call that would pass max_tool_calls is blocked."""
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        for i in "ab"
    ]
    turn: list[Any] = [
        {"role": "user", "content": "Look these up."},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_a", "content": "A"},
        {"role": "tool", "tool_call_id": "call_b", "content": "B"},
    ]
    client = make_client(enforcement_config={"max_tool_calls": 1})
    with pytest.raises(ToolCallLimitExceeded):
        await chat(client, messages=turn)
    await chat(client, messages=turn[:2] + turn[2:3])
    assert len(fake.requests) == 1


async def test_downgrade_runs_on_the_fallback_model(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """Over the downgrade threshold the provider gets the fallback model, and the settle uses its prices."""
    downgrade = {"threshold_usd": 0.0001, "fallback": "gpt-test-small"}
    client = make_client(enforcement_config={"model_downgrade": downgrade})
    await drain(await chat(client, stream=True))
    await respond(client)
    assert [r.model for r in fake.requests] == ["gpt-test-small", "gpt-test-small"]
    assert spent(server, client) == 2 * cost(SMALL, fake.usage)


async def test_shadow_mode_lets_the_call_through_and_logs_the_would_block(
    make_client: Callable[..., Client], fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """In shadow mode a call over the ceiling reaches the provider and a warning says it would block."""
    client = make_client(enforcement_config={"token_ceiling": 5, "shadow": ["token_ceiling"]})
    with caplog.at_level(logging.WARNING, logger="spendgate_client"):
        await chat(client)
    assert len(fake.requests) == 1
    assert any("shadow" in r.message and "token_ceiling" in r.message for r in caplog.records)


async def test_provider_error_is_raised_unchanged_and_releases_the_reservation(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """A provider error reaches the caller as the SDK's own exception and the reservation is given back."""
    client = make_client()
    fake.fail_next(400)
    with pytest.raises(openai.BadRequestError):
        await chat(client)
    fake.fail_next(400)
    with pytest.raises(openai.BadRequestError):
        await respond(client, stream=True)
    assert len(fake.requests) == 2
    assert spent(server, client) == 0


async def test_stream_abandoned_before_its_usage_leaves_the_reservation(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """A chat stream closed before the usage chunk settles nothing: the reservation stays at its estimate."""
    client = make_client()
    stream = await chat(client, stream=True)
    await resolve(stream.__anext__() if hasattr(stream, "__anext__") else stream.__next__())
    await resolve(stream.close())
    body = {"model": "gpt-test-big", "max_tokens": 100, "messages": HELLO, "stream": True}
    estimate = prepare_openai_chat(body).input_tokens * BIG["input"] + 100 * BIG["output"]
    assert spent(server, client) == estimate


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
async def test_decision_service_stopped(
    make_client: Callable[..., Client],
    fake: FakeProvider,
    fail_mode: str,
) -> None:
    """With spendgate stopped, fail_mode="open" sends the call and "closed" raises SpendgateUnavailable."""
    # The client is made after the stop, so a port nobody listens on is the same to it as a
    # server that was started and stopped there, without a server start.
    stopped = f"127.0.0.1:{free_port()}"
    client = make_client(spendgate_target=stopped, fail_mode=fail_mode, decide_timeout=0.5)
    if fail_mode == "open":
        await drain(await chat(client, stream=True))
        assert len(fake.requests) == 1
    else:
        with pytest.raises(SpendgateUnavailable):
            await chat(client)
        assert fake.requests == []


async def test_provider_options_pass_through_and_with_options_stays_gated(
    make_client: Callable[..., Client], fake: FakeProvider
) -> None:
    """base_url, timeout, max_retries and default_headers reach the SDK; with_options copies stay gated."""
    client = make_client(
        timeout=12.5, default_headers={"x-caller": "tests"}, enforcement_config={"token_ceiling": 50}
    )
    assert client.timeout == 12.5 and client.max_retries == 0
    await chat(client)
    assert fake.requests[0].headers["x-caller"] == "tests"
    copy = client.with_options(timeout=3.0)
    assert isinstance(copy, type(client)) and copy.spendgate_session_id == client.spendgate_session_id
    with pytest.raises(TokenCeilingExceeded):
        await chat(copy, messages=[{"role": "user", "content": "word " * 200}])
    assert len(fake.requests) == 1


def test_bad_enforcement_config_raises_at_construction() -> None:
    """An unknown key raises ValueError naming it, before any call."""
    with pytest.raises(ValueError, match="max_tokens_per_call"):
        JournaledOpenAI(api_key="k", session_id="s", enforcement_config={"max_tokens_per_call": 1})
    with pytest.raises(ValueError, match="session_id"):
        AsyncJournaledOpenAI(api_key="k", session_id="has spaces")
