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
from typing import Any, cast

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


# Client levers: the wrapper with one of its settle paths turned off, to measure what each buys.
CLIENT_LEVERS = {
    "no_carry": "settles never ride along a Decide (each goes on the settle thread)",
    "no_batch": "the settle thread sends each settle alone (no SettleBatch)",
    "no_rpc": "Decide and Settle answered in the client process, no network: what the wrapper and "
    "its settle thread cost alone (the bound of a design deciding locally, docs/session-leases.md)",
    "floor_rpc": "every Decide, Settle and SettleBatch is a real RPC to the naive floor, answered "
    "in-process: the bound of any design with one RPC per call (the floor's server does no work)",
}


class _LocalStub:
    """Answers the DecisionService in-process: every call allowed, every settle applied."""

    def __init__(self) -> None:
        self._ids = iter(range(1, 2**62))

    def Decide(self, request: Any, **_: Any) -> Any:  # gRPC method name
        from spendgate.v1 import decision_pb2 as pb

        return pb.DecideResponse(
            verdict=pb.VERDICT_ALLOW,
            effective_model=request.model,
            decision_id=f"{next(self._ids):032x}",
            reservation_id=f"{next(self._ids):032x}",
            settle_results=[pb.SettleResult() for _ in request.settles],
        )

    def Settle(self, request: Any, **_: Any) -> Any:  # gRPC method name
        from spendgate.v1 import decision_pb2 as pb

        return pb.SettleResponse()

    def SettleBatch(self, request: Any, **_: Any) -> Any:  # gRPC method name
        from spendgate.v1 import decision_pb2 as pb

        return pb.SettleBatchResponse(results=[pb.SettleResult() for _ in request.settles])


class _FloorStub:
    """Sends each call to the naive floor (a real RPC: the same bytes, metadata and deadline),
    then answers it as :class:`_LocalStub` does, since the floor's empty reply allows nothing."""

    def __init__(self, target: str) -> None:
        import grpc
        from spendgate.v1 import decision_pb2_grpc

        self._floor = decision_pb2_grpc.DecisionServiceStub(grpc.insecure_channel(target))
        self._local = _LocalStub()

    def Decide(self, request: Any, **kwargs: Any) -> Any:  # gRPC method name
        self._floor.Decide(request, **kwargs)
        return self._local.Decide(request)

    def Settle(self, request: Any, **kwargs: Any) -> Any:  # gRPC method name
        self._floor.Settle(request, **kwargs)
        return self._local.Settle(request)

    def SettleBatch(self, request: Any, **kwargs: Any) -> Any:  # gRPC method name
        self._floor.SettleBatch(request, **kwargs)
        return self._local.SettleBatch(request)


def _wrapped(args: argparse.Namespace, variant: str) -> Any:
    from spendgate_client import JournaledAnthropic

    wrapped = JournaledAnthropic(
        session_id=f"{args.tag}-{variant or 'shipped'}",
        spendgate_target=args.target,
        fail_mode="closed",
        decide_timeout=DEADLINE_SECONDS,
        api_key=PROVIDER_KEY,
        base_url=args.provider,
        max_retries=0,
    )
    settler = wrapped._spendgate_gate.settler
    for lever in filter(None, variant.split("+")):
        if lever == "no_carry":
            settler.carry_seconds = 0.0
        elif lever == "no_batch":
            settler.max_batch = 1
        elif lever == "no_rpc":
            wrapped._spendgate_gate.client._stub = cast(Any, _LocalStub())
        elif lever == "floor_rpc":
            wrapped._spendgate_gate.client._stub = cast(Any, _FloorStub(args.floor))
        else:
            raise SystemExit(
                f"bench.guarded: unknown client lever {lever!r}; known: {', '.join(CLIENT_LEVERS)}"
            )
    return wrapped


def _plain(args: argparse.Namespace) -> Any:
    import anthropic

    return anthropic.Anthropic(api_key=PROVIDER_KEY, base_url=args.provider, max_retries=0)


