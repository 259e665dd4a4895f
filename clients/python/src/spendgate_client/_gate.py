"""The provider-independent half of the SDK wrappers: decide before, settle after.

A :class:`Gate` belongs to one wrapper client (and the copies ``with_options``
makes of it). It holds the session id, the enforcement config checked once at
construction, the decision clients and the background settler. Each admitted
provider call gets a :class:`Ticket`, which settles exactly once: with the usage
the provider reported, or as released when the provider refused the call, or
not at all (the reservation then expires on the server at its estimate).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from spendgate.v1 import decision_pb2 as pb

from spendgate_client._client import AsyncDecisionClient, Decision, DecisionClient, FailMode, Usage
from spendgate_client._config import enforcement_config_to_proto
from spendgate_client._estimate import PreparedRequest
from spendgate_client._policy import CallJournal, JournalSettings, PatternMatcher, prompt_text
from spendgate_client._settler import Settler

__all__ = [
    "DEFAULT_DECIDE_TIMEOUT",
    "AsyncStreamProxy",
    "Gate",
    "Observer",
    "Provider",
    "Route",
    "StreamUsage",
    "SyncStreamProxy",
    "Ticket",
    "acall_gated",
    "call_gated",
]

_log = logging.getLogger("spendgate_client")

DEFAULT_DECIDE_TIMEOUT = 0.25
# The server's bound on session ids (validation.BOUNDS["session_id"]), checked up front
# so a typo fails at construction rather than on the first call.
_SESSION_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_PROJECT = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Gate:
    """Decide / settle plumbing shared by one wrapper and its copies.

    Args:
        session_id: budgets, tool counts and dedup are per session.
        enforcement_config: the user-facing rules dict (checked here, once).
        spendgate_target: ``host:port``; default env ``SPENDGATE_TARGET``, else ``127.0.0.1:50051``.
        spendgate_api_key: default env ``SPENDGATE_API_KEY``.
        fail_mode: ``"open"`` or ``"closed"`` when the service is unreachable.
        decide_timeout: deadline of each Decide, in seconds.
        spendgate_project: project whose server-side rules apply on top of the tenant's;
            default env ``SPENDGATE_PROJECT``.
        spendgate_credentials: TLS channel credentials for spendgate
            (:func:`spendgate_client.tls_credentials`); plaintext when None.
        asynchronous: also make an AsyncDecisionClient for the async wrappers' Decide.

    Raises:
        ValueError: a bad session id, config key or value type, fail mode or timeout.
    """

    def __init__(
        self,
        *,
        session_id: str,
        enforcement_config: Mapping[str, Any] | None,
        spendgate_target: str | None,
        spendgate_api_key: str | None,
        fail_mode: FailMode,
        decide_timeout: float,
        asynchronous: bool,
        spendgate_project: str | None = None,
        spendgate_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise ValueError(
                f"session_id must be 1-128 characters of [A-Za-z0-9._:@/+=-], got {session_id!r}"
            )
        self.session_id = session_id
        project = os.environ.get("SPENDGATE_PROJECT", "") if spendgate_project is None else spendgate_project
        if project and not _PROJECT.fullmatch(project):
            raise ValueError(f"spendgate_project must be 1-64 characters of [A-Za-z0-9._-], got {project!r}")
        self.project = project
        self.config: pb.EnforcementConfig | None = (
            enforcement_config_to_proto(enforcement_config) if enforcement_config is not None else None
        )
        # The blocking client decides for the sync wrappers and settles for both.
        self.client = DecisionClient(
            spendgate_target,
            timeout=decide_timeout,
            fail_mode=fail_mode,
            api_key=spendgate_api_key,
            credentials=spendgate_credentials,
        )
        self.async_client = (
            AsyncDecisionClient(
                spendgate_target,
                timeout=decide_timeout,
                fail_mode=fail_mode,
                api_key=spendgate_api_key,
                credentials=spendgate_credentials,
            )
            if asynchronous
            else None
        )
        self.settler = Settler(self.client)
        # Environment, project and key label come from SPENDGATE_ENVIRONMENT, _PROJECT, _KEY_LABEL.
        self.journal = JournalSettings(project=project, matcher=PatternMatcher(self.client))

    def decide(self, request: PreparedRequest, api_key: str | None = None) -> Ticket:
        """Ask Decide (blocking) and admit the call; ``api_key`` (the provider's) is only fingerprinted.

        Raises:
            EnforcementError: the call is blocked (the subclass names the rule).
            SpendgateUnavailable: the service is unreachable and fail_mode is closed.
        """
        decision = self.client.decide(
            self.session_id,
            request.model,
            request.input_tokens,
            request.max_output_tokens,
            request.fingerprint,
            tool_call_count=request.tool_call_count,
            enforcement_config=self.config,
            project=self.project,
        )
        return self._admit(decision, request, api_key)

    async def adecide(self, request: PreparedRequest, api_key: str | None = None) -> Ticket:
        """Ask Decide on the event loop and admit the call; raises like :meth:`decide`."""
        assert self.async_client is not None, "made without asynchronous=True"
        decision = await self.async_client.decide(
            self.session_id,
            request.model,
            request.input_tokens,
            request.max_output_tokens,
            request.fingerprint,
            tool_call_count=request.tool_call_count,
            enforcement_config=self.config,
            project=self.project,
        )
        return self._admit(decision, request, api_key)

    def _admit(self, decision: Decision, request: PreparedRequest, api_key: str | None) -> Ticket:
        decision.raise_for_block()
        if decision.shadow_rules and not decision.would_block:
            _log.info(
                "spendgate shadow mode: %s would have applied to session %s (decision %s)",
                ", ".join(decision.shadow_rules),
                self.session_id,
                decision.decision_id,
            )
        if decision.would_block:
            _log.warning(
                "spendgate shadow mode: session %s would have been blocked (%s; rules %s; decision %s)",
                self.session_id,
                decision.reason,
                ", ".join(decision.shadow_rules),
                decision.decision_id,
            )
        if decision.verdict == "allow_downgraded":
            _log.info(
                "spendgate downgraded %s to %s: %s", request.model, decision.effective_model, decision.reason
            )
        model = decision.effective_model or request.model
        if not decision.reservation_id:
            return Ticket(self, decision, model)
        matcher = self.journal.matcher
        journal = CallJournal(
            self.journal,
            request.model,
            decision.verdict,
            self.journal.fingerprint(api_key),
            # Read now: the caller may append to its messages list once the call returns.
            prompt_text(request.body) if matcher is None or matcher.wants_text() else None,
        )
        return Ticket(self, decision, model, journal)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued settles; True if all were sent (or dropped for good) in time."""
        return self.settler.flush(timeout)

    def close(self, timeout: float) -> None:
        """Flush the settles (at most ``timeout`` seconds) and close the blocking channel."""
        self.settler.close(timeout)
        self.client.close()

    async def aclose(self, flush_seconds: float) -> None:
        """Close the async channel, then flush and close like :meth:`close`, off the event loop."""
        if self.async_client is not None:
            await self.async_client.close()
        await asyncio.to_thread(self.close, flush_seconds)


class Ticket:
    """One admitted call: settles at most once, from any thread."""

    __slots__ = ("_done", "_gate", "_lock", "decision", "journal", "model")

    def __init__(
        self, gate: Gate, decision: Decision, model: str, journal: CallJournal | None = None
    ) -> None:
        self._gate = gate
        self.journal = journal
        self._lock = threading.Lock()
        # Fail-open calls reserved nothing: there is nothing to settle.
        self._done = not decision.reservation_id
        self.decision = decision
        self.model = model

    def _claim(self) -> bool:
        with self._lock:
            if self._done:
                return False
            self._done = True
            return True

    def settle(self, usage: Usage, model: str | None = None) -> None:
        """Queue the settle of ``usage`` billed on ``model`` (default: the effective model)."""
        if self._claim():
            self._gate.settler.submit(
                self._gate.session_id,
                self.decision.reservation_id,
                model or self.model,
                usage,
                journal=self.journal,
            )

    def release(self) -> None:
        """The provider refused the call before billing it: give the reservation back."""
        if self._claim():
            self._gate.settler.submit(
                self._gate.session_id,
                self.decision.reservation_id,
                self.model,
                provider_ok=False,
                journal=self.journal,
            )

    def abandon(self, why: str) -> None:
        """Leave the reservation to expire at its estimate (nothing is known about the usage)."""
        if self._claim():
            _log.info(
                "spendgate: reservation %s left to expire at its estimate: %s",
                self.decision.reservation_id,
                why,
            )


class StreamUsage:
    """Usage reported so far by a streamed call; settles what was reported when the stream ends.

    The provider modules :meth:`record` the usage each event reports. Ending —
    exhausted, closed, abandoned or failed — settles once; a stream that reported
    nothing leaves its reservation to expire.
    """

    __slots__ = ("current", "ticket")

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.current: Usage | None = None

    def record(self, usage: Usage) -> None:
        """Record the usage reported so far (cumulative: it replaces what was recorded)."""
        self.current = usage

    def end(self, why: str) -> None:
        """Settle what was reported, or leave the reservation when nothing was."""
        if self.current is not None:
            self.ticket.settle(self.current)
        else:
            self.ticket.abandon(f"stream {why} before reporting usage")


# Sees one streamed item: records its usage and says whether the caller gets it.
Observer = Callable[[Any, StreamUsage], bool]


def _share_attributes(proxy: object, inner: object) -> None:
    for name, value in vars(inner).items():
        if name != "_iterator":
            proxy.__dict__[name] = value


class SyncStreamProxy:
    """Mixin put before an SDK ``Stream`` class: the inner stream does the work, this watches.

    Every item goes through ``observe``; the end of the stream (exhausted, failed,
    closed, or the proxy garbage-collected after being abandoned) settles once.
    Attributes this class does not define come from the inner stream.
    """

    response: Any

    def __init__(self, inner: Any, usage: StreamUsage, observe: Observer) -> None:
        # Stream.__init__ is deliberately not called: there is no second HTTP response. The
        # inner stream's attributes (response, options, client) are shared, its iterator not.
        _share_attributes(self, inner)
        self._sg_inner = inner
        self._sg_usage = usage
        self._sg_observe = observe
        self.response = inner.response
        # Holds no reference to the proxy, so an abandoned stream is still collected.
        self._sg_end = weakref.finalize(self, usage.end, "ended")

    def __next__(self) -> Any:
        while True:
            try:
                item = self._sg_inner.__next__()
            except BaseException:
                # StopIteration (done) or a provider error mid-stream: settle what was reported.
                self._sg_end()
                raise
            if self._sg_observe(item, self._sg_usage):
                return item

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                yield self.__next__()
            except StopIteration:
                return

    def close(self) -> None:
        """Close the inner stream and settle what it reported."""
        try:
            self._sg_inner.close()
        finally:
            self._sg_end()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_sg_"):
            raise AttributeError(name)
        return getattr(self._sg_inner, name)


class AsyncStreamProxy:
    """The asyncio twin of :class:`SyncStreamProxy`, put before an SDK ``AsyncStream`` class."""

    response: Any

    def __init__(self, inner: Any, usage: StreamUsage, observe: Observer) -> None:
        _share_attributes(self, inner)
        self._sg_inner = inner
        self._sg_usage = usage
        self._sg_observe = observe
        self.response = inner.response
        self._sg_end = weakref.finalize(self, usage.end, "ended")

    async def __anext__(self) -> Any:
        while True:
            try:
                item = await self._sg_inner.__anext__()
            except BaseException:
                self._sg_end()
                raise
            if self._sg_observe(item, self._sg_usage):
                return item

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            try:
                yield await self.__anext__()
            except StopAsyncIteration:
                return

    async def close(self) -> None:
        """Close the inner stream and settle what it reported."""
        try:
            await self._sg_inner.close()
        finally:
            self._sg_end()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_sg_"):
            raise AttributeError(name)
        return getattr(self._sg_inner, name)


@dataclass(frozen=True, slots=True)
class Route:
    """How one provider endpoint is gated.

    Attributes:
        prepare: body → (request facts, observer for its stream items).
        usage_of: non-streamed result → usage, or None when it carries none.
    """

    prepare: Callable[[Mapping[str, Any]], tuple[PreparedRequest, Observer]]
    usage_of: Callable[[Any], Usage | None]


@dataclass(frozen=True, slots=True)
class Provider:
    """What the gated call needs to know about one SDK.

    Attributes:
        routes: POST path → route; other paths pass through untouched.
        sentinels: the SDK's "argument not given" types, dropped from bodies.
        unknown_outcome: errors after which the provider may have billed the call
            (connection failures and timeouts): the reservation is left to expire.
        stream_type / async_stream_type: the SDK's stream classes.
        stream_proxy / async_stream_proxy: their watching subclasses.
    """

    routes: Mapping[str, Route]
    sentinels: tuple[type, ...]
    unknown_outcome: tuple[type[BaseException], ...]
    stream_type: type
    async_stream_type: type
    stream_proxy: Callable[[Any, StreamUsage, Observer], Any]
    async_stream_proxy: Callable[[Any, StreamUsage, Observer], Any]


def _send_body(provider: Provider, route: Route, body: Mapping[str, Any]) -> tuple[PreparedRequest, Observer]:
    given = {k: v for k, v in body.items() if not isinstance(v, provider.sentinels)}
    return route.prepare(given)


def _finish(provider: Provider, route: Route, ticket: Ticket, result: Any, observe: Observer) -> Any:
    if isinstance(result, provider.stream_type):
        return provider.stream_proxy(result, StreamUsage(ticket), observe)
    if isinstance(result, provider.async_stream_type):
        return provider.async_stream_proxy(result, StreamUsage(ticket), observe)
    usage = route.usage_of(result)
    if usage is None:
        # A raw (with_raw_response) or background response: its usage is not read here.
        ticket.abandon("the response carried no usage")
    else:
        ticket.settle(usage)
    return result


def call_gated(
    gate: Gate,
    provider: Provider,
    route: Route,
    body: Mapping[str, Any],
    send: Callable[[dict[str, Any]], Any],
    api_key: str | None = None,
) -> Any:
    """Decide, send the body (on the effective model) with ``send``, settle or watch the stream.

    ``api_key`` is the provider key the call is made with: only its fingerprint is reported.
    """
    request, observe = _send_body(provider, route, body)
    ticket = gate.decide(request, api_key)
    try:
        result = send(_on_model(request.body, ticket.model))
    except provider.unknown_outcome:
        ticket.abandon("the provider connection failed; the call may have been billed")
        raise
    except Exception:
        ticket.release()
        raise
    return _finish(provider, route, ticket, result, observe)


async def acall_gated(
    gate: Gate,
    provider: Provider,
    route: Route,
    body: Mapping[str, Any],
    send: Callable[[dict[str, Any]], Awaitable[Any]],
    api_key: str | None = None,
) -> Any:
    """The asyncio twin of :func:`call_gated`."""
    request, observe = _send_body(provider, route, body)
    ticket = await gate.adecide(request, api_key)
    try:
        result = await send(_on_model(request.body, ticket.model))
    except provider.unknown_outcome:
        ticket.abandon("the provider connection failed; the call may have been billed")
        raise
    except Exception:
        ticket.release()
        raise
    return _finish(provider, route, ticket, result, observe)


def _on_model(body: dict[str, Any], model: str) -> dict[str, Any]:
    if body.get("model") == model or model == "unknown":
        return body
    return {**body, "model": model}
