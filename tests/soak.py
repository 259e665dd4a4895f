"""Fault soak (``make soak``): load on many sessions while Redis restarts and workers die.

Several ``spendgate serve`` processes share one Redis (AOF ``everysec``, the
persistence the deploy recommends). Concurrent callers decide and settle on many
sessions, each with its own cap and budget mode; some callers "die" after Decide
and never settle, some report a failed provider call. Meanwhile, at random moments,
Redis is restarted (SIGTERM, then started again on its data) or a server is
SIGKILLed and started again on its port.

Callers behave like the SDK wrappers: fail closed, a Decide that failed is retried
once on another server with the same request id (so a call Redis already admitted
is replayed, not admitted twice), and Settle is retried on every server.

Afterwards every session is reconciled against Redis itself:

- spent = settled costs + expired reservations, and nothing is still reserved;
- every call a caller saw allowed is counted exactly once: at the cost it settled
  (when that settle reached Redis) or at its estimate (expired), never both;
- a reservation no caller heard of (its answer was lost to a fault) counts at its
  estimate, and there are no more of them than failed Decide attempts;
- no budget was crossed beyond its mode's bound: strict never above the cap,
  crossing by less than one call's estimate.

Any mismatch fails the run (exit 1). Environment: SOAK_SECONDS (150), SOAK_SERVERS
(3), SOAK_CALLERS (24), SOAK_SEED (random), SOAK_REDIS_CRASH=1 (SIGKILL Redis
instead of restarting it: shows what AOF everysec loses in a crash).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis
from spendgate_client import AsyncDecisionClient, InvalidRequest, SpendgateUnavailable

from tests.processes import RedisServer, SpendgateServer, free_port, read_ledger, restart_redis

MODEL = "soak-model"
PRICES = "prices:\n  soak-model: {input_usd_per_mtok: 1, output_usd_per_mtok: 2}\n"
MAX_INPUT_TOKENS = 800
MAX_OUTPUT_TOKENS = 400
# The dearest call the callers make: input and output at their maxima, in nano-USD.
MAX_ESTIMATE = MAX_INPUT_TOKENS * 1_000 + MAX_OUTPUT_TOKENS * 2_000
RESERVATION_TTL_SECONDS = 2
ABANDON_RATE = 0.05  # the caller dies between Decide and Settle
PROVIDER_ERROR_RATE = 0.05  # the provider failed: settled at zero


@dataclass
class Session:
    """What the callers know about one session."""

    name: str
    cap_nano_usd: int
    strict: bool
    allowed: dict[str, int] = field(default_factory=dict)  # reservation id -> estimate
    settled: dict[str, int] = field(default_factory=dict)  # id -> cost, acknowledged
    unacknowledged: dict[str, int] = field(default_factory=dict)  # id -> cost sent, no answer
    abandoned: set[str] = field(default_factory=set)
    failed_decides: int = 0  # attempts whose answer was lost: each may have admitted a call


@dataclass
class Fleet:
    """Redis and the servers, restarted in place by the chaos task."""

    redis: RedisServer
    servers: list[SpendgateServer]
    server_args: list[str]
    # SIGKILL Redis instead of a graceful restart: AOF everysec may then lose up to a
    # second of writes, and the reconciliation is expected to find them missing.
    crash_redis: bool = False
    stats: Counter[str] = field(default_factory=Counter)

    async def chaos(self, stop: asyncio.Event, rng: random.Random) -> None:
        """Restart Redis or kill a server at random moments until ``stop``."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), rng.uniform(2.0, 6.0))
                return
            except TimeoutError:
                pass
            if rng.random() < 0.5:
                if self.crash_redis:
                    self.redis.process.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(self.redis.process.wait)
                self.redis = await asyncio.to_thread(restart_redis, self.redis)
                self.stats["redis crashes" if self.crash_redis else "redis restarts"] += 1
            else:
                index = rng.randrange(len(self.servers))
                victim = self.servers[index]
                victim.process.send_signal(signal.SIGKILL)
                await asyncio.to_thread(victim.process.wait)
                self.servers[index] = await asyncio.to_thread(
                    SpendgateServer.start, *self.server_args, port=victim.port
                )
                self.stats["workers killed"] += 1