def _name(variant: str) -> str:
    return f"wrapped[{variant}]" if variant else "wrapped"


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
    plain = _plain(args)
    wrapped = {_name(v): _wrapped(args, v) for v in args.variants}
    floor, close_floor = _floor_decide(args.floor)

    def sdk_call(client: Any, tag: str) -> Callable[[int], object]:
        return lambda i: client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=_body(tag, i))

    calls: dict[str, Callable[[int], object]] = {"plain": sdk_call(plain, "p")}
    calls.update({name: sdk_call(client, f"{args.tag}-{name}") for name, client in wrapped.items()})
    calls["floor"] = floor
    # The Decide RPC inside each wrapped call, timed where the wrapper makes it: with the
    # settles it carries, it shows how much of the added latency is the RPC.
    decide_us: dict[str, list[int]] = {name: [] for name in wrapped}
    for name, client in wrapped.items():
        _time_decides(client._spendgate_gate.client, decide_us[name])
    samples: dict[str, list[int]] = {name: [] for name in calls}
    errors = {name: 0 for name in calls}
    first_error = ""
    clock = time.perf_counter_ns
    for i in range(args.warmup):
        for call in calls.values():
            call(1_000_000 + i)
    for client in wrapped.values():
        client.spendgate_flush(DEADLINE_SECONDS)
    for timed in decide_us.values():
        timed.clear()
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
            if name in wrapped:
                # Untimed: the next block starts without this block's settles in flight.
                wrapped[name].spendgate_flush(DEADLINE_SECONDS)
    settlers = {name: client._spendgate_gate.settler for name, client in wrapped.items()}
    result = {
        "samples_us": samples,
        "decide_us": decide_us,
        "errors": errors,
        "first_error": first_error,
        "settled": {name: s.settled for name, s in settlers.items()},
        "carried": {name: s.carried for name, s in settlers.items()},
        "settle_dropped": {name: s.dropped for name, s in settlers.items()},
    }
    for client in wrapped.values():
        client.close()
    plain.close()
    close_floor()
    return result


