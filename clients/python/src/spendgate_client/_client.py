"""DecisionClient / AsyncDecisionClient: one reused channel, a deadline per call, a fail mode."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc

from spendgate_client._config import enforcement_config_to_proto
from spendgate_client._errors import (
    DuplicateRequest,
    EnforcementError,
    InvalidRequest,
    SessionBudgetExceeded,
    SpendgateError,
    SpendgateUnavailable,
    TokenCeilingExceeded,
    ToolCallLimitExceeded,
)
from spendgate_client._target import target_problem

__all__ = [
    "DEFAULT_MAX_OUTSTANDING",
    "DEFAULT_TARGET",
    "AsyncDecisionClient",
    "ClientStats",
    "Decision",
    "DecisionClient",
    "FailMode",
    "JournalContext",
    "SettleCarrier",
    "Settlement",
    "Usage",
    "tls_credentials",
]

_log = logging.getLogger("spendgate_client")

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_OUTSTANDING = 64
"""Calls one client has sent and not yet heard back from, at most: the server's own bound
(``spendgate serve --max-in-flight``, 64 per worker). More could not be served at once
anyway; they would only queue, in the server or in this client's channel (HTTP/2 lets a
connection carry so many streams; gRPC holds the calls past that in the client), and
come back late, when the fail mode can no longer help."""
FailMode = Literal["open", "closed"]

_RULE_KEYS = {
    pb.RULE_TOKEN_CEILING: "token_ceiling",
    pb.RULE_SESSION_BUDGET: "max_session_usd",
    pb.RULE_DUPLICATE_REQUEST: "dedup_ttl_seconds",
    pb.RULE_TOOL_CALL_LIMIT: "max_tool_calls",
    pb.RULE_MODEL_DOWNGRADE: "model_downgrade",
}
_BLOCK_ERRORS: dict[int, type[EnforcementError]] = {
    pb.RULE_TOKEN_CEILING: TokenCeilingExceeded,
    pb.RULE_SESSION_BUDGET: SessionBudgetExceeded,
    pb.RULE_DUPLICATE_REQUEST: DuplicateRequest,
    pb.RULE_TOOL_CALL_LIMIT: ToolCallLimitExceeded,
}
_VERDICTS = {
    pb.VERDICT_ALLOW: "allow",
    pb.VERDICT_BLOCK: "block",
    pb.VERDICT_ALLOW_DOWNGRADED: "allow_downgraded",
}
# The service is down or late: the fail mode decides. Anything else is the caller's problem.
_OUTAGE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# Answers after which a client lowers its limit of calls outstanding (see _Outstanding).
_OVERLOAD_CODES = frozenset(
    {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
)
_BACKOFF = 0.5
_SETTLE_ATTEMPTS = 3
# The whole timeout of a hot call, in milliseconds (the server's rpc/admission.py reads it).
_TIMEOUT_METADATA = "x-spendgate-timeout-ms"
# SettleResult codes after which sending the same settle again cannot succeed (the rest are outages).
_FINAL_SETTLE_CODES = frozenset(c.value[0] for c in grpc.StatusCode if c not in _OUTAGE_CODES) - {0}


def settle_refused(result: pb.SettleResult) -> bool:
    """True when the service refused this settle for good (bad input, unknown reservation):
    sending it again cannot help. False when it was applied, or may be sent again."""
    return result.code in _FINAL_SETTLE_CODES


SettleCarrier = Callable[
    [str], tuple[Sequence[pb.SettleRequest], Callable[[Sequence[pb.SettleResult] | None], None]] | None
]
"""Where a Decide finds settles to carry: given the session id, the settles to send along and
the function to call with their results (one per settle, in order), or with None when the
Decide failed or the server answered no results (then nothing is known of them)."""
_SETTLE_VERDICTS = {
    "": pb.VERDICT_UNSPECIFIED,
    "allow": pb.VERDICT_ALLOW,
    "allow_downgraded": pb.VERDICT_ALLOW_DOWNGRADED,
}


@dataclass(frozen=True, slots=True)
class Decision:
    """The service's answer to one Decide.

    ``fail_open`` is True when the service was unreachable and ``fail_mode="open"``
    allowed the call without a decision (nothing was reserved).

    ``session_spend_nano_usd`` splits into ``settled_spend_nano_usd`` (what settled
    calls cost) and ``reserved_nano_usd`` (what open reservations hold: calls in
    flight, or never settled). ``unblocks_on_settle`` is True when a budget block is
    due to those reservations, so waiting for them to settle can lift it; False when
    settled spend alone reached the cap (only a new session id helps).
    """

    verdict: str
    effective_model: str
    rule: str | None
    reason: str
    decision_id: str
    reservation_id: str
    estimated_cost_nano_usd: int
    session_spend_nano_usd: int
    remaining_budget_nano_usd: int | None
    config_version: int
    would_block: bool
    shadow_rules: tuple[str, ...]
    fail_open: bool = False
    settled_spend_nano_usd: int = 0
    reserved_nano_usd: int = 0
    unblocks_on_settle: bool = False

    @property
    def allowed(self) -> bool:
        """The call may go to the provider (on ``effective_model``)."""
        return self.verdict != "block"

    def raise_for_block(self) -> None:
        """Raise the typed EnforcementError of the rule that blocked; do nothing if allowed."""
        if self.allowed:
            return
        code = next((c for c, k in _RULE_KEYS.items() if k == self.rule), 0)
        raise _BLOCK_ERRORS.get(code, EnforcementError)(
            self.reason,
            self.decision_id,
            self.rule,
            spent_nano_usd=self.settled_spend_nano_usd,
            reserved_nano_usd=self.reserved_nano_usd,
            unblocks_on_settle=self.unblocks_on_settle,
        )


@dataclass(frozen=True, slots=True)
class Settlement:
    """What the service counted for a settled call."""

    cost_nano_usd: int
    session_spend_nano_usd: int
    already_settled: bool


@dataclass(frozen=True, slots=True)
class Usage:
    """What the provider billed for one call, as it travels from the wrapper to Settle.

    Attributes:
        input_tokens: uncached input tokens (cache reads and writes excluded).
        output_tokens: output tokens (reasoning included).
        cache_read_input_tokens: input tokens read from the prompt cache.
        cache_write_input_tokens: input tokens written to the prompt cache.
        counts: every billed dimension, keyed by genai-prices usage key
            (``input_tokens`` there counts *all* input tokens, cached ones included;
            ``cache_write_1h_tokens``, ``output_audio_tokens``, ``audio_seconds``,
            ``input_characters``, ``web_searches``, …). When set, a server that reads
            it prices these and ignores the four token fields, which stay for older servers.
        service_tier: the tier that actually ran (``"priority"``, ``"flex"``, ``"batch"``);
            empty for the standard one.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)
    service_tier: str = ""

    def to_proto(self) -> pb.Usage:
        """The wire message."""
        return pb.Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens,
            cache_write_input_tokens=self.cache_write_input_tokens,
            counts=self.counts,
            service_tier=self.service_tier,
        )


