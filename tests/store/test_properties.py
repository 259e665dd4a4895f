"""Property tests: invariants of the atomic step, on both stores and against each other."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spendgate_server.store import (
    BudgetCheck,
    DedupCheck,
    ReserveRequest,
    ReserveStatus,
    SessionKey,
    SettleRequest,
    SettleStatus,
    Store,
)
from spendgate_server.store.base import ToolCheck
from spendgate_server.store.memory import MemoryStore
from spendgate_server.store.redis import RedisStore

RES_TTL, SESSION_TTL = 10_000, 3_600_000
START = 1_800_000_000_000
PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@dataclass(frozen=True)
class Reserve:
    estimate: int
    fingerprint: int
    tools: int
    request_id: int | None


@dataclass(frozen=True)
class Settle:
    which: int  # index into the reservations made so far
    fraction_percent: int  # actual cost as a percentage of the estimate
    twice: bool
    refused: bool = False  # the provider refused the call: cost 0, its dedup mark released


@dataclass(frozen=True)
class Advance:
    ms: int


operations = st.lists(
    st.one_of(
        st.builds(
            Reserve,
            st.integers(0, 400),
            st.integers(0, 3),
            st.integers(0, 3),
            st.one_of(st.none(), st.integers(0, 3)),
        ),
        st.builds(Settle, st.integers(0, 50), st.integers(0, 100), st.booleans(), st.booleans()),
        st.builds(Advance, st.integers(0, 12_000)),
    ),
    min_size=1,
    max_size=40,
)
rules = st.fixed_dictionaries(
    {
        "cap": st.integers(0, 2_000),
        "strict": st.booleans(),
        "tool_cap": st.one_of(st.none(), st.integers(0, 6)),
        "dedup": st.booleans(),
    }
)


async def play(store: Store, ops: list[object], rule: dict[str, object]) -> list[tuple[object, ...]]:
    """Run ``ops`` on ``store``, checking the invariants after every step; return the outcomes."""
    session = SessionKey("prop", uuid.uuid4().hex)
    now = START
    ids: list[tuple[str, int]] = []
    trace: list[tuple[object, ...]] = []
    cap, strict = cast(int, rule["cap"]), bool(rule["strict"])
    budget = BudgetCheck(cap, strict)
    tool_cap = rule["tool_cap"]
    tools = ToolCheck(tool_cap) if isinstance(tool_cap, int) else None
    max_estimate = 0
    for n, op in enumerate(ops):
        before = await store.session_state(session, now, SESSION_TTL)
        if isinstance(op, Reserve):
            rid = f"{n:032x}"
            outcome = await store.reserve(
                ReserveRequest(
                    session,
                    now,
                    rid,
                    op.estimate,
                    RES_TTL,
                    SESSION_TTL,
                    op.tools,
                    DedupCheck(f"{op.fingerprint:032x}", 5_000) if rule["dedup"] else None,
                    tools,
                    budget,
                    "" if op.request_id is None else f"req-{op.request_id}",
                    f"memo-{n}",
                )
            )
            after = await store.session_state(session, now, SESSION_TTL)
            if outcome.status is ReserveStatus.ALLOWED:
                ids.append((rid, op.estimate))
                max_estimate = max(max_estimate, op.estimate)
                assert after.reserved_nano_usd == before.reserved_nano_usd + op.estimate
            else:
                # Blocked or replayed: nothing at all changed.
                assert after == before
            trace.append((outcome.status, outcome.blocked_by, outcome.memo))
        elif isinstance(op, Settle) and ids:
            rid, estimate = ids[op.which % len(ids)]
            cost = 0 if op.refused else estimate * op.fraction_percent // 100
            for _ in range(2 if op.twice else 1):
                result = await store.settle(
                    SettleRequest(
                        session, now, rid, cost, RES_TTL * 10, SESSION_TTL, release_dedup=op.refused
                    )
                )
                trace.append((result.status, result.cost_nano_usd))
            if op.twice:
                assert result.status is SettleStatus.ALREADY_SETTLED
        elif isinstance(op, Advance):
            now += op.ms
        state = await store.session_state(session, now, SESSION_TTL)
        committed = state.spent_nano_usd + state.reserved_nano_usd
        # The budget bound: strict never crosses the cap; crossing by at most one call.
        assert committed <= cap + (0 if strict else max_estimate)
        trace.append((state.spent_nano_usd, state.reserved_nano_usd, state.tool_calls))
    return trace


@PROPERTY_SETTINGS
@given(ops=operations, rule=rules)
def test_memory_store_invariants(ops: list[object], rule: dict[str, object]) -> None:
    """Blocked calls change nothing, replays reserve once, settles count once, the budget bound holds."""
    asyncio.run(play(MemoryStore(), ops, rule))


@PROPERTY_SETTINGS
@given(ops=operations, rule=rules)
def test_redis_store_behaves_exactly_like_memory_store(
    redis_url: str, ops: list[object], rule: dict[str, object]
) -> None:
    """The Lua scripts and the memory store give identical outcomes for any sequence of operations."""

    async def both() -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
        store = RedisStore.from_url(redis_url, timeout_seconds=5)
        try:
            return await play(MemoryStore(), ops, rule), await play(store, ops, rule)
        finally:
            await store.close()

    memory_trace, redis_trace = asyncio.run(both())
    assert redis_trace == memory_trace
