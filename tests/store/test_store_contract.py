"""The Store contract: every test runs against the memory and the Redis store."""

from __future__ import annotations

from spendgate_server.engine.config import Rule
from spendgate_server.store import (
    BudgetCheck,
    DecidedCall,
    DedupCheck,
    ReserveRequest,
    ReserveStatus,
    SessionKey,
    SettleRecord,
    SettleRequest,
    SettleStatus,
    Store,
    ToolCheck,
)

NOW = 1_800_000_000_000
SESSION = SessionKey("tenant-a", "session-1")
RES_TTL = 60_000
SESSION_TTL = 3_600_000


def reserve(
    rid: str,
    estimate: int = 100,
    *,
    now: int = NOW,
    session: SessionKey = SESSION,
    **kwargs: object,
) -> ReserveRequest:
    return ReserveRequest(
        session=session,
        now_ms=now,
        reservation_id=rid,
        estimate_nano_usd=estimate,
        reservation_ttl_ms=RES_TTL,
        session_ttl_ms=SESSION_TTL,
        **kwargs,  # type: ignore[arg-type]
    )


def settle(rid: str, cost: int, *, now: int = NOW, session: SessionKey = SESSION) -> SettleRequest:
    return SettleRequest(session, now, rid, cost, settled_ttl_ms=RES_TTL, session_ttl_ms=SESSION_TTL)


async def test_allowed_call_is_reserved(store: Store) -> None:
    """An admitted call adds its estimate to the session's reservations."""
    outcome = await store.reserve(reserve("a" * 32, 250))
    assert outcome.status is ReserveStatus.ALLOWED
    assert (outcome.spent_nano_usd, outcome.reserved_nano_usd) == (0, 250)
    state = await store.session_state(SESSION, NOW, SESSION_TTL)
    assert (state.reserved_nano_usd, state.open_reservations) == (250, 1)


async def test_crossing_budget_allows_until_cap_is_reached(store: Store) -> None:
    """Crossing mode admits while spent+reserved is below the cap, so one call may cross it."""
    budget = BudgetCheck(cap_nano_usd=300)
    assert (await store.reserve(reserve("1" * 32, 200, budget=budget))).status is ReserveStatus.ALLOWED
    # 200 < 300: admitted although it takes the session to 400.
    assert (await store.reserve(reserve("2" * 32, 200, budget=budget))).status is ReserveStatus.ALLOWED
    blocked = await store.reserve(reserve("3" * 32, 1, budget=budget))
    assert (blocked.status, blocked.blocked_by) == (ReserveStatus.BLOCKED, Rule.SESSION_BUDGET)


async def test_crossing_budget_blocks_exactly_at_cap(store: Store) -> None:
    """At exactly the cap the session is used up."""
    budget = BudgetCheck(cap_nano_usd=300)
    await store.reserve(reserve("1" * 32, 300, budget=budget))
    assert (await store.reserve(reserve("2" * 32, 0, budget=budget))).status is ReserveStatus.BLOCKED


async def test_strict_budget_admits_only_what_fits(store: Store) -> None:
    """Strict mode admits a call only if it fits: exactly filling the cap is allowed."""
    budget = BudgetCheck(cap_nano_usd=300, strict=True)
    assert (await store.reserve(reserve("1" * 32, 200, budget=budget))).status is ReserveStatus.ALLOWED
    assert (await store.reserve(reserve("2" * 32, 101, budget=budget))).status is ReserveStatus.BLOCKED
    assert (await store.reserve(reserve("3" * 32, 100, budget=budget))).status is ReserveStatus.ALLOWED


async def test_blocked_call_changes_nothing(store: Store) -> None:
    """A blocked decision records no reservation, tool calls or dedup key."""
    await store.reserve(reserve("1" * 32, 500, tool_call_count=1))
    before = await store.session_state(SESSION, NOW, SESSION_TTL)
    blocked = await store.reserve(
        reserve(
            "2" * 32,
            10,
            tool_call_count=3,
            budget=BudgetCheck(100),
            dedup=DedupCheck("ab" * 16, 60_000),
        )
    )
    assert blocked.status is ReserveStatus.BLOCKED
    assert await store.session_state(SESSION, NOW, SESSION_TTL) == before
    # The dedup key was not set by the blocked call: the same fingerprint is admitted.
    again = await store.reserve(reserve("3" * 32, 10, dedup=DedupCheck("ab" * 16, 60_000)))
    assert again.status is ReserveStatus.ALLOWED