@dataclass(frozen=True, slots=True)
class JournalContext:
    """What a Settle tells the journal and the org-wide policies about its call (all optional).

    Attributes:
        requested_model: the model the caller asked for, before any downgrade.
        verdict: the verdict of the call's decision: ``"allow"`` or ``"allow_downgraded"``.
        project: the project the call belongs to.
        key_fingerprint: :func:`spendgate_client.key_fingerprint` of the provider key (never the key).
        key_label: a name for the provider key (env ``SPENDGATE_KEY_LABEL``).
        environment: where the client runs (env ``SPENDGATE_ENVIRONMENT``).
        prompt_text: the prompt, only when the tenant journals prompts (at most 32 KiB).
        prompt_truncated: ``prompt_text`` was cut to fit.
        pattern_set_version: the banned-pattern set ``pattern_matches`` was matched with.
        pattern_matches: the banned patterns matched locally, as (pattern id, offset) pairs.

    Raises:
        ValueError: ``verdict`` is not one of the above.
    """

    requested_model: str = ""
    verdict: str = ""
    project: str = ""
    key_fingerprint: str = ""
    key_label: str = ""
    environment: str = ""
    prompt_text: str = ""
    prompt_truncated: bool = False
    pattern_set_version: int = 0
    pattern_matches: Sequence[tuple[str, int]] = field(default=())

    def __post_init__(self) -> None:
        if self.verdict not in _SETTLE_VERDICTS:
            raise ValueError(f"verdict must be 'allow' or 'allow_downgraded', got {self.verdict!r}")

    def fill(self, request: pb.SettleRequest) -> None:
        """Write these fields into ``request``."""
        request.requested_model = self.requested_model
        request.verdict = _SETTLE_VERDICTS[self.verdict]
        request.project = self.project
        request.key_fingerprint = self.key_fingerprint
        request.key_label = self.key_label
        request.environment = self.environment
        request.prompt_text = self.prompt_text
        request.prompt_truncated = self.prompt_truncated
        request.pattern_set_version = self.pattern_set_version
        request.pattern_matches.extend(
            pb.PatternMatch(pattern_id=pid, offset=offset) for pid, offset in self.pattern_matches
        )


