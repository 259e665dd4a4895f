"""What each tuning lever buys: the server as it is against the same server with one lever, same run.

``python -m bench.levers --levers redis_pool,no_metrics`` starts one private Redis,
the unchanged server ("baseline") and one server per lever (bench/variants.py),
then, round after round so a noisy machine's drift hits all alike, measures
sequential Decide latency and closed-loop throughput with CPU-seconds per 1,000
decisions. Writes bench/results/levers.json and prints each lever beside the baseline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench._procs import Processes
from bench._stats import summarize
from bench.run import (
    FLOOR,
    RESULTS_DIR,
    Bench,
    Target,
    _closed,
    _finite,
    _machine,
    _sequential,
    _start_servers,
    _versions,
)
from bench.variants import LEVERS

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.levers``."""
    p = argparse.ArgumentParser(prog="python -m bench.levers", description=__doc__)
    p.add_argument(
        "--levers",
        default="redis_pool,no_metrics,no_breaker,asyncio_loop",
        help=f"comma-separated; known: {', '.join(LEVERS)}; '+' combines (a+b)",
    )
    p.add_argument("--store", default="redis")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq-count", type=int, default=1500, help="sequential calls per server per round")
    p.add_argument("--closed-seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument(
        "--blocked", action="store_true", help="workload: one session over its budget (for deny_cache)"
    )
    p.add_argument("--rpc", choices=("decide", "settle"), default="decide", help="the call measured")
    p.add_argument(
        "--settle-count",
        type=int,
        default=6000,
        help="settle: reservations made first per closed-loop run (the run lasts until they are settled)",
    )
    args = p.parse_args(argv)
    args.variant = ""

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    levers = [v.strip() for v in args.levers.split(",") if v.strip()]
    # The floor runs alongside, so every lever can also be read as a ratio to it.
    targets = [FLOOR, Target("baseline", "baseline", "spendgate", args.store, args.workers)]
    targets += [
        Target(v, v, "spendgate", args.store, args.workers, variant=v.replace("+", ",")) for v in levers
    ]
    seq: dict[str, list[int]] = {t.key: [] for t in targets}
    closed: dict[str, list[dict[str, Any]]] = {t.key: [] for t in targets}
    with Processes() as procs:
        bench = Bench(args, procs, log)
        _start_servers(bench, targets)
        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds}")
            # Rotate the order each round: whoever goes first meets a different machine state.
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            for key, figures in _sequential(bench, order, args.rpc, rounds=1, keep_samples=True).items():
                seq[key].extend(figures["samples_us"])
            for target in order:
                count = args.settle_count if args.rpc == "settle" and target.client == "spendgate" else 0
                closed[target.key].append(_closed(bench, target, args.rpc, count))
    results: dict[str, Any] = {}
    for t in targets:
        runs = closed[t.key]
        calls = sum(r["calls_for_cpu"] for r in runs)
        results[t.key] = {
            "doc": LEVERS[t.key].doc if t.key in LEVERS else _DOCS.get(t.key, "levers combined"),
            "sequential": summarize(seq[t.key]),
            "closed_rps_median": statistics.median(r["throughput_rps"] for r in runs),
            "closed_rps_runs": [r["throughput_rps"] for r in runs],
            "server_cpu_s_per_1k": 1000 * sum(r["server_cpu_s"] for r in runs) / calls,
            "redis_cpu_s_per_1k": 1000 * sum(r["redis_cpu_s"] for r in runs) / calls,
        }
    document = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": _versions(),
        # Where the results were written says nothing about them (and names this machine's paths).
        "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = (
        "levers-blocked.json"
        if args.blocked
        else "levers-settle.json"
        if args.rpc == "settle"
        else "levers.json"
    )
    (args.out / name).write_text(json.dumps(_finite(document), indent=2) + "\n")
    print(table(results))
    return 0


_DOCS = {"baseline": "the server as it is", "floor": "the naive floor (bench/floor.py)"}


def table(results: dict[str, Any]) -> str:
    """Each lever beside the baseline (deltas, ratios) and as a ratio to the floor."""
    base, floor = results["baseline"], results.get("floor")
    header = (
        f"{'lever':<40} {'seq p50 ms':>17} {'/floor':>6} {'seq p99 ms':>17} {'closed rps':>13} {'/floor':>6} "
        f"{'server CPU-s/1k':>16} {'redis CPU-s/1k':>14}"
    )
    lines = [header, "-" * len(header)]
    for key, r in results.items():
        s, b = r["sequential"], base["sequential"]
        rps, cpu = r["closed_rps_median"], r["server_cpu_s_per_1k"]
        f_p50 = f"{s['p50'] / floor['sequential']['p50']:.2f}x" if floor else "-"
        f_rps = f"{rps / floor['closed_rps_median']:.2f}x" if floor else "-"
        lines.append(
            f"{key:<40} {s['p50']:.3f} ({1000 * (s['p50'] - b['p50']):+5.0f}us) {f_p50:>6} "
            f"{s['p99']:.3f} ({1000 * (s['p99'] - b['p99']):+5.0f}us) "
            f"{rps:>5.0f} ({rps / base['closed_rps_median']:.2f}x) {f_rps:>6} "
            f"{cpu:.3f} ({cpu / base['server_cpu_s_per_1k']:.2f}x) {r['redis_cpu_s_per_1k']:>14.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
