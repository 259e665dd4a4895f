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
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import grpc
from spendgate.v1 import decision_pb2 as pb

from spendgate_client._calibrate import Calibrator, model_family, reported_input_tokens
from spendgate_client._client import AsyncDecisionClient, Decision, DecisionClient, FailMode, Usage
from spendgate_client._config import enforcement_config_to_proto
from spendgate_client._estimate import MAX_INPUT_TOKENS, PreparedRequest
from spendgate_client._policy import CallJournal, JournalSettings, PatternMatcher, prompt_text
from spendgate_client._settler import Settler
from spendgate_client._usage import Reading

__all__ = [
    "DEFAULT_DECIDE_TIMEOUT",
    "PREFETCHED",
    "AsyncStreamProxy",
    "Call",
    "Gate",
    "Observer",
    "Provider",
    "Route",
    "StreamState",
    "SyncStreamProxy",
    "Ticket",
    "acall_gated",
    "afollow_up",
    "answered",
    "call_gated",
    "follow_up",
    "json_body",
    "raw_response_requested",
]

_log = logging.getLogger("spendgate_client")

DEFAULT_DECIDE_TIMEOUT = 0.25
# The server's bound on session ids (validation.BOUNDS["session_id"]), checked up front
# so a typo fails at construction rather than on the first call.
_SESSION_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_PROJECT = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Calls waiting on a later request to settle (background responses, batches) per gate; the
# oldest beyond this are left to expire at their estimate.
MAX_PENDING_CALLS = 10_000


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
        if self.async_client is not None:
            self.async_client.carry_settles(self.settler.carrier)
        # Environment, project and key label come from SPENDGATE_ENVIRONMENT, _PROJECT, _KEY_LABEL.
        self.journal = JournalSettings(project=project, matcher=PatternMatcher(self.client))
        # Calls settled by a later request, by the provider's id (response, batch, file).
        self._pending: OrderedDict[str, Call] = OrderedDict()
        self._pending_lock = threading.Lock()
        self._warned_paths: set[str] = set()
        # Shared by the copies with_options makes; learns from this client's settled calls.
        self.calibrator = Calibrator()

    def calibrated(self, route: Route, request: PreparedRequest) -> PreparedRequest:
        """``request`` with its input-token estimate corrected by what earlier calls were billed.

        Only chat-shaped requests (no ``max_usage``) are corrected; the raw estimate is kept
        in ``raw_input_tokens`` so the settle can learn from it.
        """
        if request.max_usage is not None or request.raw_input_tokens is not None:
            return request
        key = f"{route.surface}|{model_family(request.model)}"
        corrected = min(MAX_INPUT_TOKENS, self.calibrator.correct(key, request.input_tokens))
        return replace(request, input_tokens=corrected, raw_input_tokens=request.input_tokens)

    def learn(
        self, route: Route, request: PreparedRequest, model: str, body: Mapping[str, Any], usage: Usage | None
    ) -> None:
        """Teach the calibrator what ``request`` run on ``model`` was billed (on the settle thread)."""
        if usage is None or request.raw_input_tokens is None:
            return
        stream = body.get("_stream")
        if stream is not None and not getattr(stream, "complete", False):
            return  # a stream closed early may report an input the wrapper estimated itself
        reported = reported_input_tokens(
            usage.counts, usage.input_tokens, usage.cache_read_input_tokens, usage.cache_write_input_tokens
        )
        self.calibrator.observe(f"{route.surface}|{model_family(model)}", request.raw_input_tokens, reported)

    def wait_for(self, key: str, call: Call) -> None:
        """Keep ``call`` until a later request about ``key`` settles it."""
        with self._pending_lock:
            self._pending[key] = call
            while len(self._pending) > MAX_PENDING_CALLS:
                _, oldest = self._pending.popitem(last=False)
                oldest.ticket.abandon("too many calls waiting on a later request")

    def waiting(self, key: str) -> Call | None:
        """The call waiting on ``key``, if it is still unsettled."""
        with self._pending_lock:
            call = self._pending.get(key)
            if call is not None and call.ticket.done:
                del self._pending[key]
                return None
            return call

    def done_waiting(self, key: str) -> None:
        """Forget the call waiting on ``key``."""
        with self._pending_lock:
            self._pending.pop(key, None)

    def warn_once(self, path: str, message: str, *args: Any) -> None:
        """Log ``message`` the first time this gate sees ``path``."""
        with self._pending_lock:
            if path in self._warned_paths or len(self._warned_paths) > 1_000:
                return
            self._warned_paths.add(path)
        _log.warning(message, *args)

    def decide(
        self, request: PreparedRequest, api_key: str | None = None, *, downgrade: bool = True
    ) -> Ticket:
        """Ask Decide (blocking) and admit the call; ``api_key`` (the provider's) is only fingerprinted.

        ``downgrade=False``: the call runs on its own model even if the decision names a
        fallback (an embedding or audio call cannot run on a chat model).

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
            max_usage=request.max_usage,
        )
        return self._admit(decision, request, api_key, downgrade)

    async def adecide(
        self, request: PreparedRequest, api_key: str | None = None, *, downgrade: bool = True
    ) -> Ticket:
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
            max_usage=request.max_usage,
        )
        return self._admit(decision, request, api_key, downgrade)

    def _admit(
        self, decision: Decision, request: PreparedRequest, api_key: str | None, downgrade: bool = True
    ) -> Ticket:
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
        model = decision.effective_model or request.model
        if decision.verdict == "allow_downgraded" and not downgrade:
            _log.info(
                "spendgate: %s stays on %s (model_downgrade applies to chat models only)",
                request.model,
                request.model,
            )
            model = request.model
        elif decision.verdict == "allow_downgraded":
            _log.info(
                "spendgate downgraded %s to %s: %s", request.model, decision.effective_model, decision.reason
            )
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

    @property
    def gate(self) -> Gate:
        """The gate that admitted the call."""
        return self._gate

    @property
    def done(self) -> bool:
        """Settled, released or abandoned already (or nothing was reserved)."""
        return self._done

    def settle(self, usage: Usage | Reading, model: str | None = None) -> None:
        """Queue the settle of ``usage`` billed on ``model`` (default: the effective model).

        A :class:`Reading` is read on the settle thread; when it finds no usage the
        reservation is left to expire at its estimate.
        """
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


class StreamState:
    """What a streamed call reported so far, gathered as a response body for the route's reader.

    The provider modules' observers fill ``body`` (``model``, ``usage``, …) from the
    events as they pass; ``complete`` turns True at the event that ends the answer
    (Anthropic's ``message_delta``, OpenAI's usage chunk or ``response.completed``).
    Ending — exhausted, closed, abandoned or failed — settles once through the route.
    """

    __slots__ = ("body", "call", "complete", "deltas", "streamed_bytes")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.body: dict[str, Any] = {}
        self.complete = False
        # Content deltas seen, and their text's UTF-8 bytes: what a stream closed early did generate.
        self.deltas = 0
        self.streamed_bytes = 0

    def end(self, why: str) -> None:
        """Settle what was reported; how a stream that ended early counts is the route's choice."""
        call = self.call
        if not self.complete and call.route.partial == "wait":
            return  # e.g. batch results read halfway: a later full read settles them
        if not self.body and not self.deltas:
            call.ticket.abandon(f"stream {why} before reporting usage")
            return
        if not self.complete and call.route.partial == "keep":
            call.ticket.abandon(f"stream {why} before its final usage")
            return
        stream = {"complete": self.complete, "deltas": self.deltas, "streamed_bytes": self.streamed_bytes}
        call.settle_body({**self.body, "_stream": stream})


