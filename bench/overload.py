"""Overload: Decide offered open loop at 1.5x the server's own capacity, with and without admission control.

The capacity is the server's closed-loop Decide throughput measured in the same run;
then calls are sent on a schedule at ``--factor`` times it for ``--seconds``, each with
the clients' default deadline (250 ms) through the shipped AsyncDecisionClient
(fail-closed, so a refusal is an error and never a fake allowance). Reported for
each server:

* **goodput**: calls answered with a decision per second, as a fraction of capacity;
* **latency of admitted calls** (answered with a decision), from the scheduled send
  time, so queueing cannot hide;
* **refusals** by status code (RESOURCE_EXHAUSTED: past ``--max-in-flight``;
  DEADLINE_EXCEEDED: the deadline passed) and how fast they came back: a refusal
  the client hears at once lets its fail mode act at once.

The server as shipped (``--max-in-flight 64``) runs beside the same server with the
bound off (``--max-in-flight 0``), in alternating repeats.

``python -m bench.overload`` runs it alone; ``make bench`` runs :func:`measure` on its
redis-w1 server and one more started with the bound off.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["NO_ADMISSION", "main", "measure"]

CLIENT_DEADLINE_SECONDS = 0.25  # DecisionClient's default timeout
NO_ADMISSION = ("--max-in-flight", "0")


def measure(
    bench: Any,
    targets: Sequence[Any],
    capacity_rps: float,
    log: Callable[[str], None],
    *,
    factor: float = 1.5,
    seconds: float = 3.0,
    repeats: int = 2,
    deadline: float = CLIENT_DEADLINE_SECONDS,
) -> dict[str, Any]:
    """Open loop at ``factor`` x ``capacity_rps`` on each of ``targets`` (bench.run.Target).

    Returns, per target key: the kept repeat's figures (``goodput_rps``,
    ``goodput_of_capacity``, ``p50``/``p99``/``max`` ms of admitted calls,
    ``error_codes``, ``error_latency``) and every repeat's summary.
    """
    from bench.run import _figures

    rate = capacity_rps * factor
    out: dict[str, Any] = {
        "capacity_rps": capacity_rps,
        "factor": factor,
        "offered_rps": rate,
        "deadline_s": deadline,
    }
    tries: dict[str, list[dict[str, Any]]] = {t.key: [] for t in targets}
    for rnd in range(repeats):
        for target in targets if rnd % 2 == 0 else list(reversed(targets)):
            log(f"  overload {target.key}: {rate:.0f}/s ({factor:g}x its capacity {capacity_rps:.0f}/s)")
            cpu0 = bench.servers[target.key].cpu_seconds()
            result = bench.loadgen(
                target,
                "--mode",
                "open",
                "--rate",
                f"{rate:.3f}",
                "--duration",
                str(seconds),
                "--deadline",
                str(deadline),
                "--connections",
                str(target.connections),
            )
            server_cpu = bench.servers[target.key].cpu_seconds() - cpu0
            figures = _figures(result)
            # Cores used while the load ran (the load generator's own run includes its set-up).
            figures["server_cores"] = server_cpu / figures["elapsed_s"] if figures["elapsed_s"] else 0.0
            figures["loadgen_cores"] = (
                figures["client_cpu_s"] / figures["elapsed_s"] if figures["elapsed_s"] else 0.0
            )
            figures["goodput_rps"] = figures["ok"] / figures["elapsed_s"] if figures["elapsed_s"] else 0.0
            figures["goodput_of_capacity"] = figures["goodput_rps"] / capacity_rps
            tries[target.key].append(figures)
    for key, runs in tries.items():
        # The repeat with the most goodput: other work on the machine only ever takes some away.
        best = dict(max(runs, key=lambda r: r["goodput_rps"]))
        kept = (
            "goodput_of_capacity",
            "p50",
            "p99",
            "max",
            "errors",
            "error_codes",
            "server_cores",
            "loadgen_cores",
        )
        best["repeats"] = [{k: r[k] for k in kept} for r in runs]
        out[key] = best
    return out


def table(figures: dict[str, Any], keys: Sequence[str]) -> str:
    """The overload figures as lines for the terminal."""
    lines = [
        f"Overload: Decide at {figures['factor']:g}x capacity ({figures['offered_rps']:.0f}/s offered, "
        f"capacity {figures['capacity_rps']:.0f}/s), deadline {figures['deadline_s'] * 1000:.0f} ms",
        f"  {'server':<22} {'goodput':>16} {'admitted p50/p99/max ms':>26} {'refused':>8} "
        f"{'refusal p50/p99 ms':>20}  codes",
    ]
    for key in keys:
        f = figures.get(key)
        if not f:
            continue
        e = f["error_latency"]
        codes = ", ".join(f"{c} {n}" for c, n in sorted(f["error_codes"].items())) or "-"
        lines.append(
            f"  {key:<22} {f['goodput_rps']:>7.0f}/s ({f['goodput_of_capacity']:.2f}x) "
            f"{_ms(f['p50']):>8}/{_ms(f['p99'])}/{_ms(f['max'])} {f['errors']:>8} "
            f"{_ms(e['p50']):>11}/{_ms(e['p99'])}  {codes}"
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.overload``."""
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__)
    p.add_argument("--factor", type=float, default=1.5, help="offered load as a multiple of capacity")
    p.add_argument("--seconds", type=float, default=3.0, help="duration of each open-loop run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--deadline", type=float, default=CLIENT_DEADLINE_SECONDS)
    p.add_argument("--closed-seconds", type=float, default=3.0, help="closed-loop run that measures capacity")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-in-flight", default="", help="also run a server with this bound (e.g. 32)")
    p.add_argument("--variants", default="", help="also run servers with these bench.variants levers")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    args.variant = ""
    from bench._procs import Processes
    from bench.run import Bench, Target, _closed, _start_servers

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    shipped = Target("redis-w1", "Decide redis w1", "spendgate", "redis", 1)
    unbounded = Target("redis-w1-unbounded", "no admission", "spendgate", "redis", 1, flags=NO_ADMISSION)
    targets = [shipped, unbounded]
    if args.max_in_flight:
        bound = ("--max-in-flight", args.max_in_flight)
        key = f"redis-w1-max{args.max_in_flight}"
        targets.append(Target(key, "bound", "spendgate", "redis", 1, flags=bound))
    for lever in filter(None, args.variants.split(",")):
        targets.append(
            Target(
                f"redis-w1-{lever.replace('+', '-')}",
                lever,
                "spendgate",
                "redis",
                1,
                variant=lever.replace("+", ","),
            )
        )
    with Processes() as procs:
        bench = Bench(args, procs, log)
        _start_servers(bench, targets)
        capacity = _closed(bench, shipped, "decide")["throughput_rps"]
        figures = measure(
            bench,
            targets,
            capacity,
            log,
            factor=args.factor,
            seconds=args.seconds,
            repeats=args.repeats,
            deadline=args.deadline,
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(table(figures, [t.key for t in targets]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
