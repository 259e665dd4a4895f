"""The one mixin behind the four SDK wrappers: put before an SDK client class, it gates its requests.

``JournaledAnthropic`` is ``SyncGatedClient`` + ``anthropic.Anthropic`` + the
Anthropic :class:`~spendgate_client._gate.Provider` table; the other three are
built the same way. Everything a wrapper does beyond the SDK lives here, once:
the constructor arguments, ``spendgate_session_id``, ``spendgate_flush``,
``copy`` / ``with_options`` sharing the session, flushing settles on ``close``,
and the three SDK methods it hooks:

* ``post``: a path of the provider's table is decided before and settled after;
  a path known to bill nothing passes through; an unknown path is guarded with a
  conservative estimate when its body names a model, else passed through, and
  either way a warning is logged the first time it is seen.
* ``get`` (and ``post`` to a cancel path): a request that completes an earlier
  call (a background response retrieved, a batch's results fetched) settles it.
* ``_process_response``: the moment a 2xx answer arrives, before the SDK parses
  it, its usage is read from the HTTP body (or the body is watched as it streams).
  So raw and streaming responses settle like plain ones, and a call the SDK
  fails after a 2xx (``LengthFinishReasonError``) still counts what it billed.

The sync and async halves differ only in awaiting the SDK.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self, cast
from urllib.parse import urlsplit

import grpc

from spendgate_client._client import FailMode
from spendgate_client._gate import (
    DEFAULT_DECIDE_TIMEOUT,
    PREFETCHED,
    Call,
    Gate,
    Provider,
    Route,
    acall_gated,
    afollow_up,
    answered,
    call_gated,
    follow_up,
    raw_response_requested,
)
from spendgate_client._settler import EXIT_FLUSH_SECONDS

__all__ = ["AsyncGatedClient", "GatedClient", "SyncGatedClient"]


def _bare(path: str) -> str:
    """The path without its query string or scheme and host (results URLs are absolute)."""
    return urlsplit(path).path if "://" in path else path.split("?", 1)[0]


class GatedClient:
    """What every wrapper adds to its SDK client class (which must follow it in the bases).

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
        **kwargs: passed unchanged to the SDK client (``api_key``, ``base_url``,
            ``timeout``, ``max_retries``, …).

    Raises:
        ValueError: an unknown ``enforcement_config`` key or a wrong value type
            (naming the key), a bad ``session_id``, ``fail_mode`` or ``decide_timeout``.
    """

    # Set by each wrapper: the SDK's declared table of endpoints and its stream classes.
    _spendgate_provider: ClassVar[Provider]
    # Set by the sync and async halves: whether Decide runs on an event loop.
    _spendgate_asynchronous: ClassVar[bool]

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
            asynchronous=self._spendgate_asynchronous,
            spendgate_project=spendgate_project,
            spendgate_credentials=spendgate_credentials,
        )
        try:
            cast(Any, super()).__init__(**kwargs)
        except BaseException:
            if _spendgate_gate is None:
                gate.close(0)
            raise
        self._spendgate_gate = gate
        # Copies made by with_options share the gate; only the client that made it closes it.
        self._spendgate_owner = _spendgate_gate is None

    @property
    def spendgate_session_id(self) -> str:
        """The session this client's calls are counted in."""
        return self._spendgate_gate.session_id

    def spendgate_flush(self, timeout: float | None = None) -> bool:
        """Wait (blocking) until every settle queued so far is sent; True if done within ``timeout`` s."""
        return self._spendgate_gate.flush(timeout)

    def copy(self, **kwargs: Any) -> Self:
        """The SDK's ``copy`` / ``with_options``; the copy shares this client's session and settler."""
        extra = {
            **kwargs.pop("_extra_kwargs", {}),
            "session_id": self._spendgate_gate.session_id,
            "_spendgate_gate": self._spendgate_gate,
        }
        # The SDK class after this mixin in the bases defines copy (mypy cannot see it).
        return cast(Self, cast(Any, super()).copy(**kwargs, _extra_kwargs=extra))

    with_options = copy

    def _spendgate_follow_up(self, method: str, path: str) -> Call | None:
        return self._spendgate_provider.follow_up(self._spendgate_gate, method, _bare(path))

    def _spendgate_route(self, path: str, body: Any) -> Route | None:
        """The route gating a POST to ``path``, or None to pass it through untouched."""
        provider = self._spendgate_provider
        bare = _bare(path)
        route = provider.routes.get(bare)
        if route is not None:
            return route if isinstance(body, Mapping) else None
        if provider.is_free(bare):
            return None
        gate = self._spendgate_gate
        if isinstance(body, Mapping) and isinstance(body.get("model"), str) and provider.generic is not None:
            gate.warn_once(
                bare,
                "spendgate: %s POST %s is not in spendgate's table; guarded with a conservative estimate",
                provider.name,
                bare,
            )
            return provider.generic
        gate.warn_once(
            bare,
            "spendgate: %s POST %s is not in spendgate's table and names no model; not guarded",
            provider.name,
            bare,
        )
        return None

    def _spendgate_prefetch(self, path: str, body: Any) -> str | None:
        prefetch = self._spendgate_provider.prefetch
        return prefetch(_bare(path), body) if prefetch is not None and isinstance(body, Mapping) else None


