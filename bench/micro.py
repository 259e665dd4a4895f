"""Where a Decide's server time goes, piece by piece, in one process (no gRPC, no network for most).

``python -m bench.micro [--redis-url URL]`` times, in µs per call on uvloop: request
validation, the engine over the memory store (bare and behind the breaker and
instrumentation layers, and each store layer alone), the response message, metrics, authentication, and — when
a Redis URL is given or redis-server is installed — one Decide script round trip
through redis-py, through the server's pipelined client (store/pipeline.py), and a
trivial EVALSHA through each (the floor's round trip). A profile in numbers, to say
which lever is worth what before measuring it end to end (bench/levers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

__all__ = ["main"]


def _request(i: int) -> Any:
    from spendgate.v1 import decision_pb2 as pb

    return pb.DecideRequest(
        session_id=f"micro-s{i // 64}",
        model="gpt-4o",
        input_tokens=2000,
        max_output_tokens=1000,
        fingerprint=hashlib.sha256(str(i).encode()).digest(),
        tool_call_count=1,
    )


def _config() -> Any:
    import tempfile
    from pathlib import Path

    from spendgate_server.settings import load_config_file

    from bench.run import BENCH_CONFIG_YAML

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(BENCH_CONFIG_YAML)
        config, _prices = load_config_file(str(path))
    return config


async def _time_async(n: int, make: Callable[[int], Awaitable[Any]]) -> float:
    for i in range(min(n, 500)):
        await make(10_000_000 + i)
    start = time.perf_counter_ns()
    for i in range(n):
        await make(i)
    return (time.perf_counter_ns() - start) / n / 1000


def _time_sync(n: int, make: Callable[[int], Any]) -> float:
    for i in range(min(n, 500)):
        make(10_000_000 + i)
    start = time.perf_counter_ns()
    for i in range(n):
        make(i)
    return (time.perf_counter_ns() - start) / n / 1000


async def measure(n: int, redis_url: str | None) -> dict[str, float]:
    """µs per call of each piece."""
    from spendgate_server.engine.decide import DecisionEngine
    from spendgate_server.engine.pricing import PriceTable, Usage
    from spendgate_server.engine.remote_config import ConfigResolver
    from spendgate_server.metrics import Metrics
    from spendgate_server.rpc.validation import call_from_proto
    from spendgate_server.rpc.wire import decision_to_proto
    from spendgate_server.store.breaker import CircuitBreakerStore
    from spendgate_server.store.instrumented import InstrumentedStore
    from spendgate_server.store.memory import MemoryStore

    out: dict[str, float] = {}
    config = _config()
    prices = PriceTable()
    requests = [_request(i) for i in range(n)]
    calls = [call_from_proto(r, "default") for r in requests]

    out["validate call_from_proto"] = _time_sync(n, lambda i: call_from_proto(requests[i % n], "default"))
    out["pricing: lookup + estimate (Decide)"] = _time_sync(
        n, lambda i: prices.lookup("gpt-4o").estimate(2000 + i % 7, 1000)
    )
    settle_counts = {"input_tokens": 1800, "cache_read_tokens": 600, "output_tokens": 400}
    out["pricing: Usage + cost of a settle"] = _time_sync(
        n, lambda i: prices.cost("gpt-4o", Usage(counts=settle_counts))
    )

    def engine(store: Any) -> DecisionEngine:
        return DecisionEngine(store, prices, ConfigResolver.static(config))

    bare = engine(MemoryStore())
    out["engine.decide, memory store"] = await _time_async(n, lambda i: bare.decide(calls[i % n]))
    metrics = Metrics()
    layered = engine(
        InstrumentedStore(CircuitBreakerStore(MemoryStore()), metrics.store_seconds, metrics.store_errors)
    )
    out["engine.decide, memory store + breaker + instrumentation"] = await _time_async(
        n, lambda i: layered.decide(calls[i % n])
    )
    out.update(await _store_layers(n, calls, bare, metrics))
    decision = await engine(MemoryStore()).decide(calls[0])
    out["response decision_to_proto"] = _time_sync(n, lambda i: decision_to_proto(decision))
    out["metrics.decided"] = _time_sync(n, lambda i: metrics.decided(decision, 0.0005))
    out["response SerializeToString"] = _time_sync(
        n, lambda i: decision_to_proto(decision).SerializeToString()
    )
    raw = requests[0].SerializeToString()
    out["request FromString"] = _time_sync(n, lambda i: type(requests[0]).FromString(raw))
    try:
        import tempfile
        from pathlib import Path

        from spendgate_server.rpc.auth import Authenticator
        from spendgate_server.store.keys import FileKeyStore, Scope, new_key

        with tempfile.TemporaryDirectory() as tmp:
            keystore = FileKeyStore(str(Path(tmp) / "keys.json"))
            full, record = new_key("bench", Scope.CLIENT, "bench", 0)
            await keystore.add(record)
            auth = Authenticator(keystore, allow_open_mode=False)
            await auth.load()
        metadata = (("authorization", f"Bearer {full}"),)
        method = "/spendgate.v1.DecisionService/Decide"
        out["auth.authenticate (key check)"] = _time_sync(n, lambda i: auth.authenticate(metadata, method))
    except ImportError:
        pass

    out.update(await _settle_cases(n, config, prices))
    if redis_url:
        out.update(await _redis_round_trips(n, redis_url, calls, bare))
    return out


async def _store_layers(n: int, calls: list[Any], engine: Any, metrics: Any) -> dict[str, float]:
    """One store.reserve through each decorator layer over a store that answers at once.

    The inner store returns the outcome of a real reserve without awaiting anything, so
    what is timed is each layer's own cost per call: its frames, its clock reads, its
    histogram update. Compare with the server's CPU per call (bench/levers.py). The
    "suspending" cases give the event loop one turn inside the store, as a real round
    trip does: the suspension and the resumption then pass through every layer's frame.
    """
    from spendgate_server.store.breaker import CircuitBreakerStore
    from spendgate_server.store.instrumented import InstrumentedStore
    from spendgate_server.store.memory import MemoryStore

    config, _version = await engine.effective_config(calls[0])
    request = engine._reserve_request(calls[0], config, f"{0:032x}", 15_000_000, "", 1_800_000_000_000)
    outcome = await MemoryStore().reserve(request)

    class Instant(MemoryStore):
        async def reserve(self, request: Any) -> Any:
            return outcome

    class Suspending(MemoryStore):
        async def reserve(self, request: Any) -> Any:
            await asyncio.sleep(0)
            return outcome

    def instrumented(inner: Any) -> Any:
        return InstrumentedStore(inner, metrics.store_seconds, metrics.store_errors)

    layers: dict[str, Any] = {
        "bare": Instant(),
        "breaker": CircuitBreakerStore(Instant()),
        "instrumentation": instrumented(Instant()),
        "instrumentation + breaker": instrumented(CircuitBreakerStore(Instant())),
        "suspending, bare": Suspending(),
        "suspending, instrumentation + breaker": instrumented(CircuitBreakerStore(Suspending())),
    }
    out: dict[str, float] = {}
    for name, store in layers.items():
        # B023: every call of the lambda is awaited before the loop rebinds ``store``.
        us = await _time_async(n, lambda _i: store.reserve(request))  # noqa: B023
        out[f"store layers: reserve, {name}"] = us
    # redis-py wraps each command of its pool path (not the pipelined one) in its retry loop,
    # with 0 retries here (store/redis.py): what that wrapper costs around the same instant call.
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    retry, instant = Retry(NoBackoff(), 0), layers["bare"]

    async def failed(_error: Exception) -> None:
        return None

    def retried(_i: int) -> Awaitable[Any]:
        return retry.call_with_retry(lambda: instant.reserve(request), failed)

    out["store layers: reserve, bare, in redis-py's Retry.call_with_retry"] = await _time_async(n, retried)
    return out


def _settle_request(i: int, reservation_id: str, *, context: bool) -> Any:
    """A SettleRequest as bench/loadgen.py sends it, or (``context``) as the SDK wrappers do."""
    from spendgate.v1 import decision_pb2 as pb

    request = pb.SettleRequest(
        session_id=f"micro-s{i // 64}",
        reservation_id=reservation_id,
        model="gpt-4o",
        usage=pb.Usage(input_tokens=1800, output_tokens=400),
        outcome=pb.PROVIDER_OUTCOME_OK,
    )
    if context:
        request.requested_model = "gpt-4o"
        request.verdict = pb.VERDICT_ALLOW
        request.project = "micro"
        request.environment = "bench"
    return request


async def _settle_cases(n: int, config: Any, prices: Any) -> dict[str, float]:
    """A Settle's server-side pieces: validation, the engine up to its answer (memory store, a
    journal keeping intents over the memory log store), the work after the reply, the event's JSON."""
    from spendgate_server.engine.decide import DecisionEngine
    from spendgate_server.engine.remote_config import ConfigResolver
    from spendgate_server.policy.journal import StoreJournal
    from spendgate_server.rpc.validation import settle_from_proto
    from spendgate_server.store.logs import MemoryLogStore
    from spendgate_server.store.memory import MemoryStore

    async def no_prompts(_tenant: str) -> bool:
        return False

    out: dict[str, float] = {}
    journal = StoreJournal(MemoryLogStore(), max_entries=1000, journals_prompts=no_prompts, intents=True)
    engine = DecisionEngine(MemoryStore(), prices, ConfigResolver.static(config), journal=journal)
    # One reservation per settle timed (the warm-up's too), made before the timing starts.
    warm = min(n, 500)
    ids: dict[int, str] = {}
    for i in [*range(n), *range(10_000_000, 10_000_000 + warm)]:
        ids[i] = (await engine.decide(_call_for(i))).reservation_id
    plain = {i: _settle_request(i, rid, context=False) for i, rid in ids.items()}
    rich = {i: _settle_request(i, rid, context=True) for i, rid in ids.items()}
    out["validate settle_from_proto"] = _time_sync(n, lambda i: settle_from_proto(plain[i], "default"))
    out["validate settle_from_proto, with the wrappers' context"] = _time_sync(
        n, lambda i: settle_from_proto(rich[i], "default")
    )
    settles = {i: settle_from_proto(r, "default") for i, r in rich.items()}
    answers: dict[int, Any] = {}

    async def settle_first(i: int) -> None:
        answers[i] = await engine.settle_first(settles[i])

    out["engine.settle_first, memory store, intents (before the reply)"] = await _time_async(n, settle_first)
    out["SettleAnswer.finish: event, anomalies, append (after the reply)"] = _time_sync(
        n, lambda i: answers[i].finish()
    )
    await journal.drain()
    event = answers[0].event()
    out["JournalEvent.to_json"] = _time_sync(n, lambda i: event.to_json())
    return out


