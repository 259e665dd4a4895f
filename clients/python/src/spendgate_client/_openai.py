"""JournaledOpenAI / AsyncJournaledOpenAI: the ``openai`` SDK's clients behind spendgate.

The wrappers subclass ``openai.OpenAI`` / ``openai.AsyncOpenAI`` and gate the
client's ``post`` to ``/chat/completions`` and ``/responses``: so
``chat.completions.create`` (streamed or not), ``chat.completions.parse`` and
``.stream(...)``, and ``responses.create`` / ``.parse`` / ``.stream(...)`` are
decided before and settled after. Other endpoints pass through untouched.

Usage: OpenAI's ``prompt_tokens`` includes cached tokens; spendgate's
``input_tokens`` does not, so ``prompt_tokens_details.cached_tokens`` is
subtracted and settled as cache reads.

Streamed chat completions report usage only in a final chunk requested with
``stream_options={"include_usage": True}``. When the caller did not ask for it,
the wrapper asks and then hides that extra chunk (it has no choices, which code
written for streams without it, ``chunk.choices[0]``, would trip on): the
caller sees exactly the chunks it would have seen. A caller that asked for it
gets it as usual. Responses streams carry usage in ``response.completed``.

Not settled (the reservation expires at its estimate): ``background=True``
responses and ``with_raw_response`` calls, whose usage is not read here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final

import openai

from spendgate_client._client import Usage
from spendgate_client._estimate import PreparedRequest, prepare_openai_chat, prepare_openai_responses
from spendgate_client._gate import AsyncStreamProxy, Observer, Provider, Route, StreamUsage, SyncStreamProxy
from spendgate_client._wrapper import AsyncGatedClient, SyncGatedClient

__all__ = ["AsyncJournaledOpenAI", "JournaledOpenAI"]

_RESPONSE_END_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _split_cached(prompt_tokens: int, details: Any, output_tokens: int) -> Usage:
    cached = getattr(details, "cached_tokens", 0) or 0
    return Usage(
        input_tokens=max(0, prompt_tokens - cached),
        output_tokens=output_tokens,
        cache_read_input_tokens=cached,
    )


def _chat_usage(usage: Any) -> Usage | None:
    if usage is None:
        return None
    return _split_cached(
        getattr(usage, "prompt_tokens", 0) or 0,
        getattr(usage, "prompt_tokens_details", None),
        getattr(usage, "completion_tokens", 0) or 0,
    )


def _responses_usage(usage: Any) -> Usage | None:
    if usage is None:
        return None
    return _split_cached(
        getattr(usage, "input_tokens", 0) or 0,
        getattr(usage, "input_tokens_details", None),
        getattr(usage, "output_tokens", 0) or 0,
    )


def _record(usage: StreamUsage, report: Usage | None) -> None:
    if report is not None:
        usage.record(report)


def _observe_chat(chunk: Any, usage: StreamUsage) -> bool:
    _record(usage, _chat_usage(getattr(chunk, "usage", None)))
    return True


def _observe_chat_hiding_usage(chunk: Any, usage: StreamUsage) -> bool:
    """Like _observe_chat, but swallow the usage-only chunk the caller did not ask for."""
    report = _chat_usage(getattr(chunk, "usage", None))
    _record(usage, report)
    return report is None or bool(getattr(chunk, "choices", None))


def _observe_responses(event: Any, usage: StreamUsage) -> bool:
    if getattr(event, "type", None) in _RESPONSE_END_EVENTS:
        _record(usage, _responses_usage(getattr(getattr(event, "response", None), "usage", None)))
    return True


def _prepare_chat(body: Mapping[str, Any]) -> tuple[PreparedRequest, Observer]:
    request = prepare_openai_chat(body)
    if not request.body.get("stream"):
        return request, _observe_chat
    options = request.body.get("stream_options")
    options = dict(options) if isinstance(options, Mapping) else {}
    if options.get("include_usage") is True:
        return request, _observe_chat
    gated = {**request.body, "stream_options": {**options, "include_usage": True}}
    return dataclasses.replace(request, body=gated), _observe_chat_hiding_usage


def _prepare_responses(body: Mapping[str, Any]) -> tuple[PreparedRequest, Observer]:
    return prepare_openai_responses(body), _observe_responses


class _GatedStream(SyncStreamProxy, openai.Stream[Any]):
    """An ``openai.Stream`` that settles the usage its chunks or events report."""


class _AsyncGatedStream(AsyncStreamProxy, openai.AsyncStream[Any]):
    """An ``openai.AsyncStream`` that settles the usage its chunks or events report."""


_PROVIDER: Final = Provider(
    routes={
        "/chat/completions": Route(_prepare_chat, lambda r: _chat_usage(getattr(r, "usage", None))),
        "/responses": Route(_prepare_responses, lambda r: _responses_usage(getattr(r, "usage", None))),
    },
    sentinels=tuple(
        t for t in (getattr(openai, "NotGiven", None), getattr(openai, "Omit", None)) if isinstance(t, type)
    ),
    unknown_outcome=(openai.APIConnectionError,),
    stream_type=openai.Stream,
    async_stream_type=openai.AsyncStream,
    stream_proxy=_GatedStream,
    async_stream_proxy=_AsyncGatedStream,
)


class JournaledOpenAI(SyncGatedClient, openai.OpenAI):
    """``openai.OpenAI`` that asks spendgate before every chat completion or response and settles after.

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
