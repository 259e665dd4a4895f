"""Every SDK surface of the README's table, through the real SDKs against the fake provider.

Each row is proved twice, with the sync and the async client: guarded (a session
already over its cap is blocked before the provider) and settled (the usage the
client reports, by genai-prices usage key, and the cost the server counts at
genai-prices' real prices). The costs are the issue's: whisper-1 $0.006 a minute,
tts-1 $0.015 per 1,000 characters, and so on; DALL·E, which genai-prices does not
price, at the operator's per-image override.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import os
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest
from spendgate_client import (
    AsyncJournaledAnthropic,
    AsyncJournaledOpenAI,
    DecisionClient,
    JournaledAnthropic,
    JournaledOpenAI,
    SessionBudgetExceeded,
    Usage,
)
from spendgate_client._billing import prepare_anthropic_batch

from tests.fake_provider import FakeProvider, new_session, session_spend
from tests.fake_provider import Usage as Billed
from tests.processes import SpendgateServer

OpenAIClient = JournaledOpenAI | AsyncJournaledOpenAI
AnthropicClient = JournaledAnthropic | AsyncJournaledAnthropic
NANO = 1_000_000_000
# A session that spent $0.30 against a $0.01 cap: every guarded call must be blocked.
CAP = {"max_session_usd": 0.01}
OVERSPENT_NANO = 300_000_000

# The inputs name claude-sonnet-4-5, which the SDK warns is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


# genai-prices has no per-image price for DALL·E: the operator supplies it, as the README shows.
DALLE_PRICES = """\
prices:
  dall-e-3-standard-1024x1024: {requests_kcount: 40, input_mtok: 0, output_mtok: 0}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpendgateServer]:
    """A server at genai-prices' real prices plus the README's DALL·E override."""
    config = tmp_path_factory.mktemp("prices") / "prices.yaml"
    config.write_text(DALLE_PRICES)
    started = SpendgateServer.start("--config", str(config))
    yield started
    started.stop()


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider().start()
    yield provider
    provider.stop()


class Settles:
    """The settles a client sent: (model, usage), in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Usage]] = []

    def watch(self, client: Any) -> None:
        decisions = client._spendgate_gate.client
        send = decisions.settle

        def settle(session: str, reservation: str, model: str, usage: Usage | None = None, **kw: Any) -> Any:
            if kw.get("provider_ok", True):
                self.sent.append((model, usage or Usage()))
            return send(session, reservation, model, usage, **kw)

        decisions.settle = settle

    @property
    def counts(self) -> list[dict[str, int]]:
        return [dict(usage.counts) for _, usage in self.sent]


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
        client = cls(
            api_key="sk-test",
            base_url=base,
            max_retries=0,
            session_id=kwargs.pop("session_id", new_session()),
            spendgate_target=server.target,
            **kwargs,
        )
        client.spendgate_settles = Settles()
        client.spendgate_settles.watch(client)
        made.append(client)
        return client

    yield build
    for client in made:
        await resolve(client.close())


async def resolve(value: Any) -> Any:
    """The value, awaited when the async client returned an awaitable."""
    return await value if inspect.isawaitable(value) else value


async def drain(items: Any) -> list[Any]:
    """Every item of a sync or async iterable."""
    if hasattr(items, "__aiter__"):
        return [item async for item in items]
    return list(items)


def spent(server: SpendgateServer, client: Any) -> int:
    assert client.spendgate_flush(10)
    return session_spend(server.target, client.spendgate_session_id)


def overspend(server: SpendgateServer, client: Any) -> None:
    """Settle $0.30 into the client's session (2,000,000 gpt-4o-mini input tokens at $0.15/MTok)."""
    with DecisionClient(server.target, timeout=5) as decisions:
        decision = decisions.decide(client.spendgate_session_id, "gpt-4o-mini", 1, 1, os.urandom(32))
        assert (
            decisions.settle(
                client.spendgate_session_id, decision.reservation_id, "gpt-4o-mini", input_tokens=2_000_000
            )
            is not None
        )
    assert spent(server, client) == OVERSPENT_NANO