# Sees one streamed item (an SDK event object, or the same event as a parsed dict):
# records what it reports and says whether the caller gets it.
Observer = Callable[[Any, StreamState], bool]


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

    def __init__(self, inner: Any, state: StreamState, observe: Observer) -> None:
        # Stream.__init__ is deliberately not called: there is no second HTTP response. The
        # inner stream's attributes (response, options, client) are shared, its iterator not.
        _share_attributes(self, inner)
        self._sg_inner = inner
        self._sg_state = state
        self._sg_observe = observe
        self.response = inner.response
        # Holds no reference to the proxy, so an abandoned stream is still collected.
        self._sg_end = weakref.finalize(self, state.end, "ended")

    def __next__(self) -> Any:
        while True:
            try:
                item = self._sg_inner.__next__()
            except BaseException:
                # StopIteration (done) or a provider error mid-stream: settle what was reported.
                self._sg_end()
                raise
            if self._sg_observe(item, self._sg_state):
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

    def __init__(self, inner: Any, state: StreamState, observe: Observer) -> None:
        _share_attributes(self, inner)
        self._sg_inner = inner
        self._sg_state = state
        self._sg_observe = observe
        self.response = inner.response
        self._sg_end = weakref.finalize(self, state.end, "ended")

    async def __anext__(self) -> Any:
        while True:
            try:
                item = await self._sg_inner.__anext__()
            except BaseException:
                self._sg_end()
                raise
            if self._sg_observe(item, self._sg_state):
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


