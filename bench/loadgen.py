"""Load generator: one process, one run, one JSON object on stdout.

Modes:
  seq     one call at a time from the *sync* client (latency without queueing);
  open    calls sent on a fixed schedule (``--rate`` per second), latency measured from
          each call's *scheduled* send time, so a slow server cannot hide queueing
          (no coordinated omission); a timerfd keeps the schedule with the
          sub-millisecond precision that event-loop timers (1 ms) do not have;
  closed  ``--concurrency`` callers, each sending its next call when the last answers.

Clients: ``floor`` is the raw generated stub on a default channel (what the naive
reference gets); ``spendgate`` is DecisionClient / AsyncDecisionClient as shipped,
fail-closed, so an outage is an error here and never a fake fast allowance; ``raw``
is the floor's client sending spendgate's API key (splits client from server cost).

Every call uses a distinct fingerprint and sessions of ``SESSION_CALLS`` calls, so
dedup and budgets (configured high) admit the traffic. ``--rpc settle`` first makes
the reservations it will settle (not timed).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from spendgate.v1 import decision_pb2 as pb
from spendgate.v1 import decision_pb2_grpc

__all__ = ["main"]

MODEL = "gpt-4o"
INPUT_TOKENS = 2000
MAX_OUTPUT_TOKENS = 1000
SESSION_CALLS = 64  # calls per session id: enough to exercise state, far below any limit
DEADLINE_SECONDS = 10.0  # long: this measures latency; outages would be errors, not timeouts


def _fingerprint(tag: str, i: int) -> bytes:
    return hashlib.sha256(f"{tag}:{i}".encode()).digest()


BLOCKED = False  # --blocked: every call in one session whose budget the first call used up
BLOCKED_CONFIG = {"max_session_usd": 0.01}  # below one call's estimate (crossing: 1st allowed)


def _session(tag: str, i: int) -> str:
    return f"{tag}-blocked" if BLOCKED else f"{tag}-s{i // SESSION_CALLS}"


def _decide_request(tag: str, i: int) -> pb.DecideRequest:
    return pb.DecideRequest(
        session_id=_session(tag, i),
        model=MODEL,
        input_tokens=INPUT_TOKENS,
        max_output_tokens=MAX_OUTPUT_TOKENS,
        fingerprint=_fingerprint(tag, i),
        tool_call_count=1,
    )


def _settle_request(session_id: str, reservation_id: str) -> pb.SettleRequest:
    return pb.SettleRequest(
        session_id=session_id,
        reservation_id=reservation_id,
        model=MODEL,
        usage=pb.Usage(input_tokens=INPUT_TOKENS, output_tokens=MAX_OUTPUT_TOKENS // 2),
        outcome=pb.PROVIDER_OUTCOME_OK,
    )


@dataclass
class Recorder:
    """Latencies (µs) of successful calls; the count, status codes and latencies of failed ones."""

    samples_us: list[int] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    error_codes: dict[str, int] = field(default_factory=dict)
    error_samples_us: list[int] = field(default_factory=list)

    def error(self, exc: BaseException, latency_us: int | None = None) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"[:300]
        # The client wraps an outage in SpendgateUnavailable; the gRPC error is its cause. A call
        # the client refused itself (at max_outstanding, never sent) has none.
        cause = exc if isinstance(exc, grpc.RpcError) else exc.__cause__
        if isinstance(cause, grpc.RpcError):
            code = cause.code().name
        elif isinstance(getattr(exc, "code", None), str):
            code = f"{exc.code} (client)"  # type: ignore[attr-defined]
        else:
            code = type(exc).__name__
        self.error_codes[code] = self.error_codes.get(code, 0) + 1
        if latency_us is not None:
            self.error_samples_us.append(latency_us)


def _multi_connection_options() -> list[tuple[str, Any]]:
    # Separate channels share one TCP connection through gRPC's global subchannel pool;
    # a local pool gives each channel its own, so SO_REUSEPORT can spread them over workers.
    return [("grpc.use_local_subchannel_pool", 1)]


def _patch_client_for_connections(connections: int) -> None:
    if connections <= 1:
        return
    from spendgate_client import _client

    original = _client._channel_options

    def options(target: str) -> list[tuple[str, Any]]:
        return [*original(target), *_multi_connection_options()]

    _client._channel_options = options


def _bound(args: argparse.Namespace) -> int:
    """The client's ``max_outstanding``: --max-outstanding when given, else the client's default."""
    from spendgate_client import DEFAULT_MAX_OUTSTANDING

    return DEFAULT_MAX_OUTSTANDING if args.max_outstanding is None else int(args.max_outstanding)


# --- calls -------------------------------------------------------------------------------------

AsyncCall = Callable[[int], Awaitable[None]]


class Reservations:
    """(session id, reservation id) pairs made by Decide, to be settled."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []


