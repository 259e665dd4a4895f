"""The Store interface: the one atomic step of Decide and of Settle, over shared state.

Both implementations (memory, redis) pass the same contract suite
(tests/test_store_contract.py). All times come from the caller's clock as Unix
milliseconds, so expiry is testable without sleeping and identical across pods.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass

from spendgate_server.rule_codes import Rule

__all__ = [
    "BudgetCheck",
    "CancelRequest",
    "CancelStatus",
    "DecidedCall",
    "DedupCheck",
    "ReserveOutcome",
    "ReserveRequest",
    "ReserveStatus",
    "SessionKey",
    "SessionState",
    "SettleOutcome",
    "SettleRecord",
    "SettleRequest",
    "SettleStatus",
    "Store",
    "ToolCheck",
]


@dataclass(frozen=True, slots=True)
class SessionKey:
    """A session is scoped to its tenant: equal session ids of two tenants never meet."""

    tenant: str
    session_id: str


@dataclass(frozen=True, slots=True)
class DedupCheck:
    """Block when ``fingerprint`` was admitted within the last ``ttl_ms``."""

    fingerprint: str
    ttl_ms: int
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class ToolCheck:
    """Block when the session's tool calls plus this request's would exceed ``cap``."""

    cap: int
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """Session budget. Crossing: allow while spent+reserved < cap. Strict: while it stays <= cap."""

    cap_nano_usd: int
    strict: bool = False
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class DecidedCall:
    """What Decide admitted, kept beside its reservation so a Settle can be compared with it.

    Kept from the reservation until the record of its settle (or of its expiry) is
    forgotten, so every settle of it, repeated ones included, gets it back.
    """

    # The effective model (after any downgrade) the call was priced on.
    model: str
    estimate_nano_usd: int
    input_tokens: int
    max_output_tokens: int

    def encode(self) -> str:
        """The stored form: four space-separated fields (a model name holds no space)."""
        return f"{self.model} {self.estimate_nano_usd} {self.input_tokens} {self.max_output_tokens}"

    @classmethod
    def decode(cls, text: str | bytes) -> DecidedCall | None:
        """Parse what :meth:`encode` wrote; None for an empty or unreadable record."""
        parts = (text.decode() if isinstance(text, bytes) else text).split(" ")
        if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts[1:]):
            return None
        return cls(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """Everything the atomic step needs: checks to run and, if they pass, what to record."""

    session: SessionKey
    now_ms: int
    reservation_id: str
    estimate_nano_usd: int
    reservation_ttl_ms: int
    # Idle sessions vanish after this; it is also how long an expired reservation
    # is remembered, so a late Settle can still correct it.
    session_ttl_ms: int
    tool_call_count: int = 0
    dedup: DedupCheck | None = None
    tools: ToolCheck | None = None
    budget: BudgetCheck | None = None
    # Idempotency: a second request with this id replays ``memo`` and changes nothing.
    request_id: str = ""
    memo: str = ""
    # Kept with the reservation and handed back by settle (SettleOutcome.decided).
    decided: DecidedCall | None = None


class ReserveStatus(enum.IntEnum):
    """Outcome of the atomic step (values are the Lua script's status codes)."""

    ALLOWED = 0
    BLOCKED = 1
    REPLAYED = 2
    # A cancel (CancelRequest) for this reservation id arrived first: nothing changed.
    CANCELLED = 3


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    """What the step did, and the session's state after it."""

    status: ReserveStatus
    spent_nano_usd: int
    reserved_nano_usd: int
    tool_calls: int
    blocked_by: Rule | None = None
    shadow_fired: frozenset[Rule] = frozenset()
    memo: str = ""


@dataclass(frozen=True, slots=True)
class SettleRequest:
    """Replace a reservation with the cost actually counted (0 releases it)."""

    session: SessionKey
    now_ms: int
    reservation_id: str
    cost_nano_usd: int
    # How long a settled id is remembered, so a repeated Settle is recognised.
    settled_ttl_ms: int
    session_ttl_ms: int
    # The provider refused the call: also remove the dedup mark its admission set (if
    # it is still that admission's), in the same atomic step, so an identical retry
    # is not blocked as a duplicate of a call that never ran.
    release_dedup: bool = False


class SettleStatus(enum.IntEnum):
    """Outcome of a Settle (values are the Lua script's status codes)."""

    SETTLED = 0
    ALREADY_SETTLED = 1
    UNKNOWN = 2


@dataclass(frozen=True, slots=True)
class SettleOutcome:
    """What the settle did, and the session's state after it."""

    status: SettleStatus
    cost_nano_usd: int
    spent_nano_usd: int
    reserved_nano_usd: int
    # What Decide admitted (ReserveRequest.decided); None when it was not recorded.
    decided: DecidedCall | None = None


@dataclass(frozen=True, slots=True)
class SettleRecord:
    """What the store kept of a settle: the cost it counted and what Decide admitted.

    Kept for ``SettleRequest.settled_ttl_ms`` after the settle (the window in which a
    repeated settle is recognised), so a journal event whose append never happened can
    be rebuilt from it.
    """

    cost_nano_usd: int
    decided: DecidedCall | None = None


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Undo a reserve whose answer its caller never heard, or make sure it never applies.

    A Decide whose reserve timed out was answered UNAVAILABLE, yet a hung store may run
    the script later (it was already sent). The cancel removes what that reserve
    recorded (reservation, tool calls, its dedup mark, its request-id memo), or, when
    the reserve has not run, leaves a tombstone that makes it change nothing when it
    does. Built from the ReserveRequest that timed out.
    """

    session: SessionKey
    now_ms: int
    reservation_id: str
    request_id: str
    tool_call_count: int
    # How long the tombstone refuses a reserve of this id that arrives after the cancel.
    tombstone_ttl_ms: int
    session_ttl_ms: int

    @classmethod
    def undoing(cls, reserve: ReserveRequest, now_ms: int) -> CancelRequest:
        """The cancel of ``reserve`` (its dedup mark is found by the record the admission left)."""
        return cls(
            reserve.session,
            now_ms,
            reserve.reservation_id,
            reserve.request_id,
            reserve.tool_call_count,
            reserve.reservation_ttl_ms,
            reserve.session_ttl_ms,
        )


class CancelStatus(enum.IntEnum):
    """Outcome of a cancel (values are the Lua script's status codes)."""

    # The reserve had not run: a tombstone now makes it change nothing.
    TOMBSTONED = 0
    # The reserve had run: everything it recorded is undone.
    CANCELLED = 1
    # A client learned of the reservation (a retried request id replayed it, or it was
    # settled), so it stays: that client will settle it.
    KEPT = 2


@dataclass(frozen=True, slots=True)
class SessionState:
    """A session's counters, with due reservations already counted at their estimate."""

    spent_nano_usd: int
    reserved_nano_usd: int
    tool_calls: int
    open_reservations: int


# Bit per rule in the shadow mask the Lua script returns.
SHADOW_BITS = {Rule.DUPLICATE_REQUEST: 1, Rule.TOOL_CALL_LIMIT: 2, Rule.SESSION_BUDGET: 4}


def shadow_rules_from_mask(mask: int) -> frozenset[Rule]:
    """Decode the script's shadow bitmask."""
    return frozenset(rule for rule, bit in SHADOW_BITS.items() if mask & bit)


class Store(ABC):
    """Shared enforcement state. Implementations make each method one atomic step."""

    @abstractmethod
    async def reserve(self, request: ReserveRequest) -> ReserveOutcome:
        """Run dedup, tool-count and budget checks; if none blocks, record the call.

        All-or-nothing: a blocked outcome changes no state. Expired reservations are
        first counted as spent at their estimate (unsettled calls are assumed spent).
        """

    @abstractmethod
    async def settle(self, request: SettleRequest) -> SettleOutcome:
        """Replace a reservation by its actual cost; a repeated settle changes nothing.

        A reservation that already expired (counted at its estimate) is corrected to
        the actual cost. With ``release_dedup`` the dedup mark the reservation's
        admission set is removed too, unless a later admission has renewed it.
        """

    async def settle_record(
        self, session: SessionKey, reservation_id: str, now_ms: int
    ) -> SettleRecord | None:
        """The record of ``reservation_id``'s settle; None when it was never settled (or is forgotten).

        A read: nothing changes.

        Raises:
            StoreUnavailable: the store did not answer.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot read settle records")

    async def cancel(self, request: CancelRequest) -> CancelStatus:
        """Undo a reserve whose answer was never heard, or make sure it changes nothing when it runs.

        Raises:
            StoreUnavailable: the store did not answer; the caller tries again later.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot cancel reservations")

    @abstractmethod
    async def session_state(self, session: SessionKey, now_ms: int, session_ttl_ms: int) -> SessionState:
        """Read a session's counters, after counting due reservations at their estimate."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""