# Reads a response body (a parsed JSON dict, or the body a stream's events add up to)
# into what was billed; runs on the settle thread. None: the body reports no usage.
Reader = Callable[[Mapping[str, Any], PreparedRequest], Usage | None]


@dataclass(frozen=True, slots=True)
class Route:
    """One row of a provider's declared table: how one endpoint is gated.

    Attributes:
        surface: the SDK methods that reach this endpoint (for logs and the docs).
        prepare: (body, files, raw) → the request's facts (estimate, fingerprint,
            counts of its worst case) and the observer of its stream items. ``files``
            are the SDK's multipart files; ``raw`` says the caller reads the HTTP
            response itself (``with_raw_response`` / ``with_streaming_response``), so
            the body must be sent as given.
        read: response body → usage (on the settle thread).
        downgrade: whether ``model_downgrade`` may run the call on the fallback model
            (only where any model of the family serves the same request).
        body_read: the reader needs the response body (False: it counts from the
            request alone, e.g. characters of a speech request, so the audio is not kept).
        on_answer: called with the body of a non-streamed answer before it is read
            (:func:`json_body` parses it); returns True when it took charge of the ticket (a background
            response that will be settled when it completes).
        partial: how a stream that ended before its final usage counts: ``"count"``
            what was streamed (the reader sees ``_stream`` in the body), ``"keep"`` the
            reservation (it expires at its estimate), or ``"wait"`` for a later read.
    """

    surface: str
    prepare: Callable[[Mapping[str, Any], Any, bool], tuple[PreparedRequest, Observer | None]]
    read: Reader
    downgrade: bool = True
    body_read: bool = True
    on_answer: Callable[[Call, bytes], bool] | None = None
    partial: str = "keep"


# A follow-up: a later request about an earlier call (a background response retrieved,
# a batch's results fetched). Given the gate and the path's match, the call it settles.
FollowUp = Callable[["Gate", "re.Match[str]"], "Call | None"]


@dataclass(frozen=True, slots=True)
class Provider:
    """What the gated calls need to know about one SDK: its declared table of endpoints.

    Attributes:
        name: "anthropic" or "openai", for logs.
        routes: POST path → route, for every billable endpoint.
        free: POST paths (regexes, full match) known not to bill (``count_tokens``,
            moderations, file uploads, cancels…): they pass through without a warning.
        follow_ups: (method, path regex, handler): requests that complete an earlier
            call (a background response retrieved or polled, batch results fetched).
        sentinels: the SDK's "argument not given" types, dropped from bodies.
        unknown_outcome: errors after which the provider may have billed the call
            (connection failures and timeouts): the reservation is left to expire.
        stream_type / async_stream_type: the SDK's stream classes.
        stream_proxy / async_stream_proxy: their watching subclasses.
        generic: the route of a POST path the table does not know whose body names a
            ``model``: guarded with a conservative estimate (a warning is logged once).
        prefetch: (path, body) → id of a file whose content the request's estimate
            needs (an OpenAI batch's input file), read through the SDK before Decide.
    """

    name: str
    routes: Mapping[str, Route]
    free: tuple[re.Pattern[str], ...]
    follow_ups: tuple[tuple[str, re.Pattern[str], FollowUp], ...]
    sentinels: tuple[type, ...]
    unknown_outcome: tuple[type[BaseException], ...]
    stream_type: type
    async_stream_type: type
    stream_proxy: Callable[[Any, StreamState, Observer], Any]
    async_stream_proxy: Callable[[Any, StreamState, Observer], Any]
    generic: Route | None = None
    prefetch: Callable[[str, Mapping[str, Any]], str | None] | None = None

    def is_free(self, path: str) -> bool:
        """Whether ``path`` is a known endpoint that bills nothing."""
        return any(p.fullmatch(path) for p in self.free)

    def follow_up(self, gate: Gate, method: str, path: str) -> Call | None:
        """The earlier call a request to ``path`` completes, if it is one this gate is waiting on."""
        for want, pattern, handler in self.follow_ups:
            found = pattern.fullmatch(path) if want == method else None
            if found is not None:
                return handler(gate, found)
        return None


