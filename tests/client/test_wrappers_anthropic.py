"""JournaledAnthropic / AsyncJournaledAnthropic against a real spendgate and a fake Anthropic.

The real ``anthropic`` SDK talks to :mod:`tests.fake_provider` through ``base_url``;
a real ``spendgate serve`` (memory store, round prices) decides. Every test runs
with the sync and the async client.
"""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from anthropic.types import MessageParam
from spendgate_client import (
    AsyncJournaledAnthropic,
    DuplicateRequest,
    JournaledAnthropic,
    SessionBudgetExceeded,
    SpendgateUnavailable,
    TokenCeilingExceeded,
    ToolCallLimitExceeded,
)

from tests.fake_provider import BIG, PRICES_YAML, SMALL, FakeProvider, Usage, cost, new_session, session_spend
from tests.processes import SpendgateServer, free_port

Client = JournaledAnthropic | AsyncJournaledAnthropic
HELLO: list[MessageParam] = [{"role": "user", "content": "Say hello."}]


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
        cls = JournaledAnthropic if request.param == "sync" else AsyncJournaledAnthropic
        options: dict[str, Any] = {
            "api_key": "sk-ant-test",
            "base_url": fake.base_url,
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


async def create(client: Client, **kwargs: Any) -> Any:
    kwargs.setdefault("model", "claude-test-big")
    kwargs.setdefault("max_tokens", 100)
    kwargs.setdefault("messages", HELLO)
    return await resolve(client.messages.create(**kwargs))


async def drain(stream: Any) -> list[Any]:
    if hasattr(stream, "__aiter__"):
        return [event async for event in stream]
    return list(stream)


def spent(server: SpendgateServer, client: Client) -> int:
    assert client.spendgate_flush(10)
    return session_spend(server.target, client.spendgate_session_id)


async def test_allowed_call_returns_the_sdk_message_and_settles_its_usage(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """An allowed call returns the SDK's own Message and settles input, output and both cache kinds."""
    fake.usage = Usage(
        input_tokens=120, output_tokens=30, cache_read_input_tokens=400, cache_write_input_tokens=80
    )
    client = make_client()
    message = await create(client)
    assert isinstance(message, anthropic.types.Message)
    assert message.content[0].text == "Hello, world"  # type: ignore[union-attr]  # the fake answers text
    assert [r.model for r in fake.requests] == ["claude-test-big"]
    assert spent(server, client) == cost(BIG, fake.usage) == 120_000 + 60_000 + 40_000 + 100_000


async def test_token_ceiling_blocks_before_the_provider(
    make_client: Callable[..., Client], fake: FakeProvider
) -> None:
    """A request over token_ceiling raises TokenCeilingExceeded and never reaches the provider."""
    client = make_client(enforcement_config={"token_ceiling": 50})
    with pytest.raises(TokenCeilingExceeded) as blocked:
        await create(client, messages=[{"role": "user", "content": "word " * 200}])
    assert blocked.value.rule == "token_ceiling" and blocked.value.decision_id
    with pytest.raises(TokenCeilingExceeded):
        await create(client, messages=[{"role": "user", "content": "word " * 200}], stream=True)
    assert fake.requests == []
    await create(client)  # a small request still goes through
    assert len(fake.requests) == 1


async def test_session_budget_blocks_once_spent(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """Once settled spend reaches max_session_usd, the next call is blocked and not sent."""
    client = make_client(enforcement_config={"max_session_usd": 0.0002})
    await create(client)
    assert spent(server, client) == cost(BIG, fake.usage) == 200_000
    with pytest.raises(SessionBudgetExceeded):
        await create(client, messages=[{"role": "user", "content": "Again."}])
    assert len(fake.requests) == 1


async def test_duplicate_request_is_blocked_whatever_the_key_order(
    make_client: Callable[..., Client], fake: FakeProvider
) -> None:
    """The same request (dict keys in any order) within dedup_ttl_seconds is blocked; another is not."""
    client = make_client(enforcement_config={"dedup_ttl_seconds": 60})
    await create(client, messages=[{"role": "user", "content": "Hi"}], metadata={"user_id": "u1"})
    with pytest.raises(DuplicateRequest):
        await create(client, metadata={"user_id": "u1"}, messages=[{"content": "Hi", "role": "user"}])
    with pytest.raises(DuplicateRequest):  # streaming or not is the same request
        await create(
            client, messages=[{"role": "user", "content": "Hi"}], metadata={"user_id": "u1"}, stream=True
        )
    await create(client, messages=[{"role": "user", "content": "Hi!"}], metadata={"user_id": "u1"})
    assert len(fake.requests) == 2


def tool_turn(*ids: str) -> list[dict[str, Any]]:
    """A conversation whose newest turn carries one tool_result per id."""
    uses = [{"type": "tool_use", "id": i, "name": "lookup", "input": {"q": i}} for i in ids]
    results = [{"type": "tool_result", "tool_use_id": i, "content": f"result {i}"} for i in ids]
    return [
        {"role": "user", "content": "Look these up."},
        {"role": "assistant", "content": uses},
        {"role": "user", "content": results},
    ]


async def test_tool_results_of_the_newest_turn_count_toward_max_tool_calls(
    make_client: Callable[..., Client], fake: FakeProvider
) -> None:
    """tool_result blocks of the newest turn are counted; the call that would exceed the limit is blocked."""
    client = make_client(enforcement_config={"max_tool_calls": 3})
    await create(client, messages=tool_turn("a", "b"))
    with pytest.raises(ToolCallLimitExceeded):
        await create(
            client,
            messages=[*tool_turn("a", "b"), {"role": "assistant", "content": "ok"}, *tool_turn("c", "d")[1:]],
        )
    assert len(fake.requests) == 1


async def test_downgrade_runs_on_the_fallback_model_and_settles_at_its_price(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """Over the downgrade threshold the provider gets the fallback model, and the settle uses its prices."""
    downgrade = {"threshold_usd": 0.0001, "fallback": "claude-test-small"}
    client = make_client(enforcement_config={"model_downgrade": downgrade})
    message = await create(client)
    assert [r.model for r in fake.requests] == ["claude-test-small"]
    assert message.model == "claude-test-small"
    assert spent(server, client) == cost(SMALL, fake.usage) == 20_000


async def test_shadow_mode_lets_the_call_through_and_logs_the_would_block(
    make_client: Callable[..., Client], fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """In shadow mode a call over the ceiling reaches the provider and a warning says it would block."""
    client = make_client(enforcement_config={"token_ceiling": 5, "shadow": True})
    with caplog.at_level(logging.WARNING, logger="spendgate_client"):
        await create(client)
    assert len(fake.requests) == 1
    assert any("shadow" in r.message and "token_ceiling" in r.message for r in caplog.records)


async def test_streamed_create_settles_the_final_usage(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """create(stream=True) yields the SDK's events and settles message_start + final message_delta usage."""
    fake.usage = Usage(
        input_tokens=200, output_tokens=70, cache_read_input_tokens=10, cache_write_input_tokens=0
    )
    client = make_client()
    stream = await create(client, stream=True)
    assert isinstance(stream, anthropic.Stream | anthropic.AsyncStream)
    events = await drain(stream)
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    assert spent(server, client) == cost(BIG, fake.usage) == 200_000 + 140_000 + 1_000


async def test_stream_helper_settles_the_final_usage(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """The messages.stream(...) helper works as usual (text, final message) and its usage is settled."""
    fake.usage = Usage(input_tokens=300, output_tokens=40, cache_write_input_tokens=1_000)
    client = make_client()
    if isinstance(client, AsyncJournaledAnthropic):
        async with client.messages.stream(model="claude-test-big", max_tokens=100, messages=HELLO) as astream:
            text = "".join([t async for t in astream.text_stream])
            final = await astream.get_final_message()
    else:
        with client.messages.stream(model="claude-test-big", max_tokens=100, messages=HELLO) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    assert text == "Hello, world" and final.usage.output_tokens == 40
    assert spent(server, client) == cost(BIG, fake.usage) == 300_000 + 80_000 + 1_250_000


async def open_stream_helper(client: Client) -> None:
    """Enter (and leave) a messages.stream(...) context."""
    if isinstance(client, AsyncJournaledAnthropic):
        async with client.messages.stream(model="claude-test-big", max_tokens=100, messages=HELLO):
            return
    with client.messages.stream(model="claude-test-big", max_tokens=100, messages=HELLO):
        return


async def test_stream_helper_is_blocked_before_the_provider(
    make_client: Callable[..., Client], fake: FakeProvider
) -> None:
    """A blocked messages.stream(...) raises on entering and sends nothing."""
    client = make_client(enforcement_config={"token_ceiling": 1})
    with pytest.raises(TokenCeilingExceeded):
        await open_stream_helper(client)
    assert fake.requests == []


async def test_abandoned_stream_settles_what_was_reported(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """A stream closed after message_start settles its input tokens and the output reported so far."""
    fake.usage = Usage(input_tokens=500, output_tokens=900)
    client = make_client()
    stream = await create(client, stream=True)
    first = await resolve(stream.__anext__() if hasattr(stream, "__anext__") else stream.__next__())
    assert first.type == "message_start"
    await resolve(stream.close())
    # message_start reports all input tokens and one output token.
    assert spent(server, client) == 500 * BIG["input"] + 1 * BIG["output"]


async def test_provider_error_is_raised_unchanged_and_releases_the_reservation(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """A provider error reaches the caller as the SDK's own exception and the reservation is given back."""
    client = make_client()
    fake.fail_next(400)
    with pytest.raises(anthropic.BadRequestError):
        await create(client)
    assert len(fake.requests) == 1
    assert spent(server, client) == 0


async def test_provider_options_pass_through_and_with_options_stays_gated(
    make_client: Callable[..., Client], fake: FakeProvider
) -> None:
    """base_url, timeout, max_retries and default_headers reach the SDK; with_options copies stay gated."""
    client = make_client(
        timeout=12.5, default_headers={"x-caller": "tests"}, enforcement_config={"token_ceiling": 50}
    )
    assert client.timeout == 12.5 and client.max_retries == 0
    await create(client)
    assert fake.requests[0].headers["x-caller"] == "tests"
    copy = client.with_options(timeout=3.0)
    assert isinstance(copy, type(client)) and copy.spendgate_session_id == client.spendgate_session_id
    with pytest.raises(TokenCeilingExceeded):
        await create(copy, messages=[{"role": "user", "content": "word " * 200}])
    assert len(fake.requests) == 1


async def test_beta_and_raw_response_calls_are_gated_too(
    make_client: Callable[..., Client], fake: FakeProvider, server: SpendgateServer
) -> None:
    """beta.messages and with_raw_response go through the same gate: blocked over the ceiling, else sent."""
    client = make_client(enforcement_config={"token_ceiling": 50})
    long: list[Any] = [{"role": "user", "content": "word " * 200}]
    hello: list[Any] = list(HELLO)
    with pytest.raises(TokenCeilingExceeded):
        await resolve(client.beta.messages.create(model="claude-test-big", max_tokens=10, messages=long))
    with pytest.raises(TokenCeilingExceeded):
        await resolve(
            client.messages.with_raw_response.create(model="claude-test-big", max_tokens=10, messages=long)
        )
    assert fake.requests == []
    beta = await resolve(client.beta.messages.create(model="claude-test-big", max_tokens=100, messages=hello))
    assert beta.usage.output_tokens == fake.usage.output_tokens
    raw = await resolve(
        client.messages.with_raw_response.create(model="claude-test-big", max_tokens=10, messages=HELLO)
    )
    assert (await resolve(raw.parse())).usage.output_tokens == fake.usage.output_tokens
    # Both are settled at their usage: the raw one from the body it carried.
    assert spent(server, client) == 2 * cost(BIG, fake.usage)


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
        await create(client)
        assert len(fake.requests) == 1
    else:
        with pytest.raises(SpendgateUnavailable):
            await create(client)
        assert fake.requests == []


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"token_cieling": 10}, "token_cieling"),
        ({"max_session_usd": [1]}, "max_session_usd"),
        ({"max_tool_calls": "3"}, "max_tool_calls"),
    ],
)
def test_bad_enforcement_config_raises_at_construction(config: dict[str, Any], named: str) -> None:
    """An unknown key or a wrong type raises ValueError naming the key, before any call."""
    with pytest.raises(ValueError, match=named):
        JournaledAnthropic(api_key="k", session_id="s", enforcement_config=config)
    with pytest.raises(ValueError, match=named):
        AsyncJournaledAnthropic(api_key="k", session_id="s", enforcement_config=config)


def test_issue_snippet_runs_verbatim_against_the_default_target(
    server: SpendgateServer, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snippet from the issue works as written (target from SPENDGATE_TARGET, SDK URL from its env)."""
    monkeypatch.setenv("SPENDGATE_TARGET", server.target)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
    client = JournaledAnthropic(
        api_key="sk-ant-…", session_id="my-session", enforcement_config={"token_ceiling": 8000}
    )
    try:
        client.messages.create(
            model="claude-test-big", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )
    finally:
        client.close()
    assert len(fake.requests) == 1


def test_package_imports_without_the_provider_sdks() -> None:
    """`import spendgate_client` works without anthropic/openai; using a wrapper then names the extra."""
    code = (
        "import sys; sys.modules['anthropic'] = None; sys.modules['openai'] = None\n"
        "import spendgate_client\n"
        "try:\n    spendgate_client.JournaledAnthropic\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert "pip install 'anthropic>=" in out.stdout  # installable from the index, unlike the extra
