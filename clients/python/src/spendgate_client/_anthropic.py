"""JournaledAnthropic / AsyncJournaledAnthropic: the ``anthropic`` SDK's clients behind spendgate.

The wrappers subclass ``anthropic.Anthropic`` / ``anthropic.AsyncAnthropic`` and
gate the client's ``post`` by the declared table :data:`ROUTES`: ``/v1/messages``
(so ``messages.create`` streamed or not, ``messages.stream(...)``,
``messages.parse`` and ``beta.messages``, plain, raw or streamed raw) and
``/v1/messages/batches`` (reserved at the batch tier, settled when its results
are fetched). ``count_tokens``, models, files and the other endpoints of
:data:`FREE` bill nothing and pass through.

Usage is read by genai-prices' Anthropic extractor, so 1-hour cache writes
(``cache_creation.ephemeral_1h_input_tokens``), web searches
(``server_tool_use.web_search_requests``) and the tier that ran
(``usage.service_tier``) reach the price table as they were billed.

A stream closed before its final ``message_delta`` is settled at what was
streamed: the input of ``message_start`` and, for output, the larger of the
output it reported and one token per content delta read (never
``message_start``'s placeholder alone).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Final

import anthropic

from spendgate_client._billing import prepare_anthropic_batch
from spendgate_client._client import Usage
from spendgate_client._estimate import BYTES_PER_TOKEN, PreparedRequest, prepare_anthropic
from spendgate_client._gate import (
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
from spendgate_client._usage import as_plain, extract, field_of, merge_usage, usage_from_counts
from spendgate_client._wrapper import AsyncGatedClient, SyncGatedClient

__all__ = ["FREE", "ROUTES", "AsyncJournaledAnthropic", "JournaledAnthropic"]


def _tier(usage: Any) -> str:
    tier = str(field_of(usage, "service_tier") or "")
    return "" if tier == "standard" else tier


def _read_message(body: Mapping[str, Any], request: PreparedRequest) -> Usage | None:
    """A Messages answer (or what its stream added up to) → genai-prices counts.

    A stream that ended before its final usage counts what it streamed: the output is
    at least one token per content delta read, or the streamed text's bytes / 3.
    """
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        return None
    stream = body.get("_stream")
    if isinstance(stream, Mapping) and not stream.get("complete"):
        streamed = max(
            int(stream.get("deltas") or 0), -(-int(stream.get("streamed_bytes") or 0) // BYTES_PER_TOKEN)
        )
        usage = {**usage, "output_tokens": max(int(usage.get("output_tokens") or 0), streamed)}
    counts = extract("anthropic", "default", {"model": body.get("model"), "usage": usage})
    return usage_from_counts(counts, _tier(usage))


def _observe(event: Any, state: StreamState) -> bool:
    """``message_start`` carries the input side; each ``message_delta`` the cumulative output."""
    kind = field_of(event, "type")
    if kind == "message_start":
        message = field_of(event, "message")
        state.body = {"model": field_of(message, "model"), "usage": as_plain(field_of(message, "usage"))}
    elif kind == "content_block_delta":
        state.deltas += 1
        delta = field_of(event, "delta")
        text = field_of(delta, "text") or field_of(delta, "partial_json") or field_of(delta, "thinking") or ""
        state.streamed_bytes += len(text.encode()) if isinstance(text, str) else 0
    elif kind == "message_delta":
        usage = field_of(event, "usage")
        if usage is not None:
            # Newer API versions repeat the input side here (None when not reported).
            state.body["usage"] = merge_usage(state.body.get("usage"), as_plain(usage))
            state.complete = True
    return True


def _observe_results(line: Any, state: StreamState) -> bool:
    """One line of a batch's results: a succeeded request carries its message and usage."""
    message = field_of(line, "result", "message")
    if field_of(line, "result", "type") == "succeeded" and message is not None:
        state.body.setdefault("lines", []).append(
            {"model": field_of(message, "model"), "usage": as_plain(field_of(message, "usage"))}
        )
    state.complete = True
    return True


def _read_results(body: Mapping[str, Any], request: PreparedRequest) -> Usage | None:
    """Every succeeded request of a batch, summed at the batch tier (errored ones bill nothing)."""
    counts: dict[str, int] = {}
    for line in body.get("lines") or ():
        if not isinstance(line, Mapping):
            continue
        if "result" in line:  # a results file read whole
            message = field_of(line, "result", "message")
            if field_of(line, "result", "type") != "succeeded" or not isinstance(message, Mapping):
                continue
            line = message
        usage = line.get("usage")
        if not isinstance(usage, Mapping):
            continue
        for key, value in extract(
            "anthropic", "default", {"model": line.get("model"), "usage": usage}
        ).items():
            counts[key] = counts.get(key, 0) + value
    return usage_from_counts(counts, "batch")


def _prepare(body: Mapping[str, Any], files: Any, raw: bool) -> tuple[PreparedRequest, Observer]:
    return prepare_anthropic(body), _observe


def _on_batch(call: Call, content: bytes) -> bool:
    """A batch answers at once, in progress: settle it when its results are fetched."""
    body = json_body(content)
    if isinstance(body.get("id"), str):
        call.ticket.gate.wait_for(f"batch:{body['id']}", call)
        return True
    return False