_RAW_RESPONSE_HEADER = "X-Stainless-Raw-Response"
# The body key under which a route's prepare finds the content its Provider.prefetch named.
PREFETCHED = "_spendgate_prefetched"


def raw_response_requested(options: Any) -> bool:
    """Whether the SDK call asked for the HTTP response itself (``with_raw_response`` …)."""
    headers = options.get("headers") if isinstance(options, Mapping) else None
    return isinstance(headers, Mapping) and any(str(k).lower() == "x-stainless-raw-response" for k in headers)


class Call:
    """One gated request in flight: its ticket, route and request, and what its answer was.

    A call that got a 2xx answer is billed whatever happens next (the SDK may still
    raise while post-processing it, e.g. ``LengthFinishReasonError``): its usage is
    read from the HTTP body as soon as the body has arrived, before the SDK parses it.
    """

    __slots__ = ("answered", "observe", "provider", "request", "route", "stream_mode", "ticket")

    def __init__(
        self,
        ticket: Ticket,
        route: Route,
        request: PreparedRequest,
        observe: Observer | None,
        provider: Provider,
    ) -> None:
        self.ticket = ticket
        self.route = route
        self.request = request
        self.observe = observe
        self.provider = provider
        self.answered = False
        # "proxy": the SDK's own Stream object will be watched; "tee": the HTTP body is watched.
        self.stream_mode = ""

    def settle_body(self, body: Mapping[str, Any] | bytes) -> None:
        """Queue the settle of what ``body`` (a response body, parsed or not) reports."""
        route, request, ticket = self.route, self.request, self.ticket

        def read(parsed: Mapping[str, Any]) -> Usage | None:
            usage = route.read(parsed, request)
            try:
                ticket.gate.learn(route, request, ticket.model, parsed, usage)
            except Exception:  # calibration must never cost a settle
                _log.exception("spendgate: learning from the usage of %s failed", route.surface)
            return usage

        ticket.settle(Reading(read, body))

    def answer(self, response: Any, stream: bool, stream_cls: Any) -> None:
        """The provider answered 2xx with ``response`` (the SDK's HTTP response, before parsing)."""
        if self.answered:
            return
        self.answered = True
        if not self.route.body_read:
            self.settle_body({})
            return
        if not stream:
            try:
                content: bytes = response.content
            except Exception:  # the body was not read after all: watch it as a stream
                content = b""
            else:
                if self.route.on_answer is not None and self.route.on_answer(self, content):
                    return
                self.settle_body(content)
                return
        raw = bool(response.request.headers.get(_RAW_RESPONSE_HEADER))
        if stream_cls is not None and not raw and self.observe is not None:
            self.stream_mode = "proxy"  # the SDK's Stream object comes back: watch its events
            return
        self.stream_mode = "tee"
        watch_http_body(response, self)


# The gated call running in this thread or task; the SDK's response hook finds it here.
_current: ContextVar[Call | None] = ContextVar("spendgate_call", default=None)


def json_body(content: bytes) -> Mapping[str, Any]:
    """A JSON object body, parsed; empty when it is not one."""
    import json

    try:
        body = json.loads(content)
    except ValueError:
        return {}
    return body if isinstance(body, Mapping) else {}


def answered(response: Any, stream: bool, stream_cls: Any) -> None:
    """The SDK got a 2xx ``response``: settle (or start watching) the gated call in progress."""
    call = _current.get()
    if call is not None:
        try:
            call.answer(response, stream, stream_cls)
        except Exception:  # reading usage must never break the caller's call
            _log.exception("spendgate: reading the answer of %s failed", call.route.surface)


