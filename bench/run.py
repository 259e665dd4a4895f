"""``make bench``: Decide and Settle against the naive floor, in one run, as ratios.

Starts a private redis-server, the floor (bench/floor.py) and spendgate servers
(redis store with ``--workers`` 1 and 2, memory store), then measures, each
load generator in its own process (bench/loadgen.py):

1. sequential latency (sync client), interleaved in rounds across servers so
   drift of a noisy machine hits all of them alike;
2. closed-loop throughput, with CPU-seconds per 1,000 calls of the server
   process(es), redis-server and the load generator (/proc/<pid>/stat);
3. open-loop latency at fixed fractions of the floor's capacity (scheduled sends,
   latency from the scheduled time);

for Decide, then Settle, then the guarded call (bench/guarded.py: a wrapped SDK
against the plain SDK on a fake provider), then the client wrapper's own overhead
(bench/wrapper_overhead.py when present), the token estimate's error before and after
calibration (bench/estimate_error.py), then the noisy-neighbour check
(bench/noisy.py: one tenant's heavy patterns and watch streams while another
decides). Writes bench/results/latest.json and bench/results/latency_vs_load.png and
prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._procs import Processes, Served, free_port, python_module
from bench._stats import ratio, summarize

__all__ = ["BENCH_CONFIG_YAML", "Target", "main"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# All five rules on, limits far above what the benchmark traffic reaches, so every call is
# evaluated by every rule and allowed (the downgrade threshold is above a call's estimate).
BENCH_CONFIG_YAML = """\
enforcement:
  token_ceiling: 1000000
  max_session_usd: 1000
  budget_mode: crossing
  dedup_ttl_seconds: 600
  max_tool_calls: 1000000
  model_downgrade:
    threshold_usd: 100
    fallback: gpt-4o-mini
