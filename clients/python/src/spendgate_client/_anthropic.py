"""JournaledAnthropic / AsyncJournaledAnthropic: the ``anthropic`` SDK's clients behind spendgate.

The wrappers subclass ``anthropic.Anthropic`` / ``anthropic.AsyncAnthropic`` and
gate the one place every Messages call goes through: the client's ``post`` to
``/v1/messages``. So ``messages.create`` (streamed or not), the
``messages.stream(...)`` helper, ``messages.parse`` and ``beta.messages`` are all
decided before and settled after; every other endpoint (``count_tokens``,
batches, models, files) passes through untouched.

Streams come back as a subclass of the SDK's ``Stream`` / ``AsyncStream`` that
reads the usage from ``message_start`` and ``message_delta`` events as they pass;
``messages.stream(...)`` builds its ``MessageStream`` on top of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final

import anthropic

from spendgate_client._client import Usage
from spendgate_client._estimate import PreparedRequest, prepare_anthropic
from spendgate_client._gate import AsyncStreamProxy, Observer, Provider, Route, StreamUsage, SyncStreamProxy
from spendgate_client._wrapper import AsyncGatedClient, SyncGatedClient

__all__ = ["AsyncJournaledAnthropic", "JournaledAnthropic"]

# Usage field → Anthropic's name for it. Anthropic's input_tokens already excludes cache reads and writes.
_FIELDS: Final = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cache_read_input_tokens": "cache_read_input_tokens",
    "cache_write_input_tokens": "cache_creation_input_tokens",
}


def _usage(reported: Any, base: Usage | None = None) -> Usage | None:
    """The usage Anthropic reported (None when it reported none).

    Fields it left out, or sent as None, keep their value in ``base``.
    """
    if reported is None:
        return None
    given = {ours: getattr(reported, theirs, None) for ours, theirs in _FIELDS.items()}
    return replace(base or Usage(), **{k: v for k, v in given.items() if v is not None})


def _observe(event: Any, usage: StreamUsage) -> bool:
    """``message_start`` carries the input side; each ``message_delta`` the cumulative output."""
    kind = getattr(event, "type", None)
    reported = None
    if kind == "message_start":
        reported = _usage(getattr(getattr(event, "message", None), "usage", None))
    elif kind == "message_delta":
        # Newer API versions repeat the input side here (None when not reported).
        reported = _usage(getattr(event, "usage", None), usage.current)
    if reported is not None:
        usage.record(reported)
    return True


def _prepare(body: Mapping[str, Any]) -> tuple[PreparedRequest, Observer]:
    return prepare_anthropic(body), _observe


class _GatedStream(SyncStreamProxy, anthropic.Stream[Any]):
    """An ``anthropic.Stream`` that settles the usage its events report."""


class _AsyncGatedStream(AsyncStreamProxy, anthropic.AsyncStream[Any]):
    """An ``anthropic.AsyncStream`` that settles the usage its events report."""


_MESSAGES = Route(prepare=_prepare, usage_of=lambda result: _usage(getattr(result, "usage", None)))
_PROVIDER: Final = Provider(
    # Older SDKs send beta.messages to the path with its query string.
    routes={"/v1/messages": _MESSAGES, "/v1/messages?beta=true": _MESSAGES},
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
)


class JournaledAnthropic(SyncGatedClient, anthropic.Anthropic):
    """``anthropic.Anthropic`` that asks spendgate before every Messages call and settles after.

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