def _send_body(
    provider: Provider, route: Route, body: Mapping[str, Any], files: Any, raw: bool
) -> tuple[PreparedRequest, Observer | None]:
    given = {k: v for k, v in body.items() if not isinstance(v, provider.sentinels)}
    return route.prepare(given, files, raw)


def _finish(call: Call, result: Any) -> Any:
    provider = call.provider
    if call.stream_mode == "proxy" and call.observe is not None:
        if isinstance(result, provider.stream_type):
            return provider.stream_proxy(result, StreamState(call), call.observe)
        if isinstance(result, provider.async_stream_type):
            return provider.async_stream_proxy(result, StreamState(call), call.observe)
    if not call.answered:
        call.ticket.abandon("the SDK returned without an answer spendgate could read")
    return result


def _failed(call: Call, error: BaseException) -> None:
    if call.answered:
        return  # a 2xx arrived: its usage is already on its way, whatever the SDK raised after it
    if isinstance(error, call.provider.unknown_outcome):
        call.ticket.abandon("the provider connection failed; the call may have been billed")
    else:
        call.ticket.release()


def call_gated(
    gate: Gate,
    provider: Provider,
    route: Route,
    body: Mapping[str, Any],
    send: Callable[[dict[str, Any]], Any],
    api_key: str | None = None,
    files: Any = None,
    raw: bool = False,
) -> Any:
    """Decide, send the body (on the effective model) with ``send``, settle or watch the answer.

    ``api_key`` is the provider key the call is made with: only its fingerprint is reported.
    """
    request, observe = _send_body(provider, route, body, files, raw)
    request = gate.calibrated(route, request)
    ticket = gate.decide(request, api_key, downgrade=route.downgrade)
    call = Call(ticket, route, request, observe, provider)
    token = _current.set(call)
    try:
        result = send(_on_model(request.body, ticket.model) if route.downgrade else request.body)
    except BaseException as error:
        _failed(call, error)
        raise
    finally:
        _current.reset(token)
    return _finish(call, result)


async def acall_gated(
    gate: Gate,
    provider: Provider,
    route: Route,
    body: Mapping[str, Any],
    send: Callable[[dict[str, Any]], Awaitable[Any]],
    api_key: str | None = None,
    files: Any = None,
    raw: bool = False,
) -> Any:
    """The asyncio twin of :func:`call_gated`."""
    request, observe = _send_body(provider, route, body, files, raw)
    request = gate.calibrated(route, request)
    ticket = await gate.adecide(request, api_key, downgrade=route.downgrade)
    call = Call(ticket, route, request, observe, provider)
    token = _current.set(call)
    try:
        result = await send(_on_model(request.body, ticket.model) if route.downgrade else request.body)
    except BaseException as error:
        _failed(call, error)
        raise
    finally:
        _current.reset(token)
    return _finish(call, result)


def follow_up(call: Call, send: Callable[[], Any]) -> Any:
    """Send a request that completes ``call`` (retrieve, poll, fetch results); settle from its answer."""
    token = _current.set(call)
    try:
        result = send()
    finally:
        _current.reset(token)
    return _finish_follow_up(call, result)


async def afollow_up(call: Call, send: Callable[[], Awaitable[Any]]) -> Any:
    """The asyncio twin of :func:`follow_up`."""
    token = _current.set(call)
    try:
        result = await send()
    finally:
        _current.reset(token)
    return _finish_follow_up(call, result)


def _finish_follow_up(call: Call, result: Any) -> Any:
    provider = call.provider
    if call.stream_mode == "proxy" and call.observe is not None:
        if isinstance(result, provider.stream_type):
            return provider.stream_proxy(result, StreamState(call), call.observe)
        if isinstance(result, provider.async_stream_type):
            return provider.async_stream_proxy(result, StreamState(call), call.observe)
    return result


def _on_model(body: dict[str, Any], model: str) -> dict[str, Any]:
    if body.get("model") == model or model == "unknown":
        return body
    return {**body, "model": model}


