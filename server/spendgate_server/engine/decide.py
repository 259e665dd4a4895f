"""The decision engine: rules, effective config, decide and settle. Pure Python over a Store."""

from __future__ import annotations

import asyncio
import enum
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from spendgate_server.engine.anomalies import AnomalyThresholds, SettleAnomaly, settle_anomalies
from spendgate_server.engine.cancellations import ReserveCanceller
from spendgate_server.engine.config import BudgetMode, EnforcementConfig, Rule
from spendgate_server.engine.deny_cache import DenyCache
from spendgate_server.engine.events import CallContext, Journal, JournalEvent
from spendgate_server.engine.pricing import PriceTable, Usage
from spendgate_server.engine.quota import SessionQuota
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.errors import InvalidArgument, NotFound, StoreUnavailable
from spendgate_server.money import format_usd
from spendgate_server.store import (
    BudgetCheck,
    DecidedCall,
    DedupCheck,
    ReserveOutcome,
    ReserveRequest,
    ReserveStatus,
    SessionKey,
    SettleRequest,
    SettleStatus,
    Store,
    ToolCheck,
)
from spendgate_server.store.breaker import BreakerOpen

__all__ = [
    "Call",
    "Clock",
    "Decision",
    "DecisionEngine",
    "EngineTimings",
    "SettleCall",
    "Settlement",
    "Verdict",
    "decision_id_time_ms",
    "new_decision_id",
    "system_clock_ms",
]

Clock = Callable[[], int]
"""Returns the current time as Unix milliseconds; injected so tests never sleep."""


def system_clock_ms() -> int:
    """Wall-clock Unix milliseconds."""
    return time.time_ns() // 1_000_000


def new_decision_id(now_ms: int) -> str:
    """32 hex characters: the issue time in ms (48 bits), then 80 random bits.

    The time prefix lets Settle measure how long a reservation stayed open without
    storing anything more; the random part makes ids unguessable and unique.
    """
    return f"{now_ms & 0xFFFFFFFFFFFF:012x}{os.urandom(10).hex()}"


def decision_id_time_ms(decision_id: str) -> int:
    """The issue time encoded in a decision id (meaningless for ids made elsewhere)."""
    return int(decision_id[:12], 16)


class Verdict(enum.IntEnum):
    """Values are the wire codes of spendgate.v1.Verdict."""

    ALLOW = 1
    BLOCK = 2
    ALLOW_DOWNGRADED = 3


@dataclass(frozen=True, slots=True)
class EngineTimings:
    """Lifetimes the engine applies to state it creates."""

    # An unsettled reservation is counted at its estimate after this long.
    reservation_ttl_ms: int = 10 * 60 * 1000
    # A session with no admitted call or settle for this long is forgotten.
    session_ttl_ms: int = 24 * 3600 * 1000
    # A settled reservation id is remembered this long, so repeated settles count once.
    settled_ttl_ms: int = 3600 * 1000