class Caller:
    """One caller: spends sessions to their cap, one after another."""

    def __init__(
        self, number: int, clients: list[AsyncDecisionClient], sessions: list[Session], rng: random.Random
    ) -> None:
        self.number = number
        self.clients = clients
        self.sessions = sessions
        self.rng = rng
        self.stats: Counter[str] = Counter()

    def _other(self, index: int) -> int:
        return (index + self.rng.randrange(1, len(self.clients))) % len(self.clients)

    async def run(self, stop: asyncio.Event) -> None:
        count = 0
        while not stop.is_set():
            count += 1
            session = Session(
                f"soak-{self.number}-{count}-{uuid.uuid4().hex[:6]}",
                cap_nano_usd=self.rng.randint(5, 20) * 1_000_000,
                strict=self.rng.random() < 0.5,
            )
            self.sessions.append(session)
            await self._spend(session, stop)

    async def _spend(self, session: Session, stop: asyncio.Event) -> None:
        config = {
            "max_session_usd": f"0.{session.cap_nano_usd // 1_000_000:03d}",
            "budget_mode": "strict" if session.strict else "crossing",
        }
        while not stop.is_set():
            input_tokens = self.rng.randint(100, MAX_INPUT_TOKENS)
            max_output = self.rng.randint(50, MAX_OUTPUT_TOKENS)
            request_id = uuid.uuid4().hex
            first = self.rng.randrange(len(self.clients))
            decision = None
            for index in (first, self._other(first)):
                self.stats["decide attempts"] += 1
                try:
                    decision = await self.clients[index].decide(
                        session.name,
                        MODEL,
                        input_tokens,
                        max_output,
                        uuid.uuid4().bytes,
                        request_id=request_id,
                        enforcement_config=config,
                    )
                    break
                except SpendgateUnavailable:
                    session.failed_decides += 1
                    self.stats["decide unavailable"] += 1
                    await asyncio.sleep(0.05)
            if decision is None:
                await asyncio.sleep(0.2)  # both servers said no: back off, then a new call
                continue
            if not decision.allowed:
                self.stats["blocked"] += 1
                return  # the session reached its cap: the caller moves to a new one
            self.stats["allowed"] += 1
            rid = decision.reservation_id
            session.allowed[rid] = decision.estimated_cost_nano_usd
            if self.rng.random() < ABANDON_RATE:
                session.abandoned.add(rid)
                self.stats["abandoned"] += 1
                continue
            provider_ok = self.rng.random() >= PROVIDER_ERROR_RATE
            output_tokens = self.rng.randint(0, max_output)
            cost = input_tokens * 1_000 + output_tokens * 2_000 if provider_ok else 0
            await self._settle(session, rid, input_tokens, output_tokens, provider_ok, cost)

    async def _settle(
        self, session: Session, rid: str, input_tokens: int, output_tokens: int, provider_ok: bool, cost: int
    ) -> None:
        start = self.rng.randrange(len(self.clients))
        for step in range(len(self.clients)):
            client = self.clients[(start + step) % len(self.clients)]
            try:
                settled = await client.settle(
                    session.name,
                    rid,
                    MODEL,
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                    provider_ok=provider_ok,
                )
            except InvalidRequest as exc:  # NOT_FOUND: the store forgot an admitted call
                self.stats["settle not found"] += 1
                session.unacknowledged[rid] = cost
                print(f"settle of {rid} in {session.name}: {exc}", file=sys.stderr)
                return
            if settled is not None:
                session.settled[rid] = settled.cost_nano_usd
                self.stats["settled"] += 1
                return
        session.unacknowledged[rid] = cost
        self.stats["settle unacknowledged"] += 1


def reconcile(sessions: list[Session], redis_port: int) -> tuple[list[str], Counter[str], dict[str, float]]:
    """Check every session against Redis; return the mismatches, totals and worst overshoot by mode."""
    problems: list[str] = []
    totals: Counter[str] = Counter()
    client = redis.Redis(port=redis_port)
    worst = {"strict": 0.0, "crossing": 0.0}
    try:
        for s in sessions:
            ledger = read_ledger(client, s.name)
            fail = problems.append
            if ledger.open or ledger.reserved:
                fail(f"{s.name}: still reserved {ledger.reserved} in {len(ledger.open)} reservations")
            if ledger.spent != sum(ledger.settled.values()) + sum(ledger.expired.values()):
                fail(f"{s.name}: spent {ledger.spent} != settled {ledger.settled} + expired {ledger.expired}")
            for rid, estimate in s.allowed.items():
                in_settled, in_expired = rid in ledger.settled, rid in ledger.expired
                if in_settled == in_expired:
                    fail(f"{s.name}: allowed call {rid} counted {int(in_settled) + int(in_expired)} times")
                elif in_expired and ledger.expired[rid] != estimate:
                    fail(f"{s.name}: {rid} expired at {ledger.expired[rid]}, its estimate was {estimate}")
                elif in_settled and rid in s.abandoned:
                    fail(f"{s.name}: {rid} was never settled but counts {ledger.settled[rid]}")
                elif in_settled and ledger.settled[rid] != s.settled.get(rid, s.unacknowledged.get(rid)):
                    fail(f"{s.name}: {rid} settled at {ledger.settled[rid]}, the caller sent another cost")
                if rid in s.settled and not in_settled:
                    fail(f"{s.name}: acknowledged settle of {rid} is missing")
            unheard = {rid: v for rid, v in ledger.expired.items() if rid not in s.allowed}
            strangers = set(ledger.settled) - set(s.allowed)
            if strangers:
                fail(f"{s.name}: settled reservations no caller made: {sorted(strangers)}")
            if len(unheard) > s.failed_decides or any(v > MAX_ESTIMATE for v in unheard.values()):
                fail(f"{s.name}: {len(unheard)} unheard reservations, {s.failed_decides} lost answers")
            bound = s.cap_nano_usd if s.strict else s.cap_nano_usd - 1 + MAX_ESTIMATE
            mode = "strict" if s.strict else "crossing"
            if ledger.spent > bound:
                fail(f"{s.name}: spent {ledger.spent} above the {mode} bound {bound}")
            worst[mode] = max(worst[mode], (ledger.spent - s.cap_nano_usd) / s.cap_nano_usd)
            totals["sessions"] += 1
            totals["spent nano-USD"] += ledger.spent
            totals["settled calls"] += len(ledger.settled)
            totals["expired at estimate"] += len(ledger.expired)
            totals["unheard reservations (answer lost)"] += len(unheard)
            totals["sessions past cap"] += ledger.spent > s.cap_nano_usd
    finally:
        client.close()
    return problems, totals, worst


