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

import grpc
import openai

from spendgate_client._client import FailMode
from spendgate_client._estimate import PreparedRequest, prepare_openai_chat, prepare_openai_responses
from spendgate_client._gate import (
    DEFAULT_DECIDE_TIMEOUT,
    AsyncStreamProxy,
    Gate,
    Observer,
    Provider,
    Route,
    StreamUsage,
    SyncStreamProxy,
    UsageReport,
    acall_gated,
    call_gated,
)
from spendgate_client._settler import EXIT_FLUSH_SECONDS

__all__ = ["AsyncJournaledOpenAI", "JournaledOpenAI"]

_RESPONSE_END_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _split_cached(prompt_tokens: int, details: Any, output_tokens: int) -> UsageReport:
    cached = getattr(details, "cached_tokens", 0) or 0
    return UsageReport(
        input_tokens=max(0, prompt_tokens - cached),
        output_tokens=output_tokens,
        cache_read_input_tokens=cached,
    )


def _chat_usage(usage: Any) -> UsageReport | None:
    if usage is None:
        return None
    return _split_cached(
        getattr(usage, "prompt_tokens", 0) or 0,
        getattr(usage, "prompt_tokens_details", None),
        getattr(usage, "completion_tokens", 0) or 0,
    )


def _responses_usage(usage: Any) -> UsageReport | None:
    if usage is None:
        return None
    return _split_cached(
        getattr(usage, "input_tokens", 0) or 0,
        getattr(usage, "input_tokens_details", None),
        getattr(usage, "output_tokens", 0) or 0,
    )


def _record(usage: StreamUsage, report: UsageReport | None) -> None:
    if report is not None:
        usage.update(
            input_tokens=report.input_tokens,
            output_tokens=report.output_tokens,
            cache_read_input_tokens=report.cache_read_input_tokens,
            cache_write_input_tokens=report.cache_write_input_tokens,
        )


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


class JournaledOpenAI(openai.OpenAI):
    """``openai.OpenAI`` that asks spendgate before every chat completion or response and settles after.

    Example::

        client = JournaledOpenAI(api_key="sk-…", session_id="my-session",
                                 enforcement_config={"token_ceiling": 8000})
        client.chat.completions.create(model="gpt-4o", messages=[...])

    When the request sets no output cap (``max_completion_tokens``, ``max_tokens``
    or ``max_output_tokens``) the reservation assumes 16,384 output tokens per choice.

    Args:
        session_id: the agent session; budgets, tool counts and dedup are per session.
        enforcement_config: client-side rules (``token_ceiling``, ``max_session_usd``,
            ``dedup_ttl_seconds``, ``max_tool_calls``, ``model_downgrade``,
            ``budget_mode``, ``shadow``); they can only tighten the server's.
        spendgate_target: ``host:port`` of spendgate; default env ``SPENDGATE_TARGET``,
            else ``127.0.0.1:50051``.
        spendgate_api_key: spendgate API key; default env ``SPENDGATE_API_KEY``.
        fail_mode: ``"open"`` lets calls through when spendgate is unreachable;
            ``"closed"`` raises ``SpendgateUnavailable``.
        decide_timeout: deadline of each Decide, in seconds.
        spendgate_project: project whose server-side rules apply on top of the tenant's;
            default env ``SPENDGATE_PROJECT``.
        spendgate_credentials: TLS credentials for spendgate (``tls_credentials(...)``).
        **kwargs: passed unchanged to ``openai.OpenAI`` (``api_key``, ``base_url``,
            ``timeout``, ``max_retries``, …).

    Raises:
        ValueError: an unknown ``enforcement_config`` key or a wrong value type
            (naming the key), a bad ``session_id``, ``fail_mode`` or ``decide_timeout``.
    """

    def __init__(
        self,
        *,
        session_id: str,
        enforcement_config: Mapping[str, Any] | None = None,
        spendgate_target: str | None = None,
        spendgate_api_key: str | None = None,
        fail_mode: FailMode = "open",
        decide_timeout: float = DEFAULT_DECIDE_TIMEOUT,
        spendgate_project: str | None = None,
        spendgate_credentials: grpc.ChannelCredentials | None = None,
        _spendgate_gate: Gate | None = None,
        **kwargs: Any,
    ) -> None:
        # Checked before the HTTP client exists, so a bad config leaks nothing.
        gate = _spendgate_gate or Gate(
            session_id=session_id,
            enforcement_config=enforcement_config,
            spendgate_target=spendgate_target,
            spendgate_api_key=spendgate_api_key,
            fail_mode=fail_mode,
            decide_timeout=decide_timeout,
            asynchronous=False,
            spendgate_project=spendgate_project,
            spendgate_credentials=spendgate_credentials,
        )
        try:
            super().__init__(**kwargs)
        except BaseException:
            if _spendgate_gate is None:
                gate.close(0)
            raise
        self._spendgate_gate = gate
        self._spendgate_owner = _spendgate_gate is None

    @property
    def spendgate_session_id(self) -> str:
        """The session this client's calls are counted in."""
        return self._spendgate_gate.session_id

    def spendgate_flush(self, timeout: float | None = None) -> bool:
        """Wait until every settle queued so far is sent; True if done within ``timeout`` seconds."""
        return self._spendgate_gate.flush(timeout)

    def post(self, path: str, *, body: Any = None, **kwargs: Any) -> Any:
        """The SDK's ``post``, with chat completions and responses decided before and settled after."""
        route = _PROVIDER.routes.get(path)
        if route is None or not isinstance(body, Mapping):
            return super().post(path, body=body, **kwargs)
        return call_gated(
            self._spendgate_gate,
            _PROVIDER,
            route,
            body,
            lambda gated: super(JournaledOpenAI, self).post(path, body=gated, **kwargs),
            getattr(self, "api_key", None),
        )

    def copy(self, **kwargs: Any) -> JournaledOpenAI:
        """The SDK's ``copy`` / ``with_options``; the copy shares this client's session and settler."""
        extra = {
            **kwargs.pop("_extra_kwargs", {}),
            "session_id": self._spendgate_gate.session_id,
            "_spendgate_gate": self._spendgate_gate,
        }
        return super().copy(**kwargs, _extra_kwargs=extra)

    with_options = copy

    def close(self) -> None:
        """Close the HTTP client; the client that made the session also flushes its settles."""
        try:
            super().close()
        finally:
            if self._spendgate_owner:
                self._spendgate_gate.close(EXIT_FLUSH_SECONDS)