class _BodyWatcher:
    """Watches an HTTP body as the caller reads it: SSE events or JSON lines to the observer,
    or a whole JSON body to the route's reader when it has all arrived."""

    def __init__(self, response: Any, call: Call) -> None:
        content_type = str(response.headers.get("content-type", ""))
        self.kind = (
            "sse"
            if "event-stream" in content_type
            else "lines"
            if ("jsonl" in content_type or "binary" in content_type or "octet" in content_type)
            else "json"
        )
        self.state = StreamState(call)
        self.call = call
        self._buffer = bytearray()
        self._body = bytearray()
        self._data: list[bytes] = []
        self._ended = False
        self._decoder = _content_decoder(response)

    def feed(self, chunk: bytes) -> None:
        if self._decoder is None:
            return
        try:
            data = self._decoder(chunk)
            if self.kind == "json":
                self._body += data
                return
            self._buffer += data
            while True:
                cut = self._buffer.find(b"\n")
                if cut < 0:
                    return
                line = bytes(self._buffer[:cut]).rstrip(b"\r")
                del self._buffer[: cut + 1]
                self._line(line)
        except Exception:
            _log.exception("spendgate: reading a streamed answer failed; its reservation is kept")
            self._decoder = None

    def _line(self, line: bytes) -> None:
        if self.kind == "lines":
            if line.strip():
                self._item(line)
        elif line.startswith(b"data:"):
            self._data.append(line[5:].lstrip())
        elif not line and self._data:
            data = b"\n".join(self._data)
            self._data.clear()
            if data != b"[DONE]":
                self._item(data)

    def _item(self, data: bytes) -> None:
        observe = self.call.observe
        if observe is None:
            return
        import json

        item = json.loads(data)
        if isinstance(item, Mapping):
            observe(item, self.state)

    def end(self, why: str) -> None:
        if self._ended:
            return
        self._ended = True
        if self._decoder is None:
            self.call.ticket.abandon("its streamed answer could not be read")
        elif self.kind == "json":
            if why == "ended":
                self.call.settle_body(bytes(self._body))
            else:
                self.call.ticket.abandon(f"the answer was {why} before it was read")
        else:
            if self._buffer:
                self._line(bytes(self._buffer))
                self._buffer.clear()
            self._line(b"")
            self.state.end(why)


def _content_decoder(response: Any) -> Callable[[bytes], bytes] | None:
    """bytes as sent → bytes as meant (the body's Content-Encoding undone); None when unknown."""
    encodings = [
        e.strip().lower() for e in str(response.headers.get("content-encoding", "")).split(",") if e.strip()
    ]
    if not encodings or encodings == ["identity"]:
        return lambda chunk: chunk
    decoder_of = getattr(response, "_get_content_decoder", None)
    if decoder_of is None:
        return None
    try:
        # A fresh decoder of the same kind: the response's own one belongs to its reader.
        decoder = type(decoder_of())()
    except Exception:
        return None
    return lambda chunk: b"".join(decoder.decode(chunk))


_tee_classes: dict[type, type] = {}


def watch_http_body(response: Any, call: Call) -> None:
    """Put a watcher between the response's byte stream and whoever reads it."""
    inner = response.stream
    names = {klass.__name__ for klass in type(inner).__mro__}
    asynchronous = "AsyncByteStream" in names or hasattr(inner, "__aiter__")
    base = next(
        (
            k
            for k in type(inner).__mro__
            if k.__name__ == ("AsyncByteStream" if asynchronous else "SyncByteStream")
        ),
        object,
    )
    klass = _tee_classes.get(base)
    if klass is None:
        mixin = _AsyncTee if asynchronous else _SyncTee
        klass = _tee_classes[base] = type(f"Spendgate{mixin.__name__}", (mixin, base), {})
    watcher = _BodyWatcher(response, call)
    tee = klass(inner, watcher)
    weakref.finalize(tee, watcher.end, "abandoned")
    response.stream = tee


class _SyncTee:
    def __init__(self, inner: Any, watcher: _BodyWatcher) -> None:
        self._inner = inner
        self._watcher = watcher

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._watcher.feed(chunk)
            yield chunk
        self._watcher.end("ended")

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._watcher.end("closed")


class _AsyncTee:
    def __init__(self, inner: Any, watcher: _BodyWatcher) -> None:
        self._inner = inner
        self._watcher = watcher

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._watcher.feed(chunk)
            yield chunk
        self._watcher.end("ended")

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._watcher.end("closed")