async def _prefill(args: argparse.Namespace, count: int) -> Reservations:
    """Make ``count`` reservations through the async client (untimed, gently: 8 callers).

    A failed Decide (an overloaded server may time out) is retried with a new call; if
    fewer than ``count`` could be made, settles wrap around (a repeat is ``already_settled``).
    """
    from spendgate_client import AsyncDecisionClient

    made = Reservations()
    client = AsyncDecisionClient(args.target, timeout=DEADLINE_SECONDS, fail_mode="closed")
    tag = args.tag + "-pre"
    next_i = 0
    limit = count * 2

    async def worker() -> None:
        nonlocal next_i
        while len(made.items) < count and next_i < limit:
            i = next_i
            next_i += 1
            session = _session(tag, i)
            try:
                decision = await client.decide(
                    session, MODEL, INPUT_TOKENS, MAX_OUTPUT_TOKENS, _fingerprint(tag, i), tool_call_count=1
                )
            except Exception:  # noqa: S112  # an untimed set-up call: try the next one
                continue
            if decision.reservation_id:
                made.items.append((session, decision.reservation_id))

    await asyncio.gather(*(worker() for _ in range(8)))
    await client.close()
    if not made.items:
        raise RuntimeError(f"could not make any reservation to settle at {args.target}")
    await asyncio.sleep(0.3)  # let the server settle down before the timed part
    return made


def _sync_call(
    args: argparse.Namespace, reservations: Reservations | None
) -> tuple[Callable[[int], None], Callable[[], None]]:
    tag = args.tag
    if args.client in ("floor", "raw"):
        channel = grpc.insecure_channel(args.target)
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        key = os.environ.get("SPENDGATE_API_KEY") if args.client == "raw" else None
        metadata = (("authorization", f"Bearer {key}"),) if key else None
        if args.rpc == "decide":

            def call(i: int) -> None:
                stub.Decide(_decide_request(tag, i), timeout=DEADLINE_SECONDS, metadata=metadata)
        else:

            def call(i: int) -> None:
                stub.Settle(_settle_request(_session(tag, i), os.urandom(16).hex()), timeout=DEADLINE_SECONDS)

        return call, channel.close

    from spendgate_client import DecisionClient

    client = DecisionClient(
        args.target, timeout=DEADLINE_SECONDS, fail_mode="closed", max_outstanding=_bound(args)
    )
    if args.rpc == "decide":

        def call(i: int) -> None:
            client.decide(
                _session(tag, i),
                MODEL,
                INPUT_TOKENS,
                MAX_OUTPUT_TOKENS,
                _fingerprint(tag, i),
                tool_call_count=1,
                enforcement_config=BLOCKED_CONFIG if BLOCKED else None,
            )
    else:
        assert reservations is not None
        items = reservations.items

        def call(i: int) -> None:
            session, reservation = items[i % len(items)]
            client.settle(
                session, reservation, MODEL, input_tokens=INPUT_TOKENS, output_tokens=MAX_OUTPUT_TOKENS // 2
            )

    return call, client.close