async def test_duplicate_blocked_within_ttl_and_admitted_after(store: Store) -> None:
    """The same fingerprint is blocked until its TTL has passed, and admitted exactly then."""
    dedup = DedupCheck("fp" * 16, 10_000)
    assert (await store.reserve(reserve("1" * 32, dedup=dedup))).status is ReserveStatus.ALLOWED
    blocked = await store.reserve(reserve("2" * 32, dedup=dedup, now=NOW + 9_999))
    assert (blocked.status, blocked.blocked_by) == (ReserveStatus.BLOCKED, Rule.DUPLICATE_REQUEST)
    later = await store.reserve(reserve("3" * 32, dedup=dedup, now=NOW + 10_000))
    assert later.status is ReserveStatus.ALLOWED


async def test_other_fingerprints_and_sessions_are_not_duplicates(store: Store) -> None:
    """Dedup is per fingerprint and per session."""
    await store.reserve(reserve("1" * 32, dedup=DedupCheck("aa" * 16, 10_000)))
    other_fp = await store.reserve(reserve("2" * 32, dedup=DedupCheck("bb" * 16, 10_000)))
    other_session = await store.reserve(
        reserve("3" * 32, dedup=DedupCheck("aa" * 16, 10_000), session=SessionKey("tenant-a", "s2"))
    )
    assert other_fp.status is other_session.status is ReserveStatus.ALLOWED


async def test_tool_cap_edge(store: Store) -> None:
    """Reaching max_tool_calls exactly is allowed; one more is blocked."""
    tools = ToolCheck(cap=5)
    assert (await store.reserve(reserve("1" * 32, tool_call_count=3, tools=tools))).tool_calls == 3
    assert (await store.reserve(reserve("2" * 32, tool_call_count=2, tools=tools))).tool_calls == 5
    blocked = await store.reserve(reserve("3" * 32, tool_call_count=1, tools=tools))
    assert (blocked.status, blocked.blocked_by) == (ReserveStatus.BLOCKED, Rule.TOOL_CALL_LIMIT)
    assert (
        await store.reserve(reserve("4" * 32, tool_call_count=0, tools=tools))
    ).status is ReserveStatus.ALLOWED


async def test_shadow_rules_report_but_admit(store: Store) -> None:
    """A rule in shadow mode fires into the shadow set and the call is still admitted."""
    await store.reserve(reserve("1" * 32, 100, dedup=DedupCheck("cc" * 16, 10_000)))
    outcome = await store.reserve(
        reserve(
            "2" * 32,
            100,
            tool_call_count=2,
            dedup=DedupCheck("cc" * 16, 10_000, shadow=True),
            tools=ToolCheck(1, shadow=True),
            budget=BudgetCheck(50, shadow=True),
        )
    )
    assert outcome.status is ReserveStatus.ALLOWED
    assert outcome.shadow_fired == {
        Rule.DUPLICATE_REQUEST,
        Rule.TOOL_CALL_LIMIT,
        Rule.SESSION_BUDGET,
    }
    assert outcome.reserved_nano_usd == 200


async def test_request_id_replays_and_reserves_once(store: Store) -> None:
    """A retried request id returns the stored memo and reserves nothing more."""
    first = await store.reserve(reserve("1" * 32, 100, request_id="req-1", memo="m1"))
    retry = await store.reserve(reserve("2" * 32, 100, request_id="req-1", memo="m2"))
    assert first.status is ReserveStatus.ALLOWED
    assert (retry.status, retry.memo, retry.reserved_nano_usd) == (
        ReserveStatus.REPLAYED,
        "m1",
        100,
    )


async def test_settle_replaces_reservation_once(store: Store) -> None:
    """Settle swaps the estimate for the actual cost; a second settle changes nothing."""
    await store.reserve(reserve("1" * 32, 1_000))
    done = await store.settle(settle("1" * 32, 400))
    assert (done.status, done.spent_nano_usd, done.reserved_nano_usd) == (
        SettleStatus.SETTLED,
        400,
        0,
    )
    again = await store.settle(settle("1" * 32, 999))
    assert (again.status, again.cost_nano_usd, again.spent_nano_usd) == (
        SettleStatus.ALREADY_SETTLED,
        400,
        400,
    )


