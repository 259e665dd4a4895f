"""Overload: Decide offered open loop at 1.5x the server's own capacity, with and without admission control.

The capacity is the server's closed-loop Decide throughput measured in the same run;
then calls are sent on a schedule at ``--factor`` times it for ``--seconds``, each with
the clients' default deadline (250 ms) through the shipped AsyncDecisionClient
(fail-closed, so a refusal is an error and never a fake allowance). Reported for
each server:

* **goodput**: calls answered with a decision per second, as a fraction of capacity;
* **latency of admitted calls** (answered with a decision), from the scheduled send
  time, so queueing cannot hide;
* **refusals** by status code (``RESOURCE_EXHAUSTED (client)``: the client's own
  ``max_outstanding``, never sent; RESOURCE_EXHAUSTED: past ``--max-in-flight``;
  DEADLINE_EXCEEDED: the deadline passed, or could not be met; UNAVAILABLE: a stream
  the server refused) and how fast they came back: a refusal the client hears at once
  lets its fail mode act at once.

The server and client as shipped (``--max-in-flight 64``, ``--queue-target-percent 20``,
``max_outstanding=64``) run beside the same server and client with every bound off
(``--max-in-flight 0 --queue-target-percent 0``, ``max_outstanding=0``), in alternating
repeats. ``--server-bounds-only`` adds the design before the client's bound (the
server's in-flight and stream bounds, no queue shedding, clients unbounded);
``--client-max-outstanding N`` the shipped server with clients bounded at N;
``--queue-target-percent P`` servers shedding at P% (0: none); ``--clients N`` spreads
the load over N clients, each on its own connection with its own bound (a fleet, where
one client's bound alone cannot keep the server's queue short).

``python -m bench.overload`` runs it alone; ``make bench`` runs :func:`measure` on its
redis-w1 server and one more started with the bound off.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["NO_ADMISSION", "Row", "main", "measure"]

CLIENT_DEADLINE_SECONDS = 0.25  # DecisionClient's default timeout
NO_ADMISSION = ("--max-in-flight", "0", "--queue-target-percent", "0")
# The server with its in-flight and stream bounds but no queue shedding, and a client with no bound.
SERVER_BOUNDS_ONLY = ("--queue-target-percent", "0")
NO_CLIENT_BOUND = ("--max-outstanding", "0")


@dataclass(frozen=True)
class Row:
    """One line of the table: a started server (bench.run.Target) and the load generator's extra flags."""

    key: str
    target: Any
    client_flags: tuple[str, ...] = ()


def _row(target: Any) -> Row:
    if isinstance(target, Row):
        return target
    # The server with no bounds is measured with a client with none either: the service as it was.
    unbounded = tuple(target.flags) in (NO_ADMISSION, SERVER_BOUNDS_ONLY)
    return Row(target.key, target, NO_CLIENT_BOUND if unbounded else ())


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
    clients: int = 0,
) -> dict[str, Any]:
    """Open loop at ``factor`` x ``capacity_rps`` on each of ``targets`` (bench.run.Target or Row).

    ``clients``: spread each run over this many clients, each on its own connection
    (0: the target's own count, one per single-worker server).

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
        "clients": clients or None,
    }
    rows = [_row(t) for t in targets]
    tries: dict[str, list[dict[str, Any]]] = {r.key: [] for r in rows}
    for rnd in range(repeats):
        for row in rows if rnd % 2 == 0 else list(reversed(rows)):
            target = row.target
            log(f"  overload {row.key}: {rate:.0f}/s ({factor:g}x its capacity {capacity_rps:.0f}/s)")
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
                str(clients or target.connections),
                *row.client_flags,
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
            tries[row.key].append(figures)
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
    spread = f", {figures['clients']} clients" if figures.get("clients") else ""
    lines = [
        f"Overload: Decide at {figures['factor']:g}x capacity ({figures['offered_rps']:.0f}/s offered, "
        f"capacity {figures['capacity_rps']:.0f}/s), deadline {figures['deadline_s'] * 1000:.0f} ms{spread}",
        f"  {'server':<22} {'goodput':>16} {'admitted p50/p99/max ms':>26} {'refused':>8} "
        f"{'refusal p50/p99 ms':>20} {'cores srv/gen':>13}  codes",
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
            f"{_ms(e['p50']):>11}/{_ms(e['p99'])} {_cores(f):>13}  {codes}"
        )
    return "\n".join(lines)


def _cores(figures: dict[str, Any]) -> str:
    server, loadgen = figures.get("server_cores"), figures.get("loadgen_cores")
    return "-" if server is None or loadgen is None else f"{server:.2f}/{loadgen:.2f}"


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
    p.add_argument(
        "--client-max-outstanding",
        default="",
        help="also run the shipped server with clients bounded at these (comma-separated; 0: none)",
    )
    p.add_argument(
        "--queue-target-percent",
        default="",
        help="also run servers with these queue targets (comma-separated)",
    )
    p.add_argument(
        "--server-bounds-only",
        action="store_true",
        help="also run the server with no queue shedding and clients with no bound (the design before)",
    )
    p.add_argument(
        "--clients", type=int, default=0, help="spread the load over this many clients (connections)"
    )
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
    for n in filter(None, args.queue_target_percent.split(",")):
        flags = ("--queue-target-percent", n)
        targets.append(Target(f"redis-w1-queue{n}pct", "queue target", "spendgate", "redis", 1, flags=flags))
    if args.server_bounds_only:
        targets.append(
            Target("server-bounds-only", "bounds", "spendgate", "redis", 1, flags=SERVER_BOUNDS_ONLY)
        )
    rows: list[Any] = list(targets)
    for n in filter(None, args.client_max_outstanding.split(",")):
        rows.append(Row(f"redis-w1 client<={n}", shipped, ("--max-outstanding", n)))
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
            rows,
            capacity,
            log,
            factor=args.factor,
            seconds=args.seconds,
            repeats=args.repeats,
            deadline=args.deadline,
            clients=args.clients,
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(table(figures, [r.key for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