def _floor_async_call(args: argparse.Namespace, channel: grpc.aio.Channel) -> AsyncCall:
    stub: Any = decision_pb2_grpc.DecisionServiceStub(channel)
    tag = args.tag
    if args.rpc == "decide":

        async def decide(i: int) -> None:
            await stub.Decide(_decide_request(tag, i), timeout=DEADLINE_SECONDS)

        return decide

    async def settle(i: int) -> None:
        await stub.Settle(_settle_request(_session(tag, i), os.urandom(16).hex()), timeout=DEADLINE_SECONDS)

    return settle


def _spendgate_async_call(
    args: argparse.Namespace, client: Any, reservations: Reservations | None
) -> AsyncCall:
    tag = args.tag
    if args.rpc == "decide":

        async def decide(i: int) -> None:
            await client.decide(
                _session(tag, i),
                MODEL,
                INPUT_TOKENS,
                MAX_OUTPUT_TOKENS,
                _fingerprint(tag, i),
                tool_call_count=1,
                enforcement_config=BLOCKED_CONFIG if BLOCKED else None,
            )

        return decide

    assert reservations is not None
    items = reservations.items

    async def settle(i: int) -> None:
        session, reservation = items[i % len(items)]
        await client.settle(
            session, reservation, MODEL, input_tokens=INPUT_TOKENS, output_tokens=MAX_OUTPUT_TOKENS // 2
        )

    return settle


def _async_calls(
    args: argparse.Namespace, reservations: Reservations | None
) -> tuple[list[AsyncCall], Callable[[], Awaitable[None]]]:
    """One call function per connection."""
    calls: list[AsyncCall] = []
    closers: list[Callable[[], Awaitable[None]]] = []
    for _ in range(args.connections):
        if args.client == "floor":
            options = _multi_connection_options() if args.connections > 1 else None
            channel = grpc.aio.insecure_channel(args.target, options=options)
            closers.append(channel.close)
            calls.append(_floor_async_call(args, channel))
        else:
            from spendgate_client import AsyncDecisionClient

            client = AsyncDecisionClient(
                args.target, timeout=DEADLINE_SECONDS, fail_mode="closed", max_outstanding=_bound(args)
            )
            closers.append(client.close)
            calls.append(_spendgate_async_call(args, client, reservations))

    async def close() -> None:
        for closer in closers:
            await closer()

    return calls, close


# --- modes -------------------------------------------------------------------------------------