def _call_for(i: int) -> Any:
    from spendgate_server.rpc.validation import call_from_proto

    return call_from_proto(_request(i), "default")


async def _redis_round_trips(n: int, redis_url: str, calls: list[Any], engine: Any) -> dict[str, float]:
    from spendgate_server.store.pipeline import PipelinedRedis
    from spendgate_server.store.redis import RedisStore, decide_args, session_keys

    out: dict[str, float] = {}
    store = RedisStore.from_url(redis_url, pipelined=False)
    reserve_requests = []
    for i, call in enumerate(calls):
        config, _version = await engine.effective_config(call)
        reserve_requests.append(
            engine._reserve_request(call, config, f"{i:032x}", 15_000_000, "", 1_800_000_000_000)
        )
    out["redis-py: RedisStore.reserve (decide.lua round trip)"] = await _time_async(
        n, lambda i: store.reserve(reserve_requests[i % n])
    )
    client: Any = store.client
    sha = await client.script_load("return 1")
    out["redis-py: trivial EVALSHA (the floor's round trip)"] = await _time_async(
        n, lambda i: client.evalsha(sha, 0)
    )
    kwargs = client.connection_pool.connection_kwargs
    lean = PipelinedRedis(kwargs.get("host", "127.0.0.1"), int(kwargs.get("port", 6379)))
    decide_sha = store._decide.sha
    # The same requests with a fresh reservation id and fingerprint, built before timing.
    lean_args = [
        decide_args(
            replace(
                r,
                reservation_id=f"{i:032x}",
                request_id="",
                memo="",
                dedup=replace(r.dedup, fingerprint=r.dedup.fingerprint + "x") if r.dedup else None,
            )
        )
        for i, r in enumerate(reserve_requests[:n])
    ]

    def lean_reserve(i: int) -> Awaitable[Any]:
        r = reserve_requests[i % n]
        return lean.call("EVALSHA", decide_sha, 2, *session_keys(r.session, "sgx"), *lean_args[i % n])

    out["lean: decide.lua EVALSHA round trip"] = await _time_async(n, lean_reserve)
    out["lean: trivial EVALSHA"] = await _time_async(n, lambda i: lean.call(b"EVALSHA", sha, 0))
    await lean.close()
    await store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.micro``."""
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--redis-url", default="", help="default: a private redis-server, if installed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import uvloop

    from bench._procs import Processes

    with Processes() as procs:
        url = args.redis_url
        if not url:
            try:
                url = f"redis://127.0.0.1:{procs.start_redis().port}/0"
            except RuntimeError as exc:
                print(f"no Redis round trips: {exc}", file=sys.stderr)
        figures = uvloop.run(measure(args.count, url or None))
    if args.json:
        json.dump(figures, sys.stdout, indent=2)
        print()
    else:
        for name, us in figures.items():
            print(f"{us:9.1f} µs  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