class SyncGatedClient(GatedClient):
    """The mixin for a blocking SDK client (``anthropic.Anthropic``, ``openai.OpenAI``)."""

    _spendgate_asynchronous = False

    def post(self, path: str, *, body: Any = None, **kwargs: Any) -> Any:
        """The SDK's ``post``, decided before and settled after when ``path`` is billable."""
        sdk_post = cast(Any, super()).post
        waiting = self._spendgate_follow_up("post", path)
        if waiting is not None:
            return follow_up(waiting, lambda: sdk_post(path, body=body, **kwargs))
        route = self._spendgate_route(path, body)
        if route is None:
            return sdk_post(path, body=body, **kwargs)
        file_id = self._spendgate_prefetch(path, body)
        if file_id is not None:
            body = {**body, PREFETCHED: cast(Any, self).files.content(file_id).content}
        return call_gated(
            self._spendgate_gate,
            self._spendgate_provider,
            route,
            body,
            lambda gated: sdk_post(path, body=gated, **kwargs),
            getattr(self, "api_key", None),
            kwargs.get("files"),
            raw_response_requested(kwargs.get("options")),
        )

    def get(self, path: str, **kwargs: Any) -> Any:
        """The SDK's ``get``; a request that completes an earlier call settles it."""
        sdk_get = cast(Any, super()).get
        waiting = self._spendgate_follow_up("get", path)
        if waiting is None:
            return sdk_get(path, **kwargs)
        return follow_up(waiting, lambda: sdk_get(path, **kwargs))

    def _process_response(self, **kwargs: Any) -> Any:
        answered(kwargs["response"], kwargs.get("stream", False), kwargs.get("stream_cls"))
        return cast(Any, super())._process_response(**kwargs)

    def close(self) -> None:
        """Close the HTTP client; the client that made the session also flushes its settles."""
        try:
            cast(Any, super()).close()
        finally:
            if self._spendgate_owner:
                self._spendgate_gate.close(EXIT_FLUSH_SECONDS)


class AsyncGatedClient(GatedClient):
    """The mixin for an asyncio SDK client: Decide runs on the event loop.

    Settles go to a background thread so that none is lost when the loop ends;
    ``await close()`` (or ``async with``) flushes them.
    """

    _spendgate_asynchronous = True

    async def post(self, path: str, *, body: Any = None, **kwargs: Any) -> Any:
        """The SDK's ``post``, decided before and settled after when ``path`` is billable."""
        sdk_post = cast(Any, super()).post
        waiting = self._spendgate_follow_up("post", path)
        if waiting is not None:
            return await afollow_up(waiting, lambda: sdk_post(path, body=body, **kwargs))
        route = self._spendgate_route(path, body)
        if route is None:
            return await sdk_post(path, body=body, **kwargs)
        file_id = self._spendgate_prefetch(path, body)
        if file_id is not None:
            body = {**body, PREFETCHED: (await cast(Any, self).files.content(file_id)).content}
        return await acall_gated(
            self._spendgate_gate,
            self._spendgate_provider,
            route,
            body,
            lambda gated: sdk_post(path, body=gated, **kwargs),
            getattr(self, "api_key", None),
            kwargs.get("files"),
            raw_response_requested(kwargs.get("options")),
        )

    async def get(self, path: str, **kwargs: Any) -> Any:
        """The SDK's ``get``; a request that completes an earlier call settles it."""
        sdk_get = cast(Any, super()).get
        waiting = self._spendgate_follow_up("get", path)
        if waiting is None:
            return await sdk_get(path, **kwargs)
        return await afollow_up(waiting, lambda: sdk_get(path, **kwargs))

    async def _process_response(self, **kwargs: Any) -> Any:
        answered(kwargs["response"], kwargs.get("stream", False), kwargs.get("stream_cls"))
        return await cast(Any, super())._process_response(**kwargs)

    async def close(self) -> None:
        """Close the HTTP client; the client that made the session also flushes its settles."""
        try:
            await cast(Any, super()).close()
        finally:
            if self._spendgate_owner:
                await self._spendgate_gate.aclose(EXIT_FLUSH_SECONDS)