def _follow_results(gate: Gate, found: re.Match[str]) -> Call | None:
    """GET of a batch's results: its lines settle the batch once read to the end."""
    waiting = gate.waiting(f"batch:{found['id']}")
    if waiting is None:
        return None
    route = dataclasses.replace(waiting.route, read=_read_results, on_answer=None, partial="wait")
    return Call(waiting.ticket, route, waiting.request, _observe_results, waiting.provider)


def _follow_batch(gate: Gate, found: re.Match[str]) -> Call | None:
    """GET of a batch: one that ended with no succeeded request billed nothing."""
    key = f"batch:{found['id']}"
    waiting = gate.waiting(key)
    if waiting is None:
        return None

    def on_answer(call: Call, content: bytes) -> bool:
        body = json_body(content)
        counts = body.get("request_counts")
        if (
            body.get("processing_status") == "ended"
            and isinstance(counts, Mapping)
            and not counts.get("succeeded")
        ):
            gate.done_waiting(key)
            call.ticket.release()
        return True

    return Call(
        waiting.ticket,
        dataclasses.replace(waiting.route, on_answer=on_answer),
        waiting.request,
        None,
        waiting.provider,
    )


def _prepare_generic(body: Mapping[str, Any], files: Any, raw: bool) -> tuple[PreparedRequest, Observer]:
    """An endpoint the table does not know: estimated like a Messages call."""
    request = prepare_anthropic(body)
    if not request.max_output_tokens:
        request = dataclasses.replace(request, max_output_tokens=64_000)
    return request, _observe


_MESSAGES: Final = Route(
    "messages.create / .stream / .parse, beta.messages", _prepare, _read_message, partial="count"
)
# The declared table: every billable POST endpoint of the SDK and how it is gated.
ROUTES: Final[Mapping[str, Route]] = {
    "/v1/messages": _MESSAGES,
    "/v1/messages/batches": Route(
        "messages.batches.create",
        lambda body, files, raw: (prepare_anthropic_batch(body), None),
        _read_results,
        downgrade=False,
        on_answer=_on_batch,
    ),
}
# Endpoints that bill nothing by themselves: they pass through without a warning.
FREE: Final = tuple(
    re.compile(p)
    for p in (
        r"/v1/messages/count_tokens",
        r"/v1/messages/batches/[^/]+/cancel",
        r"/v1/files(/.*)?",
        r"/v1/skills(/.*)?",
        r"/v1/organizations/.*",
        r"/v1/memory_stores(/.*)?",
        r"/v1/environments(/.*)?",
        r"/v1/compliance/.*",
    )
)
FOLLOW_UPS: Final = (
    ("get", re.compile(r"/v1/messages/batches/(?P<id>[^/]+)/results"), _follow_results),
    ("get", re.compile(r"/v1/messages/batches/(?P<id>[^/]+)"), _follow_batch),
)


class _GatedStream(SyncStreamProxy, anthropic.Stream[Any]):
    """An ``anthropic.Stream`` that settles the usage its events report."""


class _AsyncGatedStream(AsyncStreamProxy, anthropic.AsyncStream[Any]):
    """An ``anthropic.AsyncStream`` that settles the usage its events report."""


_PROVIDER: Final = Provider(
    name="anthropic",
    routes=ROUTES,
    free=FREE,
    follow_ups=FOLLOW_UPS,
    sentinels=tuple(
        t
        for t in (getattr(anthropic, "NotGiven", None), getattr(anthropic, "Omit", None))
        if isinstance(t, type)
    ),
    unknown_outcome=(anthropic.APIConnectionError,),
    stream_type=anthropic.Stream,
    async_stream_type=anthropic.AsyncStream,
    stream_proxy=_GatedStream,
    async_stream_proxy=_AsyncGatedStream,
    generic=Route("any other POST naming a model", _prepare_generic, _read_message, downgrade=False),
)


class JournaledAnthropic(SyncGatedClient, anthropic.Anthropic):
    """``anthropic.Anthropic`` that asks spendgate before every billable call and settles after.

    Example::

        client = JournaledAnthropic(api_key="sk-ant-…", session_id="my-session",
                                    enforcement_config={"token_ceiling": 8000})
        client.messages.create(model=..., max_tokens=..., messages=[...])

    A blocked call raises the rule's ``EnforcementError`` subclass and never
    reaches Anthropic; a downgraded call runs on the fallback model. Usage is
    settled on a background thread; ``close()`` (or leaving a ``with`` block, or
    interpreter exit) flushes it. The spendgate arguments are those of
    :class:`~spendgate_client._wrapper.GatedClient` (``session_id``,
    ``enforcement_config``, ``spendgate_target``, ``spendgate_api_key``,
    ``fail_mode``, ``decide_timeout``, ``spendgate_project``,
    ``spendgate_credentials``); every other argument goes to ``anthropic.Anthropic``.

    Raises:
        ValueError: an unknown ``enforcement_config`` key or a wrong value type
            (naming the key), a bad ``session_id``, ``fail_mode`` or ``decide_timeout``.
    """

    _spendgate_provider = _PROVIDER


class AsyncJournaledAnthropic(AsyncGatedClient, anthropic.AsyncAnthropic):
    """``anthropic.AsyncAnthropic`` gated by spendgate; the arguments are those of JournaledAnthropic.

    Decide runs on the event loop; settles go to a background thread so that none
    is lost when the loop ends. ``await close()`` (or ``async with``) flushes them.
    """

    _spendgate_provider = _PROVIDER
