"""JournaledOpenAI / AsyncJournaledOpenAI: the ``openai`` SDK's clients behind spendgate.

The wrappers subclass ``openai.OpenAI`` / ``openai.AsyncOpenAI`` and gate the
client's ``post`` by the declared table :data:`ROUTES` (path → how the request
is estimated, which rules apply, how its usage is read): chat completions,
responses, legacy completions, embeddings, images, audio transcriptions,
translations and speech, and batches. Follow-up requests settle what an earlier
call left open: a background response when it is retrieved (polled or streamed)
in a terminal state, a batch when its output file is fetched.

Usage is reported as genai-prices usage counts, read by genai-prices' own
extractors for the Chat, Responses, Images and Embeddings APIs; the wrapper adds
what no usage object carries (characters of a speech request, DALL·E images,
Responses web searches).

Streamed chat completions report usage only in a final chunk requested with
``stream_options={"include_usage": True}``. When the caller did not ask for it,
the wrapper asks and then hides that extra chunk (it has no choices, which code
written for streams without it, ``chunk.choices[0]``, would trip on): the
caller sees exactly the chunks it would have seen. A caller that reads the raw
HTTP stream (``with_raw_response`` / ``with_streaming_response``) gets the body
as it asked for it; without ``include_usage`` such a stream keeps its reservation.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, Final

import openai

from spendgate_client._billing import (
    prepare_openai_batch_lines,
    prepare_openai_completions,
    prepare_openai_embeddings,
    prepare_openai_image,
    prepare_openai_speech,
    prepare_openai_transcription,
)
from spendgate_client._client import Usage
from spendgate_client._estimate import PreparedRequest, prepare_openai_chat, prepare_openai_responses
from spendgate_client._gate import (
    PREFETCHED,
    AsyncStreamProxy,
    Call,
    Gate,
    Observer,
    Provider,
    Route,
    StreamState,
    SyncStreamProxy,
    json_body,
)
from spendgate_client._usage import as_plain, extract, field_of, usage_from_counts
from spendgate_client._wrapper import AsyncGatedClient, SyncGatedClient

__all__ = ["ROUTES", "AsyncJournaledOpenAI", "JournaledOpenAI"]

_RESPONSE_END_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
# The standard tier, however a response names it.
_STANDARD_TIERS = frozenset({"", "default", "auto", "standard"})


def _tier(body: Mapping[str, Any]) -> str:
    tier = str(body.get("service_tier") or "")
    return "" if tier in _STANDARD_TIERS else tier


def _read(flavor: str, **extra: Any) -> Any:
    """A reader of ``flavor`` bodies through genai-prices' extractor (None when no usage)."""

    def read(body: Mapping[str, Any], request: PreparedRequest) -> Usage | None:
        if not isinstance(body.get("usage"), Mapping):
            return None
        counts = extract("openai", flavor, body)
        return usage_from_counts(counts, _tier(body))

    return read


_read_chat = _read("chat")
_read_embeddings = _read("embeddings")


# Responses output items billed per call (their tokens are in the usage already).
_TOOL_CALL_COUNTS: Final = {
    "web_search_call": "web_searches",
    "file_search_call": "storage_searches",
    "code_interpreter_call": "code_executions",
}


def _read_responses(body: Mapping[str, Any], request: PreparedRequest) -> Usage | None:
    """Tokens by genai-prices' Responses extractor, plus the tool calls billed per call in its output."""
    if not isinstance(body.get("usage"), Mapping):
        return None
    counts = extract("openai", "responses", body)
    for item in body.get("output") or ():
        key = _TOOL_CALL_COUNTS.get(str(field_of(item, "type")))
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    return usage_from_counts(counts, _tier(body))


def _read_image(body: Mapping[str, Any], request: PreparedRequest) -> Usage | None:
    """gpt-image models report tokens; DALL·E is billed per image returned."""
    if isinstance(body.get("usage"), Mapping):
        return usage_from_counts(extract("openai", "images", body))
    data = body.get("data")
    if isinstance(data, list):
        return usage_from_counts({"requests": len(data)})
    return None