"""


@dataclass(frozen=True)
class Target:
    """A server under test."""

    key: str  # "floor", "redis-w1", …
    label: str
    client: str  # loadgen --client
    store: str = ""
    workers: int = 1
    variant: str = ""  # levers of bench.variants ("" = the server as it is)
    flags: tuple[str, ...] = ()  # extra `spendgate serve` flags

    @property
    def connections(self) -> int:
        # One TCP connection lands on one SO_REUSEPORT worker: open two per worker.
        return 1 if self.workers == 1 else 2 * self.workers


FLOOR = Target("floor", "floor", "floor")


def _env_default(name: str, default: str) -> str:
    return os.environ.get("SG_BENCH_" + name.upper(), default)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--quick", action="store_true", help="tiny counts and durations (seconds): checks the harness runs")
    a(
        "--seq-count",
        type=int,
        default=int(_env_default("seq_count", "4000")),
        help="sequential calls per server (env SG_BENCH_SEQ_COUNT)",
    )
    a(
        "--rounds",
        type=int,
        default=int(_env_default("rounds", "2")),
        help="sequential runs are split in this many interleaved rounds (env SG_BENCH_ROUNDS)",
    )
    a(
        "--closed-seconds",
        type=float,
        default=float(_env_default("closed_seconds", "3")),
        help="closed-loop duration (env SG_BENCH_CLOSED_SECONDS)",
    )
    a(
        "--closed-rounds",
        type=int,
        default=int(_env_default("closed_rounds", "2")),
        help="closed-loop runs per server, interleaved (env SG_BENCH_CLOSED_ROUNDS)",
    )
    a(
        "--open-repeats",
        type=int,
        default=int(_env_default("open_repeats", "2")),
        help="runs of each open-loop load, the least disturbed kept (env SG_BENCH_OPEN_REPEATS)",
    )
    a(
        "--open-seconds",
        type=float,
        default=float(_env_default("open_seconds", "2")),
        help="duration of each open-loop load (env SG_BENCH_OPEN_SECONDS)",
    )
    a(
        "--loads",
        default=_env_default("loads", "0.1,0.25,0.4,0.5,0.65,0.9"),
        help="open-loop offered loads as fractions of the floor's capacity (env SG_BENCH_LOADS)",
    )
    a(
        "--concurrency",
        type=int,
        default=int(_env_default("concurrency", "32")),
        help="closed-loop callers (env SG_BENCH_CONCURRENCY)",
    )
    a(
        "--workers",
        default=_env_default("workers", "1,2"),
        help="--workers values to run with the redis store (env SG_BENCH_WORKERS)",
    )
    a("--stores", default=_env_default("stores", "redis,memory"), help="stores to run (env SG_BENCH_STORES)")
    a("--no-settle", action="store_true", help="skip the Settle runs")
    a(
        "--variant",
        default=_env_default("variant", ""),
        help="run spendgate through bench.variants with this lever set (tuning experiments)",
    )
    a(
        "--out",
        type=Path,
        default=Path(_env_default("out", str(RESULTS_DIR))),
        help="directory for latest.json and latency_vs_load.png (env SG_BENCH_OUT)",
    )
    a("--no-plot", action="store_true", help="skip the PNG")
    a("--no-noisy", action="store_true", help="skip the noisy-neighbour check (bench/noisy.py)")
    a("--no-guarded", action="store_true", help="skip the guarded call (bench/guarded.py)")
    a("--no-overload", action="store_true", help="skip the 1.5x-capacity run (bench/overload.py)")
    a(
        "--guarded-count",
        type=int,
        default=int(_env_default("guarded_count", "1500")),
        help="guarded call: sequential calls of each kind, plain and wrapped (env SG_BENCH_GUARDED_COUNT)",
    )
    return p


def _apply_quick(args: argparse.Namespace) -> None:
    args.seq_count, args.rounds = 60, 1
    args.closed_seconds, args.open_seconds, args.closed_rounds, args.open_repeats = 0.5, 0.5, 1, 1
    args.loads = "0.5,0.9"
    args.workers = "1"
    args.concurrency = 8
    args.guarded_count = 60


# --- running load generators -------------------------------------------------------------------


class Bench:
    """One benchmark run: the processes, the settings, and the figures gathered so far."""

    def __init__(self, args: argparse.Namespace, procs: Processes, log: Callable[[str], None]) -> None:
        self.args = args
        self.procs = procs
        self.log = log
        self.servers: dict[str, Served] = {}
        self.redis: Served | None = None
        self._tags = 0
        self.api_keys: dict[str, str] = {}

    def tag(self, prefix: str) -> str:
        """A fresh prefix for session ids and fingerprints."""
        self._tags += 1
        return f"{prefix}{self._tags}"

    def loadgen(
        self, target: Target, *extra: str, rpc: str = "decide", timeout: float = 300
    ) -> dict[str, Any]:
        """Run one load generator process to completion and return its JSON."""
        server = self.servers[target.key]
        argv = python_module(
            "bench.loadgen",
            "--target",
            server.target,
            "--client",
            target.client,
            "--rpc",
            rpc,
            "--tag",
            self.tag(f"{target.key}-{rpc}-"),
            *extra,
            *(["--blocked"] if getattr(self.args, "blocked", False) else []),
        )
        env = dict(os.environ)
        env.pop("SPENDGATE_API_KEY", None)
        if target.client in ("spendgate", "raw") and self.api_keys.get(target.store):
            env["SPENDGATE_API_KEY"] = self.api_keys[target.store]
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False, env=env)
        if done.returncode != 0:
            # One retry: a shared machine has transient failures a whole run should not die of.
            self.log(f"  ! loadgen failed, retrying once:\n{done.stderr.decode()[-1500:]}")
            done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(
                f"loadgen {' '.join(argv[2:])} exited {done.returncode}:\n{done.stderr.decode()[-3000:]}"
            )
        result: dict[str, Any] = json.loads(done.stdout)
        if result["errors"]:
            self.log(
                f"  ! {target.key} {rpc} {result['mode']}: {result['errors']} errors, first: "
                f"{result['first_error']}"
            )
        return result

    def cpu(self, target: Target) -> tuple[float, float]:
        """CPU seconds so far of the target's server process(es) and of redis-server."""
        assert self.redis is not None
        return self.servers[target.key].cpu_seconds(), self.redis.cpu_seconds()


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    samples = result.pop("samples_us")
    error_samples = result.pop("error_samples_us", [])
    figures = {**result, **summarize(samples)}
    figures["error_latency"] = summarize(error_samples)
    figures["throughput_rps"] = len(samples) / result["elapsed_s"] if result["elapsed_s"] else math.nan
    return figures


