"""The decision engine: rules, effective config, decide and settle. Pure Python over a Store."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from spendgate_server.engine.anomalies import AnomalyThresholds, SettleAnomaly, settle_anomalies
from spendgate_server.engine.cancellations import ReserveCanceller
from spendgate_server.engine.config import BudgetMode, EnforcementConfig, Rule, config_to_dict
from spendgate_server.engine.deny_cache import DenyCache
from spendgate_server.engine.events import CallContext, Journal, JournalEvent, JournalIntent
from spendgate_server.engine.pricing import PriceTable, Usage
from spendgate_server.engine.quota import SessionQuota
from spendgate_server.engine.remote_config import ConfigResolver
from spendgate_server.engine.rules import (
    STATEFUL_RULES,
    STATELESS_RULES,
    Draft,
    Effect,
    StatefulRule,
    StoreView,
    unit_for,
    usage_estimate,
)
from spendgate_server.errors import FieldViolation, InvalidArgument, NotFound, StoreUnavailable
from spendgate_server.store import (
    DecidedCall,
    ReserveOutcome,
    ReserveRequest,
    ReserveStatus,
    SessionKey,
    SettleRequest,
    SettleStatus,
    Store,
)
from spendgate_server.store.breaker import BreakerOpen

__all__ = [
    "Call",
    "Clock",
    "Decision",
    "DecisionEngine",
    "EngineTimings",
    "SettleAnswer",
    "SettleCall",
    "Settlement",
    "Verdict",
    "decision_id_time_ms",
    "new_decision_id",
    "request_digest",
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
    # The worst case in the units the endpoint bills (DecideRequest.max_usage); when set it
    # prices the reservation, and input_tokens only feeds token_ceiling.
    max_usage: Usage | None = None


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
    # session_spend_nano_usd split in two: what settled (or expired) calls cost, and what
    # open reservations hold. Both 0 when the spend was not read (a ceiling block).
    settled_spend_nano_usd: int = 0
    reserved_nano_usd: int = 0
    # The block can lift once the calls in flight settle; no new session id is needed.
    unblocks_on_settle: bool = False

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


class SettleAnswer:
    """A settle the store has applied, answered before its journal work (DecisionEngine.settle_first).

    ``settlement`` is what the reply needs; its ``anomalies`` are known once :meth:`finish`
    has run.
    """

    __slots__ = ("_decided", "_done", "_engine", "_event", "_intent", "_now_ms", "_settle", "settlement")

    def __init__(
        self,
        engine: DecisionEngine,
        settle: SettleCall,
        settlement: Settlement,
        decided: DecidedCall | None,
        now_ms: int,
        intent: JournalIntent | None,
    ) -> None:
        self._engine = engine
        self._settle = settle
        self.settlement = settlement
        self._decided = decided
        self._now_ms = now_ms
        self._intent = intent
        self._event: JournalEvent | None = None
        self._done: Settlement | None = None

    def event(self) -> JournalEvent:
        """The call's journal event: the cost the store counted, the anomalies against its decision.

        A repeated settle is compared too (a retried settle repeats the first report), so a
        server dying between its settle and its journal append loses no flag.
        """
        if self._event is None:
            self._event = self._engine._settled_event(
                self._settle, self.settlement.cost_nano_usd, self._decided, self._now_ms
            )
        return self._event

    def finish(self) -> Settlement:
        """Journal the event after the reply (through the intent's commit: an append in the
        background; also when already settled, as the append is idempotent per decision id)
        and return the Settlement with the anomalies it counted (none when already settled).
        Runs its work once; later calls return the same Settlement.
        """
        if self._done is None:
            event = self.event()
            if self._intent is not None:
                intent, self._intent = self._intent, None
                intent.commit(event)
            self._done = (
                self.settlement
                if self.settlement.already_settled or not event.anomalies
                else replace(self.settlement, anomalies=event.anomalies)
            )
        return self._done


@dataclass(frozen=True, slots=True)
class _Spend:
    """A session's spend as the store (or the deny cache) reported it."""

    settled_nano_usd: int
    reserved_nano_usd: int