def _read_transcription(body: Mapping[str, Any], request: PreparedRequest) -> Usage | None:
    """Seconds (whisper-1) or tokens (gpt-4o transcribe) as reported; else the request's estimate.

    A ``text``, ``srt`` or ``vtt`` answer carries no usage: it is settled at the estimate,
    which is exact for WAV audio.
    """
    usage = body.get("usage")
    if isinstance(usage, Mapping) and usage.get("type") == "duration":
        return usage_from_counts({"audio_seconds": -(-int(float(usage.get("seconds") or 0) * 1000) // 1000)})
    if isinstance(usage, Mapping) and usage.get("type") == "tokens":
        # Realtime usage has the transcription's shape (input_token_details.audio_tokens …).
        return usage_from_counts(extract("openai", "realtime", {"response": {"usage": usage}}))
    if isinstance(body.get("duration"), int | float):
        return usage_from_counts({"audio_seconds": -(-int(float(body["duration"]) * 1000) // 1000)})
    return request.max_usage


def _read_request(body: Mapping[str, Any], request: PreparedRequest) -> Usage | None:
    """What the request itself says was billed (speech characters: exact)."""
    return request.max_usage


def _read_batch_results(body: Mapping[str, Any], request: PreparedRequest) -> Usage | None:
    """The output file's lines, each a response body with its usage, summed at the batch tier."""
    counts: dict[str, int] = {}
    for line in body.get("lines") or ():
        response = field_of(line, "response", "body")
        if not isinstance(response, Mapping) or not isinstance(response.get("usage"), Mapping):
            continue
        reader = _BATCH_READERS.get(str(request.body.get("endpoint") or ""), _read_chat)
        usage = reader(response, request)
        for key, value in (usage.counts if usage is not None else {}).items():
            counts[key] = counts.get(key, 0) + value
    return usage_from_counts(counts, "batch") if counts else None


def _record(state: StreamState, body: Any) -> None:
    usage = field_of(body, "usage")
    if usage is None:
        return
    state.body = {
        "model": field_of(body, "model"),
        "usage": as_plain(usage),
        "service_tier": field_of(body, "service_tier"),
    }
    state.complete = True


def _observe_chat(chunk: Any, state: StreamState) -> bool:
    _record(state, chunk)
    return True


def _observe_chat_hiding_usage(chunk: Any, state: StreamState) -> bool:
    """Like _observe_chat, but swallow the usage-only chunk the caller did not ask for."""
    _record(state, chunk)
    return field_of(chunk, "usage") is None or bool(field_of(chunk, "choices"))


def _observe_responses(event: Any, state: StreamState) -> bool:
    if field_of(event, "type") in _RESPONSE_END_EVENTS:
        response = field_of(event, "response")
        if field_of(response, "usage") is not None:
            state.body = as_plain(response)
            state.complete = True
    return True


def _observe_batch_lines(line: Any, state: StreamState) -> bool:
    state.body.setdefault("lines", []).append(line)
    state.complete = True  # a line was read; the reader sums what there is (the watcher waits for the end)
    return True


def _prepare_chat(body: Mapping[str, Any], files: Any, raw: bool) -> tuple[PreparedRequest, Observer]:
    request = prepare_openai_chat(body)
    if not request.body.get("stream"):
        return request, _observe_chat
    options = request.body.get("stream_options")
    options = dict(options) if isinstance(options, Mapping) else {}
    if options.get("include_usage") is True or raw:
        return request, _observe_chat
    gated = {**request.body, "stream_options": {**options, "include_usage": True}}
    return dataclasses.replace(request, body=gated), _observe_chat_hiding_usage


def _on_background(call: Call, content: bytes) -> bool:
    """A background response answers at once, queued: settle it when it is retrieved completed."""
    if not call.request.body.get("background"):
        return False
    body = json_body(content)
    if body.get("status") in _TERMINAL or not isinstance(body.get("id"), str):
        return False
    call.ticket.gate.wait_for(f"response:{body['id']}", call)
    return True


def _follow_response(gate: Gate, found: re.Match[str]) -> Call | None:
    """GET /responses/{id} (polled, or streamed) or its cancel: settles a waiting background response."""
    waiting = gate.waiting(f"response:{found['id']}")
    if waiting is None:
        return None
    key = f"response:{found['id']}"

    def on_answer(call: Call, content: bytes) -> bool:
        body = json_body(content)
        if body.get("status") not in _TERMINAL:
            return True  # still running: keep waiting
        gate.done_waiting(key)
        if body.get("usage") is None and body.get("status") in ("failed", "cancelled"):
            call.ticket.release()  # nothing was generated
            return True
        return False

    route = dataclasses.replace(waiting.route, on_answer=on_answer, partial="wait")
    return Call(waiting.ticket, route, waiting.request, _observe_responses, waiting.provider)


def _on_batch(call: Call, content: bytes) -> bool:
    """A batch answers at once, validating: settle it when its output file is fetched."""
    body = json_body(content)
    if isinstance(body.get("id"), str):
        call.ticket.gate.wait_for(f"batch:{body['id']}", call)
        return True
    return False


def _follow_batch(gate: Gate, found: re.Match[str]) -> Call | None:
    """GET /batches/{id}: learn its output file (fetching it settles), or release a failed batch."""
    waiting = gate.waiting(f"batch:{found['id']}")
    if waiting is None:
        return None

    def on_answer(call: Call, content: bytes) -> bool:
        body = json_body(content)
        output = body.get("output_file_id")
        if isinstance(output, str) and output:
            gate.wait_for(f"file:{output}", waiting)
        elif body.get("status") in ("failed", "cancelled", "expired"):
            gate.done_waiting(f"batch:{found['id']}")
            call.ticket.release()  # ended without a single billed request
        return True

    return Call(
        waiting.ticket,
        dataclasses.replace(waiting.route, on_answer=on_answer),
        waiting.request,
        None,
        waiting.provider,
    )


def _follow_file(gate: Gate, found: re.Match[str]) -> Call | None:
    """GET /files/{id}/content of a batch's output file: its lines settle the batch."""
    key = f"file:{found['id']}"
    waiting = gate.waiting(key)
    if waiting is None:
        return None

    route = dataclasses.replace(waiting.route, read=_read_batch_file, on_answer=None, partial="wait")
    return Call(waiting.ticket, route, waiting.request, _observe_batch_lines, waiting.provider)


def _read_batch_file(body: Any, request: PreparedRequest) -> Usage | None:
    """An output file read whole (JSON lines) or line by line."""
    if isinstance(body, Mapping) and "lines" in body:
        return _read_batch_results(body, request)
    return None


def _prepare_batch(body: Mapping[str, Any], files: Any, raw: bool) -> tuple[PreparedRequest, Observer | None]:
    content = body.get(PREFETCHED)
    given = {k: v for k, v in body.items() if k != PREFETCHED}
    lines = batch_input_lines(content) if isinstance(content, bytes) else []
    return prepare_openai_batch_lines(given, lines), None


def batch_input_lines(content: bytes) -> list[dict[str, Any]]:
    """The requests of a batch input file (JSON lines); unreadable lines are skipped."""
    lines = []
    for raw in content.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def _plain(prepare: Any) -> Any:
    def wrapped(body: Mapping[str, Any], files: Any, raw: bool) -> tuple[PreparedRequest, Observer | None]:
        return prepare(body), None

    return wrapped


def _with_files(prepare: Any) -> Any:
    def wrapped(body: Mapping[str, Any], files: Any, raw: bool) -> tuple[PreparedRequest, Observer | None]:
        return prepare(body, files), None

    return wrapped


_CHAT: Final = Route("chat.completions.create / .parse / .stream", _prepare_chat, _read_chat)
_COMPLETIONS: Final = Route(
    "completions.create (legacy)", lambda b, f, r: (prepare_openai_completions(b), _observe_chat), _read_chat
)
_EMBEDDINGS: Final = Route(
    "embeddings.create", _plain(prepare_openai_embeddings), _read_embeddings, downgrade=False
)
_IMAGES: Final = Route(
    "images.generate / .edit / .create_variation",
    _with_files(prepare_openai_image),
    _read_image,
    downgrade=False,
)
_TRANSCRIPTION: Final = Route(
    "audio.transcriptions.create / audio.translations.create",
    _with_files(prepare_openai_transcription),
    _read_transcription,
    downgrade=False,
)


def _prepare_generic(
    body: Mapping[str, Any], files: Any, raw: bool
) -> tuple[PreparedRequest, Observer | None]:
    """An endpoint the table does not know: estimated like a Responses call (16,384 tokens out)."""
    return prepare_openai_responses(body), _observe_responses


def _read_generic(body: Mapping[str, Any], request: PreparedRequest) -> Usage | None:
    """Whatever ``usage`` the answer reports, read as Chat or Responses usage; else the estimate stays."""
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        return None
    return _read_chat(body, request) if "prompt_tokens" in usage else _read_responses(body, request)


_GENERIC: Final = Route("any other POST naming a model", _prepare_generic, _read_generic, downgrade=False)
_BATCH_READERS: Final = {"/v1/embeddings": _read_embeddings, "/v1/responses": _read_responses}

# The declared table: every billable POST endpoint of the SDK and how it is gated.
ROUTES: Final[Mapping[str, Route]] = {
    "/chat/completions": _CHAT,
    "/responses": Route(
        "responses.create / .parse / .stream (background too)",
        lambda b, f, r: (prepare_openai_responses(b), _observe_responses),
        _read_responses,
        on_answer=_on_background,
    ),
    "/completions": _COMPLETIONS,
    "/embeddings": _EMBEDDINGS,
    "/images/generations": _IMAGES,
    "/images/edits": _IMAGES,
    "/images/variations": _IMAGES,
    "/audio/transcriptions": _TRANSCRIPTION,
    "/audio/translations": _TRANSCRIPTION,
    "/audio/speech": Route(
        "audio.speech.create", _plain(prepare_openai_speech), _read_request, downgrade=False, body_read=False
    ),
    "/batches": Route(
        "batches.create", _prepare_batch, _read_batch_file, downgrade=False, on_answer=_on_batch
    ),
}
# Endpoints that bill nothing by themselves: they pass through without a warning.
FREE: Final = tuple(
    re.compile(p)
    for p in (
        r"/moderations",
        r"/responses/input_tokens",  # responses.input_tokens.count
        r"/responses/[^/]+/cancel",
        r"/batches/[^/]+/cancel",
        r"/files",
        r"/uploads(/.*)?",
        r"/conversations(/.*)?",
        r"/vector_stores(/.*)?",
        r"/assistants(/.*)?",
        r"/webhook_endpoints(/.*)?",
        r"/skills(/.*)?",
        r"/containers(/.*)?",
        r"/audio/voice_consents(/.*)?",
        r"/audio/voices(/.*)?",
        r"/realtime/client_secrets",
    )
)
FOLLOW_UPS: Final = (
    ("get", re.compile(r"/responses/(?P<id>[^/?]+)"), _follow_response),
    ("post", re.compile(r"/responses/(?P<id>[^/?]+)/cancel"), _follow_response),
    ("get", re.compile(r"/batches/(?P<id>[^/?]+)"), _follow_batch),
    ("get", re.compile(r"/files/(?P<id>[^/?]+)/content"), _follow_file),
)


class _GatedStream(SyncStreamProxy, openai.Stream[Any]):
    """An ``openai.Stream`` that settles the usage its chunks or events report."""


class _AsyncGatedStream(AsyncStreamProxy, openai.AsyncStream[Any]):
    """An ``openai.AsyncStream`` that settles the usage its chunks or events report."""


_PROVIDER: Final = Provider(
    name="openai",
    routes=ROUTES,
    free=FREE,
    follow_ups=FOLLOW_UPS,
    sentinels=tuple(
        t for t in (getattr(openai, "NotGiven", None), getattr(openai, "Omit", None)) if isinstance(t, type)
    ),
    unknown_outcome=(openai.APIConnectionError,),
    stream_type=openai.Stream,
    async_stream_type=openai.AsyncStream,
    stream_proxy=_GatedStream,
    async_stream_proxy=_AsyncGatedStream,
    generic=_GENERIC,
    prefetch=lambda path, body: (
        str(body["input_file_id"]) if path == "/batches" and body.get("input_file_id") else None
    ),
)


class JournaledOpenAI(SyncGatedClient, openai.OpenAI):
    """``openai.OpenAI`` that asks spendgate before every billable call and settles after.

    Example::

        client = JournaledOpenAI(api_key="sk-…", session_id="my-session",
                                 enforcement_config={"token_ceiling": 8000})
        client.chat.completions.create(model="gpt-4o", messages=[...])

    When the request sets no output cap (``max_completion_tokens``, ``max_tokens``
    or ``max_output_tokens``) the reservation assumes 16,384 output tokens per choice.
    The spendgate arguments are those of :class:`~spendgate_client._wrapper.GatedClient`
    (``session_id``, ``enforcement_config``, ``spendgate_target``,
    ``spendgate_api_key``, ``fail_mode``, ``decide_timeout``, ``spendgate_project``,
    ``spendgate_credentials``); every other argument goes to ``openai.OpenAI``.

    Raises:
        ValueError: an unknown ``enforcement_config`` key or a wrong value type
            (naming the key), a bad ``session_id``, ``fail_mode`` or ``decide_timeout``.
    """

    _spendgate_provider = _PROVIDER


class AsyncJournaledOpenAI(AsyncGatedClient, openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` gated by spendgate; the arguments are those of JournaledOpenAI.

    Decide runs on the event loop; settles go to a background thread so that none
    is lost when the loop ends. ``await close()`` (or ``async with``) flushes them.
    """

    _spendgate_provider = _PROVIDER