def _sequential(
    bench: Bench, targets: Sequence[Target], rpc: str, rounds: int = 0, keep_samples: bool = False
) -> dict[str, dict[str, Any]]:
    args = bench.args
    rounds = rounds or args.rounds
    per_round = max(1, args.seq_count // rounds)
    merged: dict[str, dict[str, Any]] = {}
    for rnd in range(rounds):
        for target in targets:
            bench.log(f"  {rpc} sequential {target.label} (round {rnd + 1}/{rounds}, {per_round} calls)")
            result = bench.loadgen(
                target,
                "--mode",
                "seq",
                "--count",
                str(per_round),
                "--warmup",
                str(min(200, per_round)),
                rpc=rpc,
            )
            into = merged.setdefault(
                target.key,
                {**result, "samples_us": [], "elapsed_s": 0.0, "ok": 0, "errors": 0, "client_cpu_s": 0.0},
            )
            into["samples_us"].extend(result["samples_us"])
            for field in ("elapsed_s", "ok", "errors", "client_cpu_s"):
                into[field] += result[field]
    if keep_samples:
        return {
            key: {**_figures(dict(result)), "samples_us": result["samples_us"]}
            for key, result in merged.items()
        }
    return {key: _figures(result) for key, result in merged.items()}


def _closed(bench: Bench, target: Target, rpc: str, count: int = 0) -> dict[str, Any]:
    args = bench.args
    bench.log(f"  {rpc} closed loop {target.label} ({args.concurrency} callers, {target.connections} conn)")
    extra = [
        "--mode",
        "closed",
        "--concurrency",
        str(args.concurrency),
        "--connections",
        str(target.connections),
    ]
    extra += ["--count", str(count)] if count else ["--duration", str(args.closed_seconds)]
    # CPU is read around the whole generator run; Settle's untimed reservations are then
    # counted as the calls they are (Decides), see _per_1k.
    server0, redis0 = bench.cpu(target)
    result = bench.loadgen(target, *extra, rpc=rpc)
    server1, redis1 = bench.cpu(target)
    figures = _figures(result)
    calls = figures["ok"] + (count if rpc == "settle" and target.client == "spendgate" else 0)
    figures["server_cpu_s"] = server1 - server0
    figures["redis_cpu_s"] = redis1 - redis0
    figures["calls_for_cpu"] = calls
    if calls:
        figures["server_cpu_s_per_1k"] = 1000 * (server1 - server0) / calls
        figures["redis_cpu_s_per_1k"] = 1000 * (redis1 - redis0) / calls
        figures["client_cpu_s_per_1k"] = (
            1000 * figures["client_cpu_s"] / figures["ok"] if figures["ok"] else None
        )
    return figures


def _merge_closed(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Closed-loop rounds as one figure set: mean throughput, CPU over all calls."""
    merged = dict(runs[0])
    merged["rounds"] = len(runs)
    merged["throughput_rps_runs"] = [r["throughput_rps"] for r in runs]
    merged["throughput_rps"] = sum(merged["throughput_rps_runs"]) / len(runs)
    for field in (
        "ok",
        "errors",
        "elapsed_s",
        "client_cpu_s",
        "server_cpu_s",
        "redis_cpu_s",
        "calls_for_cpu",
    ):
        merged[field] = sum(r[field] for r in runs)
    calls, ok = merged["calls_for_cpu"], merged["ok"]
    if calls:
        merged["server_cpu_s_per_1k"] = 1000 * merged["server_cpu_s"] / calls
        merged["redis_cpu_s_per_1k"] = 1000 * merged["redis_cpu_s"] / calls
    merged["client_cpu_s_per_1k"] = 1000 * merged["client_cpu_s"] / ok if ok else None
    return merged


def _best(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the lowest p99 (then fewest failures), the others kept beside it.

    Other work on a shared machine only ever adds latency, so the best of a few short
    repeats, taken alike for the floor and spendgate, is the least disturbed estimate.
    """
    ranked = sorted(tries, key=lambda t: (t["errors"], math.inf if math.isnan(t["p99"]) else t["p99"]))
    best = dict(ranked[0])
    best["repeats"] = [{k: t[k] for k in ("p50", "p99", "p99.9", "errors", "throughput_rps")} for t in tries]
    return best


def _open(bench: Bench, target: Target, rpc: str, rate: float, fraction: float) -> dict[str, Any]:
    args = bench.args
    bench.log(f"  {rpc} open loop {target.label} at {rate:.0f}/s ({fraction:g}x floor capacity)")
    result = bench.loadgen(
        target,
        "--mode",
        "open",
        "--rate",
        f"{rate:.3f}",
        "--duration",
        str(args.open_seconds),
        "--connections",
        str(target.connections),
        rpc=rpc,
    )
    figures = _figures(result)
    figures["fraction_of_floor"] = fraction
    return figures


# --- the run ---------------------------------------------------------------------------------


def _targets(args: argparse.Namespace) -> list[Target]:
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    targets = [FLOOR]
    for store in stores:
        for w in workers if store == "redis" else [1]:
            targets.append(Target(f"{store}-w{w}", f"Decide {store} w{w}", "spendgate", store, w))
    return targets


def _create_api_key(store_flag: list[str]) -> str:
    """Mint a client API key with ``spendgate keys create`` ("" when this server has no keys CLI)."""
    argv = [
        *python_module("spendgate_server"),
        "keys",
        "create",
        "--tenant",
        "bench",
        "--name",
        "bench",
        *store_flag,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        return ""
    return done.stdout.split()[0] if done.stdout.split() else ""


def _start_servers(bench: Bench, targets: Sequence[Target]) -> None:
    """Start ``targets`` (and, the first time, redis-server and the API keys)."""
    procs, args = bench.procs, bench.args
    config = procs.tmp / "bench-config.yaml"
    keys_file = procs.tmp / "keys.json"
    if bench.redis is None:
        bench.redis = procs.start_redis()
        redis_url = f"redis://127.0.0.1:{bench.redis.port}/0"
        config.write_text(BENCH_CONFIG_YAML)
        # Authentication on, as in production: one client key per store, sent by the client.
        bench.api_keys = {
            "redis": _create_api_key(["--redis-url", redis_url]),
            "memory": _create_api_key(["--keys-file", str(keys_file)]),
        }
        bench.log(f"  auth: {'API keys' if all(bench.api_keys.values()) else 'open dev mode (no keys CLI)'}")
    redis_url = f"redis://127.0.0.1:{bench.redis.port}/0"
    for target in targets:
        if target.client == "floor":
            argv = python_module("bench.floor", "--redis-url", redis_url, "--port", "0")
            bench.servers[target.key] = procs.start_server(target.key, argv)
            continue
        port = free_port() if target.workers > 1 else 0
        variant = target.variant or args.variant
        head = python_module("bench.variants", variant) if variant else python_module("spendgate_server")
        argv = [
            *head,
            "serve",
            "--store",
            target.store,
            "--redis-url",
            redis_url,
            "--config",
            str(config),
            "--port",
            str(port),
            "--workers",
            str(target.workers),
            "--log-format",
            "json",
            "--drain-seconds",
            "0",
            # The endpoint stays on as in production, on a port of its own per server.
            "--metrics-port",
            str(free_port()),
        ]
        if target.store == "memory" and bench.api_keys["memory"]:
            argv += ["--keys-file", str(keys_file)]
        argv += target.flags
        bench.servers[target.key] = procs.start_server(
            target.key, argv, port=port, ready_lines=target.workers
        )
        bench.log(f"  started {target.key} on {bench.servers[target.key].target}")


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name, dist in (
        ("grpcio", "grpcio"),
        ("redis_py", "redis"),
        ("hiredis", "hiredis"),
        ("protobuf", "protobuf"),
        ("uvloop", "uvloop"),
    ):
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
        versions["redis_server"] = next(w for w in out.split() if w.startswith("v=")).removeprefix("v=")
    except (OSError, subprocess.CalledProcessError, StopIteration):
        versions["redis_server"] = "unknown"
    return versions


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "hostname": platform.node(),
    }


def _wrapper_overhead() -> dict[str, Any]:
    try:
        module = importlib.import_module("bench.wrapper_overhead")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.wrapper_overhead":
            return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        return {"status": "missing", "note": "bench/wrapper_overhead.py is not in this tree yet"}
    try:
        figures: dict[str, float] = module.measure()
    except Exception as exc:  # another module's failure is reported, not fatal
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok", "figures": figures}


def _estimate_error() -> dict[str, Any]:
    from bench import estimate_error

    try:
        return {"status": "ok", "figures": estimate_error.measure()}
    except Exception as exc:  # one section's failure is reported, not fatal to the run
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}


def _noisy_neighbour(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    if args.no_noisy:
        return {"status": "skipped", "note": "--no-noisy"}
    from bench import noisy

    sizes = {"rounds": 1, "count": 100, "noise_streams": 20} if args.quick else {}
    try:
        return {"status": "ok", "figures": noisy.measure(log=log, **sizes)}
    except Exception as exc:  # one section's failure is reported, not fatal to the run
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}


def _guarded(bench: Bench) -> dict[str, Any]:
    args = bench.args
    if args.no_guarded or "redis-w1" not in bench.servers:
        return {"status": "skipped", "note": "--no-guarded or no redis-w1 server"}
    from bench import guarded

    quick = args.quick
    try:
        figures = guarded.measure(
            bench.procs,
            bench.servers["redis-w1"].target,
            bench.servers["floor"].target,
            bench.api_keys.get("redis", ""),
            bench.log,
            count=args.guarded_count,
            rounds=1 if quick else 2,
            closed_seconds=0.5 if quick else 3.0,
            closed_rounds=1 if quick else 2,
            server_cpu=bench.servers["redis-w1"].cpu_seconds,
        )
    except Exception as exc:  # one section's failure is reported, not fatal to the run
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok", "figures": figures}


def _overload(bench: Bench, decide: dict[str, Any]) -> dict[str, Any]:
    args = bench.args
    if args.no_overload or "redis-w1" not in bench.servers:
        return {"status": "skipped", "note": "--no-overload or no redis-w1 server"}
    from bench import overload

    shipped = next(t for t in _targets(args) if t.key == "redis-w1")
    unbounded = Target(
        "redis-w1-unbounded", "no admission", "spendgate", "redis", 1, flags=overload.NO_ADMISSION
    )
    try:
        _start_servers(bench, [unbounded])
        figures = overload.measure(
            bench,
            [shipped, unbounded],
            decide["redis-w1"]["closed"]["throughput_rps"],
            bench.log,
            seconds=1.0 if args.quick else 3.0,
            repeats=1 if args.quick else 2,
        )
    except Exception as exc:  # one section's failure is reported, not fatal to the run
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    return {"status": "ok", "figures": figures, "keys": [shipped.key, unbounded.key]}


def _run_rpc(bench: Bench, targets: Sequence[Target], rpc: str, capacity: float | None) -> dict[str, Any]:
    args = bench.args
    results: dict[str, Any] = {t.key: {} for t in targets}
    for key, figures in _sequential(bench, targets, rpc).items():
        results[key]["sequential"] = figures
    # Closed loop in rounds, servers in turn: the floor's capacity sets every open-loop load,
    # so one unlucky run of it must not skew them all.
    runs: dict[str, list[dict[str, Any]]] = {t.key: [] for t in targets}
    for _ in range(args.closed_rounds):
        for target in targets:
            count = 0
            if rpc == "settle" and target.client == "spendgate":
                # Closed-loop Settle needs one reservation per call, made first: size it to the run.
                guess = capacity or 2000.0
                count = max(50, int(guess * args.closed_seconds * 0.7))
            runs[target.key].append(_closed(bench, target, rpc, count))
    for target in targets:
        results[target.key]["closed"] = _merge_closed(runs[target.key])
    if capacity is None:
        capacity = results["floor"]["closed"]["throughput_rps"]
    assert capacity is not None
    fractions = [float(f) for f in args.loads.split(",") if f.strip()]
    if rpc == "settle":
        fractions = [f for f in fractions if f in (0.5, 0.9)] or fractions[:2]
    # Load by load, all servers in turn: drift of a shared machine spreads over all of them.
    for target in targets:
        results[target.key]["open"] = []
    for f in fractions:
        tries: dict[str, list[dict[str, Any]]] = {t.key: [] for t in targets}
        for _ in range(args.open_repeats):
            for target in targets:
                tries[target.key].append(_open(bench, target, rpc, capacity * f, f))
        for target in targets:
            results[target.key]["open"].append(_best(tries[target.key]))
    results["floor_capacity_rps"] = capacity
    return results


def _ratios(rpc_results: dict[str, Any], targets: Sequence[Target]) -> dict[str, Any]:
    floor = rpc_results["floor"]
    out: dict[str, Any] = {}
    for target in targets:
        if target.key == "floor":
            continue
        mine = rpc_results[target.key]
        r: dict[str, Any] = {
            "sequential": {
                k: ratio(mine["sequential"][k], floor["sequential"][k])
                for k in ("p50", "p90", "p99", "p99.9")
            },
            "closed_throughput": ratio(mine["closed"]["throughput_rps"], floor["closed"]["throughput_rps"]),
            "server_cpu_s_per_1k": ratio(
                mine["closed"].get("server_cpu_s_per_1k"), floor["closed"].get("server_cpu_s_per_1k")
            ),
            "open": [],
        }
        for mo, fo in zip(mine["open"], floor["open"], strict=True):
            r["open"].append(
                {
                    "fraction_of_floor": mo["fraction_of_floor"],
                    **{k: ratio(mo[k], fo[k]) for k in ("p50", "p90", "p99", "p99.9")},
                }
            )
        out[target.key] = r
    return out


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Run every measurement and return the results document (also written to --out)."""
    started = time.monotonic()
    load_before = _loadavg()
    if load_before and load_before[0] > (os.cpu_count() or 1) / 2:
        log(f"  note: load average {load_before[0]:.1f} before the run: other work shares these CPUs")
    targets = _targets(args)
    with Processes() as procs:
        bench = Bench(args, procs, log)
        log("starting redis-server, the floor and spendgate servers")
        _start_servers(bench, targets)
        log("Decide")
        decide = _run_rpc(bench, targets, "decide", None)
        settle = None
        if not args.no_settle:
            log("Settle")
            settle = _run_rpc(bench, targets, "settle", decide["floor_capacity_rps"])
        log("guarded call")
        guarded_call = _guarded(bench)
        log("overload")
        overload_run = _overload(bench, decide)
        server_argv = {k: s.argv for k, s in bench.servers.items()}
        api_keys = bench.api_keys
    log("wrapper overhead")
    wrapper = _wrapper_overhead()
    log("token estimate error")
    estimate = _estimate_error()
    log("noisy neighbour")
    noisy_neighbour = _noisy_neighbour(args, log)
    document: dict[str, Any] = {
        "schema": 1,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": _versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "config_yaml": BENCH_CONFIG_YAML,
        "servers": server_argv,
        "auth": "api-key" if all(api_keys.values()) else "open-dev-mode",
        "targets": [t.__dict__ for t in targets],
        "decide": decide,
        "decide_ratios": _ratios(decide, targets),
        "settle": settle,
        "settle_ratios": _ratios(settle, targets) if settle else None,
        "guarded_call": guarded_call,
        "overload": overload_run,
        "wrapper_overhead": wrapper,
        "estimate_error": estimate,
        "noisy_neighbour": noisy_neighbour,
        "wall_seconds": time.monotonic() - started,
        # Other processes on the machine skew every figure; ratios less so (same run).
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
    }
    return document


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench``."""
    args = _parser().parse_args(argv)
    if args.quick:
        _apply_quick(args)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    from bench import report

    document = run(args, log)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "latest.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(document), indent=2, allow_nan=False) + "\n")
    tmp.replace(json_path)
    (args.out / "latest.md").write_text(report.markdown(document) + "\n")
    print(report.table(document))
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        print("\nno plot: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        args.no_plot = True
    if not args.no_plot:
        png = args.out / "latency_vs_load.png"
        report.plot(document, png)
        print(f"\nwrote {json_path} and {png}")
    else:
        print(f"\nwrote {json_path}")
    return 0


_CHECKOUT = str(Path(__file__).resolve().parents[1])
_RUN_TMP = re.compile(r"\S*/sg-bench-[^/\s]+/")  # bench._procs.Processes.tmp


def _finite(value: Any) -> Any:
    # JSON has no NaN: a figure that could not be measured (no samples) is null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    # Paths inside the checkout are recorded relative to it: the results are committed, and
    # where one machine keeps its checkout says nothing about the figures.
    if isinstance(value, str) and value.startswith(_CHECKOUT):
        return "." + value[len(_CHECKOUT) :]
    # Files the run made in its own temporary directory (the servers' config, the key file):
    # named by the directory's role, not by where this machine keeps temporary files.
    if isinstance(value, str) and _RUN_TMP.search(value):
        return _RUN_TMP.sub("<bench tmp>/", value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