def run_seq(args: argparse.Namespace, reservations: Reservations | None) -> tuple[Recorder, float]:
    call, close = _sync_call(args, reservations)
    rec = Recorder()
    clock = time.perf_counter_ns
    for i in range(args.warmup):
        try:
            call(args.count + i)
        except grpc.RpcError as exc:
            rec.error(exc)
    rec.errors = 0
    samples = rec.samples_us
    start = clock()
    for i in range(args.count):
        t0 = clock()
        try:
            call(i)
        except Exception as exc:  # count every failure, keep measuring
            rec.error(exc)
            continue
        samples.append((clock() - t0) // 1000)
    elapsed = (clock() - start) / 1e9
    close()
    return rec, elapsed


async def run_closed(args: argparse.Namespace, reservations: Reservations | None) -> tuple[Recorder, float]:
    calls, close = _async_calls(args, reservations)
    rec = Recorder()
    clock = time.perf_counter_ns
    limit = args.count if args.count else sys.maxsize
    next_i = 0
    measuring = False
    stop_at = 0

    async def caller(call: AsyncCall) -> None:
        nonlocal next_i
        while next_i < limit:
            i = next_i
            next_i += 1
            t0 = clock()
            try:
                await call(i)
            except Exception as exc:  # count every failure, keep measuring
                if measuring:
                    rec.error(exc)
                continue
            t1 = clock()
            if measuring:
                rec.samples_us.append((t1 - t0) // 1000)
            if stop_at and t1 >= stop_at:
                return

    # Warm-up: a short closed-loop burst (connections, JIT-free caches, Redis scripts).
    if args.warmup and reservations is None:
        saved, limit = limit, args.warmup
        await asyncio.gather(*(caller(calls[j % len(calls)]) for j in range(args.concurrency)))
        # Measured calls continue the numbering: a reused fingerprint would be a dedup block.
        limit = saved if saved == sys.maxsize else saved + next_i
    measuring = True
    start = clock()
    if not args.count:
        stop_at = start + int(args.duration * 1e9)
    await asyncio.gather(*(caller(calls[j % len(calls)]) for j in range(args.concurrency)))
    elapsed = (clock() - start) / 1e9
    await close()
    return rec, elapsed


async def run_open(
    args: argparse.Namespace, reservations: Reservations | None
) -> tuple[Recorder, float, list[int]]:
    calls, close = _async_calls(args, reservations)
    rec = Recorder()
    lags_us: list[int] = []
    clock = time.perf_counter_ns
    total = int(args.rate * args.duration)
    interval_ns = 1e9 / args.rate
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    done = asyncio.Event()

    async def one(i: int, due_ns: int) -> None:
        lags_us.append((clock() - due_ns) // 1000)
        try:
            await calls[i % len(calls)](i)
        except Exception as exc:  # count every failure, keep measuring
            rec.error(exc, (clock() - due_ns) // 1000)
            return
        rec.samples_us.append((clock() - due_ns) // 1000)

    if args.warmup and reservations is None:
        await asyncio.gather(
            *(calls[0](total + i) for i in range(min(args.warmup, 200))), return_exceptions=True
        )

    start = clock() + 20_000_000
    launched = 0

    def launch(due: int) -> None:
        # Every call due by now (a late wake sends several, each timed from its own due time).
        nonlocal launched
        for _ in range(due):
            if launched >= total:
                break
            i = launched
            launched += 1
            task = loop.create_task(one(i, start + int(i * interval_ns)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if launched >= total:
            done.set()

    ticker = _Ticker.timerfd(start, interval_ns) or _Ticker.thread(start, interval_ns, total)
    loop.add_reader(ticker.fd, lambda: launch(ticker.read()))
    try:
        await done.wait()
        if tasks:
            await asyncio.gather(*tasks)
        elapsed = (clock() - start) / 1e9
    finally:
        loop.remove_reader(ticker.fd)
        ticker.close()
    await close()
    return rec, elapsed, lags_us


class _Ticker:
    """A file descriptor that becomes readable at each scheduled send time.

    Linux: a timerfd (kernel hrtimer, µs precision, no thread, one read per wake that
    says how many sends fell due). Elsewhere: a thread sleeping to each due time and
    writing a byte to a pipe (needs the GIL on every wake, so it costs more CPU).
    Event-loop timers are not used: their resolution is 1 ms, as long as a Decide.
    """

    def __init__(self, fd: int, read: Callable[[], int], close: Callable[[], None]) -> None:
        self.fd, self.read, self.close = fd, read, close

    @classmethod
    def timerfd(cls, start_ns: int, interval_ns: float) -> _Ticker | None:
        import ctypes
        import ctypes.util

        if not sys.platform.startswith("linux"):
            return None
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

        class Timespec(ctypes.Structure):
            _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]  # ctypes API

        class Itimerspec(ctypes.Structure):
            _fields_ = [("it_interval", Timespec), ("it_value", Timespec)]  # ctypes API

        clock_monotonic, tfd_nonblock, tfd_cloexec, tfd_timer_abstime = 1, 0o4000, 0o2000000, 1
        fd = libc.timerfd_create(clock_monotonic, tfd_nonblock | tfd_cloexec)
        if fd < 0:
            return None
        # perf_counter_ns reads CLOCK_MONOTONIC on Linux: the same clock the timer runs on.
        step = int(interval_ns)
        spec = Itimerspec(
            Timespec(step // 10**9, step % 10**9), Timespec(start_ns // 10**9, start_ns % 10**9)
        )
        if libc.timerfd_settime(fd, tfd_timer_abstime, ctypes.byref(spec), None) != 0:
            os.close(fd)
            return None

        def read() -> int:
            try:
                return int.from_bytes(os.read(fd, 8), sys.byteorder)
            except BlockingIOError:
                return 0

        return cls(fd, read, lambda: os.close(fd))

    @classmethod
    def thread(cls, start_ns: int, interval_ns: float, total: int) -> _Ticker:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        stop = threading.Event()

        def pacer() -> None:
            for i in range(total):
                delay = (start_ns + i * interval_ns - time.perf_counter_ns()) / 1e9
                if delay > 0 and stop.wait(delay):
                    return
                os.write(write_fd, b".")

        thread = threading.Thread(target=pacer, name="pacer", daemon=True)
        thread.start()

        def read() -> int:
            try:
                return len(os.read(read_fd, 65536))
            except BlockingIOError:
                return 0

        def close() -> None:
            stop.set()
            thread.join()
            os.close(read_fd)
            os.close(write_fd)

        return cls(read_fd, read, close)


# --- entry point -------------------------------------------------------------------------------


def _needed_reservations(args: argparse.Namespace) -> int:
    if args.mode == "open":
        return int(args.rate * args.duration)
    return int(args.count) + (args.warmup if args.mode == "seq" else 0)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m bench.loadgen``; prints one JSON object."""
    global BLOCKED, DEADLINE_SECONDS
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument(
        "--client",
        choices=("floor", "spendgate", "raw"),
        required=True,
        help="raw: the generated stub, default channel, SPENDGATE_API_KEY sent (sequential decide)",
    )
    parser.add_argument("--rpc", choices=("decide", "settle"), default="decide")
    parser.add_argument("--mode", choices=("seq", "open", "closed"), required=True)
    parser.add_argument("--count", type=int, default=0, help="calls (seq; closed: instead of --duration)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds (open, closed)")
    parser.add_argument("--rate", type=float, default=0.0, help="offered calls per second (open)")
    parser.add_argument("--concurrency", type=int, default=32, help="callers (closed)")
    parser.add_argument("--connections", type=int, default=1, help="channels, each its own TCP connection")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls first")
    parser.add_argument(
        "--max-outstanding",
        type=int,
        default=None,
        help="spendgate client: calls awaiting an answer, at most (0: no bound; default: the client's)",
    )
    parser.add_argument("--tag", default=f"g{os.getpid()}", help="prefix of session ids and fingerprints")
    parser.add_argument(
        "--blocked", action="store_true", help="one session, over its budget after the first call (spendgate)"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=DEADLINE_SECONDS,
        help="seconds each call may take (the clients' default is 0.25); late calls are errors",
    )
    args = parser.parse_args(argv)
    BLOCKED = args.blocked
    DEADLINE_SECONDS = args.deadline
    if args.rpc == "settle" and args.client == "spendgate" and args.mode == "closed" and not args.count:
        parser.error("--rpc settle --mode closed needs --count (the reservations are made first)")
    if args.mode == "open" and args.rate <= 0:
        parser.error("--mode open needs --rate")
    _patch_client_for_connections(args.connections)

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    else:
        new_loop = uvloop.new_event_loop

    reservations = None
    if args.rpc == "settle" and args.client == "spendgate":
        with asyncio.Runner(loop_factory=new_loop) as runner:
            reservations = runner.run(_prefill(args, _needed_reservations(args)))
        args.warmup = 0 if args.mode != "seq" else args.warmup

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    lags: list[int] = []
    if args.mode == "seq":
        rec, elapsed = run_seq(args, reservations)
    else:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            if args.mode == "closed":
                rec, elapsed = runner.run(run_closed(args, reservations))
            else:
                rec, elapsed, lags = runner.run(run_open(args, reservations))
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    lags.sort()
    result = {
        "mode": args.mode,
        "client": args.client,
        "rpc": args.rpc,
        "ok": len(rec.samples_us),
        "errors": rec.errors,
        "first_error": rec.first_error,
        "elapsed_s": elapsed,
        "offered_rps": args.rate if args.mode == "open" else None,
        "concurrency": args.concurrency if args.mode == "closed" else 1,
        "connections": args.connections,
        "client_cpu_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
        "send_lag_us_p50": lags[len(lags) // 2] if lags else None,
        "send_lag_us_p99": lags[int(len(lags) * 0.99)] if lags else None,
        "samples_us": rec.samples_us,
        "error_codes": rec.error_codes,
        "error_samples_us": rec.error_samples_us,
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