@dataclass(slots=True)
class _Answer:
    """The decision being made; every Decision is built here, by keyword."""

    call: Call
    config: EnforcementConfig
    version: int
    decision_id: str
    verdict: Verdict = Verdict.ALLOW
    rule: Rule | None = None
    reason: str = "allowed"
    shadow: set[Rule] = field(default_factory=set)

    def _build(
        self,
        *,
        verdict: Verdict,
        effective_model: str,
        rule: Rule | None,
        reason: str,
        decision_id: str,
        estimate_nano_usd: int,
        spend: _Spend | None,
        shadow: frozenset[Rule],
        unblocks_on_settle: bool = False,
    ) -> Decision:
        # spend is None when the store was not asked (a ceiling block).
        committed = None if spend is None else spend.settled_nano_usd + spend.reserved_nano_usd
        return Decision(
            verdict=verdict,
            effective_model=effective_model,
            rule=rule,
            reason=reason,
            decision_id=decision_id,
            reservation_id="" if verdict is Verdict.BLOCK else decision_id,
            estimated_cost_nano_usd=estimate_nano_usd,
            session_spend_nano_usd=committed or 0,
            remaining_budget_nano_usd=None if committed is None else _remaining(self.config, committed),
            config_version=self.version,
            shadow_rules=shadow,
            budget_nano_usd=self.config.max_session_nano_usd,
            settled_spend_nano_usd=0 if spend is None else spend.settled_nano_usd,
            reserved_nano_usd=0 if spend is None else spend.reserved_nano_usd,
            unblocks_on_settle=unblocks_on_settle,
        )

    def allowed(self, draft: Draft, spend: _Spend) -> Decision:
        """The store admitted the call (on ``draft.model``, downgraded or not)."""
        reason = self.reason
        if self.shadow and self.rule is None:
            reason = "allowed; shadow mode: " + ", ".join(r.key for r in sorted(self.shadow)) + " fired"
        return self._build(
            verdict=self.verdict,
            effective_model=draft.model,
            rule=self.rule,
            reason=reason,
            decision_id=self.decision_id,
            estimate_nano_usd=draft.estimate_nano_usd,
            spend=spend,
            shadow=frozenset(self.shadow),
        )

    def blocked(
        self,
        rule: Rule,
        reason: str,
        estimate_nano_usd: int,
        spend: _Spend | None = None,
        *,
        unblocks_on_settle: bool = False,
    ) -> Decision:
        """A block by ``rule``: it names the requested model and reserves nothing."""
        return self._build(
            verdict=Verdict.BLOCK,
            effective_model=self.call.model,
            rule=rule,
            reason=reason,
            decision_id=self.decision_id,
            estimate_nano_usd=estimate_nano_usd,
            spend=spend,
            shadow=frozenset(self.shadow),
            unblocks_on_settle=unblocks_on_settle,
        )

    def memo(self, draft: Draft) -> str:
        """What a retried request id must get back unchanged, if the store admits this call.

        It ends with the digest of the request's content, so a request id reused for
        another request is recognised.
        """
        return json.dumps(
            [
                self.decision_id,
                int(self.verdict),
                draft.model,
                int(self.rule or 0),
                draft.estimate_nano_usd,
                self.reason,
                request_digest(self.call),
            ]
        )

    def replayed(self, memo: str, spend: _Spend) -> Decision:
        """The decision stored under the call's request id, with the session's spend now.

        Raises:
            InvalidArgument: on ``request_id``, when the stored decision answered another request.
        """
        decision_id, verdict, model, rule, estimate, reason, *digest = json.loads(memo)
        # A memo written before digests were kept has none: it replays as it did then.
        if digest and digest[0] != request_digest(self.call):
            raise InvalidArgument(
                [
                    FieldViolation(
                        "request_id",
                        f"{self.call.request_id!r} was already used in this session for a different "
                        "request (model, tokens, fingerprint, tool calls, project or enforcement_config "
                        "differ); a retry must repeat its request exactly, a new request needs a new id",
                    )
                ]
            )
        return self._build(
            verdict=Verdict(verdict),
            effective_model=model,
            rule=Rule(rule) if rule else None,
            reason=reason,
            decision_id=decision_id,
            estimate_nano_usd=estimate,
            spend=spend,
            shadow=frozenset(),
        )


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
    def timings(self) -> EngineTimings:
        """The lifetimes this engine applies (the journal's dedup window is ``settled_ttl_ms``)."""
        return self._timings

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
            try:
                resolved = await self._configs.load(call.tenant, call.project)
            except StoreUnavailable as exc:
                # Before the atomic step: a Decide that fails here has written nothing.
                raise StoreUnavailable(f"{exc}; nothing is reserved (the config could not be read)") from exc
        if call.client_config is None:
            return resolved.config, resolved.version
        downgrade = call.client_config.model_downgrade
        if downgrade is not None and not self._prices.lookup(downgrade.fallback_model).known:
            # As UpdateConfig refuses it: a fallback with no known price would be charged the
            # never-undercount maximum, far above the model it was meant to save on.
            raise InvalidArgument(
                [
                    FieldViolation(
                        "enforcement_config.model_downgrade.fallback_model",
                        f"no price is known for {downgrade.fallback_model!r}: "
                        "a downgrade needs a priced fallback",
                    )
                ]
            )
        return resolved.config.stricter(call.client_config), resolved.version

    async def decide(self, call: Call) -> Decision:
        """Decide one call: the stateless rules in table order, then the one atomic store step."""
        config, version = await self.effective_config(call)
        now_ms = self._clock()
        answer = _Answer(call, config, version, new_decision_id(now_ms))
        if call.max_usage is None:
            estimate = self._prices.lookup(call.model).estimate(call.input_tokens, call.max_output_tokens)
        else:
            estimate = usage_estimate(self._prices, call.model, call.max_usage)
        draft = Draft(
            call.input_tokens, call.max_output_tokens, call.model, estimate, self._prices, call.max_usage
        )

        for unit in STATELESS_RULES:
            fired = unit.check(config, draft)
            if fired is None:
                continue
            if config.is_shadow(unit.rule):
                answer.shadow.add(unit.rule)
            elif unit.effect is Effect.BLOCK:
                return answer.blocked(unit.rule, fired, draft.estimate_nano_usd)
            else:
                answer.verdict, answer.rule, answer.reason = Verdict.ALLOW_DOWNGRADED, unit.rule, fired
                unit.apply(config, draft)

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
                spend = _Spend(denied.settled_nano_usd, denied.reserved_nano_usd)
                return self._blocked_by_store(answer, Rule.SESSION_BUDGET, spend, draft)
        memo = answer.memo(draft) if call.request_id else ""
        if self._quota is not None:
            # Before anything is written: a session past the tenant's quota leaves no state.
            await self._quota.admit(call.tenant, call.session_id, now_ms)
        request = self._reserve_request(
            call, config, answer.decision_id, draft.estimate_nano_usd, memo, now_ms, model=draft.model
        )
        outcome = await self._reserve(request)
        answer.shadow |= outcome.shadow_fired
        spend = _Spend(outcome.spent_nano_usd, outcome.reserved_nano_usd)

        if outcome.status is ReserveStatus.REPLAYED:
            return answer.replayed(outcome.memo, spend)
        if outcome.status is ReserveStatus.BLOCKED:
            assert outcome.blocked_by is not None
            if cacheable and outcome.blocked_by is Rule.SESSION_BUDGET:
                assert self._deny is not None and cap is not None
                committed = outcome.spent_nano_usd + outcome.reserved_nano_usd
                self._deny.remember(
                    call.tenant, call.session_id, committed, cap, now_ms, outcome.reserved_nano_usd
                )
            return self._blocked_by_store(answer, outcome.blocked_by, spend, draft, outcome.tool_calls)
        return answer.allowed(draft, spend)

    @staticmethod
    def _blocked_by_store(
        answer: _Answer, rule: Rule, spend: _Spend, draft: Draft, tool_calls: int = 0
    ) -> Decision:
        """A block by a stateful rule, with its unit's reason for what the store (or deny cache) saw."""
        unit = unit_for(rule)
        assert isinstance(unit, StatefulRule)
        view = StoreView(
            spend.settled_nano_usd,
            spend.reserved_nano_usd,
            tool_calls,
            answer.call.tool_call_count,
            draft.estimate_nano_usd,
        )
        return answer.blocked(
            rule,
            unit.block_reason(answer.config, view),
            draft.estimate_nano_usd,
            spend,
            unblocks_on_settle=unit.unblocks_on_settle(answer.config, view),
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
        """The atomic step's request: the session's bookkeeping and each stateful rule's arguments."""
        t = self._timings
        checks: dict[str, Any] = {}
        for unit in STATEFUL_RULES:
            checks.update(unit.store_args(config, call))
        return ReserveRequest(
            session=SessionKey(call.tenant, call.session_id),
            now_ms=now_ms,
            reservation_id=decision_id,
            estimate_nano_usd=estimate,
            reservation_ttl_ms=t.reservation_ttl_ms,
            session_ttl_ms=t.session_ttl_ms,
            tool_call_count=call.tool_call_count,
            request_id=call.request_id,
            memo=memo,
            decided=DecidedCall(model or call.model, estimate, call.input_tokens, call.max_output_tokens),
            **checks,
        )

    async def settle(self, settle: SettleCall) -> Settlement:
        """Replace a reservation with the real cost (zero when the provider call failed), and
        journal the call: :meth:`settle_first`, then its :meth:`SettleAnswer.finish` at once.

        Raises:
            NotFound: the reservation id is unknown to this session, or long expired.
            InvalidArgument: the usage counts contradict each other (nothing is settled).
        """
        return (await self.settle_first(settle)).finish()

    async def settle_first(self, settle: SettleCall) -> SettleAnswer:
        """Settle up to what the reply needs: the store's outcome (cost, session spend, whether
        the call was already settled), the journal event stored as an intent.

        The call's journal event, its anomalies and its append are left to the answer's
        :meth:`~SettleAnswer.finish`, which the caller runs once it has replied: until then
        the event is durable through its intent (if ``finish`` never runs, the journal
        sweeper rebuilds the event from the intent and the store's settle record). When
        there is no intent (a journal without them, or the intent's write failed), the
        append is awaited here instead, as the reply must then wait for it, and ``finish``
        only returns the Settlement.

        Raises:
            NotFound: the reservation id is unknown to this session, or long expired.
            InvalidArgument: the usage counts contradict each other (nothing is settled).
        """
        cost = self._prices.cost(settle.model, settle.usage) if settle.provider_ok else 0
        if self._deny is not None:
            self._deny.forget(settle.tenant, settle.session_id)
        t = self._timings
        now_ms = self._clock()
        # The journal's intent is written in this turn, so on the pipelined connection it leaves
        # in the settle script's write: both stores overlap, one round trip. If the settle fails
        # (or its caller gives up), the intent stays: the sweeper journals the call if the store
        # applied the settle after all, and drops the intent if it did not.
        intent = (
            None
            if self._journal is None
            else self._journal.intend(_journal_event(settle, cost, now_ms), t.settled_ttl_ms)
        )
        outcome = await self._store.settle(
            SettleRequest(
                session=SessionKey(settle.tenant, settle.session_id),
                now_ms=now_ms,
                reservation_id=settle.reservation_id,
                cost_nano_usd=cost,
                settled_ttl_ms=t.settled_ttl_ms,
                session_ttl_ms=t.session_ttl_ms,
                # A refused call never reached the provider: its identical retry must not be
                # blocked as a duplicate of it.
                release_dedup=not settle.provider_ok,
            )
        )
        if outcome.status is SettleStatus.UNKNOWN:
            if intent is not None:
                intent.abandon()
            raise NotFound(
                "reservation_id",
                f"no reservation {settle.reservation_id!r} in session {settle.session_id!r} "
                "(never made, or settled longer ago than the settle window)",
            )
        settlement = Settlement(
            outcome.cost_nano_usd,
            outcome.spent_nano_usd + outcome.reserved_nano_usd,
            outcome.status is SettleStatus.ALREADY_SETTLED,
        )
        recorded = intent if intent is not None and await intent.recorded() else None
        answer = SettleAnswer(self, settle, settlement, outcome.decided, now_ms, recorded)
        if self._journal is not None and recorded is None:
            # No intent makes the event durable: the reply waits for its append.
            await self._journal.append(answer.event(), t.settled_ttl_ms)
            answer.finish()
        return answer

    async def recovered_event(self, draft: JournalEvent) -> JournalEvent | None:
        """The journal event of a settle whose append may never have happened, from its intent.

        ``draft`` is the intent (the event as known before the store's reply, see
        :meth:`Journal.intend`). The store's settle record gives the cost it counted and
        what Decide admitted; the event is then built as :meth:`settle` builds it, the
        anomalies judged at the settle's own time. None when the store has no settle of
        the decision (the settle never ran, found no reservation, or is forgotten).

        Raises:
            StoreUnavailable: the store did not answer.
        """
        session = SessionKey(draft.tenant, draft.session_id)
        record = await self._store.settle_record(session, draft.decision_id, self._clock())
        if record is None:
            return None
        settle = SettleCall(
            tenant=draft.tenant,
            session_id=draft.session_id,
            reservation_id=draft.decision_id,
            model=draft.effective_model,
            usage=Usage(
                draft.input_tokens,
                draft.output_tokens,
                draft.cache_read_input_tokens,
                draft.cache_write_input_tokens,
            ),
            provider_ok=draft.provider_ok,
            context=draft.context,
        )
        return self._settled_event(settle, record.cost_nano_usd, record.decided, draft.time_ms)

    def _settled_event(
        self, settle: SettleCall, cost: int, decided: DecidedCall | None, now_ms: int
    ) -> JournalEvent:
        """The journal event of ``settle`` counted at ``cost``, with its anomalies against ``decided``."""
        anomalies = self._anomalies(settle, decided, cost, now_ms)
        return _journal_event(settle, cost, now_ms, anomalies)

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


def request_digest(call: Call) -> str:
    """A digest of what a Decide asks (not of who asks it or when), stored with its decision.

    Two calls with the same request id must be the same request: same model, token
    counts, fingerprint, tool calls, project and client config.
    """
    client_config = None if call.client_config is None else config_to_dict(call.client_config)
    content = [
        call.model,
        call.input_tokens,
        call.max_output_tokens,
        call.fingerprint.hex(),
        call.tool_call_count,
        call.project,
        client_config,
    ]
    if call.max_usage is not None:
        # Appended only when set, so the digests of memos stored before max_usage still match.
        content.append([sorted(call.max_usage.counts.items()), call.max_usage.service_tier])
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _remaining(config: EnforcementConfig, committed: int) -> int | None:
    if config.max_session_nano_usd is None:
        return None
    return max(0, config.max_session_nano_usd - committed)
