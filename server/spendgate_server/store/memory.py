"""Embedded store: one process, nothing to install. Same contract as the Redis store.

Each method runs without awaiting, so on the event loop it is atomic; the logic
mirrors lua/decide.lua and lua/settle.lua step for step.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from spendgate_server.rule_codes import Rule
from spendgate_server.store.base import (
    SHADOW_BITS,
    CancelRequest,
    CancelStatus,
    DecidedCall,
    ReserveOutcome,
    ReserveRequest,
    ReserveStatus,
    SessionKey,
    SessionState,
    SettleOutcome,
    SettleRecord,
    SettleRequest,
    SettleStatus,
    Store,
    shadow_rules_from_mask,
)

__all__ = ["MemoryStore"]

# Sweep idle sessions once per this many calls, so memory stays bounded without a timer.
_SWEEP_EVERY = 4096


@dataclass(slots=True)
class _Session:
    spent: int = 0
    reserved: int = 0
    tools: int = 0
    open: dict[str, int] = field(default_factory=dict)  # reservation id -> estimate
    expired: dict[str, int] = field(default_factory=dict)  # id -> estimate counted at expiry
    settled: dict[str, int] = field(default_factory=dict)  # id -> cost counted
    memos: dict[str, str] = field(default_factory=dict)  # request id -> memo
    dedup_until: dict[str, int] = field(default_factory=dict)  # fingerprint -> due ms
    # reservation id -> (fingerprint, due ms) of the dedup mark its admission set
    marks: dict[str, tuple[str, int]] = field(default_factory=dict)
    decided: dict[str, DecidedCall] = field(default_factory=dict)  # id -> what Decide admitted
    tombstones: set[str] = field(default_factory=set)  # ids cancelled before their reserve ran
    replayed: set[str] = field(default_factory=set)  # request ids whose memo reached a client
    # (due ms, kind, key): a lazy timer wheel like the Redis expiry zset.
    due: list[tuple[int, str, str]] = field(default_factory=list)
    idle_until_ms: int = 0

    def schedule(self, due_ms: int, kind: str, key: str) -> None:
        heapq.heappush(self.due, (due_ms, kind, key))

    def expire_due(self, now_ms: int, forget_ms: int) -> None:
        while self.due and self.due[0][0] <= now_ms:
            due_ms, kind, key = heapq.heappop(self.due)
            if kind == "r":
                estimate = self.open.pop(key, None)
                if estimate is not None:
                    # Unsettled: assume it was spent at its estimate.
                    self.reserved -= estimate
                    self.spent += estimate
                    self.expired[key] = estimate
                    self.schedule(now_ms + forget_ms, "x", key)
            elif kind == "f":
                # A newer admission may have pushed the dedup window further out.
                if self.dedup_until.get(key) == due_ms:
                    del self.dedup_until[key]
            elif kind == "x":
                # A settle after the expiry took the id over (its "d" record forgets it).
                if self.expired.pop(key, None) is not None:
                    self.marks.pop(key, None)
                    self.decided.pop(key, None)
            elif kind == "d":
                self.settled.pop(key, None)
                self.decided.pop(key, None)
            elif kind == "k":
                self.tombstones.discard(key)
            else:
                self.memos.pop(key, None)
                self.replayed.discard(key)


class MemoryStore(Store):
    """State in this process's memory; lost on exit, not shared between processes."""

    def __init__(self) -> None:
        self._sessions: dict[SessionKey, _Session] = {}
        self._calls = 0

    def _session(self, key: SessionKey, now_ms: int, forget_ms: int) -> _Session:
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0:
            self._sessions = {k: s for k, s in self._sessions.items() if s.idle_until_ms > now_ms}
        session = self._sessions.get(key)
        if session is None or session.idle_until_ms <= now_ms:
            session = self._sessions[key] = _Session()
        session.expire_due(now_ms, forget_ms)
        return session

    async def reserve(self, request: ReserveRequest) -> ReserveOutcome:
        now = request.now_ms
        s = self._session(request.session, now, request.session_ttl_ms)

        def outcome(status: ReserveStatus, rule: Rule | None = None, mask: int = 0) -> ReserveOutcome:
            return ReserveOutcome(
                status,
                s.spent,
                s.reserved,
                s.tools,
                rule,
                shadow_rules_from_mask(mask),
                s.memos.get(request.request_id, "") if status is ReserveStatus.REPLAYED else "",
            )

        if request.reservation_id in s.tombstones:
            return outcome(ReserveStatus.CANCELLED)
        if request.request_id and request.request_id in s.memos:
            s.replayed.add(request.request_id)
            return outcome(ReserveStatus.REPLAYED)

        mask = 0
        dedup, tools, budget = request.dedup, request.tools, request.budget
        if dedup is not None and s.dedup_until.get(dedup.fingerprint, 0) > now:
            if not dedup.shadow:
                return outcome(ReserveStatus.BLOCKED, Rule.DUPLICATE_REQUEST)
            mask |= SHADOW_BITS[Rule.DUPLICATE_REQUEST]
        if tools is not None and s.tools + request.tool_call_count > tools.cap:
            if not tools.shadow:
                return outcome(ReserveStatus.BLOCKED, Rule.TOOL_CALL_LIMIT)
            mask |= SHADOW_BITS[Rule.TOOL_CALL_LIMIT]
        if budget is not None:
            committed = s.spent + s.reserved
            if budget.strict:
                over = committed + request.estimate_nano_usd > budget.cap_nano_usd
            else:
                over = committed >= budget.cap_nano_usd
            if over:
                if not budget.shadow:
                    return outcome(ReserveStatus.BLOCKED, Rule.SESSION_BUDGET)
                mask |= SHADOW_BITS[Rule.SESSION_BUDGET]

        rid = request.reservation_id
        if request.decided is not None:
            s.decided[rid] = request.decided
        s.open[rid] = request.estimate_nano_usd
        s.reserved += request.estimate_nano_usd
        s.schedule(now + request.reservation_ttl_ms, "r", rid)
        s.tools += request.tool_call_count
        if dedup is not None:
            s.dedup_until[dedup.fingerprint] = now + dedup.ttl_ms
            s.schedule(now + dedup.ttl_ms, "f", dedup.fingerprint)
            s.marks[rid] = (dedup.fingerprint, now + dedup.ttl_ms)
        if request.request_id:
            s.memos[request.request_id] = request.memo
            s.schedule(now + request.reservation_ttl_ms, "q", request.request_id)
        s.idle_until_ms = now + request.session_ttl_ms
        return outcome(ReserveStatus.ALLOWED, None, mask)

    async def settle(self, request: SettleRequest) -> SettleOutcome:
        now = request.now_ms
        s = self._session(request.session, now, request.session_ttl_ms)
        rid, cost = request.reservation_id, request.cost_nano_usd
        decided = s.decided.get(rid)
        if rid in s.settled:
            return SettleOutcome(SettleStatus.ALREADY_SETTLED, s.settled[rid], s.spent, s.reserved, decided)
        if rid in s.open:
            s.reserved -= s.open.pop(rid)
            s.spent += cost
        elif rid in s.expired:
            # It was counted at its estimate when it expired; correct to the real cost.
            s.spent += cost - s.expired.pop(rid)
        else:
            return SettleOutcome(SettleStatus.UNKNOWN, 0, s.spent, s.reserved)
        mark = s.marks.pop(rid, None)
        # Only the mark this admission set: a later admission of the same request renewed it.
        if request.release_dedup and mark is not None and s.dedup_until.get(mark[0]) == mark[1]:
            del s.dedup_until[mark[0]]
        s.settled[rid] = cost
        s.schedule(now + request.settled_ttl_ms, "d", rid)
        s.idle_until_ms = now + request.session_ttl_ms
        return SettleOutcome(SettleStatus.SETTLED, cost, s.spent, s.reserved, decided)

    async def settle_record(
        self, session: SessionKey, reservation_id: str, now_ms: int
    ) -> SettleRecord | None:
        s = self._sessions.get(session)
        if s is None or s.idle_until_ms <= now_ms or reservation_id not in s.settled:
            return None
        return SettleRecord(s.settled[reservation_id], s.decided.get(reservation_id))

    async def cancel(self, request: CancelRequest) -> CancelStatus:
        now = request.now_ms
        s = self._session(request.session, now, request.session_ttl_ms)
        rid = request.reservation_id
        if rid in s.settled or (request.request_id and request.request_id in s.replayed):
            return CancelStatus.KEPT
        if rid not in s.open and rid not in s.expired:
            s.tombstones.add(rid)
            s.schedule(now + request.tombstone_ttl_ms, "k", rid)
            s.idle_until_ms = max(s.idle_until_ms, now + request.session_ttl_ms)
            return CancelStatus.TOMBSTONED
        if rid in s.open:
            s.reserved -= s.open.pop(rid)
        else:
            s.spent -= s.expired.pop(rid)
        s.tools -= request.tool_call_count
        mark = s.marks.pop(rid, None)
        # Only the mark this admission set: a later admission of the same request renewed it.
        if mark is not None and s.dedup_until.get(mark[0]) == mark[1]:
            del s.dedup_until[mark[0]]
        s.decided.pop(rid, None)
        if request.request_id:
            s.memos.pop(request.request_id, None)
        s.idle_until_ms = now + request.session_ttl_ms
        return CancelStatus.CANCELLED

    async def session_state(self, session: SessionKey, now_ms: int, session_ttl_ms: int) -> SessionState:
        s = self._session(session, now_ms, session_ttl_ms)
        return SessionState(s.spent, s.reserved, s.tools, len(s.open))

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._sessions.clear()