class AsyncJournaledOpenAI(openai.AsyncOpenAI):
    """``openai.AsyncOpenAI`` gated by spendgate; the arguments are those of JournaledOpenAI.

    Decide runs on the event loop; settles go to a background thread so that none
    is lost when the loop ends. ``await close()`` (or ``async with``) flushes them.
    """

    def __init__(
        self,
        *,
        session_id: str,
        enforcement_config: Mapping[str, Any] | None = None,
        spendgate_target: str | None = None,
        spendgate_api_key: str | None = None,
        fail_mode: FailMode = "open",
        decide_timeout: float = DEFAULT_DECIDE_TIMEOUT,
        spendgate_project: str | None = None,
        spendgate_credentials: grpc.ChannelCredentials | None = None,
        _spendgate_gate: Gate | None = None,
        **kwargs: Any,
    ) -> None:
        gate = _spendgate_gate or Gate(
            session_id=session_id,
            enforcement_config=enforcement_config,
            spendgate_target=spendgate_target,
            spendgate_api_key=spendgate_api_key,
            fail_mode=fail_mode,
            decide_timeout=decide_timeout,
            asynchronous=True,
            spendgate_project=spendgate_project,
            spendgate_credentials=spendgate_credentials,
        )
        try:
            super().__init__(**kwargs)
        except BaseException:
            if _spendgate_gate is None:
                gate.close(0)
            raise
        self._spendgate_gate = gate
        self._spendgate_owner = _spendgate_gate is None

    @property
    def spendgate_session_id(self) -> str:
        """The session this client's calls are counted in."""
        return self._spendgate_gate.session_id

    def spendgate_flush(self, timeout: float | None = None) -> bool:
        """Wait (blocking) until every settle queued so far is sent; True if done in time."""
        return self._spendgate_gate.flush(timeout)

    async def post(self, path: str, *, body: Any = None, **kwargs: Any) -> Any:
        """The SDK's ``post``, with chat completions and responses decided before and settled after."""
        route = _PROVIDER.routes.get(path)
        if route is None or not isinstance(body, Mapping):
            return await super().post(path, body=body, **kwargs)
        return await acall_gated(
            self._spendgate_gate,
            _PROVIDER,
            route,
            body,
            lambda gated: super(AsyncJournaledOpenAI, self).post(path, body=gated, **kwargs),
            getattr(self, "api_key", None),
        )

    def copy(self, **kwargs: Any) -> AsyncJournaledOpenAI:
        """The SDK's ``copy`` / ``with_options``; the copy shares this client's session and settler."""
        extra = {
            **kwargs.pop("_extra_kwargs", {}),
            "session_id": self._spendgate_gate.session_id,
            "_spendgate_gate": self._spendgate_gate,
        }
        return super().copy(**kwargs, _extra_kwargs=extra)

    with_options = copy

    async def close(self) -> None:
        """Close the HTTP client; the client that made the session also flushes its settles."""
        try:
            await super().close()
        finally:
            if self._spendgate_owner:
                await self._spendgate_gate.aclose(EXIT_FLUSH_SECONDS)