@dataclass(frozen=True, slots=True)
class Call:
    """One provider call, validated, as the engine sees it."""

    tenant: str
    session_id: str
    model: str
    input_tokens: int
    max_output_tokens: int
    fingerprint: bytes
    tool_call_count: int = 0
    request_id: str = ""
    client_config: EnforcementConfig | None = None
    project: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to a Call."""

    verdict: Verdict
    effective_model: str
    rule: Rule | None
    reason: str
    decision_id: str
    reservation_id: str
    estimated_cost_nano_usd: int
    session_spend_nano_usd: int
    remaining_budget_nano_usd: int | None
    config_version: int
    shadow_rules: frozenset[Rule] = frozenset()
    # The effective max_session_usd, for reporting (SessionService); None when off.
    budget_nano_usd: int | None = None

    @property
    def would_block(self) -> bool:
        """A shadow-mode rule would have blocked (a shadow downgrade is not a block)."""
        return bool(self.shadow_rules - {Rule.MODEL_DOWNGRADE})

    @property
    def allowed(self) -> bool:
        """The call may go to the provider."""
        return self.verdict is not Verdict.BLOCK

    @property
    def spend_known(self) -> bool:
        """Whether session_spend_nano_usd was read from the store (a ceiling block never asks it)."""
        return not (self.verdict is Verdict.BLOCK and self.rule is Rule.TOKEN_CEILING)


@dataclass(frozen=True, slots=True)
class SettleCall:
    """Real usage reported after a provider call."""

    tenant: str
    session_id: str
    reservation_id: str
    model: str
    usage: Usage
    provider_ok: bool
    # What the client says about the call, for the journal.
    context: CallContext = field(default_factory=CallContext)


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a settle counted."""

    cost_nano_usd: int
    session_spend_nano_usd: int
    already_settled: bool
    # How this settle differs from its decision (flagged on the alerts feed, counted in metrics).
    anomalies: tuple[SettleAnomaly, ...] = ()


