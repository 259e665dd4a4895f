"""Fleet test: two server processes on one Redis, many concurrent callers, one session budget."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from spendgate_client import AsyncDecisionClient
from spendgate_server.store import SessionKey
from spendgate_server.store.redis import RedisStore

from tests.processes import SpendgateServer

CALLERS = 32
ROUNDS = 5
CAP_USD = "0.02"
CAP_NANO = 20_000_000
PRICES = "prices:\n  fleet-model: {input_usd_per_mtok: 1, output_usd_per_mtok: 2}\n"


async def caller(
    client: AsyncDecisionClient, session: str, config: Mapping[str, object], seed: int
) -> tuple[int, int]:
    """Decide and settle until blocked; return (settled nano-USD, largest estimate)."""
    rng = random.Random(seed)
    spent = largest = 0
    for _ in range(1_000):
        input_tokens = rng.randint(100, 800)
        decision = await client.decide(
            session,
            "fleet-model",
            input_tokens,
            200,
            uuid.uuid4().bytes,
            enforcement_config=config,
        )
        if not decision.allowed:
            assert decision.rule == "max_session_usd", decision
            return spent, largest
        largest = max(largest, decision.estimated_cost_nano_usd)
        await asyncio.sleep(0)  # let other callers interleave between decide and settle
        settled = await client.settle(
            session,
            decision.reservation_id,
            "fleet-model",
            input_tokens=input_tokens,
            output_tokens=rng.randint(0, 200),
        )
        assert settled is not None and settled.cost_nano_usd <= decision.estimated_cost_nano_usd
        spent += settled.cost_nano_usd
    raise AssertionError(f"caller {seed} was never blocked after 1,000 calls")


@pytest.mark.redis
@pytest.mark.parametrize("mode", ["crossing", "strict"])
async def test_budget_holds_across_two_servers(
    mode: str, redis_url: str, spendgate: Callable[..., SpendgateServer], tmp_path: Path
) -> None:
    """Total settled spend stays ≤ cap + one call (crossing) or ≤ cap (strict), every round."""
    config_file = tmp_path / "prices.yaml"
    config_file.write_text(PRICES)
    servers = [
        spendgate("--store", "redis", "--redis-url", redis_url, "--config", str(config_file))
        for _ in range(2)
    ]
    clients = [AsyncDecisionClient(s.target, timeout=5, fail_mode="closed") for s in servers]
    store = RedisStore.from_url(redis_url, timeout_seconds=5)
    config = {"max_session_usd": CAP_USD, "budget_mode": mode}
    try:
        for round_number in range(ROUNDS):
            session = f"fleet-{mode}-{round_number}"
            results = await asyncio.gather(
                *(
                    caller(clients[i % 2], session, config, seed=round_number * 100 + i)
                    for i in range(CALLERS)
                )
            )
            total = sum(spent for spent, _ in results)
            largest = max(estimate for _, estimate in results)
            state = await store.session_state(SessionKey("default", session), 0, 3_600_000)
            assert state.spent_nano_usd == total and state.reserved_nano_usd == 0
            bound = CAP_NANO if mode == "strict" else CAP_NANO + largest
            assert total <= bound, f"round {round_number}: {total} > {bound}"
            # The callers really raced: the budget was mostly used, across both servers.
            assert total >= CAP_NANO // 2
    finally:
        for client in clients:
            await client.close()
        await store.close()