_USAGE_FIELDS = frozenset(f.name for f in fields(Usage))
_JOURNAL_FIELDS = frozenset(f.name for f in fields(JournalContext))


def _settle_request(
    session_id: str,
    reservation_id: str,
    model: str,
    usage: Usage | None,
    provider_ok: bool,
    journal: JournalContext | None,
    keywords: Mapping[str, Any],
) -> pb.SettleRequest:
    """The SettleRequest; ``keywords`` are Usage and JournalContext fields given one by one."""
    unknown = set(keywords) - _USAGE_FIELDS - _JOURNAL_FIELDS
    if unknown:
        raise TypeError(f"settle() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    by_usage = {k: v for k, v in keywords.items() if k in _USAGE_FIELDS}
    by_journal = {k: v for k, v in keywords.items() if k in _JOURNAL_FIELDS}
    if by_usage:
        usage = replace(usage or Usage(), **by_usage)
    if by_journal:
        journal = replace(journal or JournalContext(), **by_journal)
    request = pb.SettleRequest(
        session_id=session_id,
        reservation_id=reservation_id,
        model=model,
        usage=(usage or Usage()).to_proto(),
        outcome=pb.PROVIDER_OUTCOME_OK if provider_ok else pb.PROVIDER_OUTCOME_ERROR,
    )
    if journal is not None:
        journal.fill(request)
    return request


def _settlement(response: pb.SettleResponse) -> Settlement:
    return Settlement(
        response.actual_cost_nano_usd, response.session_spend_nano_usd, response.already_settled
    )


class ClientStats:
    """Counters of what the client did on its own (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.decisions = 0
        self.fail_open_allowances = 0
        self.outstanding_refusals = 0
        self.settle_retries = 0
        self.settle_failures = 0

    def add(self, name: str, amount: int = 1) -> None:
        """Increment counter ``name``."""
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict."""
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def _decision(response: pb.DecideResponse) -> Decision:
    return Decision(
        verdict=_VERDICTS.get(response.verdict, "block"),
        effective_model=response.effective_model,
        rule=_RULE_KEYS.get(response.rule),
        reason=response.reason,
        decision_id=response.decision_id,
        reservation_id=response.reservation_id,
        estimated_cost_nano_usd=response.estimated_cost_nano_usd,
        session_spend_nano_usd=response.session_spend_nano_usd,
        remaining_budget_nano_usd=(
            response.remaining_budget_nano_usd if response.HasField("remaining_budget_nano_usd") else None
        ),
        config_version=response.config_version,
        would_block=response.would_block,
        shadow_rules=tuple(_RULE_KEYS.get(r, str(r)) for r in response.shadow_rules),
        settled_spend_nano_usd=response.settled_spend_nano_usd,
        reserved_nano_usd=response.reserved_nano_usd,
        unblocks_on_settle=response.unblocks_on_settle,
    )


def _fail_open_decision(model: str, reason: str) -> Decision:
    return Decision("allow", model, None, reason, "", "", 0, 0, None, 0, False, (), fail_open=True)


def _field_violations(error: grpc.RpcError) -> tuple[tuple[str, str], ...]:
    # At run time trailing metadata is a tuple of (key, value) pairs.
    metadata = cast("Sequence[tuple[str, bytes]]", error.trailing_metadata() or ())
    for key, value in metadata:
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    return tuple((v.field, v.description) for v in bad.field_violations)
    return ()


def _caller_error(error: grpc.RpcError) -> SpendgateError:
    code = error.code()
    details = error.details() or ""
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        return InvalidRequest(f"{code.name}: {details}", _field_violations(error))
    return SpendgateError(f"{code.name}: {details}")


def _channel_options(target: str) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        # Retry-free hot path: a late answer is handled by the fail mode, not retried.
        ("grpc.enable_retries", 0),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if target.startswith("dns:"):
        # Spread calls over every pod behind a headless Service.
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


def tls_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: the CA that signed the server, and for mTLS
    this client's certificate and key. With no ``ca_file`` the system roots are used.

    Raises:
        ValueError: only one of cert_file and key_file was given, or a file cannot be read.
    """
    if bool(cert_file) != bool(key_file):
        raise ValueError("cert_file and key_file go together (mTLS): give both or neither")

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from exc

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


class _Outstanding:
    """Calls sent and not yet answered, up to a limit that follows the answers (thread-safe).

    The limit starts at ``bound`` (0: no bound, nothing adapts). It follows TCP's
    congestion window (AIMD): an answer that says the service is overloaded or late
    (:data:`_OVERLOAD_CODES`) multiplies it by :data:`_BACKOFF` (not below 1), once per
    round (calls sent before the last decrease say nothing new); any other answer adds
    ``1 / limit`` (about 1 per round of calls, not above ``bound``). When the server sheds
    calls from a standing queue, or calls time out, its clients send fewer at once and
    the queue they feed shrinks, where a fixed bound would refill it as fast as it is
    shed; the calls past the limit are refused here, which costs the server nothing.
    """

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.limit = float(bound)
        self.count = 0
        self._decreases = 0
        self._lock = threading.Lock()

    def enter(self) -> int | None:
        """Count one more call and return its ticket for :meth:`leave`; None (counting nothing)
        when the limit is reached."""
        with self._lock:
            if self.bound and self.count + 1 > self.limit:
                return None
            self.count += 1
            return self._decreases

    def leave(self, ticket: int, status: grpc.StatusCode | None = None) -> None:
        """The call :meth:`enter` gave ``ticket`` has ended, however it ended: with ``status``
        when it was answered (or timed out), None when nothing was learnt (the caller cancelled)."""
        with self._lock:
            self.count -= 1
            if not self.bound or status is None:
                return
            if status not in _OVERLOAD_CODES:
                self.limit = min(float(self.bound), self.limit + 1.0 / self.limit)
            elif ticket == self._decreases:
                self.limit = max(1.0, self.limit * _BACKOFF)
                self._decreases += 1


class _Base:
    def __init__(
        self,
        target: str | None,
        *,
        timeout: float,
        fail_mode: FailMode,
        api_key: str | None,
        max_outstanding: int,
    ) -> None:
        if fail_mode not in ("open", "closed"):
            raise ValueError(f"fail_mode must be 'open' or 'closed', got {fail_mode!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(max_outstanding, bool) or not isinstance(max_outstanding, int) or max_outstanding < 0:
            raise ValueError(
                f"max_outstanding must be a whole number >= 0 (0: no bound), got {max_outstanding!r}"
            )
        self.target = target or os.environ.get("SPENDGATE_TARGET") or DEFAULT_TARGET
        problem = target_problem(self.target)
        if problem:
            # Refused here: a bad port fails every call, which fail_mode="open" would allow unguarded.
            raise ValueError(f"spendgate target (or SPENDGATE_TARGET) {self.target!r}: {problem}")
        self.timeout = timeout
        self.fail_mode = fail_mode
        self.stats = ClientStats()
        key = api_key if api_key is not None else os.environ.get("SPENDGATE_API_KEY")
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = (
            (("authorization", f"Bearer {key}"),) if key else None
        )
        # Each hot call also says its whole timeout: with what is left of it when the server takes
        # the call up, the server knows how long it waited, and sheds calls from a standing queue.
        auth = self._metadata or ()
        self._decide_metadata = (*auth, (_TIMEOUT_METADATA, str(round(timeout * 1000))))
        self._settle_metadata = (*auth, (_TIMEOUT_METADATA, str(round(timeout * 4000))))
        self._carrier: SettleCarrier | None = None
        self._outstanding = _Outstanding(max_outstanding)

    @property
    def outstanding(self) -> int:
        """Calls this client has sent and not yet heard back from (at most ``max_outstanding``)."""
        return self._outstanding.count

    @property
    def max_outstanding(self) -> int:
        """The bound on :attr:`outstanding` (0: none)."""
        return self._outstanding.bound

    @property
    def outstanding_limit(self) -> float:
        """The limit on :attr:`outstanding` now: ``max_outstanding``, lowered by answers that
        said the service is overloaded and raised again by the others (see the class docs)."""
        return self._outstanding.limit

    def carry_settles(self, carrier: SettleCarrier | None) -> None:
        """Let each Decide carry settles of its session that ``carrier`` hands it (None: stop).

        One RPC then does the work of two: the server applies the carried settles before
        the decision (in the same Redis write) and reports each one's result.
        """
        self._carrier = carrier

    def _riders(self, request: pb.DecideRequest) -> Callable[[Sequence[pb.SettleResult] | None], None] | None:
        """Attach the settles to carry to ``request``; the function taking their results, or None."""
        if self._carrier is None:
            return None
        carried = self._carrier(request.session_id)
        if carried is None:
            return None
        settles, done = carried
        request.settles.extend(settles)
        return done

    @staticmethod
    def _decide_request(
        session_id: str,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        fingerprint: bytes,
        tool_call_count: int,
        request_id: str,
        enforcement_config: Mapping[str, Any] | pb.EnforcementConfig | None,
        project: str = "",
        max_usage: Usage | None = None,
    ) -> pb.DecideRequest:
        request = pb.DecideRequest(
            session_id=session_id,
            model=model,
            input_tokens=input_tokens,
            max_output_tokens=max_output_tokens,
            fingerprint=fingerprint,
            tool_call_count=tool_call_count,
            request_id=request_id,
            project=project,
        )
        if enforcement_config is not None:
            if not isinstance(enforcement_config, pb.EnforcementConfig):
                enforcement_config = enforcement_config_to_proto(enforcement_config)
            request.enforcement_config.CopyFrom(enforcement_config)
        if max_usage is not None:
            request.max_usage.CopyFrom(max_usage.to_proto())
        return request

    def _on_outage(self, error: grpc.RpcError, model: str) -> Decision:
        code = error.code()
        if self.fail_mode == "closed":
            raise SpendgateUnavailable(
                f"spendgate at {self.target} did not answer ({code.name}); fail_mode is 'closed'",
                code.name,
            ) from error
        self.stats.add("fail_open_allowances")
        _log.warning("spendgate unreachable (%s); fail_mode='open' allows the call", code.name)
        return _fail_open_decision(model, f"fail open: spendgate {code.name}")

    def _at_bound(self) -> str:
        """Count a call refused here, at the limit of calls outstanding, and say why."""
        self.stats.add("outstanding_refusals")
        bound, limit, count = self._outstanding.bound, self._outstanding.limit, self._outstanding.count
        lowered = f", lowered to {int(limit)} by answers saying it is overloaded" if limit < bound else ""
        return (
            f"RESOURCE_EXHAUSTED: {count} calls to spendgate at {self.target} already await their "
            f"answer (max_outstanding={bound}{lowered}): the service is slower than calls arrive"
        )

    def _on_full(self, model: str) -> Decision:
        """The fail mode applied to a Decide this client refused at ``max_outstanding``, unsent."""
        why = self._at_bound()
        if self.fail_mode == "closed":
            raise SpendgateUnavailable(f"{why}; fail_mode is 'closed'", "RESOURCE_EXHAUSTED")
        self.stats.add("fail_open_allowances")
        _log.warning("spendgate overloaded (%s); fail_mode='open' allows the call", why)
        return _fail_open_decision(model, "fail open: spendgate RESOURCE_EXHAUSTED (client max_outstanding)")

    def _settle_backoff(self, error: grpc.RpcError, attempt: int) -> float:
        """Seconds to wait before the next try of a Settle that failed with ``error``.

        Raises:
            SpendgateError: the service refused the Settle (not an outage): never retried.
        """
        if error.code() not in _OUTAGE_CODES:
            raise _caller_error(error) from error
        return self._retry_backoff(attempt)

    def _retry_backoff(self, attempt: int) -> float:
        """Seconds to wait before the next try of a Settle whose ``attempt`` met an outage."""
        if attempt + 1 < _SETTLE_ATTEMPTS:
            self.stats.add("settle_retries")
            return 0.05 * float(2**attempt)
        return 0.0

    def _settle_lost(self, reservation_id: str) -> None:
        self.stats.add("settle_failures")
        _log.warning("spendgate settle of %s failed; it will count at its estimate", reservation_id)


class DecisionClient(_Base):
    """Blocking client of spendgate.v1.DecisionService. Thread-safe; share one per process.

    Args:
        target: ``host:port`` or ``dns:///name:port`` (round-robin over every address);
            default env ``SPENDGATE_TARGET``, else ``127.0.0.1:50051``.
        timeout: deadline of each Decide, in seconds.
        fail_mode: ``"open"`` allows a call when the service is unreachable or late
            (logged and counted); ``"closed"`` raises SpendgateUnavailable.
        api_key: spendgate API key (default env ``SPENDGATE_API_KEY``).
        credentials: TLS channel credentials; plaintext when None.
        max_outstanding: calls (Decide, Settle, SettleBatch) sent and not yet answered,
            at most (default :data:`DEFAULT_MAX_OUTSTANDING`, the server's own
            ``--max-in-flight``; 0: no bound). One more is not sent: a Decide gets the
            fail mode at once (``SpendgateUnavailable`` with ``code`` RESOURCE_EXHAUSTED
            when closed), a Settle counts as an outage and is retried; counted in
            ``stats.outstanding_refusals``. The limit in force (``outstanding_limit``)
            adapts: answers saying the service is overloaded or late (RESOURCE_EXHAUSTED,
            DEADLINE_EXCEEDED, UNAVAILABLE) halve it, once per round and not below 1;
            other answers raise it by 1/limit, back up to ``max_outstanding``.

    Raises:
        ValueError: a bad ``fail_mode``, ``timeout`` or ``max_outstanding``, or a target
            whose port is not a number in 1..65535.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = 0.25,
        fail_mode: FailMode = "open",
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
    ) -> None:
        super().__init__(
            target, timeout=timeout, fail_mode=fail_mode, api_key=api_key, max_outstanding=max_outstanding
        )
        options = _channel_options(self.target)
        self._channel = (
            grpc.secure_channel(self.target, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(self.target, options=options)
        )
        self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)

    def decide(
        self,
        session_id: str,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        fingerprint: bytes,
        *,
        tool_call_count: int = 0,
        request_id: str = "",
        enforcement_config: Mapping[str, Any] | pb.EnforcementConfig | None = None,
        project: str = "",
        max_usage: Usage | None = None,
    ) -> Decision:
        """Ask whether a provider call may go ahead. A block is returned, not raised.

        ``project`` names the project whose server-side rules apply on top of the tenant's.
        ``max_usage`` is the call's worst case in the units its endpoint bills (counts by
        genai-prices usage key) and the tier it runs at; when given, a server that reads it
        reserves that instead of ``input_tokens`` x ``max_output_tokens``.

        Raises:
            SpendgateUnavailable: the service is unreachable or late and fail_mode is closed.
            InvalidRequest: the request is malformed (names the field).
        """
        request = self._decide_request(
            session_id,
            model,
            input_tokens,
            max_output_tokens,
            fingerprint,
            tool_call_count,
            request_id,
            enforcement_config,
            project,
            max_usage,
        )
        self.stats.add("decisions")
        if (ticket := self._outstanding.enter()) is None:
            return self._on_full(model)
        carried = self._riders(request)
        results: Sequence[pb.SettleResult] | None = None
        status: grpc.StatusCode | None = None
        try:
            response = self._stub.Decide(request, timeout=self.timeout, metadata=self._decide_metadata)
            status = grpc.StatusCode.OK
            results = response.settle_results
        except grpc.RpcError as error:
            status = error.code()
            if status in _OUTAGE_CODES:
                return self._on_outage(error, model)
            raise _caller_error(error) from error
        finally:
            self._outstanding.leave(ticket, status)
            if carried is not None:
                carried(results)
        return _decision(response)

    def settle(
        self,
        session_id: str,
        reservation_id: str,
        model: str,
        usage: Usage | None = None,
        *,
        provider_ok: bool = True,
        journal: JournalContext | None = None,
        **keywords: Any,
    ) -> Settlement | None:
        """Report a call's real usage. Retried (it is idempotent); never raises on an outage.

        Returns None when the service stayed unreachable: the reservation then expires
        and is counted at its estimate, which errs on the side of the budget.

        ``usage`` is what the provider billed (nothing when omitted); ``provider_ok=False``
        says the provider refused the call, which releases the reservation. ``journal``
        describes the call for the journal and the org-wide policies. Any field of
        :class:`Usage` or :class:`JournalContext` may also be given as a keyword
        (``settle(s, r, m, input_tokens=1000, output_tokens=50)``); it overrides the
        same field of ``usage`` or ``journal``.

        Raises:
            InvalidRequest: the reservation is unknown or a field is malformed.
            ValueError: ``verdict`` is not ``"allow"`` or ``"allow_downgraded"``.
            TypeError: a keyword that is no field of Usage or JournalContext.
        """
        request = _settle_request(session_id, reservation_id, model, usage, provider_ok, journal, keywords)
        for attempt in range(_SETTLE_ATTEMPTS):
            if (ticket := self._outstanding.enter()) is None:
                self._at_bound()
                time.sleep(self._retry_backoff(attempt))
                continue
            status: grpc.StatusCode | None = None
            try:
                response = self._stub.Settle(
                    request, timeout=self.timeout * 4, metadata=self._settle_metadata
                )
                status = grpc.StatusCode.OK
            except grpc.RpcError as error:
                failure = error
                status = error.code()
            else:
                return _settlement(response)
            finally:
                self._outstanding.leave(ticket, status)
            time.sleep(self._settle_backoff(failure, attempt))
        self._settle_lost(reservation_id)
        return None

    def settle_batch(self, requests: Sequence[pb.SettleRequest]) -> Sequence[pb.SettleResult] | None:
        """Send several settles in one SettleBatch (1-64, under the 64 KiB message limit).

        One attempt: returns one result per request, in order (``code`` 0 when applied),
        or None on an outage, when nothing is known of any of them (send them all again).

        Raises:
            NotImplementedError: the server predates SettleBatch (send them one by one).
            SpendgateError: the service refused the batch itself (never retried).
        """
        if (ticket := self._outstanding.enter()) is None:
            self._at_bound()
            self.stats.add("settle_retries", len(requests))
            return None
        status: grpc.StatusCode | None = None
        try:
            response = self._stub.SettleBatch(
                pb.SettleBatchRequest(settles=requests),
                timeout=self.timeout * 4,
                metadata=self._settle_metadata,
            )
            status = grpc.StatusCode.OK
        except grpc.RpcError as error:
            status = error.code()
            if status is grpc.StatusCode.UNIMPLEMENTED:
                raise NotImplementedError("the spendgate server has no SettleBatch") from error
            if status in _OUTAGE_CODES:
                self.stats.add("settle_retries", len(requests))
                return None
            raise _caller_error(error) from error
        finally:
            self._outstanding.leave(ticket, status)
        if len(response.results) != len(requests):
            return None
        return response.results

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> DecisionClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncDecisionClient(_Base):
    """asyncio client of spendgate.v1.DecisionService; same arguments as DecisionClient.

    The channel is created on first use, inside the running event loop.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = 0.25,
        fail_mode: FailMode = "open",
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
    ) -> None:
        super().__init__(
            target, timeout=timeout, fail_mode=fail_mode, api_key=api_key, max_outstanding=max_outstanding
        )
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._stub: decision_pb2_grpc.DecisionServiceAsyncStub | None = None

    def _get_stub(self) -> decision_pb2_grpc.DecisionServiceAsyncStub:
        if self._stub is None:
            options = _channel_options(self.target)
            self._channel = (
                grpc.aio.secure_channel(self.target, self._credentials, options=options)
                if self._credentials is not None
                else grpc.aio.insecure_channel(self.target, options=options)
            )
            self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)
        return self._stub

    async def decide(
        self,
        session_id: str,
        model: str,
        input_tokens: int,
        max_output_tokens: int,
        fingerprint: bytes,
        *,
        tool_call_count: int = 0,
        request_id: str = "",
        enforcement_config: Mapping[str, Any] | pb.EnforcementConfig | None = None,
        project: str = "",
        max_usage: Usage | None = None,
    ) -> Decision:
        """See DecisionClient.decide."""
        request = self._decide_request(
            session_id,
            model,
            input_tokens,
            max_output_tokens,
            fingerprint,
            tool_call_count,
            request_id,
            enforcement_config,
            project,
            max_usage,
        )
        self.stats.add("decisions")
        if (ticket := self._outstanding.enter()) is None:
            return self._on_full(model)
        carried = self._riders(request)
        results: Sequence[pb.SettleResult] | None = None
        status: grpc.StatusCode | None = None
        try:
            response = await self._get_stub().Decide(
                request, timeout=self.timeout, metadata=self._decide_metadata
            )
            status = grpc.StatusCode.OK
            results = response.settle_results
        except grpc.RpcError as error:
            status = error.code()
            if status in _OUTAGE_CODES:
                return self._on_outage(error, model)
            raise _caller_error(error) from error
        finally:
            self._outstanding.leave(ticket, status)
            if carried is not None:
                carried(results)
        return _decision(response)

    async def settle(
        self,
        session_id: str,
        reservation_id: str,
        model: str,
        usage: Usage | None = None,
        *,
        provider_ok: bool = True,
        journal: JournalContext | None = None,
        **keywords: Any,
    ) -> Settlement | None:
        """See DecisionClient.settle."""
        request = _settle_request(session_id, reservation_id, model, usage, provider_ok, journal, keywords)
        for attempt in range(_SETTLE_ATTEMPTS):
            if (ticket := self._outstanding.enter()) is None:
                self._at_bound()
                await asyncio.sleep(self._retry_backoff(attempt))
                continue
            status: grpc.StatusCode | None = None
            try:
                response = await self._get_stub().Settle(
                    request, timeout=self.timeout * 4, metadata=self._settle_metadata
                )
                status = grpc.StatusCode.OK
            except grpc.RpcError as error:
                failure = error
                status = error.code()
            else:
                return _settlement(response)
            finally:
                self._outstanding.leave(ticket, status)
            await asyncio.sleep(self._settle_backoff(failure, attempt))
        self._settle_lost(reservation_id)
        return None

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