class DecisionEngine:
    """Evaluates the five rules: stateless ones here, stateful ones in one atomic store step."""

    def __init__(
        self,
        store: Store,
        prices: PriceTable,
        configs: ConfigResolver,
        *,
        timings: EngineTimings | None = None,
        clock: Clock = system_clock_ms,
        journal: Journal | None = None,
        deny_cache: DenyCache | None = None,
        quota: SessionQuota | None = None,
        anomaly_thresholds: AnomalyThresholds | None = None,
    ) -> None:
        self._store = store
        self._quota = quota
        self._canceller = ReserveCanceller(store, clock)
        self._anomaly_thresholds = anomaly_thresholds or AnomalyThresholds()
        self._deny = deny_cache
        self._journal = journal
        self._prices = prices
        self._configs = configs
        self._timings = timings or EngineTimings()
        self._clock = clock

    @property
    def store(self) -> Store:
        """The store this engine decides against."""
        return self._store

    @property
    def canceller(self) -> ReserveCanceller:
        """Cancels the reserves of Decides answered UNAVAILABLE (cancellations.py)."""
        return self._canceller

    @property
    def configs(self) -> ConfigResolver:
        """The server-side configs this engine applies."""
        return self._configs

    async def effective_config(self, call: Call) -> tuple[EnforcementConfig, int]:
        """The stricter of the server-side config and the call's own, key by key, and its version."""
        resolved = self._configs.cached(call.tenant, call.project)
        if resolved is None:
            resolved = await self._configs.load(call.tenant, call.project)
        if call.client_config is None:
            return resolved.config, resolved.version
        return resolved.config.stricter(call.client_config), resolved.version

    async def decide(self, call: Call) -> Decision:
        """Decide one call: ceiling, then downgrade, then the atomic dedup/tools/budget step."""
        config, version = await self.effective_config(call)
        now_ms = self._clock()
        decision_id = new_decision_id(now_ms)
        shadow: set[Rule] = set()
        model = call.model
        pricing = self._prices.lookup(model)
        estimate = pricing.estimate(call.input_tokens, call.max_output_tokens)

        ceiling = config.token_ceiling
        if ceiling is not None and call.input_tokens > ceiling:
            if not config.is_shadow(Rule.TOKEN_CEILING):
                return self._blocked(
                    call,
                    config,
                    version,
                    decision_id,
                    Rule.TOKEN_CEILING,
                    estimate,
                    f"input tokens {call.input_tokens} exceed token_ceiling {ceiling}",
                )
            shadow.add(Rule.TOKEN_CEILING)

        verdict, rule, reason = Verdict.ALLOW, None, "allowed"
        downgrade = config.model_downgrade
        if downgrade is not None and estimate > downgrade.threshold_nano_usd:
            if config.is_shadow(Rule.MODEL_DOWNGRADE):
                shadow.add(Rule.MODEL_DOWNGRADE)
            else:
                fallback = self._prices.lookup(downgrade.fallback_model, "model_downgrade.fallback")
                reason = (
                    f"estimated {format_usd(estimate)} on {model} exceeds the model_downgrade "
                    f"threshold {format_usd(downgrade.threshold_nano_usd)}; running on "
                    f"{downgrade.fallback_model}"
                )
                verdict, rule, model = (
                    Verdict.ALLOW_DOWNGRADED,
                    Rule.MODEL_DOWNGRADE,
                    downgrade.fallback_model,
                )
                estimate = fallback.estimate(call.input_tokens, call.max_output_tokens)

        cap = config.max_session_nano_usd
        cacheable = (
            self._deny is not None
            and cap is not None
            and config.budget_mode is BudgetMode.CROSSING
            and not config.is_shadow(Rule.SESSION_BUDGET)
        )
        # A retried request id must replay its decision, which only the store knows.
        if cacheable and not call.request_id:
            assert self._deny is not None and cap is not None
            denied = self._deny.blocked(call.tenant, call.session_id, cap, now_ms)
            if denied is not None:
                return self._blocked(
                    call,
                    config,
                    version,
                    decision_id,
                    Rule.SESSION_BUDGET,
                    estimate,
                    f"session spend {format_usd(denied.committed_nano_usd)} has reached max_session_usd "
                    f"{format_usd(cap)}; start a new session id",
                    denied.committed_nano_usd,
                    frozenset(shadow),
                )
        memo = _memo(decision_id, verdict, model, rule, estimate, reason) if call.request_id else ""
        if self._quota is not None:
            # Before anything is written: a session past the tenant's quota leaves no state.
            await self._quota.admit(call.tenant, call.session_id, now_ms)
        outcome = await self._reserve(
            self._reserve_request(call, config, decision_id, estimate, memo, now_ms, model=model)
        )
        shadow |= outcome.shadow_fired
        committed = outcome.spent_nano_usd + outcome.reserved_nano_usd
        remaining = _remaining(config, committed)

        if outcome.status is ReserveStatus.REPLAYED:
            decision_id, verdict, model, rule, estimate, reason = _unmemo(outcome.memo)
            return Decision(
                verdict,
                model,
                rule,
                reason,
                decision_id,
                decision_id,
                estimate,
                committed,
                remaining,
                version,
                budget_nano_usd=config.max_session_nano_usd,
            )
        if outcome.status is ReserveStatus.BLOCKED:
            assert outcome.blocked_by is not None
            if cacheable and outcome.blocked_by is Rule.SESSION_BUDGET:
                assert self._deny is not None and cap is not None
                self._deny.remember(call.tenant, call.session_id, committed, cap, now_ms)
            return self._blocked(
                call,
                config,
                version,
                decision_id,
                outcome.blocked_by,
                estimate,
                _block_reason(outcome.blocked_by, config, outcome, call),
                committed,
                frozenset(shadow),
            )
        if shadow and rule is None:
            reason = "allowed; shadow mode: " + ", ".join(r.key for r in sorted(shadow)) + " fired"
        return Decision(
            verdict,
            model,
            rule,
            reason,
            decision_id,
            decision_id,
            estimate,
            committed,
            remaining,
            version,
            frozenset(shadow),
            config.max_session_nano_usd,
        )

    async def _reserve(self, request: ReserveRequest) -> ReserveOutcome:
        """The atomic step, such that a Decide answered with a failure leaves no state.

        Raises:
            StoreUnavailable: the store did not answer. If the reserve was sent, the store
                may still apply it: its cancel is sent until the store answers (cancellations.py).
        """
        try:
            outcome = await self._store.reserve(request)
        except BreakerOpen:
            raise  # never sent: nothing to undo
        except StoreUnavailable as exc:
            self._canceller.submit(request)
            raise StoreUnavailable(
                f"{exc}; nothing is reserved (if the store applies this Decide late, it is cancelled)"
            ) from exc
        except asyncio.CancelledError:
            # The caller gave up (its deadline passed) while the reserve was in flight.
            self._canceller.submit(request)
            raise
        if outcome.status is ReserveStatus.CANCELLED:
            raise StoreUnavailable(
                "this Decide was cancelled before the store applied it; nothing is reserved"
            )
        return outcome

    def _reserve_request(
        self,
        call: Call,
        config: EnforcementConfig,
        decision_id: str,
        estimate: int,
        memo: str,
        now_ms: int,
        *,
        model: str = "",
    ) -> ReserveRequest:
        t = self._timings
        dedup = tools = budget = None
        if config.dedup_ttl_seconds is not None:
            dedup = DedupCheck(
                call.fingerprint.hex(),
                config.dedup_ttl_seconds * 1000,
                config.is_shadow(Rule.DUPLICATE_REQUEST),
            )
        if config.max_tool_calls is not None:
            tools = ToolCheck(config.max_tool_calls, config.is_shadow(Rule.TOOL_CALL_LIMIT))
        if config.max_session_nano_usd is not None:
            budget = BudgetCheck(
                config.max_session_nano_usd,
                config.budget_mode is BudgetMode.STRICT,
                config.is_shadow(Rule.SESSION_BUDGET),
            )
        return ReserveRequest(
            session=SessionKey(call.tenant, call.session_id),
            now_ms=now_ms,
            reservation_id=decision_id,
            estimate_nano_usd=estimate,
            reservation_ttl_ms=t.reservation_ttl_ms,
            session_ttl_ms=t.session_ttl_ms,
            tool_call_count=call.tool_call_count,
            dedup=dedup,
            tools=tools,
            budget=budget,
            request_id=call.request_id,
            memo=memo,
            decided=DecidedCall(model or call.model, estimate, call.input_tokens, call.max_output_tokens),
        )

    def _blocked(
        self,
        call: Call,
        config: EnforcementConfig,
        version: int,
        decision_id: str,
        rule: Rule,
        estimate: int,
        reason: str,
        committed: int | None = None,
        shadow: frozenset[Rule] = frozenset(),
    ) -> Decision:
        return Decision(
            Verdict.BLOCK,
            call.model,
            rule,
            reason,
            decision_id,
            "",
            estimate,
            committed or 0,
            None if committed is None else _remaining(config, committed),
            version,
            shadow,
            config.max_session_nano_usd,
        )

    async def settle(self, settle: SettleCall) -> Settlement:
        """Replace a reservation with the real cost (zero when the provider call failed).

        Raises:
            NotFound: the reservation id is unknown to this session, or long expired.
            InvalidArgument: the usage counts contradict each other (nothing is settled).
        """
        cost = self._prices.cost(settle.model, settle.usage) if settle.provider_ok else 0
        if self._deny is not None:
            self._deny.forget(settle.tenant, settle.session_id)
        t = self._timings
        now_ms = self._clock()
        outcome = await self._store.settle(
            SettleRequest(
                session=SessionKey(settle.tenant, settle.session_id),
                now_ms=now_ms,
                reservation_id=settle.reservation_id,
                cost_nano_usd=cost,
                settled_ttl_ms=t.settled_ttl_ms,
                session_ttl_ms=t.session_ttl_ms,
            )
        )
        if outcome.status is SettleStatus.UNKNOWN:
            raise NotFound(
                "reservation_id",
                f"no reservation {settle.reservation_id!r} in session {settle.session_id!r} "
                "(never made, or settled longer ago than the settle window)",
            )
        already = outcome.status is SettleStatus.ALREADY_SETTLED
        # A repeated settle is compared too (its report is the first one's when the client
        # retries), so a server dying between settle and journal append loses no flag.
        anomalies = self._anomalies(settle, outcome.decided, outcome.cost_nano_usd, now_ms)
        if self._journal is not None:
            # Also when already settled: the append is idempotent per decision id, so a settle
            # retried because a server died between its settle and its append is journaled then.
            event = _journal_event(settle, outcome.cost_nano_usd, now_ms, anomalies)
            await self._journal.append(event, t.settled_ttl_ms)
        return Settlement(
            outcome.cost_nano_usd,
            outcome.spent_nano_usd + outcome.reserved_nano_usd,
            already,
            () if already else anomalies,
        )

    def _anomalies(
        self, settle: SettleCall, decided: DecidedCall | None, cost: int, now_ms: int
    ) -> tuple[SettleAnomaly, ...]:
        """How ``settle`` differs from what Decide admitted (nothing when that was not recorded)."""
        if decided is None:
            return ()
        same_model = settle.model.lower() == decided.model.lower()
        if not same_model:
            # Aliases and dated ids of one catalogue model are the same model.
            try:
                same_model = self._prices.lookup(settle.model).name == self._prices.lookup(decided.model).name
            except InvalidArgument:
                same_model = False  # an unpriced name (--unknown-model-price reject) is another model
        return settle_anomalies(
            decided,
            model=settle.model,
            same_model=same_model,
            usage=settle.usage,
            provider_ok=settle.provider_ok,
            cost_nano_usd=cost,
            settle_delay_ms=max(0, now_ms - decision_id_time_ms(settle.reservation_id)),
            thresholds=self._anomaly_thresholds,
        )