def wav(seconds: int) -> bytes:
    """A silent 8 kHz mono WAV file lasting ``seconds``."""
    out = io.BytesIO()
    with wave.open(out, "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(1)
        clip.setframerate(8_000)
        clip.writeframes(b"\x80" * 8_000 * seconds)
    return out.getvalue()


async def blocked(client: Any, fake: FakeProvider, server: SpendgateServer, call: Callable[[], Any]) -> None:
    """``call`` on an overspent session raises SessionBudgetExceeded and never reaches the provider."""
    overspend(server, client)
    with pytest.raises(SessionBudgetExceeded):
        await resolve(call())
    assert fake.requests == []


# --- embeddings ---------------------------------------------------------------------------


async def test_embeddings_runaway_loop_is_blocked_from_its_first_call(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """The issue's loop: 50 embeddings on a session over its cap never reach the provider."""
    client = make(enforcement_config=CAP)
    overspend(server, client)
    refused = 0
    for i in range(50):
        with pytest.raises(SessionBudgetExceeded):
            await resolve(client.embeddings.create(model="text-embedding-3-small", input=f"chunk {i}"))
        refused += 1
    assert (refused, fake.requests) == (50, [])
    assert spent(server, client) == OVERSPENT_NANO


async def test_embeddings_settle_their_input_tokens(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """An embedding reports its prompt tokens as input_tokens; the SDK still decodes the vectors."""
    fake.usage = Billed(input_tokens=1_000, output_tokens=0)
    client = make()
    answer = await resolve(client.embeddings.create(model="text-embedding-3-small", input=["a", "b"]))
    assert len(answer.data) == 2 and answer.data[0].embedding == [0.25, 0.5, 0.75]
    spent(server, client)
    assert client.spendgate_settles.sent == [
        ("text-embedding-3-small", Usage(input_tokens=1_000, counts={"input_tokens": 1_000}))
    ]


async def test_embeddings_cost_their_token_price(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """text-embedding-3-small at $0.02/MTok: 1,000 tokens cost $0.00002."""
    fake.usage = Billed(input_tokens=1_000, output_tokens=0)
    client = make()
    await resolve(client.embeddings.create(model="text-embedding-3-small", input="hello"))
    assert spent(server, client) == 20_000


async def test_embeddings_token_ceiling_and_dedup_apply(make: Callable[..., Any], fake: FakeProvider) -> None:
    """token_ceiling counts an embedding's input; dedup blocks the same input twice."""
    from spendgate_client import DuplicateRequest, TokenCeilingExceeded

    client = make(enforcement_config={"token_ceiling": 100, "dedup_ttl_seconds": 60})
    with pytest.raises(TokenCeilingExceeded):
        await resolve(client.embeddings.create(model="text-embedding-3-small", input="word " * 200))
    await resolve(client.embeddings.create(model="text-embedding-3-small", input="once"))
    with pytest.raises(DuplicateRequest):
        await resolve(client.embeddings.create(model="text-embedding-3-small", input="once"))
    assert len(fake.requests) == 1


# --- images ---------------------------------------------------------------------------------


async def test_images_are_guarded(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """images.generate on an overspent session is blocked."""
    client = make(enforcement_config=CAP)
    await blocked(client, fake, server, lambda: client.images.generate(model="gpt-image-1", prompt="a cat"))


async def test_gpt_image_settles_its_image_tokens(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """gpt-image-1 (high, 1024x1024: 4,160 output tokens at $40/MTok, 50 prompt tokens at $5/MTok)."""
    fake.usage = Billed(input_tokens=50, output_tokens=4_160)
    client = make()
    await resolve(
        client.images.generate(model="gpt-image-1", prompt="a cat", quality="high", size="1024x1024")
    )
    assert spent(server, client) == 50 * 5_000 + 4_160 * 40_000 == 166_650_000
    assert client.spendgate_settles.counts == [
        {"input_tokens": 50, "input_text_tokens": 50, "output_tokens": 4_160}
    ]


async def test_dalle_settles_one_request_per_image_of_its_quality_and_size(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """DALL·E bills per image by quality and size: two hd 1024x1792 images are two requests of that id."""
    client = make()
    await resolve(
        client.images.generate(model="dall-e-3", prompt="a cat", quality="hd", size="1024x1792", n=2)
    )
    spent(server, client)
    assert [(m, dict(u.counts)) for m, u in client.spendgate_settles.sent] == [
        ("dall-e-3-hd-1024x1792", {"requests": 2})
    ]
    assert fake.requests[0].model == "dall-e-3"  # the provider still gets the model asked for


async def test_dalle_costs_its_per_image_price(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """dall-e-3 standard 1024x1024 costs $0.04 an image (the operator's per-image price)."""
    client = make()
    await resolve(
        client.images.generate(model="dall-e-3", prompt="a cat", quality="standard", size="1024x1024")
    )
    assert spent(server, client) == 40_000_000


# --- audio ----------------------------------------------------------------------------------


async def test_transcriptions_are_guarded(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """audio.transcriptions.create on an overspent session is blocked."""
    client = make(enforcement_config=CAP)
    await blocked(
        client,
        fake,
        server,
        lambda: client.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav(1))),
    )


@pytest.mark.parametrize("response_format", ["json", "text"])
async def test_whisper_settles_seconds_of_audio(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer, response_format: str
) -> None:
    """whisper-1 on 60 s reports 60 audio_seconds: from the answer's usage, or (plain text) the WAV itself."""
    fake.usage = Billed(audio_seconds=60)
    client = make()
    await resolve(
        client.audio.transcriptions.create(
            model="whisper-1", file=("a.wav", wav(60)), response_format=response_format
        )
    )
    spent(server, client)
    assert client.spendgate_settles.counts == [{"audio_seconds": 60}]


async def test_whisper_costs_per_minute(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """whisper-1: $0.006 a minute."""
    fake.usage = Billed(audio_seconds=60)
    client = make()
    await resolve(client.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav(60))))
    assert spent(server, client) == 6_000_000


async def test_speech_settles_its_characters(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """tts-1 on 1,000 characters reports 1,000 input_characters; the audio comes back untouched."""
    client = make()
    audio = await resolve(client.audio.speech.create(model="tts-1", voice="alloy", input="x" * 1_000))
    assert audio.content.startswith(b"ID3")
    spent(server, client)
    assert client.spendgate_settles.counts == [{"input_characters": 1_000}]


async def test_speech_is_guarded(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """audio.speech.create on an overspent session is blocked."""
    client = make(enforcement_config=CAP)
    await blocked(
        client, fake, server, lambda: client.audio.speech.create(model="tts-1", voice="alloy", input="hi")
    )


async def test_speech_costs_per_character(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """tts-1: $15 per million characters, so 1,000 characters cost $0.015."""
    client = make()
    await resolve(client.audio.speech.create(model="tts-1", voice="alloy", input="x" * 1_000))
    assert spent(server, client) == 15_000_000


# --- legacy completions ---------------------------------------------------------------------


async def test_legacy_completions_are_guarded_and_priced_like_chat(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """completions.create: gpt-3.5-turbo-instruct, 100 in at $1.5/MTok and 50 out at $2/MTok."""
    fake.usage = Billed(input_tokens=100, output_tokens=50)
    client = make()
    await resolve(
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello", max_tokens=60)
    )
    assert spent(server, client) == 100 * 1_500 + 50 * 2_000 == 250_000
    capped = make(enforcement_config=CAP)
    fake.requests.clear()
    await blocked(
        capped, fake, server, lambda: capped.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
    )


# --- raw and streaming responses ------------------------------------------------------------


async def test_raw_responses_settle_from_the_body(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """with_raw_response is charged the real $0.006 (1,000 in, 200 out of claude-sonnet-4-5)."""
    fake.usage = Billed(input_tokens=1_000, output_tokens=200)
    client = make("anthropic")
    raw = await resolve(
        client.messages.with_raw_response.create(
            model="claude-sonnet-4-5", max_tokens=1_024, messages=[{"role": "user", "content": "hi"}]
        )
    )
    assert (await resolve(raw.parse())).usage.output_tokens == 200
    assert spent(server, client) == 6_000_000


async def test_streaming_responses_settle_from_the_body_they_stream(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """with_streaming_response, plain or SSE, settles once the caller has read the body."""
    fake.usage = Billed(input_tokens=1_000, output_tokens=200)
    client = make("anthropic")
    hello: Any = [{"role": "user", "content": "hi"}]
    for stream in (False, True):
        manager = client.messages.with_streaming_response.create(
            model="claude-sonnet-4-5", max_tokens=1_024, messages=hello, stream=stream
        )
        if isinstance(client, AsyncJournaledAnthropic):
            async with manager as response:
                lines = [line async for line in response.iter_lines()]
        else:
            with manager as response:
                lines = list(response.iter_lines())
        assert lines
    assert spent(server, client) == 2 * 6_000_000


async def test_openai_raw_and_streamed_raw_chat_settle(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """gpt-4o-mini through with_raw_response and with_streaming_response (SSE with include_usage)."""
    fake.usage = Billed(input_tokens=1_000, output_tokens=500)
    client = make()
    hello: Any = [{"role": "user", "content": "hi"}]
    raw = await resolve(client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=hello))
    assert (await resolve(raw.parse())).usage.completion_tokens == 500
    manager = client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=hello, stream=True, stream_options={"include_usage": True}
    )
    if isinstance(client, AsyncJournaledOpenAI):
        async with manager as response:
            chunks = [chunk async for chunk in await response.parse()]
    else:
        with manager as response:
            chunks = list(response.parse())
    assert chunks[-1].usage.completion_tokens == 500
    assert spent(server, client) == 2 * (1_000 * 150 + 500 * 600)


# --- background responses -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["retrieved", "streamed"])
async def test_background_response_settles_when_it_completes(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer, how: str
) -> None:
    """responses.create(background=True) holds its reservation until retrieved (or streamed) completed."""
    fake.usage = Billed(input_tokens=1_000, output_tokens=200)
    client = make()
    queued = await resolve(client.responses.create(model="gpt-4o-mini", input="hi", background=True))
    assert queued.status == "queued"
    held = spent(server, client)
    assert held > 270_000  # the reservation: 16,384 output tokens at most
    if how == "retrieved":
        done = await resolve(client.responses.retrieve(queued.id))
        assert done.status == "completed"
    else:
        await drain(await resolve(client.responses.retrieve(queued.id, stream=True)))
    assert spent(server, client) == 1_000 * 150 + 200 * 600 == 270_000


# --- batches --------------------------------------------------------------------------------


def batch_file(lines: int) -> bytes:
    body = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    return b"".join(
        json.dumps(
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        ).encode()
        + b"\n"
        for i in range(lines)
    )


async def openai_batch(client: Any) -> Any:
    upload = await resolve(client.files.create(file=("in.jsonl", batch_file(2)), purpose="batch"))
    return await resolve(
        client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    )


async def test_openai_batch_settles_when_its_results_are_fetched(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """batches.create reserves; fetching the output file settles both requests at the batch tier."""
    fake.usage = Billed(input_tokens=100, output_tokens=50)
    client = make()
    batch = await resolve(openai_batch(client))
    assert spent(server, client) > 0  # reserved
    done = await resolve(client.batches.retrieve(batch.id))
    content = await resolve(client.files.content(done.output_file_id))
    assert len(content.content.splitlines()) == 2
    spent(server, client)
    assert [(dict(u.counts), u.service_tier) for _, u in client.spendgate_settles.sent] == [
        ({"input_tokens": 200, "output_tokens": 100}, "batch")
    ]


async def test_batches_are_guarded(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """batches.create and messages.batches.create on an overspent session are blocked."""
    client = make(enforcement_config=CAP)
    upload = await resolve(client.files.create(file=("in.jsonl", batch_file(2)), purpose="batch"))
    overspend(server, client)
    fake.requests.clear()
    with pytest.raises(SessionBudgetExceeded):
        await resolve(
            client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        )
    assert [r.method for r in fake.requests] == ["GET"]  # only the input file was read, to estimate it
    claude = make("anthropic", enforcement_config=CAP, session_id=client.spendgate_session_id)
    with pytest.raises(SessionBudgetExceeded):
        await resolve(claude.messages.batches.create(requests=anthropic_requests(2)))
    assert all(r.method == "GET" for r in fake.requests)


def anthropic_requests(count: int) -> Any:
    params = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
    }
    return [{"custom_id": f"r{i}", "params": params} for i in range(count)]


async def test_anthropic_batch_settles_when_its_results_are_read(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """messages.batches.create reserves; reading all its results settles every request at the batch tier."""
    fake.usage = Billed(input_tokens=100, output_tokens=50)
    client = make("anthropic")
    batch = await resolve(client.messages.batches.create(requests=anthropic_requests(2)))
    results = await resolve(client.messages.batches.results(batch.id))
    lines = await drain(results)
    assert [line.result.type for line in lines] == ["succeeded", "succeeded"]
    spent(server, client)
    assert [(dict(u.counts), u.service_tier) for _, u in client.spendgate_settles.sent] == [
        (
            {"input_tokens": 200, "output_tokens": 100},
            "batch",
        )
    ]


async def test_anthropic_batch_costs_half(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """Two claude-sonnet-4-5 requests of 100 in and 50 out at the 50% batch price: $0.00105."""
    fake.usage = Billed(input_tokens=100, output_tokens=50)
    client = make("anthropic")
    batch = await resolve(client.messages.batches.create(requests=anthropic_requests(2)))
    results = await resolve(client.messages.batches.results(batch.id))
    await drain(results)
    assert spent(server, client) == 1_050_000


async def test_anthropic_batch_reserves_every_request_at_half_price(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer
) -> None:
    """Ten requests of max_tokens 100 hold ten worst cases at the batch tier ($1.50 / $7.50 per MTok)."""
    client = make("anthropic")
    await resolve(client.messages.batches.create(requests=anthropic_requests(10)))
    # What the wrapper sends as DecideRequest.max_usage for this body.
    usage = prepare_anthropic_batch({"requests": anthropic_requests(10)}).max_usage
    assert usage is not None and usage.service_tier == "batch"
    assert usage.counts["output_tokens"] == 10 * 100
    tokens_in = usage.counts["input_tokens"]
    assert tokens_in > 0 and tokens_in % 10 == 0
    # Unsettled until its results are read: the session holds the whole reservation.
    assert session_spend(server.target, client.spendgate_session_id) == tokens_in * 1_500 + 1_000 * 7_500


# --- free endpoints and unknown paths ---------------------------------------------------------


async def test_free_endpoints_pass_through_even_over_the_cap(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer, caplog: pytest.LogCaptureFixture
) -> None:
    """count_tokens and moderations bill nothing: they reach the provider, unguarded and unwarned."""
    openai_client = make(enforcement_config=CAP)
    overspend(server, openai_client)
    claude = make("anthropic", enforcement_config=CAP, session_id=openai_client.spendgate_session_id)
    with caplog.at_level(logging.WARNING, logger="spendgate_client"):
        await resolve(openai_client.moderations.create(input="hello"))
        counted = await resolve(
            claude.messages.count_tokens(
                model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]
            )
        )
    assert counted.input_tokens == 100 and len(fake.requests) == 2
    assert not caplog.records
    assert spent(server, openai_client) == OVERSPENT_NANO


async def test_unknown_paths_warn_once_and_are_guarded_when_they_name_a_model(
    make: Callable[..., Any], fake: FakeProvider, server: SpendgateServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An unknown POST: guarded when it names a model (blocked here), else passed; one warning each."""
    client = make(enforcement_config=CAP)
    overspend(server, client)
    with caplog.at_level(logging.WARNING, logger="spendgate_client"):
        for _ in range(2):
            with pytest.raises(SessionBudgetExceeded):
                await resolve(client.post("/videos", body={"model": "sora-2", "prompt": "x"}, cast_to=object))
            with pytest.raises(openai.NotFoundError):
                await resolve(client.post("/fine_tuning/checkpoints", body={"x": 1}, cast_to=object))
    warnings = [r.message for r in caplog.records]
    assert len(warnings) == 2 and "/videos" in warnings[0] and "not guarded" in warnings[1]
    assert [r.path for r in fake.requests] == ["/v1/fine_tuning/checkpoints"] * 2


def test_anthropic_sdk_has_the_module_it_is_tested_with() -> None:
    """The Anthropic SDK used here has Message Batches (the table's second row)."""
    assert hasattr(anthropic.Anthropic(api_key="k").messages, "batches")


def test_responses_report_tool_calls_billed_per_call() -> None:
    """Web searches, file searches and code interpreter calls in a Responses output are counted by key."""
    from spendgate_client._estimate import prepare_openai_responses
    from spendgate_client._openai import _read_responses

    body = {
        "usage": {"input_tokens": 10, "output_tokens": 5},
        "output": [
            {"type": "web_search_call"},
            {"type": "web_search_call"},
            {"type": "file_search_call"},
            {"type": "code_interpreter_call"},
            {"type": "message"},
        ],
        "service_tier": "priority",
    }
    usage = _read_responses(body, prepare_openai_responses({"model": "gpt-4o", "input": "hi"}))
    assert usage is not None and usage.service_tier == "priority"
    assert dict(usage.counts) == {
        "input_tokens": 10,
        "output_tokens": 5,
        "web_searches": 2,
        "storage_searches": 1,
        "code_executions": 1,
    }
