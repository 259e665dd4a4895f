"""The results document as a terminal table, a Markdown table and a latency-vs-load plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["markdown", "plot", "table"]

_LATENCY_ROWS = ("p50", "p90", "p99", "p99.9")
_OPEN_ROWS = ("p50", "p99", "p99.9")


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _cell(value: Any, floor: Any, digits: int = 3) -> str:
    text = _num(value, digits)
    if value is None or floor in (None, 0) or (isinstance(floor, float) and math.isnan(floor)):
        return text
    return f"{text} ({value / floor:.2f}x)"


def _rows(document: dict[str, Any], rpc: str) -> tuple[list[str], list[list[str]]]:
    results = document[rpc]
    targets = [t for t in document["targets"] if t["key"] in results]
    header = ["", *[t["key"] for t in targets]]
    floor = results["floor"]
    rows: list[list[str]] = []

    def add(label: str, get: Any, digits: int = 3, ratio: bool = True) -> None:
        base = get(floor)
        row = [label]
        for t in targets:
            value = get(results[t["key"]])
            row.append(
                _num(value, digits) if t["key"] == "floor" or not ratio else _cell(value, base, digits)
            )
        rows.append(row)

    for name in _LATENCY_ROWS:
        add(f"sequential {name} ms", lambda r, n=name: r["sequential"][n])
    for i, point in enumerate(floor["open"]):
        label = f"open {point['fraction_of_floor']:g}x ({point['offered_rps']:.0f}/s)"
        for name in _OPEN_ROWS:
            add(f"{label} {name} ms", lambda r, i=i, n=name: r["open"][i][n])
    add("open-loop failed calls (all loads)", lambda r: sum(p["errors"] for p in r["open"]), 0, ratio=False)
    add("closed-loop calls/s", lambda r: r["closed"]["throughput_rps"], 0)
    add("server CPU-s / 1k calls", lambda r: r["closed"].get("server_cpu_s_per_1k"))
    add("redis CPU-s / 1k calls", lambda r: r["closed"].get("redis_cpu_s_per_1k"))
    add("loadgen CPU-s / 1k calls", lambda r: r["closed"].get("client_cpu_s_per_1k"))
    return header, rows


def _format(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _preamble(document: dict[str, Any]) -> str:
    m, v = document["machine"], document["versions"]
    return (
        f"{document['date']}  {m['cpu_count']} CPUs ({m['cpu_model']})  Python {v['python']}  "
        f"grpcio {v['grpcio']}  redis-py {v['redis_py']}  Redis {v['redis_server']}"
    )


def _wrapper_line(document: dict[str, Any]) -> str:
    w = document.get("wrapper_overhead") or {}
    if w.get("status") == "ok":
        figures = ", ".join(f"{k}={_num(v)}" for k, v in w["figures"].items())
        return f"client wrapper overhead: {figures}"
    detail = w.get("note") or w.get("error") or ""
    return f"client wrapper overhead: {w.get('status', 'missing')} {detail}".rstrip()


def _estimate_lines(document: dict[str, Any]) -> list[str]:
    e = document.get("estimate_error") or {}
    if e.get("status") != "ok":
        detail = e.get("note") or e.get("error") or ""
        return [f"token estimate error: {e.get('status', 'missing')} {detail}".rstrip()]
    from bench.estimate_error import table as estimate_table

    return ["token estimate error (estimate / modelled provider count - 1):", estimate_table(e["figures"])]


def _noisy_line(document: dict[str, Any]) -> str:
    n = document.get("noisy_neighbour") or {}
    if n.get("status") != "ok":
        detail = n.get("note") or n.get("error") or ""
        return f"noisy neighbour: {n.get('status', 'missing')} {detail}".rstrip()
    f = n["figures"]
    alone, noisy = f["quiet_decide_alone_ms"], f["quiet_decide_with_noise_ms"]
    verdict = "within" if f["within_target"] else "OUTSIDE"
    return (
        f"noisy neighbour (quiet tenant's Decide, ms): alone p50 {_num(alone['p50'])} p99 "
        f"{_num(alone['p99'])}; with noise p50 {_num(noisy['p50'])} p99 {_num(noisy['p99'])}; "
        f"p99 x{_num(f['p99_ratio'], 2)} ({verdict} the x{f['target_p99_ratio']} target)"
    )


def _guarded_lines(document: dict[str, Any]) -> list[str]:
    g = document.get("guarded_call") or {}
    if g.get("status") != "ok":
        detail = g.get("note") or g.get("error") or ""
        return [f"guarded call: {g.get('status', 'missing')} {detail}".rstrip()]
    from bench.guarded import table as guarded_table

    return guarded_table(g["figures"]).splitlines()


def _overload_lines(document: dict[str, Any]) -> list[str]:
    o = document.get("overload") or {}
    if o.get("status") != "ok":
        detail = o.get("note") or o.get("error") or ""
        return [f"overload: {o.get('status', 'missing')} {detail}".rstrip()]
    from bench.overload import table as overload_table

    return overload_table(o["figures"], o["keys"]).splitlines()


def table(document: dict[str, Any]) -> str:
    """The figures for the terminal: each beside its ratio to the floor."""
    out = [_preamble(document), ""]
    for rpc in ("decide", "settle"):
        if not document.get(rpc):
            continue
        header, rows = _rows(document, rpc)
        header[0] = rpc.capitalize()
        out += [*_format(header, rows), ""]
    out += [*_guarded_lines(document), ""]
    out += [*_overload_lines(document), ""]
    out.append(_wrapper_line(document))
    out += _estimate_lines(document)
    out.append(_noisy_line(document))
    return "\n".join(out)


def markdown(document: dict[str, Any]) -> str:
    """The same table in Markdown, for the README."""
    out = [_preamble(document), ""]
    for rpc in ("decide", "settle"):
        if not document.get(rpc):
            continue
        header, rows = _rows(document, rpc)
        header[0] = rpc.capitalize()
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append("")
    out += [*_guarded_lines(document), ""]
    out += [*_overload_lines(document), ""]
    out.append(_wrapper_line(document))
    out.append("")
    out += [*_estimate_lines(document), ""]
    out.append(_noisy_line(document))
    return "\n".join(out)


def plot(document: dict[str, Any], path: Path) -> None:
    """Latency percentiles against offered load, floor and every Decide target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = document["decide"]
    keys = [t["key"] for t in document["targets"] if t["key"] in results]
    panels = ("p50", "p99", "p99.9")
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.6), sharex=True)
    for ax, name in zip(axes, panels, strict=True):
        for key in keys:
            points = results[key]["open"]
            xs = [p["offered_rps"] for p in points]
            ys = [p[name] for p in points]
            style = {"color": "black", "linewidth": 2.2} if key == "floor" else {"linewidth": 1.5}
            ax.plot(xs, ys, marker="o", label=key if key == "floor" else f"Decide {key}", **style)
            seq = results[key]["sequential"][name]
            ax.scatter([0], [seq], marker="x", color=ax.lines[-1].get_color())
        ax.set_title(f"{name} latency")
        ax.set_xlabel("offered load, calls/s (x at 0: sequential)")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    capacity = results.get("floor_capacity_rps")
    if capacity:
        for ax in axes:
            ax.axvline(capacity, color="grey", linestyle=":", linewidth=1)
            ax.axvline(capacity / 2, color="grey", linestyle="--", linewidth=0.8)
    axes[0].legend(fontsize=8)
    m = document["machine"]
    fig.suptitle(
        f"spendgate Decide vs naive floor, open loop (dashed: half the floor's capacity, dotted: its "
        f"capacity) — {document['date'][:10]}, {m['cpu_count']} CPUs",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