def _journal_event(
    settle: SettleCall, cost: int, now_ms: int, anomalies: tuple[SettleAnomaly, ...] = ()
) -> JournalEvent:
    u = settle.usage
    return JournalEvent(
        decision_id=settle.reservation_id,
        tenant=settle.tenant,
        session_id=settle.session_id,
        time_ms=now_ms,
        effective_model=settle.model,
        provider_ok=settle.provider_ok,
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cache_read_input_tokens=u.cache_read_input_tokens,
        cache_write_input_tokens=u.cache_write_input_tokens,
        cost_nano_usd=cost,
        context=settle.context,
        anomalies=anomalies,
    )


def _remaining(config: EnforcementConfig, committed: int) -> int | None:
    if config.max_session_nano_usd is None:
        return None
    return max(0, config.max_session_nano_usd - committed)


def _block_reason(rule: Rule, config: EnforcementConfig, outcome: ReserveOutcome, call: Call) -> str:
    if rule is Rule.DUPLICATE_REQUEST:
        return (
            "an identical request was admitted in this session within "
            f"dedup_ttl_seconds {config.dedup_ttl_seconds}"
        )
    if rule is Rule.TOOL_CALL_LIMIT:
        return (
            f"tool calls would reach {outcome.tool_calls + call.tool_call_count}, "
            f"above max_tool_calls {config.max_tool_calls}"
        )
    cap = config.max_session_nano_usd or 0
    committed = outcome.spent_nano_usd + outcome.reserved_nano_usd
    if config.budget_mode is BudgetMode.STRICT:
        return (
            f"session spend {format_usd(committed)} plus this call's estimate would exceed "
            f"max_session_usd {format_usd(cap)} (strict mode); start a new session id"
        )
    return (
        f"session spend {format_usd(committed)} has reached max_session_usd {format_usd(cap)}; "
        "start a new session id"
    )


def _memo(
    decision_id: str, verdict: Verdict, model: str, rule: Rule | None, estimate: int, reason: str
) -> str:
    # What a retried request id must get back unchanged.
    return json.dumps([decision_id, int(verdict), model, int(rule or 0), estimate, reason])


def _unmemo(memo: str) -> tuple[str, Verdict, str, Rule | None, int, str]:
    decision_id, verdict, model, rule, estimate, reason = json.loads(memo)
    return decision_id, Verdict(verdict), model, Rule(rule) if rule else None, estimate, reason
