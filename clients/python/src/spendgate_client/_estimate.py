"""What the wrappers tell Decide about a request, computed locally with no network call.

For each provider request body this module computes, in one pass over the
canonical JSON of the body:

* a **fingerprint**: SHA-256 of the canonical JSON (keys sorted, no whitespace,
  UTF-8), so the same request gives the same 32 bytes whatever the dict key order.
  ``stream`` and ``stream_options`` are left out: streaming or not is the same
  request to the dedup rule.
* an **input-token estimate**: ``ceil(utf8_bytes(canonical JSON) / 3)`` plus fixed
  allowances, with media payloads (base64 images, PDFs, audio) counted at a fixed
  size instead of by their bytes. It is a budget, so it is meant to err high:

  - English prose: the providers average about 3.5 (Claude) and 4 (GPT-4o)
    characters per token, so 3 bytes per token errs high by about 15-35%, more
    for many short messages (the JSON envelope of each message is counted too).
  - Code and JSON tokenize denser (about 2.5-3 characters per token): the
    estimate is within about -15% to +20%; Claude's newer tokenizers (which use
    up to about 35% more tokens for the same text) are where it can err low.
  - CJK and other multi-byte scripts: UTF-8 spends 3 bytes per character, so
    about one token per character, close for GPT-4o and high for Korean on Claude.
  - Images count :data:`ANTHROPIC_IMAGE_TOKENS` / :data:`OPENAI_IMAGE_TOKENS`
    each (the providers' cap for a resized image; gpt-4o-mini bills images at
    many more tokens and is under-counted); documents and audio by payload size.
  - Tools add the JSON of their definitions plus a fixed allowance for the
    tool-use system prompt the provider adds (:data:`TOOLS_OVERHEAD_TOKENS`).
  - Context held by the provider (OpenAI ``previous_response_id`` or
    ``conversation``) is not visible here and not counted.

  The wrappers correct this raw estimate by what settled calls were billed
  (:mod:`spendgate_client._calibrate`); ``raw_input_tokens`` keeps the raw one.

* a **tool-call count**: the tool results carried by the newest turn (the calls
  made since the model last answered), which the ``max_tool_calls`` rule counts.

Everything here works on plain dicts and lists; SDK model objects (pydantic)
passed back inside ``messages`` are dumped as JSON the way the SDKs send them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from spendgate_client._client import Usage

__all__ = [
    "ANTHROPIC_IMAGE_TOKENS",
    "BYTES_PER_TOKEN",
    "DEFAULT_OPENAI_MAX_OUTPUT_TOKENS",
    "MAX_INPUT_TOKENS",
    "OPENAI_IMAGE_TOKENS",
    "TOOLS_OVERHEAD_TOKENS",
    "PreparedRequest",
    "canonical_json",
    "count_anthropic_tool_results",
    "count_chat_tool_results",
    "count_responses_tool_results",
    "prepare_anthropic",
    "prepare_openai_chat",
    "prepare_openai_responses",
]

BYTES_PER_TOKEN: Final = 3
# Anthropic resizes images above ~1.15 megapixels; (width * height) / 750 is then ~1,600 tokens.
ANTHROPIC_IMAGE_TOKENS: Final = 1_600
# A high-detail image on the GPT-4.1/4o families costs at most ~1,500-2,500 tokens.
OPENAI_IMAGE_TOKENS: Final = 2_500
# Documents (PDF pages are billed as text plus an image each) and files by reference.
DOCUMENT_MIN_TOKENS: Final = 3_000
# Anthropic documents a 313-346 token tool-use system prompt; OpenAI's is not published.
TOOLS_OVERHEAD_TOKENS: Final = 350
# OpenAI requests may omit the output cap; the reservation then assumes this many.
DEFAULT_OPENAI_MAX_OUTPUT_TOKENS: Final = 16_384
# The server refuses input_tokens above this (validation.MAX_INPUT_TOKENS); no real
# context window is near it, so clamping keeps Decide valid and token_ceiling still fires.
MAX_INPUT_TOKENS: Final = 10_000_000

# Keys that change how the answer is delivered, not what is asked.
_TRANSPORT_KEYS: Final = frozenset({"stream", "stream_options"})
_MEDIA_TYPES: Final = frozenset(
    {"image", "document", "image_url", "input_image", "input_audio", "file", "input_file"}
)
# Where nested content that may hold media lives (tool results, Responses messages).
_NESTED_KEYS: Final = ("content", "output")


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """The facts Decide needs about one provider request.

    Attributes:
        body: the request body to send (one-shot iterables materialized into lists).
        model: the model the caller asked for.
        input_tokens: estimated input tokens (see the module docstring for the error).
        max_output_tokens: the output cap the reservation assumes.
        fingerprint: SHA-256 of the canonical request, 32 bytes.
        tool_call_count: tool results in the newest turn.
        max_usage: the worst case in the units the endpoint bills (counts by genai-prices
            usage key) and its tier, for endpoints not billed as input and output tokens
            of a chat model; None where ``input_tokens`` x ``max_output_tokens`` says it all.
        raw_input_tokens: the byte-count estimate before the wrapper's calibration
            (:mod:`spendgate_client._calibrate`) corrected ``input_tokens``; None when
            no correction was considered.
    """

    body: dict[str, Any]
    model: str
    input_tokens: int
    max_output_tokens: int
    fingerprint: bytes
    tool_call_count: int
    max_usage: Usage | None = None
    raw_input_tokens: int | None = None


def _jsonable(value: Any) -> Any:
    """json.dumps fallback: SDK models as the SDKs send them, other containers as JSON ones."""
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return dump(mode="json", exclude_unset=True, by_alias=True)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray):
        return list(value)
    # Never consume a one-shot iterator here: the SDK still has to send it. A stable
    # placeholder keeps the fingerprint deterministic for equal requests.
    return f"<{type(value).__qualname__}>"


# check_circular off: a request body cannot be cyclic (the SDK could not send it), and the
# check costs ~15% of the encoding.
_ENCODE = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, check_circular=False, default=_jsonable
).encode


def canonical_json(body: Mapping[str, Any]) -> bytes:
    """The canonical UTF-8 JSON of ``body``: keys sorted, no whitespace, transport keys left out."""
    return _ENCODE({k: v for k, v in body.items() if k not in _TRANSPORT_KEYS}).encode()


def _materialize(body: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """A copy of ``body`` whose ``keys`` hold lists: a generator must be read once, by us."""
    out = dict(body)
    for key in keys:
        value = out.get(key)
        if (
            value is not None
            and not isinstance(value, list | tuple | str | Mapping)
            and isinstance(value, Iterable)
        ):
            out[key] = list(value)
    return out


def _media_adjustment(value: Any, image_tokens: int) -> int:
    """Tokens to add for media blocks under ``value``, minus their payload bytes already counted.

    Returns a signed number of *bytes-equivalent tokens*: the payload's JSON bytes are
    taken back out (they were counted at ``1/BYTES_PER_TOKEN`` each) and a fixed size
    per item put in.
    """
    if not isinstance(value, list | tuple):
        return 0
    adjust = 0
    for item in value:
        # Request bodies are plain dicts (TypedDicts); isinstance against the Mapping ABC
        # would cost more than the rest of this walk.
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        source = item.get("source")
        if kind == "document" and isinstance(source, dict) and source.get("type") in ("text", "content"):
            # Plain-text documents are billed as the text they carry: counted like any text.
            adjust += _media_adjustment(source.get("content"), image_tokens)
            continue
        if kind in _MEDIA_TYPES:
            payload = _payload_len(item)
            adjust -= payload // BYTES_PER_TOKEN
            if kind in ("image", "image_url", "input_image"):
                adjust += image_tokens
            elif kind == "input_audio":
                # ~10 tokens per second of audio; 1 KB of base64 is well under a second of WAV.
                adjust += max(100, payload // 1_000)
            else:
                # A decoded byte is 4/3 base64 characters; ~20 bytes of PDF per token, at least a page.
                adjust += max(DOCUMENT_MIN_TOKENS, payload * 3 // 80)
            continue
        for key in _NESTED_KEYS:
            nested = item.get(key)
            if isinstance(nested, list | tuple):
                adjust += _media_adjustment(nested, image_tokens)
    return adjust


def _payload_len(block: Mapping[str, Any]) -> int:
    """Length of the largest string inside a media block (the base64 data or the URL)."""
    best = 0
    stack: list[Any] = [block]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            best = max(best, len(node))
        elif isinstance(node, Mapping):
            stack.extend(node.values())
    return best


def _tokens(canonical: bytes, media_adjustment: int, tools: Any, tools_overhead: int) -> int:
    tokens = -(-len(canonical) // BYTES_PER_TOKEN) + media_adjustment
    if tools:
        tokens += tools_overhead
    return max(0, min(tokens, MAX_INPUT_TOKENS))


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else "unknown"


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def count_anthropic_tool_results(messages: Any) -> int:
    """``tool_result`` blocks in the newest turn: the trailing user message(s).

    The Messages API requires the results of the model's ``tool_use`` blocks to
    open the user message that follows it, so the trailing user turn holds exactly
    the calls made since the model last answered.
    """
    if not isinstance(messages, list | tuple):
        return 0
    count = 0
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            break
        content = message.get("content")
        if isinstance(content, list | tuple):
            for block in content:
                kind = block.get("type") if isinstance(block, dict) else getattr(block, "type", None)
                if kind == "tool_result":
                    count += 1
    return count


def count_chat_tool_results(messages: Any) -> int:
    """Trailing ``role: tool`` (and legacy ``role: function``) messages of a Chat Completions request.

    The API requires them to follow the assistant message that made the calls.
    """
    if not isinstance(messages, list | tuple):
        return 0
    count = 0
    for message in reversed(messages):
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        if role not in ("tool", "function"):
            break
        count += 1
    return count


def count_responses_tool_results(items: Any) -> int:
    """Trailing ``*_call_output`` items of a Responses API ``input``.

    Only the trailing run is counted: outputs of an earlier step stay in the input
    of later ones and must not be counted twice. A client that interleaves each
    call with its output is under-counted (never over-counted).
    """
    if not isinstance(items, list | tuple):
        return 0
    count = 0
    for item in reversed(items):
        kind = item.get("type") if isinstance(item, dict) else getattr(item, "type", None)
        if not isinstance(kind, str) or not kind.endswith("_call_output"):
            break
        count += 1
    return count


def prepare_anthropic(body: Mapping[str, Any]) -> PreparedRequest:
    """Facts of a Messages API request body (``/v1/messages``)."""
    body = _materialize(body, ("messages", "system", "tools"))
    canonical = canonical_json(body)
    messages = body.get("messages")
    adjust = _media_adjustment(messages, ANTHROPIC_IMAGE_TOKENS)
    return PreparedRequest(
        body=body,
        model=_model(body),
        input_tokens=_tokens(canonical, adjust, body.get("tools"), TOOLS_OVERHEAD_TOKENS),
        max_output_tokens=_positive_int(body.get("max_tokens")) or 0,
        fingerprint=hashlib.sha256(canonical).digest(),
        tool_call_count=count_anthropic_tool_results(messages),
    )


def prepare_openai_chat(body: Mapping[str, Any]) -> PreparedRequest:
    """Facts of a Chat Completions request body (``/chat/completions``).

    The output cap is ``max_completion_tokens`` (else ``max_tokens``, else
    :data:`DEFAULT_OPENAI_MAX_OUTPUT_TOKENS`) times ``n``: every choice can use it all.
    """
    body = _materialize(body, ("messages", "tools", "functions"))
    canonical = canonical_json(body)
    messages = body.get("messages")
    adjust = _media_adjustment(messages, OPENAI_IMAGE_TOKENS)
    cap = (
        _positive_int(body.get("max_completion_tokens"))
        or _positive_int(body.get("max_tokens"))
        or DEFAULT_OPENAI_MAX_OUTPUT_TOKENS
    )
    return PreparedRequest(
        body=body,
        model=_model(body),
        input_tokens=_tokens(
            canonical, adjust, body.get("tools") or body.get("functions"), TOOLS_OVERHEAD_TOKENS
        ),
        max_output_tokens=cap * (_positive_int(body.get("n")) or 1),
        fingerprint=hashlib.sha256(canonical).digest(),
        tool_call_count=count_chat_tool_results(messages),
    )


def prepare_openai_responses(body: Mapping[str, Any]) -> PreparedRequest:
    """Facts of a Responses API request body (``/responses``)."""
    body = _materialize(body, ("input", "tools"))
    canonical = canonical_json(body)
    items = body.get("input")
    adjust = _media_adjustment(items, OPENAI_IMAGE_TOKENS)
    return PreparedRequest(
        body=body,
        model=_model(body),
        input_tokens=_tokens(canonical, adjust, body.get("tools"), TOOLS_OVERHEAD_TOKENS),
        max_output_tokens=(_positive_int(body.get("max_output_tokens")) or DEFAULT_OPENAI_MAX_OUTPUT_TOKENS),
        fingerprint=hashlib.sha256(canonical).digest(),
        tool_call_count=count_responses_tool_results(items),
    )
