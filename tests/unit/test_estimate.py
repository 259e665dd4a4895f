"""The local request facts: fingerprint, input-token estimate, output cap and tool-result count."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from typing import Any

import pytest
from anthropic.types import TextBlock, ToolUseBlock
from spendgate_client._estimate import (
    ANTHROPIC_IMAGE_TOKENS,
    DEFAULT_OPENAI_MAX_OUTPUT_TOKENS,
    MAX_INPUT_TOKENS,
    OPENAI_IMAGE_TOKENS,
    TOOLS_OVERHEAD_TOKENS,
    count_anthropic_tool_results,
    count_chat_tool_results,
    count_responses_tool_results,
    prepare_anthropic,
    prepare_openai_chat,
    prepare_openai_responses,
)

PROSE = (
    "Budgets exist because agents loop. A retry storm, a tool that always fails, a context "
    "that grows by one document per turn: each looks harmless in a single call and is not. "
)


def anthropic_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": PROSE}],
    }
    return {**body, **overrides}


def test_fingerprint_ignores_dict_key_order_at_every_depth() -> None:
    """The same request with its keys in another order, nested too, has the same 32-byte fingerprint."""
    a = prepare_anthropic(
        {
            "model": "m",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"a": 1, "b": 2},
        }
    )
    b = prepare_anthropic(
        {
            "metadata": {"b": 2, "a": 1},
            "messages": [{"content": "hi", "role": "user"}],
            "max_tokens": 10,
            "model": "m",
        }
    )
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 32


def test_fingerprint_ignores_streaming_and_sees_everything_else() -> None:
    """stream and stream_options do not change the fingerprint; any other difference does."""
    base = prepare_anthropic(anthropic_body()).fingerprint
    assert prepare_anthropic(anthropic_body(stream=True)).fingerprint == base
    assert (
        prepare_openai_chat(
            {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
        ).fingerprint
        == prepare_openai_chat({"model": "m", "messages": []}).fingerprint
    )
    for change in (
        {"model": "other"},
        {"max_tokens": 1023},
        {"system": "You are verbose."},
        {"temperature": 0},
    ):
        assert prepare_anthropic(anthropic_body(**change)).fingerprint != base


def test_estimate_errs_high_on_english_prose() -> None:
    """English prose is estimated above both providers' average (3.5 and 4 characters per token)."""
    text = PROSE * 50
    for prepared in (
        prepare_anthropic({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": text}]}),
        prepare_openai_chat({"model": "m", "messages": [{"role": "user", "content": text}]}),
    ):
        assert prepared.input_tokens >= math.ceil(len(text) / 3)
        assert prepared.input_tokens > len(text) / 3.5
        # …and not wildly: within 40% above the 3.5 characters-per-token average.
        assert prepared.input_tokens < 1.4 * len(text) / 3.5


def test_estimate_counts_multibyte_text_by_its_utf8_bytes() -> None:
    """CJK text (3 UTF-8 bytes a character) is estimated at about one token per character."""
    text = "预算存在是因为代理会循环。" * 100
    prepared = prepare_anthropic(
        {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": text}]}
    )
    assert len(text) <= prepared.input_tokens < len(text) + 30


def test_images_count_a_fixed_size_not_their_base64_bytes() -> None:
    """A base64 image counts as one image's tokens, however large its payload."""
    data = base64.b64encode(b"\x89PNG" + bytes(300_000)).decode()
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
    text_only = prepare_anthropic(
        anthropic_body(messages=[{"role": "user", "content": [{"type": "text", "text": "?"}]}])
    )
    with_image = prepare_anthropic(
        anthropic_body(messages=[{"role": "user", "content": [image, {"type": "text", "text": "?"}]}])
    )
    added = with_image.input_tokens - text_only.input_tokens
    assert ANTHROPIC_IMAGE_TOKENS <= added < ANTHROPIC_IMAGE_TOKENS + 50
    url = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
    chat = prepare_openai_chat({"model": "m", "messages": [{"role": "user", "content": [url]}]})
    assert OPENAI_IMAGE_TOKENS <= chat.input_tokens < OPENAI_IMAGE_TOKENS + 50


def test_images_inside_tool_results_are_found() -> None:
    """An image returned by a tool (nested in a tool_result) is counted as an image too."""
    data = base64.b64encode(bytes(90_000)).decode()
    nested = {
        "type": "tool_result",
        "tool_use_id": "t1",
        "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}],
    }
    prepared = prepare_anthropic(anthropic_body(messages=[{"role": "user", "content": [nested]}]))
    assert prepared.input_tokens < ANTHROPIC_IMAGE_TOKENS + 100


def test_text_documents_count_as_their_text() -> None:
    """A plain-text document is billed as text, so it is estimated like text (not as a fixed-size file)."""
    text = PROSE * 200
    doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": text}}
    prepared = prepare_anthropic(anthropic_body(messages=[{"role": "user", "content": [doc]}]))
    assert prepared.input_tokens >= len(text) / 3


def test_tools_add_their_definitions_and_the_tool_prompt() -> None:
    """Tool definitions are counted, plus the fixed allowance for the provider's tool-use prompt."""
    tool = {"name": "lookup", "description": "Look a thing up.", "input_schema": {"type": "object"}}
    plain = prepare_anthropic(anthropic_body())
    with_tool = prepare_anthropic(anthropic_body(tools=[tool]))
    assert with_tool.input_tokens - plain.input_tokens > TOOLS_OVERHEAD_TOKENS


def test_huge_requests_are_clamped_to_what_the_server_accepts() -> None:
    """An estimate past the server's input_tokens bound is clamped to it (token_ceiling still fires)."""
    text = "x" * (3 * MAX_INPUT_TOKENS + 300)
    prepared = prepare_openai_chat({"model": "m", "messages": [{"role": "user", "content": text}]})
    assert prepared.input_tokens == MAX_INPUT_TOKENS


def test_sdk_objects_in_messages_are_understood() -> None:
    """Content blocks passed back from a response (pydantic objects) fingerprint like the same dicts."""
    content = [
        TextBlock(type="text", text="Checking."),
        ToolUseBlock(type="tool_use", id="t1", name="f", input={}),
    ]
    first = prepare_anthropic(anthropic_body(messages=[{"role": "assistant", "content": content}]))
    again = prepare_anthropic(anthropic_body(messages=[{"role": "assistant", "content": list(content)}]))
    as_dicts = [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
    ]
    plain = prepare_anthropic(anthropic_body(messages=[{"role": "assistant", "content": as_dicts}]))
    assert first.fingerprint == again.fingerprint == plain.fingerprint


def test_one_shot_iterables_are_read_once_and_sent_as_lists() -> None:
    """A generator of messages is materialized into the body that is sent, not consumed and lost."""

    def messages() -> Iterator[dict[str, str]]:
        yield {"role": "user", "content": "hi"}

    prepared = prepare_anthropic({"model": "m", "max_tokens": 5, "messages": messages()})
    assert prepared.body["messages"] == [{"role": "user", "content": "hi"}]
    assert (
        prepared.fingerprint
        == prepare_anthropic(
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        ).fingerprint
    )


def test_output_caps() -> None:
    """The reservation's output cap: max_tokens, else OpenAI's caps (times n), else the default."""
    assert prepare_anthropic(anthropic_body(max_tokens=777)).max_output_tokens == 777
    assert (
        prepare_openai_chat({"model": "m", "messages": []}).max_output_tokens
        == DEFAULT_OPENAI_MAX_OUTPUT_TOKENS
    )
    assert prepare_openai_chat({"model": "m", "messages": [], "max_tokens": 50}).max_output_tokens == 50
    assert (
        prepare_openai_chat(
            {"model": "m", "messages": [], "max_tokens": 50, "max_completion_tokens": 80, "n": 3}
        ).max_output_tokens
        == 240
    )
    assert (
        prepare_openai_responses({"model": "m", "input": "x", "max_output_tokens": 9}).max_output_tokens == 9
    )


@pytest.mark.parametrize(
    ("messages", "count"),
    [
        ([], 0),
        ([{"role": "user", "content": "hi"}], 0),
        (
            [
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "old", "content": "x"}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "a", "content": "x"},
                        {"type": "tool_result", "tool_use_id": "b", "content": "y"},
                        {"type": "text", "text": "and?"},
                    ],
                },
            ],
            2,
        ),
        (
            [
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a"}]},
                {"role": "assistant", "content": "ok"},
            ],
            0,
        ),
    ],
)
def test_anthropic_tool_results_of_the_newest_turn(messages: list[Any], count: int) -> None:
    """Only tool_result blocks in the trailing user turn count: earlier turns were counted already."""
    assert count_anthropic_tool_results(messages) == count


def test_openai_tool_results_of_the_newest_turn() -> None:
    """Chat: trailing role=tool messages; Responses: trailing *_call_output items."""
    chat = [
        {"role": "tool", "tool_call_id": "old", "content": "x"},
        {"role": "assistant", "tool_calls": []},
        {"role": "tool", "tool_call_id": "a", "content": "x"},
        {"role": "tool", "tool_call_id": "b", "content": "y"},
    ]
    assert count_chat_tool_results(chat) == 2
    assert count_chat_tool_results([*chat, {"role": "user", "content": "next"}]) == 0
    items = [
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "a", "output": "x"},
        {"type": "custom_tool_call_output", "call_id": "b", "output": "y"},
    ]
    assert count_responses_tool_results(items) == 2
    assert count_responses_tool_results("just text") == 0