async def test_settle_with_zero_releases(store: Store) -> None:
    """A provider error settles at zero: the reservation is released."""
    await store.reserve(reserve("1" * 32, 1_000))
    done = await store.settle(settle("1" * 32, 0))
    assert (done.spent_nano_usd, done.reserved_nano_usd) == (0, 0)


async def test_unknown_reservation(store: Store) -> None:
    """Settling an id that was never reserved is reported, and changes nothing."""
    outcome = await store.settle(settle("f" * 32, 10))
    assert (outcome.status, outcome.spent_nano_usd) == (SettleStatus.UNKNOWN, 0)


async def test_unsettled_reservation_expires_at_its_estimate(store: Store) -> None:
    """An unsettled reservation is counted as spent at its estimate once its TTL passes."""
    await store.reserve(reserve("1" * 32, 700))
    state = await store.session_state(SESSION, NOW + RES_TTL, SESSION_TTL)
    assert (state.spent_nano_usd, state.reserved_nano_usd, state.open_reservations) == (700, 0, 0)


async def test_late_settle_corrects_an_expired_reservation(store: Store) -> None:
    """A settle arriving after expiry replaces the estimate with the actual cost, once."""
    await store.reserve(reserve("1" * 32, 700))
    late = await store.settle(settle("1" * 32, 300, now=NOW + RES_TTL + 1))
    assert (late.status, late.spent_nano_usd, late.reserved_nano_usd) == (
        SettleStatus.SETTLED,
        300,
        0,
    )
    again = await store.settle(settle("1" * 32, 300, now=NOW + RES_TTL + 2))
    assert (again.status, again.spent_nano_usd) == (SettleStatus.ALREADY_SETTLED, 300)


async def test_expiry_keeps_the_budget_bound(store: Store) -> None:
    """Expiring a reservation moves it from reserved to spent: the budget still sees it."""
    budget = BudgetCheck(cap_nano_usd=500)
    await store.reserve(reserve("1" * 32, 500, budget=budget))
    blocked = await store.reserve(reserve("2" * 32, 1, budget=budget, now=NOW + RES_TTL + 1))
    assert (blocked.status, blocked.spent_nano_usd) == (ReserveStatus.BLOCKED, 500)


async def test_tenants_are_isolated(store: Store) -> None:
    """The same session id under two tenants shares nothing."""
    budget = BudgetCheck(cap_nano_usd=100)
    await store.reserve(reserve("1" * 32, 100, budget=budget, session=SessionKey("t1", "same")))
    other = await store.reserve(reserve("2" * 32, 100, budget=budget, session=SessionKey("t2", "same")))
    assert (other.status, other.reserved_nano_usd) == (ReserveStatus.ALLOWED, 100)
    foreign = await store.settle(settle("1" * 32, 5, session=SessionKey("t2", "same")))
    assert foreign.status is SettleStatus.UNKNOWN


def release(rid: str, *, now: int = NOW, session: SessionKey = SESSION) -> SettleRequest:
    """The settle of a call the provider refused: nothing counted, and its dedup mark released."""
    return SettleRequest(
        session, now, rid, 0, settled_ttl_ms=RES_TTL, session_ttl_ms=SESSION_TTL, release_dedup=True
    )


async def test_refused_call_releases_reservation_and_dedup_mark(store: Store) -> None:
    """A settle with release_dedup frees the reservation and the fingerprint in one step."""
    dedup = DedupCheck("aa" * 16, 60_000)
    await store.reserve(reserve("1" * 32, 500, dedup=dedup))
    blocked = await store.reserve(reserve("2" * 32, 500, dedup=dedup, now=NOW + 1))
    assert blocked.blocked_by is Rule.DUPLICATE_REQUEST
    done = await store.settle(release("1" * 32, now=NOW + 1_000))
    assert (done.status, done.spent_nano_usd, done.reserved_nano_usd) == (SettleStatus.SETTLED, 0, 0)
    retry = await store.reserve(reserve("3" * 32, 500, dedup=dedup, now=NOW + 1_001))
    assert (retry.status, retry.reserved_nano_usd) == (ReserveStatus.ALLOWED, 500)


