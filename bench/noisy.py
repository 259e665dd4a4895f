"""``python -m bench.noisy``: one tenant's noise must not slow another tenant's Decide.

Starts a private redis-server and one spendgate server (redis store, ``--evaluator
on`` as in the Kubernetes default, so policy evaluation runs in the server's process
tree) with API keys for two tenants, ``quiet`` and ``noisy``. Then, in alternating
rounds, it measures the quiet tenant's sequential Decide latency (bench/loadgen.py,
sync client):

- **alone**: nothing else runs;
- **with noise**: a noise process (this module with ``--noise``) acting as tenant
  ``noisy``, which has the heaviest banned-pattern set the bounds allow (ten patterns
  of 1,990 RE2 instructions, 19,900 together) with ``journal_prompts`` on, settles
  ``--noise-rate`` calls per second each carrying a 32 KiB prompt that no pattern
  matches (every pattern scans all of it) and each raising a violation, and holds
  ``--noise-streams`` WatchViolations streams open, every one reading every violation.

It reports the quiet tenant's p50/p99 alone and with noise, and the p99 ratio (the
target is at most 1.5). The machine is shared: the figures move with whatever else
runs; the alternating rounds spread that drift over both sides.

``python -m bench`` runs it as its noisy-neighbour section (``--no-noisy`` skips it);
``python -m bench.noisy`` runs it alone and prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench._procs import Processes, Served, descendants, python_module
from bench._stats import ratio, summarize

__all__ = ["HEAVY_PATTERNS", "main", "measure"]

# The costliest set policy writes accept (policies.py bounds): 10 x 1,990 = 19,900 RE2
# instructions. No prompt below contains "Z", so every pattern scans the whole prompt.
HEAVY_PATTERNS = [{"id": f"heavy-{i}", "pattern": f".{{248}}Z{i}"} for i in range(10)]
PROMPT_BYTES = 32 * 1024
MODEL = "gpt-4o"
TARGET_P99_RATIO = 1.5
DEADLINE_SECONDS = 10.0


def _config_yaml() -> str:
    from bench.run import BENCH_CONFIG_YAML

    return BENCH_CONFIG_YAML


def _keys_create(redis_url: str, tenant: str, scope: str) -> str:
    argv = [
        *python_module("spendgate_server"),
        *("keys", "create", "--redis-url", redis_url, "--tenant", tenant, "--scope", scope),
        *("--name", f"bench-{scope}"),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.split()[0]


def _set_policies(target: str, admin_key: str) -> None:
    import grpc
    from spendgate.v1 import policy_pb2 as ppb
    from spendgate.v1 import policy_pb2_grpc

    policies = ppb.Policies(
        banned_patterns=[ppb.BannedPattern(id=p["id"], pattern=p["pattern"]) for p in HEAVY_PATTERNS],
        journal_prompts=True,
        approval_required_threshold_cents=0,
    )
    metadata = (("authorization", f"Bearer {admin_key}"),)
    with grpc.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        etag = stub.GetPolicies(ppb.GetPoliciesRequest(), metadata=metadata).policy_set.etag
        stub.UpdatePolicies(ppb.UpdatePoliciesRequest(policies=policies, etag=etag), metadata=metadata)


def _quiet_decides(target: str, key: str, count: int, tag: str) -> dict[str, Any]:
    argv = python_module(
        "bench.loadgen",
        *("--target", target, "--client", "spendgate", "--rpc", "decide", "--mode", "seq"),
        *("--count", str(count), "--warmup", str(min(200, count)), "--tag", tag),
    )
    env = {**os.environ, "SPENDGATE_API_KEY": key}
    done = subprocess.run(argv, capture_output=True, timeout=600, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen exited {done.returncode}:\n{done.stderr.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _noise_stats(noise: Served) -> dict[str, Any]:
    for line in reversed(noise.log_path.read_text(errors="replace").splitlines()):
        if line.startswith("{") and '"noise_stats"' in line:
            stats: dict[str, Any] = json.loads(line)
            return stats
    return {"event": "noise_stats", "missing": noise.log_tail()}


def measure(
    *,
    rounds: int = 2,
    count: int = 1500,
    noise_rate: float = 8.0,
    noise_streams: int = 200,
    log: Callable[[str], None] = lambda _message: None,
) -> dict[str, Any]:
    """Run the noisy-neighbour check and return its figures (latencies in ms).

    Args:
        rounds: alone / with-noise pairs, alternating.
        count: the quiet tenant's sequential Decides per round and side.
        noise_rate: the noisy tenant's settles per second, each with a 32 KiB prompt.
        noise_streams: WatchViolations streams the noisy tenant holds open.
        log: progress lines.
    """
    samples: dict[str, list[int]] = {"alone": [], "noisy": []}
    errors = {"alone": 0, "noisy": 0}
    noise_runs: list[dict[str, Any]] = []
    with Processes() as procs:
        redis = procs.start_redis()
        redis_url = f"redis://127.0.0.1:{redis.port}/0"
        quiet_key = _keys_create(redis_url, "quiet", "client")
        noisy_key = _keys_create(redis_url, "noisy", "client")
        noisy_admin = _keys_create(redis_url, "noisy", "admin")
        config = procs.tmp / "noisy-config.yaml"
        config.write_text(_config_yaml())
        server = procs.start_server(
            "spendgate",
            [
                *python_module("spendgate_server"),
                *("serve", "--store", "redis", "--redis-url", redis_url, "--config", str(config)),
                *("--port", "0", "--evaluator", "on", "--evaluator-poll-millis", "50"),
                *("--max-watch-streams-per-tenant", str(max(noise_streams, 1))),
                *("--log-format", "json", "--drain-seconds", "0", "--metrics-port", "0"),
            ],
        )
        _set_policies(server.target, noisy_admin)
        log(
            f"  noisy neighbour: server {server.target}, {noise_streams} streams, "
            f"{noise_rate}/s settles with 32 KiB prompts"
        )
        for rnd in range(rounds):
            for side in ("alone", "noisy"):
                noise = None
                if side == "noisy":
                    noise = procs.start_server(
                        "noise",
                        python_module(
                            "bench.noisy",
                            *("--noise", "--target", server.target, "--noise-rate", str(noise_rate)),
                            *("--noise-streams", str(noise_streams)),
                        ),
                        env={"SG_NOISY_CLIENT_KEY": noisy_key, "SG_NOISY_ADMIN_KEY": noisy_admin},
                    )
                log(f"  quiet tenant Decide, {side} (round {rnd + 1}/{rounds}, {count} calls)")
                result = _quiet_decides(server.target, quiet_key, count, f"quiet-{side}-{rnd}-")
                samples[side] += result["samples_us"]
                errors[side] += result["errors"]
                if noise is not None:
                    procs.stop(noise)
                    noise_runs.append(_noise_stats(noise))
        # The evaluation process (and multiprocessing's resource tracker) under the server.
        server_children = len(descendants(server.pid))
    alone, noisy = summarize(samples["alone"]), summarize(samples["noisy"])
    p99_ratio = ratio(noisy["p99"], alone["p99"])
    return {
        "quiet_decide_alone_ms": alone,
        "quiet_decide_with_noise_ms": noisy,
        "p50_ratio": ratio(noisy["p50"], alone["p50"]),
        "p99_ratio": p99_ratio,
        "target_p99_ratio": TARGET_P99_RATIO,
        "within_target": p99_ratio is not None and p99_ratio <= TARGET_P99_RATIO,
        "calls": {side: len(values) for side, values in samples.items()},
        "errors": errors,
        "noise": {
            "patterns": len(HEAVY_PATTERNS),
            "prompt_bytes": PROMPT_BYTES,
            "settle_rate_per_s": noise_rate,
            "streams": noise_streams,
            "runs": noise_runs,
        },
        "server_child_processes": server_children,
    }


# --- the noise process -------------------------------------------------------------------------


def _prompt(rng: random.Random) -> str:
    words = []
    size = 0
    while size < PROMPT_BYTES - 16:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 12)))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[: PROMPT_BYTES - 1]


async def _noise(target: str, rate: float, streams: int) -> None:
    import grpc
    from spendgate.v1 import decision_pb2 as pb
    from spendgate.v1 import decision_pb2_grpc, violation_pb2_grpc
    from spendgate.v1 import violation_pb2 as vpb

    client_md = (("authorization", f"Bearer {os.environ['SG_NOISY_CLIENT_KEY']}"),)
    admin_md = (("authorization", f"Bearer {os.environ['SG_NOISY_ADMIN_KEY']}"),)
    stats: dict[str, Any] = {
        "event": "noise_stats",
        "settled": 0,
        "settle_errors": 0,
        "streams_open": 0,
        "streams_refused": 0,
        "stream_messages": 0,
    }
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Several connections, as many clients would have.
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    watchers = [violation_pb2_grpc.ViolationServiceStub(c) for c in channels]

    ready = asyncio.Event()
    if not streams:
        ready.set()
    settled_streams = 0

    def stream_settled() -> None:
        # A stream is known open once it delivered its first violation, or known refused.
        nonlocal settled_streams
        settled_streams += 1
        if settled_streams == streams:
            ready.set()

    async def watch(index: int) -> None:
        stub = watchers[index % len(watchers)]
        call = stub.WatchViolations(vpb.WatchViolationsRequest(), metadata=admin_md)
        opened = False
        try:
            async for _ in call:
                stats["stream_messages"] += 1
                if not opened:
                    opened = True
                    stats["streams_open"] += 1
                    stream_settled()
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                stats["streams_refused"] += 1
                stream_settled()
        except asyncio.CancelledError:
            call.cancel()
            raise

    watch_tasks = [asyncio.create_task(watch(i)) for i in range(streams)]
    stub = decision_pb2_grpc.DecisionServiceStub(channels[0])
    rng = random.Random(7)
    prompts = [_prompt(rng) for _ in range(4)]

    async def settle_one(n: int) -> None:
        session = f"noise-{os.getpid()}-{n // 32}"
        try:
            decision = await stub.Decide(
                pb.DecideRequest(
                    session_id=session,
                    model=MODEL,
                    input_tokens=8000,
                    max_output_tokens=100,
                    fingerprint=n.to_bytes(16, "big") + os.getpid().to_bytes(16, "big"),
                ),
                metadata=client_md,
                timeout=DEADLINE_SECONDS,
            )
            await stub.Settle(
                pb.SettleRequest(
                    session_id=session,
                    reservation_id=decision.reservation_id,
                    model=MODEL,
                    usage=pb.Usage(input_tokens=8000, output_tokens=100),
                    outcome=pb.PROVIDER_OUTCOME_OK,
                    prompt_text=prompts[n % len(prompts)],
                ),
                metadata=client_md,
                timeout=DEADLINE_SECONDS,
            )
            stats["settled"] += 1
        except grpc.aio.AioRpcError:
            stats["settle_errors"] += 1

    # Ready once every stream has delivered a first violation (or been refused), so the quiet
    # tenant measures the steady state.
    first = asyncio.create_task(settle_one(10**9))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ready.wait(), 25)
    await first
    print(json.dumps({"event": "serving", "port": 0, "what": "noise ready"}), flush=True)
    pending: set[asyncio.Task[None]] = set()
    started, n = loop.time(), 0
    while not stop.is_set():
        # Calls on a schedule: a slow server does not slow the noise down.
        task = asyncio.create_task(settle_one(n))
        pending.add(task)
        task.add_done_callback(pending.discard)
        n += 1
        until_next = started + n / rate - loop.time()
        if until_next > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), until_next)
    for task in [*pending, *watch_tasks]:
        task.cancel()
    await asyncio.gather(*pending, *watch_tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    stats["seconds"] = round(loop.time() - started, 3)
    print(json.dumps(stats), flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.noisy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny counts: checks the harness runs")
    p.add_argument("--rounds", type=int, default=2, help="alone / with-noise pairs")
    p.add_argument("--count", type=int, default=1500, help="quiet Decides per round and side")
    p.add_argument("--noise-rate", type=float, default=8.0, help="noisy settles per second (32 KiB prompts)")
    p.add_argument("--noise-streams", type=int, default=200, help="noisy WatchViolations streams")
    p.add_argument("--noise", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", default="", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.noisy``; prints the figures as JSON."""
    args = _parser().parse_args(argv)
    if args.noise:
        asyncio.run(_noise(args.target, args.noise_rate, args.noise_streams))
        return 0
    if args.quick:
        args.rounds, args.count, args.noise_streams = 1, 100, 20

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    figures = measure(
        rounds=args.rounds,
        count=args.count,
        noise_rate=args.noise_rate,
        noise_streams=args.noise_streams,
        log=log,
    )
    figures["wall_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
