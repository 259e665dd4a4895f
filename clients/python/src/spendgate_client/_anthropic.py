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
from typing import Any, Final

import anthropic
import grpc

from spendgate_client._client import FailMode
from spendgate_client._estimate import PreparedRequest, prepare_anthropic
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

__all__ = ["AsyncJournaledAnthropic", "JournaledAnthropic"]


def _usage(usage: Any) -> UsageReport | None:
    """Anthropic's ``input_tokens`` already excludes cache reads and writes."""
    if usage is None:
        return None
    return UsageReport(
        input_tokens=getattr(usage, "input_tokens", 0) or 0,
        output_tokens=getattr(usage, "output_tokens", 0) or 0,
        cache_read_input_tokens=getattr(usage, "cache_read_input_tokens", 0) or 0,
        cache_write_input_tokens=getattr(usage, "cache_creation_input_tokens", 0) or 0,
    )


def _observe(event: Any, usage: StreamUsage) -> bool:
    """``message_start`` carries the input side; each ``message_delta`` the cumulative output."""
    kind = getattr(event, "type", None)
    if kind == "message_start":
        start = _usage(getattr(getattr(event, "message", None), "usage", None))
        if start is not None:
            usage.update(
                input_tokens=start.input_tokens,
                output_tokens=start.output_tokens,
                cache_read_input_tokens=start.cache_read_input_tokens,
                cache_write_input_tokens=start.cache_write_input_tokens,
            )
    elif kind == "message_delta":
        delta = getattr(event, "usage", None)
        if delta is not None:
            # Newer API versions repeat the input side here (None when not reported).
            usage.update(
                output_tokens=getattr(delta, "output_tokens", None),
                input_tokens=getattr(delta, "input_tokens", None),
                cache_read_input_tokens=getattr(delta, "cache_read_input_tokens", None),
                cache_write_input_tokens=getattr(delta, "cache_creation_input_tokens", None),
            )
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


class JournaledAnthropic(anthropic.Anthropic):
    """``anthropic.Anthropic`` that asks spendgate before every Messages call and settles after.

    Example::

        client = JournaledAnthropic(api_key="sk-ant-…", session_id="my-session",
                                    enforcement_config={"token_ceiling": 8000})
        client.messages.create(model=..., max_tokens=..., messages=[...])

    A blocked call raises the rule's ``EnforcementError`` subclass and never
    reaches Anthropic; a downgraded call runs on the fallback model. Usage is
    settled on a background thread; ``close()`` (or leaving a ``with`` block, or
    interpreter exit) flushes it.

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
        **kwargs: passed unchanged to ``anthropic.Anthropic`` (``api_key``,
            ``base_url``, ``timeout``, ``max_retries``, …).

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
        """The SDK's ``post``, with ``/v1/messages`` decided before and settled after."""
        route = _PROVIDER.routes.get(path)
        if route is None or not isinstance(body, Mapping):
            return super().post(path, body=body, **kwargs)
        return call_gated(
            self._spendgate_gate,
            _PROVIDER,
            route,
            body,
            lambda gated: super(JournaledAnthropic, self).post(path, body=gated, **kwargs),
            getattr(self, "api_key", None),
        )

    def copy(self, **kwargs: Any) -> JournaledAnthropic:
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


class AsyncJournaledAnthropic(anthropic.AsyncAnthropic):
    """``anthropic.AsyncAnthropic`` gated by spendgate; the arguments are those of JournaledAnthropic.

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
        """The SDK's ``post``, with ``/v1/messages`` decided before and settled after."""
        route = _PROVIDER.routes.get(path)
        if route is None or not isinstance(body, Mapping):
            return await super().post(path, body=body, **kwargs)
        return await acall_gated(
            self._spendgate_gate,
            _PROVIDER,
            route,
            body,
            lambda gated: super(AsyncJournaledAnthropic, self).post(path, body=gated, **kwargs),
            getattr(self, "api_key", None),
        )

    def copy(self, **kwargs: Any) -> AsyncJournaledAnthropic:
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