async def test_a_call_that_ran_keeps_its_dedup_mark(store: Store) -> None:
    """Settling a call that ran (release_dedup off), even at zero cost, leaves its duplicates blocked."""
    dedup = DedupCheck("ab" * 16, 60_000)
    await store.reserve(reserve("1" * 32, 500, dedup=dedup))
    await store.settle(settle("1" * 32, 0, now=NOW + 1_000))
    again = await store.reserve(reserve("2" * 32, 500, dedup=dedup, now=NOW + 1_001))
    assert again.blocked_by is Rule.DUPLICATE_REQUEST


async def test_release_never_removes_a_later_admissions_mark(store: Store) -> None:
    """After the mark expired and the request was admitted again, releasing the first keeps the new mark."""
    dedup = DedupCheck("ac" * 16, 10_000)
    await store.reserve(reserve("1" * 32, 100, dedup=dedup))
    second = await store.reserve(reserve("2" * 32, 100, dedup=dedup, now=NOW + 10_000))
    assert second.status is ReserveStatus.ALLOWED
    await store.settle(release("1" * 32, now=NOW + 10_001))
    third = await store.reserve(reserve("3" * 32, 100, dedup=dedup, now=NOW + 10_002))
    assert third.blocked_by is Rule.DUPLICATE_REQUEST


async def test_late_release_of_an_expired_reservation_frees_its_mark(store: Store) -> None:
    """A refused call settled after its reservation expired is corrected to zero and frees its mark."""
    dedup = DedupCheck("ad" * 16, 10 * RES_TTL)
    await store.reserve(reserve("1" * 32, 700, dedup=dedup))
    late = await store.settle(release("1" * 32, now=NOW + RES_TTL + 1))
    assert (late.status, late.spent_nano_usd, late.reserved_nano_usd) == (SettleStatus.SETTLED, 0, 0)
    retry = await store.reserve(reserve("2" * 32, 700, dedup=dedup, now=NOW + RES_TTL + 2))
    assert retry.status is ReserveStatus.ALLOWED


async def test_release_is_idempotent_and_other_fingerprints_stay(store: Store) -> None:
    """A repeated release changes nothing; marks of other calls in the session are untouched."""
    mine, other = DedupCheck("ae" * 16, 60_000), DedupCheck("af" * 16, 60_000)
    await store.reserve(reserve("1" * 32, 100, dedup=mine))
    await store.reserve(reserve("2" * 32, 100, dedup=other))
    await store.settle(release("1" * 32))
    assert (await store.settle(release("1" * 32))).status is SettleStatus.ALREADY_SETTLED
    assert (
        await store.reserve(reserve("3" * 32, dedup=other, now=NOW + 1))
    ).blocked_by is Rule.DUPLICATE_REQUEST
    assert (await store.reserve(reserve("4" * 32, dedup=mine, now=NOW + 1))).status is ReserveStatus.ALLOWED


async def test_settle_record_holds_the_counted_cost_and_the_decision(store: Store) -> None:
    """The record of a settle: the cost counted first (a repeat changes nothing) and what Decide
    admitted; none for an id never settled, and none once the settle is forgotten."""
    decided = DecidedCall("claude-sonnet-4-5", 900, 120, 64)
    await store.reserve(reserve("1" * 32, 900, decided=decided))
    await store.reserve(reserve("2" * 32, 300))
    assert await store.settle_record(SESSION, "1" * 32, NOW) is None  # open, not settled
    await store.settle(settle("1" * 32, 420))
    await store.settle(settle("1" * 32, 999, now=NOW + 5))  # a repeat counts once
    assert await store.settle_record(SESSION, "1" * 32, NOW + 10) == SettleRecord(420, decided)
    await store.settle(settle("2" * 32, 0))
    assert await store.settle_record(SESSION, "2" * 32, NOW + 10) == SettleRecord(0, None)
    assert await store.settle_record(SESSION, "9" * 32, NOW + 10) is None
    assert await store.settle_record(SessionKey("tenant-b", "session-1"), "1" * 32, NOW + 10) is None
    # Forgotten with the settle record, by the first store step after the settle window.
    await store.session_state(SESSION, NOW + RES_TTL + 1, SESSION_TTL)
    assert await store.settle_record(SESSION, "1" * 32, NOW + RES_TTL + 1) is None