def _time_decides(client: Any, into: list[int]) -> None:
    """Record, in ``into``, the µs of each ``client.decide`` (the sync DecisionClient's)."""
    decide = client.decide
    clock = time.perf_counter_ns

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            return decide(*args, **kwargs)
        finally:
            into.append((clock() - t0) // 1000)

    client.decide = timed


def _run_closed(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    wrapped = _wrapped(args, args.variants[0]) if args.which != "plain" else None
    client = wrapped if wrapped is not None else _plain(args)
    tag = f"{args.tag}-{args.which}"
    counter = iter(range(10**9))
    lock = threading.Lock()
    done = 0
    errors = 0
    first_error = ""
    for i in range(args.warmup):
        client.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=_body(tag, 10**9 + i))
    if wrapped is not None:
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

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    calls_end = time.perf_counter()
    flushed = wrapped.spendgate_flush(60.0) if wrapped is not None else True
    end = time.perf_counter()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    settler = wrapped._spendgate_gate.settler if wrapped is not None else None
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
        "settled": settler.settled if settler else 0,
        "carried": settler.carried if settler else 0,
        "throughput_rps": done / (end - start),
        "client_cpu_ms_per_call": 1000 * cpu / done if done else None,
    }
    client.close()
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
    levers: Sequence[str] = (),
    server_cpu: Callable[[], float] | None = None,
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
        levers: client lever sets (CLIENT_LEVERS, "+" combines) measured beside the
            wrapper as shipped, each as ``wrapped[<levers>]``.
        server_cpu: the spendgate server's CPU seconds so far, to report CPU per call.

    Returns:
        ``sequential`` (p50/p99/... of plain, each wrapped variant and the floor, ms),
        ``added_ms`` (each wrapped variant minus plain at p50, p90 and p99),
        ``added_over_floor`` (added latency over the floor's round trip at p50 and p99),
        ``closed`` (calls/s of each) and ``closed_ratio`` (each wrapped / plain).
    """
    provider = start_provider(procs)
    env = dict(os.environ)
    env.pop("SPENDGATE_API_KEY", None)
    if api_key:
        env["SPENDGATE_API_KEY"] = api_key
    variants = ["", *levers]
    wrapped = [_name(v) for v in variants]
    merged: dict[str, list[int]] = {name: [] for name in ("plain", *wrapped, "floor")}
    decides: dict[str, list[int]] = {name: [] for name in wrapped}
    errors = {name: 0 for name in merged}
    settled = dict.fromkeys(wrapped, 0)
    carried = dict.fromkeys(wrapped, 0)
    per_round = max(1, count // rounds)
    variant_args = [a for v in variants for a in ("--variant", v)]
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
            *variant_args,
        )
        for name in wrapped:
            decides[name].extend(result["decide_us"][name])
        for name in merged:
            merged[name].extend(result["samples_us"][name])
            errors[name] += result["errors"][name]
        for name in wrapped:
            settled[name] += result["settled"][name]
            carried[name] += result["carried"][name]
        if result["first_error"]:
            log(f"  ! guarded call sequential: {result['first_error']}")
    seq = {name: {**summarize(samples), "ok": len(samples)} for name, samples in merged.items()}
    decide_in_wrapper = {name: summarize(samples) for name, samples in decides.items() if samples}
    added = {name: {k: seq[name][k] - seq["plain"][k] for k in ("p50", "p90", "p99")} for name in wrapped}
    kinds = [("plain", ""), *((name, v) for name, v in zip(wrapped, variants, strict=True))]
    closed: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in kinds}
    for rnd in range(closed_rounds):
        # Rotate the order each round: whoever goes first meets a different machine state.
        for name, variant in kinds[rnd % len(kinds) :] + kinds[: rnd % len(kinds)]:
            log(f"  guarded call closed loop {name} ({threads} threads, round {rnd + 1}/{closed_rounds})")
            cpu0 = server_cpu() if server_cpu else 0.0
            run = _calls(
                env,
                provider,
                target,
                floor,
                "--mode",
                "closed",
                "--which",
                name,
                "--variant",
                variant,
                "--threads",
                str(threads),
                "--duration",
                str(closed_seconds),
                "--tag",
                f"c{rnd}-{os.getpid()}-{time.monotonic_ns()}",
            )
            if server_cpu and run["ok"]:
                run["server_cpu_ms_per_call"] = 1000 * (server_cpu() - cpu0) / run["ok"]
            if run["first_error"]:
                log(f"  ! guarded call closed {name}: {run['first_error']}")
            closed[name].append(run)
    rps = {name: sum(r["throughput_rps"] for r in runs) / len(runs) for name, runs in closed.items()}
    return {
        "model": MODEL,
        "levers": {lever: CLIENT_LEVERS.get(lever, "levers combined") for lever in levers},
        "sequential": seq,
        "sequential_errors": errors,
        "settled": settled,
        "carried": carried,
        "added_ms": added,
        "decide_in_wrapper": decide_in_wrapper,
        "added_over_floor": {
            name: {k: ratio(added[name][k], seq["floor"][k]) for k in ("p50", "p99")} for name in wrapped
        },
        "closed": {name: {"throughput_rps": rps[name], "runs": runs} for name, runs in closed.items()},
        "closed_ratio": {name: ratio(rps[name], rps["plain"]) for name in wrapped},
        "threads": threads,
    }


def table(figures: dict[str, Any]) -> str:
    """The guarded-call figures as lines for the terminal."""
    s, closed = figures["sequential"], figures["closed"]
    lines = [
        "Guarded call (JournaledAnthropic vs anthropic.Anthropic, fake provider, Redis store)",
        f"  {'':<32} {'seq p50 ms':>10} {'seq p99 ms':>10} {'added p50':>18} {'added p99':>18} "
        f"{'calls/s, ' + str(figures['threads']) + ' threads':>24}",
    ]
    for name in ("plain", *figures["added_ms"], "floor"):
        label = name if name != "floor" else "floor Decide"
        row = f"  {label:<32} {s[name]['p50']:>10.3f} {s[name]['p99']:>10.3f}"
        if name in figures["added_ms"]:
            added, over = figures["added_ms"][name], figures["added_over_floor"][name]
            row += f" {added['p50']:>7.3f} ({_x(over['p50'])} fl) {added['p99']:>7.3f} ({_x(over['p99'])} fl)"
        else:
            row += f" {'':>18} {'':>18}"
        if name in closed:
            rps = closed[name]["throughput_rps"]
            share = figures["closed_ratio"].get(name)
            row += f" {rps:>13.0f}" + (f" ({_x(share)} plain)" if share is not None else "")
        lines.append(row)
    for name, decide in figures.get("decide_in_wrapper", {}).items():
        lines.append(
            f"  {name + ': its Decide RPC':<32} {decide['p50']:>10.3f} {decide['p99']:>10.3f}"
            "   (inside the wrapped call, carrying the previous call's settle when one is due)"
        )
    return "\n".join(lines)


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
    p.add_argument(
        "--levers",
        default="",
        help=f"client lever sets measured beside the shipped wrapper, comma-separated ('+' combines): "
        f"{', '.join(CLIENT_LEVERS)}",
    )
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
            levers=[v.strip() for v in args.levers.split(",") if v.strip()],
            server_cpu=bench.servers["redis-w1"].cpu_seconds,
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
        p.add_argument("--which", default="wrapped", help="closed: plain, or the wrapped variant's name")
        p.add_argument(
            "--variant", action="append", dest="variants", help="client levers of a wrapped client (repeat)"
        )
        p.add_argument("--count", type=int, default=500)
        p.add_argument("--block", type=int, default=25)
        p.add_argument("--threads", type=int, default=8)
        p.add_argument("--duration", type=float, default=3.0)
        p.add_argument("--warmup", type=int, default=20)
        p.add_argument("--tag", default=f"g{os.getpid()}")
        args = p.parse_args(argv[1:])
        args.variants = args.variants or [""]
        result = _run_seq(args) if args.mode == "seq" else _run_closed(args)
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return 0
    return _standalone(argv)


if __name__ == "__main__":
    raise SystemExit(main())