async def soak(seconds: float, server_count: int, caller_count: int, seed: int, crash_redis: bool) -> int:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="sg-soak-"))
    prices = workdir / "prices.yaml"
    prices.write_text(PRICES)
    redis_server = RedisServer.start("--appendonly", "yes", "--appendfsync", "everysec")
    args = [
        *("--store", "redis", "--redis-url", redis_server.url, "--config", str(prices)),
        *("--reservation-ttl-seconds", str(RESERVATION_TTL_SECONDS), "--redis-timeout-millis", "100"),
        *("--health-interval-millis", "200"),
    ]
    fleet = Fleet(redis_server, [], args, crash_redis)
    clients: list[AsyncDecisionClient] = []
    sessions: list[Session] = []
    callers: list[Caller] = []
    try:
        for _ in range(server_count):
            fleet.servers.append(SpendgateServer.start(*args, port=free_port()))
        clients = [AsyncDecisionClient(s.target, timeout=1.0, fail_mode="closed") for s in fleet.servers]
        callers = [Caller(i, clients, sessions, random.Random(rng.random())) for i in range(caller_count)]
        stop = asyncio.Event()
        started = time.monotonic()
        tasks = [asyncio.create_task(c.run(stop)) for c in callers]
        chaos = asyncio.create_task(fleet.chaos(stop, rng))
        await asyncio.sleep(seconds)
        stop.set()
        await chaos
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        # Every reservation left open falls due after its TTL; the reconciliation counts it.
        await asyncio.sleep(RESERVATION_TTL_SECONDS + 0.5)
        problems, totals, overshoot = reconcile(sessions, fleet.redis.port)
    finally:
        for client in clients:
            await client.close()
        for server in fleet.servers:
            server.stop()
        fleet.redis.stop()

    load: Counter[str] = Counter()
    for caller in callers:
        load.update(caller.stats)
    print(
        f"spendgate fault soak: {elapsed:.0f} s, {server_count} servers, {caller_count} callers, seed {seed}"
    )
    for name, value in [*fleet.stats.items(), *sorted(load.items()), *totals.items()]:
        print(f"  {name:<38} {value}")
    print(f"  {'decide attempts per second':<38} {load['decide attempts'] / elapsed:.0f}")
    for mode, worst in overshoot.items():
        print(f"  {'worst ' + mode + ' overshoot, % of cap':<38} {100 * worst:.2f}")
    if problems:
        print(f"RECONCILIATION FAILED: {len(problems)} mismatches", file=sys.stderr)
        for problem in problems[:50]:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print("reconciliation: every session balances (spent = settled + expired; bounds hold)")
    return 0


def main() -> int:
    """Run the soak with the SOAK_* environment; exit status 1 on any mismatch."""
    seconds = float(os.environ.get("SOAK_SECONDS", "150"))
    servers = int(os.environ.get("SOAK_SERVERS", "3"))
    callers = int(os.environ.get("SOAK_CALLERS", "24"))
    seed = int(os.environ.get("SOAK_SEED", str(random.randrange(1_000_000))))
    crash_redis = os.environ.get("SOAK_REDIS_CRASH", "") == "1"
    if servers < 2:
        raise SystemExit("SOAK_SERVERS must be at least 2: a failed call is retried on another server")
    # The client logs each settle it gave up on; the soak counts them instead.
    logging.getLogger("spendgate_client").setLevel(logging.ERROR)
    return asyncio.run(soak(seconds, servers, callers, seed, crash_redis))


if __name__ == "__main__":
    raise SystemExit(main())
