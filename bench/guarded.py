"""The guarded call: a real ``JournaledAnthropic`` against a plain ``anthropic.Anthropic``, same run.

Both SDK clients call the same local fake provider (tests/fake_provider.py, in a
process of its own, HTTP/1.1 keep-alive); the wrapper asks a Redis-backed
spendgate server before each call and settles each answer on its background
thread, as in production. Measured, each in its own client process:

* **sequential**: blocks of ``--block`` calls, plain SDK, then wrapped SDK, then a
  floor Decide (the naive floor's one round trip, the unit of the target), in
  rotating order, so the drift of a shared machine hits all three alike. Inside a
  wrapped block each call's settle competes with the next call, as in an agent
  loop; the settles left at a block's end are flushed untimed before the next
  block. Added latency = the wrapped p50 (p99) minus the plain p50 (p99).
* **closed loop**: ``--threads`` threads sharing one client, plain and wrapped in
  alternating runs; the wrapped run's time includes flushing its last settles.

``python -m bench.guarded`` starts Redis, the floor, one spendgate server and the
provider, and prints the figures; ``make bench`` runs :func:`measure` on the
servers it already has. Subcommands ``provider`` and ``calls`` are the processes
it starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench._stats import ratio, summarize

__all__ = ["main", "measure"]

MODEL = "claude-sonnet-4-6"  # not on the SDK's deprecated list (that warns per call)
MAX_TOKENS = 1024
DEADLINE_SECONDS = 10.0  # long: this measures latency; an outage is an error (fail closed)
PROVIDER_KEY = "sk-ant-bench"


def _body(tag: str, i: int) -> list[dict[str, str]]:
    # A distinct prompt per call: dedup (configured on) must admit every wrapped call.
    return [{"role": "user", "content": f"{tag} call {i}: summarise the ticket and draft a short reply."}]


# --- the provider process ---------------------------------------------------------------------


def _serve_provider() -> None:
    from http.server import BaseHTTPRequestHandler

    # Keep-alive, as the SDKs' pooled HTTP clients use a real provider; without Nagle, or
    # the answer's body (a second small write) waits ~40 ms for the client's delayed ACK.
    BaseHTTPRequestHandler.protocol_version = "HTTP/1.1"
    BaseHTTPRequestHandler.disable_nagle_algorithm = True
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fake_provider import FakeProvider

    fake = FakeProvider()
    # The fake records every request for tests; a benchmark only needs the answers.
    fake.on_request = lambda _recorded: fake.requests.clear()
    fake.start()
    print(json.dumps({"event": "serving", "port": fake.port, "server": "fake-provider"}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    fake.stop()


# --- the client process -----------------------------------------------------------------------


def _clients(args: argparse.Namespace) -> tuple[Any, Any]:
    import anthropic
    from spendgate_client import JournaledAnthropic

    plain = anthropic.Anthropic(api_key=PROVIDER_KEY, base_url=args.provider, max_retries=0)
    wrapped = JournaledAnthropic(
        session_id=f"{args.tag}-session",
        spendgate_target=args.target,
        fail_mode="closed",
        decide_timeout=DEADLINE_SECONDS,
        api_key=PROVIDER_KEY,
        base_url=args.provider,
        max_retries=0,
    )
    return plain, wrapped


def _floor_decide(target: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    import grpc
    from spendgate.v1 import decision_pb2 as pb
    from spendgate.v1 import decision_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = decision_pb2_grpc.DecisionServiceStub(channel)

    def call(i: int) -> None:
        stub.Decide(
            pb.DecideRequest(session_id="floor", model=MODEL, input_tokens=20, max_output_tokens=MAX_TOKENS),
            timeout=DEADLINE_SECONDS,
        )

    return call, channel.close


def _run_seq(args: argparse.Namespace) -> dict[str, Any]:
    plain, wrapped = _clients(args)
    floor, close_floor = _floor_decide(args.floor)
    calls: dict[str, Callable[[int], object]] = {
        "plain": lambda i: plain.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=_body("p", i)),
        "wrapped": lambda i: wrapped.messages.create(
            model=MODEL, max_tokens=MAX_TOKENS, messages=_body(args.tag, i)
        ),
        "floor": floor,
    }
    samples: dict[str, list[int]] = {name: [] for name in calls}
    errors = {name: 0 for name in calls}
    first_error = ""
    clock = time.perf_counter_ns
    for i in range(args.warmup):
        for call in calls.values():
            call(1_000_000 + i)
    wrapped.spendgate_flush(DEADLINE_SECONDS)
    names = list(calls)
    n = 0
    for block in range(math.ceil(args.count / args.block)):
        # Rotate who goes first: each meets the state the others leave behind alike.
        order = names[block % len(names) :] + names[: block % len(names)]
        size = min(args.block, args.count - block * args.block)
        for name in order:
            call = calls[name]
            for _ in range(size):
                n += 1
                t0 = clock()
                try:
                    call(n)
                except Exception as exc:  # count every failure, keep measuring
                    errors[name] += 1
                    first_error = first_error or f"{name}: {type(exc).__name__}: {exc}"[:300]
                    continue
                samples[name].append((clock() - t0) // 1000)
            if name == "wrapped":
                # Untimed: the next block starts without this block's settles in flight.
                wrapped.spendgate_flush(DEADLINE_SECONDS)
    stats = wrapped._spendgate_gate.client.stats.snapshot()
    settler = wrapped._spendgate_gate.settler
    wrapped.close()
    plain.close()
    close_floor()
    return {
        "samples_us": samples,
        "errors": errors,
        "first_error": first_error,
        "settled": settler.settled,
        "settle_dropped": settler.dropped,
        "client_stats": stats,
    }


def _run_closed(args: argparse.Namespace) -> dict[str, Any]:
    plain, wrapped = _clients(args)
    client = wrapped if args.which == "wrapped" else plain
    tag = args.tag if args.which == "wrapped" else "p"
    counter = iter(range(10**9))
    lock = threading.Lock()
    done = 0
    errors = 0
    first_error = ""
    for i in range(args.warmup):
        client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=_body(tag, 10**9 + i))
    if client is wrapped:
        wrapped.spendgate_flush(DEADLINE_SECONDS)
    stop_at = time.perf_counter() + args.duration

    def worker() -> None:
        nonlocal done, errors, first_error
        while time.perf_counter() < stop_at:
            with lock:
                i = next(counter)
            try:
                client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=_body(tag, i))
            except Exception as exc:  # count every failure, keep measuring
                with lock:
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
                continue
            with lock:
                done += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    calls_end = time.perf_counter()
    flushed = wrapped.spendgate_flush(60.0) if client is wrapped else True
    end = time.perf_counter()
    settler = wrapped._spendgate_gate.settler
    result = {
        "which": args.which,
        "ok": done,
        "errors": errors,
        "first_error": first_error,
        "threads": args.threads,
        # Settles are part of a wrapped call's cost: the run ends when the last one is sent.
        "elapsed_s": end - start,
        "calls_elapsed_s": calls_end - start,
        "flush_s": end - calls_end,
        "flushed": flushed,
        "settled": settler.settled,
        "throughput_rps": done / (end - start),
    }
    wrapped.close()
    plain.close()
    return result


# --- orchestration ----------------------------------------------------------------------------


def _calls(
    python_env: dict[str, str], provider: str, target: str, floor: str, *extra: str, timeout: float = 600
) -> dict[str, Any]:
    from bench._procs import python_module

    argv = python_module(
        "bench.guarded", "calls", "--provider", provider, "--target", target, "--floor", floor, *extra
    )
    done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False, env=python_env)
    if done.returncode != 0:
        raise RuntimeError(f"bench.guarded calls exited {done.returncode}:\n{done.stderr.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def start_provider(procs: Any) -> str:
    """Start the fake provider process in ``procs``; its base URL."""
    from bench._procs import python_module

    served = procs.start_server("fake-provider", python_module("bench.guarded", "provider"))
    return f"http://127.0.0.1:{served.port}"


def measure(
    procs: Any,
    target: str,
    floor: str,
    api_key: str,
    log: Callable[[str], None],
    *,
    count: int = 1500,
    block: int = 25,
    rounds: int = 2,
    threads: int = 8,
    closed_seconds: float = 3.0,
    closed_rounds: int = 2,
) -> dict[str, Any]:
    """Plain SDK against wrapped SDK on the fake provider: sequential and closed-loop figures.

    Args:
        procs: the run's process registry (bench._procs.Processes); the provider starts in it.
        target: host:port of the spendgate server (Redis store) the wrapper asks.
        floor: host:port of the naive floor, whose sequential Decide is the unit of the target.
        api_key: the client API key for ``target`` ("" in open dev mode).
        log: progress lines.
        count: sequential calls of each kind, over all rounds.
        block: calls of one kind in a row.
        rounds: sequential client processes (each its own session), interleaved.
        threads: closed-loop threads sharing one client.
        closed_seconds: duration of each closed-loop run.
        closed_rounds: closed-loop runs of each kind, alternating.

    Returns:
        ``sequential`` (p50/p99/... of plain, wrapped and floor, ms), ``added_ms`` (wrapped
        minus plain at p50 and p99), ``added_over_floor`` (added latency over the floor's
        round trip), ``closed`` (calls/s of each) and ``closed_ratio`` (wrapped / plain).
    """
    provider = start_provider(procs)
    env = dict(os.environ)
    env.pop("SPENDGATE_API_KEY", None)
    if api_key:
        env["SPENDGATE_API_KEY"] = api_key
    merged: dict[str, list[int]] = {"plain": [], "wrapped": [], "floor": []}
    errors = {name: 0 for name in merged}
    settled = 0
    per_round = max(1, count // rounds)
    for rnd in range(rounds):
        log(f"  guarded call sequential (round {rnd + 1}/{rounds}, {per_round} calls of each kind)")
        result = _calls(
            env,
            provider,
            target,
            floor,
            "--mode",
            "seq",
            "--count",
            str(per_round),
            "--block",
            str(block),
            "--tag",
            f"g{rnd}-{os.getpid()}-{time.monotonic_ns()}",
        )
        for name in merged:
            merged[name].extend(result["samples_us"][name])
            errors[name] += result["errors"][name]
        settled += result["settled"]
        if result["first_error"]:
            log(f"  ! guarded call sequential: {result['first_error']}")
    seq = {name: {**summarize(samples), "ok": len(samples)} for name, samples in merged.items()}
    added = {k: seq["wrapped"][k] - seq["plain"][k] for k in ("p50", "p90", "p99")}
    closed: dict[str, list[dict[str, Any]]] = {"plain": [], "wrapped": []}
    for rnd in range(closed_rounds):
        for which in ("plain", "wrapped") if rnd % 2 == 0 else ("wrapped", "plain"):
            log(f"  guarded call closed loop {which} ({threads} threads, round {rnd + 1}/{closed_rounds})")
            run = _calls(
                env,
                provider,
                target,
                floor,
                "--mode",
                "closed",
                "--which",
                which,
                "--threads",
                str(threads),
                "--duration",
                str(closed_seconds),
                "--tag",
                f"c{rnd}-{os.getpid()}-{time.monotonic_ns()}",
            )
            if run["first_error"]:
                log(f"  ! guarded call closed {which}: {run['first_error']}")
            closed[which].append(run)
    rps = {which: sum(r["throughput_rps"] for r in runs) / len(runs) for which, runs in closed.items()}
    return {
        "model": MODEL,
        "sequential": seq,
        "sequential_errors": errors,
        "settled": settled,
        "added_ms": added,
        "added_over_floor": {k: ratio(added[k], seq["floor"][k]) for k in ("p50", "p99")},
        "closed": {which: {"throughput_rps": rps[which], "runs": runs} for which, runs in closed.items()},
        "closed_ratio": ratio(rps["wrapped"], rps["plain"]),
        "threads": threads,
    }


def table(figures: dict[str, Any]) -> str:
    """The guarded-call figures as lines for the terminal."""
    s, added, over = figures["sequential"], figures["added_ms"], figures["added_over_floor"]
    closed = figures["closed"]
    return "\n".join(
        [
            "Guarded call (JournaledAnthropic vs anthropic.Anthropic, fake provider, Redis store)",
            f"  sequential plain   p50 {s['plain']['p50']:.3f} ms  p99 {s['plain']['p99']:.3f} ms",
            f"  sequential wrapped p50 {s['wrapped']['p50']:.3f} ms  p99 {s['wrapped']['p99']:.3f} ms",
            f"  floor Decide       p50 {s['floor']['p50']:.3f} ms  p99 {s['floor']['p99']:.3f} ms",
            f"  added p50 {added['p50']:.3f} ms ({_x(over['p50'])} a floor round trip), "
            f"p99 {added['p99']:.3f} ms ({_x(over['p99'])} the floor's p99)",
            f"  closed loop, {figures['threads']} threads: plain {closed['plain']['throughput_rps']:.0f}/s, "
            f"wrapped {closed['wrapped']['throughput_rps']:.0f}/s ({_x(figures['closed_ratio'])})",
        ]
    )


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _standalone(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.guarded", description=__doc__)
    p.add_argument("--count", type=int, default=1500, help="sequential calls of each kind")
    p.add_argument("--block", type=int, default=25)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--closed-seconds", type=float, default=3.0)
    p.add_argument("--closed-rounds", type=int, default=2)
    p.add_argument("--variant", default="", help="run spendgate through bench.variants with these levers")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    from bench._procs import Processes
    from bench.run import FLOOR, Bench, Target, _start_servers

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    server = Target("redis-w1", "Decide redis w1", "spendgate", "redis", 1)
    with Processes() as procs:
        bench = Bench(argparse.Namespace(variant=args.variant), procs, log)
        _start_servers(bench, [FLOOR, server])
        figures = measure(
            procs,
            bench.servers["redis-w1"].target,
            bench.servers["floor"].target,
            bench.api_keys.get("redis", ""),
            log,
            count=args.count,
            block=args.block,
            rounds=args.rounds,
            threads=args.threads,
            closed_seconds=args.closed_seconds,
            closed_rounds=args.closed_rounds,
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(table(figures))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.guarded`` (and of the processes it starts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["provider"]:
        _serve_provider()
        return 0
    if argv[:1] == ["calls"]:
        p = argparse.ArgumentParser(prog="python -m bench.guarded calls")
        p.add_argument("--provider", required=True)
        p.add_argument("--target", required=True)
        p.add_argument("--floor", required=True)
        p.add_argument("--mode", choices=("seq", "closed"), required=True)
        p.add_argument("--which", choices=("plain", "wrapped"), default="wrapped")
        p.add_argument("--count", type=int, default=500)
        p.add_argument("--block", type=int, default=25)
        p.add_argument("--threads", type=int, default=8)
        p.add_argument("--duration", type=float, default=3.0)
        p.add_argument("--warmup", type=int, default=20)
        p.add_argument("--tag", default=f"g{os.getpid()}")
        args = p.parse_args(argv[1:])
        result = _run_seq(args) if args.mode == "seq" else _run_closed(args)
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return 0
    return _standalone(argv)


if __name__ == "__main__":
    raise SystemExit(main())
